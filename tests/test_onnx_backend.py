"""fastrnn.onnx.backend under ONNX's own backend test suite (onnx.backend.test.BackendTest): its
LSTM, GRU and RNN node tests, whose expected outputs ONNX computes with its NumPy helpers, run
through fastrnn's reference layers. Plus the backend's refusals. Skipped without onnx.

Building BackendTest generates every node test case of ONNX (about 6 s); only the recurrent
ones are kept. None of them is excluded or skipped. With onnx 1.23.2 none sets activations,
activation_alpha, activation_beta, clip or input_forget (nor does any model in ONNX's stored
test data), so the layers' options of those names are checked here against ONNX Runtime
(``test_run_node_equals_onnxruntime``); a later onnx with such node tests runs them as they come.
"""
import io
import re
import unittest
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnx.backend.test  # noqa: E402
from onnx import helper  # noqa: E402

import fastrnn.onnx  # noqa: E402
from conftest import make_layer, max_rel_error, random_state, state_parts  # noqa: E402
from fastrnn.onnx import OnnxModelError  # noqa: E402
from fastrnn.onnx.backend import FastrnnBackend  # noqa: E402

RECURRENT_NODE_TEST = re.compile(r"^test_(lstm|gru|rnn|simple_rnn)_\w+_cpu$")
# the node tests of onnx 1.23.2 that this must run (a newer onnx may add more)
EXPECTED = {f"test_{name}_cpu" for name in (
    "lstm_defaults", "lstm_with_initial_bias", "lstm_with_peepholes", "lstm_batchwise",
    "lstm_reverse", "lstm_bidirectional",
    "gru_defaults", "gru_with_initial_bias", "gru_seq_length", "gru_batchwise", "gru_reverse",
    "gru_bidirectional",
    "simple_rnn_defaults", "simple_rnn_with_initial_bias", "rnn_seq_length",
    "simple_rnn_batchwise", "simple_rnn_reverse", "simple_rnn_bidirectional")}


class ReferenceBackend(FastrnnBackend):
    """The layers on NumPy: this checks the ONNX conversion, not the kernels."""
    layer_backend = "reference"


def _recurrent_node_tests():
    with warnings.catch_warnings():     # ONNX's generators of other operators' cases warn
        warnings.simplefilter("ignore")
        node_tests = onnx.backend.test.BackendTest(ReferenceBackend, __name__) \
            .test_cases["OnnxBackendNodeModelTest"]
    return {name: getattr(node_tests, name) for name in dir(node_tests)
            if RECURRENT_NODE_TEST.match(name)}


_SELECTED = _recurrent_node_tests()
# only these, not ONNX's thousands of other node tests (pytest collects unittest classes)
OnnxBackendRecurrentNodeTest = type("OnnxBackendRecurrentNodeTest", (unittest.TestCase,),
                                    _SELECTED)


def test_the_recurrent_node_tests_are_all_there():
    assert EXPECTED <= set(_SELECTED), sorted(EXPECTED - set(_SELECTED))


def test_run_node_with_empty_inputs_and_outputs():
    """run_node takes one array per input name (None for ''); returns the named outputs."""
    rng = np.random.default_rng(0)
    H, I = 3, 2
    W = rng.standard_normal((1, 3 * H, I)).astype(np.float32)
    R = rng.standard_normal((1, 3 * H, H)).astype(np.float32)
    x = rng.standard_normal((4, 2, I)).astype(np.float32)
    h0 = rng.standard_normal((1, 2, H)).astype(np.float32)
    node = helper.make_node("GRU", ["X", "W", "R", "", "", "initial_h"], ["", "Y_h"],
                            hidden_size=H, linear_before_reset=1)
    (y_h,) = ReferenceBackend.run_node(node, [x, W, R, None, None, h0])
    # the same through a one-step loop of the equations in ONNX's order z, r, h
    h = h0[0]
    for x_t in x:
        gx, gh = x_t @ W[0].T, h @ R[0].T
        z = 1 / (1 + np.exp(-(gx[:, :H] + gh[:, :H])))
        r = 1 / (1 + np.exp(-(gx[:, H:2 * H] + gh[:, H:2 * H])))
        n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
    np.testing.assert_allclose(y_h[0], h, rtol=1e-5, atol=1e-6)


