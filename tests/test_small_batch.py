"""The small-batch paths of the compiled backends, and the one-step path of the layers.

Small batches (B <= the backend's ``small_batch_max``) run a different forward time loop: the
hidden units are split over threads and the recurrent product is done per thread instead of a
BLAS GEMM. Both loops multiply either over weights packed once per call or without packing (dot
products in the unit-split loop, BLAS in the GEMM loop), as the call's size decides. Every case
here runs on all four (``small_batch_max`` forced to 0, and to a value above any B; packing
forced on and off) and compares with the NumPy reference, with hidden sizes large enough for
the units to be split over several threads and odd enough to leave ragged ends (partial
panels), and batches that leave every remainder of the packed product's row groups.

A layer called on one step (the backend's ``layer_call_step``, the whole call in compiled code,
when the arrays are already in the kernel's form) must give what the reference and the general
path give.
"""
import contextlib
import zlib

import numpy as np
import pytest

import fastrnn
from conftest import (COMPILED_BACKENDS, assert_all_close, make_layer, packing, random_state,
                      run_layer, small_batch_max, state_parts)
from fastrnn import reference
from fastrnn.cells import CELLS
from fastrnn.dispatch import get_backend

# small_batch_max (B <= it takes the unit-split loop), packed weights, the packed GEMM loop's
# products on every thread (else on the calling thread, with BLAS for the one-off products)
PATHS = {"gemm": (0, False, True), "gemm-packed": (0, True, True),
         "gemm-packed-serial": (0, True, False),
         "unit-split": (10**6, False, True), "unit-split-packed": (10**6, True, True)}


@contextlib.contextmanager
def forward_path(backend_name, path):
    limit, packed, pool = PATHS[path]
    kernels = get_backend(backend_name)
    if not pool and not hasattr(kernels, "_set_pool"):
        pytest.skip(f"{backend_name} has no separate serial packed path")
    old_pool = kernels._set_pool(pool) if hasattr(kernels, "_set_pool") else None
    try:
        with small_batch_max(backend_name, limit), packing(backend_name, packed):
            yield
    finally:
        if old_pool is not None:
            kernels._set_pool(old_pool)


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_small_batch_max_setting(backend_name):
    kernels = get_backend(backend_name)
    default = kernels.get_small_batch_max()
    assert isinstance(default, int) and default >= 1
    assert kernels.get_small_batch_max(train=True) == 0   # measured slower in training
    with small_batch_max(backend_name, 3):
        assert kernels.get_small_batch_max() == 3
        assert kernels.get_small_batch_max(train=True) == 3
    assert kernels.get_small_batch_max() == default
    with pytest.raises((ValueError, TypeError), match="n"):
        kernels.set_small_batch_max(-1)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_both_forward_loops_match_reference(backend_name, cell, dtype, path):
    """Training (forward with the cache, then backward) and inference, with lengths, both
    directions and initial states, on the GEMM loop and on the unit-split loop."""
    rng = _rng("small", cell, np.dtype(dtype).name)
    T, I = 6, 7
    for B, H in [(1, 37), (3, 70), (5, 19), (13, 45)]:
        probe = make_layer(cell, I, H, 2, bidirectional=True, dtype=dtype)
        x = rng.standard_normal((T, B, I)).astype(dtype)
        dy = rng.standard_normal((T, B, 2 * H)).astype(dtype)
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
        state = random_state(probe, B, rng)
        dstate = random_state(probe, B, rng)
        results, inference = {}, {}
        for name in ("reference", backend_name):
            m = make_layer(cell, I, H, 2, bidirectional=True, dtype=dtype, backend=name, seed=3)
            with forward_path(name, path) if name != "reference" else contextlib.nullcontext():
                results[name] = run_layer(m, x, state, lengths, dy=dy, dstate=dstate)
                y, final = m(x, state, lengths)
            inference[name] = {"y": y, **{f"state_n[{i}]": p
                                          for i, p in enumerate(state_parts(final))}}
        assert_all_close(results[backend_name], results["reference"], dtype,
                         f"{path} B={B} H={H} train")
        assert_all_close(inference[backend_name], inference["reference"], dtype,
                         f"{path} B={B} H={H} inference")


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_both_forward_loops_keep_nan(backend_name, path):
    """NaN in one batch row of x gives NaN in that row's outputs and nowhere else."""
    for cell in sorted(CELLS):
        m = make_layer(cell, 4, 33, backend=backend_name)
        x = _rng("nan", cell).standard_normal((3, 2, 4))
        x[1, 1, 2] = np.nan
        with forward_path(backend_name, path):
            y, _ = m(x)
        assert not np.isnan(y[:, 0]).any(), cell
        assert np.isnan(y[1:, 1]).any(), cell


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_one_step_call_matches_reference(backend_name, cell, dtype):
    """A layer's one-step call (the backend's whole call in compiled code) against the
    reference layer with the same parameters, on shapes that split the units over threads and
    leave ragged ends; nothing the call reads is written."""
    rng = _rng("step", cell, np.dtype(dtype).name)
    # (4, 100, 160): units split over threads in every cell (both backends' step thresholds)
    for B, I, H in [(1, 128, 128), (4, 100, 160), (1, 3, 1), (2, 5, 33), (7, 64, 50), (40, 9, 24)]:
        m = make_layer(cell, I, H, dtype=dtype, backend=backend_name, seed=B)
        oracle = make_layer(cell, I, H, dtype=dtype, backend="reference", seed=B)
        x = rng.standard_normal((1, B, I)).astype(dtype)
        state = random_state(m, B, rng)
        before = [a.copy() for a in (x, *state_parts(state), *m.params.values())]
        calls = _call_counter(m)
        y, final = m(x, state)
        assert calls, "the one-step path was not taken"
        want_y, want_state = oracle(x, state)
        assert_all_close({"y": y, **{f"s{i}": p for i, p in enumerate(state_parts(final))}},
                         {"y": want_y,
                          **{f"s{i}": p for i, p in enumerate(state_parts(want_state))}},
                         dtype, f"one step B={B} I={I} H={H}")
        for a, b in zip((x, *state_parts(state), *m.params.values()), before):
            np.testing.assert_array_equal(a, b)


