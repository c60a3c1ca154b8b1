"""The Numba backend: ``layer_forward`` / ``layer_backward`` / ``layer_step`` with the contract of
``fastrnn.cells``.

Inference calls with at most ``get_small_batch_max()`` batch rows run the unit-split forward loop
(hidden units split over threads, each multiplying by its own weight rows, packed into panels
once per call when the call is long enough, see ``_set_pack_limits``; see ``kernels``),
larger ones and training forward calls (``get_small_batch_max(train=True)``, 0 by default) the
batch-row loop; ``set_small_batch_max(0)`` turns the unit-split loop off. The batch-row loop
multiplies over weights packed once per call for B <= config.PACKED_B_MAX when T*B is at least
the pack limit (``_set_pack_limits``), and then makes no BLAS call at all: its products and
passes use every thread (``_set_pool(False)``: the packed per-step products on the calling
thread, BLAS for the input projection and the gradient products).

This module does the Python side of a call: it cuts the one workspace of the call into named
buffers, turns ``None`` into empty arrays so that every call has the same argument types, and
runs the compiled time loop of ``kernels.py`` for the array dtype.

Each loop is compiled with one explicit signature per dtype, on the first call in that dtype
(then loaded from Numba's cache): inputs are typed read-only and C-contiguous, ``y`` and ``dy``
as strided ('A' layout), so C-ordered or strided, writable or read-only arguments all run the
same machine code instead of compiling a variant for each combination.
"""
import os
import threading
import ctypes

import numpy as np
import numba
from numba import njit, types

from . import amx, config, kernels
from .. import _scratch

__all__ = ["layer_forward", "layer_backward", "layer_step", "concurrent_directions",
           "set_num_threads", "get_num_threads",
           "set_small_batch_max", "get_small_batch_max", "amx_available", "set_amx", "get_amx"]


# ---------------------------------------------------------------------------------------------
# Compiled loops, one per dtype

_compiled = {}
_compile_lock = threading.Lock()


def _signatures(dtype):
    real = numba.from_dtype(dtype)

    def array(ndim, layout="C", readonly=False):
        return types.Array(real, ndim, layout, readonly=readonly)

    def const(ndim, layout="C"):
        return array(ndim, layout, readonly=True)

    index = types.Array(types.int64, 1, "C", readonly=True)
    i64, flag = types.int64, types.boolean
    forward = types.none(
        i64, const(3), const(2), const(2),         # code x w_ih w_hh
        const(1), const(1), const(2),              # b_ih b_hh peephole
        index, flag, flag, i64, flag, flag,        # lengths reverse train units pack amx
        array(3, "A"),                             # y
        array(3), array(3), array(3),              # cache: gates h_prev saved
        array(2), array(2), array(2), array(2), array(2),  # scratch: hgates h h2 c rh
        array(4), array(3))                        # gates_own hgates_own
    backward = types.none(
        i64, const(3), const(2), const(2),         # code x w_ih w_hh
        const(2), index, flag, i64, flag, flag,    # peephole lengths reverse truncate pack amx
        i64,                                       # pool
        const(3), const(3), const(3),              # cache: gates h_prev saved
        const(3, "A"), flag,                       # dy has_dy
        array(3), array(3), array(2), array(2),    # scratch: dgates dgates_n dh dc
        array(2), array(2), const(1),              # drh dpeep_rows ones
        array(3), array(2), array(2),              # dx dw_ih dw_hh
        array(1), array(1), array(2))              # db_ih db_hh dpeephole
    step = types.int64(
        i64, i64, i64, flag,                       # code threads min_work batch_first
        const(3), const(3), const(3), i64,         # x h0 c0 row
        const(2), const(2), const(1), const(1),    # w_ih w_hh b_ih b_hh
        const(2), array(3), array(3),              # peephole h_n c_n
        array(3), i64)                             # out col
    return forward, backward, step


def _kernels(dtype):
    """(forward, backward, step) compiled for this dtype; compiled or loaded from cache on first
    use."""
    pair = _compiled.get(dtype)
    if pair is None:
        with _compile_lock:
            pair = _compiled.get(dtype)
            if pair is None:
                forward_sig, backward_sig, step_sig = _signatures(dtype)
                pair = (njit(forward_sig, **config.KERNEL)(kernels.forward_loop),
                        njit(backward_sig, **config.KERNEL)(kernels.backward_loop),
                        njit(step_sig, **config.KERNEL)(kernels.step))
                _compiled[dtype] = pair
    return pair


