"""The Numba backend: ``layer_forward`` / ``layer_backward`` with the contract of ``fastrnn.cells``.

This module does the Python side of a call: it cuts the one workspace of the call into named
buffers, turns ``None`` into empty arrays so that every call has the same argument types, and
runs the compiled time loop of ``kernels.py`` for the array dtype.

Each loop is compiled with one explicit signature per dtype, on the first call in that dtype
(then loaded from Numba's cache): inputs are typed read-only and C-contiguous, ``y`` and ``dy``
as strided ('A' layout), so C-ordered or strided, writable or read-only arguments all run the
same machine code instead of compiling a variant for each combination.
"""
import glob
import os
import threading
import ctypes

import numpy as np
import numba
from numba import njit, types

from . import config, kernels

__all__ = ["layer_forward", "layer_backward", "set_num_threads", "get_num_threads"]


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
        index, flag, flag,                         # lengths reverse train
        array(3, "A"),                             # y
        array(3), array(3), array(3),              # cache: gates h_prev saved
        array(2), array(2), array(2), array(2))    # scratch: hgates h c rh
    backward = types.none(
        i64, const(3), const(2), const(2),         # code x w_ih w_hh
        const(2), index, flag, i64,                # peephole lengths reverse truncate
        const(3), const(3), const(3),              # cache: gates h_prev saved
        const(3, "A"), flag,                       # dy has_dy
        array(3), array(3), array(2), array(2),    # scratch: dgates dgates_n dh dc
        array(2), array(2), const(1),              # drh dpeep_rows ones
        array(3), array(2), array(2),              # dx dw_ih dw_hh
        array(1), array(1), array(2))              # db_ih db_hh dpeephole
    return forward, backward


def _kernels(dtype):
    """(forward, backward) compiled for this dtype; compiled or loaded from cache on first use."""
    pair = _compiled.get(dtype)
    if pair is None:
        with _compile_lock:
            pair = _compiled.get(dtype)
            if pair is None:
                forward_sig, backward_sig = _signatures(dtype)
                pair = (njit(forward_sig, **config.KERNEL)(kernels.forward_loop),
                        njit(backward_sig, **config.KERNEL)(kernels.backward_loop))
                _compiled[dtype] = pair
    return pair


# Numba's workqueue threading layer aborts when two threads launch parallel regions at once;
# tbb and omp do not. Until Numba has picked its layer (first parallel launch), and whenever it
# picked workqueue, kernel calls take this lock.
_launch_lock = threading.Lock()
_threadsafe_layer = False


def _launch(kernel, rows_work, *args):
    """Run a compiled loop; rows_work = B * G * H, the elements of one step's elementwise pass."""
    global _threadsafe_layer
    # Threads for the elementwise passes. A pass of a usual size takes tens of microseconds,
    # about what waking a second thread costs; worse, Numba's OpenMP threads and OpenBLAS's
    # threads then take turns on the same cores and each pool spins while it waits, which
    # slows the GEMMs down (by orders of magnitude on a machine that other work keeps busy).
    # So small passes run on the calling thread and only big ones are split.
    threads = _num_threads if rows_work >= config.PARALLEL_MIN_ELEMENTS else 1
    # Numba's thread count belongs to the calling thread: set it there, and put it back after
    caller_threads = numba.get_num_threads()
    if caller_threads != threads:
        numba.set_num_threads(threads)
    try:
        if _threadsafe_layer:
            kernel(*args)
            return
        with _launch_lock:
            kernel(*args)
            try:
                _threadsafe_layer = numba.threading_layer() in ("tbb", "omp")
            except ValueError:  # no parallel region has run yet
                pass
    finally:
        if caller_threads != threads:
            numba.set_num_threads(caller_threads)


# ---------------------------------------------------------------------------------------------
# Workspaces: one allocation per call, cut into named C-contiguous buffers

def _workspace(dtype, shapes):
    """One np.empty cut into buffers; shapes: {name: shape}. Returns (buffer, {name: view})."""
    align = config.ALIGN_ELEMENTS
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-int(np.prod(shape, dtype=np.int64)) // align) * align
    buffer = np.empty(total, dtype)
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
                  lengths, reverse, train, y, h_n, c_n):
    """One layer, one direction, all T steps; see ``fastrnn.cells`` for the arguments."""
    dtype = np.asarray(x).dtype
    x = _const("x", x, dtype, 3)
    T, B, _ = x.shape
    GH, H = np.shape(w_hh)
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
    buffer, ws = _workspace(dtype, shapes)
    ws["h"][...] = 0 if h0 is None else h0
    if cell.has_cell_state:
        ws["c"][...] = 0 if c0 is None else c0
    empty2, empty3 = _empty(dtype, 2), _empty(dtype, 3)
    h_prev, saved = ws.get("h_prev", empty3), ws.get("saved", empty3)
    if T * B > 0:
        out = _Output(y, "write", contiguous=False)
        forward, _ = _kernels(dtype)
        _launch(forward, B * GH, cell.code, x, _const("w_ih", w_ih, dtype, 2),
                _const("w_hh", w_hh, dtype, 2), _const("b_ih", b_ih, dtype, 1),
                _const("b_hh", b_hh, dtype, 1),
                empty2 if peephole is None else _const("peephole", peephole, dtype, 2),
                lengths, bool(reverse), bool(train),
                out.array, ws["gates"], h_prev, saved, ws["hgates"], ws["h"],
                ws.get("c", empty2), ws.get("rh", empty2))
        out.finish()
    h_n[...] = ws["h"]
    if cell.has_cell_state:
        c_n[...] = ws["c"]
    if not train:
        return None
    return ForwardCache(cell, (T, B, H), buffer, ws["gates"], h_prev, saved)


def layer_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                   lengths, reverse, cache, dy, dh_n, dc_n, truncate,
                   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeephole):
    """Backward of ``layer_forward``; ADDS into the gradient arrays (see ``fastrnn.cells``)."""
    dtype = np.asarray(x).dtype
    x = _const("x", x, dtype, 3)
    T, B, _ = x.shape
    GH, H = np.shape(w_hh)
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
        _, backward = _kernels(dtype)
        _launch(backward, B * GH, cell.code, x, _const("w_ih", w_ih, dtype, 2),
                _const("w_hh", w_hh, dtype, 2),
                empty2 if peephole is None else _const("peephole", peephole, dtype, 2),
                lengths, bool(reverse), 0 if truncate is None else int(truncate),
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


# ---------------------------------------------------------------------------------------------
# Threads

def _find_blas_threads_functions():
    """(set, get) of the OpenBLAS that scipy.linalg.cython_blas calls, or (None, None).

    The OpenBLAS bundled in scipy's wheels is already loaded by the time this runs (the kernels
    import cython_blas); CDLL on its path returns that same loaded library. Its symbols carry
    scipy's prefix (scipy_openblas_set_num_threads). Otherwise fall back on threadpoolctl.
    """
    import scipy
    root = os.path.dirname(scipy.__file__)
    candidates = (glob.glob(os.path.join(os.path.dirname(root), "scipy.libs", "*openblas*"))
                  + glob.glob(os.path.join(root, ".dylibs", "*openblas*")))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            setter = getattr(lib, prefix + "_set_num_threads", None)
            getter = getattr(lib, prefix + "_get_num_threads", None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
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
