"""fastrnn layers to and from ONNX (needs the ``onnx`` package: ``pip install "fastrnn[onnx]"``).

    fastrnn.onnx.export(layer, "model.onnx")      # one LSTM/GRU/RNN node per layer
    layer = fastrnn.onnx.load("model.onnx")       # the inverse, also of torch.onnx.export
    fastrnn.onnx.backend                          # ONNX's Backend interface (prepare, run_node)

An exported model has the inputs ``x`` ((T, B, I), or (B, T, I) with batch_first),
``lengths`` ((B,) int32, ONNX's sequence_lens), ``h0`` (and ``c0`` for an LSTM), (L*D, B, H)
as the layer takes them, and the outputs ``y``, ``h_n`` (and ``c_n``), as the layer returns
them; ``lengths=False`` and ``initial_state=False`` leave those inputs out.

A layer's options beyond the usual cell (``activations``, ``clip``, ``input_forget``, and
Keras's ``activation``/``recurrent_activation``, which are activations) are the nodes'
attributes of those names. ONNX's ``activation_alpha`` and ``activation_beta`` hold a value
only for each activation that takes one (alpha: Affine, LeakyRelu, ThresholdedRelu,
ScaledTanh, HardSigmoid, Elu; beta: Affine, ScaledTanh, HardSigmoid), in the order of the
``activations`` list, which a bidirectional node has twice (forward, then reverse): ONNX
Runtime reads them so, and export writes them so, every value written out.
"""
try:
    import onnx
except ImportError as err:       # the optional dependency: say how to get it
    raise ImportError("fastrnn.onnx needs the onnx package, which is optional: "
                      "pip install 'fastrnn[onnx]' (or pip install onnx)") from err

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..layers import GRU, LSTM, RNN
from ._nodes import (FLOAT_TYPES, LAYER_CLASSES, ONNX_CELLS, RNN_OPS, TENSOR_OPS, OnnxModelError,
                     attributes, attributes_from_cell, check_weights, computes, describe,
                     node_options, onnx_from_params, options_from_attributes, params_from_onnx,
                     run_tensor_op)

__all__ = ["export", "load", "OnnxModelError", "OPSET"]

OPSET = 14          # LSTM/GRU/RNN as of opset 14 (the layout attribute); ONNX Runtime >= 1.8
IR_VERSION = 8      # readable by every ONNX Runtime that runs opset 14


# ---------------------------------------------------------------------------------------------
# export

