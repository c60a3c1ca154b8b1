"""The Numba backend: ``layer_forward`` / ``layer_backward`` with the contract of
``fastrnn.cells``, and the layer's one-step call ``layer_call_step``.

This module does the Python side of a call: it picks the loop (``kernels``, its docstring has
the design), cuts the one workspace of the call into the named buffers, puts the initial
state in its slot, and runs the compiled loop of ``kernels.py`` for the array dtype:

- inference calls with at most ``get_small_batch_max()`` batch rows (training forward calls:
  ``get_small_batch_max(train=True)``, 0 by default) run the unit-split loop, the others the
  batch-row loop; ``set_small_batch_max(0)`` turns the unit-split loop off;
- the unit-split loop packs its weights into panels when the call is long enough
  (``_set_pack_limits``); the batch-row loop packs w_hh for B <= config.PACKED_B_MAX when T*B
  is at least the pack limit, and then, on a pool of threads (``_set_pool``), makes no BLAS
  call at all.

Each loop is compiled with one explicit signature per dtype, on the first call in that dtype
(then loaded from Numba's cache): inputs are typed read-only and C-contiguous, ``y`` and ``dy``
as strided ('A' layout), so C-ordered or strided, writable or read-only arguments all run the
same machine code instead of compiling a variant for each combination. Absent arrays are
empty ones of the same type (a cell without c: c_slots (slots, 0, 0); no dy: (T, 0, 0); no
peephole: (0, 0)).
"""
import ctypes
import os
import subprocess
import sys
import threading
import time

import numpy as np
import numba
from numba import njit, types

from . import amx, cache, config, kernels
from .. import _scratch, cells, projection, reference


__all__ = ["layer_forward", "layer_backward", "layer_call_step", "concurrent_directions",
           "set_num_threads", "get_num_threads",
           "set_small_batch_max", "get_small_batch_max", "amx_available", "set_amx", "get_amx",
           "set_compile_mode", "get_compile_mode", "compiling", "wait_compiled"]


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

    i64, flag = types.int64, types.boolean
    spec = types.UniTuple(i64, 7)
    params = types.Tuple((const(2), const(2), const(1), const(1), const(2),
                          types.Array(types.float64, 1, "C", readonly=True)))
    plan = types.Tuple((i64, i64, flag, flag, flag))       # loop threads packed pool use_amx
    lengths = types.Array(types.int64, 1, "C", readonly=True)
    forward = types.none(
        spec, const(3), params, lengths, flag, flag, plan,     # x ... reverse train plan
        array(3, "A"),                                         # y
        types.Tuple((array(3), array(3), array(3), array(3), array(2),   # gates h_slots
                     const(3), const(3), array(3))),   # c_slots saved hh mask zone raw_c
        types.Tuple((array(4), array(3))))                     # own
    backward = types.none(
        spec, const(3), params, lengths, flag, i64, plan,      # x ... reverse truncate plan
        types.UniTuple(const(3), 7),    # gates h_slots c_slots saved mask zone raw_c
        const(3, "A"),                                         # dy
        types.Tuple((array(3), array(3), array(2), array(2), array(2), array(2), array(2),
                     const(1), array(2))),  # dgates dgates_hh dhh dh dc dsaved dpeep ones carry
        types.Tuple((array(2), array(2), array(1), array(1), array(2))),  # dparams
        array(3))                                              # dx
    # a projected LSTM with zoneout of h (kernels.forward_projected): w_hr, and the
    # projection's (proj_slots, h_raw, keep) / (proj_slots, keep, dh, dh_raw)
    w_hr = const(2)
    forward_projected = types.none(
        spec, const(3), params, w_hr, lengths, flag, flag, array(3, "A"), forward.args[8],
        types.Tuple((array(3), array(2), const(3))))
    backward_projected = types.none(
        spec, const(3), params, w_hr, lengths, flag, i64, backward.args[7],
        types.Tuple((const(3), const(3), array(2), array(2))), const(3, "A"),
        *backward.args[9:], array(2))
    # the one-step kernel takes plain cells only: options None, no options step pairs compiled
    step_params = types.Tuple(params.types[:5] + (types.none,))
    step = types.int64(
        spec, i64, flag, const(3), types.UniTuple(const(3), 2),  # threads batch_first x state0
        i64, step_params, types.UniTuple(array(3), 2), array(3), i64)  # row params state_n out col
    return {"forward_rows": forward, "forward_units": forward, "backward": backward,
            "step": step, "forward_projected": forward_projected,
            "backward_projected": backward_projected}