def _call_counter(m):
    """Count the layers and directions run by the backend's whole one-step call
    (layer_call_step) when it takes a call."""
    calls = []
    if m._call_step is not None:
        real_call_step = m._call_step

        def counting_call_step(*args):
            result = real_call_step(*args)
            if result is not None:
                calls.extend([1] * m.num_layers * m.num_directions)
            return result
        m._call_step = counting_call_step
    return calls


STEP_STACKS = [(1, False, False), (1, False, True), (2, True, False), (3, False, True),
               (3, True, False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stack", STEP_STACKS,
                         ids=lambda s: f"L{s[0]}{'bi' if s[1] else ''}{'bf' if s[2] else ''}")
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)     # the reference has no one-step call
def test_one_step_call_equals_general_path(backend, cell, stack, dtype):
    """``m(x_t, state)`` on one step takes layer_call_step and matches ``forward(train=False)``;
    with arrays not in the kernel's form (other dtype, strided) it takes the general path."""
    num_layers, bidirectional, batch_first = stack
    rng = _rng("one step", cell, stack)
    B, I, H = 3, 6, 21
    m = make_layer(cell, I, H, num_layers, bidirectional=bidirectional,
                   batch_first=batch_first, dtype=dtype, backend=backend, seed=5)
    x = rng.standard_normal((B, 1, I) if batch_first else (1, B, I)).astype(dtype)
    state = random_state(m, B, rng)
    expected_y, expected_state, _ = m.forward(x, state, train=False)
    calls = _call_counter(m)
    for st in (state, None):
        y, final = m(x, st)
        assert len(calls) == num_layers * m.num_directions
        calls.clear()
        if st is None:
            expected_y, expected_state, _ = m.forward(x, None, train=False)
        got = {"y": y, **{f"s{i}": p for i, p in enumerate(state_parts(final))}}
        want = {"y": expected_y,
                **{f"s{i}": p for i, p in enumerate(state_parts(expected_state))}}
        assert y.shape == expected_y.shape
        assert_all_close(got, want, dtype, "one-step call")
    # input of the other float dtype, and a strided x: converted by the general path
    other = np.float64 if dtype == np.float32 else np.float32
    for x_other in (x.astype(other), np.repeat(x, 2, axis=-1)[..., ::2]):
        y, _ = m(x_other, state)
        assert not calls
        want = m.forward(np.ascontiguousarray(x_other, dtype), state, train=False)[0]
        assert_all_close({"y": y}, {"y": want}, dtype, "general path")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_one_step_call_keeps_nan_and_inputs(backend, cell):
    m = make_layer(cell, 4, 17, dtype=np.float32, backend=backend)
    rng = _rng("step nan", cell)
    x = rng.standard_normal((1, 2, 4)).astype(np.float32)
    x[0, 1, 3] = np.nan
    state = random_state(m, 2, rng)
    copies = [p.copy() for p in state_parts(state)] + [x.copy()]
    y, final = m(x, state)
    assert not np.isnan(y[0, 0]).any() and np.isnan(y[0, 1]).any()
    for part in state_parts(final):
        assert np.isnan(part[0, 1]).any() and not np.isnan(part[0, 0]).any()
    for a, b in zip(state_parts(state) + [x], copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_one_step_call_follows_the_layer_as_it_changes(backend):
    """The one-step path reads the layer on every call: a parameter array replaced in
    ``params``, a changed ``batch_first``, and a layer without biases give what the general
    path gives; an unusable replacement gets the general path's error."""
    rng = _rng("step changes")
    m = make_layer("lstm", 5, 19, 2, dtype=np.float32, backend=backend, seed=3)
    x = rng.standard_normal((1, 2, 5)).astype(np.float32)
    state = random_state(m, 2, rng)

    def check(x, what):
        calls = _call_counter(m)
        y, final = m(x, state)
        assert calls, f"{what}: the one-step path was not taken"
        want_y, want_state, _ = m.forward(x, state, train=False)
        assert_all_close({"y": y, "h": final[0], "c": final[1]},
                         {"y": want_y, "h": want_state[0], "c": want_state[1]}, np.float32,
                         what)
        return y

    before = check(x, "as made")
    m.params["weight_hh_l1"] = rng.standard_normal((4 * 19, 19)).astype(np.float32)
    after = check(x, "weight_hh_l1 replaced")
    assert not np.allclose(before, after)
    m.batch_first = True
    check(x.transpose(1, 0, 2).copy(), "batch_first set after")
    m.params["weight_ih_l0"] = np.zeros((4 * 19, 4), np.float32)         # wrong shape
    with pytest.raises(ValueError, match=r"params\['weight_ih_l0'\]: expected shape \(76, 5\)"):
        m(x.transpose(1, 0, 2).copy(), state)
    m = make_layer("gru", 5, 19, bias=False, dtype=np.float32, backend=backend, seed=4)
    state = random_state(m, 2, rng)
    calls = _call_counter(m)
    y, final = m(x, state)
    assert calls, "bias=False: the one-step path was not taken"
    want_y, want_state, _ = m.forward(x, state, train=False)
    assert_all_close({"y": y, "h": final}, {"y": want_y, "h": want_state}, np.float32,
                     "bias=False")


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_step_benchmark_call_takes_the_fast_path(backend_name):
    """The single-step benchmark case calls the layer the way this path expects."""
    m = fastrnn.LSTM(8, 8, dtype=np.float32, backend=backend_name)
    calls = _call_counter(m)
    x = np.zeros((1, 1, 8), np.float32)
    _, s = m(x, None)
    _, s = m(x, s)                       # the state a call returns is good for the next one
    assert len(calls) == 2


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_calls_from_several_threads_at_once(backend_name):
    """Layers called from two Python threads at the same time (both loops and the one-step path
    run their own thread teams) give what they give one after another."""
    import threading
    rng = _rng("threads")
    models = [make_layer(cell, 8, 40, dtype=np.float32, backend=backend_name, seed=i)
              for i, cell in enumerate(["lstm", "gru"])]
    xs = [rng.standard_normal((5, 3, 8)).astype(np.float32) for _ in models]
    expected = [(m(x)[0], m(x[:1])[0]) for m, x in zip(models, xs)]
    failures = []

    def work(m, x, want):
        for _ in range(20):
            got = (m(x)[0], m(x[:1])[0])
            if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                failures.append(m.cell.name)

    threads = [threading.Thread(target=work, args=args) for args in zip(models, xs, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_alternating_row_order_changes_no_bit(cell):
    """The Cython unit-split loop reads its weight rows last to first on every other step (so
    the rows read last are still in cache); each row's dot product must group its terms as it
    does forwards, so that the outputs are the same to the last bit with the order on and off.
    Units per thread and block (H=150 on up to 2 threads: 75 and 150) leave runs of 32 rows and
    a ragged run."""
    kernels = get_backend("cython") if "cython" in COMPILED_BACKENDS else None
    if kernels is None:
        pytest.skip("the Cython backend is not built")
    rng = _rng("zigzag", cell)
    T, B, I, H = 5, 3, 24, 150
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    outputs = []
    for on in (True, False):
        m = make_layer(cell, I, H, dtype=np.float32, backend="cython", seed=9)
        previous = kernels._set_zigzag(on)
        try:
            with forward_path("cython", "unit-split"):
                y, final = m(x, random_state(m, B, _rng("zigzag state", cell)))
        finally:
            kernels._set_zigzag(previous)
        outputs.append([y, *state_parts(final)])
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="on"):
        kernels._set_zigzag("no")               # a string is not taken for True
    assert kernels._set_zigzag(True) is True    # and the setting was left as it was


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["plain-c", "avx2", "avx512"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_each_dot_product_kernel_matches_reference(cell, isa):
    """The Cython backend's float32 dot products (rowdot.h) pick AVX-512, AVX2 or plain C at
    run time; each kernel the CPU has, forced in turn, against the reference: the unit-split
    loop unpacked (x rows 1-5: both x-row kernels, pairs and a last odd row) and one-step calls,
    with term counts (I, H) that leave every vector remainder and weight rows that leave ragged
    groups of 4 and 8."""
    if "cython" not in COMPILED_BACKENDS:
        pytest.skip("the Cython backend is not built")
    kernels = get_backend("cython")
    taken = kernels._limit_rowdot_isa(isa)
    try:
        if taken != isa:
            pytest.skip(f"this CPU has no kernel {isa} (best: {taken})")
        rng = _rng("rowdot", cell, isa)
        for B, I, H in [(1, 7, 37), (2, 23, 70), (5, 40, 19)]:
            x = rng.standard_normal((3, B, I)).astype(np.float32)
            got, want = {}, {}
            for name, out in (("cython", got), ("reference", want)):
                m = make_layer(cell, I, H, dtype=np.float32, backend=name, seed=5)
                state = random_state(m, B, _rng("rowdot state", cell, B))
                with forward_path(name, "unit-split") if name != "reference" \
                        else contextlib.nullcontext():
                    y, final = m(x, state)
                    y1, final1 = m(x[:1], state)
                out.update({"y": y, "y1": y1,
                            **{f"state_n[{i}]": p for i, p in enumerate(state_parts(final))},
                            **{f"step state_n[{i}]": p
                               for i, p in enumerate(state_parts(final1))}})
            assert_all_close(got, want, np.float32, f"isa {isa} B={B} I={I} H={H}")
    finally:
        kernels._limit_rowdot_isa(-1)
