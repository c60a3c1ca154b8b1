"""fastrnn.onnx: export -> ONNX Runtime equals the layer; load inverts export and reads
torch.onnx.export's graphs; what fastrnn cannot represent is refused with the node and the
attribute named. Skipped without onnx and onnxruntime (torch: only its tests)."""
import io
import sys
import warnings

import numpy as np
import pytest

from conftest import make_layer, max_rel_error, random_state, state_parts
import fastrnn
from fastrnn.cells import ACTIVATION_DEFAULTS, ACTIVATIONS, CELLS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import fastrnn.onnx  # noqa: E402
from fastrnn.onnx import OnnxModelError, _nodes  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402


def run_onnxruntime(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(m, x, state, lengths):
    feeds = {"x": x, "lengths": np.asarray(lengths, np.int32)}
    for name, part in zip(["h0", "c0"], state_parts(state)):
        feeds[name] = part
    return feeds


@pytest.mark.float32_kernels
@pytest.mark.parametrize("layout", ["time-major", "batch-first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_export_runs_in_onnxruntime_as_the_layer(backend, cell, bidirectional, layout):
    """float32 (ONNX Runtime 1.32 runs these operators in float only), at the issue's 1e-5."""
    rng = np.random.default_rng(5)
    T, B, I, H = 7, 4, 3, 5
    batch_first = layout == "batch-first"
    m = make_layer(cell, I, H, 2, bidirectional=bidirectional, batch_first=batch_first,
                   backend=backend, dtype=np.float32)
    for p in m.params.values():     # larger than the default: saturating gates too
        p *= 3
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(np.float32)
    state = random_state(m, B, rng)
    lengths = np.array([7, 2, 1, 5])
    y, final = m(x, state, lengths)
    got = run_onnxruntime(fastrnn.onnx.export(m), feeds_for(m, x, state, lengths))
    for name, onnx_value, ours in zip(["y", "h_n", "c_n"], got, [y] + state_parts(final)):
        assert onnx_value.dtype == np.float32
        err = max_rel_error(onnx_value, ours)
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"


# ONNX's own NumPy evaluator knows neither sequence_lens nor Relu, but runs float64
@pytest.mark.parametrize("cell", sorted(c for c in CELLS if c != "rnn_relu"))
def test_export_in_float64_matches_onnx_reference_evaluator(cell):
    rng = np.random.default_rng(7)
    m = make_layer(cell, 3, 4, 2, bidirectional=True, dtype=np.float64)
    x = rng.standard_normal((5, 3, 3))
    state = random_state(m, 3, rng)
    y, final = m(x, state)
    got = ReferenceEvaluator(fastrnn.onnx.export(m)).run(None, feeds_for(m, x, state, [5] * 3))
    for name, onnx_value, ours in zip(["y", "h_n", "c_n"], got, [y] + state_parts(final)):
        assert onnx_value.dtype == np.float64
        err = max_rel_error(onnx_value, ours)
        assert err <= 1e-10, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before", "rnn_relu"])
def test_export_options(cell):
    """No bias, the other layout than the layer's, no lengths and no state inputs."""
    rng = np.random.default_rng(6)
    m = make_layer(cell, 3, 4, 3, bias=False, dtype=np.float32)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y, final = m(x)
    model = fastrnn.onnx.export(m, batch_first=True, lengths=False, initial_state=False)
    assert [i.name for i in model.graph.input] == ["x"]
    got = run_onnxruntime(model, {"x": x.transpose(1, 0, 2)})
    assert max_rel_error(got[0], y.transpose(1, 0, 2)) <= 1e-5
    for onnx_value, ours in zip(got[1:], state_parts(final)):
        assert max_rel_error(onnx_value, ours) <= 1e-5


def test_export_writes_a_path_and_a_file(tmp_path):
    m = make_layer("gru", 3, 4, dtype=np.float32)
    path = tmp_path / "gru.onnx"
    model = fastrnn.onnx.export(m, str(path))
    buffer = io.BytesIO()
    fastrnn.onnx.export(m, buffer)
    assert onnx.load(str(path)) == model
    assert onnx.load_model_from_string(buffer.getvalue()) == model
    with pytest.raises(TypeError, match="layer: expected a fastrnn LSTM, GRU or RNN, got dict"):
        fastrnn.onnx.export({}, buffer)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_load_inverts_export(cell):
    m = make_layer(cell, 3, 5, 2, bidirectional=True, batch_first=True, dtype=np.float64)
    back = fastrnn.onnx.load(fastrnn.onnx.export(m).SerializeToString(), backend="reference")
    assert (back.cell, back.batch_first, back.bias, back.num_layers, back.num_directions,
            back.dtype) == (m.cell, True, True, 2, 2, np.float64)
    assert back.params.keys() == m.params.keys()
    for name, p in m.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)


def test_load_without_bias_lengths_and_states(tmp_path):
    m = make_layer("lstm", 3, 4, 2, bias=False, dtype=np.float32)
    path = tmp_path / "m.onnx"
    fastrnn.onnx.export(m, path, lengths=False, initial_state=False)
    back = fastrnn.onnx.load(path, backend="reference", dtype=np.float64)
    assert not back.bias and back.dtype == np.float64 and not back.batch_first
    assert back.params.keys() == m.params.keys()
    for name, p in m.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)


# ---------------------------------------------------------------------------------------------
# The cells' options (activations with their parameters, clip, input_forget) as node attributes.
# Parameters and clips are exact in float32 (ONNX stores attributes in float32), so a float64
# layer comes back with the same cell.

OPTION_CASES = {
    "lstm-peephole": (fastrnn.LSTM, dict(
        peephole=True, input_forget=True, clip=2.5,
        activations=(("hardsigmoid", 0.375, 0.625), ("leakyrelu", 0.125),
                     ("scaledtanh", 0.75, 1.25)))),
    "lstm": (fastrnn.LSTM, dict(
        clip=1.5, activations=(("elu", 0.625), ("affine", 0.75, 0.25), ("softsign",)))),
    "gru-reset-after": (fastrnn.GRU, dict(
        reset_after=True, clip=1.25,
        activations=(("hardsigmoid", 0.25, 0.375), ("scaledtanh", 1.25, 0.75)))),
    "gru-reset-before": (fastrnn.GRU, dict(
        reset_after=False, clip=0.75, activations=(("sigmoid",), ("softplus",)))),
    "gru-thresholded": (fastrnn.GRU, dict(
        reset_after=True, activations=(("softsign",), ("thresholdedrelu", 0.25)))),
    "rnn": (fastrnn.RNN, dict(clip=1.5, activations=(("leakyrelu", 0.25),))),
    "rnn-relu-clip": (fastrnn.RNN, dict(nonlinearity="relu", clip=0.5)),
}


def options_layer(case, bidirectional, dtype, backend="reference", num_layers=2, plain=False):
    """The case's layer; ``plain``: the same weights without the options."""
    cls, options = OPTION_CASES[case]
    if plain:
        options = {k: v for k, v in options.items() if k in ("peephole", "reset_after")}
    return cls(3, 5, num_layers, bidirectional=bidirectional, dtype=dtype, backend=backend,
               seed=11, **options)


@pytest.mark.float32_kernels
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_export_with_options_runs_in_onnxruntime_as_the_layer(backend, case, bidirectional):
    rng = np.random.default_rng(12)
    T, B = 7, 4
    m = options_layer(case, bidirectional, np.float32, backend)
    plain = options_layer(case, bidirectional, np.float32, "reference", plain=True)
    x = rng.standard_normal((T, B, 3)).astype(np.float32)
    state = random_state(m, B, rng)
    lengths = np.array([7, 2, 1, 5])
    y, final = m(x, state, lengths)
    model = fastrnn.onnx.export(m)
    got = run_onnxruntime(model, feeds_for(m, x, state, lengths))
    for name, onnx_value, ours in zip(["y", "h_n", "c_n"], got, [y] + state_parts(final)):
        err = max_rel_error(onnx_value, ours)
        assert err <= 1e-4, f"{name}: relative error {err:.3g}"
    # the options change the outputs: ONNX Runtime did not get there without them
    assert max_rel_error(plain(x, state, lengths)[0], y) > 1e-2
    node = next(n for n in model.graph.node if n.op_type == m.mode)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("clip") == m.cell.clip and attrs.get("input_forget", 0) == m.cell.input_forget
    assert len(attrs["activations"]) == len(m.cell.activations) * m.num_directions


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_load_inverts_export_with_options(case):
    rng = np.random.default_rng(13)
    m = options_layer(case, True, np.float64)
    back = fastrnn.onnx.load(fastrnn.onnx.export(m), backend="reference")
    assert _nodes.computes(back.cell) == _nodes.computes(m.cell)
    assert back.cell.activations == m.cell.activations and back.cell.clip == m.cell.clip
    for name, p in m.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)
    x = rng.standard_normal((6, 3, 3))
    state = random_state(m, 3, rng)
    (y_back, final_back), (y, final) = back(x, state), m(x, state)
    np.testing.assert_array_equal(y_back, y)
    for ours, theirs in zip(state_parts(final_back), state_parts(final)):
        np.testing.assert_array_equal(ours, theirs)


