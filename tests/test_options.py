"""Layer options built in the layers (no kernel of their own): ``merge`` (Keras's merge_mode of
a bidirectional layer) and ``init`` (PyTorch's or Keras's initialisers).

merge: against a composition of concatenating single-layer layers of the reference, merged by
NumPy here (forward); central differences in float64 (the reference's backward); every backend
against the reference (forward and backward). Keras itself is the oracle in test_keras.py.
init="keras": the properties Keras's initialisers define (Glorot-uniform bounds, orthogonal
recurrent weights, forget-gate bias 1), checked on the arrays.
"""
import zlib

import numpy as np
import pytest

import fastrnn
from conftest import (CELL_OPTIONS, TOLERANCE, assert_all_close, central_difference, make_layer,
                      max_rel_error, random_state, run_layer, state_parts)

MERGES = ["sum", "mul", "ave"]
NUMPY_MERGE = {"sum": lambda f, r: f + r, "mul": lambda f, r: f * r,
               "ave": lambda f, r: (f + r) / 2}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(" ".join(map(str, key)).encode()))


def _composed_forward(m, x, state, lengths):
    """What m (bidirectional, merge != concat) computes, from one concatenating single-layer
    reference layer per layer with m's parameters, each output merged here."""
    H, D = m.hidden_size, 2
    parts = state_parts(state)
    layer_input, finals = x, []
    for k in range(m.num_layers):
        single = make_layer(m.cell.name, layer_input.shape[2], H, 1, bidirectional=True,
                            bias=m.bias, dtype=m.dtype)
        single.load_state_dict({name.replace(f"_l{k}", "_l0"): value
                                for name, value in m.params.items() if f"_l{k}" in name})
        rows = slice(k * D, (k + 1) * D)
        layer_state = tuple(p[rows] for p in parts)
        y, final = single(layer_input, layer_state if m.cell.has_cell_state else layer_state[0],
                          lengths)
        finals.append(state_parts(final))
        layer_input = NUMPY_MERGE[m.merge](y[:, :, :H], y[:, :, H:])
    final = tuple(np.concatenate([f[i] for f in finals]) for i in range(len(parts)))
    return layer_input, (final if m.cell.has_cell_state else final[0])


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_merge_forward_equals_merged_single_layers(cell, merge):
    rng = _rng("merge forward", cell, merge)
    T, B, I, H = 5, 3, 4, 6
    m = make_layer(cell, I, H, 2, bidirectional=True, merge=merge, seed=1)
    assert m.params["weight_ih_l1"].shape[1] == H          # the next layer takes H, not 2H
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    lengths = np.array([5, 2, 4])
    y, final = m(x, state, lengths)
    assert y.shape == (T, B, H)
    want_y, want_final = _composed_forward(m, x, state, lengths)
    assert max_rel_error(y, want_y) <= 1e-12
    for got, want in zip(state_parts(final), state_parts(want_final)):
        assert max_rel_error(got, want) <= 1e-12


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("cell", ["lstm", "gru_reset_before"])
def test_merge_gradients_match_central_differences(cell, merge):
    rng = _rng("merge gradients", cell, merge)
    T, B, I, H = 3, 2, 2, 2
    m = make_layer(cell, I, H, 2, bidirectional=True, merge=merge, batch_first=True, seed=2)
    x = rng.standard_normal((B, T, I))
    state = random_state(m, B, rng)
    dy = rng.standard_normal((B, T, H))
    dstate = random_state(m, B, rng)
    lengths = np.array([3, 2])

    def loss():
        y, final, _ = m.forward(x, state, lengths, train=True)
        return float((y * dy).sum() + sum((f * d).sum() for f, d in
                                          zip(state_parts(final), state_parts(dstate))))
    _, _, cache = m.forward(x, state, lengths, train=True)
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate)
    pairs = [("x", x, dx)] + [(f"state[{i}]", s, d) for i, (s, d) in
                              enumerate(zip(state_parts(state), state_parts(dstate0)))]
    pairs += [(name, m.params[name], m.grads[name]) for name in m.params]
    for name, arr, analytic in pairs:
        numeric = central_difference(loss, arr)
        err = np.abs(numeric - analytic).max() / max(1.0, np.abs(numeric).max())
        assert err < 1e-7, f"{name}: central differences differ by {err:.3g}"
        assert np.abs(analytic).max() > 0, f"{name}: gradient is zero"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_merge_on_every_backend_equals_reference(backend, cell, merge, dtype):
    rng = _rng("merge backends", cell, merge, np.dtype(dtype).name)
    T, B, I, H = 6, 3, 5, 8
    options = dict(bidirectional=True, merge=merge, dtype=dtype, seed=4)
    m = make_layer(cell, I, H, 2, backend=backend, **options)
    ref = make_layer(cell, I, H, 2, backend="reference", **options)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(m, B, rng)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = random_state(m, B, rng)
    lengths = np.array([6, 3, 1])
    got = run_layer(m, x, state, lengths, dy, dstate, truncate=4)
    want = run_layer(ref, x, state, lengths, dy, dstate, truncate=4)
    assert_all_close(got, want, dtype, f"{cell} merge={merge}")
    # inference, one step included (the one-step path does not merge: the layer's own does)
    for steps in (T, 1):
        y, final = m(x[:steps], state)
        want_y, want_final = ref(x[:steps], state)
        assert max_rel_error(y, want_y) <= TOLERANCE[np.dtype(dtype)]
        for got_part, want_part in zip(state_parts(final), state_parts(want_final)):
            assert max_rel_error(got_part, want_part) <= TOLERANCE[np.dtype(dtype)]


