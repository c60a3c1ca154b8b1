"""The Cython layer kernels: one generic time loop, forward and backward, for every cell.

``layer_forward`` / ``layer_backward`` follow the contract in ``fastrnn.cells`` (argument order,
lengths, reverse, truncation, gradients added into). Per call:

    forward   x_proj = x W_ih^T for all T steps in one GEMM, into the gate buffer of the workspace;
              per step one GEMM h W_hh^T (B, H) x (H, G*H) into a scratch buffer (GRU reset-before:
              a second one, (r*h) W_hn^T) and one fused pass over the batch rows (steps.pxd) that
              adds both biases, applies the activations, updates the state, writes y[t] and keeps
              the activated gates in place for backward. (The biases are added in the pass, not
              before the loop: that saves a write of the whole (T, B, G*H) buffer.)
    backward  per step one fused pass (dgates, stored in time order) and one GEMM for the state
              gradient; then dW_ih, dW_hh and dx are single GEMMs over all T*B rows and the bias
              gradients are GEMV reductions.

Small batches (B <= small_batch_max) take the unit-split forward loop instead (_units_loop: the
hidden units split over threads, each thread multiplying by its own rows of the weights, which
stay in its core's cache; same workspace and cache). ``layer_step`` is one step of inference
for a layer called on one time step: the same loop with T = 1, and for B <= small_batch_max
with x W_ih^T done the same way (no BLAS call at all).

Packed weights (panel.h). When a call has enough rows to pay for it (T*B >= _PACK_MIN_ROWS),
the per-step products multiply by a copy of w_hh packed once per call into panels that a
register-blocked kernel streams: about twice the speed of BLAS or of dot products at a few to a
few dozen rows (BLAS repacks w_hh for every small GEMM). The unit-split loop packs each
thread's own rows (and w_ih's for its input projection); the GEMM loops, for B <=
_PACKED_B_MAX, pack w_hh for the forward products h w_hh^T and its columns for backward's dh
w_hh, and do the input projection and the gradient products after backward's loop as packed
products too. Such a call makes no BLAS call, so its products (split by panels) and passes
(split by rows) use every thread: the two thread pools never wait on each other (see the
thread note below). Otherwise the loops fall back to dot products (rowdot.h) or BLAS.

The workspace (the cache) is one allocation per forward call, the backward workspace one per
backward call; the loops run without the GIL, passes split batch rows over OpenMP threads (see
the thread note below), and BLAS is only called outside parallel regions. Backward only reads
the cache, so one cache can serve several backward calls. Nothing is kept between calls.
"""
import os

import numpy as np

from fastrnn import _scratch

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cimport numpy as cnp

cimport openmp

cdef extern from "omp.h" nogil:
    ctypedef enum omp_pause_resource_t:
        omp_pause_soft
    int omp_pause_resource_all(omp_pause_resource_t kind)

cdef extern from "rowdot.h" nogil:
    void fr_rowdot_f32(const float* w, Py_ssize_t ldw, Py_ssize_t rows, Py_ssize_t k,
                       const float* x, Py_ssize_t ldx, Py_ssize_t nx, float* out, Py_ssize_t ldo)
    void fr_rowdot_f64(const double* w, Py_ssize_t ldw, Py_ssize_t rows, Py_ssize_t k,
                       const double* x, Py_ssize_t ldx, Py_ssize_t nx, double* out,
                       Py_ssize_t ldo)
    int fr_rowdot_limit_isa(int isa)
    void fr_barrier()

cdef extern from "panel.h" nogil:
    void fr_prefetch(const void* p, Py_ssize_t nbytes)
    Py_ssize_t fr_panel_width_f32()
    Py_ssize_t fr_panel_width_f64()
    Py_ssize_t fr_packed_size_f32(Py_ssize_t rows, Py_ssize_t k)
    Py_ssize_t fr_packed_size_f64(Py_ssize_t rows, Py_ssize_t k)
    void fr_pack_f32(const float* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                     Py_ssize_t k, float* packed)
    void fr_pack_f64(const double* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                     Py_ssize_t k, double* packed)
    void fr_packed_product_f32(const float* packed, Py_ssize_t rows, Py_ssize_t k,
                               const float* x, Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx,
                               float* out, Py_ssize_t ldo, int accumulate)
    void fr_packed_product_f64(const double* packed, Py_ssize_t rows, Py_ssize_t k,
                               const double* x, Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx,
                               double* out, Py_ssize_t ldo, int accumulate)

cdef extern from "amx.h" nogil:
    int fr_amx_init()
    Py_ssize_t FR_AMX_PANEL
    Py_ssize_t fr_amx_packed_size(Py_ssize_t rows, Py_ssize_t k)
    Py_ssize_t fr_amx_offset(Py_ssize_t r0, Py_ssize_t k)
    void fr_amx_pack(const float* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                     Py_ssize_t k, float* packed)
    void fr_amx_product(const float* packed, Py_ssize_t rows, Py_ssize_t k, const float* x,
                        Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx, float* out,
                        Py_ssize_t ldo, int accumulate)

from blas cimport gemm, gemv
from steps cimport (GRU, GRU_RESET_BEFORE, LSTM, LSTM_PEEPHOLE, RNN_RELU, RNN_TANH,
                    gru_backward_row, gru_forward_row, gru_rb_backward_row_r,
                    gru_rb_backward_row_zn, gru_rb_forward_row_n, gru_rb_forward_row_rz,
                    lstm_backward_row, lstm_forward_row, rnn_backward_row, rnn_forward_row)

__all__ = ["layer_forward", "layer_backward", "layer_step", "layer_call_step",
           "concurrent_directions",
           "set_num_threads", "get_num_threads",
           "effective_num_threads", "set_small_batch_max", "get_small_batch_max",
           "amx_available", "set_amx", "get_amx"]

# Threads. The per-step passes alternate with BLAS calls, and both thread pools spin a while
# before they sleep: OpenMP workers spin through the next GEMM, BLAS workers through the next
# pass. If the two pools together want more cores than there are, every step waits on a thread
# the scheduler has parked, and a layer runs 10 to 100 times slower (measured: 2 cores, OpenBLAS
# and OpenMP at 2 threads each, LSTM T=150 B=32 H=256 training: 3 to 16 s instead of 0.16 to
# 0.4 s, on a machine shared with other jobs).
# So the passes use at most (CPUs - BLAS threads + 1) threads, the caller's thread being shared.
# The BLAS thread count is read once, at import and on set_num_threads (threadpoolctl when it is
# installed, else OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS, else all CPUs, which
# is OpenBLAS's default).
cdef int _num_threads = max(1, openmp.omp_get_max_threads())
cdef int _pass_threads = 1


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_threads():
    """How many threads the BLAS behind scipy.linalg.cython_blas runs with (best effort)."""
    try:
        from threadpoolctl import threadpool_info
        counts = [int(info["num_threads"]) for info in threadpool_info()
                  if info.get("user_api") == "blas"]
        if counts:
            return max(counts)
    except Exception:            # not installed, or a library it cannot read: use the environment
        pass
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return _cpu_count()


def _update_pass_threads():
    global _pass_threads
    _pass_threads = max(1, min(_num_threads, _cpu_count() - _blas_threads() + 1))


def set_num_threads(int n):
    """OpenMP threads for the elementwise passes (split over batch rows); BLAS keeps its own.

    The passes use fewer when BLAS threads and these together would oversubscribe the CPUs
    (see effective_num_threads); on a 2-core machine with multi-threaded BLAS they run on the
    calling thread, and BLAS has both cores for the GEMMs, which are most of the time.
    """
    global _num_threads
    if n < 1:
        raise ValueError(f"n: expected a number of threads >= 1, got {n}")
    _num_threads = n
    _update_pass_threads()

_GATES = {RNN_TANH: 1, RNN_RELU: 1, LSTM: 4, LSTM_PEEPHOLE: 4, GRU: 3, GRU_RESET_BEFORE: 3}


def get_num_threads():
    """The number given to set_num_threads (by default OpenMP's, e.g. OMP_NUM_THREADS)."""
    return _num_threads


def effective_num_threads():
    """Threads the elementwise passes actually use, after the oversubscription guard."""
    return _pass_threads


_update_pass_threads()


# Fork. GNU OpenMP's thread pool does not survive fork: the child's copy of the pool names
# threads that do not exist, and its first parallel region of more than one thread waits for
# them for ever. So before a fork the forking thread's pool is shut down (OpenMP 5's
# omp_pause_resource_all; the parent's next parallel region makes a new one, a few tens of
# microseconds once per fork) and the child starts with none: it makes its own when it runs
# threads (fastrnn.dispatch starts it on one, until set_num_threads).
def _before_fork():
    with nogil:
        omp_pause_resource_all(omp_pause_soft)


os.register_at_fork(before=_before_fork)
cnp.import_array()


# The tile unit (AMX, kernels/amx.h) for float32 packed products of at least _AMX_MIN_ROWS rows
# of x: each operand split into three bfloat16 parts, six part products, as accurate as float32
# arithmetic (amx.h). On unless FASTRNN_AMX=0 in the environment at import, or set_amx(False).
# A tile holds 16 rows of x: with fewer, most of its work would be padding.
cdef bint _amx_available = fr_amx_init() != 0
cdef bint _amx_on = _amx_available and os.environ.get("FASTRNN_AMX", "1").strip() != "0"
cdef Py_ssize_t _AMX_MIN_ROWS = 16


def amx_available():
    """Whether this CPU and OS let float32 products run on the AMX tile unit."""
    return bool(_amx_available)


def set_amx(on):
    """Use the AMX tile unit for float32 products (when available; see amx_available) or not;
    returns the previous setting. The results differ from the AVX path's within float32
    rounding (both are float32-accurate sums in different orders)."""
    global _amx_on
    if not isinstance(on, (bool, np.bool_)):
        raise TypeError(f"on: expected True or False, got {type(on).__name__} {on!r}")
    previous = bool(_amx_on)
    _amx_on = bool(on) and _amx_available
    return previous


def get_amx():
    """Whether float32 products use the AMX tile unit now."""
    return bool(_amx_on)


# Small batches. B <= _small_batch_max takes the unit-split forward loop (no BLAS in the time
# loop: it may use all _num_threads threads, see _units_loop); 0 turns it off. Inference: the
# default is the largest B for which it was measured faster than the GEMM loop (float32, 2
# threads, LSTM and GRU with H = 128..1024, issue 7): 2-10x at B <= 4, 1.1-1.4x at B = 8 and 16
# (H <= 256; about even at H = 512), slower from B = 32 on, where a GEMM uses the cores better.
# Training forward calls have their own limit, 0 by default: there the loop was measured 1.1-1.6x
# SLOWER at every B from 1 to 16 (LSTM T=100, H=256, forward + backward): the GEMMs of backward
# leave OpenBLAS's threads spinning, and they take the cores the loop's per-step barrier waits on.
cdef Py_ssize_t _small_batch_max = 16
cdef Py_ssize_t _small_batch_max_train = 0
# A second thread for the unit-split loops only pays for its barrier (and wake-up) when a step
# has enough weights to read: G*H*K*B multiply-adds per step (K = H in a forward call, I + H in
# layer_step). layer_step enters a parallel region per call (about 1 us with a barrier here), so
# it needs more: measured, whole one-step layer calls, weights 64-byte aligned, one thread vs
# two: LSTM I=H=128 (131K) 8.2 vs 9.0 us, I=H=144 (166K) 9.3 vs 8.9; GRU I=H=144 (124K) 7.1 vs
# 7.3, I=H=160 (154K) 8.0 vs 7.2.
cdef Py_ssize_t _UNIT_PARALLEL_MIN = 100000
cdef Py_ssize_t _STEP_PARALLEL_MIN = 150000


def set_small_batch_max(n, train=False):
    """Batches of at most n rows run the unit-split forward loop (0: never), in inference calls,
    or with train=True in the forward calls that keep a cache for backward."""
    global _small_batch_max, _small_batch_max_train
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int >= 0, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n}")
    if train:
        _small_batch_max_train = min(int(n), 2**62)
    else:
        _small_batch_max = min(int(n), 2**62)


def _set_zigzag(on):
    """Test and benchmark hook: the unit-split loop's alternating row order on or off; returns
    the previous setting."""
    global _zigzag
    if not isinstance(on, bool):
        raise TypeError(f"on: expected True or False, got {type(on).__name__} {on!r}")
    previous = _zigzag
    _zigzag = on
    return previous


def _limit_rowdot_isa(isa):
    """Test hook: float32 dot products (rowdot.h) on at most kernel `isa` (2 AVX-512, 1 AVX2,
    0 plain C; -1 the best the CPU has); returns the one taken."""
    return fr_rowdot_limit_isa(int(isa))


