"""The Numba backend's panel kernels: pack_panels and panel_product against NumPy, for every
remainder of the row tiles (B = 1 .. 17), ragged row counts (a padded last panel), and NaN.
The unit-split loop that uses them is covered in test_small_batch.py (packing forced on)."""
import numpy as np
import pytest

from conftest import COMPILED_BACKENDS

pytestmark = pytest.mark.skipif("numba" not in COMPILED_BACKENDS, reason="numba not under test")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_panel_product_matches_numpy(dtype):
    from fastrnn._numba import kernels
    tol = 1e-5 if dtype == np.float32 else 1e-13
    NR = kernels.panel_width(np.zeros(1, dtype))
    for K, rows, r0, n in [(37, 200, 13, 150), (64, 4 * NR, 0, 4 * NR), (5, 40, 3, 1)]:
        for B in range(1, 18):
            rng = np.random.default_rng(B * 1000 + K)
            w = rng.standard_normal((rows, K)).astype(dtype)
            v = rng.standard_normal((B, K)).astype(dtype)
            packed = kernels.panel_buffer((-(-n // NR), K, NR), w)
            assert packed.ctypes.data % 64 == 0
            kernels.pack_panels(w, r0, n, packed)
            out = np.full((B, n + 20), 7, dtype)
            kernels.panel_product(packed, 10, n, v, out)
            ref = v.astype(np.float64) @ w[r0:r0 + n].T.astype(np.float64)
            err = np.abs(out[:, 10:10 + n] - ref).max() / max(1.0, np.abs(ref).max())
            assert err < tol, (K, n, B, err)
            # nothing written outside the n columns (the padded panel goes through a buffer)
            assert (out[:, :10] == 7).all() and (out[:, 10 + n:] == 7).all(), (K, n, B)


def test_panel_product_keeps_nan():
    from fastrnn._numba import kernels
    w = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)
    v = np.random.default_rng(1).standard_normal((11, 9)).astype(np.float32)
    v[5, 3] = np.nan
    NR = kernels.panel_width(w)
    packed = kernels.panel_buffer((-(-70 // NR), 9, NR), w)
    kernels.pack_panels(w, 0, 70, packed)
    out = np.zeros((11, 70), np.float32)
    kernels.panel_product(packed, 0, 70, v, out)
    assert np.isnan(out[5]).all()
    assert not np.isnan(np.delete(out, 5, axis=0)).any()


@pytest.mark.float32_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
def test_one_region_loop_any_thread_count(cell, threads):
    """The unit-split loop runs all its steps in one parallel region, its parts meeting on
    atomic counters; a part a thread has not claimed in time is run by another. With fewer
    threads than parts (threads=1: one thread runs every part, claiming the others') and with
    two, in each direction and with or without panels, it gives what one part gives."""
    import numba
    from fastrnn import _numba as nb
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    from fastrnn.cells import CELLS
    c = CELLS[cell]
    T, B, I, H = 7, 3, 9, 70
    G = c.num_gates
    rng = np.random.default_rng(7)
    dtype = np.float32
    x = rng.standard_normal((T, B, I)).astype(dtype)
    w_ih = (rng.standard_normal((G * H, I)) * 0.3).astype(dtype)
    w_hh = (rng.standard_normal((G * H, H)) * 0.3).astype(dtype)
    b_ih = rng.standard_normal(G * H).astype(dtype)
    b_hh = rng.standard_normal(G * H).astype(dtype)
    h0 = rng.standard_normal((B, H)).astype(dtype)
    c0 = rng.standard_normal((B, H)).astype(dtype)
    lengths = np.array([T, 4, 1], np.int64)
    forward = nb._kernel(dtype, "forward_units")
    spec = c.kernel_spec()
    params = nb._params(dtype, (w_ih, w_hh, b_ih, b_hh), c)
    second = spec[4]

    def run(parts, pack, reverse):
        y = np.full((T, B, H), 5, dtype)
        h_slots = np.stack([h0, np.full((B, H), np.nan, dtype)])
        c_slots = (np.stack([c0, np.full((B, H), np.nan, dtype)]) if c.has_cell_state
                   else np.empty((2, 0, 0), dtype))
        saved = np.zeros((1, B, H) if second < G else (1, 0, 0), dtype)
        gates = np.empty((T, B, G * H), dtype)
        own = (np.empty((0, 0, 0, 0), dtype), np.empty((0, 0, 0), dtype))
        if parts > 1:   # each thread's gates in its own buffer, as layer_forward gives them
            C = nb.kernels.unit_range(0, parts, H)[1]
            gates = np.empty((0, 0, 0), dtype)
            own = (np.full((parts, T, B, G * C), np.nan, dtype),
                   np.full((parts, B, G * C), np.nan, dtype))
        forward(spec, x, params, lengths, reverse, False,
                (nb.kernels.UNITS, parts, pack, False, False), y,
                (gates, h_slots, c_slots, saved, np.empty((B, G * H), dtype),
                 np.empty((0, 0, 0), dtype), np.empty((1, 1, 0), dtype),
                 np.empty((1, 0, 0), dtype)), own)     # no mask, no zoneout
        return y, h_slots[T % 2], c_slots[T % 2]

    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for reverse in (False, True):
            for pack in (False, True):
                want = run(1, pack, reverse)
                for parts in (2, 3):
                    got = run(parts, pack, reverse)
                    for a, b in zip(got, want):
                        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    finally:
        numba.set_num_threads(old)
