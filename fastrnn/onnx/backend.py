"""An ONNX backend (``onnx.backend.base.Backend``) that runs ONNX's LSTM, GRU and RNN operators
with fastrnn layers, so that ONNX's own backend test suite can check fastrnn::

    import fastrnn.onnx.backend as backend
    rep = backend.prepare(model)                  # a ModelProto
    outputs = rep.run([x, ...])                   # the graph's outputs, in order
    outputs = backend.run_node(node, [x, W, R])   # one node

A graph may hold LSTM, GRU and RNN nodes and the tensor operators exporters put between them
(Transpose, Squeeze, Unsqueeze, Reshape, Concat, Slice, Gather, Shape, Cast, Identity, Constant,
ConstantOfShape, Expand), evaluated in NumPy. The recurrent nodes' attributes activations,
activation_alpha, activation_beta, clip and input_forget run as the layers' options of those
names. Any other operator, and any attribute fastrnn cannot represent (a bidirectional node
whose two directions have different activations; see ``fastrnn.onnx.load``), is refused with an
error naming the node and the operator or attribute. layout=1 is supported here;
direction="reverse" costs a second, zero-weight direction.

``FastrnnBackend.layer_backend`` (default "auto") chooses fastrnn's kernels; ``prepare`` and
``run_node`` also take ``backend=``.
"""
import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep, namedtupledict

from ._nodes import (RNN_OPS, TENSOR_OPS, OnnxModelError, describe, node_options, run_rnn_node,
                     run_tensor_op)

__all__ = ["FastrnnBackend", "FastrnnRep", "prepare", "run_model", "run_node",
           "supports_device"]

# ONNX's input names of each recurrent operator, in order
RNN_INPUTS = {"LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
              "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
              "RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h")}


def check_nodes(nodes):
    """Refuse, before running anything, a node fastrnn cannot run."""
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            raise OnnxModelError(f"{describe(node)}: operator domain {node.domain!r} is not "
                                 f"supported (only ONNX's default domain)")
        if node.op_type in RNN_OPS:
            node_options(node)
        elif node.op_type not in TENSOR_OPS:
            raise OnnxModelError(f"{describe(node)}: operator {node.op_type!r} is not supported; "
                                 f"fastrnn runs {list(RNN_OPS)} and {sorted(TENSOR_OPS)}")


def run_nodes(nodes, values, backend):
    """Run ``nodes`` in order, reading and adding to ``values`` (name -> array)."""
    for node in nodes:
        missing = [name for name in node.input if name and name not in values]
        if missing:
            raise OnnxModelError(f"{describe(node)}: input {missing[0]!r} is neither a graph "
                                 f"input, an initializer nor an earlier node's output")
        args = [values[name] if name else None for name in node.input]
        if node.op_type in RNN_OPS:
            named = dict(zip(RNN_INPUTS[node.op_type], args))
            outputs = run_rnn_node(node, named, backend=backend)
        else:
            outputs = run_tensor_op(node, args)
        for name, value in zip(node.output, outputs):
            if name:
                values[name] = value


class FastrnnRep(BackendRep):
    """A prepared model: its graph, run with fastrnn layers on every ``run``."""

    def __init__(self, model, backend):
        self.graph = model.graph
        self.backend = backend
        self.initializers = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.input_names = [i.name for i in self.graph.input
                            if i.name not in self.initializers]
        self.output_names = [o.name for o in self.graph.output]

    def run(self, inputs, **kwargs):
        """The graph's outputs, in order, for ``inputs``: a list in the order of the graph's
        inputs (those without an initializer), a dict by name, or one array."""
        if isinstance(inputs, dict):
            unknown = sorted(set(inputs) - set(self.input_names))
            if unknown:
                raise ValueError(f"inputs: {unknown} are not inputs of the graph "
                                 f"{self.input_names}")
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            if len(inputs) != len(self.input_names):
                raise ValueError(f"inputs: expected {len(self.input_names)} arrays "
                                 f"{self.input_names}, got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs))
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ValueError(f"inputs: missing {missing}")
        values = dict(self.initializers)
        values.update({name: np.asarray(v) for name, v in feeds.items()})
        run_nodes(self.graph.node, values, self.backend)
        return namedtupledict("Outputs", self.output_names)(
            *[values[name] for name in self.output_names])


class FastrnnBackend(Backend):
    layer_backend = "auto"

    @classmethod
    def supports_device(cls, device):
        return device.split(":")[0] == "CPU"

    @classmethod
    def _device(cls, device):
        if not cls.supports_device(device):
            raise ValueError(f"device: fastrnn runs on 'CPU' only, got {device!r}")

    @classmethod
    def prepare(cls, model, device="CPU", backend=None, **kwargs):
        cls._device(device)
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load_model_from_string(model) if isinstance(model, bytes) \
                else onnx.load(model)
        super().prepare(model, device)          # onnx.checker
        check_nodes(model.graph.node)
        return FastrnnRep(model, backend or cls.layer_backend)

    @classmethod
    def run_node(cls, node, inputs, device="CPU", outputs_info=None, backend=None, **kwargs):
        """One node's outputs (those with a name) for ``inputs``: one array per name in
        ``node.input`` (None for ''), or one per non-empty name."""
        cls._device(device)
        super().run_node(node, inputs, device=device, **kwargs)   # onnx.checker
        check_nodes([node])
        names = list(node.input)
        if len(inputs) != len(names):
            names = [name for name in names if name]
        if len(inputs) != len(names):
            raise ValueError(f"inputs: expected one array per input of {describe(node)}, "
                             f"got {len(inputs)}")
        values = {name: None if v is None else np.asarray(v)
                  for name, v in zip(names, inputs) if name}
        run_nodes([node], values, backend or cls.layer_backend)
        outputs = [name for name in node.output if name]
        return namedtupledict("Outputs", outputs)(*[values[name] for name in outputs])


prepare = FastrnnBackend.prepare
run_model = FastrnnBackend.run_model
run_node = FastrnnBackend.run_node
supports_device = FastrnnBackend.supports_device
