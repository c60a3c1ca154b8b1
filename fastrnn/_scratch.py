"""Big workspaces kept for the next call instead of going back to the operating system.

A training call allocates tens of MB of workspace (the forward cache, backward's gate
gradients). glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap``
pages and unmaps them on free, so every call page-faults its whole workspace in again: measured
(LSTM T=150 B=32 H=256, float32) 30-40 ms of a 80 ms forward + backward, depending on what else
the process held. ``empty`` hands out such buffers from a small pool; a buffer goes back to the
pool when the last array viewing it dies (a lease object is the arrays' base), so a forward
cache the caller keeps stays the caller's for as long as it is kept.

The layers' outputs and gradients come from here too (``zeros``, ``empty`` with a shape): an
array given to the caller is an ordinary NumPy array whose base is the lease, and its buffer
is the caller's until the caller lets it go. The pool keeps at most ``MAX_KEPT`` free buffers,
the most recently returned, holding at most ``MAX_KEPT_BYTES`` in all, so it keeps no more than
a few calls' workspaces; ``clear()`` lets them go.

No Python code runs when a lease dies: a weak reference to it calls ``list.append`` (C) with
itself, and the next ``empty`` (or ``clear``) moves the buffers of the dead leases to the free
list. A ``__del__`` here lost Ctrl-C: the signal's KeyboardInterrupt was raised inside the
finalizer, where Python prints and drops it (measured: 17 of 200 interrupts lost in a loop of
``empty``; the training command then ran on). So a buffer whose arrays are gone stays held
until the next pooled ``empty`` or ``clear``.
"""
import os
import threading
import weakref

import numpy as np

MIN_BYTES = 1 << 20       # smaller blocks come from malloc's own heap: no faults to save
# sizes rounded up to this, so that calls of about one size share; not to 2 MB huge pages: the
# rounded tail of a buffer could then sit in one more huge page (numba rnn-train-512 peak RSS
# 32.0-32.5 MB with 2 MB rounding, 31.1 with 64 KB; 30.9 unpooled)
ROUND_BYTES = 1 << 16
ALIGN = 64                # bytes: a cache line, a full AVX-512 vector
MAX_KEPT = 16             # free buffers kept (a 2-layer bidirectional call uses about 12)
MAX_KEPT_BYTES = 1 << 30  # and at most this much memory in them

_free = []                # free raw buffers (uint8 arrays), most recently returned last
_out = {}                 # weak reference to a live (or just dead) lease -> its raw buffer
_dead = []                # weak references of dead leases, appended by the weakref machinery
_lock = threading.Lock()


def _after_fork_in_child():
    # a thread that held the lock when another forked does not exist in the child
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Lease:
    """The base of the arrays ``empty`` returns; holds the raw buffer while any of them lives."""

    __slots__ = ("raw", "__array_interface__", "__weakref__")

    def __init__(self, raw, count, dtype):
        self.raw = raw
        self.__array_interface__ = {"version": 3, "shape": (count,), "typestr": dtype.str,
                                    "data": (raw.ctypes.data + (-raw.ctypes.data) % ALIGN, False)}


def _collect():
    # the buffers of dead leases into the free list, newest last, within the limits; with _lock
    while _dead:
        raw = _out.pop(_dead.pop(0), None)
        if raw is not None:
            _free.append(raw)
    del _free[:-MAX_KEPT]
    kept = sum(buffer.nbytes for buffer in _free)
    while kept > MAX_KEPT_BYTES:       # the oldest go first
        kept -= _free.pop(0).nbytes


def _lease(nbytes, count, dtype):
    # a lease on a free raw buffer of exactly nbytes (the rounded size), newest first; else on
    # a new one
    with _lock:
        _collect()
        for i in range(len(_free) - 1, -1, -1):
            if _free[i].nbytes == nbytes + ALIGN:
                raw = _free.pop(i)
                break
        else:
            raw = np.empty(nbytes + ALIGN, np.uint8)
        lease = _Lease(raw, count, dtype)
        _out[weakref.ref(lease, _dead.append)] = raw
    return lease


def empty(shape, dtype):
    """An uninitialised C-contiguous array (shape: an int or a tuple), from the pool when it is
    big."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    lease = _lease(-(-nbytes // ROUND_BYTES) * ROUND_BYTES, count, dtype)
    return np.asarray(lease).reshape(shape)


def zeros(shape, dtype):
    """``empty`` filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def clear():
    """Drop the free buffers (their memory goes back to the allocator)."""
    with _lock:
        _collect()
        _free.clear()


def free_buffers():
    """The free buffers the pool holds now (tests)."""
    with _lock:
        _collect()
        return list(_free)