def test_export_rounds_float64_options_to_float32():
    """Keras's hard_sigmoid slope 1/6 is not a float32: the model holds float32(1/6)."""
    rng = np.random.default_rng(14)
    m = fastrnn.LSTM(3, 4, activations=(("hardsigmoid", 1 / 6, 0.5), "tanh", "tanh"), clip=0.1,
                     dtype=np.float64, backend="reference")
    back = fastrnn.onnx.load(fastrnn.onnx.export(m), backend="reference")
    assert back.cell.activations[0] == ("hardsigmoid", float(np.float32(1 / 6)), 0.5)
    assert back.cell.clip == float(np.float32(0.1)) != 0.1
    x = rng.standard_normal((5, 2, 3))
    assert max_rel_error(back(x)[0], m(x)[0]) <= 1e-6


def test_export_options_rnn_of_either_record():
    """RNN(activations=("relu",), clip=c) is rnn_tanh's record with options, and loads as
    rnn_relu's with that clip: the same computation."""
    rng = np.random.default_rng(15)
    m = fastrnn.RNN(3, 4, activations=("relu",), clip=0.5, backend="reference")
    back = fastrnn.onnx.load(fastrnn.onnx.export(m), backend="reference")
    assert _nodes.computes(back.cell) == _nodes.computes(m.cell)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], m(x)[0])


