"""float32 products on the AMX tile unit (kernels/amx.h, called by both compiled backends): each
operand split into three bfloat16 parts, six part products. Against float64 NumPy with a bound
of float32 rounding (a bfloat16 product misses it by 100x or more): every layout, remainder and
block of the product (through the Cython test hook and through fastrnn._numba.amx), NaN, the
switch, and whole layers of every cell against the reference on the tile unit."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastrnn

from conftest import (CELLS, COMPILED_BACKENDS, assert_all_close, child_python, make_layer,
                      random_state, result_dict)


def _layers():
    if "cython" not in COMPILED_BACKENDS:
        pytest.skip("cython not under test")
    from fastrnn._cy import layers
    return layers


def _needs_amx(backend="cython"):
    kernels = _layers() if backend == "cython" else fastrnn.get_backend(backend)
    if not kernels.amx_available():
        pytest.skip("this CPU (or OS) gives no AMX tile unit")
    return kernels


@pytest.fixture
def amx_on():
    layers = _needs_amx()
    previous = layers.set_amx(True)
    yield
    layers.set_amx(previous)


def _bound_err(got, v, w, start=None):
    """Largest |got - exact| relative to sum |v_i w_i| (+ |start|): float32 rounding of a
    length-K sum is a few 1e-7 of it (measured: 7e-8 to 3e-7 here)."""
    v64, w64 = v.astype(np.float64), w.astype(np.float64)
    exact = v64 @ w64.T
    scale = np.abs(v64) @ np.abs(w64).T
    if start is not None:
        exact = exact + start
        scale = scale + np.abs(start)
    return (np.abs(got - exact) / np.maximum(scale, 1e-300)).max()


# (n weight rows, K terms, B rows of x): ragged panels (32 rows) and tiles (16 output columns),
# K not a multiple of 32, B from one tile row to several 16-row tiles, odd tile counts, and x
# split in several blocks (192 KiB of split rows: 64 rows at K = 512) with a ragged last one
SHAPES = [(70, 37, B) for B in (1, 5, 15, 16, 17, 31, 32, 33, 48)] + \
         [(33, 512, 200), (16, 1, 20), (2048, 64, 32), (40, 1000, 16), (1, 300, 70)]


@pytest.mark.parametrize("n,K,B", SHAPES)
def test_amx_product_is_float32_accurate(amx_on, n, K, B):
    layers = _layers()
    rng = np.random.default_rng(n * 7919 + K * 31 + B)
    w = rng.standard_normal((n, K)).astype(np.float32)
    v = rng.standard_normal((B, K)).astype(np.float32)
    # a wide range of magnitudes: the split must hold for every exponent
    w *= np.exp2(rng.integers(-20, 20, size=(n, K))).astype(np.float32)
    wt, vt = np.ascontiguousarray(w.T), np.ascontiguousarray(v.T)
    for threads in (1, 2):
        for wa, va in [(w, v), (wt.T, v), (w, vt.T), (wt.T, vt.T)]:
            out = np.full((B, n), np.nan, np.float32)
            layers._pack_and_multiply(wa, va, out, False, threads, True)
            assert _bound_err(out, v, w) < 5e-7, (n, K, B, threads)
            start = rng.standard_normal((B, n)).astype(np.float32)
            out = start.copy()
            layers._pack_and_multiply(wa, va, out, True, threads, True)
            assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads, "accumulate")


def test_amx_product_is_not_plain_bfloat16(amx_on):
    # the bound above is tight enough to tell: one bfloat16 product (or a0 b0 + a0 b1 + a1 b0)
    # misses it by orders of magnitude
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    v = rng.standard_normal((32, 256)).astype(np.float32)

    def bf16(a):
        return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

    assert _bound_err(bf16(v).astype(np.float64) @ bf16(w).T.astype(np.float64), v, w) > 1e-4
    out = np.zeros((32, 64), np.float32)
    _layers()._pack_and_multiply(w, v, out, False, 2, True)
    assert _bound_err(out, v, w) < 5e-7


@pytest.mark.parametrize("where", ["x", "w", "x-columns"])
def test_amx_product_keeps_nan(amx_on, where):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    v = rng.standard_normal((100, 40)).astype(np.float32)
    out = np.zeros((100, 70), np.float32)
    if where == "w":
        w[13, 7] = np.nan
        _layers()._pack_and_multiply(w, v, out, False, 2, True)
        assert np.isnan(out[:, 13]).all()
        assert not np.isnan(np.delete(out, 13, axis=1)).any()
        return
    v[61, 3] = np.nan
    va = np.ascontiguousarray(v.T).T if where == "x-columns" else v
    _layers()._pack_and_multiply(w, va, out, False, 2, True)
    assert np.isnan(out[61]).all()
    assert not np.isnan(np.delete(out, 61, axis=0)).any()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_amx_switch(backend):
    kernels = fastrnn.get_backend(backend)
    previous = kernels.get_amx()
    try:
        assert kernels.set_amx(False) == previous
        assert kernels.get_amx() is False
        kernels.set_amx(True)
        assert kernels.get_amx() is kernels.amx_available()
        for bad in ("no", 0, None):
            with pytest.raises(TypeError, match="on: expected True or False"):
                kernels.set_amx(bad)
            assert kernels.get_amx() is kernels.amx_available()     # left as it was
    finally:
        kernels.set_amx(previous)


def test_amx_hook_refuses_float64():
    with pytest.raises(ValueError, match="amx"):
        w = np.zeros((4, 4))
        _layers()._pack_and_multiply(w, w, np.zeros((4, 4)), False, 1, True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_amx_off_from_the_environment(backend):
    code = f"import fastrnn; print(fastrnn.get_backend({backend!r}).get_amx())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         **child_python(dict(os.environ, FASTRNN_AMX="0")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("n,K,B", SHAPES)
def test_numba_amx_products_are_float32_accurate(n, K, B):
    if "numba" not in COMPILED_BACKENDS:
        pytest.skip("numba not under test")
    _needs_amx("numba")
    from fastrnn._numba import amx
    rng = np.random.default_rng(n * 7919 + K * 31 + B + 1)
    w = rng.standard_normal((n, K)).astype(np.float32)
    v = rng.standard_normal((B, K)).astype(np.float32)
    w *= np.exp2(rng.integers(-20, 20, size=(n, K))).astype(np.float32)
    flat = np.empty(amx.packed_size(n, K), np.float32)
    for threads in (1, 2):
        # rows of w and v, or columns (transposed views, as backward and the gradients pass)
        for wa, va in [(w, v), (np.ascontiguousarray(w.T).T, np.ascontiguousarray(v.T).T)]:
            start = rng.standard_normal((B, n)).astype(np.float32)
            out = start.copy()
            amx.pack_and_multiply(threads, wa, n, va, out, True, flat)
            assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads)
            out = np.full((B, n), np.nan, np.float32)
            amx.pack_parts(threads, wa, 0, n, flat)
            amx.product_parts(threads, flat, n, va, out, 0, False)
            assert _bound_err(out, v, w) < 5e-7, (n, K, B, threads, "parts")
    # the weight gradient: out (B, n) += v^T-side sums over rows, d = v^T laid out (K, B)
    d, e = np.ascontiguousarray(v.T), np.ascontiguousarray(w.T)       # (K, B), (K, n)
    start = rng.standard_normal((B, n)).astype(np.float32)
    for threads in (1, 2):
        out = start.copy()
        grad_flat = np.empty(amx.packed_size(n, 256), np.float32)
        amx.weight_gradient(threads, d, e, out, grad_flat)
        assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads, "gradient")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("B", [16, 20])
@pytest.mark.parametrize("dtype,on", [(np.float32, True), (np.float32, False),
                                      (np.float64, False)], ids=["f32-amx", "f32-avx", "f64"])
def test_layers_on_and_off_the_tile_unit_match_the_reference(backend, cell, B, dtype, on):
    # B = 16: inference takes the unit-split loop (its input projection on the tile unit),
    # training the packed GEMM loop with every product on it; B = 20: a ragged tile.
    # Off (and float64, which never takes it): the AVX path of the same calls, which the rest
    # of the suite, with the tile unit on by default, meets only below 16 rows
    kernels = _needs_amx(backend) if on else fastrnn.get_backend(backend)
    previous = kernels.set_amx(on)
    try:
        _compare_layers_with_the_reference(backend, cell, B, dtype)
    finally:
        kernels.set_amx(previous)


def _compare_layers_with_the_reference(backend, cell, B, dtype):
    T, I, H = 9, 40, 48          # T*B >= 128: both backends pack (numba's limit)
    rng = np.random.default_rng(B)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    dy = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    results = []
    for name in ("reference", backend):
        layer = make_layer(cell, I, H, num_layers=2, bidirectional=True, dtype=dtype,
                           seed=3, backend=name)
        state = random_state(layer, B, np.random.default_rng(7))
        y, final, cache = layer.forward(x, state, lengths)
        layer.zero_grad()
        dx, dstate0 = layer.backward(dy, cache)
        y_infer, final_infer = layer(x, state, lengths)
        results.append(result_dict(y, dx, final, dstate0, layer.grads))
        results[-1]["y_infer"] = y_infer
    assert_all_close(results[1], results[0], dtype, f"{backend} {cell} B={B} {np.dtype(dtype)}")


def test_numba_without_the_extension_runs_without_the_tile_unit():
    # the Numba backend takes the tile unit's kernels from the Cython extension; without it
    # (not built) its loops still compile and run, on AVX, and say so
    if "numba" not in COMPILED_BACKENDS:
        pytest.skip("numba not under test")
    code = """
import sys
sys.modules["fastrnn._cy.amx_export"] = None        # as if the extension were not built
import numpy as np, fastrnn
kernels = fastrnn.get_backend("numba")
assert not kernels.amx_available() and not kernels.get_amx()
assert kernels.set_amx(True) is False and not kernels.get_amx()
rng = np.random.default_rng(0)
ref = fastrnn.GRU(6, 16, backend="reference", dtype=np.float32, seed=1)
m = fastrnn.GRU(6, 16, backend="numba", dtype=np.float32, seed=1)
x = rng.standard_normal((10, 20, 6)).astype(np.float32)
for layer in (ref, m):
    y, _, cache = layer.forward(x)
    layer.backward(np.ones_like(y), cache)
np.testing.assert_allclose(m(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(m.grads["weight_hh_l0"], ref.grads["weight_hh_l0"], rtol=1e-4, atol=1e-5)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         **child_python())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
