"""ONNX's LSTM, GRU and RNN operators read and written as fastrnn layers, and the few tensor
operators that exporters put around them, evaluated in NumPy.

ONNX layout of one node (D directions, G gate blocks, H hidden size, I input size):

    W (D, G*H, I)   R (D, G*H, H)   B (D, 2*G*H) = [W biases, R biases]   P (D, 3*H)
    gate blocks     LSTM i, o, f, c (fastrnn i, f, g, o);  GRU z, r, h (fastrnn r, z, n)
    peepholes P     i, o, f  (fastrnn's peephole_l{k} rows i, f, o)
    Y (T, D, B, H)  Y_h, Y_c (D, B, H);  layout=1: X (B, T, I), Y (B, T, D, H), Y_h (B, D, H)

GRU ``linear_before_reset=1`` is fastrnn's ``reset_after=True``.
"""
import math
import numbers

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..cells import ACTIVATION_DEFAULTS, DEFAULT_ACTIVATIONS, SLOT_NAMES, activation_slots
from ..layers import GRU, LSTM, RNN

RNN_OPS = ("LSTM", "GRU", "RNN")
LAYER_CLASSES = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}

# position in fastrnn's gate order of each ONNX gate block, and the inverse
ONNX_FROM_OURS = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}
OURS_FROM_ONNX = {op: list(np.argsort(order)) for op, order in ONNX_FROM_OURS.items()}
# ONNX P rows i, o, f <-> our peephole rows i, f, o (the permutation is its own inverse)
PEEPHOLE_ORDER = [0, 2, 1]

# ONNX's spelling of each activation fastrnn computes (fastrnn.cells.ACTIVATIONS, lower case)
ONNX_ACTIVATIONS = {name.lower(): name for name in (
    "Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
    "HardSigmoid", "Elu", "Softsign", "Softplus")}
# The activations that take an alpha (a beta): only these consume an entry of the node's
# activation_alpha (activation_beta) list, in the order of the activations list, both
# directions' one after another (ONNX Runtime's rnn_helpers.cc, NameToArgUsageMap; a list
# aligned with the activations would read other values: tests/test_onnx_io.py checks this
# against ONNX Runtime).
TAKES_ALPHA = ("affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu")
TAKES_BETA = ("affine", "scaledtanh", "hardsigmoid")
# Where ONNX Runtime's default alpha/beta (0.0) is not ONNX's (its operator of that name:
# fastrnn.cells.ACTIVATION_DEFAULTS): load refuses such a parameter left out of the lists.
DISPUTED_DEFAULTS = ("affine", "scaledtanh", "thresholdedrelu")
# what a fastrnn RNN's nonlinearity computes (an RNN with another activation: activations=)
RNN_ACTIVATIONS = ("tanh", "relu")
# The cells (fastrnn.cells) that export writes as ONNX nodes, by name; another is refused by
# name. A cell with options (activations, clip, input_forget: cells.OPTIONS_CODES) has its
# plain cell's name; export checks that the attributes it writes give back a cell that computes
# the same (``computes``).
ONNX_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_peephole", "gru", "gru_reset_before")

FLOAT_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT,
               np.dtype(np.float64): onnx.TensorProto.DOUBLE}


class OnnxModelError(ValueError):
    """A model, node or input that fastrnn cannot represent or that does not follow ONNX."""


def describe(node):
    """How an error names a node: its name if it has one, its op and outputs in any case."""
    name = f"{node.name!r} " if node.name else ""
    return f"node {name}({node.op_type}, outputs {list(node.output)})"


def attributes(node):
    """The node's attributes as Python values, strings decoded."""
    values = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        values[attr.name] = value
    return values