# Numba's workqueue threading layer aborts when two threads launch parallel regions at once;
# tbb and omp do not. Until Numba has picked its layer (first parallel launch), and whenever it
# picked workqueue, kernel calls take this lock.
_launch_lock = threading.Lock()
_threadsafe_layer = False


def _thread_limit(threads):
    """The threads a call may use: threads=None, all (_num_threads); else at most that many."""
    if threads is None:
        return _num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected None or an integer >= 1, got {threads!r}")
    return min(threads, _num_threads)


def concurrent_directions(T, B, train):
    """Whether fastrnn.layers should run the two directions of a bidirectional layer at once,
    one thread each (layer_forward / layer_backward with threads=1): there are threads to spare,
    Numba can launch from two threads at once, and such a call makes no BLAS call (the
    unit-split loop, or a pooled packed GEMM-loop call)."""
    if _num_threads < 2:
        return False
    if not _threadsafe_layer and not _layer_probed[0]:
        # Numba picks its threading layer at the first parallel launch: make one
        _layer_probed[0] = True
        _launch(kernels.column_sums, 2, 2, np.zeros((1, 256)), np.zeros(256))
    if not _threadsafe_layer:
        return False
    return B <= _small_batch_max[bool(train)] or (_gemm_packs(T, B) and _pool[0])


_layer_probed = [False]


def _pass_threads(rows_work, limit):
    """Threads (at most limit) for the batch-row elementwise passes; rows_work = B * G * H."""
    # A pass of a usual size takes tens of microseconds, about what waking a second thread
    # costs; worse, Numba's OpenMP threads and OpenBLAS's threads then take turns on the same
    # cores and each pool spins while it waits, which slows the GEMMs down (by orders of
    # magnitude on a machine that other work keeps busy). So small passes run on the calling
    # thread and only big ones are split.
    return limit if rows_work >= config.PARALLEL_MIN_ELEMENTS else 1


def _launch(kernel, threads, *args):
    """Run a compiled loop with Numba's thread count set to ``threads`` for the call."""
    global _threadsafe_layer
    # Numba's thread count belongs to the calling thread: set it there, and put it back after
    caller_threads = numba.get_num_threads()
    if caller_threads != threads:
        numba.set_num_threads(threads)
    try:
        if _threadsafe_layer:
            return kernel(*args)
        with _launch_lock:
            result = kernel(*args)
            try:
                _threadsafe_layer = numba.threading_layer() in ("tbb", "omp")
            except ValueError:  # no parallel region has run yet
                pass
            return result
    finally:
        if caller_threads != threads:
            numba.set_num_threads(caller_threads)


# ---------------------------------------------------------------------------------------------
# Workspaces: one allocation per call, cut into named C-contiguous buffers

def _workspace(dtype, shapes):
    """One buffer (pooled, fastrnn._scratch) cut into named views; shapes: {name: shape}.
    Returns (buffer, {name: view})."""
    align = config.ALIGN_ELEMENTS
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-int(np.prod(shape, dtype=np.int64)) // align) * align
    buffer = _scratch.empty(total, dtype)
    views = {}
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        views[name] = buffer[offsets[name]:offsets[name] + size].reshape(shape)
    return buffer, views


_empties = {}


def _empty(dtype, ndim):
    """A zero-size array standing for an absent argument (shared: nothing can be written to it)."""
    key = (np.dtype(dtype), ndim)
    if key not in _empties:
        _empties[key] = np.empty((0,) * ndim, dtype)
    return _empties[key]


class ForwardCache:
    """What backward needs, all cut from one workspace (``buffer``).

    gates   (T, B, G*H) activated gates (RNN: the new h)
    h_prev  (T, B, H)   state h before each step
    saved   (T, B, H)   the cell's extra buffer, ``cell.cache_buffers``: LSTM c_prev, GRU hn,
                        GRU reset-before rh; empty for RNN
    Padding positions hold zeros in h_prev and saved.
    """

    __slots__ = ("cell", "shape", "buffer", "gates", "h_prev", "saved")

    def __init__(self, cell, shape, buffer, gates, h_prev, saved):
        self.cell, self.shape, self.buffer = cell, shape, buffer
        self.gates, self.h_prev, self.saved = gates, h_prev, saved


