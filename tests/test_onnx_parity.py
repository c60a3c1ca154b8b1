"""ONNX Runtime as an outside oracle for the forward pass of every cell: one ONNX ``LSTM``,
``GRU`` or ``RNN`` node (the RNN with activations Tanh or Relu) per layer, with sequence_lens,
both directions and initial states. It covers the cells PyTorch lacks (the peephole LSTM and the
reset-before GRU) and is the outside reference that needs no PyTorch. Skipped when onnx or
onnxruntime is not installed. (ONNX Runtime has no training graph for these ops; their
gradients are checked against PyTorch, tests/test_torch_parity.py, and by central differences.)
"""
import numpy as np
import pytest

from conftest import make_layer, max_rel_error, random_state, state_parts
from fastrnn.cells import CELLS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

# our gate blocks in ONNX's order: LSTM ours i,f,g,o -> ONNX i,o,f,c; GRU ours r,z,n -> z,r,h;
# RNN one block (W (D, H, I), R (D, H, H), B (D, 2H): PyTorch's shapes stacked over directions)
ONNX_GATE_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}


def _reorder(w, mode, H):
    blocks = np.split(w, len(ONNX_GATE_ORDER[mode]), axis=0)
    return np.concatenate([blocks[i] for i in ONNX_GATE_ORDER[mode]], axis=0)


def _onnx_run(cell, m, x, state, lengths):
    """Run layer ``m``'s single layer as one ONNX LSTM, GRU or RNN node in ONNX Runtime, its
    options (peepholes, reset, activation) those that ``cell`` names, not read back from ``m``:
    a layer built with the wrong cell must not set up its own oracle."""
    mode, H = CELLS[cell].mode, m.hidden_size
    T, B, I = x.shape
    suffixes = ["_l0", "_l0_reverse"][: m.num_directions]
    W = np.stack([_reorder(m.params["weight_ih" + s], mode, H) for s in suffixes])
    R = np.stack([_reorder(m.params["weight_hh" + s], mode, H) for s in suffixes])
    Bias = np.stack([np.concatenate([_reorder(m.params["bias_ih" + s], mode, H),
                                     _reorder(m.params["bias_hh" + s], mode, H)])
                     for s in suffixes])
    feeds = {"X": x, "W": W, "R": R, "B": Bias, "sequence_lens": lengths.astype(np.int32),
             "initial_h": state_parts(state)[0]}
    attributes = {"hidden_size": H,
                  "direction": "bidirectional" if m.num_directions == 2 else "forward"}
    outputs = ["Y", "Y_h"]
    if mode == "LSTM":
        feeds["initial_c"] = state_parts(state)[1]
        if cell == "lstm_peephole":  # ours rows i, f, o; ONNX P = [i, o, f]
            feeds["P"] = np.stack([m.params["peephole" + s][[0, 2, 1]].reshape(-1)
                                   for s in suffixes])
        outputs.append("Y_c")
    elif mode == "GRU":
        attributes["linear_before_reset"] = int(cell == "gru")
    else:
        activation = {"rnn_tanh": "Tanh", "rnn_relu": "Relu"}[cell]
        attributes["activations"] = [activation] * m.num_directions
    inputs = ["X", "W", "R", "B", "sequence_lens", "initial_h"]
    if mode == "LSTM":
        inputs += ["initial_c", "P" if "P" in feeds else ""]
    node = helper.make_node(mode, inputs, outputs, **attributes)
    elem = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "rnn",
        [helper.make_tensor_value_info(name, TensorProto.INT32 if name == "sequence_lens"
                                       else elem, value.shape) for name, value in feeds.items()],
        [helper.make_tensor_value_info(name, elem, None) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(outputs, {k: np.ascontiguousarray(v, dtype=x.dtype)
                                    if k != "sequence_lens" else v for k, v in feeds.items()})
    Y = results[0]                                          # (T, D, B, H)
    y = Y.transpose(0, 2, 1, 3).reshape(T, B, -1)            # ours: (T, B, D*H)
    return [y] + list(results[1:])


@pytest.mark.parametrize("dtype", [np.float32], ids=["f32"])  # ORT's LSTM has no double
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_forward_matches_onnxruntime(backend, cell, bidirectional, dtype):
    rng = np.random.default_rng(3)
    T, B, I, H = 6, 4, 3, 5
    m = make_layer(cell, I, H, 1, bidirectional=bidirectional, backend=backend, dtype=dtype)
    for p in m.params.values():      # larger weights than the default: saturating gates too
        p *= 3
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(m, B, rng)
    lengths = np.array([6, 3, 1, 5])
    y, final = m(x, state, lengths)
    expected = _onnx_run(cell, m, x, state, lengths)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for name, got, want in zip(["y", "h_n", "c_n"], [y] + state_parts(final), expected):
        err = max_rel_error(got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} against ONNX Runtime"