def random_node_inputs(op, direction, rng, T=5, B=4, I=3, H=4):
    """A node's inputs by ONNX name: random weights (all gates different), lengths, states."""
    D = 2 if direction == "bidirectional" else 1
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inputs = {"X": rng.standard_normal((T, B, I)),
              "W": 1.5 * rng.standard_normal((D, G * H, I)),
              "R": 1.5 * rng.standard_normal((D, G * H, H)),
              "B": rng.standard_normal((D, 2 * G * H)),
              "sequence_lens": np.array([5, 2, 1, 4], np.int32),
              "initial_h": rng.standard_normal((D, B, H))}
    if op == "LSTM":
        inputs["initial_c"] = rng.standard_normal((D, B, H))
        inputs["P"] = rng.standard_normal((D, 3 * H))
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs.items()}


# the activations lists (and their alpha and beta lists) are one direction's; a bidirectional
# node gets them twice
NODE_CASES = {
    "lstm": ("LSTM", {}),
    "gru-lbr": ("GRU", {"linear_before_reset": 1}),
    "gru": ("GRU", {"linear_before_reset": 0}),
    "rnn-relu": ("RNN", {"activations": ["Relu"]}),
    "lstm-options": ("LSTM", {"activations": ["HardSigmoid", "ScaledTanh", "Elu"],
                              "activation_alpha": [0.3, 0.9, 0.7],
                              "activation_beta": [0.45, 1.2], "clip": 1.75, "input_forget": 1}),
    "lstm-affine": ("LSTM", {"activations": ["Sigmoid", "Affine", "Softsign"],
                             "activation_alpha": [0.6], "activation_beta": [0.2], "clip": 4.0}),
    "gru-lbr-options": ("GRU", {"linear_before_reset": 1, "activations": ["Softsign", "LeakyRelu"],
                                "activation_alpha": [0.15], "clip": 1.5}),
    "gru-options": ("GRU", {"linear_before_reset": 0, "activations": ["HardSigmoid", "Softplus"],
                            "clip": 0.8}),
    "rnn-options": ("RNN", {"activations": ["ThresholdedRelu"], "activation_alpha": [0.2],
                            "clip": 2.0}),
}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("case", list(NODE_CASES))
def test_run_node_equals_onnxruntime(case, direction):
    """Random weights, lengths, states, peepholes, and the cells' options: what ONNX's node
    tests leave out. The reverse direction alone runs as a bidirectional layer's reverse
    half."""
    ort = pytest.importorskip("onnxruntime")
    op, attrs = NODE_CASES[case]
    rng = np.random.default_rng(4)
    inputs = random_node_inputs(op, direction, rng)
    if direction == "bidirectional":
        attrs = {k: v * 2 if k.startswith("activation") else v for k, v in attrs.items()}
    names = list(inputs)
    outputs = ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outputs, hidden_size=4, direction=direction, **attrs)
    got = ReferenceBackend.run_node(node, [inputs[n] for n in names])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, onnx.TensorProto.INT32 if
                                                    n == "sequence_lens" else
                                                    onnx.TensorProto.FLOAT, inputs[n].shape)
                      for n in names],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for name, ours, theirs in zip(outputs, got, session.run(None, inputs)):
        assert max_rel_error(ours, theirs) <= 1e-5, name
    if "options" in case or "affine" in case:
        # the options change the outputs: run_node did not match ONNX Runtime without them
        plain = {k: v for k, v in attrs.items() if k == "linear_before_reset"}
        plain_node = helper.make_node(op, names, outputs, hidden_size=4, direction=direction,
                                      **plain)
        without = ReferenceBackend.run_node(plain_node, [inputs[n] for n in names])
        assert max_rel_error(without[0], got[0]) > 1e-2


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_run_node_batchwise_layout_is_the_transpose(op):
    """layout=1 (X (B, T, I), states (B, D, H), Y (B, T, D, H)), which ONNX Runtime does not
    run, against the same node with layout=0 on transposed arrays."""
    rng = np.random.default_rng(5)
    inputs = random_node_inputs(op, "bidirectional", rng)
    names = list(inputs)
    outputs = ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2]
    time_major = helper.make_node(op, names, outputs, hidden_size=4, direction="bidirectional")
    batchwise = helper.make_node(op, names, outputs, hidden_size=4, direction="bidirectional",
                                 layout=1)
    expected = ReferenceBackend.run_node(time_major, [inputs[n] for n in names])
    swapped = {n: v.transpose(1, 0, 2) if n in ("X", "initial_h", "initial_c") else v
               for n, v in inputs.items()}
    got = ReferenceBackend.run_node(batchwise, [swapped[n] for n in names])
    np.testing.assert_array_equal(got[0], expected[0].transpose(2, 0, 1, 3))
    for ours, theirs in zip(got[1:], expected[1:]):
        np.testing.assert_array_equal(ours, theirs.transpose(1, 0, 2))