_LOOPS = {"forward_rows": kernels.forward_rows, "forward_units": kernels.forward_units,
          "backward": kernels.backward_loop, "step": kernels.step,
          "forward_projected": kernels.forward_projected,
          "backward_projected": kernels.backward_projected}
_dispatchers = {}       # (dtype, name) -> the loop's dispatcher, compiled or not

# every cache entry of the backend read and written under a lock (see cache.py)
cache.install(kernels.column_sums)


def _dispatcher(dtype, name):
    key = (np.dtype(dtype), name)
    if key not in _dispatchers:
        _dispatchers[key] = njit(**config.KERNEL)(_LOOPS[name])
    return _dispatchers[key]


def _kernel(dtype, name):
    """The loop ``name`` ("forward_rows", "forward_units", "backward" or "step") for this
    dtype, compiled or loaded from Numba's cache when first used, waiting for it: each on its
    own, so that a call compiles only the loop it runs."""
    compiled = _compiled.get((dtype, name))
    if compiled is None:
        dtype = np.dtype(dtype)
        with _compile_lock:
            compiled = _compiled.get((dtype, name))
            if compiled is None:
                # under a lock shared with other processes: one compiles, the others load
                compiled = cache.compile_once(_dispatcher(dtype, name), _signatures(dtype)[name],
                                              f"{name}-{dtype}")
                _compiled[dtype, name] = compiled
    return compiled


# ---------------------------------------------------------------------------------------------
# The first calls, while a loop compiles
#
# A loop takes one to three minutes to compile (docs/kernels.md). In the "background" compile
# mode (the default), a call whose loop is neither compiled in this process nor in Numba's cache
# starts a process that compiles it (and the loops the call will need next: backward after a
# training forward) into the cache, and runs on the NumPy reference meanwhile; the first call
# after that process has ended loads the loop from the cache (0.1-0.4 s) and runs on it. The
# compiling process goes on if this one ends first, so the next one finds the loops. In the
# "wait" mode a call compiles its loop itself and waits for it. A cache that Numba cannot
# write, or a process that ended without the loop, means the "wait" behaviour for that loop.

COMPILE_MODES = ("background", "wait")
_compile_mode = os.environ.get("FASTRNN_NUMBA_COMPILE", "background").strip() or "background"
if _compile_mode not in COMPILE_MODES:
    raise ValueError(f"FASTRNN_NUMBA_COMPILE: expected one of {COMPILE_MODES}, "
                     f"got {_compile_mode!r}")
_background = None     # the compiling process (subprocess.Popen), with .loops
_queued = []            # (dtype, name) wanted while the process compiled others
_tried = set()          # (dtype, name) that a process was started for


def set_compile_mode(mode):
    """"background" (the default; FASTRNN_NUMBA_COMPILE sets it at import): a loop that is not
    in Numba's cache compiles in another process while calls run on the NumPy reference;
    "wait": a call compiles the loop it needs and waits for it."""
    global _compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode: expected one of {COMPILE_MODES}, got {mode!r}")
    _compile_mode = mode


def get_compile_mode():
    return _compile_mode


def compiling():
    """The loops that another process is compiling for this one, or that wait their turn, as
    ("float32", "backward") pairs."""
    with _compile_lock:
        running = _background is not None and _background.poll() is None
        loops = (list(_background.loops) if running else []) + _queued
        return [(d.name, n) for d, n in loops if (d, n) not in _compiled]