def test_merge_with_dropout_replays_from_the_generator():
    rng = _rng("merge dropout")
    m = make_layer("lstm", 3, 4, 3, bidirectional=True, merge="ave", dropout=0.3, seed=5)
    x = rng.standard_normal((4, 2, 3))
    m.rng = np.random.default_rng(9)
    first = run_layer(m, x, dy=np.ones((4, 2, 4)))
    m.rng = np.random.default_rng(9)
    again = run_layer(m, x, dy=np.ones((4, 2, 4)))
    assert_all_close(first, again, np.float64, "replayed dropout")
    m.rng = np.random.default_rng(10)
    other = run_layer(m, x, dy=np.ones((4, 2, 4)))
    assert max_rel_error(other["y"], first["y"]) > 1e-3     # the masks act


@pytest.mark.parametrize("bad, error, message", [
    (dict(merge="max", bidirectional=True), ValueError, "merge: expected one of"),
    (dict(merge=None, bidirectional=True), ValueError, "merge: expected one of"),
    (dict(merge="sum"), ValueError, "merge: 'sum' needs bidirectional=True"),
    (dict(init="xavier"), ValueError, "init: expected one of 'pytorch', 'keras', got 'xavier'"),
])
def test_bad_options_are_refused_by_name(bad, error, message):
    with pytest.raises(error, match=message):
        fastrnn.LSTM(3, 4, **bad)


def test_merged_layer_shapes_and_repr():
    m = fastrnn.GRU(3, 4, 2, bidirectional=True, merge="mul", batch_first=True,
                    backend="reference")
    assert m.output_size == 4 and fastrnn.GRU(3, 4, bidirectional=True).output_size == 8
    assert m.state_dict()["weight_ih_l1"].shape == (12, 4)
    assert "merge='mul'" in repr(m)
    y, h = m(np.ones((2, 5, 3), np.float32))
    assert y.shape == (2, 5, 4) and h.shape == (4, 2, 4)
    with pytest.raises(ValueError, match="dy: expected shape"):
        _, _, cache = m.forward(np.ones((2, 5, 3), np.float32))
        m.backward(np.ones((2, 5, 8), np.float32), cache)


# ---------------------------------------------------------------------------------------------
# init="keras"

@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_keras_init_is_what_keras_initialisers_define(cell):
    I, H = 24, 32
    m = make_layer(cell, I, H, 2, bidirectional=True, init="keras", seed=7)
    G = m.cell.num_gates
    for name, p in m.params.items():
        if name.startswith("weight_ih"):
            fan_in = p.shape[1]
            limit = np.sqrt(6 / (fan_in + G * H))           # Glorot-uniform
            assert np.abs(p).max() <= limit
            assert np.abs(p).max() > 0.95 * limit
            assert abs(p.std() / (limit / np.sqrt(3)) - 1) < 0.1
        elif name.startswith("weight_hh"):                 # orthogonal (G*H, H): W^T W = 1
            np.testing.assert_allclose(p.T @ p, np.eye(H), atol=1e-12)
        elif name.startswith("bias_ih") and m.mode == "LSTM":
            want = np.zeros(G * H)
            want[H:2 * H] = 1                               # unit_forget_bias
            np.testing.assert_array_equal(p, want)
        else:                                               # other biases, peepholes
            np.testing.assert_array_equal(p, 0)
    again = make_layer(cell, I, H, 2, bidirectional=True, init="keras", seed=7)
    other = make_layer(cell, I, H, 2, bidirectional=True, init="keras", seed=8)
    for name in m.params:
        np.testing.assert_array_equal(m.params[name], again.params[name])
    assert not np.array_equal(m.params["weight_hh_l0"], other.params["weight_hh_l0"])
    assert "init='keras'" in repr(m)


def test_pytorch_init_is_the_default():
    m = fastrnn.LSTM(5, 16, seed=3, dtype=np.float64, backend="reference")
    same = fastrnn.LSTM(5, 16, seed=3, dtype=np.float64, backend="reference", init="pytorch")
    for name, p in m.params.items():
        np.testing.assert_array_equal(p, same.params[name])
        assert np.abs(p).max() <= 1 / 4 and p.std() > 0.1


def test_onnx_export_refuses_a_merged_layer():
    pytest.importorskip("onnx")
    import fastrnn.onnx
    m = fastrnn.LSTM(3, 4, bidirectional=True, merge="sum", backend="reference")
    with pytest.raises(ValueError, match=r"layer: merge='sum' has no ONNX form"):
        fastrnn.onnx.export(m)


def test_onnx_export_refuses_a_cell_without_an_onnx_form():
    pytest.importorskip("onnx")
    import dataclasses

    import fastrnn.onnx
    m = fastrnn.RNN(3, 4, backend="reference")
    m.cell = dataclasses.replace(m.cell, name="rnn_unknown", code=99)
    with pytest.raises(ValueError, match=r"layer: its cell 'rnn_unknown' has no ONNX form"):
        fastrnn.onnx.export(m)
