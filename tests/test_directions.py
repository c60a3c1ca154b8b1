"""Both directions of a bidirectional layer at once (fastrnn.layers._both_directions, kernel
calls with threads=1): the same numbers as the reference for every cell and dtype, training and
inference, with lengths, states, two layers and no bias; that the path is taken; that a failure
on either thread reaches the caller; the kernels' threads argument."""
import numpy as np
import pytest

import fastrnn
import fastrnn.layers as layers
from conftest import (CELLS, COMPILED_BACKENDS, assert_all_close, make_layer, random_state,
                      result_dict, state_parts)


@pytest.fixture
def counted(monkeypatch):
    """Every bidirectional layer takes the concurrent path when its backend allows it; returns
    the list of the calls made through it."""
    monkeypatch.setattr(layers, "_CONCURRENT_MIN_WORK", 0)
    calls = []
    original = layers._both_directions

    def spy(run):
        calls.append(run)
        return original(run)
    monkeypatch.setattr(layers, "_both_directions", spy)
    return calls


def _needs_two_threads(backend):
    kernels = fastrnn.get_backend(backend)
    if kernels.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    assert kernels.concurrent_directions(10, 4, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_directions_at_once_match_the_reference(backend, cell, dtype, counted):
    _needs_two_threads(backend)
    # B = 5, T*B = 150: the packed GEMM loop in training (both backends pack from 128 rows),
    # the unit-split loop in inference
    T, B, I, H = 30, 5, 7, 20
    rng = np.random.default_rng(11)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    lengths = np.array([30, 3, 0, 19, 30])
    dy = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    for options in ({"num_layers": 2}, {"bias": False}):
        ref = make_layer(cell, I, H, bidirectional=True, dtype=dtype, seed=4, **options)
        m = make_layer(cell, I, H, bidirectional=True, dtype=dtype, seed=4, backend=backend,
                       **options)
        state = random_state(m, B, rng)
        dstate = random_state(m, B, rng)
        given = [a.copy() for a in (x, lengths, dy, *state_parts(state), *state_parts(dstate))]
        results = []
        for layer in (ref, m):
            before = len(counted)
            y, final, cache = layer.forward(x, state, lengths)
            layer.zero_grad()
            dx, dstate0 = layer.backward(dy, cache, dstate)
            y_infer, final_infer = layer(x, state, lengths)
            results.append((result_dict(y, dx, final, dstate0, layer.grads),
                            {"y": y_infer, "state": np.stack(final_infer)
                             if isinstance(final_infer, tuple) else final_infer}))
            taken = len(counted) - before
        # forward, backward and inference, each layer of the stack: all at once
        assert taken == 3 * m.num_layers, (backend, taken)
        # the caller's arrays are left as they were
        for before, after in zip(given, (x, lengths, dy, *state_parts(state),
                                         *state_parts(dstate))):
            np.testing.assert_array_equal(after, before)
        assert_all_close(results[1][0], results[0][0], dtype, f"{backend} {cell} {options}")
        assert_all_close(results[1][1], results[0][1], dtype, f"{backend} {cell} inference")


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("failing", [0, 1])
def test_a_failure_on_either_thread_reaches_the_caller(backend, failing, counted, monkeypatch):
    _needs_two_threads(backend)
    m = make_layer("gru", 4, 16, bidirectional=True, backend=backend, dtype=np.float32)
    kernels = m._kernels
    original = kernels.layer_forward

    def layer_forward(*args, **kwargs):
        if args[5] == bool(failing):                # reverse: the direction
            raise RuntimeError(f"direction {failing} failed")
        return original(*args, **kwargs)
    monkeypatch.setattr(m, "_kernels", type("K", (), {
        "layer_forward": staticmethod(layer_forward),
        "concurrent_directions": staticmethod(kernels.concurrent_directions)}))
    with pytest.raises(RuntimeError, match=f"direction {failing} failed"):
        m(np.ones((9, 4, 4), np.float32))          # inference: B <= small_batch_max
    assert counted


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads_argument_names_it(backend, threads):
    m = make_layer("lstm", 3, 4, backend=backend, dtype=np.float32)
    x = np.ones((2, 1, 3), np.float32)
    z = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="threads"):
        m._kernels.layer_forward(m.cell, x, (z, z), m._layer_params(m.params, 0, 0),
                                 np.full(1, 2), False, False, np.empty((2, 1, 4), np.float32),
                                 (np.empty((1, 4), np.float32), np.empty((1, 4), np.float32)),
                                 threads=threads)


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_one_thread_runs_the_directions_one_after_the_other(backend, counted):
    kernels = fastrnn.get_backend(backend)
    before = kernels.get_num_threads()
    m = make_layer("lstm", 4, 16, bidirectional=True, backend=backend, dtype=np.float32)
    x = np.ones((9, 4, 4), np.float32)
    try:
        kernels.set_num_threads(1)
        assert not kernels.concurrent_directions(9, 4, False)
        m(x)
        assert not counted
    finally:
        kernels.set_num_threads(before)
