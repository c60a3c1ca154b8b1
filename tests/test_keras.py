"""fastrnn.convert.from_keras against two oracles: Keras's equations written out here in
Keras's own layout (kernel (I, G*U), gates i, f, c, o and z, r, h, its biases), from Keras's
documentation, in float64; and, when Keras 3 is installed, Keras itself on its PyTorch backend
(skipped without keras or torch). Plus the refusals."""
import os

import numpy as np
import pytest

from conftest import max_rel_error
from fastrnn.convert import from_keras


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def keras_steps(kind, weights, x, activation="tanh", reset_after=True):
    """Keras's cell equations over x (B, T, I): outputs (B, T, U) and final states."""
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if len(weights) > 2 else np.zeros(kernel.shape[1])
    U = recurrent.shape[0]
    B = x.shape[0]
    h, c = np.zeros((B, U)), np.zeros((B, U))
    act = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0))
    outputs = []
    for x_t in x.transpose(1, 0, 2):
        if kind == "SimpleRNN":
            h = act(x_t @ kernel + bias + h @ recurrent)
        elif kind == "LSTM":
            i, f, g, o = np.split(x_t @ kernel + h @ recurrent + bias, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
        elif reset_after:       # GRU, bias (2, 3U): input and recurrent biases
            xz, xr, xh = np.split(x_t @ kernel + bias[0], 3, axis=-1)
            hz, hr, hh = np.split(h @ recurrent + bias[1], 3, axis=-1)
            z, r = sigmoid(xz + hz), sigmoid(xr + hr)
            h = z * h + (1 - z) * np.tanh(xh + r * hh)
        else:                   # GRU, bias (3U,), reset before the recurrent product
            xz, xr, xh = np.split(x_t @ kernel + bias, 3, axis=-1)
            z = sigmoid(xz + h @ recurrent[:, :U])
            r = sigmoid(xr + h @ recurrent[:, U:2 * U])
            h = z * h + (1 - z) * np.tanh(xh + (r * h) @ recurrent[:, 2 * U:])
        outputs.append(h)
    return np.stack(outputs, axis=1), ([h, c] if kind == "LSTM" else [h])


def keras_weights(kind, I, U, rng, use_bias=True, reset_after=True, scale=0.8):
    G = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[kind]
    weights = [scale * rng.standard_normal((I, G * U)), scale * rng.standard_normal((U, G * U))]
    if use_bias:
        shape = (2, G * U) if kind == "GRU" and reset_after else (G * U,)
        weights.append(scale * rng.standard_normal(shape))
    return weights


CASES = {
    "lstm": ("LSTM", {}),
    "lstm-no-bias": ("LSTM", {"use_bias": False}),
    "gru-reset-after": ("GRU", {"reset_after": True}),
    "gru-reset-before": ("GRU", {"reset_after": False}),
    "simple-rnn-tanh": ("SimpleRNN", {"activation": "tanh"}),
    "simple-rnn-relu": ("SimpleRNN", {"activation": "relu"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_keras_equals_keras_equations(case):
    kind, config = CASES[case]
    rng = np.random.default_rng(1)
    B, T, I, U = 3, 6, 4, 5
    weights = keras_weights(kind, I, U, rng, config.get("use_bias", True),
                            config.get("reset_after", True))
    x = rng.standard_normal((B, T, I))
    m = from_keras(kind, weights, config, backend="reference")
    assert m.batch_first and m.dtype == np.float64
    y, final = m(x)
    y_keras, states = keras_steps(kind, weights, x, config.get("activation", "tanh"),
                                  config.get("reset_after", True))
    assert max_rel_error(y, y_keras) <= 1e-10
    for ours, theirs in zip(final if kind == "LSTM" else [final], states):
        assert max_rel_error(ours[0], theirs) <= 1e-10


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_from_keras_bidirectional_equals_keras_equations(kind):
    """Keras's backward layer runs on the reversed sequence; Bidirectional flips its outputs
    back and concatenates them after the forward ones."""
    rng = np.random.default_rng(2)
    B, T, I, U = 2, 5, 3, 4
    forward, backward = keras_weights(kind, I, U, rng), keras_weights(kind, I, U, rng)
    x = rng.standard_normal((B, T, I))
    inner = {"class_name": kind, "config": {"units": U}}
    back = {"class_name": kind, "config": {"units": U, "go_backwards": True}}
    m = from_keras("Bidirectional", forward + backward,
                   {"layer": inner, "backward_layer": back, "merge_mode": "concat"},
                   backend="reference")
    y, final = m(x)
    y_forward, states_forward = keras_steps(kind, forward, x)
    y_backward, states_backward = keras_steps(kind, backward, x[:, ::-1])
    assert max_rel_error(y, np.concatenate([y_forward, y_backward[:, ::-1]], axis=-1)) <= 1e-10
    for merge, combine in [("sum", np.add), ("mul", np.multiply),
                           ("ave", lambda a, b: (a + b) / 2)]:
        merged = from_keras("Bidirectional", forward + backward,
                            {"layer": inner, "backward_layer": back, "merge_mode": merge},
                            backend="reference")
        assert merged.merge == merge
        assert max_rel_error(merged(x)[0], combine(y_forward, y_backward[:, ::-1])) <= 1e-10
    for ours, f, b in zip(final if kind == "LSTM" else [final], states_forward, states_backward):
        assert max_rel_error(ours, np.stack([f, b])) <= 1e-10


@pytest.mark.parametrize("call,message", [
    (lambda w: from_keras("LSTM", w, {"activation": "selu"}),
     r"activation: fastrnn computes Keras's tanh, sigmoid, relu, .* \(the ones ONNX has too\), "
     r"got 'selu'"),
    (lambda w: from_keras("LSTM", w, {"recurrent_activation": "gelu"}),
     r"recurrent_activation: fastrnn computes Keras's .*got 'gelu'"),
    (lambda w: from_keras("SimpleRNN", [w[0][:, :3], w[1][:, :3], w[2][:3]],
                          {"activation": {"class_name": "function", "config": "mine"}}),
     r"activation: fastrnn computes Keras's .*got \{'class_name'"),
    (lambda w: from_keras("Bidirectional", w + w, {
        "layer": {"class_name": "LSTM", "config": {"activation": "relu"}},
        "backward_layer": {"class_name": "LSTM", "config": {"go_backwards": True}}}),
     r"backward_layer: its cell_options \{\} differs from the forward layer's "
     r"\{'activation': 'relu', 'recurrent_activation': 'sigmoid'\}"),
    (lambda w: from_keras("LSTM", w, {"go_backwards": True}), r"go_backwards"),
    (lambda w: from_keras("LSTM", w, {"time_major": True}), r"time_major: not an option"),
    (lambda w: from_keras("LSTM", w, {"units": 7}), r"units: 7, but weights\[1\]"),
    (lambda w: from_keras("LSTM", w[:2]), r"weights: expected 3 arrays \(kernel, "
                                          r"recurrent_kernel, bias\).*got 2"),
    (lambda w: from_keras("GRU", w[:2] + [np.zeros(12)]),
     r"weights\[1\] \(recurrent_kernel\): expected shape \(units, 3\*units\), got \(3, 12\)"),
    (lambda w: from_keras("LSTM", [w[0][:, :8]] + w[1:]),
     r"weights\[0\] \(kernel\): expected shape \(input_features, 12\), got \(2, 8\)"),
    (lambda w: from_keras("LSTM", w[:2] + [np.zeros((2, 12))]),
     r"weights\[2\] \(bias\): expected shape \(12,\) for a Keras LSTM, got \(2, 12\)"),
    (lambda w: from_keras("Bidirectional", w + w, {"layer": {"class_name": "LSTM", "config": {}},
                                                   "merge_mode": None}),
     r"merge_mode: expected 'concat', 'sum', 'mul' or 'ave'.*got None"),
    (lambda w: from_keras("LSTM", w, {"units": 3}, dtype=np.int32),
     r"dtype: expected float32 or float64"),
    (lambda w: from_keras("Conv1D", w), r"layer: expected 'LSTM', 'GRU', 'SimpleRNN'"),
])
def test_from_keras_refuses_what_it_cannot_compute(call, message):
    weights = keras_weights("LSTM", 2, 3, np.random.default_rng(0))
    with pytest.raises((ValueError, TypeError), match=message):
        call(weights)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_from_keras_carries_recurrent_dropout(kind):
    """recurrent_dropout becomes the layer's: masks in training (as test_recurrent_dropout
    shows them equal to Keras's), none at inference; directions must agree."""
    rng = np.random.default_rng(1)
    weights = keras_weights(kind, 2, 3, rng)
    x = rng.standard_normal((4, 5, 2))
    plain = from_keras(kind, weights, {}, dtype=np.float64, backend="reference")
    m = from_keras(kind, weights, {"recurrent_dropout": 0.3}, dtype=np.float64,
                   backend="reference")
    assert m.recurrent_dropout == 0.3 and plain.recurrent_dropout == 0.0
    np.testing.assert_array_equal(m(x)[0], plain(x)[0])
    y_train = m.forward(x)[0]
    assert max_rel_error(y_train, plain(x)[0]) > 1e-3         # the masks acted
    inner = {"class_name": kind, "config": {"recurrent_dropout": 0.3}}
    both = from_keras("Bidirectional", weights + weights, {"layer": inner},
                      dtype=np.float64, backend="reference")
    assert both.recurrent_dropout == 0.3
    with pytest.raises(ValueError, match=r"backward_layer: its cell_options"):
        from_keras("Bidirectional", weights + weights, {
            "layer": inner, "backward_layer": {"class_name": kind,
                                               "config": {"go_backwards": True}}})
    with pytest.raises(ValueError, match=r"recurrent_dropout: expected a number in \[0, 1\)"):
        from_keras(kind, weights, {"recurrent_dropout": 1.0})


# ---------------------------------------------------------------------------------------------
# Keras itself, on its PyTorch backend, when installed

@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"Keras 3 needed, found {keras.__version__}")
    return keras


KERAS_LAYERS = {
    "lstm": lambda k: k.layers.LSTM(5, return_sequences=True, return_state=True),
    "gru-reset-after": lambda k: k.layers.GRU(5, return_sequences=True, return_state=True),
    "gru-reset-before": lambda k: k.layers.GRU(5, reset_after=False, return_sequences=True,
                                               return_state=True),
    "simple-rnn-relu": lambda k: k.layers.SimpleRNN(5, activation="relu", use_bias=False,
                                                    return_sequences=True, return_state=True),
    "bidirectional-lstm": lambda k: k.layers.Bidirectional(
        k.layers.LSTM(5, return_sequences=True, return_state=True)),
    "bidirectional-gru": lambda k: k.layers.Bidirectional(
        k.layers.GRU(5, return_sequences=True, return_state=True)),
    "bidirectional-lstm-sum": lambda k: k.layers.Bidirectional(
        k.layers.LSTM(5, return_sequences=True, return_state=True), merge_mode="sum"),
    "bidirectional-gru-mul": lambda k: k.layers.Bidirectional(
        k.layers.GRU(5, return_sequences=True, return_state=True), merge_mode="mul"),
    "bidirectional-rnn-ave": lambda k: k.layers.Bidirectional(
        k.layers.SimpleRNN(5, return_sequences=True, return_state=True), merge_mode="ave"),
}


# Keras's activations that ONNX has too (fastrnn.layers.KERAS_ACTIVATIONS), each in some slot
KERAS_ACTIVATION_LAYERS = {
    "lstm-relu-hard-sigmoid": lambda k: k.layers.LSTM(
        5, activation="relu", recurrent_activation="hard_sigmoid", return_sequences=True,
        return_state=True),
    "lstm-softplus-linear": lambda k: k.layers.LSTM(
        5, activation="softplus", recurrent_activation="linear", return_sequences=True,
        return_state=True),
    "gru-softsign": lambda k: k.layers.GRU(5, activation="softsign", return_sequences=True,
                                           return_state=True),
    "gru-reset-before-elu-hard-sigmoid": lambda k: k.layers.GRU(
        5, reset_after=False, activation="elu", recurrent_activation="hard_sigmoid",
        return_sequences=True, return_state=True),
    "simple-rnn-leaky-relu": lambda k: k.layers.SimpleRNN(
        5, activation="leaky_relu", return_sequences=True, return_state=True),
    "bidirectional-gru-relu-softsign": lambda k: k.layers.Bidirectional(
        k.layers.GRU(5, activation="relu", recurrent_activation="softsign",
                     return_sequences=True, return_state=True)),
}


def keras_and_ours(keras, make, backend="reference"):
    """A built Keras layer with random weights, its outputs on random x, and from_keras's."""
    rng = np.random.default_rng(3)
    B, T, I = 3, 7, 4
    layer = make(keras)
    layer.build((B, T, I))
    layer.set_weights([rng.uniform(-0.8, 0.8, w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    y_keras, *states_keras = [keras.ops.convert_to_numpy(a) for a in layer(x)]
    m = from_keras(layer, backend=backend)
    return layer, x, (y_keras, states_keras), m


def assert_equals_keras(m, x, y_keras, states_keras):
    y, final = m(x)
    assert max_rel_error(y, y_keras) <= 1e-5
    parts = list(final) if isinstance(final, tuple) else [final]
    # Keras returns h (and c) of the forward layer, then of the backward one
    ours = [p[d] for d in range(m.num_directions) for p in parts]
    assert len(ours) == len(states_keras)
    for got, want in zip(ours, states_keras):
        assert max_rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("case", list(KERAS_LAYERS))
def test_from_keras_equals_keras(keras, case):
    _, x, (y_keras, states_keras), m = keras_and_ours(keras, KERAS_LAYERS[case])
    assert m.cell.plain
    assert_equals_keras(m, x, y_keras, states_keras)


@pytest.mark.parametrize("case", list(KERAS_ACTIVATION_LAYERS))
def test_from_keras_equals_keras_with_other_activations(keras, case):
    layer, x, (y_keras, states_keras), m = keras_and_ours(keras, KERAS_ACTIVATION_LAYERS[case])
    assert_equals_keras(m, x, y_keras, states_keras)
    # the activations made the match: the same weights with tanh and sigmoid do not
    plain = from_keras(type(layer).__name__, layer.get_weights(),
                       default_activations(layer.get_config()), backend="reference")
    assert plain.cell.plain and not m.cell.plain
    assert max_rel_error(plain(x)[0], y_keras) > 1e-2


def default_activations(config):
    """A Keras config with Keras's default activations wherever it names one."""
    defaults = {"activation": "tanh", "recurrent_activation": "sigmoid"}
    if isinstance(config, dict):
        return {k: defaults[k] if k in defaults else default_activations(v)
                for k, v in config.items()}
    return config