def gate_blocks(w, order):
    """``w`` with its gate blocks (along axis 0) in ``order``."""
    blocks = np.split(np.asarray(w), len(order), axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


# ---------------------------------------------------------------------------------------------
# One node's options

def node_options(node):
    """What an LSTM, GRU or RNN node asks for, checked against what a fastrnn layer computes.

    Returns a dict: op, hidden_size (None when the attribute is absent), direction, num_directions,
    layout, cell (the layer class's keyword options). Attributes fastrnn cannot represent raise
    ``OnnxModelError`` naming the node and the attribute."""
    op = node.op_type
    if op not in RNN_OPS:
        raise OnnxModelError(f"{describe(node)}: expected an LSTM, GRU or RNN node")
    return options_from_attributes(op, attributes(node), describe(node))


def options_from_attributes(op, attrs, where):
    """``node_options`` of an ``op`` node with the attributes ``attrs`` (Python values, as
    ``attributes`` gives them); ``where`` names the node in errors."""
    known = {"hidden_size", "direction", "layout", "activations", "activation_alpha",
             "activation_beta", "clip", "input_forget", "linear_before_reset"}
    if op != "LSTM":
        known.discard("input_forget")
    if op != "GRU":
        known.discard("linear_before_reset")
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise OnnxModelError(f"{where}: attribute {unknown[0]!r} is not one of "
                             f"{op}'s attributes {sorted(known)}")
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise OnnxModelError(f"{where}: attribute 'direction' must be 'forward', "
                             f"'reverse' or 'bidirectional', got {direction!r}")
    num_directions = 2 if direction == "bidirectional" else 1
    layout = attrs.get("layout", 0)
    if layout not in (0, 1):
        raise OnnxModelError(f"{where}: attribute 'layout' must be 0 or 1, got {layout}")
    hidden_size = attrs.get("hidden_size")
    if hidden_size is not None and hidden_size < 1:
        raise OnnxModelError(f"{where}: attribute 'hidden_size' must be >= 1, "
                             f"got {hidden_size}")
    cell = {}
    activations = _activations(op, attrs, num_directions, where)
    if op == "RNN" and activations[0][0] in RNN_ACTIVATIONS:
        cell["nonlinearity"] = activations[0][0]       # rnn_tanh, rnn_relu
    elif activation_slots(op, activations) != DEFAULT_ACTIVATIONS[op]:
        cell["activations"] = activations
    if "clip" in attrs:
        clip = attrs["clip"]
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) \
                or not 0 < clip < math.inf:
            raise OnnxModelError(f"{where}: attribute 'clip' must be a positive finite "
                                 f"number, got {clip!r}")
        cell["clip"] = float(clip)
    if op == "LSTM":
        input_forget = attrs.get("input_forget", 0)
        if input_forget not in (0, 1):
            raise OnnxModelError(f"{where}: attribute 'input_forget' must be 0 or 1, got "
                                 f"{input_forget!r}")
        if input_forget:
            cell["input_forget"] = True
    if op == "GRU":
        reset = attrs.get("linear_before_reset", 0)
        if reset not in (0, 1):
            raise OnnxModelError(f"{where}: attribute 'linear_before_reset' must be "
                                 f"0 or 1, got {reset}")
        cell["reset_after"] = bool(reset)
    return {"op": op, "hidden_size": hidden_size, "direction": direction,
            "num_directions": num_directions, "layout": layout, "cell": cell}


def _activations(op, attrs, D, where):
    """The activations of an ``op`` node with ``D`` directions as a fastrnn layer takes them
    (``activations=``: one entry per slot of ``cells.SLOT_NAMES[op]``, each (name,), (name,
    alpha) or (name, alpha, beta) as the function takes parameters), from the attributes
    activations (slots times directions, forward then reverse), activation_alpha and
    activation_beta (see TAKES_ALPHA). Both directions must have the same ones."""
    slots = SLOT_NAMES[op]
    given = attrs.get("activations")
    if given is None:
        given = [ONNX_ACTIVATIONS[name] for name, _, _ in DEFAULT_ACTIVATIONS[op]] * D
    if len(given) != len(slots) * D:
        per = f" for each of the {D} directions" if D == 2 else ""
        raise OnnxModelError(f"{where}: attribute 'activations' must name {len(slots) * D} "
                             f"functions ({', '.join(slots)}{per}), got {list(given)}")
    lists = {"activation_alpha": list(attrs.get("activation_alpha", [])),
             "activation_beta": list(attrs.get("activation_beta", []))}
    used = {"activation_alpha": 0, "activation_beta": 0}
    resolved = []
    for k, function in enumerate(given):
        name = function.lower()
        slot = slots[k % len(slots)] + ("" if D == 1 else
                                        " of the reverse direction" if k >= len(slots) else
                                        " of the forward direction")
        if name not in ONNX_ACTIVATIONS:
            raise OnnxModelError(f"{where}: attribute 'activations': {function!r} ({slot}) is "
                                 f"not one of ONNX's {', '.join(ONNX_ACTIVATIONS.values())}")
        entry = (name,)
        for i, (key, takes) in enumerate((("activation_alpha", TAKES_ALPHA),
                                          ("activation_beta", TAKES_BETA))):
            if name not in takes:
                continue
            values = lists[key]
            if used[key] < len(values):
                value = values[used[key]]
                used[key] += 1
                if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                        or not math.isfinite(value):
                    raise OnnxModelError(f"{where}: attribute {key!r}: the value for {function}"
                                         f" ({slot}) must be a finite number, got {value!r}")
            elif name in DISPUTED_DEFAULTS:
                raise OnnxModelError(
                    f"{where}: attribute {key!r} has no value for {function} ({slot}), whose "
                    f"default differs between ONNX ({ACTIVATION_DEFAULTS[name][i]}, its "
                    f"operator {function}) and ONNX Runtime (0.0); give it in {key!r}")
            else:
                value = ACTIVATION_DEFAULTS[name][i]
            entry += (float(value),)
        resolved.append(entry)
    for key, values in lists.items():
        if len(values) > used[key]:
            takes = TAKES_ALPHA if key == "activation_alpha" else TAKES_BETA
            raise OnnxModelError(
                f"{where}: attribute {key!r} has {len(values)} values, but the activations "
                f"{list(given)} take {used[key]}: only "
                f"{', '.join(ONNX_ACTIVATIONS[n] for n in takes)} consume one each, in the "
                f"order of the activations")
    forward, reverse = tuple(resolved[:len(slots)]), tuple(resolved[len(slots):])
    if reverse and reverse != forward:
        raise OnnxModelError(f"{where}: attribute 'activations' (with activation_alpha and "
                             f"activation_beta): the forward direction's {_described(forward)} "
                             f"differ from the reverse direction's {_described(reverse)}; a "
                             f"fastrnn layer has one set of activations for both directions")
    return forward