@pytest.mark.parametrize("attrs,message", [
    ({"clip": 0.0}, r"'g'.*attribute 'clip' must be a positive finite number, got 0\.0"),
    ({"activations": ["HardSigmoid", "Gelu"]},
     r"'g'.*attribute 'activations': 'Gelu' \(g \(candidate n\)\) is not one of ONNX's"),
    ({"activations": ["Sigmoid", "Tanh", "Sigmoid", "Relu"], "direction": "bidirectional"},
     r"'g'.*forward direction's \[Sigmoid, Tanh\] differ from the reverse direction's "
     r"\[Sigmoid, Relu\]"),
    ({"activations": ["Sigmoid", "ScaledTanh"]},
     r"'g'.*attribute 'activation_alpha' has no value for ScaledTanh"),
    ({"activations": ["Sigmoid", "Elu"], "activation_alpha": [1.0], "activation_beta": [1.0]},
     r"'g'.*attribute 'activation_beta' has 1 values, but the activations \['Sigmoid', 'Elu'\] "
     r"take 0"),
    ({"linear_before_reset": 2}, r"'g'.*attribute 'linear_before_reset' must be 0 or 1, got 2"),
])
def test_run_node_refuses_what_fastrnn_cannot_compute(attrs, message):
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], name="g", hidden_size=1, **attrs)
    x, W, R = np.zeros((1, 1, 1), np.float32), np.zeros((1, 3, 1), np.float32), \
        np.zeros((1, 3, 1), np.float32)
    with pytest.raises(OnnxModelError, match=message):
        ReferenceBackend.run_node(node, [x, W, R])


def test_prepare_refuses_other_operators_and_devices():
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"], name="act")], "g",
                              [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    with pytest.raises(OnnxModelError, match=r"node 'act' \(Relu.*operator 'Relu' is not "
                                             r"supported"):
        ReferenceBackend.prepare(model)
    with pytest.raises(ValueError, match=r"device: fastrnn runs on 'CPU' only, got 'CUDA'"):
        ReferenceBackend.prepare(model, "CUDA")
    assert ReferenceBackend.supports_device("CPU") and not ReferenceBackend.supports_device("CUDA")


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before", "rnn_relu"])
def test_prepare_runs_an_exported_stack(cell):
    """A whole exported model (Transpose, Slice, Reshape, Concat between the nodes) through
    prepare/run equals the layer; float64 on both sides."""
    rng = np.random.default_rng(6)
    m = make_layer(cell, 3, 4, 3, bidirectional=True, batch_first=True, dtype=np.float64)
    x = rng.standard_normal((4, 6, 3))
    state = random_state(m, 4, rng)
    lengths = np.array([6, 1, 3, 5])
    y, final = m(x, state, lengths)
    rep = ReferenceBackend.prepare(fastrnn.onnx.export(m))
    got = rep.run([x, lengths.astype(np.int32)] + state_parts(state))
    for ours, theirs in zip(got, [y] + state_parts(final)):
        assert max_rel_error(ours, theirs) <= 1e-10


def test_prepare_runs_torch_onnx_export():
    """torch.onnx.export's zero initial state (Shape, Gather, ConstantOfShape, Slice) too."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = torch.nn.LSTM(3, 4, 2, batch_first=True)
    x = torch.randn(2, 5, 3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "time"}})
    got = ReferenceBackend.prepare(buffer.getvalue()).run([x.numpy()])
    with torch.no_grad():
        y, (h_n, c_n) = net(x)
    for ours, theirs in zip(got, [y, h_n, c_n]):
        assert max_rel_error(ours, theirs.numpy()) <= 1e-5
