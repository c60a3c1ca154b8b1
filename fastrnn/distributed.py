"""Synchronous data-parallel training on MPI (mpi4py), as Horovod and PyTorch's
DistributedDataParallel do it: every rank holds the whole model, computes the gradient of its
share of the batch, and the gradients are averaged by allreduce before every optimizer step.

    from fastrnn import distributed
    comm = distributed.world()                       # MPI.COMM_WORLD; needs the mpi extra
    model = fastrnn.charlm.CharLM(V, seed=comm.rank)  # any seed: rank 0's weights win
    distributed.broadcast_parameters(comm, model.params)
    opt = fastrnn.train.Adam(model.params)
    driver = fastrnn.train.TruncatedBPTT(model, loss, opt, k1, comm=comm)
    rows = distributed.batch_share(batch, comm.size, comm.rank)   # this rank's streams
    driver.step(x[:, rows], target[:, rows])         # same update on every rank

With the global batch split evenly (``batch_share`` refuses an uneven split), the averaged
gradient is the gradient of the mean loss over the whole batch, so N ranks make the updates one
process makes on the whole batch, to float rounding. See docs/distributed.md for the design,
the measurements and the cost model.

mpi4py is imported only when a function here is called; without it they raise
``MPIUnavailable`` saying which extra to install.
"""
import math
import os
import time

import numpy as np

__all__ = [
    "MPIUnavailable", "PeerTimeout", "mpi", "world", "launched_by_mpiexec", "batch_share",
    "broadcast_parameters", "GradientAllreduce", "wait_all", "gather_batch", "timeout_seconds",
]

INSTALL_HINT = 'pip install mpi4py mpich (the "mpi" extra: pip install ".[mpi]" in a clone)'
# Seconds a rank waits for the others in a collective before it aborts the whole job: long
# enough for rank 0's evaluations and saves, short enough that a stuck rank is noticed.
DEFAULT_TIMEOUT = 600.0


class MPIUnavailable(ImportError):
    """mpi4py (or an MPI library under it) is not installed."""


class PeerTimeout(RuntimeError):
    """The other ranks did not take part in a collective within the timeout."""