def _described(activations):
    """Activations in ONNX's spelling with their parameters: "[LeakyRelu(0.1), Tanh]"."""
    return "[" + ", ".join(ONNX_ACTIVATIONS[name] + (f"({', '.join(f'{v:g}' for v in params)})"
                                                     if params else "")
                           for name, *params in activations) + "]"


def attributes_from_cell(cell, D):
    """The attributes that make an ONNX node compute ``cell`` (a fastrnn.cells record) in each
    of ``D`` directions: activations (always for an RNN; else when they are not the
    mode's usual ones) with every activation_alpha and activation_beta written out, clip,
    input_forget, as Python values (a model stores the floats in float32)."""
    attrs = {}
    if cell.mode == "RNN" or cell.activations != DEFAULT_ACTIVATIONS[cell.mode]:
        attrs["activations"] = [ONNX_ACTIVATIONS[name] for name, _, _ in cell.activations] * D
        alphas = [alpha for name, alpha, _ in cell.activations if name in TAKES_ALPHA] * D
        betas = [beta for name, _, beta in cell.activations if name in TAKES_BETA] * D
        if alphas:
            attrs["activation_alpha"] = alphas
        if betas:
            attrs["activation_beta"] = betas
    if cell.clip is not None:
        attrs["clip"] = float(cell.clip)
    if cell.input_forget:
        attrs["input_forget"] = 1
    return attrs


def computes(cell):
    """What a cell record computes, without the name and code by which the kernels find its
    step pair (an RNN with ``activations=("relu",)`` and a clip is a copy of rnn_tanh's record
    with options, the same as a copy of rnn_relu's with that clip)."""
    return (cell.mode, cell.gate_names, cell.products, cell.extra_params, cell.activations,
            cell.clip, cell.input_forget)


def check_weights(node, options, W, R, B, P):
    """Shapes of a node's weights: (input_size, hidden_size); errors name node and input."""
    op, D = options["op"], options["num_directions"]
    G = len(ONNX_FROM_OURS[op])
    for name, value, ndim in (("W", W, 3), ("R", R, 3)):
        if value is None:
            raise OnnxModelError(f"{describe(node)}: input {name} is required")
        if value.ndim != ndim or value.shape[0] != D:
            raise OnnxModelError(f"{describe(node)}: input {name} must have shape "
                                 f"({D}, {G}*hidden_size, ...) for direction "
                                 f"{options['direction']!r}, got {value.shape}")
    H = R.shape[2]
    if options["hidden_size"] is not None and options["hidden_size"] != H:
        raise OnnxModelError(f"{describe(node)}: attribute 'hidden_size' is "
                             f"{options['hidden_size']} but input R has shape {R.shape}")
    I = W.shape[2]
    expected = {"W": (D, G * H, I), "R": (D, G * H, H), "B": (D, 2 * G * H), "P": (D, 3 * H)}
    for name, value in (("W", W), ("R", R), ("B", B), ("P", P)):
        if value is not None and value.shape != expected[name]:
            raise OnnxModelError(f"{describe(node)}: input {name} must have shape "
                                 f"{expected[name]} (hidden_size {H}), got {value.shape}")
    for name, value in (("W", W), ("R", R), ("B", B), ("P", P)):
        if value is not None and value.dtype.kind != "f":
            raise OnnxModelError(f"{describe(node)}: input {name} must be floating-point, "
                                 f"got {value.dtype}")
    return I, H