def get_small_batch_max(train=False):
    """The largest batch that runs the unit-split forward loop (0: none), for inference calls or
    with train=True for training forward calls."""
    return int(_small_batch_max_train if train else _small_batch_max)


# The unit-split loop multiplies by weights packed once per call (panel.h: about twice the
# speed of the dot products from 4 rows of h on, 1.25x for one row) when the call has enough
# steps to pay for packing (a pass over the weights: about 6 one-row steps' worth), T*B rows at
# least _PACK_MIN_ROWS, and a thread's packed W_hh stays in its L2 (at most _PACK_MAX_BYTES;
# beyond that a step streams the weights from L3 either way and packing only adds a pass).
cdef Py_ssize_t _PACK_MIN_ROWS = 32
cdef Py_ssize_t _PACK_MAX_BYTES = 1 << 20
# Its weight rows are read in the opposite order every other step, in runs of _ZIGZAG_ROWS:
# when a thread's rows about fill its L2, the same order every step evicts each row just before
# it is needed again; reversed, the rows read last are the first read next (measured, one core,
# 2 MB of rows and a 2 MB L2: 67 -> 93 GB/s)
cdef bint _zigzag = True
cdef Py_ssize_t _ZIGZAG_ROWS = 32
# The GEMM loops (larger batches, training) multiply over packed weights for up to this many
# rows (B), with BLAS above. Such a call makes no BLAS call at all (its input projection and
# gradient products are packed products too), so its products and passes use every thread
# (_num_threads). (With BLAS in the same call, packed per-step products on two threads were
# measured 2x SLOWER: BLAS workers spinning after a GEMM take the cores they wait on; on the
# calling thread alone, 0-20 % faster than BLAS; with every product packed, 5-25 % faster.)
# _set_pool(False): the packed per-step products on the calling thread, BLAS for the rest.
# The limit: LSTM I = H = 256, T = 50, 2 threads, training: B = 32 24-26 vs 29-31 ms (BLAS),
# B = 64 51 vs 55, B = 128 118-123 vs 108-110 (inference: faster at 128 too, 25-28 vs 32).
cdef Py_ssize_t _PACKED_B_MAX = 64
cdef bint _pool_off = False
# rows of T*B per chunk of the weight-gradient products (_weight_gradient)
cdef Py_ssize_t _GRAD_CHUNK = 256


def _set_pool(on):
    """Tuning and test hook: whether packed GEMM-loop calls use all the threads; returns the
    previous setting."""
    global _pool_off
    previous = not _pool_off
    _pool_off = not on
    return previous


cdef inline bint _packs(Py_ssize_t T, Py_ssize_t B) noexcept nogil:
    # does a GEMM-loop call (forward or backward) of T steps and B rows pack its weights
    return T * B >= _PACK_MIN_ROWS and B <= _PACKED_B_MAX


cdef inline int _pool_threads(int limit, bint limited) noexcept nogil:
    # threads of a packed GEMM-loop call's pool, 0 for none (the one-off products on BLAS):
    # every thread the call may use; one thread is a pool too when the call was limited to it
    # (a direction running beside the other: no BLAS call, whose threads would compete)
    if _pool_off:
        return 0
    return limit if limit > 1 or limited else 0


def _thread_limit(threads):
    # the threads a call may use: threads=None, all (_num_threads); else at most that many
    if threads is None:
        return _num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected None or an integer >= 1, got {threads!r}")
    return min(int(threads), _num_threads)


def concurrent_directions(T, B, train):
    """Whether fastrnn.layers should run the two directions of a bidirectional layer at once,
    one thread each (layer_forward / layer_backward with threads=1): there are threads to spare
    and such a call makes no BLAS call (the unit-split loop, or a packed GEMM-loop call)."""
    if _num_threads < 2:
        return False
    return B <= (_small_batch_max_train if train else _small_batch_max) or \
        (_packs(T, B) and not _pool_off)


def _set_pack_limits(min_rows, max_bytes):
    """Tuning and test hook: calls of at least min_rows rows (T*B) pack their weights, the
    unit-split loop's only when a thread's packed w_hh takes at most max_bytes (see
    _PACK_MIN_ROWS); returns the previous (min_rows, max_bytes)."""
    global _PACK_MIN_ROWS, _PACK_MAX_BYTES
    previous = (int(_PACK_MIN_ROWS), int(_PACK_MAX_BYTES))
    _PACK_MIN_ROWS = int(min_rows)
    _PACK_MAX_BYTES = int(max_bytes)
    return previous


def _set_unit_parallel_min(n, step=None):
    """Tuning hook (benchmarks): the step size from which the unit-split loops use threads, and
    layer_step's (step; None: unchanged). Returns the previous (n, step)."""
    global _UNIT_PARALLEL_MIN, _STEP_PARALLEL_MIN
    previous = (int(_UNIT_PARALLEL_MIN), int(_STEP_PARALLEL_MIN))
    _UNIT_PARALLEL_MIN = int(n)
    if step is not None:
        _STEP_PARALLEL_MIN = int(step)
    return previous


