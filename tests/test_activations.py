"""ONNX's recurrent-layer options on the layers: ``activations=`` (ONNX's 11 functions, with
alpha and beta), ``clip=`` (ONNX's cell clip) and ``input_forget=`` (LSTM), and Keras's
``activation=`` / ``recurrent_activation=`` keywords.

What each part is checked against:

- ONNX Runtime (float32, 1e-4): one ``LSTM``, ``GRU`` or ``RNN`` node built from the test's own
  case (activations, activation_alpha / activation_beta, clip, input_forget, peepholes,
  linear_before_reset), never read back from the layer, on every backend, both directions,
  sequence lengths. Every one of the 11 functions is in some case; the defaults of alpha and
  beta are compared with ``fastrnn.cells.ACTIVATION_DEFAULTS``.
- Central differences (float64, reference backend): each function in each slot of each cell,
  clip, input_forget, peepholes; dx, the initial state and every parameter.
- The reference (every backend, float32 and float64): lengths, states, both directions, two
  layers, truncation, batch sizes 1, 3 and 20, one-step calls; NaN in, NaN out.
- Stated errors; Keras's keywords against the ONNX activations they stand for, and Keras 3's
  hard_sigmoid and a linear RNN written out.

Kinks: relu, leakyrelu, elu at 0, thresholdedrelu at alpha (a jump), hardsigmoid's corners and
the clip's bounds make a derivative undefined or a value jump there. A case whose reference run
puts a gate pre-activation (or, for the LSTM's h, a cell value) within a margin of a kink of its
function would compare a one-sided slope with the other side (central differences, or float32
rounding on another backend), so every case takes the first of its seeds whose run keeps that
margin (``_seed_clear_of_kinks``). The margin is computed from the reference's own activation
calls (``reference._gate``, ``reference._activate``), watched while a run goes.
"""
import contextlib
import math
import zlib

import numpy as np
import pytest

import fastrnn
from conftest import (TOLERANCE, assert_all_close, max_rel_error, random_state, run_layer,
                      state_parts)
from fastrnn import reference
from fastrnn.cells import ACTIVATION_DEFAULTS, ACTIVATIONS, DEFAULT_ACTIVATIONS, SLOT_NAMES
from test_gradcheck import _check as central_difference_check

LAYERS = {"RNN": fastrnn.RNN, "LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU}
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _layer(mode, options, I, H, num_layers=1, *, backend="reference", dtype=np.float64,
           rng=None, **layer_options):
    """A layer of ``mode`` with the case's ``options``; parameters ~U(-1, 1) from ``rng``."""
    m = LAYERS[mode](I, H, num_layers, backend=backend, dtype=dtype, seed=0, **options,
                     **layer_options)
    if rng is not None:
        for name in sorted(m.params):
            m.params[name][...] = rng.uniform(-1.0, 1.0, m.params[name].shape)
    return m


def _without(options, *keys):
    return {k: v for k, v in options.items() if k not in keys}


# ---------------------------------------------------------------------------------------------
# Kinks: where each function (with its alpha, beta) has no derivative, and the reference's
# activation inputs watched during a run

def _kinks(act):
    name, alpha, beta = act
    if name in ("relu", "leakyrelu", "elu"):
        return (0.0,)
    if name == "thresholdedrelu":
        return (alpha,)
    if name == "hardsigmoid" and alpha != 0:
        return (-beta / alpha, (1 - beta) / alpha)
    return ()


@contextlib.contextmanager
def _watched():
    """Records what the reference's activations see while the block runs: (values, kinks) per
    call, for the activation's input and, for a clipped gate, its pre-activation before the
    clip (kinks at -clip and clip)."""
    seen = []
    gate, activate = reference._gate, reference._activate

    def watched_gate(cell, slot, a):
        if cell.clip is not None:
            seen.append((np.array(a, copy=True), (-cell.clip, cell.clip), "clip"))
        return gate(cell, slot, a)

    def watched_activate(act, a):
        seen.append((np.array(a, copy=True), _kinks(act), act))
        return activate(act, a)

    reference._gate, reference._activate = watched_gate, watched_activate
    try:
        yield seen
    finally:
        reference._gate, reference._activate = gate, activate


def _kink_distance(seen):
    """The smallest distance of any watched value to a kink of its function (inf: none)."""
    distance = math.inf
    for values, kinks, _ in seen:
        finite = values[np.isfinite(values)]
        for k in kinks:
            if finite.size:
                distance = min(distance, float(np.abs(finite - k).min()))
    return distance


def _clipped_count(seen):
    """(pre-activations outside [-clip, clip], pre-activations clipped at all)."""
    outside = total = 0
    for values, kinks, what in seen:
        if what == "clip":
            outside += int((np.abs(values) > kinks[1]).sum())
            total += values.size
    return outside, total


def _seed_clear_of_kinks(key, margin, run_reference, attempts=40):
    """The first of ``attempts`` seeds derived from ``key`` whose reference run (``run_reference
    (rng)``) keeps every activation input at least ``margin`` from a kink of its function, and
    finite and below 1e3 (an unbounded function in a gate, elu say, can make a state grow
    without bound), and what the run saw."""
    for attempt in range(attempts):
        seed = zlib.crc32(repr((key, attempt)).encode())
        with _watched() as seen, np.errstate(over="ignore", invalid="ignore"):
            run_reference(np.random.default_rng(seed))
        moderate = all(np.all(np.abs(values) < 1e3) for values, _, _ in seen)
        if moderate and _kink_distance(seen) > margin:
            return seed, seen
    pytest.fail(f"{key}: no seed of {attempts} keeps the activation inputs {margin:g} from the "
                f"kinks and below 1e3")


# ---------------------------------------------------------------------------------------------
# 1. ONNX Runtime as the oracle

# ONNX's spelling; the functions that consume an entry of activation_alpha / activation_beta
# (ONNX Runtime's rnn_helpers.cc: only these, in the order of the activations list)
ONNX_NAMES = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "affine": "Affine",
              "leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu",
              "scaledtanh": "ScaledTanh", "hardsigmoid": "HardSigmoid", "elu": "Elu",
              "softsign": "Softsign", "softplus": "Softplus"}
