"""Single-layer, single-direction kernels for people who embed them in their own NumPy code.

    y, h_n, c_n, cache = functional.forward("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            train=True, out=y_buffer)
    grads = functional.backward("lstm", cache, dy=dy)

``cell`` is a name of ``fastrnn.cells.CELLS`` or a cell record: a layer's ``m.cell``, or
``fastrnn.cells.cell_for(...)``, for ONNX's activations, clip and input_forget.
Arrays follow the kernel contract in ``fastrnn.cells`` (x (T, B, I), states (B, H), PyTorch's
weight shapes and gate orders). Output buffers given with ``out=``, ``h_n=``, ``c_n=`` are
written in place (``out`` may be a strided view, e.g. one direction's half of a wider array);
they must not overlap an input or each other. The inputs are never written. Inputs are checked
once per call, then the backend's kernel runs.
"""
import numbers

import numpy as np

from . import dispatch as _backends
from .cells import CELLS, Cell
from .layers import _flag, _kept_copy

__all__ = ["forward", "backward", "FunctionalCache"]

class FunctionalCache:
    """The inputs of a training forward, kept for ``backward``: copies where they would
    otherwise be the caller's arrays (x, the weights, lengths), so that backward
    differentiates the forward that ran whatever the caller writes in between."""

    def __init__(self, cell, backend, arrays, kernel_cache):
        self.cell, self.backend = cell, backend
        self.arrays = arrays            # x, the state, the parameters (cell.param_names)
        self.kernel_cache = kernel_cache    # the backend's: it refers to the same arrays


def _cell(name):
    if isinstance(name, Cell):          # a record with options, e.g. a layer's m.cell
        if name.layer_norm:
            raise ValueError("cell: a layer-normalized cell is not taken here yet; use "
                             "fastrnn.LSTM or GRU(..., layer_norm=True)")
        if name.projected:
            raise ValueError("cell: a projected LSTM (proj_size) is not taken here, whose h0 "
                             "and w_hh are not H wide; use fastrnn.LSTM(..., proj_size=P)")
        return name
    if name not in CELLS:
        raise ValueError(f"cell: expected one of {sorted(CELLS)} or a fastrnn.cells.Cell, "
                         f"got {name!r}")
    return CELLS[name]


def _array(name, value, dtype, shape):
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _out(name, value, dtype, shape):
    if value is None:
        return np.empty(shape, dtype)
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != tuple(shape):
        got = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
               else type(value).__name__)
        raise ValueError(f"{name}: expected a writable {np.dtype(dtype)} array of shape "
                         f"{tuple(shape)}, got {got}")
    if not value.flags.writeable or value.strides[-1] != value.itemsize:
        raise ValueError(f"{name}: expected a writable array with unit stride on the last axis")
    return value