cdef int _unit_threads(Py_ssize_t G, Py_ssize_t H, Py_ssize_t K, Py_ssize_t B,
                       int limit, Py_ssize_t min_work) noexcept:
    # threads for the unit-split loops: all of limit for steps of min_work multiply-adds or
    # more, at most one per 16 units
    cdef Py_ssize_t p = limit
    if G * H * K * B < min_work:
        p = 1
    return <int>max(1, min(p, H // 16))


# ---------------------------------------------------------------------------------------------
# Workspace layouts: offsets in elements into one flat array of the layer's dtype

cdef struct Layout:
    # forward workspace, kept as the cache when train
    Py_ssize_t gates    # (T, B, G*H)   x W_ih^T, then the activated gates (in place)
    Py_ssize_t h        # (T+1, B, H)   train: h before step t at slot t, the final h at slot T
                        # (2, B, H)     inference: the state, two slots used in turn
    Py_ssize_t c        # like h, LSTM only (-1 otherwise)
    Py_ssize_t extra    # (T, B, H) GRU: W_hn h + b_hn (reset after) or r*h (reset before);
                        # inference: (B, H) r*h scratch (reset before); -1 when not needed
    Py_ssize_t hh       # (B, G*H)      scratch: h W_hh^T of the current step (the GRU step
                        #               turns its n block into W_hn h + b_hn in place)
    Py_ssize_t size


cdef struct BackLayout:
    Py_ssize_t dgates   # (T, B, G*H)   dL/d(x W_ih^T + b_ih), time order
    Py_ssize_t dhn      # (T, B, H)     GRU reset after: dL/d(W_hn h + b_hn) = da_n * r; else -1
    Py_ssize_t dhidden  # (B, 3H)       GRU reset after: dL/d(W_hh h + b_hh) of the current step
    Py_ssize_t dh       # (B, H)        dL/dh of the state the loop has reached
    Py_ssize_t dc       # (B, H)        dL/dc, LSTM only
    Py_ssize_t drh      # (B, H)        GRU reset before: dL/d(r*h) of the current step
    Py_ssize_t dpeep    # (B, 3H)       peephole: per-row sums of da_i*c, da_f*c, da_o*c'
    Py_ssize_t ones     # (T*B,)        ones, for the bias reductions as GEMV
    Py_ssize_t size


cdef inline bint _has_c(int code) noexcept nogil:
    return code == LSTM or code == LSTM_PEEPHOLE


cdef Layout _layout(int code, Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t G,
                    bint train) noexcept:
    cdef Layout L
    cdef Py_ssize_t slots = T + 1 if train else 2
    cdef Py_ssize_t n = 0
    L.gates = n; n += T * B * G * H
    L.h = n; n += slots * B * H
    L.c = -1
    if _has_c(code):
        L.c = n; n += slots * B * H
    L.extra = -1
    if train and (code == GRU or code == GRU_RESET_BEFORE):
        L.extra = n; n += T * B * H
    elif code == GRU_RESET_BEFORE:
        L.extra = n; n += B * H
    L.hh = n; n += B * G * H
    L.size = n
    return L


cdef BackLayout _back_layout(int code, Py_ssize_t T, Py_ssize_t B, Py_ssize_t H,
                             Py_ssize_t G) noexcept:
    cdef BackLayout L
    cdef Py_ssize_t n = 0
    L.dgates = n; n += T * B * G * H
    L.dhn = L.dhidden = L.dc = L.drh = L.dpeep = -1
    if code == GRU:
        L.dhn = n; n += T * B * H
        L.dhidden = n; n += B * G * H
    L.dh = n; n += B * H
    if _has_c(code):
        L.dc = n; n += B * H
    if code == GRU_RESET_BEFORE:
        L.drh = n; n += B * H
    if code == LSTM_PEEPHOLE:
        L.dpeep = n; n += B * 3 * H
    L.ones = n; n += T * B
    L.size = n
    return L


cdef inline floating* _at(floating* ws, Py_ssize_t offset) noexcept nogil:
    return ws + offset if offset >= 0 else NULL


cdef inline bint _any_active(const int64_t* lengths, Py_ssize_t t, Py_ssize_t B) noexcept nogil:
    cdef Py_ssize_t b
    if lengths == NULL:
        return True
    for b in range(B):
        if t < lengths[b]:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Forward: one fused pass over the batch rows of step t, and the time loop

cdef void _forward_row(int code, bint second, Py_ssize_t b, Py_ssize_t t,
                       Py_ssize_t j0, Py_ssize_t n,
                       floating* gates, floating* h_new, floating* c_new,
                       floating* extra, floating* y, Py_ssize_t y_row,
                       floating* hh, const floating* h, const floating* c,
                       const floating* b_ih, const floating* b_hh,
                       const floating* peephole, const int64_t* lengths,
                       Py_ssize_t G, Py_ssize_t H) noexcept nogil:
    # row b of step t, units [j0, j0 + n) (the whole row: 0, H); every pointer is the step's
    # (B, ...) block, the row and the units are picked here. lengths NULL: no padding.
    # Not inline: as a function of its own its pointers are plain arguments, not loads from the
    # OpenMP region's shared data, which lets the compiler vectorise the loops of the steps.
    cdef floating* g = gates + b * G * H + j0
    cdef floating* yb = y + b * y_row + j0
    cdef floating* eb = extra + b * H + j0 if extra != NULL else NULL
    cdef floating* hhb = hh + b * G * H + j0
    cdef floating* hb_new = h_new + b * H + j0
    cdef floating* cb_new = c_new + b * H + j0 if c_new != NULL else NULL
    cdef const floating* hb = h + b * H + j0
    cdef const floating* cb = c + b * H + j0 if c != NULL else NULL
    cdef const floating* pb = peephole + j0 if peephole != NULL else NULL
    cdef Py_ssize_t j
    if n <= 0:
        return
    if lengths != NULL and t >= lengths[b]:
        # padding: the state passes through, the output is zero
        if code == GRU_RESET_BEFORE and not second:
            memset(eb, 0, n * sizeof(floating))            # r*h of a padded row: zero, not stale
            return
        memcpy(hb_new, hb, n * sizeof(floating))
        if c != NULL:
            memcpy(cb_new, cb, n * sizeof(floating))
        for j in range(n):
            yb[j] = 0
        return
    if code == RNN_TANH or code == RNN_RELU:
        rnn_forward_row(g, hb_new, yb, hhb, b_ih + j0, b_hh + j0, n, H, code == RNN_RELU)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_forward_row(g, hb_new, cb_new, yb, hhb, b_ih + j0, b_hh + j0, cb, pb, n, H)
    elif code == GRU:
        gru_forward_row(g, eb, hb_new, yb, hhb, b_ih + j0, b_hh + j0, hb, n, H)
    elif not second:
        gru_rb_forward_row_rz(g, eb, hhb, b_ih + j0, b_hh + j0, hb, n, H)
    else:
        gru_rb_forward_row_n(g, hb_new, yb, hhb, b_ih + j0, b_hh + j0, hb, n, H)


cdef void _forward_pass(int code, bint second, Py_ssize_t t,
                        floating* gates, floating* h_new, floating* c_new,
                        floating* extra, floating* y, Py_ssize_t y_row,
                        floating* hh, const floating* h, const floating* c,
                        const floating* b_ih, const floating* b_hh, const floating* peephole,
                        const int64_t* lengths, Py_ssize_t B, Py_ssize_t G, Py_ssize_t H,
                        int nthreads) noexcept nogil:
    cdef Py_ssize_t b
    if nthreads > 1 and B > 1:
        for b in prange(B, schedule="static", num_threads=nthreads):
            _forward_row(code, second, b, t, 0, H, gates, h_new, c_new, extra, y, y_row, hh,
                         h, c, b_ih, b_hh, peephole, lengths, G, H)
    else:
        for b in range(B):
            _forward_row(code, second, b, t, 0, H, gates, h_new, c_new, extra, y, y_row, hh,
                         h, c, b_ih, b_hh, peephole, lengths, G, H)


cdef void _forward_loop(int code, bint reverse, bint train, int nthreads, int pool,
                        floating* ws, Layout L,
                        floating* y, Py_ssize_t y_step, Py_ssize_t y_row,
                        const floating* x, const floating* w_ih, int ld_ih,
                        const floating* w_hh, int ld_hh,
                        const floating* b_ih, const floating* b_hh, const floating* peephole,
                        const int64_t* lengths,
                        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                        Py_ssize_t G, int units, bint input_dots) noexcept nogil:
    # the state before the first step is in slot first_slot(...) of L.h / L.c (the caller put it)
    # units > 0: the unit-split loop on that many threads (input_dots: x W_ih^T by dot products
    # too, inside the loop's region: no BLAS call at all); else the batch-row-split loop with a
    # GEMM per step; pool: threads of the packed GEMM loop's pool (_pool_threads), 0: none
    cdef Py_ssize_t GH = G * H, BH = B * H, H2 = 2 * H
    cdef floating* gates = ws + L.gates
    cdef floating* hs = ws + L.h
    cdef floating* cs = _at(ws, L.c)
    cdef floating* extra = _at(ws, L.extra)
    cdef floating* hh = ws + L.hh
    cdef floating* h
    cdef floating* h_new
    cdef floating* gates_t
    cdef floating* extra_t
    cdef floating* c = NULL
    cdef floating* c_new = NULL
    cdef Py_ssize_t s, t, cur, nxt
    cdef bint active
    # the GEMM loop over packed weights (module notes) for calls with the rows to pay for
    # packing; then the input projection too is a packed product, and with no BLAS call in the
    # call every product and pass uses all the threads (_pool_threads). Packed w_hh: GRU
    # reset-before's r, z blocks (2H rows) apart from its n block (H rows, at n_at)
    cdef bint amx_in = _amx(ws, T * B), amx_h = _amx(ws, B)
    cdef Py_ssize_t n_at = _packed_size(ws, H2 if code == GRU_RESET_BEFORE else GH, H, amx_h)
    cdef floating* packed = NULL
    cdef int threads = 0
    if units == 0 and _packs(T, B):
        # one buffer: the input projection's packed w_ih first, then w_hh for the steps
        packed = <floating*>malloc(max(n_at + _packed_size(ws, H, H, amx_h),
                                       _packed_size(ws, GH, I, amx_in)) * sizeof(floating))
        threads = pool if packed != NULL else 0
    if threads > 0:
        _pack_and_multiply_mt(w_ih, ld_ih, 1, GH, I, x, I, 1, T * B, gates, GH, False, packed,
                              threads, amx_in)
    elif not input_dots:
        # x_proj = x @ w_ih.T for all steps:  (T*B, I) x (I, G*H)
        gemm(False, True, <int>(T * B), <int>GH, <int>I, 1, x, <int>I, w_ih, ld_ih, 0, gates,
             <int>GH)
    if units > 1:
        with parallel(num_threads=units):
            _units_loop(code, reverse, train, input_dots, openmp.omp_get_thread_num(),
                        openmp.omp_get_num_threads(),
                        ws, L, y, y_step, y_row, x, w_ih, ld_ih, w_hh, ld_hh, b_ih, b_hh,
                        peephole, lengths, T, B, I, H, G)
        return
    if units == 1:
        _units_loop(code, reverse, train, input_dots, 0, 1, ws, L, y, y_step, y_row, x, w_ih,
                    ld_ih, w_hh, ld_hh, b_ih, b_hh, peephole, lengths, T, B, I, H, G)
        return
    if packed != NULL:
        if code == GRU_RESET_BEFORE:
            _pack_mt(w_hh, ld_hh, 1, H2, H, packed, max(threads, 1), amx_h)
            _pack_mt(w_hh + H2 * ld_hh, ld_hh, 1, H, H, packed + n_at, max(threads, 1), amx_h)
        else:
            _pack_mt(w_hh, ld_hh, 1, GH, H, packed, max(threads, 1), amx_h)
        nthreads = max(threads, 1)
    for s in range(T):
        t = T - 1 - s if reverse else s
        cur = _state_slot(s, t, T, reverse, train, False) * BH
        nxt = _state_slot(s, t, T, reverse, train, True) * BH
        h, h_new = hs + cur, hs + nxt
        if cs != NULL:
            c, c_new = cs + cur, cs + nxt
        extra_t = extra + t * BH if train and extra != NULL else extra
        gates_t = gates + t * B * GH
        active = _any_active(lengths, t, B)      # else every row is padding: no GEMM needed
        if code == GRU_RESET_BEFORE:
            if active:
                # hh[:, :2H] = h @ w_hh[:2H].T
                _hidden_product(w_hh, ld_hh, packed, 0, 2, h, B, H, hh, GH, nthreads, amx_h)
            _forward_pass(code, False, t, gates_t, h_new, c_new, extra_t, y + t * y_step, y_row,
                          hh, h, c, b_ih, b_hh, peephole, lengths, B, G, H, nthreads)
            if active:
                # hh[:, 2H:] = (r * h) @ w_hh[2H:].T
                _hidden_product(w_hh, ld_hh, packed + n_at if packed != NULL else NULL, 2, 3,
                                extra_t, B, H, hh, GH, nthreads, amx_h)
        elif active:
            # hh = h @ w_hh.T:  (B, H) x (H, G*H)
            _hidden_product(w_hh, ld_hh, packed, 0, G, h, B, H, hh, GH, nthreads, amx_h)
        _forward_pass(code, True, t, gates_t, h_new, c_new, extra_t, y + t * y_step, y_row,
                      hh, h, c, b_ih, b_hh, peephole, lengths, B, G, H, nthreads)
    free(packed)


cdef inline void _hidden_product(const floating* w_hh, int ld_hh, const floating* packed,
                                 Py_ssize_t g0, Py_ssize_t g1, const floating* v, Py_ssize_t B,
                                 Py_ssize_t H, floating* hh, Py_ssize_t GH, int nthreads,
                                 bint amx) noexcept nogil:
    # hh[:, blocks g0 .. g1-1] = v @ w_hh[blocks g0 .. g1-1].T, v (B, H): over the packed copy
    # of those blocks when there is one, else one GEMM
    if packed != NULL:
        _packed_product_mt(packed, (g1 - g0) * H, H, v, H, B, hh + g0 * H, GH, False,
                           nthreads, amx)
    else:
        gemm(False, True, <int>B, <int>((g1 - g0) * H), <int>H, 1, v, <int>H,
             w_hh + g0 * H * ld_hh, ld_hh, 0, hh + g0 * H, <int>GH)


# ---------------------------------------------------------------------------------------------
# Forward, small batches: the unit-split loop
#
# For B <= small_batch_max the recurrent product of a step, (B, H) x (H, G*H), is too thin for a
# GEMM (BLAS packs the whole weight matrix for a few rows; measured 10-20x slower than reading
# it once). Instead the hidden units [0, H) are split into one contiguous range per thread;
# thread p computes, for its units only, the G gate rows of h W_hh^T as dot products of rows of
# w_hh with the B rows of h (each weight read once per step for all rows, rowdot.h), then runs
# the cell's step on its units of every row (_forward_row with a unit range). Its weight rows
# are the same every step, so they stay in its own cache. The state is double-buffered (the
# layouts' slots), so one barrier per step suffices: nobody reads h_new before every thread has
# written its part; the GRU reset-before step needs all of r*h before its n block: two barriers.

cdef inline void _rowdot(const floating* w, Py_ssize_t ldw, Py_ssize_t rows, Py_ssize_t k,
                         const floating* x, Py_ssize_t ldx, Py_ssize_t nx,
                         floating* out, Py_ssize_t ldo) noexcept nogil:
    # out[b*ldo + r] = w[r, :k] . x[b, :k]  for r < rows, b < nx
    if floating is float:
        fr_rowdot_f32(w, ldw, rows, k, x, ldx, nx, out, ldo)
    else:
        fr_rowdot_f64(w, ldw, rows, k, x, ldx, nx, out, ldo)


cdef inline bint _amx(const floating* typed, Py_ssize_t nx) noexcept nogil:
    # whether a float32 product over nx rows of x takes the tile unit (amx.h): with fewer than
    # a tile's 16 rows most of its work would be padding
    if floating is float:
        return _amx_on and nx >= _AMX_MIN_ROWS
    else:
        return False


cdef inline Py_ssize_t _packed_size(const floating* typed, Py_ssize_t rows, Py_ssize_t k,
                                    bint amx) noexcept nogil:
    # elements of the packed copy of rows x k weights (typed: only its type matters); amx: in
    # the tile unit's layout (amx.h), else panel.h's
    if floating is float:
        return fr_amx_packed_size(rows, k) if amx else fr_packed_size_f32(rows, k)
    else:
        return fr_packed_size_f64(rows, k)


cdef inline Py_ssize_t _packed_size_any(const floating* typed, Py_ssize_t rows,
                                        Py_ssize_t k) noexcept nogil:
    # room for a packed copy in either layout
    return max(_packed_size(typed, rows, k, False), _packed_size(typed, rows, k, True))


cdef inline const floating* _panel_at(const floating* packed, Py_ssize_t r0, Py_ssize_t k,
                                      bint amx) noexcept nogil:
    # where the packed rows from r0 (a multiple of _panel_width) start
    if floating is float:
        return packed + (fr_amx_offset(r0, k) if amx else r0 * k)
    else:
        return packed + r0 * k


cdef inline Py_ssize_t _panel_width(const floating* typed, bint amx) noexcept nogil:
    if floating is float:
        return FR_AMX_PANEL if amx else fr_panel_width_f32()
    else:
        return fr_panel_width_f64()


cdef inline void _pack(const floating* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                       Py_ssize_t k, floating* packed, bint amx) noexcept nogil:
    # packs W[r, i] = w[r*rs + i*cs] for r < rows, i < k (panel.h, or amx.h's layout)
    if floating is float:
        if amx:
            fr_amx_pack(w, rs, cs, rows, k, packed)
        else:
            fr_pack_f32(w, rs, cs, rows, k, packed)
    else:
        fr_pack_f64(w, rs, cs, rows, k, packed)


cdef inline void _packed_product(const floating* packed, Py_ssize_t rows, Py_ssize_t k,
                                 const floating* x, Py_ssize_t ldx, Py_ssize_t incx,
                                 Py_ssize_t nx, floating* out, Py_ssize_t ldo,
                                 bint accumulate, bint amx) noexcept nogil:
    # out[b*ldo + r] (+)= sum_i x[b*ldx + i*incx] * W[r, i] for r < rows, b < nx, W packed by
    # _pack with the same amx
    if floating is float:
        if amx:
            fr_amx_product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate)
        else:
            fr_packed_product_f32(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate)
    else:
        fr_packed_product_f64(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate)


cdef inline int _panel_parts(Py_ssize_t rows, Py_ssize_t nr, int nthreads,
                             Py_ssize_t* per) noexcept nogil:
    # rows in panels of nr split over threads by whole panels: the threads to use (1 ..
    # nthreads, no more than there are panels) and in *per the rows of each part; part p has
    # rows [p * per, min(rows, (p + 1) * per))
    cdef Py_ssize_t panels = (rows + nr - 1) // nr
    if nthreads > panels:
        nthreads = <int>max(1, panels)
    per[0] = (panels + nthreads - 1) // nthreads * nr
    return nthreads


cdef void _pack_mt(const floating* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                   Py_ssize_t k, floating* packed, int nthreads, bint amx) noexcept nogil:
    # _pack with the panels split over nthreads threads (a once-per-call packing of 1-4 MB took
    # 0.3-0.4 ms on one thread while the other waited)
    cdef Py_ssize_t per, part, r0, r1
    nthreads = _panel_parts(rows, _panel_width(w, amx), nthreads, &per)
    if nthreads <= 1:
        _pack(w, rs, cs, rows, k, packed, amx)
        return
    for part in prange(nthreads, num_threads=nthreads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            _pack(w + r0 * rs, rs, cs, r1 - r0, k, <floating*>_panel_at(packed, r0, k, amx), amx)


cdef void _packed_product_mt(const floating* packed, Py_ssize_t rows, Py_ssize_t k,
                             const floating* x, Py_ssize_t ldx, Py_ssize_t nx,
                             floating* out, Py_ssize_t ldo, bint accumulate,
                             int nthreads, bint amx) noexcept nogil:
    # _packed_product with the rows (whole panels) split over nthreads threads
    cdef Py_ssize_t per, part, r0, r1
    nthreads = _panel_parts(rows, _panel_width(packed, amx), nthreads, &per)
    if nthreads <= 1:
        _packed_product(packed, rows, k, x, ldx, 1, nx, out, ldo, accumulate, amx)
        return
    for part in prange(nthreads, num_threads=nthreads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            _packed_product(_panel_at(packed, r0, k, amx), r1 - r0, k, x, ldx, 1, nx, out + r0,
                            ldo, accumulate, amx)


cdef void _product_by_rows_mt(const floating* packed, Py_ssize_t rows, Py_ssize_t k,
                              const floating* x, Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx,
                              floating* out, Py_ssize_t ldo, bint accumulate, int nthreads,
                              bint amx) noexcept nogil:
    # _packed_product with the rows of x (and of out) split over nthreads threads, in parts of
    # whole 16-row tiles; every thread reads all of the packed weights
    cdef Py_ssize_t per, part, b0, b1
    nthreads = _panel_parts(nx, 16, nthreads, &per)
    if nthreads <= 1:
        _packed_product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate, amx)
        return
    for part in prange(nthreads, num_threads=nthreads, schedule="static"):
        b0 = part * per
        b1 = min(nx, b0 + per)
        if b0 < b1:
            _packed_product(packed, rows, k, x + b0 * ldx, ldx, incx, b1 - b0, out + b0 * ldo,
                            ldo, accumulate, amx)


cdef void _pack_and_multiply_mt(const floating* w, Py_ssize_t rs, Py_ssize_t cs,
                                Py_ssize_t rows, Py_ssize_t k, const floating* x, Py_ssize_t ldx,
                                Py_ssize_t incx, Py_ssize_t nx, floating* out, Py_ssize_t ldo,
                                bint accumulate, floating* packed, int nthreads,
                                bint amx) noexcept nogil:
    # a one-off product (the input projection of all steps, dx, weight gradients):
    # out[b*ldo + r] (+)= x[b, :] . W[r, :] with W[r, i] = w[r*rs + i*cs] and x[b, i] =
    # x[b*ldx + i*incx]; the rows of W (whole panels) split over the threads, each packing its
    # own into its part of `packed` (_packed_size(rows, k, amx) elements)
    cdef Py_ssize_t per, part, r0, r1
    cdef floating* mine
    nthreads = _panel_parts(rows, _panel_width(w, amx), nthreads, &per)
    for part in prange(nthreads, num_threads=nthreads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            mine = <floating*>_panel_at(packed, r0, k, amx)
            _pack(w + r0 * rs, rs, cs, r1 - r0, k, mine, amx)
            _packed_product(mine, r1 - r0, k, x, ldx, incx, nx, out + r0, ldo, accumulate, amx)


def _pack_and_multiply(cnp.ndarray w, cnp.ndarray v, cnp.ndarray out, bint accumulate,
                       int nthreads, bint amx=False):
    """Test hook: out (+)= v @ w.T by _pack_and_multiply_mt. w (n, K) and v (B, K) each
    C-contiguous or the transpose of a C-contiguous array (w: packed from its columns; v: read
    with its column stride, as the weight gradients read d^T); out (B, n) C-contiguous.
    amx: on the tile unit (float32, amx_available() only)."""
    cdef Py_ssize_t n, K, B, rs, cs, ldx, incx, size
    dtype = out.dtype
    if w.dtype != dtype or v.dtype != dtype or dtype not in (np.float32, np.float64):
        raise ValueError("w, v, out: expected one dtype, float32 or float64")
    n, K = w.shape[0], w.shape[1]
    B = v.shape[0]
    if (v.shape[0], v.shape[1]) != (B, K) or (out.shape[0], out.shape[1]) != (B, n) or \
            not out.flags.c_contiguous:
        raise ValueError(f"expected w (n, K), v (B, K), out (B, n) C-contiguous")
    for a in (w, v):
        if not (a.flags.c_contiguous or a.T.flags.c_contiguous):
            raise ValueError("w, v: expected C-contiguous arrays or transposes of them")
    if amx and (dtype != np.float32 or not _amx_available):
        raise ValueError("amx: the tile unit takes float32 only, on a CPU that has it")
    rs, cs = w.strides[0] // w.itemsize, w.strides[1] // w.itemsize
    ldx, incx = v.strides[0] // v.itemsize, v.strides[1] // v.itemsize
    if dtype == np.float32:
        size = _packed_size(<float*>NULL, n, K, amx)
    else:
        size = _packed_size(<double*>NULL, n, K, False)
    cdef cnp.ndarray packed = np.empty(max(1, size), dtype)
    if dtype == np.float32:
        _pack_and_multiply_mt(<float*>cnp.PyArray_DATA(w), rs, cs, n, K,
                              <float*>cnp.PyArray_DATA(v), ldx, incx, B,
                              <float*>cnp.PyArray_DATA(out), n, accumulate,
                              <float*>cnp.PyArray_DATA(packed), nthreads, amx)
    else:
        _pack_and_multiply_mt(<double*>cnp.PyArray_DATA(w), rs, cs, n, K,
                              <double*>cnp.PyArray_DATA(v), ldx, incx, B,
                              <double*>cnp.PyArray_DATA(out), n, accumulate,
                              <double*>cnp.PyArray_DATA(packed), nthreads, False)


cdef inline void _unit_range(Py_ssize_t H, int tid, int nthreads, Py_ssize_t* j0,
                             Py_ssize_t* j1) noexcept nogil:
    # contiguous ranges, a multiple of 16 units long when they are longer than 16
    cdef Py_ssize_t chunk = (H + nthreads - 1) // nthreads
    if chunk > 16:
        chunk = (chunk + 15) // 16 * 16
    j0[0] = min(H, tid * chunk)
    j1[0] = min(H, j0[0] + chunk)


cdef void _units_loop(int code, bint reverse, bint train, bint input_dots, int tid, int nthreads,
                      floating* ws, Layout L,
                      floating* y, Py_ssize_t y_step, Py_ssize_t y_row,
                      const floating* x, const floating* w_ih, int ld_ih,
                      const floating* w_hh, int ld_hh,
                      const floating* b_ih, const floating* b_hh, const floating* peephole,
                      const int64_t* lengths,
                      Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                      Py_ssize_t G) noexcept nogil:
    # thread tid of nthreads (every thread of the region runs this, with the same barriers);
    # the same slots and buffers as the GEMM loop, so the cache is the same
    cdef Py_ssize_t GH = G * H, BH = B * H, H2 = 2 * H
    cdef floating* gates = ws + L.gates
    cdef floating* hs = ws + L.h
    cdef floating* cs = _at(ws, L.c)
    cdef floating* extra = _at(ws, L.extra)
    cdef floating* hh = ws + L.hh
    cdef floating* h
    cdef floating* h_new
    cdef floating* gates_t
    cdef floating* extra_t
    cdef floating* y_t
    cdef floating* c = NULL
    cdef floating* c_new = NULL
    cdef Py_ssize_t s, t, t_next, cur, nxt, j0, j1, n, g, b, block_size = 0
    cdef Py_ssize_t blocks = 2 if code == GRU_RESET_BEFORE else G
    cdef floating* packed = NULL        # this thread's rows of w_hh, packed; NULL: dot products
    cdef bint active, zigzag
    # the tile unit for the input projection only: a step's products here are 4-8 small ones a
    # thread (its units of each gate block), and each would split h and set up the tiles
    # again (measured: bilstm-infer 95 ms on the tile unit, 53 without)
    cdef bint amx_in = _amx(ws, T * B)
    _unit_range(H, tid, nthreads, &j0, &j1)
    n = j1 - j0
    if n > 0 and T * B >= _PACK_MIN_ROWS \
            and G * _packed_size(ws, n, H, False) * <Py_ssize_t>sizeof(floating) <= _PACK_MAX_BYTES:
        # allocated by the thread that uses it (its pages near its core); one buffer serves
        # w_ih's blocks one at a time first, then all of w_hh's
        block_size = _packed_size(ws, n, H, False)
        packed = <floating*>malloc(
            max(G * block_size, _packed_size(ws, n, I, amx_in) if input_dots else 0)
            * sizeof(floating))
    if input_dots and n > 0:
        # gates[:, :, block g, units] = x @ w_ih[block g, units].T for all T*B rows: the thread's
        # own columns, so no barrier; no BLAS call in the region (BLAS threads spinning after a
        # GEMM take the cores these threads need: measured 1.7x slower per step)
        for g in range(G):
            if packed != NULL:
                _pack(w_ih + (g * H + j0) * ld_ih, ld_ih, 1, n, I, packed, amx_in)
                _packed_product(packed, n, I, x, I, 1, T * B, gates + g * H + j0, GH, False,
                                amx_in)
            else:
                _rowdot(w_ih + (g * H + j0) * ld_ih, ld_ih, n, I, x, I, T * B,
                        gates + g * H + j0, GH)
    if packed != NULL:
        for g in range(G):
            _pack(w_hh + (g * H + j0) * ld_hh, ld_hh, 1, n, H, packed + g * block_size, False)
    for s in range(T):
        t = T - 1 - s if reverse else s
        cur = _state_slot(s, t, T, reverse, train, False) * BH
        nxt = _state_slot(s, t, T, reverse, train, True) * BH
        h, h_new = hs + cur, hs + nxt
        if cs != NULL:
            c, c_new = cs + cur, cs + nxt
        extra_t = extra + t * BH if train and extra != NULL else extra
        gates_t = gates + t * B * GH
        y_t = y + t * y_step
        active = _any_active(lengths, t, B)
        if s + 1 < T and 0 < n < H:
            # the next step's rows of x W_ih^T, computed before the loop and long out of L1/L2:
            # fetched while this step multiplies (read cold, they were a fifth of the call).
            # Only when the thread has part of the units: else a row is one contiguous run the
            # hardware prefetcher follows, and these hints only fill the line-fill buffers
            t_next = T - 2 - s if reverse else s + 1
            for b in range(B):
                for g in range(G):
                    fr_prefetch(gates + (t_next * B + b) * GH + g * H + j0, n * sizeof(floating))
        if active and n > 0:
            # hh[:, block g, units] = h @ w_hh[block g, units].T. Every other step reads the
            # thread's weight rows last to first: the rows read last are still in L2 then, where
            # the same order every step would evict each row just before it is read again
            zigzag = _zigzag and (s & 1) == 1
            for g in range(blocks):
                _units_product(w_hh, ld_hh, packed, block_size,
                               blocks - 1 - g if zigzag else g, j0, n, H, h, B, hh, GH, zigzag)
        if code == GRU_RESET_BEFORE:
            for b in range(B):
                _forward_row(code, False, b, t, j0, n, gates_t, h_new, c_new, extra_t, y_t,
                             y_row, hh, h, c, b_ih, b_hh, peephole, lengths, G, H)
            fr_barrier()                        # all of r*h is written
            if active and n > 0:
                # hh[:, n block, units] = (r*h) @ w_hh[n block, units].T
                _units_product(w_hh, ld_hh, packed, block_size, 2, j0, n, H, extra_t, B, hh, GH,
                               False)
        for b in range(B):
            _forward_row(code, True, b, t, j0, n, gates_t, h_new, c_new, extra_t, y_t, y_row,
                         hh, h, c, b_ih, b_hh, peephole, lengths, G, H)
        fr_barrier()                            # the new state is complete
    free(packed)


cdef inline void _units_product(const floating* w_hh, int ld_hh, const floating* packed,
                                Py_ssize_t block_size, Py_ssize_t g, Py_ssize_t j0,
                                Py_ssize_t n, Py_ssize_t H, const floating* v, Py_ssize_t B,
                                floating* hh, Py_ssize_t GH, bint backwards) noexcept nogil:
    # hh[:, block g, units j0 .. j0+n] = v @ w_hh[block g, units].T, v (B, H): from the packed
    # copy of the thread's rows when there is one. backwards: the dot products' rows last to
    # first, in runs of _ZIGZAG_ROWS from the block's start (so the kernel groups its rows as
    # it does forwards, and every sum is the same to the last bit; see _units_loop)
    cdef Py_ssize_t r1, r0
    if packed != NULL:
        _packed_product(packed + g * block_size, n, H, v, H, 1, B, hh + g * H + j0, GH, False,
                        False)
    elif not backwards:
        _rowdot(w_hh + (g * H + j0) * ld_hh, ld_hh, n, H, v, H, B, hh + g * H + j0, GH)
    else:
        r1 = n
        while r1 > 0:
            r0 = (r1 - 1) // _ZIGZAG_ROWS * _ZIGZAG_ROWS
            _rowdot(w_hh + (g * H + j0 + r0) * ld_hh, ld_hh, r1 - r0, H, v, H, B,
                    hh + g * H + j0 + r0, GH)
            r1 = r0


cdef inline Py_ssize_t _state_slot(Py_ssize_t s, Py_ssize_t t, Py_ssize_t T, bint reverse,
                                   bint train, bint after) noexcept nogil:
    # the slot of L.h / L.c holding the state before (after=False) or after step t, the s-th
    # step in processing order. train: slot t holds the state before step t (the cache
    # backward reads) and T the final one; inference: two slots used in turn
    if not train:
        return (s + 1) & 1 if after else s & 1
    if not after:
        return t
    if reverse:
        return t - 1 if t > 0 else T
    return t + 1


cdef inline Py_ssize_t _first_slot(Py_ssize_t T, bint reverse, bint train) noexcept nogil:
    # slot of the initial state: train, the state before the first step in processing order
    return T - 1 if train and reverse and T > 0 else 0


cdef inline Py_ssize_t _final_slot(Py_ssize_t T, bint train) noexcept nogil:
    return T if train else T & 1


# ---------------------------------------------------------------------------------------------
# Backward: one fused pass over the batch rows of step t, and the time loop

cdef void _backward_row(int code, bint second, Py_ssize_t b, Py_ssize_t t,
                        floating* dgates, floating* dhidden, floating* dhn,
                        floating* dh, floating* dc, floating* dpeep,
                        const floating* dy, Py_ssize_t dy_row, const floating* drh,
                        const floating* gates, const floating* h, const floating* c,
                        const floating* c_new, const floating* extra,
                        const floating* peephole, const int64_t* lengths,
                        Py_ssize_t G, Py_ssize_t H) noexcept nogil:
    # not inline, for the same reason as _forward_row
    cdef floating* dg = dgates + b * G * H
    cdef floating* dhb = dh + b * H
    cdef const floating* dyb
    cdef Py_ssize_t j
    if t >= lengths[b]:
        # padding: no gradient to the parameters or x, the state gradient passes through
        if not second:
            memset(dg, 0, G * H * sizeof(floating))
            if dhidden != NULL:
                memset(dhidden + b * G * H, 0, G * H * sizeof(floating))
                memset(dhn + b * H, 0, H * sizeof(floating))
        return
    if not second and dy != NULL:
        dyb = dy + b * dy_row
        for j in range(H):
            dhb[j] = dhb[j] + dyb[j]                      # dL/dh' = from later steps + from y
    if code == RNN_TANH or code == RNN_RELU:
        rnn_backward_row(dg, dhb, gates + b * G * H, H, code == RNN_RELU)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_backward_row(dg, dhb, dc + b * H, dpeep + b * 3 * H if dpeep != NULL else NULL,
                          gates + b * G * H, c + b * H, c_new + b * H, peephole, H)
    elif code == GRU:
        gru_backward_row(dg, dhidden + b * G * H, dhn + b * H, dhb, gates + b * G * H,
                         h + b * H, extra + b * H, H)
    elif not second:
        gru_rb_backward_row_zn(dg, dhb, gates + b * G * H, h + b * H, H)
    else:
        gru_rb_backward_row_r(dg, dhb, drh + b * H, gates + b * G * H, h + b * H, H)


cdef void _backward_pass(int code, bint second, Py_ssize_t t,
                         floating* dgates, floating* dhidden, floating* dhn,
                         floating* dh, floating* dc, floating* dpeep,
                         const floating* dy, Py_ssize_t dy_row, const floating* drh,
                         const floating* gates, const floating* h, const floating* c,
                         const floating* c_new, const floating* extra,
                         const floating* peephole, const int64_t* lengths,
                         Py_ssize_t B, Py_ssize_t G, Py_ssize_t H, int nthreads) noexcept nogil:
    cdef Py_ssize_t b
    if nthreads > 1 and B > 1:
        for b in prange(B, schedule="static", num_threads=nthreads):
            _backward_row(code, second, b, t, dgates, dhidden, dhn, dh, dc, dpeep, dy, dy_row,
                          drh, gates, h, c, c_new, extra, peephole, lengths, G, H)
    else:
        for b in range(B):
            _backward_row(code, second, b, t, dgates, dhidden, dhn, dh, dc, dpeep, dy, dy_row,
                          drh, gates, h, c, c_new, extra, peephole, lengths, G, H)


cdef void _backward_loop(int code, bint reverse, Py_ssize_t truncate, int nthreads, int pool,
                         const floating* ws, Layout L, floating* bws, BackLayout K,
                         const floating* dy, Py_ssize_t dy_step, Py_ssize_t dy_row,
                         const floating* x, const floating* w_ih, int ld_ih,
                         const floating* w_hh, int ld_hh, const floating* peephole,
                         const int64_t* lengths,
                         floating* dx, Py_ssize_t dx_step, Py_ssize_t dx_row,
                         floating* dw_ih, int ld_dw_ih, floating* dw_hh, int ld_dw_hh,
                         floating* db_ih, int inc_db_ih, floating* db_hh, int inc_db_hh,
                         Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
                         Py_ssize_t G) noexcept nogil:
    # on entry K.dh / K.dc hold dL/dh_n, dL/dc_n; on exit dL/dh0, dL/dc0 (the caller adds them)
    cdef Py_ssize_t GH = G * H, BH = B * H, H2 = 2 * H, TB = T * B
    cdef const floating* gates = ws + L.gates
    cdef const floating* hs = ws + L.h               # slots 0..T-1: h before step t, (T*B, H)
    cdef const floating* cs = _at(<floating*>ws, L.c)
    cdef const floating* extra = _at(<floating*>ws, L.extra)
    cdef floating* dgates = bws + K.dgates
    cdef floating* dhn = _at(bws, K.dhn)
    cdef floating* dhidden = _at(bws, K.dhidden)
    cdef floating* dh = bws + K.dh
    cdef floating* dc = _at(bws, K.dc)
    cdef floating* drh = _at(bws, K.drh)
    cdef floating* dpeep = _at(bws, K.dpeep)
    cdef floating* ones = bws + K.ones
    cdef floating* dgates_t
    cdef const floating* c = NULL
    cdef const floating* c_new = NULL
    cdef Py_ssize_t s, t, i, boundary
    cdef bint active, cut
    # the per-step products on this thread over w_hh packed once, as in _forward_loop; packed
    # columns of w_hh: W[u, g] = w_hh[g, u]. GRU reset-before: the r, z blocks (k = 2H) apart
    # from the n block (k = H), at n_at
    cdef Py_ssize_t k_main = H2 if code == GRU_RESET_BEFORE else GH
    cdef bint amx_h = _amx(bws, B)
    cdef Py_ssize_t n_at = _packed_size(bws, H, k_main, amx_h)
    cdef floating* packed = NULL
    cdef bint pooled = False               # no BLAS call at all (see _forward_loop)
    cdef Py_ssize_t grad_rows = min(T * B, _GRAD_CHUNK)
    if _packs(T, B):
        # one buffer: w_hh's columns for the steps, then the operands of _pool_gradients
        packed = <floating*>malloc(max(n_at + _packed_size(bws, H, H, amx_h),
                                       _packed_size_any(bws, I, GH),
                                       _packed_size_any(bws, max(I, H), grad_rows))
                                   * sizeof(floating))
        if packed != NULL:
            _pack_mt(w_hh, 1, ld_hh, H, k_main, packed, max(pool, 1), amx_h)
            if code == GRU_RESET_BEFORE:
                _pack_mt(w_hh + H2 * ld_hh, 1, ld_hh, H, H, packed + n_at, max(pool, 1), amx_h)
            nthreads = max(pool, 1)
            pooled = pool > 0
    for s in range(T):
        t = s if reverse else T - 1 - s
        dgates_t = dgates + t * B * GH
        if cs != NULL:
            c = cs + t * BH
            c_new = cs + _state_slot(s, t, T, reverse, True, True) * BH
        active = _any_active(lengths, t, B)
        # the state gradient leaving step t is cut at the time boundaries m*k (see cells.py)
        boundary = t + 1 if reverse else t
        cut = truncate > 0 and 0 < boundary < T and boundary % truncate == 0
        _backward_pass(code, False, t, dgates_t, dhidden, dhn + t * BH if dhn != NULL else NULL,
                       dh, dc, dpeep, dy + t * dy_step if dy != NULL else NULL, dy_row, drh,
                       gates + t * B * GH, hs + t * BH, c, c_new,
                       extra + t * BH if extra != NULL else NULL,
                       peephole, lengths, B, G, H, nthreads)
        if active and code == GRU_RESET_BEFORE:
            # drh = da_n @ w_hh[2H:]:  (B, H) x (H, H)
            _state_product(w_hh + H2 * ld_hh, ld_hh, packed + n_at if packed != NULL else NULL,
                           H, dgates_t + H2, GH, B, H, drh, False, nthreads, amx_h)
            _backward_pass(code, True, t, dgates_t, dhidden, dhn, dh, dc, dpeep, NULL, 0, drh,
                           gates + t * B * GH, hs + t * BH, c, c_new, NULL,
                           peephole, lengths, B, G, H, nthreads)
            if not cut:
                # dh += da_rz @ w_hh[:2H]:  (B, 2H) x (2H, H)
                _state_product(w_hh, ld_hh, packed, H2, dgates_t, GH, B, H, dh, True, nthreads,
                               amx_h)
        elif active and not cut:
            # dh += d(W_hh h + b_hh) @ w_hh:  (B, G*H) x (G*H, H)
            _state_product(w_hh, ld_hh, packed, GH, dhidden if dhidden != NULL else dgates_t,
                           GH, B, H, dh, True, nthreads, amx_h)
        if cut:
            memset(dh, 0, BH * sizeof(floating))
            if dc != NULL:
                memset(dc, 0, BH * sizeof(floating))

    if pooled:
        _pool_gradients(code, dgates, dhn, hs, extra, x, w_ih, ld_ih, dx, dx_step, dx_row,
                        dw_ih, ld_dw_ih, dw_hh, ld_dw_hh, db_ih, inc_db_ih, db_hh, inc_db_hh,
                        T, B, I, H, G, packed, nthreads)
        free(packed)
        return
    free(packed)
    # after the loop, over all T*B rows at once (dgates is zero at padding)
    for i in range(TB):
        ones[i] = 1
    # dw_ih += dgates.T @ x:  (G*H, T*B) x (T*B, I)
    gemm(True, False, <int>GH, <int>I, <int>TB, 1, dgates, <int>GH, x, <int>I,
         1, dw_ih, ld_dw_ih)
    # dx += dgates @ w_ih:  (T*B, G*H) x (G*H, I)
    if dx_step == B * dx_row:
        gemm(False, False, <int>TB, <int>I, <int>GH, 1, dgates, <int>GH, w_ih, ld_ih,
             1, dx, <int>dx_row)
    else:
        for t in range(T):
            gemm(False, False, <int>B, <int>I, <int>GH, 1, dgates + t * B * GH, <int>GH,
                 w_ih, ld_ih, 1, dx + t * dx_step, <int>dx_row)
    # db_ih += dgates.sum(axis=0)
    gemv(True, <int>TB, <int>GH, 1, dgates, <int>GH, ones, 1, 1, db_ih, inc_db_ih)
    if code == GRU:
        # the hidden side differs in the n block: d(W_hn h + b_hn) = da_n * r, kept in dhn
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev;  dw_hh[2H:] += dhn.T @ h_prev
        gemm(True, False, <int>H2, <int>H, <int>TB, 1, dgates, <int>GH, hs, <int>H,
             1, dw_hh, ld_dw_hh)
        gemm(True, False, <int>H, <int>H, <int>TB, 1, dhn, <int>H, hs, <int>H,
             1, dw_hh + H2 * ld_dw_hh, ld_dw_hh)
        # db_hh[:2H] += dgates[:, :2H].sum(axis=0);  db_hh[2H:] += dhn.sum(axis=0)
        gemv(True, <int>TB, <int>H2, 1, dgates, <int>GH, ones, 1, 1, db_hh, inc_db_hh)
        gemv(True, <int>TB, <int>H, 1, dhn, <int>H, ones, 1, 1, db_hh + H2 * inc_db_hh,
             inc_db_hh)
    elif code == GRU_RESET_BEFORE:
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev;  dw_hh[2H:] += dgates[:, 2H:].T @ (r * h)
        gemm(True, False, <int>H2, <int>H, <int>TB, 1, dgates, <int>GH, hs, <int>H,
             1, dw_hh, ld_dw_hh)
        gemm(True, False, <int>H, <int>H, <int>TB, 1, dgates + H2, <int>GH, extra, <int>H,
             1, dw_hh + H2 * ld_dw_hh, ld_dw_hh)
        # db_hh += dgates.sum(axis=0)
        gemv(True, <int>TB, <int>GH, 1, dgates, <int>GH, ones, 1, 1, db_hh, inc_db_hh)
    else:
        # dw_hh += dgates.T @ h_prev:  (G*H, T*B) x (T*B, H);  db_hh += dgates.sum(axis=0)
        gemm(True, False, <int>GH, <int>H, <int>TB, 1, dgates, <int>GH, hs, <int>H,
             1, dw_hh, ld_dw_hh)
        gemv(True, <int>TB, <int>GH, 1, dgates, <int>GH, ones, 1, 1, db_hh, inc_db_hh)


cdef void _pool_gradients(int code, const floating* dgates, const floating* dhn,
                          const floating* hs, const floating* extra, const floating* x,
                          const floating* w_ih, int ld_ih,
                          floating* dx, Py_ssize_t dx_step, Py_ssize_t dx_row,
                          floating* dw_ih, int ld_dw_ih, floating* dw_hh, int ld_dw_hh,
                          floating* db_ih, int inc_db_ih, floating* db_hh, int inc_db_hh,
                          Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H, Py_ssize_t G,
                          floating* packed, int nthreads) noexcept nogil:
    # the products after backward's loop, the same as the BLAS calls of _backward_loop, as
    # packed products on nthreads threads (packed: room for w_ih's columns and for a chunk of
    # the weight gradients' operand, see _backward_loop)
    cdef Py_ssize_t GH = G * H, H2 = 2 * H, TB = T * B, t
    cdef bint whole = dx_step == B * dx_row          # dx's rows: one (T*B, I) matrix
    cdef bint amx = _amx(dgates, TB if whole else B)
    # dx += dgates @ w_ih:  (T*B, G*H) x (G*H, I); packed columns of w_ih
    _pack_mt(w_ih, 1, ld_ih, I, GH, packed, nthreads, amx)
    if whole:
        _packed_product_mt(packed, I, GH, dgates, GH, TB, dx, dx_row, True, nthreads, amx)
    else:
        for t in range(T):
            _packed_product_mt(packed, I, GH, dgates + t * B * GH, GH, B, dx + t * dx_step,
                               dx_row, True, nthreads, amx)
    # dw_ih += dgates.T @ x:  (G*H, T*B) x (T*B, I);  db_ih += dgates.sum(axis=0)
    _weight_gradient(dgates, GH, GH, x, I, I, TB, dw_ih, ld_dw_ih, packed, nthreads)
    _column_sums(dgates, GH, GH, TB, db_ih, inc_db_ih, nthreads)
    if code == GRU:
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev;  dw_hh[2H:] += dhn.T @ h_prev
        _weight_gradient(dgates, GH, H2, hs, H, H, TB, dw_hh, ld_dw_hh, packed, nthreads)
        _weight_gradient(dhn, H, H, hs, H, H, TB, dw_hh + H2 * ld_dw_hh, ld_dw_hh, packed,
                         nthreads)
        _column_sums(dgates, GH, H2, TB, db_hh, inc_db_hh, nthreads)
        _column_sums(dhn, H, H, TB, db_hh + H2 * inc_db_hh, inc_db_hh, nthreads)
    elif code == GRU_RESET_BEFORE:
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev;  dw_hh[2H:] += dgates[:, 2H:].T @ (r * h)
        _weight_gradient(dgates, GH, H2, hs, H, H, TB, dw_hh, ld_dw_hh, packed, nthreads)
        _weight_gradient(dgates + H2, GH, H, extra, H, H, TB, dw_hh + H2 * ld_dw_hh, ld_dw_hh,
                         packed, nthreads)
        _column_sums(dgates, GH, GH, TB, db_hh, inc_db_hh, nthreads)
    else:
        # dw_hh += dgates.T @ h_prev:  (G*H, T*B) x (T*B, H);  db_hh += dgates.sum(axis=0)
        _weight_gradient(dgates, GH, GH, hs, H, H, TB, dw_hh, ld_dw_hh, packed, nthreads)
        _column_sums(dgates, GH, GH, TB, db_hh, inc_db_hh, nthreads)


cdef void _weight_gradient(const floating* d, Py_ssize_t ldd, Py_ssize_t M, const floating* v,
                           Py_ssize_t ldv, Py_ssize_t K, Py_ssize_t TB, floating* out,
                           Py_ssize_t ldo, floating* packed, int nthreads) noexcept nogil:
    # out[m, c] += sum_r d[r*ldd + m] * v[r*ldv + c] for m < M, c < K, r < TB: d^T v, the sum
    # over all T*B rows taken in chunks of _GRAD_CHUNK rows, so that a chunk of v (packed by
    # columns, into `packed`) and of d stay in L2 while every row of out meets them
    # The threads split the rows of out (of x = d^T), not its columns: each copies only its
    # own part of d^T into tiles (amx.h's split, panel.h's fr_pack_x), which split by columns
    # every thread did for all of d^T (40 % of the product's time on the tile unit)
    cdef Py_ssize_t r0 = 0, rows
    cdef bint amx = _amx(d, M)
    while r0 < TB:
        rows = min(_GRAD_CHUNK, TB - r0)
        _pack_mt(v + r0 * ldv, 1, ldv, K, rows, packed, nthreads, amx)
        _product_by_rows_mt(packed, K, rows, d + r0 * ldd, 1, ldd, M, out, ldo, True, nthreads,
                            amx)
        r0 += rows


cdef void _column_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t M, Py_ssize_t TB,
                       floating* out, Py_ssize_t inc, int nthreads) noexcept nogil:
    # out[m*inc] += sum_r d[r*ldd + m] for m < M, r < TB; columns split over the threads, the
    # rows read in order (a column at a time was a quarter of a training call's time)
    cdef Py_ssize_t part, per = (M + nthreads - 1) // nthreads, m0, m1, m, r
    cdef floating* acc
    for part in prange(nthreads, num_threads=nthreads, schedule="static"):
        m0 = part * per
        m1 = min(M, m0 + per)
        if m0 < m1:
            acc = <floating*>malloc((m1 - m0) * sizeof(floating))
            if acc == NULL:                     # the slow order, without memory
                for m in range(m0, m1):
                    for r in range(TB):
                        out[m * inc] += d[r * ldd + m]
            else:
                memset(acc, 0, (m1 - m0) * sizeof(floating))
                for r in range(TB):
                    for m in range(m1 - m0):
                        acc[m] = acc[m] + d[r * ldd + m0 + m]
                for m in range(m1 - m0):
                    out[(m0 + m) * inc] += acc[m]
                free(acc)


# ---------------------------------------------------------------------------------------------
# Typed entry points: memoryviews in, pointers and sizes out, the loops run without the GIL

cdef inline void _state_product(const floating* w, int ldw, const floating* packed,
                                Py_ssize_t k, const floating* v, Py_ssize_t ldv, Py_ssize_t B,
                                Py_ssize_t H, floating* out, bint accumulate,
                                int nthreads, bint amx) noexcept nogil:
    # out (+)= v @ w, v (B, k) with row stride ldv, w (k, H) with row stride ldw, out (B, H):
    # over w packed by columns when there is a packed copy, else one GEMM
    if packed != NULL:
        _packed_product_mt(packed, H, k, v, ldv, B, out, H, accumulate, nthreads, amx)
    else:
        gemm(False, False, <int>B, <int>H, <int>k, 1, v, <int>ldv, w, ldw,
             1 if accumulate else 0, out, <int>H)


cdef int _run_forward(int code, bint reverse, bint train, int nthreads, int pool,
                      floating[::1] ws, Layout L,
                      floating[:, :, :] y, const floating[:, :, ::1] x,
                      const floating[:, :] w_ih, const floating[:, :] w_hh,
                      const floating[::1] b_ih, const floating[::1] b_hh,
                      const floating[::1] peephole, const int64_t[::1] lengths,
                      Py_ssize_t H, Py_ssize_t G, int units, bint input_dots) except -1:
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t item = sizeof(floating)
    with nogil:
        _forward_loop(code, reverse, train, nthreads, pool, &ws[0], L,
                      &y[0, 0, 0], y.strides[0] // item, y.strides[1] // item,
                      &x[0, 0, 0], &w_ih[0, 0], <int>_ld(w_ih.strides[0], I, item),
                      &w_hh[0, 0], <int>_ld(w_hh.strides[0], H, item),
                      &b_ih[0], &b_hh[0], &peephole[0] if peephole is not None else NULL,
                      &lengths[0], T, B, I, H, G, units, input_dots)
    return 0


cdef int _run_backward(int code, bint reverse, Py_ssize_t truncate, int nthreads, int pool,
                       const floating[::1] ws, Layout L, floating[::1] bws, BackLayout K,
                       const floating[:, :, :] dy, const floating[:, :, ::1] x,
                       const floating[:, :] w_ih, const floating[:, :] w_hh,
                       const floating[::1] peephole, const int64_t[::1] lengths,
                       floating[:, :, :] dx, floating[:, :] dw_ih, floating[:, :] dw_hh,
                       floating[:] db_ih, floating[:] db_hh,
                       Py_ssize_t H, Py_ssize_t G) except -1:
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t item = sizeof(floating)
    cdef const floating* dy_p = &dy[0, 0, 0] if dy is not None else NULL
    cdef Py_ssize_t dy_step = dy.strides[0] // item if dy is not None else 0
    cdef Py_ssize_t dy_row = dy.strides[1] // item if dy is not None else 0
    with nogil:
        _backward_loop(code, reverse, truncate, nthreads, pool, &ws[0], L, &bws[0], K,
                       dy_p, dy_step, dy_row,
                       &x[0, 0, 0], &w_ih[0, 0], <int>_ld(w_ih.strides[0], I, item),
                       &w_hh[0, 0], <int>_ld(w_hh.strides[0], H, item),
                       &peephole[0] if peephole is not None else NULL, &lengths[0],
                       &dx[0, 0, 0], dx.strides[0] // item, _ld(dx.strides[1], I, item),
                       &dw_ih[0, 0], <int>_ld(dw_ih.strides[0], I, item),
                       &dw_hh[0, 0], <int>_ld(dw_hh.strides[0], H, item),
                       &db_ih[0], <int>(db_ih.strides[0] // item),
                       &db_hh[0], <int>(db_hh.strides[0] // item),
                       T, B, I, H, G)
    return 0


cdef inline Py_ssize_t _ld(Py_ssize_t row_stride, Py_ssize_t cols, Py_ssize_t item) noexcept nogil:
    # a leading dimension BLAS accepts: the row stride, or the width when it never matters
    cdef Py_ssize_t ld = row_stride // item
    return ld if ld >= cols and ld >= 1 else max(1, cols)


# ---------------------------------------------------------------------------------------------
# Python entry points (the contract of fastrnn.cells)

cdef class _Cache:
    """What layer_forward keeps for layer_backward: the workspace and the sizes it was cut for."""
    cdef readonly object workspace
    cdef readonly int code
    cdef readonly Py_ssize_t T, B, input_size, H
    cdef readonly bint reverse
    cdef Layout layout

    def __repr__(self):
        return (f"<fastrnn Cython cache: cell code {self.code}, T={self.T}, B={self.B}, "
                f"I={self.input_size}, H={self.H}, {self.workspace.dtype}, {self.workspace.nbytes} bytes>")


def _cell_code(cell):
    code = getattr(cell, "code", None)
    if code not in _GATES or _GATES[code] != cell.num_gates:
        raise ValueError(f"cell: expected a fastrnn.cells.Cell record, got {cell!r}")
    return code, _GATES[code]


def _input(a, name, dtype, shape):
    """A C-contiguous array of the layer's dtype and the given shape (a no-op if it is one)."""
    if a is None:
        raise ValueError(f"{name}: expected an array of shape {shape}, got None")
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} and dtype {np.dtype(dtype)}, got "
                         f"shape {a.shape} and dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _output(a, name, dtype, shape):
    if a is None or a.dtype != dtype or a.shape != shape:
        got = "None" if a is None else f"shape {a.shape} and dtype {a.dtype}"
        raise ValueError(f"{name}: expected shape {shape} and dtype {np.dtype(dtype)}, got {got}")
    return a


def _blas_ready(a):
    """Can BLAS write `a` in place: 2-D (or 3-D collapsing its first two axes) row-major with
    unit stride along the last axis and positive row strides; 1-D with a positive stride."""
    item, last = a.itemsize, a.ndim - 1
    if a.size == 0:
        return True
    if a.ndim == 1:
        return a.strides[0] > 0 and a.strides[0] % item == 0
    if a.shape[last] > 1 and a.strides[last] != item:
        return False
    return all(st > 0 and st % item == 0 and st >= a.shape[last] * item
               for n, st in zip(a.shape[:last], a.strides[:last]) if n > 1)


def _lengths(lengths, T, B):
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {lengths.shape}")
    if B and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"lengths: expected values in [0, {T}], got [{lengths.min()}, "
                         f"{lengths.max()}]")
    return lengths


def layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                  lengths, reverse, train, y, h_n, c_n, threads=None):
    """One layer, one direction, all T steps; see fastrnn.cells for the contract."""
    code, G = _cell_code(cell)
    dtype = x.dtype
    if dtype != np.float32 and dtype != np.float64:
        raise ValueError(f"x: expected dtype float32 or float64, got {dtype}")
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (T, B, I), got {x.shape}")
    T, B, I = x.shape
    H = w_hh.shape[1]
    x = np.ascontiguousarray(x)
    h0 = _input(h0, "h0", dtype, (B, H))
    w_ih = _input(w_ih, "w_ih", dtype, (G * H, I))
    w_hh = _input(w_hh, "w_hh", dtype, (G * H, H))
    b_ih = _input(b_ih, "b_ih", dtype, (G * H,))
    b_hh = _input(b_hh, "b_hh", dtype, (G * H,))
    has_c = _has_c(code)
    c0 = _input(c0, "c0", dtype, (B, H)) if has_c else None
    peephole = _input(peephole, "peephole", dtype, (3, H)).reshape(-1) \
        if code == LSTM_PEEPHOLE else None
    lengths = _lengths(lengths, T, B)
    y = _output(y, "y", dtype, (T, B, H))
    h_n = _output(h_n, "h_n", dtype, (B, H))
    c_n = _output(c_n, "c_n", dtype, (B, H)) if has_c else None
    if T * B >= 2**31 or G * H * max(I, H) >= 2**31:
        raise ValueError(f"x: T*B = {T * B} rows or G*H = {G * H} columns are too many for BLAS")

    train = bool(train)
    reverse = bool(reverse)
    cdef Layout L = _layout(code, T, B, H, G, train)
    ws = _scratch.empty(max(1, L.size), dtype)      # kept by the cache; pooled (_scratch)
    cdef Py_ssize_t first = _first_slot(T, reverse, train), final = _final_slot(T, train)
    states = [(L.h, h0, h_n)] + ([(L.c, c0, c_n)] if has_c else [])
    for offset, s0, _ in states:
        ws[offset + first * B * H: offset + (first + 1) * B * H] = s0.reshape(-1)
    if T and B and H:
        y_work = y if _blas_ready(y) else np.empty((T, B, H), dtype)
        limit = _thread_limit(threads)
        units = _unit_threads(G, H, H, B, limit, _UNIT_PARALLEL_MIN) \
            if B <= (_small_batch_max_train if train else _small_batch_max) else 0
        # a limited call makes no BLAS call: one thread computes x W_ih^T by itself too
        input_dots = units > 1 or (units == 1 and threads is not None)
        passes, pool = min(_pass_threads, limit), _pool_threads(limit, threads is not None)
        if dtype == np.float32:
            _run_forward[float](code, reverse, train, passes, pool, ws, L, y_work, x, w_ih,
                                w_hh, b_ih, b_hh, peephole, lengths, H, G, units, input_dots)
        else:
            _run_forward[double](code, reverse, train, passes, pool, ws, L, y_work, x, w_ih,
                                 w_hh, b_ih, b_hh, peephole, lengths, H, G, units, input_dots)
        if y_work is not y:
            y[...] = y_work
    else:
        final = first                                 # no step: the state stays as it was
        y[...] = 0
    for offset, _, s_n in states:
        s_n[...] = ws[offset + final * B * H: offset + (final + 1) * B * H].reshape(B, H)
    if not train:
        return None
    cdef _Cache cache = _Cache()
    cache.workspace, cache.code, cache.reverse, cache.layout = ws, code, reverse, L
    cache.T, cache.B, cache.input_size, cache.H = T, B, I, H
    return cache


def layer_backward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                   lengths, reverse, cache, dy, dh_n, dc_n, truncate,
                   dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeephole, threads=None):
    """Gradients of one layer_forward call, ADDED into dx ... dpeephole; see fastrnn.cells."""
    code, G = _cell_code(cell)
    dtype = x.dtype
    if not isinstance(cache, _Cache):
        raise ValueError(f"cache: expected what the Cython layer_forward returned with "
                         f"train=True, got {type(cache).__name__}")
    cdef _Cache ca = cache
    T, B, I = x.shape
    H = w_hh.shape[1]
    if (ca.code, ca.T, ca.B, ca.input_size, ca.H, ca.reverse, ca.workspace.dtype) != \
            (code, T, B, I, H, bool(reverse), dtype):
        raise ValueError(f"cache: made for cell code {ca.code}, T={ca.T}, B={ca.B}, "
                         f"I={ca.input_size}, "
                         f"H={ca.H}, reverse={ca.reverse}, {ca.workspace.dtype}; got cell code "
                         f"{code}, x {x.shape}, H={H}, reverse={bool(reverse)}, {dtype}")
    if truncate is not None and (int(truncate) != truncate or truncate < 1):
        raise ValueError(f"truncate: expected None or an integer >= 1, got {truncate!r}")
    x = np.ascontiguousarray(x)
    w_ih = _input(w_ih, "w_ih", dtype, (G * H, I))
    w_hh = _input(w_hh, "w_hh", dtype, (G * H, H))
    has_c = _has_c(code)
    peephole = _input(peephole, "peephole", dtype, (3, H)).reshape(-1) \
        if code == LSTM_PEEPHOLE else None
    lengths = _lengths(lengths, T, B)
    if dy is not None:
        dy = _output(dy, "dy", dtype, (T, B, H))
        if (dy.shape[2] > 1 and dy.strides[2] != dy.itemsize) or \
                any(st % dy.itemsize for st in dy.strides):
            dy = np.ascontiguousarray(dy)
    dh_n = None if dh_n is None else _input(dh_n, "dh_n", dtype, (B, H))
    dc_n = None if (dc_n is None or not has_c) else _input(dc_n, "dc_n", dtype, (B, H))
    dx = _output(dx, "dx", dtype, (T, B, I))
    dh0 = _output(dh0, "dh0", dtype, (B, H))
    dc0 = _output(dc0, "dc0", dtype, (B, H)) if has_c else None
    dw_ih = _output(dw_ih, "dw_ih", dtype, (G * H, I))
    dw_hh = _output(dw_hh, "dw_hh", dtype, (G * H, H))
    db_ih = _output(db_ih, "db_ih", dtype, (G * H,))
    db_hh = _output(db_hh, "db_hh", dtype, (G * H,))
    dpeephole = _output(dpeephole, "dpeephole", dtype, (3, H)) if code == LSTM_PEEPHOLE \
        else None

    cdef BackLayout K = _back_layout(code, T, B, H, G)
    bws = _scratch.empty(max(1, K.size), dtype)
    d_state = [(K.dh, dh_n, dh0)] + ([(K.dc, dc_n, dc0)] if has_c else [])
    for offset, d_n, _ in d_state:
        bws[offset: offset + B * H] = 0 if d_n is None else d_n.reshape(-1)
    if K.dpeep >= 0:
        bws[K.dpeep: K.dpeep + B * 3 * H] = 0
    cdef Py_ssize_t k = 0 if truncate is None else int(truncate)
    if T and B and H:
        # gradients BLAS cannot add into in place are summed into zeros first, then added
        grads = [dx, dw_ih, dw_hh, db_ih, db_hh]
        work = [g if _blas_ready(g) else np.zeros(g.shape, dtype) for g in grads]
        limit = _thread_limit(threads)
        passes, pool = min(_pass_threads, limit), _pool_threads(limit, threads is not None)
        if dtype == np.float32:
            _run_backward[float](code, ca.reverse, k, passes, pool, ca.workspace, ca.layout,
                                 bws, K, dy, x, w_ih, w_hh, peephole, lengths, *work, H, G)
        else:
            _run_backward[double](code, ca.reverse, k, passes, pool, ca.workspace, ca.layout,
                                  bws, K, dy, x, w_ih, w_hh, peephole, lengths, *work, H, G)
        for g, w in zip(grads, work):
            if w is not g:
                g += w
        if dpeephole is not None:
            dpeephole += bws[K.dpeep: K.dpeep + B * 3 * H].reshape(B, 3, H).sum(axis=0)
    for offset, _, d0 in d_state:
        d0 += bws[offset: offset + B * H].reshape(B, H)