def params_from_onnx(op, W, R, B, P, layer, directions):
    """fastrnn parameters of layer ``layer`` from one node's weights. ``directions`` maps our
    direction (0 forward, 1 reverse) to the ONNX direction index it takes."""
    order = OURS_FROM_ONNX[op]
    GH = W.shape[1]
    params = {}
    for ours, theirs in directions.items():
        suffix = f"_l{layer}" + ("_reverse" if ours else "")
        params["weight_ih" + suffix] = gate_blocks(W[theirs], order)
        params["weight_hh" + suffix] = gate_blocks(R[theirs], order)
        if B is not None:
            params["bias_ih" + suffix] = gate_blocks(B[theirs, :GH], order)
            params["bias_hh" + suffix] = gate_blocks(B[theirs, GH:], order)
        if P is not None:
            params["peephole" + suffix] = P[theirs].reshape(3, -1)[PEEPHOLE_ORDER]
    return params


def onnx_from_params(layer, k):
    """W, R, B (None without bias) and P (None without peepholes) of layer ``k`` of a fastrnn
    layer, in ONNX's layout."""
    op = layer.mode
    order = ONNX_FROM_OURS[op]
    suffixes = [f"_l{k}", f"_l{k}_reverse"][:layer.num_directions]
    p = layer.params
    W = np.stack([gate_blocks(p["weight_ih" + s], order) for s in suffixes])
    R = np.stack([gate_blocks(p["weight_hh" + s], order) for s in suffixes])
    B = P = None
    if layer.bias:
        B = np.stack([np.concatenate([gate_blocks(p["bias_ih" + s], order),
                                      gate_blocks(p["bias_hh" + s], order)])
                      for s in suffixes])
    if getattr(layer, "peephole", False):
        P = np.stack([p["peephole" + s][PEEPHOLE_ORDER].reshape(-1) for s in suffixes])
    return W, R, B, P


# ---------------------------------------------------------------------------------------------
# Running one node