def export(layer, path_or_file=None, *, batch_first=None, lengths=True, initial_state=True):
    """Write ``layer`` (a fastrnn ``LSTM``, ``GRU`` or ``RNN``) as an ONNX model, one ONNX node
    per layer with a Transpose and a Reshape between layers (ONNX's ``Y`` is (T, D, B, H); the
    next layer takes (T, B, D*H)); return the ``onnx.ModelProto``.

    path_or_file: a path or a binary file to write to, or None to only return the model.
    batch_first: the layout of ``x`` and ``y`` in the model; None: the layer's own.
    lengths, initial_state: whether the model takes ``lengths`` and ``h0``/``c0`` as inputs
    (without them, every sequence has all T steps and the states start from zeros).
    Dropout, a training-time option, is not part of the model. One difference remains: for a
    sequence of length 0, ONNX Runtime returns zero final states where the layer returns the
    initial state it was given (y is zero in both). The cell's options are node attributes,
    which ONNX stores in float32: a float64 layer's clip and activation parameters (such as
    Keras's hard_sigmoid slope 1/6) are rounded to float32 in the model.
    """
    if not isinstance(layer, (LSTM, GRU, RNN)):
        raise TypeError(f"layer: expected a fastrnn LSTM, GRU or RNN, got "
                        f"{type(layer).__name__}")
    if layer.cell.name not in ONNX_CELLS:
        raise ValueError(f"layer: its cell {layer.cell.name!r} has no ONNX form here (export "
                         f"writes {', '.join(ONNX_CELLS)})")
    if layer.quantized:
        raise ValueError(f"layer: quantized={layer.quantized!r} (fastrnn.quantize) has no ONNX "
                         f"form here; export the float32 layer (onnxruntime.quantization's "
                         f"quantize_dynamic quantizes the model)")
    if layer.cell.layer_norm:
        raise ValueError("layer: layer_norm=True has no ONNX form (ONNX's LSTM and GRU "
                         "operators have no normalization)")
    if any(layer._zoneout_rates):
        raise ValueError(f"layer: zoneout={layer.zoneout} has no ONNX form (its inference mixes "
                         f"each state with the one before, which ONNX's operators do not)")
    if getattr(layer, "proj_size", 0):
        raise ValueError(f"layer: proj_size={layer.proj_size} has no ONNX form (ONNX's LSTM "
                         f"operator has no projection)")
    if layer.merge != "concat":
        raise ValueError(f"layer: merge={layer.merge!r} has no ONNX form here (an ONNX node's "
                         f"output keeps both directions); export a layer with merge='concat'")
    batch_first = layer.batch_first if batch_first is None else bool(batch_first)
    op, L, D, H = layer.mode, layer.num_layers, layer.num_directions, layer.hidden_size
    attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if op == "GRU":
        attrs["linear_before_reset"] = int(layer.reset_after)
    attrs.update(attributes_from_cell(layer.cell, D))
    # the layer these attributes load as must compute what this one does: a cell with options
    # has its plain cell's name, so the name alone does not say
    cell_options = options_from_attributes(op, attrs, "export")["cell"]
    if getattr(layer, "peephole", False):
        cell_options["peephole"] = True
    if computes(LAYER_CLASSES[op](1, 1, backend="reference", **cell_options).cell) \
            != computes(layer.cell):
        raise ValueError(f"layer: its cell {layer.cell.name!r} with activations "
                         f"{layer.cell.activations}, clip {layer.cell.clip} and input_forget "
                         f"{layer.cell.input_forget} has no ONNX form here (the attributes "
                         f"{attrs} compute another)")
    elem = FLOAT_TYPES[layer.dtype]
    nodes, initializers = [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    seq_dims = ["batch", "seq"] if batch_first else ["seq", "batch"]
    state_dims = [L * D, "batch", H]
    inputs = [helper.make_tensor_value_info("x", elem, seq_dims + [layer.input_size])]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    state_in = ["h0", "c0"] if op == "LSTM" else ["h0"]
    state_out = ["h_n", "c_n"] if op == "LSTM" else ["h_n"]
    if initial_state:
        inputs += [helper.make_tensor_value_info(name, elem, state_dims) for name in state_in]
    outputs = [helper.make_tensor_value_info("y", elem, seq_dims + [D * H])]
    outputs += [helper.make_tensor_value_info(name, elem, state_dims) for name in state_out]

    layer_input = "x"
    if batch_first:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_time_major"], perm=[1, 0, 2]))
        layer_input = "x_time_major"
    final_states = [[] for _ in state_out]
    for k in range(L):
        W, R, B, P = onnx_from_params(layer, k)
        node_inputs = [layer_input, constant(f"W_l{k}", W), constant(f"R_l{k}", R),
                       "" if B is None else constant(f"B_l{k}", B),
                       "lengths" if lengths else ""]
        for name in state_in:
            if not initial_state:
                node_inputs.append("")
            elif L == 1:
                node_inputs.append(name)
            else:           # rows k*D .. (k+1)*D of the (L*D, B, H) state
                rows = f"{name}_l{k}"
                nodes.append(helper.make_node(
                    "Slice", [name, constant(f"{rows}_start", [k * D]),
                              constant(f"{rows}_end", [(k + 1) * D]),
                              constant(f"{rows}_axis", [0])], [rows]))
                node_inputs.append(rows)
        if P is not None:
            node_inputs.append(constant(f"P_l{k}", P))
        while node_inputs[-1] == "":
            node_inputs.pop()
        node_outputs = [f"Y_l{k}"] + [f"{name}_l{k}" if L > 1 else name for name in state_out]
        nodes.append(helper.make_node(op, node_inputs, node_outputs, name=f"{op}_l{k}", **attrs))
        for collected, name in zip(final_states, node_outputs[1:]):
            collected.append(name)
        # (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H), the next layer's input
        last = k == L - 1
        layer_output = "y" if last and not batch_first else f"y_l{k}"
        nodes.append(helper.make_node("Transpose", [f"Y_l{k}"], [f"Y_l{k}_tbdh"],
                                      perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Y_l{k}_tbdh", constant(
            f"Y_l{k}_shape", np.array([0, 0, -1], np.int64))], [layer_output]))
        layer_input = layer_output
    if batch_first:
        nodes.append(helper.make_node("Transpose", [layer_input], ["y"], perm=[1, 0, 2]))
    if L > 1:
        for name, collected in zip(state_out, final_states):
            nodes.append(helper.make_node("Concat", collected, [name], axis=0))

    graph = helper.make_graph(nodes, f"fastrnn_{op.lower()}", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fastrnn")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    if path_or_file is not None:
        onnx.save_model(model, path_or_file)
    return model


# ---------------------------------------------------------------------------------------------
# load

# operators that only move a tensor's axes around on the path between recurrent nodes
_LAYOUT_OPS = ("Identity", "Transpose", "Squeeze", "Reshape")
# operators through which an all-zero initial state stays all zeros
_ZERO_PRESERVING_OPS = ("Identity", "Cast", "Slice", "Expand", "Reshape", "Squeeze", "Unsqueeze",
                        "Transpose")


class _Graph:
    """What ``load`` needs to know of a graph: producers, constants, graph inputs."""

    def __init__(self, model):
        graph = model.graph
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        # the graph inputs' static sizes (None where a dimension is symbolic or unknown)
        self.input_dims = {i.name: [d.dim_value if d.HasField("dim_value") else None
                                    for d in i.type.tensor_type.shape.dim]
                           for i in graph.input}
        self.outputs = [o.name for o in graph.output]
        self.producer = {name: node for node in graph.node for name in node.output if name}
        self._constants = {}

    def where(self, name):
        """How an error names where a value comes from."""
        if name in self.inputs:
            return f"graph input {name!r}"
        if name in self.producer:
            return f"output {name!r} of {describe(self.producer[name])}"
        return f"{name!r}"

    def constant(self, name):
        """The value of ``name`` if it is a constant (an initializer, or computed by tensor
        operators from constants only), else None."""
        if name in self._constants:
            return self._constants[name]
        value = self.initializers.get(name)
        node = self.producer.get(name)
        if value is None and node is not None and node.op_type in TENSOR_OPS \
                and node.op_type != "Shape":
            args = [self.constant(i) if i else None for i in node.input]
            if all(a is not None for a, i in zip(args, node.input) if i):
                value = run_tensor_op(node, args)[0]
        self._constants[name] = value
        return value

    def is_zero(self, name):
        """Whether ``name`` is all zeros whatever the inputs (an initial state exporters make
        with ConstantOfShape of the batch size, for instance)."""
        value = self.constant(name)
        if value is not None:
            return not np.any(value)
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            attrs = node.attribute
            return not attrs or not np.any(numpy_helper.to_array(attrs[0].t))
        return node.op_type in _ZERO_PRESERVING_OPS and self.is_zero(node.input[0])

    def trace(self, name, ops):
        """Follow ``name`` back through operators in ``ops`` (their first input); the name it
        starts from and the operators on the way, first one first."""
        chain = []
        while name in self.producer and self.producer[name].op_type in ops:
            node = self.producer[name]
            chain.append(node)
            name = node.input[0]
        return name, chain[::-1]


def _apply_layout(graph, chain, axes, sizes, what):
    """The axes of a tensor after the layout operators ``chain``; ``axes`` name the axes of the
    tensor they start from ("T", "B", "D", "H", "F", "DH"), ``sizes`` the known sizes (of D, H,
    F, DH). Only what keeps the sequence intact is accepted: transposes, squeezing a D of 1,
    merging D and H into DH."""
    axes = list(axes)
    for node in chain:
        attrs = attributes(node)
        if node.op_type == "Identity":
            continue
        if node.op_type == "Transpose":
            perm = attrs.get("perm", list(range(len(axes)))[::-1])
            if sorted(perm) != list(range(len(axes))):
                raise OnnxModelError(f"load: {describe(node)} on {what}: attribute 'perm' "
                                     f"{perm} does not fit a tensor of {len(axes)} axes")
            axes = [axes[p] for p in perm]
        elif node.op_type == "Squeeze":
            squeeze = attrs.get("axes")
            if len(node.input) > 1 and node.input[1]:
                squeeze = graph.constant(node.input[1])
            if squeeze is None:
                raise OnnxModelError(f"load: {describe(node)} on {what}: Squeeze needs constant "
                                     f"axes")
            squeeze = sorted(int(a) % len(axes) for a in np.ravel(squeeze))
            if any(axes[a] != "D" or sizes["D"] != 1 for a in squeeze):
                raise OnnxModelError(f"load: {describe(node)} on {what}: squeezes axes "
                                     f"{[axes[a] for a in squeeze]}; only a direction axis of "
                                     f"size 1 can go")
            axes = [name for a, name in enumerate(axes) if a not in squeeze]
        else:   # Reshape: only the merge of the directions and the hidden units
            shape = _reshape_target(graph, node, axes, what)
            allowzero = attributes(node).get("allowzero", 0)
            merged = None
            if "D" in axes and axes.index("D") + 1 < len(axes) \
                    and axes[axes.index("D") + 1] == "H":
                d = axes.index("D")
                merged = axes[:d] + ["DH"] + axes[d + 2:]
            result = None
            for candidate in ([merged] if merged else []) + [axes]:
                if len(shape) != len(candidate) or shape.count(-1) > 1:
                    continue
                fits = True
                for i, s in enumerate(shape):
                    if s == 0 and not allowzero:
                        fits &= i < len(axes) and axes[i] == candidate[i]
                    elif s != -1:
                        fits &= _size(s, sizes) == _size((candidate[i],), sizes)
                if fits:
                    result = candidate
                    break
            if result is None:
                raise OnnxModelError(f"load: {describe(node)} on {what}: shape "
                                     f"{_shape_text(shape)} does not keep the (time, batch, "
                                     f"features) layout of a tensor with axes {axes}")
            axes = result
    return axes


# A Reshape's target shape, when it is computed from the shape of the tensor it reshapes
# (torch.onnx.export's dynamo exporter with dynamic sizes), is followed symbolically: each
# entry an int (0 and -1 keep their Reshape meanings) or a tuple of factors (axis names, ints)
# whose product it is.

def _reshape_target(graph, node, axes, what):
    try:
        return _symbolic_vector(graph, node.input[1], node.input[0], axes)
    except _NotSymbolic as err:
        raise OnnxModelError(f"load: {describe(node)} on {what}: its shape is neither a "
                             f"constant nor computed from the shape of its input ({err})") \
            from None


class _NotSymbolic(Exception):
    pass


def _symbolic_vector(graph, name, data, axes):
    """The 1-D int tensor ``name`` as a list of entries (see above), where Shape(``data``)
    gives one factor per axis name in ``axes``."""
    value = graph.constant(name)
    if value is not None:
        return [int(v) for v in np.ravel(value)]
    node = graph.producer.get(name)
    if node is None:
        raise _NotSymbolic(graph.where(name))
    op, attrs = node.op_type, attributes(node)

    def operand(i):
        return _symbolic_vector(graph, node.input[i], data, axes)

    def constant_ints(i):
        value = graph.constant(node.input[i]) if len(node.input) > i and node.input[i] else None
        return None if value is None else [int(v) for v in np.ravel(value)]

    if op == "Shape" and node.input[0] == data:
        return [(a,) for a in axes][attrs.get("start", 0):attrs.get("end")]
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):   # scalar <-> [x]
        return operand(0)
    if op == "Concat":
        return [entry for i in range(len(node.input)) for entry in operand(i)]
    if op == "Gather" and constant_ints(1) is not None:
        vector = operand(0)
        return [vector[i] for i in constant_ints(1)]
    if op == "Slice" and constant_ints(1) is not None and constant_ints(2) is not None \
            and constant_ints(3) in (None, [0]) and constant_ints(4) in (None, [1]):
        return operand(0)[constant_ints(1)[0]:constant_ints(2)[0]]
    if op == "Mul":
        a, b = operand(0), operand(1)
        if len(a) == len(b) == 1 and all(isinstance(e, tuple) or e > 0 for e in a + b):
            factors = [f for e in a + b for f in (e if isinstance(e, tuple) else (e,))]
            return [tuple(factors)]
    raise _NotSymbolic(describe(node))