def wait_compiled(timeout=None):
    """Wait until the loops that ``compiling()`` lists are compiled (at most ``timeout``
    seconds); True if none is left compiling. The next call that needs them loads them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _compile_lock:
            if _background is None or _background.poll() is not None:
                if not _start_next([]):
                    return True
            process = _background
        try:
            process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False


def _loaded(dtype, name):
    """The loop if this process has it or can load it from the cache, else None."""
    compiled = _compiled.get((dtype, name))
    if compiled is None and cache.load(_dispatcher(dtype, name), _signatures(dtype)[name]):
        compiled = _compiled[dtype, name] = _dispatcher(dtype, name)
    return compiled


def _background_command(loops):
    return [sys.executable, "-m", "fastrnn._numba.background"] + [
        f"{dtype.name}:{name}" for dtype, name in loops]


def _start_next(loops):
    """Start a process compiling ``loops`` and the queued ones, but those this process has,
    can load, or already started a process for; False if there is none or it cannot start."""
    wanted = loops + _queued
    _queued.clear()
    wanted = [loop for i, loop in enumerate(wanted) if loop not in wanted[:i]
              and loop not in _tried and _loaded(*loop) is None]
    return bool(wanted) and _start_background(wanted)


def _start_background(loops):
    """Start a process compiling ``loops`` into the cache; False if it cannot be."""
    global _background
    if not sys.executable or cache.folder(_dispatcher(*loops[0])) is None:
        return False
    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, FASTRNN_NUMBA_COMPILE="wait",
               PYTHONPATH=os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p))
    try:
        process = subprocess.Popen(_background_command(loops), env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    except OSError:
        return False
    process.loops = loops
    _background = process
    _tried.update(loops)
    return True


def _ready_kernel(dtype, name, then=()):
    """The loop ``name`` if it can run now: compiled, loaded from the cache, or (in the "wait"
    mode, or where no process can compile it) compiled here; None while a process compiles it
    (``then``: loops to compile after it, if a process is started)."""
    compiled = _compiled.get((dtype, name))
    if compiled is not None:
        return compiled
    dtype = np.dtype(dtype)
    if _compile_mode == "background":
        with _compile_lock:
            compiled = _loaded(dtype, name)
            if compiled is not None:
                return compiled
            key = (dtype, name)
            running = _background is not None and _background.poll() is None
            if running:
                for loop in (key,) + tuple((dtype, n) for n in then):
                    if loop not in _background.loops and loop not in _queued:
                        _queued.append(loop)
                return None
            if key not in _tried and _start_next([key] + [(dtype, n) for n in then]):
                return None
    return _kernel(dtype, name)


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
    unit-split loop, or a pooled packed batch-row call)."""
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


def _empty(dtype, shape):
    """A zero-size array standing for an absent argument (shared: nothing can be written to it)."""
    key = (np.dtype(dtype), shape)
    if key not in _empties:
        _empties[key] = np.empty(shape, dtype)
    return _empties[key]


_NO_OPTIONS = np.empty(0)
_NO_OPTIONS.flags.writeable = False
_options = {}


def _params(dtype, params, cell):
    """The parameter tuple the kernels take: (w_ih, w_hh, b_ih, b_hh, peephole, options), an
    empty peephole for the cells without one, options the cell's option values (float64, see
    kernels), empty for a plain cell. A layer-normalized cell's gains and shifts take the
    peephole's place (``cell.norm_array``)."""
    options = _NO_OPTIONS
    if not cell.plain:
        options = _options.get(cell)
        if options is None:
            options = _options[cell] = np.array(cell.option_values(), np.float64)
            options.flags.writeable = False
    if cell.layer_norm:
        params = tuple(params[:4]) + (cell.norm_array(params),)
    return tuple(params) + (_empty(dtype, (0, 0)),) * (5 - len(params)) + (options,)


class ForwardCache:
    """What backward needs: the forward call's x, params, lengths and reverse, and the cache
    buffers (see kernels), all cut from one workspace (``buffer``)."""

    __slots__ = ("x", "params", "lengths", "reverse", "buffer", "arrays")

    def __init__(self, x, params, lengths, reverse, buffer, arrays):
        self.x, self.params, self.lengths, self.reverse = x, params, lengths, reverse
        self.buffer, self.arrays = buffer, arrays  # (gates, h_slots, c_slots, saved, mask,
                                                   # zone, raw_c)