def _const(name, a, dtype, ndim):
    """An input as the kernels take it: C-contiguous, aligned, the layer's dtype (no copy if so)."""
    a = np.asarray(a)
    if a.dtype != dtype or a.ndim != ndim:
        raise TypeError(f"{name}: expected a {ndim}-d {np.dtype(dtype).name} array, "
                        f"got {a.ndim}-d {a.dtype.name}")
    return np.require(a, requirements=("C", "A"))


def _check_shapes(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole):
    """Raise naming the first argument whose shape does not fit the others (the kernels index
    by these sizes and check nothing); x is 3-d. Returns G*H and H."""
    T, B, I = x.shape
    H = np.shape(w_hh)[-1] if np.ndim(w_hh) == 2 else None
    GH = None if H is None else cell.num_gates * H
    wanted = (("w_hh", w_hh, (GH, H)), ("w_ih", w_ih, (GH, I)), ("b_ih", b_ih, (GH,)),
              ("b_hh", b_hh, (GH,)), ("peephole", peephole, (3, H) if cell.peephole else None),
              ("h0", h0, (B, H)), ("c0", c0, (B, H) if cell.has_cell_state else None))
    for name, value, shape in wanted:
        if value is None and name in ("h0", "c0", "peephole"):
            if name == "peephole" and shape is not None:
                raise TypeError(f"peephole: expected a {shape} array for {cell.name}, got None")
            continue
        if shape is None or np.shape(value) != shape:
            shown = "(G*H, H)" if H is None else shape
            raise ValueError(f"{name}: expected shape {shown} for {cell.name} with x {x.shape}"
                             f" and w_hh {np.shape(w_hh)}, got {np.shape(value)}")
    return GH, H


def _lengths(lengths, T, B):
    if lengths is None:
        return np.full(B, T, np.int64)
    return np.require(np.asarray(lengths, dtype=np.int64), requirements=("C", "A"))


class _Output:
    """An array the kernel writes or adds into: itself when it can, else a C-ordered stand-in.

    ``mode`` "write": the stand-in is copied back; "add": it starts at zero and is added back.
    """

    def __init__(self, target, mode, contiguous=True):
        self.target = target
        direct = target.flags.writeable and target.flags.aligned and (
            target.flags.c_contiguous or not contiguous)
        if direct:
            self.array = target
        elif mode == "add":
            self.array = np.zeros(target.shape, target.dtype)
        else:
            self.array = np.empty(target.shape, target.dtype)
        self.mode = mode

    def finish(self):
        if self.array is self.target:
            return
        if self.mode == "add":
            self.target += self.array
        else:
            self.target[...] = self.array


# ---------------------------------------------------------------------------------------------
# The contract of fastrnn.cells

def layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                  lengths, reverse, train, y, h_n, c_n, threads=None):
    """One layer, one direction, all T steps; see ``fastrnn.cells`` for the arguments."""
    dtype = np.asarray(x).dtype
    x = _const("x", x, dtype, 3)
    T, B, _ = x.shape
    GH, H = _check_shapes(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole)
    lengths = _lengths(lengths, T, B)
    shapes = {"gates": (T, B, GH), "hgates": (B, GH), "h": (B, H)}
    if train:
        shapes["h_prev"] = (T, B, H)
        if cell.cache_buffers:
            shapes["saved"] = (T, B, H)
    if cell.has_cell_state:
        shapes["c"] = (B, H)
    if cell.name == "gru_reset_before" and not train:
        shapes["rh"] = (B, H)
    # small batches: the unit-split loop, on `units` threads (0: the batch-row loop)
    limit = _thread_limit(threads)
    units, pack = 0, _gemm_packs(T, B)
    if B <= _small_batch_max[bool(train)]:
        work = GH * H * B                              # multiply-adds of h W_hh^T per step
        unit_threads = limit if work >= config.UNITS_PARALLEL_MIN_WORK else 1
        units = max(1, min(unit_threads, -(-H // 16)))
        shapes["h2"] = (B, H)
        pack = T * B >= _pack_limits[0] and _packed_bytes(dtype, units, GH, H) <= _pack_limits[1]
        if units > 1 and not train:
            # each thread's gates in its own buffer (see kernels.forward_loop), cut from this
            # workspace: allocated in the kernel instead, the call was 8-12% slower (LSTM
            # T=200 B=16 H=256; likely the page faults: NumPy advises huge pages for large
            # arrays, Numba's allocator does not)
            C = kernels.unit_range.py_func(0, units, H)[1]
            del shapes["gates"]
            shapes["gates_own"] = (units, T, B, GH // H * C)
            shapes["hgates_own"] = (units, B, GH // H * C)
    buffer, ws = _workspace(dtype, shapes)
    ws["h"][...] = 0 if h0 is None else h0
    if cell.has_cell_state:
        ws["c"][...] = 0 if c0 is None else c0
    empty2, empty3 = _empty(dtype, 2), _empty(dtype, 3)
    h_prev, saved = ws.get("h_prev", empty3), ws.get("saved", empty3)
    if T * B > 0:
        out = _Output(y, "write", contiguous=False)
        forward = _kernels(dtype)[0]
        if units == 0 and pack and _pool[0]:
            units = -_pool_threads(B, GH, H, limit)    # the packed batch-row loop's pool
        _launch(forward, abs(units) if units else _pass_threads(B * GH, limit), cell.code, x,
                _const("w_ih", w_ih, dtype, 2),
                _const("w_hh", w_hh, dtype, 2), _const("b_ih", b_ih, dtype, 1),
                _const("b_hh", b_hh, dtype, 1),
                empty2 if peephole is None else _const("peephole", peephole, dtype, 2),
                lengths, bool(reverse), bool(train), units, pack, _uses_amx(dtype),
                out.array, ws.get("gates", empty3), h_prev, saved, ws["hgates"], ws["h"],
                ws.get("h2", empty2), ws.get("c", empty2), ws.get("rh", empty2),
                ws.get("gates_own", _empty(dtype, 4)), ws.get("hgates_own", empty3))
        out.finish()
    h_n[...] = ws["h"]
    if cell.has_cell_state:
        c_n[...] = ws["c"]
    if not train:
        return None
    return ForwardCache(cell, (T, B, H), buffer, ws["gates"], h_prev, saved)


def layer_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                   lengths, reverse, cache, dy, dh_n, dc_n, truncate,
                   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeephole, threads=None):
    """Backward of ``layer_forward``; ADDS into the gradient arrays (see ``fastrnn.cells``)."""
    dtype = np.asarray(x).dtype
    x = _const("x", x, dtype, 3)
    T, B, _ = x.shape
    GH, H = _check_shapes(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole)
    if not isinstance(cache, ForwardCache) or cache.cell != cell or cache.shape != (T, B, H):
        raise ValueError("cache: expected what layer_forward returned with train=True for this "
                         f"cell and these shapes ({cell.name}, T={T}, B={B}, H={H})")
    if truncate is not None and int(truncate) < 1:
        raise ValueError(f"truncate: expected None or an integer >= 1, got {truncate!r}")
    lengths = _lengths(lengths, T, B)
    shapes = {"dgates": (T, B, GH), "ones": (T * B,), "dh": (B, H)}
    if cell.name == "gru":
        shapes["dgates_n"] = (T, B, H)
    if cell.has_cell_state:
        shapes["dc"] = (B, H)
    if cell.name == "gru_reset_before":
        shapes["drh"] = (B, H)
    if cell.peephole:
        shapes["dpeep_rows"] = (B, 3 * H)
    _, ws = _workspace(dtype, shapes)
    ws["ones"][...] = 1  # bias gradients are ones @ dgates
    if cell.peephole:
        ws["dpeep_rows"][...] = 0
    dh, dc = ws["dh"], ws.get("dc")
    dh[...] = 0 if dh_n is None else dh_n
    if dc is not None:
        dc[...] = 0 if dc_n is None else dc_n
    if T * B > 0:
        empty2, empty3 = _empty(dtype, 2), _empty(dtype, 3)
        grads = [_Output(dx, "add"), _Output(dw_ih, "add"), _Output(dw_hh, "add"),
                 _Output(db_ih, "add"), _Output(db_hh, "add")]
        if dpeephole is not None:
            grads.append(_Output(dpeephole, "add"))
        if dy is None:
            dy_arg = _empty(dtype, 3)
        else:
            dy_arg = np.asarray(dy)
            if dy_arg.dtype != dtype or not dy_arg.flags.aligned:
                dy_arg = np.require(dy_arg, dtype, ("C", "A"))
        backward = _kernels(dtype)[1]
        pack = _gemm_packs(T, B)
        limit = _thread_limit(threads)
        pool = _pool_threads(B, GH, H, limit) if pack and _pool[0] else 0
        _launch(backward, pool if pool else _pass_threads(B * GH, limit),
                cell.code, x, _const("w_ih", w_ih, dtype, 2), _const("w_hh", w_hh, dtype, 2),
                empty2 if peephole is None else _const("peephole", peephole, dtype, 2),
                lengths, bool(reverse), 0 if truncate is None else int(truncate), pack,
                _uses_amx(dtype), pool,
                cache.gates, cache.h_prev, cache.saved, dy_arg, dy is not None,
                ws["dgates"], ws.get("dgates_n", empty3), dh,
                empty2 if dc is None else dc, ws.get("drh", empty2),
                ws.get("dpeep_rows", empty2), ws["ones"],
                *[g.array for g in grads], *([] if dpeephole is not None else [empty2]))
        for g in grads:
            g.finish()
    dh0 += dh
    if dc is not None:
        dc0 += dc


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
_LSTM, _LSTM_PEEPHOLE = kernels.LSTM, kernels.LSTM_PEEPHOLE
_step_kernels = {}       # dtype -> (the compiled step kernel, absent c, absent peephole)
_call_kernels = [None, None]     # the same for float32, float64: layer_call_step's lookup
_STEP_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "peephole", "h_n", "c_n")


def _step_kernel(dtype):
    entry = _step_kernels.get(dtype)
    if entry is None:
        # absent c0 / c_n: (1, 0, 0), so that the kernel's c[row if cell state else 0] is a row
        entry = _step_kernels[dtype] = (_kernels(dtype)[2], np.empty((1, 0, 0), dtype),
                                        _empty(dtype, 2))
    return entry


def layer_step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n):
    """One step of inference of one layer and direction, x (B, I); see ``fastrnn.cells``.

    The compiled kernel's dispatcher checks dtypes, dimensions, C order and alignment, the
    kernel the shapes and overlaps; only when one of them refuses the call does Python look for
    which argument it was, to say so. (The layers' one-step calls go through layer_call_step.)"""
    try:
        kernel, absent_c, absent_peephole = _step_kernels[x.dtype]
    except (KeyError, AttributeError, TypeError):
        _step_diagnose(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n, 0)
        kernel, absent_c, absent_peephole = _step_kernel(x.dtype)
    try:
        # the kernel's (1, B, .) rows; h_n is also its out (copied onto itself)
        h_n3 = h_n[None]
        args = (cell.code, _num_threads, config.STEP_PARALLEL_MIN_WORK, False, x[None],
                h0[None], absent_c if c0 is None else c0[None], 0, w_ih, w_hh, b_ih, b_hh,
                absent_peephole if peephole is None else peephole, h_n3,
                absent_c if c_n is None else c_n[None], h_n3, 0)
        status = kernel(*args) if _threadsafe_layer else _launch(kernel, _num_threads, *args)
    except (TypeError, IndexError):
        status = -1
    if status:
        _step_diagnose(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n, status)


def layer_call_step(spec, params, batch_first, x, state):
    """``y, state`` of a layer called on one time step without lengths, or None when the call
    needs the layer's general path (see ``fastrnn.cells``; the same as the Cython backend's).

    spec: (cell code, float64?, input size, hidden size, layers, directions, parameter names
    per layer and direction (w_ih, w_hh, b_ih, b_hh, peephole; None: absent, zero bias then),
    zero bias); params: the layer's parameter dict. Per-call cost is the point (a microsecond
    is a sixth of an LSTM H=128 step): the dispatcher checks dtypes and layouts, the kernel
    every shape, and a refusal of either sends the call to the general path, which names what
    was wrong."""
    code, is_float64, _, H, layers, D, names, zero_bias = spec
    entry = _call_kernels[is_float64]
    if entry is None:
        entry = _call_kernels[is_float64] = _step_kernel(_FLOAT64 if is_float64 else _FLOAT32)
    kernel, absent_c, absent_peephole = entry
    if type(x) is not np.ndarray or x.ndim != 3 or type(params) is not dict:
        return None
    B = x.shape[0] if batch_first else x.shape[1]
    if B == 0:
        return None
    dtype = absent_c.dtype
    rows = layers * D
    has_c = code == _LSTM or code == _LSTM_PEEPHOLE
    if state is None:
        h0 = np.zeros((rows, B, H), dtype)
        c0 = np.zeros((rows, B, H), dtype) if has_c else absent_c
    elif has_c:
        if type(state) is not tuple or len(state) != 2:
            return None
        h0, c0 = state
    else:
        h0, c0 = state, absent_c
    h_n = np.empty((rows, B, H), dtype)
    c_n = np.empty((rows, B, H), dtype) if has_c else absent_c
    y = np.empty((B, 1, D * H) if batch_first else (1, B, D * H), dtype)
    threads, min_work = _num_threads, config.STEP_PARALLEL_MIN_WORK
    launch = None if _threadsafe_layer else _launch
    layer_input, input_batch_first = x, batch_first
    row = 0
    try:
        for layer in range(layers):
            out = y if layer == layers - 1 else np.empty((1, B, D * H), dtype)
            for col in range(0, D * H, H):
                w_ih, w_hh, b_ih, b_hh, peephole = names[row]
                args = (code, threads, min_work, input_batch_first, layer_input, h0, c0, row,
                        params[w_ih], params[w_hh],
                        zero_bias if b_ih is None else params[b_ih],
                        zero_bias if b_hh is None else params[b_hh],
                        absent_peephole if peephole is None else params[peephole],
                        h_n, c_n, out, col)
                if kernel(*args) if launch is None else launch(kernel, threads, *args):
                    return None
                row += 1
            layer_input, input_batch_first = out, False
    except (TypeError, KeyError):
        return None     # an argument of a type or layout the kernel does not take
    return y, ((h_n, c_n) if has_c else h_n)


def _step_diagnose(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n, status):
    """Raise the error that names what layer_step refused (status: the kernel's answer, 0 or
    -1 when there is none); return when everything is acceptable and status is 0."""
    values = dict(zip(_STEP_NAMES, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n)))
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError("x: expected a float32 or float64 numpy array, got "
                        + (f"{x.dtype.name} array" if isinstance(x, np.ndarray)
                           else type(x).__name__))
    dtype = x.dtype
    # the sizes the others must match: B from x, I from w_ih, H from h0
    B = x.shape[0] if x.ndim == 2 else None
    I = w_ih.shape[1] if isinstance(w_ih, np.ndarray) and w_ih.ndim == 2 else None
    H = h0.shape[1] if isinstance(h0, np.ndarray) and h0.ndim == 2 else None
    GH = None if H is None else cell.num_gates * H
    shapes = {"x": (B, I), "h0": (B, H), "c0": (B, H), "w_ih": (GH, I), "w_hh": (GH, H),
              "b_ih": (GH,), "b_hh": (GH,), "peephole": (3, H), "h_n": (B, H), "c_n": (B, H)}
    for name, value in values.items():
        if value is None:
            if name in ("c0", "c_n") and cell.has_cell_state:
                raise TypeError(f"{name}: expected a ({B}, {H}) array for {cell.name}, got None")
            if name == "peephole" and cell.peephole:
                raise TypeError(f"peephole: expected a (3, {H}) array for {cell.name}, got None")
            continue
        if name in ("c0", "c_n") and not cell.has_cell_state:
            raise TypeError(f"{name}: expected None for {cell.name} (no cell state), "
                            f"got {type(value).__name__}")
        if name == "peephole" and not cell.peephole:
            raise TypeError(f"peephole: expected None for {cell.name}, got {type(value).__name__}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(value).__name__}")
        if value.dtype != dtype:
            raise TypeError(f"{name}: expected a {dtype.name} array (the dtype of x), "
                            f"got {value.dtype.name}")
        want = shapes[name]
        if value.ndim != len(want) or any(w is not None and w != v
                                          for w, v in zip(want, value.shape)):
            shown = tuple("?" if w is None else w for w in want)
            raise ValueError(f"{name}: expected shape {shown}, got {value.shape}")
        if not value.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array, got strides {value.strides}")
        if not value.flags.aligned:
            raise ValueError(f"{name}: expected an aligned array, got an unaligned one")
        if name in ("h_n", "c_n") and not value.flags.writeable:
            raise ValueError(f"{name}: expected a writable array, got a read-only one")
    for out in ("h_n", "c_n"):
        if values[out] is None:
            continue
        for name in ("x", "h0", "c0") + (("c_n",) if out == "h_n" else ()):
            if values[name] is not None and np.may_share_memory(values[out], values[name]):
                raise ValueError(f"{out}: expected an array that does not overlap {name}, "
                                 "got one that does")
    if status:
        name = _STEP_NAMES[status - 1] if status > 0 else "arguments"
        raise ValueError(f"{name}: refused by the compiled kernel (status {status}) for "
                         f"{cell.name} with x {x.shape}, h0 {np.shape(h0)}")


# ---------------------------------------------------------------------------------------------
# Small batches

_small_batch_max = {False: config.SMALL_BATCH_MAX, True: config.SMALL_BATCH_MAX_TRAIN}


def set_small_batch_max(n, train=False):
    """Batches of at most n rows run the unit-split forward loop (0: never), in inference calls,
    or with train=True in the forward calls that keep a cache for backward."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected an integer >= 0, got {n!r}")
    _small_batch_max[bool(train)] = int(n)


def get_small_batch_max(train=False):
    """The largest batch that runs the unit-split forward loop (0: none), for inference calls or
    with train=True for training forward calls."""
    return _small_batch_max[bool(train)]


_pack_limits = [config.PANEL_MIN_ROWS, config.PANEL_MAX_BYTES]


# ---------------------------------------------------------------------------------------------
# The AMX tile unit (fastrnn/_numba/amx.py, kernels/amx.h): float32 products of the packed
# batch-row loop (forward and backward) over at least amx.MIN_ROWS rows of x, and the input
# projection of the unit-split loop when it packs. On where the CPU has it unless FASTRNN_AMX=0
# at import.

_amx = [amx.AVAILABLE and os.environ.get("FASTRNN_AMX", "1").strip() != "0"]


def amx_available():
    """Whether this CPU and OS let float32 products run on the AMX tile unit (and the Cython
    extension that carries its kernels is built)."""
    return amx.AVAILABLE


def set_amx(on):
    """Use the AMX tile unit for float32 products (when available) or not; returns the previous
    setting. The results differ from the AVX path's within float32 rounding."""
    if not isinstance(on, (bool, np.bool_)):
        raise TypeError(f"on: expected True or False, got {type(on).__name__} {on!r}")
    previous = _amx[0]
    _amx[0] = bool(on) and amx.AVAILABLE
    return previous


def get_amx():
    """Whether float32 products use the AMX tile unit now."""
    return _amx[0]


def _uses_amx(dtype):
    return _amx[0] and dtype == np.float32


def _set_pack_limits(min_rows, max_bytes):
    """Tuning and test hook: the unit-split loop packs its weights into panels when a call has
    T*B >= min_rows and a thread's packed w_hh takes at most max_bytes (see
    config.PANEL_MIN_ROWS); the GEMM loop (forward and backward) when T*B >= min_rows and
    B <= config.PACKED_B_MAX. Returns the previous (min_rows, max_bytes)."""
    previous = tuple(_pack_limits)
    _pack_limits[:] = [int(min_rows), int(max_bytes)]
    return previous


def _gemm_packs(T, B):
    """Does a GEMM-loop call (forward or backward) of T steps and B rows pack its weights."""
    return T * B >= _pack_limits[0] and B <= config.PACKED_B_MAX


_pool = [True]


def _pool_threads(B, GH, H, limit):
    """Threads for a packed GEMM-loop call: all of limit from config.POOL_MIN_WORK on."""
    return limit if B * GH * (H + 64) >= config.POOL_MIN_WORK else 1


def _set_pool(on):
    """Tuning and test hook: True (the default), a packed GEMM-loop call (see _gemm_packs) makes
    no BLAS call and uses every thread for its products and passes; False, its per-step
    products run over the packed weights on the calling thread, its input projection and
    gradient products on BLAS (passes as in an unpacked call). Returns the previous setting."""
    previous = _pool[0]
    _pool[0] = bool(on)
    return previous


def _packed_bytes(dtype, units, GH, H):
    """The bytes of a thread's packed w_hh (G blocks of its units' rows, whole panels) when the
    unit-split loop runs on `units` threads."""
    NR = 2 * config.PANEL_VECTOR_BYTES // np.dtype(dtype).itemsize
    j0, j1 = kernels.unit_range.py_func(0, units, H)
    return GH // H * -(-(j1 - j0) // NR) * NR * H * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Threads

def _find_blas_threads_functions():
    """(set, get) of the OpenBLAS that scipy.linalg.cython_blas calls, or (None, None).

    The OpenBLAS bundled in scipy's wheels is already loaded by the time this runs (the kernels
    import cython_blas); CDLL on its path returns that same loaded library. Otherwise fall back
    on threadpoolctl.
    """
    from ..dispatch import _openblas_threads_functions
    setter, getter = _openblas_threads_functions("scipy")
    if setter is not None:
        return setter, getter
    try:
        import threadpoolctl
    except ImportError:
        return None, None

    def setter(n):
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")

    def getter():
        return min((info["num_threads"] for info in threadpoolctl.threadpool_info()
                    if info["user_api"] == "blas"), default=None)
    return setter, getter


_blas_set_num_threads, _blas_get_num_threads = _find_blas_threads_functions()
_num_threads = numba.config.NUMBA_NUM_THREADS


# Fork. Numba's omp threading layer (the one picked here when TBB is absent) runs on GNU
# OpenMP, whose thread pool does not survive fork: the child's copy of the pool names threads
# that do not exist, and a parallel region waits for them for ever. Numba guards against that
# by killing a forked child's first parallel launch ("Terminating: fork() called from a process
# already using GNU OpenMP"), whatever its thread count. So, around a fork:
# - before it, in the parent: the forking thread's OpenMP pool is shut down (OpenMP 5's
#   omp_pause_resource_all; the next parallel region makes a new one, a few tens of
#   microseconds once per fork), so the child starts with none and makes its own;
# - in the child: Numba's guard is told the child is the process that owns OpenMP now (the
#   guard kills a process whose parent is the process recorded by the layer's launch_threads;
#   called again in the child, it records the child), and the locks of this module, which a
#   thread that does not exist in the child may have held, are made afresh.
# fastrnn.dispatch sets the child's thread count (one, until set_num_threads).

def _gnu_openmp_layer():
    """Numba's omppool module when the threading layer in use is GNU OpenMP, else None."""
    from numba.np.ufunc import parallel
    if parallel._threading_layer != "omp":      # not started yet, or tbb / workqueue
        return None
    from numba.np.ufunc import omppool
    return omppool if getattr(omppool, "openmp_vendor", None) == "GNU" else None


_openmp_pause = []      # omp_pause_resource_all of the OpenMP runtime omppool loaded, or None


def _before_fork():
    layer = _gnu_openmp_layer()
    if layer is None:
        return
    if not _openmp_pause:
        # the runtime omppool is linked with (a symbol lookup through its handle finds it)
        _openmp_pause.append(getattr(ctypes.CDLL(layer.__file__), "omp_pause_resource_all",
                                     None))
        if _openmp_pause[0] is not None:
            _openmp_pause[0].argtypes, _openmp_pause[0].restype = [ctypes.c_int], ctypes.c_int
    if _openmp_pause[0] is not None:
        _openmp_pause[0](1)     # omp_pause_soft


def _after_fork_in_child():
    global _compile_lock, _launch_lock
    _compile_lock, _launch_lock = threading.Lock(), threading.Lock()
    layer = _gnu_openmp_layer()
    if layer is not None:
        from numba.np.ufunc import parallel
        ctypes.CFUNCTYPE(None, ctypes.c_int)(layer.launch_threads)(parallel.NUM_THREADS)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def set_num_threads(n):
    """Threads for the elementwise passes (Numba) and for BLAS (scipy's OpenBLAS).

    Numba's own setting is per thread; each kernel call applies this one in its calling thread
    (passes smaller than config.PARALLEL_MIN_ELEMENTS run on one thread whatever n is). BLAS:
    scipy's bundled OpenBLAS through its set_num_threads symbol (ctypes), else threadpoolctl
    if installed, else untouched. n is at most NUMBA_NUM_THREADS, fixed when Numba starts.
    """
    global _num_threads
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"n: expected an integer in [1, {limit}] (NUMBA_NUM_THREADS), got {n!r}")
    _num_threads = int(n)
    numba.set_num_threads(_num_threads)
    if _blas_set_num_threads is not None:
        _blas_set_num_threads(_num_threads)


def get_num_threads():
    """The thread count set_num_threads set (by default every core Numba sees)."""
    return _num_threads