def mpi():
    """The ``mpi4py.MPI`` module (imported on first use, which initialises MPI)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MPIUnavailable(f"distributed training needs mpi4py and an MPI library: "
                             f"{INSTALL_HINT} ({exc})") from None
    return MPI


def world():
    """``MPI.COMM_WORLD``: every process ``mpiexec`` started."""
    return mpi().COMM_WORLD


def launched_by_mpiexec():
    """True when this process is one of several started by mpiexec (MPICH/Hydra, Open MPI,
    PMIx launchers set these), read from the environment without importing MPI."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def rank_from_environment():
    """This process's rank as mpiexec's launcher tells it in the environment (0 when not
    launched by one), without importing MPI."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def timeout_seconds():
    """The collective timeout: ``FASTRNN_MPI_TIMEOUT`` seconds, default ``DEFAULT_TIMEOUT``."""
    text = os.environ.get("FASTRNN_MPI_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"FASTRNN_MPI_TIMEOUT: expected a positive number of seconds, "
                         f"got {text!r}")
    return value


def batch_share(batch, size, rank):
    """The slice of the ``batch`` streams that ``rank`` of ``size`` ranks computes. An uneven
    split is refused: the ranks' mean losses would then weigh streams unequally, and the
    average of the ranks' gradients would not be the whole batch's."""
    if batch % size:
        below, above = batch - batch % size, batch - batch % size + size
        divisors = [n for n in range(1, batch + 1) if batch % n == 0]
        raise ValueError(
            f"--batch: {batch} streams cannot be split evenly over {size} ranks; give a "
            f"multiple of {size} ({', '.join(str(b) for b in (below, above) if b > 0)}) or run "
            f"on {', '.join(map(str, divisors))} ranks")
    share = batch // size
    return slice(rank * share, (rank + 1) * share)


def wait_all(requests, timeout=None, what="a collective"):
    """Wait for the MPI ``requests`` by polling, so that a rank that never joins is noticed
    after ``timeout`` seconds (``PeerTimeout``) and Python signal handlers run meanwhile.
    The first millisecond spins (an allreduce on one machine is done by then); after that it
    sleeps between polls, at most 1 ms, which adds at most that to a long wait."""
    MPI = mpi()
    if timeout is None:
        timeout = timeout_seconds()
    start = time.perf_counter()
    nap = 0.0
    while not MPI.Request.Testall(requests):
        waited = time.perf_counter() - start
        if waited > timeout:
            raise PeerTimeout(f"no answer from the other ranks in {timeout:g} s while waiting "
                              f"for {what} (FASTRNN_MPI_TIMEOUT): a rank is stuck or gone")
        if waited > 1e-3:
            nap = min(1e-3, nap + 5e-5)
            time.sleep(nap)


def _groups(arrays):
    """Lists of ``(key, array)`` with one dtype each, in the order of ``arrays``."""
    groups = {}
    for key, a in arrays.items():
        groups.setdefault(a.dtype, []).append((key, a))
    return list(groups.values())


def broadcast_parameters(comm, params, root=0):
    """Overwrite (in place) every array of ``params`` with ``root``'s, one ``Bcast`` of one
    flat buffer per dtype. Every rank must hold the same keys, shapes and dtypes; that is
    checked first (a cheap object broadcast of the layout), so a mismatch is an error that
    names the key instead of garbage."""
    layout = [(k, a.shape, a.dtype.str) for k, a in params.items()]
    root_layout = comm.bcast(layout, root=root)
    if root_layout != layout:
        differ = next((mine, theirs) for mine, theirs in zip(layout + [None], root_layout + [None])
                      if mine != theirs)
        raise ValueError(f"params: rank {comm.rank} holds {differ[0]} where rank {root} holds "
                         f"{differ[1]} (every rank must build the same model)")
    for group in _groups(params):
        flat = np.concatenate([a.ravel() for _, a in group])
        comm.Bcast(flat, root=root)
        offset = 0
        for _, a in group:
            a[...] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size


class _Bucket:
    """Gradients reduced together: one flat buffer per dtype, one Iallreduce each."""

    def __init__(self, grads, keys):
        self.groups = _groups({k: grads[k] for k in keys})
        self.buffers = [np.empty(sum(a.size for _, a in group), dtype=group[0][1].dtype)
                        for group in self.groups]
        self.nbytes = sum(b.nbytes for b in self.buffers)

    def pack(self):
        for group, flat in zip(self.groups, self.buffers):
            offset = 0
            for _, a in group:
                flat[offset:offset + a.size] = a.ravel()
                offset += a.size

    def unpack_mean(self, size):
        for group, flat in zip(self.groups, self.buffers):
            flat /= size                       # the mean of the ranks' means
            offset = 0
            for _, a in group:
                a[...] = flat[offset:offset + a.size].reshape(a.shape)
                offset += a.size


class GradientAllreduce:
    """Averages a gradient dict over the ranks of ``comm``, bucket by bucket.

    ``buckets`` lists the keys of ``grads`` in groups, in the order backward finishes them
    (``CharLM.grad_buckets()``: the head, then the recurrent stack, then the embedding); None
    is one bucket of everything. Per update::

        sync.begin()
        ... backward, calling sync.ready(i) as soon as bucket i's gradients are final ...
        sync.finish()          # starts the buckets not started, waits, writes the means back

    ``ready(i)`` copies the bucket into its flat buffer and starts a non-blocking
    ``Iallreduce`` (sum), so its reduction runs while backward computes the buckets below it;
    ``finish`` waits (``wait_all``, with the timeout) and divides by the number of ranks. The
    gradient arrays themselves are never handed to MPI: the model may keep writing the other
    buckets' arrays meanwhile. ``seconds_waiting`` and ``seconds_reducing`` add up, for
    measurements, the time ``finish`` waited and the time from the first start to the end.
    """

    def __init__(self, comm, grads, buckets=None, timeout=None):
        self.comm = comm
        self.grads = grads
        if buckets is None:
            buckets = [list(grads)]
        listed = [k for keys in buckets for k in keys]
        if sorted(listed) != sorted(grads):
            raise ValueError(f"buckets: expected every key of grads exactly once "
                             f"({sorted(grads)}), got {buckets}")
        self.buckets = [_Bucket(grads, keys) for keys in buckets if keys]
        self.nbytes = sum(b.nbytes for b in self.buckets)
        self.timeout = timeout
        self.seconds_waiting = 0.0
        self.seconds_reducing = 0.0
        self._requests = {}
        self._started_at = None

    def begin(self):
        """Forget the previous update's requests (a backward is about to start)."""
        self._requests = {}
        self._started_at = None

    def ready(self, index):
        """Bucket ``index``'s gradients are final on this rank: start reducing them."""
        if index in self._requests:
            return
        MPI = mpi()
        if self._started_at is None:
            self._started_at = time.perf_counter()
        bucket = self.buckets[index]
        bucket.pack()
        self._requests[index] = [self.comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
                                 for flat in bucket.buffers]
        # MPICH advances a non-blocking collective only inside MPI calls: nudge the others
        for requests in self._requests.values():
            MPI.Request.Testall(requests)

    def finish(self):
        """Start what is not started, wait for every bucket, write the means into ``grads``."""
        for index in range(len(self.buckets)):
            self.ready(index)
        t0 = time.perf_counter()
        wait_all([r for rs in self._requests.values() for r in rs], self.timeout,
                 "the gradients' allreduce")
        t1 = time.perf_counter()
        size = self.comm.size
        for bucket in self.buckets:
            bucket.unpack_mean(size)
        self.seconds_waiting += t1 - t0
        self.seconds_reducing += t1 - self._started_at
        self._requests = {}

    def agree(self, values):
        """The sum over the ranks of a few numbers (float64), non-blocking with the timeout:
        the losses to average, and the flags every rank must act on alike."""
        MPI = mpi()
        buffer = np.asarray(values, dtype=np.float64).copy()
        request = self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        wait_all([request], self.timeout, "the ranks' losses and flags")
        return buffer


def gather_batch(comm, array, axis, root=0, timeout=None):
    """On ``root``, the ranks' ``array``s (same shape and dtype on every rank: their even
    batch shares) joined along ``axis`` in rank order; None elsewhere. Every rank must call
    it; the wait has the timeout, as the gradients' has."""
    mine = np.ascontiguousarray(array)
    parts = np.empty((comm.size,) + mine.shape, mine.dtype) if comm.rank == root else None
    request = comm.Igather(mine, parts, root=root)
    wait_all([request], timeout, "the carried states for the checkpoint")
    if comm.rank != root:
        return None
    return np.concatenate(list(parts), axis=axis)