# ---------------------------------------------------------------------------------------------
# One step of inference, lean: layer_step
#
# Per call only cheap checks through the NumPy C API (no memoryviews, no Python-level array
# work), one small malloc for the step's workspace, and the unit-split loop with T = 1 that also
# does x W_ih^T by dot products (no BLAS call); batches above small_batch_max take the GEMM loop.

cdef inline Py_ssize_t _need(object a, str name, int typenum, int ndim, Py_ssize_t d0,
                             Py_ssize_t d1, bint writable) except -1:
    # a is an aligned C-contiguous array of this dtype and shape (d1 < 0: 1-D); else raise
    cdef cnp.ndarray arr
    cdef int flags = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    cdef bint shape_ok
    if not cnp.PyArray_Check(a):
        expected = f"({d0},)" if ndim == 1 else f"({d0}, {d1})"
        raise TypeError(f"{name}: expected a numpy array of shape {expected}, got "
                        f"{type(a).__name__}")
    arr = <cnp.ndarray>a
    shape_ok = cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_DIMS(arr)[0] == d0 and \
        (ndim == 1 or cnp.PyArray_DIMS(arr)[1] == d1)
    if not shape_ok:
        expected = f"({d0},)" if ndim == 1 else f"({d0}, {d1})"
        raise ValueError(f"{name}: expected shape {expected}, got {a.shape}")
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name}: expected dtype {cnp.PyArray_DescrFromType(typenum)}, got "
                        f"{a.dtype}")
    if writable:
        flags |= cnp.NPY_ARRAY_WRITEABLE
    if (cnp.PyArray_FLAGS(arr) & flags) != flags:
        raise ValueError(f"{name}: expected an aligned C-contiguous"
                         f"{' writable' if writable else ''} array, got flags "
                         f"C_CONTIGUOUS={a.flags.c_contiguous}, ALIGNED={a.flags.aligned}, "
                         f"WRITEABLE={a.flags.writeable}")
    return 0