class _Output:
    """An array the kernel writes or adds into: itself when it can, else a C-ordered stand-in
    (the boundary lets a caller give strided, unaligned or read-only-typed outputs).

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

def _cell_spec(cell):
    """``cell.kernel_spec()``, for a cell with a step pair in this backend."""
    if cell.code not in kernels.CODES:
        raise ValueError(f"cell: {cell.name!r} (code {cell.code}) has no step pair in the "
                         f"Numba backend (fastrnn/_numba/kernels.py)")
    return cell.kernel_spec()


def layer_forward(cell, x, state0, params, lengths, reverse, train, y, state_n, threads=None,
                  recurrent_mask=None, zoneout=None):
    """One layer, one direction, all T steps; see ``fastrnn.cells`` for the arguments."""
    if cell.projected and projection.zones_h(zoneout, train):
        return _zoned_projection_forward(cell, x, state0, params, lengths, reverse, train, y,
                                         state_n, threads, recurrent_mask, zoneout)
    if cell.projected:          # run on the unprojected cell's kernels (fastrnn.projection)
        return projection.forward(layer_forward, cell, x, state0, params, lengths, reverse,
                                  train, y, state_n, threads, recurrent_mask, zoneout)
    dtype = x.dtype
    T, B, I = x.shape
    spec = _cell_spec(cell)
    _, G, states, saved_width, second, _, _ = spec
    H = state0[0].shape[1]
    GH = G * H
    slots = T + 1 if train else 2
    shapes = {"gates": (T, B, GH), "h_slots": (slots, B, H),
              "c_slots": (slots, B, H) if states == 2 else (slots, 0, 0),
              "saved": ((T, B, saved_width * H) if train else
                        (1, B, saved_width * H) if second < G else (1, 0, 0)),
              "hh": (B, GH),
              # zoneout in training: the cell's own c' of each step, for backward
              "raw_c": (T, B, H) if zoneout is not None and train and states == 2 else (1, 0, 0)}
    limit = _thread_limit(threads)
    masked = recurrent_mask is not None and train
    packed, pool = _gemm_packs(T, B) and not masked, False   # masks: the BLAS path only
    own = (_empty(dtype, (0, 0, 0, 0)), _empty(dtype, (0, 0, 0)))
    if B <= _small_batch_max[bool(train)] and not masked and not cell.whole_rows:
        # the unit-split loop on `threads` parts
        loop = kernels.UNITS
        work = GH * H * B                              # multiply-adds of h W_hh^T per step
        unit_threads = limit if work >= config.UNITS_PARALLEL_MIN_WORK else 1
        threads = max(1, min(unit_threads, -(-H // 16)))
        packed = T * B >= _pack_limits[0] and \
            _packed_bytes(dtype, threads, GH, H) <= _pack_limits[1]
        if threads > 1 and not train:
            # each part's gates in its own buffer (see kernels.forward_units_loop), cut from
            # this workspace: allocated in the kernel instead, the call was 8-12% slower (LSTM
            # T=200 B=16 H=256; likely the page faults: NumPy advises huge pages for large
            # arrays, Numba's allocator does not)
            C = kernels.unit_range.py_func(0, threads, H)[1]
            shapes["gates"] = (0, 0, 0)
            shapes["gates_own"] = (threads, T, B, G * C)
            shapes["hh_own"] = (threads, B, G * C)
        launch_threads = threads
    else:
        loop = kernels.ROWS
        pool = packed and _pool[0]
        threads = _pool_threads(B, GH, H, limit) if pool else 1
        launch_threads = threads if pool else _pass_threads(B * GH, limit)
    kernel = None
    if T * B > 0:
        kernel = _ready_kernel(dtype, "forward_units" if loop == kernels.UNITS else
                               "forward_rows", ("backward",) if train else ())
        if kernel is not None and train and _ready_kernel(dtype, "backward") is None:
            kernel = None       # backward must run on the forward's kind of cache
        if kernel is None:      # a loop is compiling in another process: the reference
            return reference.layer_forward(cell, x, state0, params, lengths, reverse, train,
                                           y, state_n, threads, recurrent_mask, zoneout)
    buffer, ws = _workspace(dtype, shapes)
    first = T - 1 if train and reverse and T > 0 else 0     # the slot of the initial state
    final = T if train else T & 1
    ws["h_slots"][first] = state0[0]
    if states == 2:
        ws["c_slots"][first] = state0[1]
    zone = cells.zoneout_weights(zoneout, dtype, T, B, H)
    arrays = (ws["gates"], ws["h_slots"], ws["c_slots"], ws["saved"],
              np.require(recurrent_mask, dtype, "C") if masked else _empty(dtype, (0, 0, 0)),
              _empty(dtype, (1, 1, 0)) if zone is None else zone, ws["raw_c"])  # (1, 1, 0): none
    if T * B > 0:
        if "gates_own" in ws:
            own = (ws["gates_own"], ws["hh_own"])
        out = _Output(y, "write", contiguous=False)
        _launch(kernel, launch_threads, spec, x, _params(dtype, params, cell), lengths,
                bool(reverse), bool(train), (loop, threads, packed, pool, _uses_amx(dtype)),
                out.array, arrays[:4] + (ws["hh"],) + arrays[4:], own)
        out.finish()
    for s_n, s_slots in zip(state_n, (ws["h_slots"], ws["c_slots"])):
        s_n[...] = s_slots[final]
    if not train:
        return None
    return ForwardCache(x, params, lengths, bool(reverse), buffer, arrays)


def layer_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0, dparams, threads=None):
    """Backward of ``layer_forward``; ADDS into dx, dstate0 and dparams (see
    ``fastrnn.cells``). Returns the hidden-side gate gradients (see ``fastrnn.cells``)."""
    if isinstance(cache, ZonedProjectionCache):
        return _zoned_projection_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0,
                                          dparams, threads)
    if cell.projected:
        return projection.backward(layer_backward, cell, cache, dy, dstate_n, truncate, dx,
                                   dstate0, dparams, threads)
    if isinstance(cache, reference.Cache):      # a forward that ran while its loop compiled
        return reference.layer_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0,
                                        dparams, threads)
    x = cache.x
    dtype = x.dtype
    T, B, I = x.shape
    spec = _cell_spec(cell)
    _, G, states, _, second, hidden_blocks, _ = spec
    H = cache.arrays[1].shape[2]
    GH = G * H
    params = _params(dtype, cache.params, cell)
    has = {True: (B, H), False: (0, 0)}
    _, ws = _workspace(dtype, {
        "dgates": (T, B, GH), "dgates_hh": (T, B, hidden_blocks * H),
        "dhh": (B, GH) if hidden_blocks else (0, 0),
        "dh": (B, H), "dc": has[states == 2], "dsaved": has[second < G],
        "dpeep": (B, params[4].size) if params[4].size else (0, 0), "ones": (T * B,),
        "carry": (B, cache.arrays[5].shape[2])})
    ws["ones"][...] = 1  # the BLAS bias gradients are ones @ dgates
    ws["dpeep"][...] = 0
    for d, d_n in zip((ws["dh"], ws["dc"]), dstate_n):
        d[...] = 0 if d_n is None else d_n
    if T * B > 0:
        grads, dnorm = _gradient_outputs(cell, dtype, dx, dparams, params[4].shape,
                                         dparams[4] if len(dparams) > 4 else None)
        packed = _gemm_packs(T, B) and cache.arrays[4].shape[0] == 0   # masks: BLAS only
        limit = _thread_limit(threads)
        pool = packed and _pool[0]
        threads = _pool_threads(B, GH, H, limit) if pool else 1
        _launch(_kernel(dtype, "backward"), threads if pool else _pass_threads(B * GH, limit),
                spec, x, params, cache.lengths, cache.reverse,
                0 if truncate is None else int(truncate),
                (kernels.ROWS, threads, packed, pool, _uses_amx(dtype)), cache.arrays,
                _empty(dtype, (T, 0, 0)) if dy is None else np.require(dy, requirements="A"),
                tuple(ws[name] for name in ("dgates", "dgates_hh", "dhh", "dh", "dc", "dsaved",
                                            "dpeep", "ones", "carry")),
                tuple(g.array for g in grads[1:]), grads[0].array)
        for g in grads:
            g.finish()
        if cell.layer_norm:
            cell.add_norm_gradients(dnorm, dparams)
    for d0, d in zip(dstate0, (ws["dh"], ws["dc"])):
        d0 += d
    return ws["dgates_hh"] if T * B > 0 and hidden_blocks else None


def _gradient_outputs(cell, dtype, dx, dparams, extra_shape, dpeephole):
    """The backward loops' outputs, ``[dx, dw_ih, dw_hh, db_ih, db_hh, extra]`` as _Output (add
    mode), and dnorm: extra is a layer-normalized cell's gains and shifts' gradient (dnorm,
    zeros of extra_shape, for cell.add_norm_gradients), else dpeephole (None: none)."""
    dnorm = np.zeros(extra_shape, dtype) if cell.layer_norm else None
    grads = [_Output(g, "add") for g in (dx, *dparams[:4])]
    if cell.whole_rows:
        # the loop's bias sums are of the gate gradients, not the biases': to scratch
        grads[3:5] = [_Output(np.zeros(dparams[2].shape, dtype), "add") for _ in range(2)]
    grads.append(_Output(dnorm if cell.layer_norm else
                         dpeephole if dpeephole is not None else _empty(dtype, (0, 0)), "add"))
    return grads, dnorm


class ZonedProjectionCache(ForwardCache):
    """ForwardCache of a projected LSTM with zoneout of h: ``arrays`` the unprojected cell's
    (h_slots: m), ``projection`` = (proj_slots, keep), ``cell`` the unprojected record."""

    __slots__ = ("projection", "cell")


def _zoned_projection_forward(cell, x, state0, params, lengths, reverse, train, y, state_n,
                              threads, recurrent_mask, zoneout):
    """layer_forward of a projected LSTM whose h zoneout mixes per unit (projection.zones_h),
    on kernels.forward_projected; the reference while that loop compiles."""
    if recurrent_mask is not None and train:
        raise ValueError("recurrent_mask: a projected LSTM takes no recurrent dropout")
    dtype = x.dtype
    T, B, _ = x.shape
    kernel_cell = cells.unprojected(cell)
    spec = _cell_spec(kernel_cell)
    _, G, _, saved_width, _, _, _ = spec
    w_hr = params[-1]
    P, H = w_hr.shape
    kernel = None
    if T * B > 0:
        kernel = _ready_kernel(dtype, "forward_projected", ("backward_projected",) if train else ())
        if kernel is not None and train and _ready_kernel(dtype, "backward_projected") is None:
            kernel = None
        if kernel is None:
            return reference.layer_forward(cell, x, state0, params, lengths, reverse, train, y,
                                           state_n, threads, recurrent_mask, zoneout)
    slots = T + 1 if train else 2
    z_h, z_c = zoneout
    buffer, ws = _workspace(dtype, {
        "gates": (T, B, G * H), "h_slots": (slots, B, H), "c_slots": (slots, B, H),
        "saved": (T, B, saved_width * H) if train else (1, 0, 0), "hh": (B, G * H),
        "raw_c": (T, B, H) if train else (1, 0, 0),
        "proj_slots": (slots, B, P), "h_raw": (B, P)})
    first = T - 1 if train and reverse and T > 0 else 0
    final = T if train else T & 1
    ws["h_slots"][first] = 0            # m before the first step: no LSTM step reads it
    ws["c_slots"][first] = state0[1]
    ws["proj_slots"][first] = state0[0]
    keep = np.full((1, 1, P), z_h, dtype) if np.isscalar(z_h) else np.require(z_h, dtype, "C")
    # the cell's own zoneout: c's weights, none for its h (m)
    zone = cells.zoneout_weights((0.0, z_c), dtype, T, B, H)
    arrays = (ws["gates"], ws["h_slots"], ws["c_slots"], ws["saved"], _empty(dtype, (0, 0, 0)),
              zone, ws["raw_c"])
    if T * B > 0:
        out = _Output(y, "write", contiguous=False)
        _launch(kernel, _pass_threads(B * G * H, _thread_limit(threads)), spec, x,
                _params(dtype, params[:-1], kernel_cell), w_hr, lengths, bool(reverse),
                bool(train), out.array, arrays[:4] + (ws["hh"],) + arrays[4:],
                (ws["proj_slots"], ws["h_raw"], keep))
        out.finish()
    else:
        y[...] = 0
        final = first
    state_n[0][...] = ws["proj_slots"][final]
    state_n[1][...] = ws["c_slots"][final]
    if not train:
        return None
    cache = ZonedProjectionCache(x, params, lengths, bool(reverse), buffer, arrays)
    cache.projection, cache.cell = (ws["proj_slots"], keep), kernel_cell
    return cache


def _zoned_projection_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0, dparams,
                               threads):
    """layer_backward of _zoned_projection_forward (kernels.backward_projected)."""
    x = cache.x
    dtype = x.dtype
    T, B, _ = x.shape
    kernel_cell = cache.cell
    spec = _cell_spec(kernel_cell)
    _, G, _, _, _, hidden_blocks, _ = spec
    params = _params(dtype, cache.params[:-1], kernel_cell)
    w_hr = cache.params[-1]
    P, H = w_hr.shape
    _, ws = _workspace(dtype, {
        "dgates": (T, B, G * H), "dgates_hh": (T, B, hidden_blocks * H),
        "dhh": (B, G * H) if hidden_blocks else (0, 0), "dm": (B, H), "dc": (B, H),
        "dsaved": (0, 0), "dpeep": (B, params[4].size) if params[4].size else (0, 0),
        "ones": (T * B,), "carry": (B, 2 * H), "dh": (B, P), "dh_raw": (B, P)})
    ws["ones"][...] = 1
    ws["dpeep"][...] = 0
    for d, d_n in zip((ws["dh"], ws["dc"]), dstate_n):
        d[...] = 0 if d_n is None else d_n
    if T * B > 0:
        grads, dnorm = _gradient_outputs(kernel_cell, dtype, dx, dparams, params[4].shape,
                                         dparams[4] if len(dparams) > 5 else None)
        grads.append(_Output(dparams[-1], "add"))
        _launch(_kernel(dtype, "backward_projected"),
                _pass_threads(B * G * H, _thread_limit(threads)), spec, x, params, w_hr,
                cache.lengths, cache.reverse, 0 if truncate is None else int(truncate),
                cache.arrays, cache.projection + (ws["dh"], ws["dh_raw"]),
                _empty(dtype, (T, 0, 0)) if dy is None else np.require(dy, requirements="A"),
                tuple(ws[name] for name in ("dgates", "dgates_hh", "dhh", "dm", "dc", "dsaved",
                                            "dpeep", "ones", "carry")),
                tuple(g.array for g in grads[1:6]), grads[0].array, grads[6].array)
        for g in grads:
            g.finish()
        if kernel_cell.layer_norm:
            kernel_cell.add_norm_gradients(dnorm, dparams)
    for d0, d in zip(dstate0, (ws["dh"], ws["dc"])):
        d0 += d
    return None


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
_call_kernels = [None, None]     # float32, float64: (the step kernel, absent c, absent peephole)
_STEP_SPECS = {cell.code: cell.kernel_spec() for cell in cells.CELLS.values()
               if cell.code in kernels.CODES}


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
    if type(x) is not np.ndarray or x.ndim != 3 or type(params) is not dict:
        return None
    B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    if B == 0 or T != 1:        # a sequence: the step kernel is not even compiled for it
        return None
    entry = _call_kernels[is_float64]
    if entry is None:
        dtype = _FLOAT64 if is_float64 else _FLOAT32
        kernel = _ready_kernel(dtype, "step")
        if kernel is None:      # compiling in another process: the general path meanwhile
            return None
        # absent c0 / c_n: (1, 0, 0), so that the kernel's c[row if cell state else 0] is a row
        entry = _call_kernels[is_float64] = (kernel, np.empty((1, 0, 0), dtype),
                                             _empty(dtype, (0, 0)))
    kernel, absent_c, absent_peephole = entry
    dtype = absent_c.dtype
    rows = layers * D
    cell_spec = _STEP_SPECS.get(code)
    if cell_spec is None:       # no step pair here: the general path says so
        return None
    has_c = cell_spec[2] == 2
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
    threads = _num_threads
    launch = None if _threadsafe_layer else _launch
    layer_input, input_batch_first = x, batch_first
    row = 0
    try:
        for layer in range(layers):
            out = y if layer == layers - 1 else np.empty((1, B, D * H), dtype)
            for col in range(0, D * H, H):
                w_ih, w_hh, b_ih, b_hh, peephole = names[row]
                args = (cell_spec, threads, input_batch_first, layer_input, (h0, c0), row,
                        (params[w_ih], params[w_hh],
                         zero_bias if b_ih is None else params[b_ih],
                         zero_bias if b_hh is None else params[b_hh],
                         absent_peephole if peephole is None else params[peephole],
                         None),
                        (h_n, c_n), out, col)
                if kernel(*args) if launch is None else launch(kernel, threads, *args):
                    return None
                row += 1
            layer_input, input_batch_first = out, False
    except (TypeError, KeyError):
        return None     # an argument of a type or layout the kernel does not take
    return y, ((h_n, c_n) if has_c else h_n)


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


def _packed_bytes(dtype, parts, GH, H):
    """The bytes of a thread's packed w_hh (G blocks of its units' rows, whole panels) when the
    unit-split loop runs on `parts` threads."""
    NR = 2 * config.PANEL_VECTOR_BYTES // np.dtype(dtype).itemsize
    j0, j1 = kernels.unit_range.py_func(0, parts, H)
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
    global _compile_lock, _launch_lock, _background
    _compile_lock, _launch_lock = threading.Lock(), threading.Lock()
    _background = None      # the parent's child: the parent waits for it, not this process
    _queued.clear()
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
