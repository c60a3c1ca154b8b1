"""The benchmark cases: one table, read by the pytest-benchmark suite and by the report.

A case names a layer class (``mode``: the class in ``fastrnn`` and in ``torch.nn``), what is timed
(``kind``) and the sizes. ``kind`` is one of

    train   forward with the cache, then backward with every gradient: input, initial state and
            parameters (PyTorch: input and initial state with requires_grad, y.backward(dy))
    infer   one inference call over all T steps from a zero state (PyTorch under no_grad)
    step    ``steps`` calls of the layer on a one-step input, the state carried from call to call
            (PyTorch: nn.LSTMCell / nn.GRUCell / nn.RNNCell under no_grad)

ONNX Runtime runs the infer and step cases (the layer written by ``fastrnn.onnx.export``); it has
no training.

Everything is float32. FLOP counts are in one place, ``flops`` below.
"""
from dataclasses import dataclass

from fastrnn.cells import cell_for

__all__ = ["Case", "CASES", "BY_NAME", "KINDS", "select", "flops", "forward_flops",
           "STEP_LATENCY_TARGET_US", "BACKEND_AGREEMENT", "COMPILED"]

KINDS = ("train", "infer", "step")


@dataclass(frozen=True)
class Case:
    name: str
    mode: str             # "LSTM", "GRU" or "RNN": fastrnn.<mode> and torch.nn.<mode>[Cell]
    kind: str             # "train", "infer" or "step"
    layers: int
    bidirectional: bool
    batch: int            # B
    input_size: int       # I
    hidden: int           # H
    steps: int            # T (for "step": the number of one-step calls)
    target: float         # issue 7: the fastest backend's speedup over PyTorch to reach
    note: str = ""

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def num_gates(self):
        """G, from the cell record the layer class uses with its default options."""
        return cell_for(self.mode).num_gates


# DeepBench: the LSTM sizes of Baidu's DeepBench (training; server inference)
CASES = (
    #    name                 mode    kind     L  bidi    B     I     H    T  target
    Case("lstm-train-256",    "LSTM", "train", 1, False, 32,  256,  256, 150, 1.0, "DeepBench"),
    Case("lstm-train-512",    "LSTM", "train", 1, False, 32,  512,  512,  25, 1.0, "DeepBench"),
    Case("gru-train-512",     "GRU",  "train", 1, False, 32,  512,  512,  50, 1.5),
    Case("charlm-train",      "LSTM", "train", 2, False, 32,   64,  256, 100, 1.0, "char LM"),
    Case("gru-charlm-train",  "GRU",  "train", 2, False, 32,   64,  256, 100, 1.5),
    Case("rnn-train-512",     "RNN",  "train", 1, False, 32,  512,  512,  50, 1.5),
    Case("bilstm-train",      "LSTM", "train", 2, True,  16,  128,  128, 100, 1.0),
    Case("lstm-infer-512-b1", "LSTM", "infer", 1, False,  1,  512,  512,  25, 3.0, "DeepBench"),
    Case("lstm-infer-256-b4", "LSTM", "infer", 1, False,  4,  256,  256, 150, 1.2, "DeepBench"),
    Case("gru-infer-1024-b2", "GRU",  "infer", 1, False,  2, 1024, 1024,  25, 3.0),
    Case("bilstm-infer",      "LSTM", "infer", 2, True,  16,  128,  256, 200, 1.2),
    Case("lstm-step-128",     "LSTM", "step",  1, False,  1,  128,  128, 100, 7.0, "LSTMCell"),
    Case("gru-step-128",      "GRU",  "step",  1, False,  1,  128,  128, 100, 7.0, "GRUCell"),
)

# Other targets of issue 7, checked by the report:
STEP_LATENCY_TARGET_US = 5.0      # one call of the layer on one step, Python included
BACKEND_AGREEMENT = 1.3           # the compiled backends within this factor of each other
COMPILED = ("numba", "cython")
# and: the peak RSS of training no more than PyTorch's.

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
assert all(case.kind in KINDS for case in CASES)


def select(names=None):
    """The cases named in ``names`` (a list, or a comma-separated str), in table order; all when
    None or empty. Unknown names raise ValueError listing the known ones."""
    if not names:
        return list(CASES)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"cases: unknown {unknown}; known: {', '.join(BY_NAME)}")
    wanted = set(names)
    return [case for case in CASES if case.name in wanted]


def forward_flops(case):
    """Matmul FLOPs of one forward pass over all steps, summed over layers and directions.

    Per layer k and direction, with I_k = I for k = 0 and D*H above:

        2 * T * B * G*H * (I_k + H)

    the input projection (T*B, I_k) x (I_k, G*H) plus T recurrent products (B, H) x (H, G*H).
    Elementwise work (activations, state update, biases) is not counted.
    """
    T, B, H, G, D = case.steps, case.batch, case.hidden, case.num_gates, case.directions
    total = 0
    for layer in range(case.layers):
        layer_input = case.input_size if layer == 0 else D * H
        total += D * 2 * T * B * G * H * (layer_input + H)
    return total


def flops(case):
    """Matmul FLOPs of what one timed call of ``case`` does.

    infer, step: the forward (a "step" case is ``steps`` one-step calls: the same count as one
    forward over ``steps`` steps). train: 3x the forward, since backward has two products per
    forward product: the gradient of the product's input (dx, dh) and of its weight (dW_ih, dW_hh).
    """
    forward = forward_flops(case)
    return 3 * forward if case.kind == "train" else forward