cdef inline bint _overlap(object a, object b):
    # do the memory blocks of two C-contiguous arrays overlap (None overlaps nothing)
    if a is None or b is None:
        return False
    cdef char* pa = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char* pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    cdef Py_ssize_t na = cnp.PyArray_NBYTES(<cnp.ndarray>a)
    cdef Py_ssize_t nb = cnp.PyArray_NBYTES(<cnp.ndarray>b)
    return na > 0 and nb > 0 and pa < pb + nb and pb < pa + na


def _overlap_error(x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n):
    # the message for an output of layer_step that overlaps an input (or the other output)
    inputs = {"x": x, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih,
              "b_hh": b_hh, "peephole": peephole}
    for out_name, out in (("h_n", h_n), ("c_n", c_n)):
        for in_name, a in inputs.items():
            if _overlap(out, a):
                raise ValueError(f"{out_name}: expected an output array that does not overlap "
                                 f"the inputs, got one that overlaps {in_name}")
    raise ValueError("c_n: expected an output array that does not overlap h_n, got one that "
                     "does")


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a) if a is not None else NULL


cdef void _step(int code, floating* ws, Layout L, floating* h_n, floating* c_n,
                const floating* x, const floating* h0, const floating* c0,
                const floating* w_ih, const floating* w_hh, const floating* b_ih,
                const floating* b_hh, const floating* peephole,
                Py_ssize_t B, Py_ssize_t I, Py_ssize_t H, Py_ssize_t G, int units) noexcept nogil:
    # the state goes into slot 0 of the inference layout, the step writes slot 1 and y = h_n
    cdef Py_ssize_t BH = B * H
    memcpy(ws + L.h, h0, BH * sizeof(floating))
    if L.c >= 0:
        memcpy(ws + L.c, c0, BH * sizeof(floating))
    _forward_loop(code, False, False, _pass_threads, _pool_threads(_num_threads, False), ws, L,
                  h_n, BH, H, x, w_ih, <int>I,
                  w_hh, <int>H, b_ih, b_hh, peephole, NULL, 1, B, I, H, G, units, units > 0)
    if L.c >= 0:
        memcpy(c_n, ws + L.c + BH, BH * sizeof(floating))