TAKES_ALPHA = ("affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu")
TAKES_BETA = ("affine", "scaledtanh", "hardsigmoid")
# the functions whose alpha and beta ONNX Runtime takes as 0.0 when a node leaves them out (its
# rnn_helpers.cc has defaults for leakyrelu, hardsigmoid and elu only): not ONNX's
# ThresholdedRelu (alpha 1.0), and an affine or scaledtanh that is the constant 0
ORT_ZERO_DEFAULTS = ("affine", "scaledtanh", "thresholdedrelu")

# case -> (mode, layer options); the ONNX node's attributes are made from the same options
ORT_CASES = {
    "lstm-peephole-clip-hardsigmoid-scaledtanh-leakyrelu": ("LSTM", dict(
        peephole=True, clip=0.8,
        activations=(("hardsigmoid", 0.3, 0.4), ("scaledtanh", 1.5, 0.7), ("leakyrelu", 0.1)))),
    "lstm-softsign-softplus": ("LSTM", dict(activations=("sigmoid", "softsign", "softplus"))),
    "lstm-input_forget-elu-relu": ("LSTM", dict(
        input_forget=True, activations=("softsign", ("elu", 0.5), "relu"))),
    "lstm-input_forget-peephole-clip": ("LSTM", dict(input_forget=True, peephole=True,
                                                     clip=0.6)),
    "lstm-clip-affine-thresholdedrelu": ("LSTM", dict(
        peephole=True, clip=1.5,
        activations=(("hardsigmoid", 0.25, 0.6), ("affine", 0.8, 0.1),
                     ("thresholdedrelu", 0.2)))),
    "lstm-default-alphas": ("LSTM", dict(activations=("hardsigmoid", "elu", "leakyrelu"))),
    "gru-clip-hardsigmoid-scaledtanh": ("GRU", dict(
        reset_after=True, clip=0.7,
        activations=(("hardsigmoid", 0.3, 0.4), ("scaledtanh", 1.5, 0.7)))),
    "gru_reset_before-clip-hardsigmoid-scaledtanh": ("GRU", dict(
        reset_after=False, clip=0.7,
        activations=(("hardsigmoid", 0.3, 0.4), ("scaledtanh", 1.5, 0.7)))),
    "gru-softsign-softplus": ("GRU", dict(reset_after=True, activations=("softsign",
                                                                          "softplus"))),
    "gru_reset_before-clip-elu-thresholdedrelu": ("GRU", dict(
        reset_after=False, clip=1.0, activations=(("elu", 0.5), ("thresholdedrelu", 0.1)))),
    "gru-clip": ("GRU", dict(reset_after=True, clip=0.5)),
    "gru_reset_before-default-alphas-relu": ("GRU", dict(reset_after=False,
                                                         activations=("hardsigmoid", "relu"))),
    "rnn-clip": ("RNN", dict(clip=0.5)),
    "rnn-clip-relu": ("RNN", dict(clip=0.7, activations=("relu",))),
    "rnn-affine": ("RNN", dict(activations=(("affine", 0.7, 0.2),))),
    "rnn-scaledtanh-clip": ("RNN", dict(clip=0.8, activations=(("scaledtanh", 1.5, 0.7),))),
    "rnn-thresholdedrelu": ("RNN", dict(activations=(("thresholdedrelu", 0.3),))),
    "rnn-leakyrelu": ("RNN", dict(activations=(("leakyrelu", 0.1),))),
    "rnn-sigmoid": ("RNN", dict(activations=("sigmoid",))),
    "rnn-softplus-clip": ("RNN", dict(clip=1.0, activations=("softplus",))),
}


def _entries(options):
    return [(e,) if isinstance(e, str) else tuple(e) for e in options.get("activations", ())]


def _onnx_attributes(mode, options, D):
    """The node's attributes for a case: ONNX Runtime reads activation_alpha (beta) as one
    value per function that takes one, in order, both directions one after the other; a case
    gives all of them or none (else ONNX Runtime would read another function's value)."""
    attributes = {}
    entries = _entries(options)
    if entries:
        attributes["activations"] = [ONNX_NAMES[e[0]] for e in entries] * D
        for key, takes, k in (("activation_alpha", TAKES_ALPHA, 1),
                              ("activation_beta", TAKES_BETA, 2)):
            wanted = [e for e in entries if e[0] in takes]
            given = [float(e[k]) for e in wanted if len(e) > k]
            assert len(given) in (0, len(wanted)), f"{key}: give all or none in a test case"
            if given:
                attributes[key] = given * D
    if options.get("clip") is not None:
        attributes["clip"] = float(options["clip"])
    if options.get("input_forget"):
        attributes["input_forget"] = 1
    if mode == "GRU":
        attributes["linear_before_reset"] = int(options.get("reset_after", True))
    return attributes


