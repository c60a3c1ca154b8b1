"""One record per cell type, and the contract every backend's kernels follow.

A *cell* is one time step. A *layer kernel* runs one cell over all T steps of one layer in one
direction. The layer classes (``fastrnn.layers``) build stacks, directions, dropout and batch-first
handling on top of the layer kernels; each backend provides these three functions with this
argument order (the same in the reference, the Numba and the Cython backend)::

    cache = layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                          lengths, reverse, train, y, h_n, c_n, threads=None)

    layer_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                   lengths, reverse, cache, dy, dh_n, dc_n, truncate,
                   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeephole, threads=None)

    layer_step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n)

    concurrent_directions(T, B, train)      (compiled backends only)

    layer_call_step(spec, params, batch_first, x, state)   (optional; both compiled backends)

``layer_step`` is the lean path for single steps of inference (a layer called on one time
step): ONE step, x (B, I), no lengths, no cache; it writes h_n (and c_n) and returns None.
Every array must already be C-contiguous, aligned and of one float dtype, and h_n, c_n must not
overlap the inputs: it checks that (cheaply) and nothing else, and allocates nothing that
grows with the sizes. The layers call it only for arguments they have validated.
``layer_call_step``, where a backend has it, is a layer's whole one-step call (every layer and
direction, the checks, the result arrays) in compiled code: it returns ``y, state`` as the
layer's call would, or None for anything it does not take (the layer's general path then
converts or says what is wrong); ``spec`` is the layer's fixed description
(``fastrnn.layers._RNNBase._step_spec``).

Arguments (H hidden size, G gates, I input size; every array has the layer's dtype):

    cell        a ``Cell`` record below
    x           (T, B, I)  layer input, C-contiguous
    h0, c0      (B, H)     initial state, C-contiguous; c0 is None unless the cell has a cell state
    w_ih        (G*H, I)   w_hh (G*H, H); b_ih, b_hh (G*H,): always arrays (zeros when bias=False)
    peephole    (3, H)     rows i, f, o; None unless ``cell.peephole``
    lengths     (B,) int64 every value in [0, T]; steps t >= lengths[b] are padding for row b
    reverse     bool       process t = T-1 .. 0 instead of 0 .. T-1
    train       bool       keep what backward needs and return it as the cache; else return None
    y           (T, B, H)  output, written whole (zeros at padding); may be a strided view into
                           the (T, B, D*H) layer output (unit stride along H)
    h_n, c_n    (B, H)     final state, written; c_n None unless the cell has a cell state

    cache       what layer_forward returned with train=True (opaque to the caller)
    dy          (T, B, H)  gradient of y (may be a strided view), or None for no loss on y
    dh_n, dc_n  (B, H)     gradient of the final state, or None
    truncate    None or k >= 1: the gradient carried through the recurrent state between time
                indices m*k - 1 and m*k (m = 1, 2, ...) is dropped. For the forward direction this
                equals running the windows [0, k), [k, 2k), ... one after another, each with its
                own backward; the reverse direction is cut at the same time boundaries.
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeephole
                gradients, same shapes as the arrays they belong to; backward ADDS into them
                (the caller zeroes). dc0 and dpeephole are None when the cell has no such thing.

Padding (t >= lengths[b]): the output is zero, the state passes through unchanged, no gradient
reaches the parameters or the input from that position. The reverse direction therefore starts
at each row's own last step, and the final state is each row's state after its own last step.

    threads     None: the backend's thread count (set_num_threads); n >= 1: at most n threads
                for this call. The layers run the two directions of a bidirectional layer at
                once, one thread each, with threads=1, when the backend's
                ``concurrent_directions(T, B, train)`` says such a call makes no BLAS call
                (BLAS has its own threads) and there are threads to spare.

The kernels never write x, the states, the weights, lengths or dy.
"""
from dataclasses import dataclass

__all__ = ["Cell", "CELLS", "cell_for"]


@dataclass(frozen=True)
class Cell:
    """What a cell type is, for validation, parameter shapes, dispatch and the kernels' cache.

    ``code`` is the integer the compiled kernels switch on; ``cache_buffers`` names the per-step
    buffers (besides the activated gates) that the compiled backends keep for backward, each of
    shape (T, B, width*H) where width is the number given.
    """

    name: str               # key in CELLS
    code: int               # integer id used by the compiled kernels
    mode: str               # "RNN", "LSTM" or "GRU": the layer class it belongs to
    num_gates: int          # G: rows of w_ih and w_hh are G*H
    gate_names: tuple       # gate order in the weight rows (PyTorch's order)
    state_names: tuple      # ("h",) or ("h", "c")
    peephole: bool = False  # LSTM with peephole connections, peephole_l{k} of shape (3, H)
    cache_buffers: tuple = ()  # ((name, width), ...) kept per step besides gates and h_prev

    @property
    def has_cell_state(self):
        return len(self.state_names) == 2


RNN_TANH = Cell("rnn_tanh", 0, "RNN", 1, ("h",), ("h",))
RNN_RELU = Cell("rnn_relu", 1, "RNN", 1, ("h",), ("h",))
LSTM = Cell("lstm", 2, "LSTM", 4, ("i", "f", "g", "o"), ("h", "c"),
            cache_buffers=(("c_prev", 1),))
LSTM_PEEPHOLE = Cell("lstm_peephole", 3, "LSTM", 4, ("i", "f", "g", "o"), ("h", "c"),
                     peephole=True, cache_buffers=(("c_prev", 1),))
# reset_after=True: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); keeps W_hn h + b_hn per step.
GRU = Cell("gru", 4, "GRU", 3, ("r", "z", "n"), ("h",), cache_buffers=(("hn", 1),))
# reset_after=False: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn); keeps r * h per step.
GRU_RESET_BEFORE = Cell("gru_reset_before", 5, "GRU", 3, ("r", "z", "n"), ("h",),
                        cache_buffers=(("rh", 1),))

CELLS = {c.name: c for c in (RNN_TANH, RNN_RELU, LSTM, LSTM_PEEPHOLE, GRU, GRU_RESET_BEFORE)}


def cell_for(mode, nonlinearity="tanh", peephole=False, reset_after=True):
    """The cell record a layer class with these options uses."""
    if mode == "RNN":
        return RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    if mode == "LSTM":
        return LSTM_PEEPHOLE if peephole else LSTM
    if mode == "GRU":
        return GRU if reset_after else GRU_RESET_BEFORE
    raise ValueError(f"mode: expected 'RNN', 'LSTM' or 'GRU', got {mode!r}")