def _size(entry, sizes):
    """A Reshape entry (a positive int or a tuple of factors) as (known product, unknown axis
    names), so that 8, ("DH",) and ("D", "H") compare equal when D*H is 8."""
    known, unknown = 1, []
    for factor in entry if isinstance(entry, tuple) else (entry,):
        if isinstance(factor, (int, np.integer)):
            known *= int(factor)
        elif sizes.get(factor) is not None:
            known *= sizes[factor]
        else:
            unknown.append(factor)
    return known, tuple(sorted(unknown))


def _shape_text(shape):
    return "[" + ", ".join("*".join(map(str, e)) if isinstance(e, tuple) else str(e)
                           for e in shape) + "]"


def _features(axes, sizes):
    """Whether the last axis holds a layer's output features: DH, or H when D is 1."""
    return axes[-1] == "DH" or (axes[-1] == "H" and sizes["D"] == 1 and "D" not in axes)


def load(path_or_model, *, dtype=None, backend="auto"):
    """The fastrnn layer that computes an ONNX model (a ModelProto, its bytes, a path or a
    binary file) made of LSTM, GRU or RNN nodes stacked one on another (as ``export`` writes
    them, and as ``torch.onnx.export`` writes an ``nn.LSTM`` or ``nn.GRU``, and an ``nn.RNN``
    with ``dynamo=False``), with its weights.

    The graph's sequence input (and its layout: ``batch_first``), the optional
    ``sequence_lens``, the initial states (a graph input sliced per layer, or zeros), and the
    outputs (the last layer's output sequence, the final states concatenated over layers) must
    be wired as a fastrnn layer has them; anything else (another operator on the way, an
    attribute fastrnn cannot represent, weights that are not constants) raises
    ``OnnxModelError`` naming the node and the attribute or input.

    The attributes activations, activation_alpha, activation_beta, clip and input_forget
    become the layer's options of those names. Refused among them: a bidirectional node whose
    two directions' activations (or their parameters) differ, since a layer has one set for
    both; alpha/beta lists with more values than the activations take; and Affine, ScaledTanh
    or ThresholdedRelu without their parameters, whose defaults differ between ONNX (its
    operators': fastrnn.cells.ACTIVATION_DEFAULTS) and ONNX Runtime (0.0). Other parameters
    left out take ONNX's defaults (LeakyRelu 0.01, HardSigmoid 0.2 and 0.5, Elu 1.0).

    dtype: the layer's dtype; None: the model's (float32 or float64).
    """
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    elif isinstance(path_or_model, (bytes, bytearray)):
        model = onnx.load_model_from_string(bytes(path_or_model))
    else:
        model = onnx.load(path_or_model)
    graph = _Graph(model)
    recurrent = [n for n in model.graph.node if n.op_type in RNN_OPS]
    if not recurrent:
        raise OnnxModelError(f"load: the graph has no LSTM, GRU or RNN node (its operators: "
                             f"{sorted({n.op_type for n in model.graph.node})})")
    op = recurrent[0].op_type
    for node in recurrent:
        if node.op_type != op:
            raise OnnxModelError(f"load: {describe(node)}: a stack of {op} nodes cannot hold "
                                 f"a {node.op_type} node")
    options = [node_options(n) for n in recurrent]
    for node, opts in zip(recurrent, options):
        if opts["layout"] != 0:
            raise OnnxModelError(f"load: {describe(node)}: attribute 'layout'=1 is not "
                                 f"supported by load (the states would be batch-major); "
                                 f"fastrnn.onnx.backend runs it")
        if opts["direction"] == "reverse":
            raise OnnxModelError(f"load: {describe(node)}: attribute 'direction'='reverse' "
                                 f"has no fastrnn layer (a reverse direction comes with a "
                                 f"forward one: 'bidirectional')")
        for key in ("direction", "cell"):
            if opts[key] != options[0][key]:
                raise OnnxModelError(f"load: {describe(node)}: {key} {opts[key]} differs "
                                     f"from the first layer's {options[0][key]}")

    # the stack: layer 0 reads a graph input, layer k the output of layer k-1
    order = []
    by_y = {n.output[0]: n for n in recurrent if n.output and n.output[0]}
    sources = {id(node): graph.trace(node.input[0], _LAYOUT_OPS) for node in recurrent}
    for node in recurrent:
        start, _ = sources[id(node)]
        if start in graph.inputs:
            if order:
                raise OnnxModelError(f"load: {describe(node)} and {describe(order[0])} both read "
                                     f"graph inputs: not one stack of layers")
            order.append(node)
        elif start not in by_y:
            raise OnnxModelError(f"load: {describe(node)}: its input X comes from "
                                 f"{graph.where(start)}, not from a graph input or the output "
                                 f"Y of a layer below")
    if not order:
        raise OnnxModelError(f"load: no {op} node reads a graph input")
    consumers = {}
    for node in recurrent:
        start, _ = sources[id(node)]
        if start in by_y:
            if start in consumers:
                raise OnnxModelError(f"load: {describe(node)} and {describe(consumers[start])} "
                                     f"both read the output of {describe(by_y[start])}")
            consumers[start] = node
    while order[-1].output and order[-1].output[0] in consumers:
        order.append(consumers[order[-1].output[0]])
    if len(order) != len(recurrent):
        stray = next(n for n in recurrent if n not in order)
        raise OnnxModelError(f"load: {describe(stray)} is not part of the stack that starts at "
                             f"{describe(order[0])}")

    # the weights
    D = options[0]["num_directions"]
    weights = []
    for k, node in enumerate(order):
        names = dict(zip(("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
                         node.input))
        values = {}
        for key in ("W", "R", "B", "P"):
            name = names.get(key, "")
            if not name:
                values[key] = None
                continue
            values[key] = graph.constant(name)
            if values[key] is None:
                raise OnnxModelError(f"load: {describe(node)}: input {key} ({graph.where(name)})"
                                     f" is not a constant; load takes weights stored in the "
                                     f"model")
        opts = dict(options[recurrent.index(node)])
        I, H = check_weights(node, opts, values["W"], values["R"], values["B"], values["P"])
        weights.append((node, names, values, I, H))
    H = weights[0][4]
    for node, names, values, I, H_k in weights[1:]:
        if H_k != H or I != D * H:
            raise OnnxModelError(f"load: {describe(node)}: input W has shape "
                                 f"{values['W'].shape}; a layer above one of hidden size {H} "
                                 f"and {D} direction(s) needs ({D}, *, {D * H}) and hidden "
                                 f"size {H}")
    sizes = {"D": D, "H": H, "DH": D * H}

    # the sequence's path: graph input -> layer 0, layer k -> layer k+1, last layer -> output
    start, chain = sources[id(order[0])]
    static = (graph.input_dims.get(start) or []) + [None, None]
    sizes_in = dict(sizes, F=weights[0][3], a0=static[0], a1=static[1])
    axes = _apply_layout(graph, chain, ["a0", "a1", "F"], sizes_in, f"graph input {start!r}")
    if axes not in (["a0", "a1", "F"], ["a1", "a0", "F"]):
        raise OnnxModelError(f"load: the graph input {start!r} reaches {describe(order[0])} "
                             f"with its axes in the order {axes}; expected the features last")
    batch_first = axes[0] == "a1"
    # a graph exported for one batch size or length may reshape with those sizes
    sizes["T"], sizes["B"] = (static[1], static[0]) if batch_first else (static[0], static[1])
    for k, node in enumerate(order[1:], start=1):
        _, chain = sources[id(node)]
        axes = _apply_layout(graph, chain, ["T", "D", "B", "H"], sizes,
                             f"the output of layer {k - 1}")
        if axes[:2] != ["T", "B"] or len(axes) != 3 or not _features(axes, sizes):
            raise OnnxModelError(f"load: the output Y of {describe(order[k - 1])} reaches "
                                 f"{describe(node)} with axes {axes}; expected (time, batch, "
                                 f"directions*hidden)")

    # lengths and initial states: the same source for every layer
    def common(key, classify):
        found = {classify(k, names.get(key, "")) for k, (_, names, _, _, _) in
                 enumerate(weights)}
        if len(found) > 1:
            raise OnnxModelError(f"load: the layers' inputs {key} come from different places "
                                 f"{sorted(map(str, found))}; a fastrnn layer takes one for all "
                                 f"layers")
        return found.pop()

    def lengths_source(k, name):
        if not name:
            return None
        start, _ = graph.trace(name, ("Identity", "Cast"))
        if start not in graph.inputs:
            raise OnnxModelError(f"load: {describe(weights[k][0])}: input sequence_lens comes "
                                 f"from {graph.where(start)}, not from a graph input")
        return start

    def state_source(k, name):
        if not name or graph.is_zero(name):
            return None
        node = graph.producer.get(name)
        rows = (0, D) if len(order) == 1 else None
        if node is not None and node.op_type == "Slice":
            name, rows = node.input[0], _state_rows(graph, node)
        if name not in graph.inputs or rows != (k * D, (k + 1) * D):
            raise OnnxModelError(f"load: {describe(weights[k][0])}: an initial state comes from "
                                 f"{graph.where(name)}, rows {rows}; expected rows "
                                 f"{k * D}..{(k + 1) * D - 1} of a graph input of shape "
                                 f"({len(order) * D}, batch, {H}), or zeros")
        return name

    common("sequence_lens", lengths_source)
    common("initial_h", state_source)
    if op == "LSTM":
        common("initial_c", state_source)

    # outputs: y, and the final states
    for name in graph.outputs:
        _check_output(graph, name, order, sizes, batch_first)

    first = weights[0]
    layer_dtype = dtype or first[2]["W"].dtype
    m = LAYER_CLASSES[op](
        first[3], H, len(order), bidirectional=D == 2, batch_first=batch_first,
        bias=any(v["B"] is not None for _, _, v, _, _ in weights), dtype=layer_dtype,
        backend=backend, **options[0]["cell"],
        **({"peephole": True} if any(v["P"] is not None for _, _, v, _, _ in weights) else {}))
    params = {name: np.zeros_like(p) for name, p in m.params.items()}
    for k, (node, names, values, _, _) in enumerate(weights):
        params.update(params_from_onnx(op, values["W"], values["R"], values["B"], values["P"],
                                       k, {d: d for d in range(D)}))
    m.load_state_dict(params)
    return m


def _state_rows(graph, node):
    """(start, end) rows along axis 0 that a Slice node takes, or None if it is not that."""
    values = [graph.constant(i) if i else None for i in node.input[1:]]
    if len(values) < 2 or values[0] is None or values[1] is None:
        return None
    starts, ends = np.ravel(values[0]), np.ravel(values[1])
    axes = np.ravel(values[2]) if len(values) > 2 and values[2] is not None else [0]
    steps = np.ravel(values[3]) if len(values) > 3 and values[3] is not None else [1]
    if len(starts) != 1 or list(axes) != [0] or list(steps) != [1]:
        return None
    return int(starts[0]), int(ends[0])


def _check_output(graph, name, order, sizes, batch_first):
    """A graph output must be the layer's y or a final state; else the model is not a layer."""
    L = len(order)
    start, chain = graph.trace(name, _LAYOUT_OPS)
    last = order[-1]
    if start == last.output[0]:
        axes = _apply_layout(graph, chain, ["T", "D", "B", "H"], sizes, f"graph output {name!r}")
        want = ["B", "T"] if batch_first else ["T", "B"]
        if axes[:2] == want and len(axes) == 3 and _features(axes, sizes):
            return
        raise OnnxModelError(f"load: graph output {name!r} has axes {axes}; a layer with "
                             f"batch_first={batch_first} (from the graph input's layout) gives "
                             f"{want + ['directions*hidden']}")
    # a final state: Y_h (or Y_c) of the one layer, or the layers' concatenated along axis 0
    node = graph.producer.get(name)
    if node is None or (node.op_type != "Concat" and node not in order):
        raise OnnxModelError(f"load: graph output {name!r} comes from {graph.where(name)}, "
                             f"which is not part of a fastrnn layer: expected the output "
                             f"sequence or the final states")
    parts = [name]
    if L > 1 or (node is not None and node.op_type == "Concat"):
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                    None) if node is not None and node.op_type == "Concat" else None
        if axis != 0 or len(node.input) != L:
            raise OnnxModelError(f"load: graph output {name!r} comes from {graph.where(name)}; "
                                 f"expected the output sequence or the final states of the "
                                 f"{L} layers concatenated along axis 0")
        parts = list(node.input)
    positions = []
    for k, part in enumerate(parts):
        producer = graph.producer.get(part)
        positions.append(list(producer.output).index(part) if producer is not None else -1)
        if producer != order[k] or positions[-1] not in (1, 2):
            raise OnnxModelError(f"load: graph output {name!r}: part {k} comes from "
                                 f"{graph.where(part)}; expected output Y_h or Y_c of "
                                 f"{describe(order[k])}")
    if len(set(positions)) > 1:
        raise OnnxModelError(f"load: graph output {name!r} concatenates Y_h and Y_c")