def _overlap(a, b):
    """Whether two arrays share memory; a case too hard to decide counts as shared."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=1 << 16)
    except np.exceptions.TooHardError:
        return True


def _refuse_overlaps(outputs, inputs):
    """Raise naming the first output that overlaps an input or an output before it.
    outputs, inputs: (name, array or None) pairs; the outputs are written, the inputs read."""
    seen = [(name, a) for name, a in inputs if isinstance(a, np.ndarray)]
    for name, out in outputs:
        if out is None:
            continue
        for other, a in seen:
            if _overlap(out, a):
                raise ValueError(f"{name}: expected an array that overlaps no input or other "
                                 f"output, got one that overlaps {other}")
        seen.append((name, out))


def forward(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, peephole=None, *,
            lengths=None, reverse=False, train=False, out=None, h_n=None, c_n=None,
            backend="auto"):
    """Run one layer in one direction. Returns ``y, h_n, c_n, cache`` (cache None unless
    ``train``; c_n None unless the cell is an LSTM). The dtype is that of ``w_ih``."""
    cell = _cell(cell)
    reverse, train = _flag("reverse", reverse), _flag("train", train)
    given = (("x", x), ("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih),
             ("b_hh", b_hh), ("peephole", peephole), ("lengths", lengths))
    dtype = np.asarray(w_ih).dtype
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"w_ih: expected float32 or float64, got dtype {dtype}")
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x: expected 3 dimensions (T, B, I), got shape {x.shape}")
    T, B, I = x.shape
    if np.ndim(w_hh) != 2:
        raise ValueError(f"w_hh: expected 2 dimensions ({cell.num_gates}*H, H), got shape "
                         f"{np.shape(w_hh)}")
    H = np.shape(w_hh)[1]
    x_given = x
    x = _array("x", x, dtype, (T, B, I))
    h0 = _array("h0", h0, dtype, (B, H))
    c0 = _array("c0", c0, dtype, (B, H)) if cell.has_cell_state else None
    shapes = cell.param_shapes(I, H)
    given_params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "peephole": peephole}
    params = tuple(np.zeros(shapes[name], dtype) if name in ("b_ih", "b_hh") and value is None
                   else _array(name, value, dtype, shapes[name])
                   for name, value in ((n, given_params[n]) for n in cell.param_names))
    padding = None
    if lengths is None:
        lengths = np.full(B, T, np.int64)
    else:
        lengths = np.asarray(lengths)
        if lengths.dtype.kind not in "iu" or lengths.shape != (B,) \
                or (B and (lengths.min() < 0 or lengths.max() > T)):
            raise ValueError(f"lengths: expected ({B},) integers in [0, {T}], got "
                             f"{lengths.dtype} {lengths.shape}")
        lengths = np.array(lengths, np.int64)             # a copy: the cache keeps it
        padding = np.arange(T)[:, None] >= lengths[None, :]
        if not padding.any():
            padding = None
    if (train or padding is not None) and np.may_share_memory(x, x_given):
        x = _kept_copy(x)      # the caller's x: neither kept for backward nor zeroed in place
    if padding is not None:    # as the layers do: nothing in the padding (NaN included) is used
        x[padding] = 0
    if out is not None or h_n is not None or c_n is not None:
        _refuse_overlaps((("out", out), ("h_n", h_n), ("c_n", c_n)), given)
    y = _out("out", out, dtype, (T, B, H))
    h_n = _out("h_n", h_n, dtype, (B, H))
    if cell.has_cell_state:
        c_n = _out("c_n", c_n, dtype, (B, H))
    kernels = _backends.get_backend(backend)
    state0 = (h0, c0) if cell.has_cell_state else (h0,)
    state_n = (h_n, c_n) if cell.has_cell_state else (h_n,)
    if train:   # the kernel cache keeps them for backward
        params = tuple(_kept_copy(w) for w in params)
    kernel_cache = kernels.layer_forward(cell, x, state0, params, lengths, reverse, train, y,
                                         state_n)
    cache = None
    if train:
        cache = FunctionalCache(cell, kernels, (x, *state0, *params), kernel_cache)
    return y, h_n, (c_n if cell.has_cell_state else None), cache


def backward(cache, dy=None, dh_n=None, dc_n=None, *, truncate=None, grads=None):
    """Gradients of one layer and direction, from the cache of ``forward(..., train=True)``.

    Returns a dict with ``dx``, ``dh0`` (``dc0``), ``dw_ih``, ``dw_hh``, ``db_ih``, ``db_hh``
    (``dpeephole``). Pass ``grads`` (a dict with some of these keys) to ADD into your own
    arrays instead; missing keys are allocated, other keys refused.
    """
    if not isinstance(cache, FunctionalCache):
        raise TypeError(f"cache: expected the cache of functional.forward(..., train=True), "
                        f"got {type(cache).__name__}")
    if truncate is not None and (isinstance(truncate, (bool, np.bool_))
                                 or not isinstance(truncate, numbers.Integral) or truncate < 1):
        raise ValueError(f"truncate: expected None or an int >= 1, got {truncate!r}")
    cell = cache.cell
    S = len(cell.state_names)
    x, state0, params = cache.arrays[0], cache.arrays[1:1 + S], cache.arrays[1 + S:]
    h0 = state0[0]
    dtype = x.dtype
    T, B, _ = x.shape
    H = h0.shape[1]
    if truncate is not None:   # k >= T cuts nothing; any int reaches the kernels as a small one
        truncate = int(truncate) if truncate < T else None
    grads = {} if grads is None else grads
    if not isinstance(grads, dict):
        raise TypeError(f"grads: expected a dict of gradient arrays, got {type(grads).__name__}")
    names = ["dx", *("d" + s + "0" for s in cell.state_names),
             *("d" + p for p in cell.param_names)]
    unknown = [key for key in grads if key not in names]
    if unknown:
        raise ValueError(f"grads: unexpected key(s) {unknown} for cell {cell.name!r}; "
                         f"expected some of {names}")
    if dy is not None:
        dy = np.asarray(dy)
        if dy.shape != (T, B, H) or dy.dtype.kind != "f":
            raise ValueError(f"dy: expected a float array of shape {(T, B, H)}, "
                             f"got {dy.dtype} {dy.shape}")
        if dy.dtype != dtype or dy.strides[-1] != dy.itemsize:
            dy = np.ascontiguousarray(dy, dtype)
    dh_n = None if dh_n is None else _array("dh_n", dh_n, dtype, (B, H))
    dc_n = None if dc_n is None or not cell.has_cell_state else _array("dc_n", dc_n, dtype,
                                                                        (B, H))
    targets = {"dx": x, **{"d" + s + "0": a for s, a in zip(cell.state_names, state0)},
               **{"d" + p: a for p, a in zip(cell.param_names, params)}}
    out = {}
    for name, like in targets.items():
        given = grads.get(name)
        out[name] = np.zeros_like(like) if given is None else _out(name, given, dtype,
                                                                   like.shape)
    if grads:
        _refuse_overlaps([(f"grads[{name!r}]", grads.get(name)) for name in names],
                         (("dy", dy), ("dh_n", dh_n), ("dc_n", dc_n)))
    cache.backend.layer_backward(
        cell, cache.kernel_cache, dy, (dh_n, dc_n)[:S], truncate, out["dx"],
        tuple(out["d" + s + "0"] for s in cell.state_names),
        tuple(out["d" + p] for p in cell.param_names))
    return out