def test_export_refuses_attributes_that_load_as_another_cell(monkeypatch):
    """The check that what export writes loads as the layer's cell (an options cell has its
    plain cell's name): attributes that leave out the clip are refused."""
    def without_clip(cell, D):
        attrs = _nodes.attributes_from_cell(cell, D)
        attrs.pop("clip", None)
        return attrs
    monkeypatch.setattr(fastrnn.onnx, "attributes_from_cell", without_clip)
    m = fastrnn.LSTM(3, 4, clip=2.0, backend="reference")
    assert m.cell.name in _nodes.ONNX_CELLS
    with pytest.raises(ValueError, match=r"layer: its cell .*no ONNX form here \(the attributes"):
        fastrnn.onnx.export(m)
    model = fastrnn.onnx.export(fastrnn.LSTM(3, 4, activations=("sigmoid", "relu", "tanh"),
                                             backend="reference"))
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["activations"] == [b"Sigmoid", b"Relu", b"Tanh"] and "clip" not in attrs


def test_onnx_names_every_activation_and_its_parameters():
    assert set(_nodes.ONNX_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(_nodes.TAKES_ALPHA) == set(ACTIVATION_DEFAULTS)
    assert set(_nodes.TAKES_BETA) < set(_nodes.TAKES_ALPHA)


def gru_node_model(attrs, D, H=4, I=3, rng=None):
    """One GRU node (linear_before_reset=1) on X with constant random weights; its output Y
    (T, D, B, H), with one direction squeezed to (T, B, H) as a layer's."""
    rng = rng or np.random.default_rng(16)
    W = rng.standard_normal((D, 3 * H, I)).astype(np.float32)
    R = rng.standard_normal((D, 3 * H, H)).astype(np.float32)
    B = rng.standard_normal((D, 6 * H)).astype(np.float32)
    nodes = [helper.make_node("GRU", ["X", "W", "R", "B"], ["Y"], hidden_size=H,
                              linear_before_reset=1,
                              direction=["forward", "bidirectional"][D - 1], **attrs)]
    if D == 1:
        nodes.append(helper.make_node("Squeeze", ["Y", "axis1"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (R, "R"), (B, "B"),
                                                     (np.array([1]), "axis1"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, (W, R, B)


def gru_layer(weights, activations, d):
    """A fastrnn GRU with direction d (0, 1) of the node's weights, in both its directions."""
    W, R, B = weights
    m = fastrnn.GRU(W.shape[2], R.shape[2], bidirectional=True, activations=activations,
                    dtype=np.float32, backend="reference")
    m.load_state_dict(_nodes.params_from_onnx("GRU", W, R, B, None, 0, {0: d, 1: d}))
    return m


def test_onnxruntime_reads_alpha_and_beta_only_for_the_activations_that_take_them():
    """What export writes and load reads, checked against ONNX Runtime: activation_alpha holds
    one value per activation that takes an alpha, activation_beta one per activation that
    takes a beta, in the order of the activations, the forward direction's then the reverse
    one's; not one value per activation."""
    rng = np.random.default_rng(17)
    attrs = {"activations": ["LeakyRelu", "ScaledTanh", "HardSigmoid", "Affine"],
             "activation_alpha": [0.25, 0.75, 0.375, 0.625],
             "activation_beta": [1.25, 0.5, 0.125]}
    model, weights = gru_node_model(attrs, 2, rng=rng)
    x = rng.standard_normal((6, 3, 3)).astype(np.float32)
    (Y,) = run_onnxruntime(model, {"X": x})                      # (T, 2, B, H)
    forward = (("leakyrelu", 0.25), ("scaledtanh", 0.75, 1.25))
    reverse = (("hardsigmoid", 0.375, 0.5), ("affine", 0.625, 0.125))
    H = Y.shape[-1]
    y_forward = gru_layer(weights, forward, 0)(x)[0][..., :H]
    y_reverse = gru_layer(weights, reverse, 1)(x)[0][..., H:]
    assert max_rel_error(Y[:, 0], y_forward) <= 1e-5
    assert max_rel_error(Y[:, 1], y_reverse) <= 1e-5
    # the lists read as one value per activation (HardSigmoid alpha[2], beta[2]; Affine
    # alpha[3], no beta[3]) would give other outputs
    aligned = (("hardsigmoid", 0.375, 0.125), ("affine", 0.625, 0.0))
    assert max_rel_error(Y[:, 1], gru_layer(weights, aligned, 1)(x)[0][..., H:]) > 1e-2


def test_load_and_onnxruntime_fill_in_onnx_defaults():
    """LeakyRelu, HardSigmoid and Elu without parameters take ONNX's defaults in both (0.01;
    0.2, 0.5; 1.0); ONNX Runtime's for Affine, ScaledTanh, ThresholdedRelu are 0.0, not
    ONNX's, so load refuses those left out (see REFUSALS)."""
    rng = np.random.default_rng(18)
    for functions in (["HardSigmoid", "LeakyRelu"], ["Sigmoid", "Elu"]):
        model, _ = gru_node_model({"activations": functions}, 1, rng=rng)
        m = fastrnn.onnx.load(model, backend="reference")
        assert m.cell.activations == tuple(
            (f.lower(),) + ACTIVATION_DEFAULTS.get(f.lower(), (0.0, 0.0)) for f in functions)
        x = rng.standard_normal((6, 3, 3)).astype(np.float32)
        (y,) = run_onnxruntime(model, {"X": x})
        assert max_rel_error(m(x)[0], y) <= 1e-5
    model, _ = gru_node_model({"activations": ["Sigmoid", "Affine"]}, 1, rng=rng)
    (y,) = run_onnxruntime(model, {"X": rng.standard_normal((6, 3, 3)).astype(np.float32)})
    # ONNX Runtime's Affine(0, 0): n = 0, so h stays at h0 = 0 (ONNX's Affine(1, 0) would move)
    np.testing.assert_array_equal(y, 0)
    with pytest.raises(OnnxModelError, match=r"attribute 'activation_alpha' has no value for "
                                             r"Affine \(g \(candidate n\)\), whose default "
                                             r"differs between ONNX \(1\.0"):
        fastrnn.onnx.load(model)


def test_load_refuses_layers_with_different_options():
    m = make_layer("lstm", 3, 4, 2, dtype=np.float32)
    model = fastrnn.onnx.export(m)
    second = next(n for n in model.graph.node if n.name == "LSTM_l1")
    second.attribute.append(helper.make_attribute("clip", 2.0))
    with pytest.raises(OnnxModelError, match=r"'LSTM_l1'.*cell \{'clip': 2\.0\} differs from the "
                                             r"first layer's \{\}"):
        fastrnn.onnx.load(model)


TORCH_CASES = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
               ("RNN", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state-input"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first",
                         [(1, False, False), (2, True, True), (2, False, False)],
                         ids=["1-uni", "2-bi-batch-first", "2-uni"])
@pytest.mark.parametrize("name,options", TORCH_CASES, ids=["lstm", "gru", "rnn-tanh", "rnn-relu"])
def test_load_reads_torch_onnx_export(name, options, num_layers, bidirectional, batch_first,
                                      with_state):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = getattr(torch.nn, name)(3, 4, num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, **options)
    B, T, D = 2, 6, 2 if bidirectional else 1
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3))
    h0 = torch.randn(num_layers * D, B, 4)
    state = (h0, 0.5 * h0) if name == "LSTM" else h0
    args = (x, state) if with_state else (x,)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation and batch warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, buffer, dynamo=False,
                          input_names=["x", "h0", "c0"][:1 + len(state_parts(state))])
    m = fastrnn.onnx.load(buffer.getvalue(), backend="reference")
    assert m.batch_first == batch_first and m.num_layers == num_layers
    with torch.no_grad():
        y_torch, final_torch = net(*args)
    ours_state = tuple(s.numpy() for s in state_parts(state)) if with_state else None
    if ours_state is not None and name != "LSTM":
        ours_state = ours_state[0]
    y, final = m(x.numpy(), ours_state)
    assert max_rel_error(y, y_torch.numpy()) <= 1e-5
    for ours, theirs in zip(state_parts(final), state_parts(final_torch)):
        assert max_rel_error(ours, theirs.numpy()) <= 1e-5


def with_computed_reshapes(model, order=(0, 1, 2)):
    """``model`` (an export) with each constant Reshape shape [0, 0, -1] between layers
    replaced by what torch.onnx.export's dynamo exporter writes for dynamic sizes:
    Concat(Shape(Y)[0], Shape(Y)[1], Shape(Y)[2] * Shape(Y)[3]), its parts in ``order``."""
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Reshape":
            data, tag = node.input[0], node.output[0]
            nodes.append(helper.make_node("Shape", [data], [f"{tag}_dims"]))
            for i in range(4):
                nodes.append(helper.make_node("Slice", [f"{tag}_dims", f"i{i}", f"i{i + 1}"],
                                              [f"{tag}_d{i}"]))
            nodes.append(helper.make_node("Mul", [f"{tag}_d2", f"{tag}_d3"], [f"{tag}_dh"]))
            parts = [f"{tag}_d0", f"{tag}_d1", f"{tag}_dh"]
            nodes.append(helper.make_node("Concat", [parts[i] for i in order], [f"{tag}_shape"],
                                          axis=0))
            node = helper.make_node("Reshape", [data, f"{tag}_shape"], node.output)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(np.array([i]), f"i{i}")
                                   for i in range(5))
    return model


def test_load_follows_reshapes_computed_from_shapes():
    rng = np.random.default_rng(8)
    m = make_layer("gru", 3, 4, 3, bidirectional=True, dtype=np.float32)
    model = with_computed_reshapes(fastrnn.onnx.export(m))
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    state = random_state(m, 2, rng)
    y, _ = m(x, state)
    assert max_rel_error(run_onnxruntime(model, feeds_for(m, x, state, [5, 5]))[0], y) <= 1e-5
    back = fastrnn.onnx.load(model, backend="reference")
    for name, p in m.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)
    swapped = with_computed_reshapes(fastrnn.onnx.export(m), order=(1, 0, 2))
    with pytest.raises(OnnxModelError, match=r"Reshape.*shape \[B, T, D\*H\] does not keep"):
        fastrnn.onnx.load(swapped)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_load_reads_torch_dynamo_export(name):
    """PyTorch's default exporter (needs onnxscript): LSTM and GRU stay ONNX nodes, with
    reshapes computed from shapes when the sizes are dynamic. (It unrolls nn.RNN into
    MatMuls, which load refuses: no RNN node.)"""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = getattr(torch.nn, name)(3, 4, 2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("time")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=(dims,))
    m = fastrnn.onnx.load(program.model_proto, backend="reference")
    x_other = torch.randn(3, 7, 3)                  # another batch size and length
    with torch.no_grad():
        y_torch, final_torch = net(x_other)
    y, final = m(x_other.numpy())
    assert max_rel_error(y, y_torch.numpy()) <= 1e-5
    for ours, theirs in zip(state_parts(final), state_parts(final_torch)):
        assert max_rel_error(ours, theirs.numpy()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Refusals: each names the node and the attribute (or input, or operator)

def lstm_model(attrs=None, extra_nodes=(), outputs=("Y",), weights_as_inputs=False, H=3, I=2,
               D=1):
    """One ONNX LSTM node on graph input X (T, B, I), with ``attrs`` and ``extra_nodes``."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((D, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((D, 4 * H, H)).astype(np.float32)
    direction = {"direction": "bidirectional"} if D == 2 else {}
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h"], name="lstm0",
                            **{"hidden_size": H, **direction, **(attrs or {})})
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])]
    initializers = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info("W", TensorProto.FLOAT, W.shape)]
        initializers = initializers[1:]
    graph = helper.make_graph([node, *extra_nodes], "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


REFUSALS = {
    "clip not positive": (dict(attrs={"clip": -3.0}),
                          r"'lstm0'.*attribute 'clip' must be a positive finite number, got -3"),
    "input_forget 2": (dict(attrs={"input_forget": 2}),
                       r"'lstm0'.*attribute 'input_forget' must be 0 or 1, got 2"),
    "activations count": (dict(attrs={"activations": ["Sigmoid", "Tanh"]}),
                          r"'lstm0'.*attribute 'activations' must name 3 functions"),
    "activations count bidirectional": (
        dict(D=2, attrs={"activations": ["Sigmoid", "Tanh", "Tanh"]}),
        r"'lstm0'.*attribute 'activations' must name 6 functions \(.* for each of the 2 "
        r"directions\)"),
    "unknown activation": (dict(attrs={"activations": ["Sigmoid", "Gelu", "Tanh"]}),
                           r"'lstm0'.*attribute 'activations': 'Gelu' \(g \(cell input\)\) is "
                           r"not one of ONNX's Relu, Tanh"),
    "alpha without a taker": (dict(attrs={"activation_alpha": [0.5]}),
                              r"'lstm0'.*attribute 'activation_alpha' has 1 values, but the "
                              r"activations \['Sigmoid', 'Tanh', 'Tanh'\] take 0"),
    "beta beyond the takers": (dict(attrs={"activations": ["HardSigmoid", "LeakyRelu", "Tanh"],
                                           "activation_alpha": [0.5, 0.5],
                                           "activation_beta": [0.5, 0.5]}),
                               r"'lstm0'.*attribute 'activation_beta' has 2 values, but .* take "
                               r"1: only Affine, ScaledTanh, HardSigmoid consume one each"),
    "ScaledTanh without its parameters": (
        dict(attrs={"activations": ["Sigmoid", "ScaledTanh", "Tanh"],
                    "activation_alpha": [0.5]}),
        r"'lstm0'.*attribute 'activation_beta' has no value for ScaledTanh \(g \(cell input\)\)"
        r", whose default differs between ONNX \(1\.0.*and ONNX Runtime \(0\.0\)"),
    "ThresholdedRelu without alpha": (
        dict(attrs={"activations": ["Sigmoid", "Tanh", "ThresholdedRelu"]}),
        r"'lstm0'.*'activation_alpha' has no value for ThresholdedRelu \(h \(cell output\)\)"),
    "directions differ": (
        dict(D=2, attrs={"activations": ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"]}),
        r"'lstm0'.*the forward direction's \[Sigmoid, Tanh, Tanh\] differ from the reverse "
        r"direction's \[Sigmoid, Relu, Tanh\]; a fastrnn layer has one set of activations"),
    "directions' alphas differ": (
        dict(D=2, attrs={"activations": ["LeakyRelu", "Tanh", "Tanh"] * 2,
                         "activation_alpha": [0.25, 0.5]}),
        r"'lstm0'.*forward direction's \[LeakyRelu\(0\.25\), Tanh, Tanh\] differ from the "
        r"reverse direction's \[LeakyRelu\(0\.5\), Tanh, Tanh\]"),
    "layout": (dict(attrs={"layout": 1}), r"'lstm0'.*attribute 'layout'=1"),
    "reverse": (dict(attrs={"direction": "reverse"}), r"'lstm0'.*attribute 'direction'"),
    "unknown attribute": (dict(attrs={"linear_before_reset": 1}),
                          r"'lstm0'.*attribute 'linear_before_reset' is not one of LSTM's"),
    "hidden_size": (dict(attrs={"hidden_size": 5}),
                    r"'lstm0'.*attribute 'hidden_size' is 5 but input R has shape \(1, 12, 3\)"),
    "weights not constant": (dict(weights_as_inputs=True),
                             r"'lstm0'.*input W \(graph input 'W'\) is not a constant"),
    "operator after": (dict(extra_nodes=[helper.make_node("Relu", ["Y"], ["Z"], name="act")],
                            outputs=("Z",)),
                       r"graph output 'Z' comes from output 'Z' of node 'act' \(Relu.*not part of"),
    "D not squeezable": (dict(D=2, extra_nodes=[helper.make_node(
        "Squeeze", ["Y", "axes"], ["Z"], name="sq")], outputs=("Z",)),
        r"'sq' \(Squeeze.*only a direction axis of size 1"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_refuses_what_a_layer_cannot_be(case):
    kwargs, message = REFUSALS[case]
    model = lstm_model(**kwargs)
    if case == "D not squeezable":
        model.graph.initializer.append(numpy_helper.from_array(np.array([1]), "axes"))
    with pytest.raises(OnnxModelError, match=message):
        fastrnn.onnx.load(model, backend="reference")


def test_load_refuses_malformed_weights_and_foreign_graphs():
    model = lstm_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((1, 10, 2),
                                                                         np.float32), "W"))
    with pytest.raises(OnnxModelError, match=r"'lstm0'.*input W must have shape \(1, 12, 2\) "
                                             r"\(hidden_size 3\), got \(1, 10, 2\)"):
        fastrnn.onnx.load(model)
    relu_only = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])]))
    with pytest.raises(OnnxModelError, match=r"no LSTM, GRU or RNN node.*\['Relu'\]"):
        fastrnn.onnx.load(relu_only)


def test_load_refuses_states_from_the_wrong_rows():
    """Layer 1 of an exported 2-layer LSTM sliced from row 0 of h0 (its own row is 1)."""
    m = make_layer("lstm", 3, 4, 2, dtype=np.float32)
    model = fastrnn.onnx.export(m)
    start = next(t for t in model.graph.initializer if t.name == "h0_l1_start")
    start.CopyFrom(numpy_helper.from_array(np.array([0]), "h0_l1_start"))
    with pytest.raises(OnnxModelError, match=r"'LSTM_l1'.*rows \(0, 2\); expected rows 1\.\.1"):
        fastrnn.onnx.load(model)


def test_missing_onnx_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "fastrnn.onnx" or n.startswith("fastrnn.onnx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'fastrnn\[onnx\]'"):
        import fastrnn.onnx  # noqa: F401, F811