def _onnxruntime(mode, options, m, x, state, lengths):
    """Layer ``m``'s one layer (its parameters only) as one ONNX node with the case's options,
    run in ONNX Runtime (float32): [y (T, B, D*H), h_n, c_n (LSTM)]."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from test_onnx_parity import _reorder     # PyTorch's gate order -> ONNX's (iofc, zrh)

    H = m.hidden_size
    T, B, _ = x.shape
    suffixes = ["_l0", "_l0_reverse"][: m.num_directions]
    feeds = {
        "X": x,
        "W": np.stack([_reorder(m.params["weight_ih" + s], mode, H) for s in suffixes]),
        "R": np.stack([_reorder(m.params["weight_hh" + s], mode, H) for s in suffixes]),
        "B": np.stack([np.concatenate([_reorder(m.params["bias_ih" + s], mode, H),
                                       _reorder(m.params["bias_hh" + s], mode, H)])
                       for s in suffixes]),
        "sequence_lens": lengths.astype(np.int32),
        "initial_h": state_parts(state)[0]}
    outputs = ["Y", "Y_h"]
    if mode == "LSTM":
        feeds["initial_c"] = state_parts(state)[1]
        if options.get("peephole"):           # ours rows i, f, o; ONNX's P = [i, o, f]
            feeds["P"] = np.stack([m.params["peephole" + s][[0, 2, 1]].reshape(-1)
                                   for s in suffixes])
        outputs.append("Y_c")
    node = helper.make_node(mode, list(feeds), outputs, hidden_size=H,
                            direction="bidirectional" if m.num_directions == 2 else "forward",
                            **_onnx_attributes(mode, options, m.num_directions))
    graph = helper.make_graph(
        [node], "rnn",
        [helper.make_tensor_value_info(name, TensorProto.INT32 if name == "sequence_lens"
                                       else TensorProto.FLOAT, value.shape)
         for name, value in feeds.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(outputs, {k: v if k == "sequence_lens" else
                                    np.ascontiguousarray(v, dtype=np.float32)
                                    for k, v in feeds.items()})
    y = results[0].transpose(0, 2, 1, 3).reshape(T, B, -1)     # (T, D, B, H) -> (T, B, D*H)
    return [y] + list(results[1:])


def _ort_case(mode, options, bidirectional, rng, backend="reference"):
    T, B, I, H = 6, 4, 3, 5
    m = _layer(mode, options, I, H, bidirectional=bidirectional, backend=backend,
               dtype=np.float32, rng=rng)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    state = random_state(m, B, rng, scale=1.0)
    return m, x, state, np.array([6, 3, 1, 5])


@pytest.mark.float32_kernels
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("case", sorted(ORT_CASES))
def test_forward_matches_onnxruntime(backend, case, bidirectional):
    mode, options = ORT_CASES[case]

    def run_reference(rng):
        m, x, state, lengths = _ort_case(mode, options, bidirectional, rng)
        return m(x, state, lengths)

    seed, seen = _seed_clear_of_kinks(("ort", case, bidirectional), 1e-4, run_reference)
    m, x, state, lengths = _ort_case(mode, options, bidirectional, np.random.default_rng(seed),
                                     backend)
    y, final = m(x, state, lengths)
    expected = _onnxruntime(mode, options, m, x, state, lengths)
    for name, got, want in zip(["y", "h_n", "c_n"], [y] + state_parts(final), expected):
        err = max_rel_error(got, want)
        assert err <= 1e-4, f"{name}: relative error {err:.3g} against ONNX Runtime"
    if options.get("clip") is not None:
        # the clip acted: some pre-activations were beyond it, and without it y differs
        outside, total = _clipped_count(seen)
        assert 0 < outside < total, (outside, total)
        unclipped = _ort_case(mode, _without(options, "clip"), bidirectional,
                              np.random.default_rng(seed))
        with np.errstate(over="ignore", invalid="ignore"):   # unclipped, a gate may run away
            y_unclipped, _ = unclipped[0](*unclipped[1:])
        assert not np.allclose(y_unclipped, expected[0], rtol=0, atol=1e-2)


@pytest.mark.float32_kernels
@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n in TAKES_ALPHA])
def test_default_alpha_and_beta_against_onnxruntime(backend, name):
    """A node that gives no activation_alpha / activation_beta: for leakyrelu, hardsigmoid and
    elu ONNX Runtime's defaults are fastrnn's (ACTIVATION_DEFAULTS: ONNX's operators of the same
    name). For affine, scaledtanh and thresholdedrelu (ORT_ZERO_DEFAULTS) ONNX Runtime takes 0.0
    where fastrnn takes ONNX's operator's value; fastrnn's ONNX loader refuses such a node
    (fastrnn.onnx._nodes.DISPUTED_DEFAULTS). Asserted both ways, so a change on either side is
    seen."""
    options = dict(activations=(name,))

    def run_reference(rng):
        m, x, state, lengths = _ort_case("RNN", options, False, rng)
        return m(x, state, lengths)

    seed, _ = _seed_clear_of_kinks(("ort defaults", name), 1e-4, run_reference)
    m, x, state, lengths = _ort_case("RNN", options, False, np.random.default_rng(seed),
                                     backend)
    y, _ = m(x, state, lengths)
    y_ort = _onnxruntime("RNN", options, m, x, state, lengths)[0]
    zeros = (name,) + (0.0,) * (1 + (name in TAKES_BETA))
    zeroed = _ort_case("RNN", dict(activations=(zeros,)), False, np.random.default_rng(seed),
                       backend)
    y_zeroed, _ = zeroed[0](*zeroed[1:])
    # 10 times the tolerance: the comparison tells fastrnn's default from 0.0
    assert max_rel_error(y, y_zeroed) > 1e-3
    if name in ORT_ZERO_DEFAULTS:
        assert max_rel_error(y_zeroed, y_ort) <= 1e-4, f"{name}: ONNX Runtime's default is not 0.0"
        assert max_rel_error(y, y_ort) > 1e-3
        nodes = pytest.importorskip("fastrnn.onnx._nodes")
        assert set(nodes.DISPUTED_DEFAULTS) == set(ORT_ZERO_DEFAULTS)
    else:
        err = max_rel_error(y, y_ort)
        assert err <= 1e-4, (f"{name}: the defaults {ACTIVATION_DEFAULTS[name]} differ from "
                             f"ONNX Runtime's (relative error {err:.3g})")


def test_every_activation_has_an_onnxruntime_case():
    used = {e[0] for _, options in ORT_CASES.values() for e in _entries(options)}
    used |= {e[0] for mode, options in ORT_CASES.values() if "activations" not in options
             for e in DEFAULT_ACTIVATIONS[mode]}
    assert used == set(ACTIVATIONS) and len(ACTIVATIONS) == 11, set(ACTIVATIONS) - used
    # an explicit alpha (and beta) for every function that takes one
    for k, takes in ((1, TAKES_ALPHA), (2, TAKES_BETA)):
        given = {e[0] for _, options in ORT_CASES.values() for e in _entries(options)
                 if len(e) > k}
        assert given == set(takes), set(takes) - given
    # and a case leaving each of them out (the default), in every mode with alpha-taking slots
    omitted = {(mode, e[0]) for mode, options in ORT_CASES.values() for e in _entries(options)
               if e[0] in TAKES_ALPHA and len(e) == 1}
    assert {n for _, n in omitted} >= {"hardsigmoid", "elu", "leakyrelu"}
    assert {mode for mode, _ in omitted} == {"LSTM", "GRU"}
    assert {"clip", "input_forget", "peephole"} <= {k for _, o in ORT_CASES.values() for k in o}


# ---------------------------------------------------------------------------------------------
# 2. Central differences (reference, float64)

# each function with an alpha/beta of its own (not the defaults), where it takes them
GRAD_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid",
                    "affine": ("affine", 0.8, 0.1), "leakyrelu": ("leakyrelu", 0.1),
                    "thresholdedrelu": ("thresholdedrelu", 0.2),
                    "scaledtanh": ("scaledtanh", 1.5, 0.7),
                    "hardsigmoid": ("hardsigmoid", 0.3, 0.4), "elu": ("elu", 0.5),
                    "softsign": "softsign", "softplus": "softplus"}
assert set(GRAD_ACTIVATIONS) == set(ACTIVATIONS)
# (mode, options, slot) for every slot of every step pair
GRAD_SLOTS = {"rnn-f": ("RNN", {}, 0), "lstm-f": ("LSTM", {}, 0), "lstm-g": ("LSTM", {}, 1),
              "lstm-h": ("LSTM", {}, 2), "gru-f": ("GRU", {"reset_after": True}, 0),
              "gru-g": ("GRU", {"reset_after": True}, 1),
              "gru_reset_before-f": ("GRU", {"reset_after": False}, 0),
              "gru_reset_before-g": ("GRU", {"reset_after": False}, 1)}
GRAD_MARGIN = 1e-4     # central differences step 1e-6 through weights ~U(-1, 1)


def _gradient_case(mode, options, rng, num_layers=1, bidirectional=False, lengths=None,
                   T=4, B=3, I=3, H=2):
    m = _layer(mode, options, I, H, num_layers, bidirectional=bidirectional, rng=rng)
    D = m.num_directions
    x = rng.standard_normal((T, B, I))
    state, dstate = random_state(m, B, rng), random_state(m, B, rng)
    dy = rng.standard_normal((T, B, D * H))
    return m, x, state, lengths, dy, dstate


def _gradient_check(key, mode, options, **shape):
    """Central differences of every input, state and parameter element against backward, at
    the first seed whose run keeps GRAD_MARGIN from the kinks; returns what the run saw."""
    seed, seen = _seed_clear_of_kinks(
        key, GRAD_MARGIN, lambda rng: _forward(_gradient_case(mode, options, rng, **shape)))
    m, x, state, lengths, dy, dstate = _gradient_case(mode, options, np.random.default_rng(seed),
                                                      **shape)
    central_difference_check(m, x, state, lengths, dy, dstate)
    return seen


def _forward(case):
    m, x, state, lengths, _, _ = case
    return m.forward(x, state, lengths, train=True)


def _both_sides_of_a_kink(seen, act):
    """Whether some input of ``act`` lies below and some above one of its kinks."""
    values = np.concatenate([v.ravel() for v, _, a in seen if a == act])
    return any((values < k).any() and (values > k).any() for k in _kinks(act))


@pytest.mark.parametrize("name", sorted(GRAD_ACTIVATIONS))
@pytest.mark.parametrize("slot", sorted(GRAD_SLOTS))
def test_gradients_of_each_activation_in_each_slot(slot, name):
    mode, options, k = GRAD_SLOTS[slot]
    activations = [e[0] for e in DEFAULT_ACTIVATIONS[mode]]
    activations[k] = GRAD_ACTIVATIONS[name]
    seen = _gradient_check(("grad", slot, name), mode,
                           dict(options, activations=tuple(activations)))
    act = fastrnn.cells.activation_slots(mode, activations)[k]
    if _kinks(act):       # both pieces of the function were differentiated
        assert _both_sides_of_a_kink(seen, act), f"{name} in {slot}: one side of its kinks only"


GRAD_OPTIONS = {
    "rnn-clip": ("RNN", dict(clip=0.7), {}),
    "rnn_relu-clip": ("RNN", dict(nonlinearity="relu", clip=0.7), {}),
    "lstm-clip": ("LSTM", dict(clip=0.7), {}),
    "lstm_peephole-clip": ("LSTM", dict(peephole=True, clip=0.7), {}),
    "lstm-input_forget": ("LSTM", dict(input_forget=True), {}),
    "lstm_peephole-input_forget": ("LSTM", dict(peephole=True, input_forget=True), {}),
    "lstm_peephole-input_forget-clip-activations": ("LSTM", dict(
        peephole=True, input_forget=True, clip=0.9,
        activations=(("hardsigmoid", 0.3, 0.4), "softsign", ("elu", 0.5))), {}),
    "gru-clip": ("GRU", dict(reset_after=True, clip=0.7), {}),
    "gru_reset_before-clip": ("GRU", dict(reset_after=False, clip=0.7), {}),
    # lengths (one empty), both directions, two layers
    "lstm_peephole-clip-activations-bi-2layers": ("LSTM", dict(
        peephole=True, clip=0.8,
        activations=(("hardsigmoid", 0.3, 0.4), ("scaledtanh", 1.5, 0.7), "softplus")),
        dict(num_layers=2, bidirectional=True, lengths=np.array([4, 2, 0]))),
    "gru_reset_before-clip-activations-bi": ("GRU", dict(
        reset_after=False, clip=0.8, activations=("softsign", ("leakyrelu", 0.1))),
        dict(bidirectional=True, lengths=np.array([4, 2, 0]))),
    "rnn-clip-activations-bi-2layers": ("RNN", dict(clip=0.6, activations=(("affine", 0.9, 0.1),)),
                                        dict(num_layers=2, bidirectional=True,
                                             lengths=np.array([4, 2, 0]))),
}


@pytest.mark.parametrize("case", sorted(GRAD_OPTIONS))
def test_gradients_with_clip_and_input_forget(case):
    mode, options, shape = GRAD_OPTIONS[case]
    seen = _gradient_check(("grad options", case), mode, options, **shape)
    if options.get("clip") is not None:
        outside, total = _clipped_count(seen)
        assert 0 < outside < total, f"the clip acted on {outside} of {total}"


def test_input_forget_ignores_the_forget_gate():
    """input_forget: f = 1 - i, so the forget gate's weights, biases and peephole change
    nothing and get zero gradients; the layer differs from one without it."""
    rng = _rng("input_forget")
    options = dict(peephole=True, input_forget=True)
    m = _layer("LSTM", options, 3, 4, rng=rng)
    x, dy = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 4))
    state = random_state(m, 2, rng)
    result = run_layer(m, x, state, dy=dy)
    f_rows = slice(4, 8)                         # ours: i, f, g, o blocks of H = 4
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert not result["grad " + name][f_rows].any()
        assert result["grad " + name][:4].any()
    assert not result["grad peephole_l0"][1].any() and result["grad peephole_l0"][0].any()
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        m.params[name][f_rows] = rng.standard_normal(m.params[name][f_rows].shape)
    m.params["peephole_l0"][1] = 5.0
    again = run_layer(m, x, state, dy=dy)
    for key in ("y", "dx", "state_n[0]", "state_n[1]"):
        np.testing.assert_array_equal(again[key], result[key])
    coupled = _layer("LSTM", dict(peephole=True), 3, 4)
    coupled.load_state_dict(m.state_dict())
    assert max_rel_error(coupled(x, state)[0], result["y"]) > 1e-2


# ---------------------------------------------------------------------------------------------
# 3. Every backend against the reference

PARITY_CELLS = {
    "lstm_peephole-clip-activations": ("LSTM", dict(
        peephole=True, clip=1.2,
        activations=(("hardsigmoid", 0.3, 0.4), ("scaledtanh", 1.5, 0.7), ("leakyrelu", 0.1)))),
    "lstm-input_forget-activations": ("LSTM", dict(
        input_forget=True, activations=("softsign", ("elu", 0.5), "softplus"))),
    "lstm_peephole-input_forget-clip": ("LSTM", dict(peephole=True, input_forget=True,
                                                      clip=0.8)),
    "gru-clip-activations": ("GRU", dict(
        reset_after=True, clip=0.9, activations=(("hardsigmoid", 0.3, 0.4), "softsign"))),
    "gru_reset_before-clip-activations": ("GRU", dict(
        reset_after=False, clip=1.1, activations=("sigmoid", ("thresholdedrelu", 0.1)))),
    "rnn-clip-affine": ("RNN", dict(clip=1.0, activations=(("affine", 0.9, 0.1),))),
    "rnn-elu": ("RNN", dict(activations=(("elu", 0.7),))),
}
PARITY_MARGIN = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-9}
VARIANTS = {"bi+lengths+states": dict(num_layers=1, bidirectional=True),
            "2layers+bi+truncate": dict(num_layers=2, bidirectional=True, truncate=2)}


def _lengths(B, T, rng):
    if B == 1:
        return np.array([T - 1])
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[1] = T, 0                   # one whole sequence, one empty
    return lengths


def _parity_case(mode, options, variant, B, dtype, rng, backend="reference"):
    T, I, H = 5, 3, 5
    layer_options = _without(VARIANTS[variant], "truncate")
    m = _layer(mode, options, I, H, backend=backend, dtype=dtype, rng=rng, **layer_options)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    call = dict(x=x, state=random_state(m, B, rng), lengths=_lengths(B, T, rng),
                dy=rng.standard_normal((T, B, m.num_directions * H)).astype(dtype),
                dstate=random_state(m, B, rng), truncate=VARIANTS[variant].get("truncate"))
    return m, call


@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", sorted(PARITY_CELLS))
def test_backend_matches_reference(backend, cell, dtype, variant, B):
    """Outputs, final states, dx, dstate0 and every parameter gradient. On the reference
    backend itself the comparison is with itself; the case's own checks (its parts changed the
    result, the clip acted, no recurrent gradient is zero) still run."""
    mode, options = PARITY_CELLS[cell]

    def run_reference(rng):
        m, call = _parity_case(mode, options, variant, B, dtype, rng)
        run_layer(m, **call)

    seed, seen = _seed_clear_of_kinks(("parity", cell, np.dtype(dtype).name, variant, B),
                                      PARITY_MARGIN[np.dtype(dtype)], run_reference)
    results = {}
    for name in ("reference", backend):
        m, call = _parity_case(mode, options, variant, B, dtype, np.random.default_rng(seed),
                               name)
        results[name] = run_layer(m, **call)
    assert_all_close(results[backend], results["reference"], dtype, f"{backend} vs reference")
    expected = results["reference"]
    for key, value in expected.items():
        if key.startswith("grad weight_hh"):
            assert np.any(value != 0), f"{key} is zero: the comparison tests nothing"
    if options.get("clip") is not None:
        outside, total = _clipped_count(seen)
        assert 0 < outside < total, f"the clip acted on {outside} of {total}"
    # each part of the case changed the reference's result
    undo = [{"lengths": None}, {"state": None}] if variant.startswith("bi") else \
        [{"truncate": None}]
    for changes in undo:
        m, call = _parity_case(mode, options, variant, B, dtype, np.random.default_rng(seed))
        without = run_layer(m, **{**call, **changes})
        change = max(max_rel_error(expected[key], without[key]) for key in expected)
        assert change > 10 * TOLERANCE[np.dtype(dtype)], f"{changes}: changes {change:.3g} only"


STEP_CELLS = ["lstm_peephole-clip-activations", "lstm-input_forget-activations",
              "gru-clip-activations", "gru_reset_before-clip-activations", "rnn-clip-affine"]


@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", STEP_CELLS)
def test_one_step_calls(backend, cell, dtype, B):
    """A layer called with ``state`` on one step at a time (the compiled backends' one-step
    call) gives the whole sequence's outputs and state (two layers, one direction), and the
    reference's (two layers, both directions); one step of training equals the reference's."""
    mode, options = PARITY_CELLS[cell]
    T, I, H = 4, 3, 5
    tol = TOLERANCE[np.dtype(dtype)]

    def case(rng, backend_name, bidirectional):
        m = _layer(mode, options, I, H, 2, bidirectional=bidirectional, backend=backend_name,
                   dtype=dtype, rng=rng)
        x = rng.standard_normal((T, B, I)).astype(dtype)
        return m, x, random_state(m, B, rng), random_state(m, B, rng)

    def run_reference(rng):
        for bidirectional in (False, True):
            m, x, state, _ = case(rng, "reference", bidirectional)
            m(x, state)
            for t in range(T):
                m(x[t:t + 1], state)

    seed, _ = _seed_clear_of_kinks(("step", cell, np.dtype(dtype).name, B),
                                   PARITY_MARGIN[np.dtype(dtype)], run_reference)
    # one direction: step by step == the whole sequence, on the backend
    rng = np.random.default_rng(seed)
    m, x, state0, _ = case(rng, backend, False)
    y_all, final_all = m(x, state0)
    state = state0
    for t in range(T):
        y_t, state = m(x[t:t + 1], state)
        assert_all_close({"y": y_t}, {"y": y_all[t:t + 1]}, dtype, f"step {t}")
    assert_all_close(dict(enumerate(state_parts(state))), dict(enumerate(state_parts(final_all))),
                     dtype, "state after the steps")
    # both directions, one step, against the reference
    results = {}
    for name in ("reference", backend):
        m, x, state, dstate = case(np.random.default_rng(seed), name, True)
        y, final = m(x[:1], state)
        results[name] = {"y": y, **{f"state[{i}]": p for i, p in enumerate(state_parts(final))}}
        dy = np.ones_like(y)
        results[name].update({"train " + k: v for k, v in
                              run_layer(m, x[:1], state, dy=dy, dstate=dstate).items()})
    assert_all_close(results[backend], results["reference"], dtype, f"{backend} one step")
    assert max_rel_error(results["reference"]["y"], np.zeros_like(y)) > 10 * tol


# ---------------------------------------------------------------------------------------------
# 4. NaN in, NaN out

NAN_CELLS = {
    "lstm": ("LSTM", dict(peephole=True, clip=1.0, activations=(
        ("hardsigmoid", 0.3, 0.4), "relu", ("thresholdedrelu", 0.2)))),
    "lstm-input_forget": ("LSTM", dict(input_forget=True, clip=1.0,
                                       activations=("hardsigmoid", ("leakyrelu", 0.1), "elu"))),
    "gru": ("GRU", dict(reset_after=True, clip=1.0, activations=("hardsigmoid",
                                                                 ("leakyrelu", 0.1)))),
    "gru_reset_before": ("GRU", dict(reset_after=False, clip=1.0,
                                     activations=("hardsigmoid", "relu"))),
    "rnn-clip": ("RNN", dict(clip=0.5, activations=(("thresholdedrelu", 0.1),))),
    # one function alone between the NaN and the output
    "rnn-relu": ("RNN", dict(activations=("relu",))),
    "rnn-hardsigmoid": ("RNN", dict(activations=(("hardsigmoid", 0.3, 0.4),))),
}


@pytest.mark.parametrize("cell", sorted(NAN_CELLS))
def test_nan_in_gives_nan_out(backend, cell):
    """A NaN in one row's input makes that row NaN from there on (through clip, hardsigmoid,
    relu and thresholdedrelu, which a min/max or a comparison could turn into a number) and
    leaves the other row alone; the same NaNs as the reference, forward and backward."""
    mode, options = NAN_CELLS[cell]
    x = _rng("nan", cell).standard_normal((5, 2, 3))
    x[2, 1, 0] = np.nan
    results = {}
    for name in ("reference", backend):
        m = _layer(mode, options, 3, 4, 2, backend=name, rng=np.random.default_rng(1))
        y, final = m(x)
        assert np.isnan(y[2:, 1]).all() and not np.isnan(y[:2]).any()
        assert not np.isnan(y[:, 0]).any()
        for part in state_parts(final):
            assert np.isnan(part[:, 1]).all() and not np.isnan(part[:, 0]).any()
        results[name] = run_layer(m, x, dy=np.ones_like(y))
        dx = results[name]["dx"]
        assert np.isnan(dx[:, 1]).any() and not np.isnan(dx[:, 0]).any()
    for key, want in results["reference"].items():
        got = results[backend][key]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=key)
        finite = ~np.isnan(want)
        if finite.any():
            err = max_rel_error(got[finite], want[finite])
            assert err <= TOLERANCE[np.dtype(np.float64)], f"{key}: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# 5. Errors, each naming its argument

ERRORS = [
    (lambda: fastrnn.LSTM(2, 3, activations=("sigmoid", "swish", "tanh")), ValueError,
     r"activations: unknown activation 'swish' for g"),
    (lambda: fastrnn.LSTM(2, 3, activations=("sigmoid", "tanh")), ValueError,
     r"activations: expected a tuple of 3 activations for LSTM"),
    (lambda: fastrnn.GRU(2, 3, activations=("sigmoid", "tanh", "tanh")), ValueError,
     r"activations: expected a tuple of 2 activations for GRU"),
    (lambda: fastrnn.RNN(2, 3, activations="relu"), ValueError,
     r"activations: expected a tuple of 1 activation for RNN"),
    (lambda: fastrnn.RNN(2, 3, activations=("relu", "relu")), ValueError,
     r"activations: expected a tuple of 1 activation for RNN"),
    (lambda: fastrnn.RNN(2, 3, activations=(("softsign", 0.5),)), ValueError,
     r"activations: 'softsign' takes no alpha or beta"),
    (lambda: fastrnn.RNN(2, 3, activations=(("leakyrelu", 0.1, 0.2),)), ValueError,
     r"activations: 'leakyrelu' takes alpha only"),
    (lambda: fastrnn.RNN(2, 3, activations=(("leakyrelu", float("nan")),)), ValueError,
     r"activations: alpha of 'leakyrelu' must be a finite number"),
    (lambda: fastrnn.RNN(2, 3, activations=(("hardsigmoid", 0.2, float("inf")),)), ValueError,
     r"activations: beta of 'hardsigmoid' must be a finite number"),
    (lambda: fastrnn.RNN(2, 3, activations=(("elu", True),)), ValueError,
     r"activations: alpha of 'elu' must be a finite number"),
    (lambda: fastrnn.RNN(2, 3, activations=(("affine", "1"),)), ValueError,
     r"activations: alpha of 'affine' must be a finite number"),
    (lambda: fastrnn.LSTM(2, 3, activations=("sigmoid", ("tanh",) * 4, "tanh")), ValueError,
     r"activations: the g \(cell input\) entry must be a name"),
    (lambda: fastrnn.LSTM(2, 3, clip=0), ValueError, r"clip: expected None or a positive"),
    (lambda: fastrnn.LSTM(2, 3, clip=-1.0), ValueError, r"clip: expected None or a positive"),
    (lambda: fastrnn.GRU(2, 3, clip=float("inf")), ValueError,
     r"clip: expected None or a positive finite"),
    (lambda: fastrnn.GRU(2, 3, clip=float("nan")), ValueError,
     r"clip: expected None or a positive finite"),
    (lambda: fastrnn.RNN(2, 3, clip=True), ValueError, r"clip: expected None or a positive"),
    (lambda: fastrnn.RNN(2, 3, clip="1"), ValueError, r"clip: expected None or a positive"),
    (lambda: fastrnn.GRU(2, 3, input_forget=True), TypeError, r"input_forget"),
    (lambda: fastrnn.RNN(2, 3, input_forget=True), TypeError, r"input_forget"),
    (lambda: fastrnn.LSTM(2, 3, input_forget="yes"), TypeError,
     r"input_forget: expected True or False"),
    (lambda: fastrnn.LSTM(2, 3, activations=("sigmoid", "relu", "relu"), activation="relu"),
     ValueError, r"activations: give ONNX's activations or Keras's activation, not both"),
    (lambda: fastrnn.GRU(2, 3, activations=("sigmoid", "relu"),
                         recurrent_activation="sigmoid"), ValueError,
     r"activations: give ONNX's activations or Keras's recurrent_activation, not both"),
    (lambda: fastrnn.RNN(2, 3, nonlinearity="relu", activations=("relu",)), ValueError,
     r"nonlinearity: a shorthand for activations"),
    (lambda: fastrnn.RNN(2, 3, nonlinearity="relu", activation="relu"), ValueError,
     r"nonlinearity: a shorthand for activations"),
    (lambda: fastrnn.LSTM(2, 3, activation="selu"), ValueError,
     r"activation: expected one of Keras's .* got 'selu'"),
    (lambda: fastrnn.GRU(2, 3, recurrent_activation="selu"), ValueError,
     r"recurrent_activation: expected one of Keras's .* got 'selu'"),
    (lambda: fastrnn.RNN(2, 3, recurrent_activation="sigmoid"), ValueError,
     r"recurrent_activation: an RNN has one activation"),
]


@pytest.mark.parametrize("make,error,match", ERRORS,
                         ids=[f"{i}-{m.split(':')[0]}" for i, (_, _, m) in enumerate(ERRORS)])
def test_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# 6. Keras's keywords, and what the records resolve to

def _same_layer(a_options, b_options, mode, seed=1):
    """Both layers (reference, float64, the same parameters) on the same call: the results."""
    rng = _rng("same", mode, seed)
    results = []
    for options in (a_options, b_options):
        m = _layer(mode, options, 3, 4, rng=np.random.default_rng(seed))
        results.append(m)
    x, dy = rng.standard_normal((5, 3, 3)), rng.standard_normal((5, 3, 4))
    state = random_state(results[0], 3, rng)
    return [run_layer(m, x, state, dy=dy) for m in results], results


def test_keras_lstm_keywords_are_onnx_activations():
    (keras, onnx), (m_keras, m_onnx) = _same_layer(
        dict(activation="relu", recurrent_activation="hard_sigmoid"),
        dict(activations=(("hardsigmoid", 1 / 6, 0.5), "relu", "relu")), "LSTM")
    assert m_keras.cell.activations == m_onnx.cell.activations == (
        ("hardsigmoid", 1 / 6, 0.5), ("relu", 0.0, 0.0), ("relu", 0.0, 0.0))
    for key in onnx:
        np.testing.assert_array_equal(keras[key], onnx[key], err_msg=key)
    (plain, _), _ = _same_layer({}, {}, "LSTM")
    assert max_rel_error(keras["y"], plain["y"]) > 1e-2


def test_keras_hard_sigmoid_is_keras_3s():
    """Keras 3's hard_sigmoid is relu6(x + 3) / 6; leaky_relu's negative slope is 0.2."""
    a = np.linspace(-5, 5, 101)
    hard = fastrnn.layers.KERAS_ACTIVATIONS["hard_sigmoid"]
    np.testing.assert_allclose(reference._activate(hard, a), np.clip(a + 3, 0, 6) / 6,
                               rtol=0, atol=1e-15)
    leaky = fastrnn.cells.activation_slots(
        "RNN", (fastrnn.layers.KERAS_ACTIVATIONS["leaky_relu"],))[0]
    np.testing.assert_array_equal(reference._activate(leaky, a), np.where(a < 0, 0.2 * a, a))


def test_keras_gru_and_rnn_keywords():
    (keras, onnx), _ = _same_layer(dict(activation="softsign", recurrent_activation="sigmoid"),
                                   dict(activations=("sigmoid", "softsign")), "GRU")
    for key in onnx:
        np.testing.assert_array_equal(keras[key], onnx[key], err_msg=key)
    # a linear RNN: h_t = W x_t + b_ih + R h_{t-1} + b_hh, written out
    rng = _rng("linear")
    m = _layer("RNN", dict(activation="linear"), 3, 4, rng=rng)
    assert m.cell.activations == (("affine", 1.0, 0.0),)
    x, h = rng.standard_normal((5, 2, 3)), rng.standard_normal((1, 2, 4))
    y, _ = m(x, h)
    p = m.params
    h = h[0]
    for t in range(5):
        h = x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T \
            + p["bias_hh_l0"]
        np.testing.assert_allclose(y[t], h, rtol=1e-12, atol=1e-12)
    # Keras's defaults are the plain cells
    assert fastrnn.LSTM(3, 4, activation="tanh").cell.plain
    assert fastrnn.GRU(3, 4, recurrent_activation="sigmoid").cell.plain


def test_activations_resolve_with_defaults_and_onnx_spelling():
    m = fastrnn.LSTM(3, 4, activations=["HardSigmoid", ("LeakyRelu",), ("Elu", 2)])
    assert m.cell.activations == (("hardsigmoid",) + ACTIVATION_DEFAULTS["hardsigmoid"],
                                  ("leakyrelu",) + ACTIVATION_DEFAULTS["leakyrelu"],
                                  ("elu", 2.0, 0.0))
    assert ACTIVATION_DEFAULTS["hardsigmoid"] == (0.2, 0.5)
    assert ACTIVATION_DEFAULTS["leakyrelu"] == (0.01, 0.0)
    assert len(SLOT_NAMES["LSTM"]) == 3 and len(SLOT_NAMES["GRU"]) == 2
    assert not m.cell.plain


@pytest.mark.parametrize("mode,options", [
    ("LSTM", dict(activations=("sigmoid", "tanh", "tanh"))),
    ("LSTM", dict(activations=("Sigmoid", "Tanh", "Tanh"), peephole=True)),
    ("GRU", dict(activations=("sigmoid", "tanh"), reset_after=False)),
    ("RNN", dict(activations=("relu",))),
], ids=["lstm", "lstm_peephole", "gru_reset_before", "rnn_relu"])
def test_the_usual_activations_give_the_plain_cells_numbers(backend, mode, options):
    """activations= naming the mode's usual functions is the plain cell (LSTM, GRU), and
    activations=("relu",) computes what nonlinearity="relu" does."""
    m = _layer(mode, options, 3, 4, backend=backend)
    plain_options = _without(options, "activations")
    if mode == "RNN":
        plain_options["nonlinearity"] = "relu"
    plain = _layer(mode, plain_options, 3, 4, backend=backend)
    if mode != "RNN":      # an RNN's relu through activations= is a cell with options
        assert m.cell.plain and m.cell == plain.cell
    assert m.cell.activations == plain.cell.activations
    rng = _rng("plain", mode)
    x, dy = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 4))
    state = random_state(m, 2, rng)
    assert_all_close(run_layer(m, x, state, dy=dy), run_layer(plain, x, state, dy=dy),
                     np.float64, "activations= vs the plain layer")