def run_rnn_node(node, inputs, backend="reference"):
    """Outputs (Y, Y_h[, Y_c]) of an LSTM, GRU or RNN node on input arrays given by ONNX's input
    names (X, W, R, B, sequence_lens, initial_h, initial_c, P; None or absent: not given), by a
    one-layer fastrnn layer of ``backend``.

    direction="reverse" runs a bidirectional layer whose forward half has zero weights and
    returns its reverse half (fastrnn has no reverse-only layer; it costs the forward half)."""
    options = node_options(node)
    op, D, layout = options["op"], options["num_directions"], options["layout"]
    X = inputs.get("X")
    if X is None:
        raise OnnxModelError(f"{describe(node)}: input X is required")
    X = np.asarray(X)
    if X.dtype not in FLOAT_TYPES:
        raise OnnxModelError(f"{describe(node)}: input X must be float32 or float64, "
                             f"got {X.dtype}")
    if X.ndim != 3:
        raise OnnxModelError(f"{describe(node)}: input X must have 3 dimensions "
                             f"({'(batch, seq, input)' if layout else '(seq, batch, input)'}), "
                             f"got shape {X.shape}")
    W, R, B, P = (None if inputs.get(n) is None else np.asarray(inputs[n])
                  for n in ("W", "R", "B", "P"))
    I, H = check_weights(node, options, W, R, B, P)
    T, Bsz = (X.shape[1], X.shape[0]) if layout else X.shape[:2]
    if X.shape[2] != I:
        raise OnnxModelError(f"{describe(node)}: input X has {X.shape[2]} features, input W "
                             f"{I}")
    reverse_only = options["direction"] == "reverse"
    layer_directions = 2 if reverse_only else D
    m = LAYER_CLASSES[op](I, H, 1, bidirectional=layer_directions == 2, bias=B is not None,
                          batch_first=bool(layout), dtype=X.dtype, backend=backend,
                          **options["cell"], **({"peephole": True} if P is not None else {}))
    directions = {1: 0} if reverse_only else {d: d for d in range(D)}
    params = params_from_onnx(op, W, R, B, P, 0, directions)
    if reverse_only:
        for name in m.params:
            params.setdefault(name, np.zeros_like(m.params[name]))
    m.load_state_dict(params)

    lengths = inputs.get("sequence_lens")
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (Bsz,) or lengths.dtype.kind not in "iu":
            raise OnnxModelError(f"{describe(node)}: input sequence_lens must be ({Bsz},) "
                                 f"integers, got {lengths.dtype} {lengths.shape}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > T):
            raise OnnxModelError(f"{describe(node)}: input sequence_lens must lie in "
                                 f"[0, {T}], got {lengths.tolist()}")
    state_names = ("initial_h", "initial_c") if op == "LSTM" else ("initial_h",)
    state_shape = (Bsz, D, H) if layout else (D, Bsz, H)
    parts = []
    for name in state_names:
        value = inputs.get(name)
        if value is None:
            value = np.zeros(state_shape, X.dtype)
        value = np.asarray(value)
        if value.shape != state_shape:
            raise OnnxModelError(f"{describe(node)}: input {name} must have shape "
                                 f"{state_shape}, got {value.shape}")
        value = value.transpose(1, 0, 2) if layout else value     # (D, B, H)
        if reverse_only:
            value = np.concatenate([np.zeros_like(value), value])
        parts.append(value)
    state = tuple(parts) if op == "LSTM" else parts[0]

    y, final = m(X, state, lengths)              # (T, B, D'*H) or (B, T, D'*H)
    finals = list(final) if op == "LSTM" else [final]
    keep = slice(1, 2) if reverse_only else slice(0, D)
    y = y.reshape(y.shape[:2] + (-1, H))[:, :, keep]     # (T, B, D, H) or (B, T, D, H)
    Y = y if layout else y.transpose(0, 2, 1, 3)
    states = [s[keep].transpose(1, 0, 2) if layout else s[keep] for s in finals]
    return [np.ascontiguousarray(a) for a in [Y] + states]


# ---------------------------------------------------------------------------------------------
# The tensor operators around the recurrent nodes, in NumPy (both for constant folding in
# ``load`` and for running a graph in the backend)

def _axes(node, values, attrs, position):
    """The ``axes`` of Squeeze/Unsqueeze/Slice: an input from opset 13 (10 for Slice), an
    attribute before."""
    if len(node.input) > position and node.input[position]:
        return [int(a) for a in values[position]]
    return attrs.get("axes")


def _constant(node, values, attrs):
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in attrs:
            return np.array(attrs[name], dtype=dtype)
    raise OnnxModelError(f"{describe(node)}: only tensor, float and int values are supported, "
                         f"got attributes {sorted(attrs)}")


def _squeeze(node, values, attrs):
    x = values[0]
    axes = _axes(node, values, attrs, 1)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _unsqueeze(node, values, attrs):
    x = values[0]
    new_axes = _axes(node, values, attrs, 1)
    ndim = x.ndim + len(new_axes)
    for a in sorted(a % ndim for a in new_axes):
        x = np.expand_dims(x, a)
    return x


def _reshape(node, values, attrs):
    x, shape = values[0], [int(s) for s in values[1]]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(node, values, attrs):
    x = values[0]
    if len(node.input) > 1:       # opset >= 10: starts, ends, axes, steps are inputs
        starts, ends = values[1], values[2]
        axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
        steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    else:
        starts, ends = attrs["starts"], attrs["ends"]
        axes = attrs.get("axes", range(len(starts)))
        steps = [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


def _shape(node, values, attrs):
    shape = np.array(values[0].shape, dtype=np.int64)
    return shape[attrs.get("start", 0):attrs.get("end", None)]


def _constant_of_shape(node, values, attrs):
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs \
        else np.zeros(1, np.float32)
    return np.full([int(s) for s in values[0]], value.reshape(-1)[0], dtype=value.dtype)


def _cast(node, values, attrs):
    return values[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))


TENSOR_OPS = {
    "Constant": _constant,
    "Identity": lambda node, values, attrs: values[0],
    "Cast": _cast,
    "Transpose": lambda node, values, attrs: np.transpose(values[0], attrs.get("perm")),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Concat": lambda node, values, attrs: np.concatenate(values, axis=attrs["axis"]),
    "Slice": _slice,
    "Gather": lambda node, values, attrs: np.take(values[0], values[1], axis=attrs.get("axis", 0)),
    "Shape": _shape,
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda node, values, attrs: np.array(np.broadcast_to(
        values[0], np.broadcast_shapes(values[0].shape, tuple(int(s) for s in values[1])))),
}


def run_tensor_op(node, values):
    """Outputs of one of the TENSOR_OPS on its input arrays (None for an absent input)."""
    try:
        return [TENSOR_OPS[node.op_type](node, values, attributes(node))]
    except OnnxModelError:
        raise
    except Exception as err:      # a malformed node: say which
        raise OnnxModelError(f"{describe(node)}: cannot be evaluated on inputs of shapes "
                             f"{[None if v is None else v.shape for v in values]}: "
                             f"{err}") from err