def layer_step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n):
    """One step of inference of one layer, one direction; writes h_n (and c_n), returns None.

    x (B, I), h0, c0 (B, H), weights as in fastrnn.cells, peephole (3, H) or None; every array
    aligned, C-contiguous and of one float dtype (w_ih's), h_n and c_n writable and not
    overlapping any input. c0, c_n and peephole are ignored by cells that have no such thing.
    """
    cdef int code = cell.code
    cdef int G, typenum, units
    cdef Py_ssize_t GH, I, H, B
    if code < RNN_TANH or code > GRU_RESET_BEFORE:
        raise ValueError(f"cell: expected a fastrnn.cells.Cell record, got {cell!r}")
    G = 1 if code <= RNN_RELU else (4 if code <= LSTM_PEEPHOLE else 3)
    # the sizes and the dtype come from the weights; everything else must match them
    if not cnp.PyArray_Check(w_ih) or cnp.PyArray_NDIM(<cnp.ndarray>w_ih) != 2:
        raise TypeError(f"w_ih: expected a 2-D numpy array (G*H, I), got "
                        f"{getattr(w_ih, 'shape', type(w_ih).__name__)}")
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>w_ih)
    if typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE:
        raise TypeError(f"w_ih: expected dtype float32 or float64, got {w_ih.dtype}")
    GH = cnp.PyArray_DIMS(<cnp.ndarray>w_ih)[0]
    I = cnp.PyArray_DIMS(<cnp.ndarray>w_ih)[1]
    H = GH // G
    if GH != G * H:
        raise ValueError(f"w_ih: expected {G}*H rows for cell {cell.name}, got {GH}")
    if not cnp.PyArray_Check(x) or cnp.PyArray_NDIM(<cnp.ndarray>x) != 2:
        raise ValueError(f"x: expected a 2-D numpy array (B, {I}), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    B = cnp.PyArray_DIMS(<cnp.ndarray>x)[0]
    _need(w_ih, "w_ih", typenum, 2, GH, I, False)
    _need(x, "x", typenum, 2, B, I, False)
    _need(h0, "h0", typenum, 2, B, H, False)
    _need(w_hh, "w_hh", typenum, 2, GH, H, False)
    _need(b_ih, "b_ih", typenum, 1, GH, -1, False)
    _need(b_hh, "b_hh", typenum, 1, GH, -1, False)
    _need(h_n, "h_n", typenum, 2, B, H, True)
    if code == LSTM or code == LSTM_PEEPHOLE:
        _need(c0, "c0", typenum, 2, B, H, False)
        _need(c_n, "c_n", typenum, 2, B, H, True)
    else:
        c0 = c_n = None
    if code == LSTM_PEEPHOLE:
        _need(peephole, "peephole", typenum, 2, 3, H, False)
    else:
        peephole = None
    if (_overlap(h_n, x) or _overlap(h_n, h0) or _overlap(h_n, c0) or _overlap(h_n, w_ih)
            or _overlap(h_n, w_hh) or _overlap(h_n, b_ih) or _overlap(h_n, b_hh)
            or _overlap(h_n, peephole) or _overlap(h_n, c_n)
            or _overlap(c_n, x) or _overlap(c_n, h0) or _overlap(c_n, c0)
            or _overlap(c_n, w_ih) or _overlap(c_n, w_hh) or _overlap(c_n, b_ih)
            or _overlap(c_n, b_hh) or _overlap(c_n, peephole)):
        _overlap_error(x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n)
    if B == 0 or H == 0:
        return None
    if B * GH >= 2**31 or GH * max(I, H) >= 2**31:
        raise ValueError(f"x: B = {B} rows or G*H = {GH} columns are too many for BLAS")
    units = _unit_threads(G, H, I + H, B, _num_threads, _STEP_PARALLEL_MIN) \
        if B <= _small_batch_max else 0
    cdef Layout L = _layout(code, 1, B, H, G, False)
    cdef size_t item = 4 if typenum == cnp.NPY_FLOAT else 8
    cdef void* ws = malloc(max(1, L.size) * item)
    if ws == NULL:
        raise MemoryError()
    cdef void* p_x = _data(x)
    cdef void* p_h0 = _data(h0)
    cdef void* p_c0 = _data(c0)
    cdef void* p_w_ih = _data(w_ih)
    cdef void* p_w_hh = _data(w_hh)
    cdef void* p_b_ih = _data(b_ih)
    cdef void* p_b_hh = _data(b_hh)
    cdef void* p_peep = _data(peephole)
    cdef void* p_h_n = _data(h_n)
    cdef void* p_c_n = _data(c_n)
    with nogil:
        if item == 4:
            _step[float](code, <float*>ws, L, <float*>p_h_n, <float*>p_c_n, <float*>p_x,
                         <float*>p_h0, <float*>p_c0, <float*>p_w_ih, <float*>p_w_hh,
                         <float*>p_b_ih, <float*>p_b_hh, <float*>p_peep, B, I, H, G, units)
        else:
            _step[double](code, <double*>ws, L, <double*>p_h_n, <double*>p_c_n, <double*>p_x,
                          <double*>p_h0, <double*>p_c0, <double*>p_w_ih, <double*>p_w_hh,
                          <double*>p_b_ih, <double*>p_b_hh, <double*>p_peep, B, I, H, G, units)
        free(ws)
    return None


# ---------------------------------------------------------------------------------------------
# layer_call_step: a whole one-step call of a layer (fastrnn.layers' __call__ on one time step),
# every layer and direction, with the per-call work of layers.py's Python fast path done here:
# that path cost about 2.5 us a call in Python (attribute and flag look-ups, a dict look-up and
# tuple per parameter, three array allocations), more than half the work of an LSTM step of
# H = 128. Anything this path does not take (another array type or layout, an unusable
# parameter) returns None, and the layer takes its general path, which converts or raises.

cdef inline bint _fits(object a, int typenum, int ndim, Py_ssize_t d0, Py_ssize_t d1,
                       Py_ssize_t d2) noexcept:
    # an exact ndarray of this dtype and shape, aligned and C-contiguous (no error raised)
    cdef int flags = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    if cnp.PyArray_TYPE(arr) != typenum or cnp.PyArray_NDIM(arr) != ndim or dims[0] != d0:
        return False
    if (ndim > 1 and dims[1] != d1) or (ndim > 2 and dims[2] != d2):
        return False
    return (cnp.PyArray_FLAGS(arr) & flags) == flags


cdef inline object _new_array(Py_ssize_t d0, Py_ssize_t d1, Py_ssize_t d2, int typenum,
                              bint zero):
    cdef cnp.npy_intp dims[3]
    dims[0], dims[1], dims[2] = d0, d1, d2
    if zero:
        return cnp.PyArray_ZEROS(3, dims, typenum, 0)
    return cnp.PyArray_EMPTY(3, dims, typenum, 0)


def layer_call_step(spec, params, bint batch_first, x, state):
    """``y, state`` of a layer called on one time step without lengths, or None when the call
    needs the layer's general path.

    spec: the layer's fixed description, a tuple (cell code, float64?, input size, hidden size,
    layers, directions, names, zero bias), names holding per layer and direction the parameter
    names of (w_ih, w_hh, b_ih, b_hh, peephole), None for absent ones (biases: zero bias then);
    params: the layer's dict of parameter arrays, read on every call (it may have changed).
    x (1, B, I) or with batch_first (B, 1, I); state None, h0, or (h0, c0) of (L*D, B, H).
    """
    cdef int code = spec[0]
    cdef int typenum = cnp.NPY_DOUBLE if spec[1] else cnp.NPY_FLOAT
    cdef Py_ssize_t I = spec[2], H = spec[3]
    cdef int nlayers = spec[4], D = spec[5]
    cdef tuple names = spec[6]
    cdef object zero_bias = spec[7]
    cdef int G = 1 if code <= RNN_RELU else (4 if code <= LSTM_PEEPHOLE else 3)
    cdef bint has_c = code == LSTM or code == LSTM_PEEPHOLE
    cdef Py_ssize_t rows = nlayers * D, GH = G * H, B, BH, I_l, layer, d, r, b, k
    cdef cnp.npy_intp* dims
    if not cnp.PyArray_CheckExact(x) or cnp.PyArray_NDIM(<cnp.ndarray>x) != 3:
        return None
    dims = cnp.PyArray_DIMS(<cnp.ndarray>x)
    B = dims[0] if batch_first else dims[1]
    if not _fits(x, typenum, 3, B if batch_first else 1, 1 if batch_first else B, I) or B == 0:
        return None
    if B * GH >= 2**31 or GH * max(I, D * H) >= 2**31:
        return None                     # the general path says why
    # the state
    cdef object h0, c0 = None
    if state is None:
        h0 = _new_array(rows, B, H, typenum, True)
        if has_c:
            c0 = _new_array(rows, B, H, typenum, True)
    elif has_c:
        if type(state) is not tuple or len(<tuple>state) != 2:
            return None
        h0, c0 = (<tuple>state)[0], (<tuple>state)[1]
        if not _fits(h0, typenum, 3, rows, B, H) or not _fits(c0, typenum, 3, rows, B, H):
            return None
    else:
        h0 = state
        if not _fits(h0, typenum, 3, rows, B, H):
            return None
    # the parameters: looked up by name and checked (a dict's array may have been replaced);
    # their references are held in `held` while the GIL is released
    if type(params) is not dict:
        return None
    cdef list held = []
    cdef tuple row_names
    cdef object name, a
    cdef void** ptrs = <void**>malloc(rows * 5 * sizeof(void*))
    cdef int* units = <int*>malloc(nlayers * sizeof(int))
    cdef char* ws = NULL
    cdef Layout L = _layout(code, 1, B, H, G, False)
    cdef size_t item = 4 if typenum == cnp.NPY_FLOAT else 8
    cdef Py_ssize_t ws_bytes = max(1, L.size) * item
    cdef Py_ssize_t out_bytes = B * D * H * item
    cdef object h_n, c_n, y
    cdef char* p_y
    cdef char* p_h0
    cdef char* p_c0
    cdef char* p_h_n
    cdef char* p_c_n
    cdef char* layer_in
    cdef char* layer_out
    try:
        if ptrs == NULL or units == NULL:
            raise MemoryError()
        for r in range(rows):
            row_names = <tuple>names[r]
            I_l = I if r < D else D * H
            for k in range(5):
                name = row_names[k]
                if name is None:
                    a = zero_bias if k == 2 or k == 3 else None
                else:
                    a = params.get(name)
                    if a is None or not (
                            _fits(a, typenum, 2, GH, I_l, 0) if k == 0 else
                            _fits(a, typenum, 2, GH, H, 0) if k == 1 else
                            _fits(a, typenum, 1, GH, 0, 0) if k <= 3 else
                            _fits(a, typenum, 2, 3, H, 0)):
                        return None
                    held.append(a)
                ptrs[r * 5 + k] = _data(a)
        # the results; y is a copy of the last layer's output (never a view of the state)
        h_n = _new_array(rows, B, H, typenum, False)
        c_n = _new_array(rows, B, H, typenum, False) if has_c else None
        y = _new_array(B, 1, D * H, typenum, False) if batch_first else \
            _new_array(1, B, D * H, typenum, False)
        # the workspace, then two (B, D*H) outputs of the layers below the last, in turn
        ws = <char*>malloc(ws_bytes + (2 * out_bytes if nlayers > 1 else 0))
        if ws == NULL:
            raise MemoryError()
        for layer in range(nlayers):
            units[layer] = _unit_threads(G, H, (I if layer == 0 else D * H) + H, B,
                                         _num_threads, _STEP_PARALLEL_MIN) \
                if B <= _small_batch_max else 0
        p_y, p_h0, p_c0 = <char*>_data(y), <char*>_data(h0), <char*>_data(c0)
        p_h_n, p_c_n = <char*>_data(h_n), <char*>_data(c_n)
        layer_in = <char*>_data(x)
        BH = B * H
        with nogil:
            for layer in range(nlayers):
                I_l = I if layer == 0 else D * H
                layer_out = p_y if layer == nlayers - 1 else \
                    ws + ws_bytes + (layer & 1) * out_bytes
                for d in range(D):
                    r = layer * D + d
                    if item == 4:
                        _step[float](code, <float*>ws, L, <float*>(p_h_n + r * BH * 4),
                                     <float*>(p_c_n + r * BH * 4) if has_c else NULL,
                                     <float*>layer_in, <float*>(p_h0 + r * BH * 4),
                                     <float*>(p_c0 + r * BH * 4) if has_c else NULL,
                                     <float*>ptrs[r * 5], <float*>ptrs[r * 5 + 1],
                                     <float*>ptrs[r * 5 + 2], <float*>ptrs[r * 5 + 3],
                                     <float*>ptrs[r * 5 + 4], B, I_l, H, G, units[layer])
                    else:
                        _step[double](code, <double*>ws, L, <double*>(p_h_n + r * BH * 8),
                                      <double*>(p_c_n + r * BH * 8) if has_c else NULL,
                                      <double*>layer_in, <double*>(p_h0 + r * BH * 8),
                                      <double*>(p_c0 + r * BH * 8) if has_c else NULL,
                                      <double*>ptrs[r * 5], <double*>ptrs[r * 5 + 1],
                                      <double*>ptrs[r * 5 + 2], <double*>ptrs[r * 5 + 3],
                                      <double*>ptrs[r * 5 + 4], B, I_l, H, G, units[layer])
                    # this direction's h_n rows into its columns of the layer's output
                    for b in range(B):
                        memcpy(layer_out + (b * D + d) * H * item,
                               p_h_n + (r * BH + b * H) * item, H * item)
                layer_in = layer_out
    finally:
        free(ws)
        free(units)
        free(ptrs)
    return y, ((h_n, c_n) if has_c else h_n)
