"""The Cython layer kernels: one generic time loop, forward and backward, for every cell.

``layer_forward``, ``layer_backward`` and ``layer_call_step`` follow the contract in
``fastrnn.cells``. The Numba backend (fastrnn/_numba) is the same design with the same names;
where the two differ, the difference is named under its heading here.

Cells
    A call reads ``cell.kernel_spec()`` once into a ``CellSpec`` struct: the gate count G, the
    states (h; h and c), the width of the saved buffers, where the second product starts and
    the hidden-side blocks. The workspace layouts, the phases, the products and the padding
    rows all follow from these numbers. The cell's code is read in one place: the switches of
    ``forward_row`` and ``backward_row``, which call the cell's step pair (steps.pxd). The
    parameters travel as a ``Params`` struct, the gradients as ``Grads``, the sizes as
    ``Sizes``, all of a call in one ``Call``. Cython structs cannot be fused over float and
    double, so their array pointers are untyped and cast to ``floating*`` where used (the Numba
    backend passes tuples of arrays instead).

Loops
    Forward: x W_ih^T for all T steps in one product into the gate buffer; then per step, per
    phase, the recurrent product of the phase's gate blocks (phase 0: of h; phase 1, when the
    cell has a second product: of the step's saved buffer) into ``hh``, and one fused pass
    over the batch rows (``forward_pass``) that adds the biases, applies the activations,
    updates the state, writes y[t] and keeps the activated gates in place for backward. A call
    runs one of two loops (``Plan.loop``):
    ROWS, ``forward_rows_loop``: the batch rows of a pass split over threads, a GEMM (or a
    packed product) per product;
    UNITS, ``forward_units_loop`` (B <= small_batch_max): the hidden units split over threads,
    each multiplying by its own rows of the weights, which stay in its core's cache; one
    parallel region for the whole call, the threads meeting at a barrier after each phase.
    Backward (``backward_loop``): per step the passes in reverse phase order
    (``backward_pass``), each followed by the transposed product of its phase's blocks into the
    gradient of the product's source (phase 1: dsaved; phase 0: dh); after the loop dx, dW_ih,
    dW_hh and the bias gradients are products over all T*B rows. ``layer_call_step`` runs the
    forward loops with T = 1, the UNITS loop doing x W_ih^T in its region too (no BLAS call).

Products
    BLAS (scipy.linalg.cython_blas, blas.pxd); products over weights packed once per call into
    panels that a register-blocked kernel streams (panel.h; at a few to a few dozen rows BLAS
    repacks w_hh for every small GEMM), for float32 on the AMX tile unit when there is one
    (amx.h); dot products (rowdot.h) in the UNITS loop of calls too short to pay for packing.
    A ROWS call packs when it has the rows to pay for it (``_packs``); with a pool of threads
    (``Plan.pool``) its input projection and gradient products are packed products too, so the
    call makes no BLAS call.

Threads
    OpenMP (prange and parallel regions; the Numba backend uses Numba's threading layer), with
    ``threads`` for thread counts. BLAS is called only outside parallel regions. Its threads
    and OpenMP's both spin a while after their work, so passes beside BLAS calls use at most
    CPUs - BLAS threads + 1 threads (``effective_num_threads``); a call without BLAS calls (the
    UNITS loop, a pooled ROWS call) uses all it may.

Cache
    One workspace allocation per forward call, kept as the cache when training (``Layout``):
    gates (T, B, G*H), h_slots and c_slots (T+1, B, H: slot t the state before step t, the
    final state at slot T; inference: 2 slots in turn), saved (T, B, saved_width*H) and the
    scratch hh (B, G*H). One per backward call (``BackLayout``): dgates (T, B, G*H), the input
    side; dgates_hh (T, B, hidden_blocks*H), the hidden side of the hidden-side blocks; the
    scratch dhh, dh, dc, dsaved, dpeep. Backward only reads the cache, so one cache serves
    several backward calls; the cache refers to the forward's x, parameters and lengths.
"""
import os

import numpy as np

from fastrnn import _scratch, projection
from fastrnn.cells import CELLS, unprojected, zoneout_weights
from fastrnn.quantized import QuantizedWeight

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.math cimport NAN
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
    ctypedef struct fr_team:
        pass
    void fr_team_wait(fr_team* team, int threads)

cdef extern from "panel.h" nogil:
    void fr_prefetch(const void* p, Py_ssize_t nbytes)
    void* fr_panel_alloc(size_t nbytes)
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

cdef extern from "lowp.h" nogil:
    # fastrnn.quantize's weights: bfloat16 or int8 (see lowp.h)
    enum:
        FR_Q_NONE, FR_Q_BF16, FR_Q_INT8
    enum:
        FR_Q_PLAIN, FR_Q_AVX2, FR_Q_AVX512
    ctypedef struct fr_qweights:
        int format
        const void* data
        Py_ssize_t ld
        Py_ssize_t k
        const float* scale
        const int32_t* row_sum
    size_t fr_q_scratch_bytes(int format, Py_ssize_t ld, Py_ssize_t nx)
    void fr_q_prepare(int format, Py_ssize_t ld, Py_ssize_t k, const float* x, Py_ssize_t ldx,
                      Py_ssize_t nx, void* scratch)
    void fr_q_product(const fr_qweights* q, Py_ssize_t r0, Py_ssize_t rows, const void* xq,
                      Py_ssize_t nx, float* out, Py_ssize_t ldo)
    int fr_q_path(int format)
    void fr_q_widen_bf16(const fr_qweights* q, Py_ssize_t r0, Py_ssize_t rows, float* out)
    void fr_q_round_bf16(const float* x, Py_ssize_t ldx, Py_ssize_t nx, Py_ssize_t k,
                         float* out, Py_ssize_t ldo)
    Py_ssize_t FR_Q_BF16_DOT_ROWS, FR_Q_BF16_INPUT_DOT_ROWS
    Py_ssize_t fr_q_bf16_dot_rows, fr_q_bf16_input_dot_rows
    int fr_q_set_max_path(int path)

from blas cimport gemm, gemv
from steps cimport (GRU, GRU_NORM, GRU_OPTIONS, GRU_RESET_BEFORE, LSTM, LSTM_NORM,
                    LSTM_OPTIONS, LSTM_PEEPHOLE, NUM_CODES, RNN_OPTIONS, RNN_RELU, RNN_TANH,
                    gru_backward_row, gru_forward_row, gru_norm_backward_row,
                    gru_norm_forward_row, gru_options_backward_row,
                    gru_options_forward_row, gru_reset_before_backward_row,
                    gru_reset_before_forward_row, lstm_backward_row, lstm_forward_row,
                    lstm_norm_backward_row, lstm_norm_forward_row,
                    lstm_options_backward_row, lstm_options_forward_row, rnn_backward_row,
                    rnn_forward_row, rnn_options_backward_row, rnn_options_forward_row)

__all__ = ["layer_forward", "layer_backward", "layer_call_step", "concurrent_directions",
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
# loop: it may use all _num_threads threads); 0 turns it off. Inference: the default is the
# largest B for which it was measured faster than the batch-row loop (float32, 2
# threads, LSTM and GRU with H = 128..1024, issue 7): 2-10x at B <= 4, 1.1-1.4x at B = 8 and 16
# (H <= 256; about even at H = 512), slower from B = 32 on, where a GEMM uses the cores better.
# Training forward calls have their own limit, 0 by default: there the loop was measured 1.1-1.6x
# SLOWER at every B from 1 to 16 (LSTM T=100, H=256, forward + backward): the GEMMs of backward
# leave OpenBLAS's threads spinning, and they take the cores the loop's per-step barrier waits on.
cdef Py_ssize_t _small_batch_max = 16
cdef Py_ssize_t _small_batch_max_train = 0
# A second thread for the unit-split loops only pays for its barrier (and wake-up) when a step
# has enough weights to read: G*H*K*B multiply-adds per step (K = H in a forward call, I + H in
# a one-step call). A one-step call enters a parallel region per layer (about 1 us with a
# barrier here), so it needs more: measured, whole one-step layer calls, weights 64-byte
# aligned, one thread vs two: LSTM I=H=128 (131K) 8.2 vs 9.0 us, I=H=144 (166K) 9.3 vs 8.9;
# GRU I=H=144 (124K) 7.1 vs 7.3, I=H=160 (154K) 8.0 vs 7.2.
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
# The batch-row loops (larger batches, training) multiply over packed weights for up to this many
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
    """Tuning and test hook: whether packed batch-row calls use all the threads; returns the
    previous setting."""
    global _pool_off
    previous = not _pool_off
    _pool_off = not on
    return previous


cdef inline bint _packs(Py_ssize_t T, Py_ssize_t B) noexcept nogil:
    # does a batch-row forward call or a backward call of T steps and B rows pack its weights
    return T * B >= _PACK_MIN_ROWS and B <= _PACKED_B_MAX


cdef inline int _pool_threads(int limit, bint limited) noexcept nogil:
    # threads of a packed batch-row call's pool, 0 for none (the one-off products on BLAS):
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
    and such a call makes no BLAS call (the unit-split loop, or a packed batch-row call)."""
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
    that of one-step calls (step; None: unchanged). Returns the previous (n, step)."""
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
# A call's description, filled once per call: the cell, the sizes, the parameters, the
# workspace layouts. Array pointers are untyped (Cython structs cannot be fused over float and
# double) and cast to floating* where used; offsets and strides count elements.

cdef enum:
    # Plan.loop
    ROWS = 0                    # forward_rows_loop
    UNITS = 1                   # forward_units_loop


cdef struct CellSpec:
    # cells.Cell.kernel_spec() (_cell_spec)
    int code
    Py_ssize_t G                # gate blocks
    Py_ssize_t states           # 1: h; 2: h and c
    Py_ssize_t saved_width      # the saved buffers' width, in units of H
    Py_ssize_t second_block     # product 1 covers blocks [second_block, G); G: no product 1
    Py_ssize_t hidden_blocks    # hidden-side blocks, [first_hidden, first_hidden + hidden_blocks)
    Py_ssize_t first_hidden
    int phases                  # 1, or 2 with a product 1
    bint peephole               # a peephole parameter (3, H)
    Py_ssize_t row_sums         # per-row gradient sums of Params.peephole, in units of H:
                                # 3 (peepholes), norm rows * G (layer norm), 0


cdef struct Sizes:
    Py_ssize_t T, B, H
    Py_ssize_t I "I_"           # in C not I, which complex.h defines


cdef struct Params:
    # cells.Cell.param_names
    const void* w_ih            # (G*H, I), rows ld_ih apart
    const void* w_hh            # (G*H, H), rows ld_hh apart
    const void* b_ih            # (G*H,)
    const void* b_hh            # (G*H,)
    const void* peephole        # (3, H); a layer-normalized cell's gains and shifts, (rows,
                                # G*H) (fastrnn.cells.Cell.norm_rows); NULL for other cells
    int ld_ih, ld_hh
    const double* options       # cells.Cell.option_values(); NULL for a plain cell
    fr_qweights q_ih, q_hh      # fastrnn.quantize's weights (then w_ih, w_hh are NULL);
                                # format FR_Q_NONE: none
    bint round_source           # w_hh is bfloat16 weights widened: each step's source is
                                # rounded to bfloat16 before its product (forward_loop)


cdef struct Grads:
    # what backward adds into, laid out so that BLAS can add in place (_blas_ready); dpeephole
    # and the state gradients are added at Python level
    void* dx                    # (T, B, I), steps dx_step and rows dx_row apart
    void* dw_ih                 # like w_ih, rows ld_dw_ih apart
    void* dw_hh
    void* db_ih                 # entries inc_db_ih apart
    void* db_hh
    Py_ssize_t dx_step, dx_row
    int ld_dw_ih, ld_dw_hh, inc_db_ih, inc_db_hh


cdef struct Layout:
    # the forward workspace, kept as the cache when training: offsets, -1 for what a cell lacks
    Py_ssize_t gates            # (T, B, G*H)  x W_ih^T, then the activated gates (in place)
    Py_ssize_t h_slots          # (T+1, B, H)  train: h before step t at slot t, the final h at
                                #              slot T; (2, B, H) inference: two slots in turn
    Py_ssize_t c_slots          # like h_slots, cells with states == 2
    Py_ssize_t saved            # (T, B, saved_width*H) train: the cell's saved buffers;
                                # inference: (B, saved_width*H) when product 1 reads it
    Py_ssize_t hh               # (B, G*H)     scratch: the step's recurrent products
    Py_ssize_t raw_c            # (T, B, H)    train with zoneout and states == 2: each step's
                                #              own c' (backward reads tanh(c'), not the mixed c)
    Py_ssize_t size


cdef struct BackLayout:
    # the backward workspace: offsets, -1 for what a cell lacks
    Py_ssize_t dgates           # (T, B, G*H)  dL/d(x W_ih^T + b_ih), the input side
    Py_ssize_t dgates_hh        # (T, B, hidden_blocks*H)  the hidden side of those blocks
    Py_ssize_t dhh              # (B, G*H)     the step's hidden side, when hidden_blocks > 0
    Py_ssize_t dh               # (B, H)       dL/dh of the state the loop has reached
    Py_ssize_t dc               # (B, H)       dL/dc, states == 2
    Py_ssize_t dsaved           # (B, H)       the gradient of product 1's source
    Py_ssize_t dpeep            # (B, row_sums*H) per-row sums: da_i*c, da_f*c, da_o*c' (or a
                                #              layer-normalized cell's gains and shifts)
    Py_ssize_t ones             # (T*B,)       ones, for the bias gradients as GEMV
    Py_ssize_t carry            # (B, states*H) zoneout: the state gradient that skips the step
    Py_ssize_t size


cdef struct Call:
    # one layer_forward, layer_backward or one-step call: what its loops read
    CellSpec cell
    Sizes sizes
    Params p
    Layout L                    # the forward workspace (backward: the cache's)
    const int64_t* lengths      # (B,); NULL: no padding (one-step calls)
    bint reverse, train
    const void* x               # (T, B, I) C-contiguous
    const void* mask            # (G, B, H) recurrent dropout masks; NULL: none
    const void* zone            # zoneout's keep weights, (states*H) per step and row, steps
    Py_ssize_t zone_step, zone_row  # zone_step and rows zone_row apart (0: the same for all);
                                # NULL: no zoneout (see Zoneout)
    void* y                     # forward: (T, B, H), steps y_step and rows y_row apart
    Py_ssize_t y_step, y_row
    BackLayout K                # backward only from here
    Grads d
    const void* dy              # like y; NULL: no dy
    Py_ssize_t dy_step, dy_row
    Py_ssize_t truncate         # 0: none
    const Projection* proj      # forward_projected_loop's h; NULL for every other call


cdef struct Projection:
    # a projected LSTM whose h is zoned out per unit (forward_projected_loop): h, P wide,
    # carried beside the cell's m (the Layout's h_slots)
    Py_ssize_t P
    const void* w_hr            # (P, H), rows ld_hr apart
    int ld_hr
    void* slots                 # (slots, B, P) like h_slots: h before each step
    void* h_raw                 # (B, P) scratch: w_hr m of the step
    const void* keep            # h's keep weights, P per step and row, keep_step and keep_row
    Py_ssize_t keep_step, keep_row  # apart (0: the same for all)
    void* y                     # (T, B, P), steps y_step and rows y_row apart
    Py_ssize_t y_step, y_row
    const void* dy              # backward: like y; NULL: no dy
    Py_ssize_t dy_step, dy_row
    void* dh                    # backward: (B, P) the gradient of h at the state reached
    void* dw_hr                 # backward: (P, H), rows ld_dw_hr apart, ADDED into
    int ld_dw_hr


cdef struct Plan:
    # how a forward call runs, chosen per call
    int loop                    # ROWS or UNITS
    int threads                 # ROWS: threads of the passes; UNITS: of the unit split
    int pool                    # ROWS: threads of a packed call's pool (_pool_threads), 0: none
    bint input_dots             # UNITS: x W_ih^T in the loop's region too (no BLAS call)


cdef CellSpec _cell_spec(cell) except *:
    cdef CellSpec spec
    (spec.code, spec.G, spec.states, spec.saved_width, spec.second_block, spec.hidden_blocks,
     spec.first_hidden) = cell.kernel_spec()
    if not 0 <= spec.code < NUM_CODES:
        raise ValueError(f"cell: {cell.name!r} (code {spec.code}) has no step pair in the "
                         f"Cython backend (kernels/steps.pxd)")
    spec.phases = 2 if spec.second_block < spec.G else 1
    spec.peephole = cell.peephole
    spec.row_sums = 3 if cell.peephole else cell.norm_rows * spec.G
    return spec


# every cell's spec by code, for layer_call_step (whose spec names the cell by its code); G = 0
# for a code no record has
cdef CellSpec _specs_by_code[NUM_CODES]


def _fill_specs_by_code():
    for cell in CELLS.values():
        if 0 <= cell.code < NUM_CODES:      # else a record without a step pair here yet
            _specs_by_code[cell.code] = _cell_spec(cell)


_fill_specs_by_code()


cdef Layout _layout(const CellSpec* cell, Sizes n, bint train, bint zoned) noexcept:
    cdef Layout L
    cdef Py_ssize_t slots = n.T + 1 if train else 2, BH = n.B * n.H, at = 0
    L.gates = at; at += n.T * n.B * cell.G * n.H
    L.h_slots = at; at += slots * BH
    L.c_slots = L.saved = -1
    if cell.states == 2:
        L.c_slots = at; at += slots * BH
    if cell.saved_width > 0 and (train or cell.phases > 1):
        L.saved = at; at += (n.T if train else 1) * BH * cell.saved_width
    L.hh = at; at += n.B * cell.G * n.H
    L.raw_c = -1
    if zoned and train and cell.states == 2:
        L.raw_c = at; at += n.T * BH
    L.size = at
    return L


cdef BackLayout _back_layout(const CellSpec* cell, Sizes n, bint zoned) noexcept:
    cdef BackLayout K
    cdef Py_ssize_t BH = n.B * n.H, at = 0
    K.dgates = at; at += n.T * n.B * cell.G * n.H
    K.dgates_hh = K.dhh = K.dc = K.dsaved = K.dpeep = -1
    if cell.hidden_blocks > 0:
        K.dgates_hh = at; at += n.T * BH * cell.hidden_blocks
        K.dhh = at; at += n.B * cell.G * n.H
    K.dh = at; at += BH
    if cell.states == 2:
        K.dc = at; at += BH
    if cell.phases > 1:
        K.dsaved = at; at += BH
    if cell.row_sums:
        K.dpeep = at; at += cell.row_sums * BH
    K.ones = at; at += n.T * n.B
    K.carry = -1
    if zoned:
        K.carry = at; at += cell.states * BH
    K.size = at
    return K


cdef inline bint _any_active(const int64_t* lengths, Py_ssize_t t, Py_ssize_t B) noexcept nogil:
    cdef Py_ssize_t b
    if lengths == NULL:
        return True
    for b in range(B):
        if t < lengths[b]:
            return True
    return False


cdef inline Py_ssize_t _state_slot(Py_ssize_t s, Py_ssize_t t, Py_ssize_t T, bint reverse,
                                   bint train, bint after) noexcept nogil:
    # the slot of h_slots / c_slots holding the state before (after=False) or after step t, the
    # s-th step in processing order. train: slot t holds the state before step t (the cache
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
# Forward: the row step (the switch on the cell's code), the pass over a step's rows, the loops

cdef void forward_row(const Call* call, floating* ws, int phase, Py_ssize_t t, Py_ssize_t cur,
                      Py_ssize_t nxt, Py_ssize_t b, Py_ssize_t j0, Py_ssize_t n) noexcept nogil:
    # row b of step t, units [j0, j0 + n) (the whole row: 0, H), the pass after product
    # `phase`; the state before the step is in slot cur, the one after it goes to slot nxt.
    # Not inline: as a function of its own its pointers are plain locals, not loads from the
    # OpenMP region's shared data, which lets the compiler vectorise the loops of the steps.
    cdef Py_ssize_t H = call.sizes.H, B = call.sizes.B, GH = call.cell.G * H, k
    cdef int code = call.cell.code
    cdef floating* gates = ws + call.L.gates + (t * B + b) * GH + j0
    cdef floating* hh = ws + call.L.hh + b * GH + j0
    cdef floating* h = ws + call.L.h_slots + (cur * B + b) * H + j0
    cdef floating* h_new = ws + call.L.h_slots + (nxt * B + b) * H + j0
    cdef floating* c = NULL
    cdef floating* c_new = NULL
    cdef floating* saved = NULL
    cdef floating* y = <floating*>call.y + t * call.y_step + b * call.y_row + j0
    cdef const floating* b_ih = <const floating*>call.p.b_ih + j0
    cdef const floating* b_hh = <const floating*>call.p.b_hh + j0
    cdef const floating* peephole = NULL
    if n <= 0:
        return
    if call.L.c_slots >= 0:
        c = ws + call.L.c_slots + (cur * B + b) * H + j0
        c_new = ws + call.L.c_slots + (nxt * B + b) * H + j0
    if call.L.saved >= 0:
        saved = ws + call.L.saved + ((t * B if call.train else 0) + b) * call.cell.saved_width * H \
            + j0
    if call.p.peephole != NULL:
        peephole = <const floating*>call.p.peephole + j0
    if call.lengths != NULL and t >= call.lengths[b]:
        # padding: the state passes through, the output is zero; before the last phase the
        # saved row, a later product's source, is zeroed (never stale)
        if phase + 1 < call.cell.phases:
            for k in range(call.cell.saved_width):
                memset(saved + k * H, 0, n * sizeof(floating))
            return
        memcpy(h_new, h, n * sizeof(floating))
        if c != NULL:
            memcpy(c_new, c, n * sizeof(floating))
        memset(y, 0, n * sizeof(floating))
        return
    if code == RNN_TANH or code == RNN_RELU:
        rnn_forward_row(gates, h_new, y, hh, b_ih, b_hh, n, H, code == RNN_RELU)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_forward_row(gates, h_new, c_new, y, hh, b_ih, b_hh, c, peephole, n, H)
    elif code == GRU:
        gru_forward_row(gates, saved, h_new, y, hh, b_ih, b_hh, h, n, H)
    elif code == GRU_RESET_BEFORE:
        gru_reset_before_forward_row(phase, gates, saved, h_new, y, hh, b_ih, b_hh, h, n, H)
    elif code == RNN_OPTIONS:
        rnn_options_forward_row(gates, h_new, y, hh, b_ih, b_hh, call.p.options, n, H)
    elif code == LSTM_OPTIONS:
        lstm_options_forward_row(gates, h_new, c_new, y, hh, b_ih, b_hh, c, peephole,
                                 call.p.options, n, H)
    elif code == GRU_OPTIONS:
        gru_options_forward_row(phase, call.cell.phases == 1, gates, saved, h_new, y, hh, b_ih,
                                b_hh, h, call.p.options, n, H)
    elif code == LSTM_NORM:             # whole rows (the batch-row loop): j0 = 0, n = H
        lstm_norm_forward_row(gates, h_new, c_new, y, saved if call.train else NULL, hh, b_ih,
                              b_hh, c, peephole, call.p.options[0], H)
    elif code == GRU_NORM:
        gru_norm_forward_row(phase, call.cell.phases == 1, gates, saved,
                             saved + H if call.train else NULL, h_new, y, hh, b_ih, b_hh, h,
                             peephole, call.p.options[0], H)
    if call.zone != NULL and phase + 1 == call.cell.phases:
        _zoneout_row(call, ws, t, b, j0, n, h, h_new, c, c_new, y)


# Zoneout (Krueger et al. 2016), the same for every cell, after its step: each state unit
# becomes k * (its value before the step) + (1 - k) * (the cell's new value), k the unit's
# keep weight from call.zone (h's H weights, then c's; a 0/1 mask in training, the rate for
# the expectation), and y the new h so made. Backward splits the gradient of the mixed state:
# (1 - k) of it goes into the cell's step, k of it (the carry) straight to the state before.

cdef inline void _zoneout_row(const Call* call, floating* ws, Py_ssize_t t, Py_ssize_t b,
                              Py_ssize_t j0, Py_ssize_t n, const floating* h, floating* h_new,
                              const floating* c, floating* c_new, floating* y) noexcept nogil:
    cdef const floating* k = <const floating*>call.zone + t * call.zone_step \
        + b * call.zone_row + j0
    cdef Py_ssize_t H = call.sizes.H, j
    cdef floating one = 1
    for j in range(n):
        h_new[j] = k[j] * h[j] + (one - k[j]) * h_new[j]
        y[j] = h_new[j]
    if c != NULL:
        k = k + H
        if call.L.raw_c >= 0:
            memcpy(ws + call.L.raw_c + (t * call.sizes.B + b) * H + j0, c_new,
                   n * sizeof(floating))
        for j in range(n):
            c_new[j] = k[j] * c[j] + (one - k[j]) * c_new[j]


cdef inline void _zoneout_split(const Call* call, floating* bws, Py_ssize_t t, Py_ssize_t b,
                                floating* dh, floating* dc) noexcept nogil:
    # before the step's backward: k of the state gradient to the carry, (1 - k) stays
    cdef Py_ssize_t H = call.sizes.H, j
    cdef const floating* k = <const floating*>call.zone + t * call.zone_step + b * call.zone_row
    cdef floating* carry = bws + call.K.carry + b * call.cell.states * H
    cdef floating one = 1
    for j in range(H):
        carry[j] = k[j] * dh[j]
        dh[j] = (one - k[j]) * dh[j]
    if dc != NULL:
        for j in range(H):
            carry[H + j] = k[H + j] * dc[j]
            dc[j] = (one - k[H + j]) * dc[j]


cdef inline void _zoneout_carry(const Call* call, floating* bws, Py_ssize_t b, floating* dh,
                                floating* dc) noexcept nogil:
    # after the step's backward: the carry added to the gradient of the state before it
    cdef Py_ssize_t H = call.sizes.H, j
    cdef const floating* carry = bws + call.K.carry + b * call.cell.states * H
    for j in range(H):
        dh[j] += carry[j]
    if dc != NULL:
        for j in range(H):
            dc[j] += carry[H + j]


cdef void forward_pass(const Call* call, floating* ws, int phase, Py_ssize_t t, Py_ssize_t cur,
                       Py_ssize_t nxt, int threads) noexcept nogil:
    cdef Py_ssize_t b, B = call.sizes.B, H = call.sizes.H
    if threads > 1 and B > 1:
        for b in prange(B, schedule="static", num_threads=threads):
            forward_row(call, ws, phase, t, cur, nxt, b, 0, H)
    else:
        for b in range(B):
            forward_row(call, ws, phase, t, cur, nxt, b, 0, H)


cdef inline void _phase_blocks(const CellSpec* cell, int phase, Py_ssize_t* g0,
                               Py_ssize_t* g1) noexcept nogil:
    # the gate blocks [g0, g1) of product `phase`
    g0[0] = 0 if phase == 0 else cell.second_block
    g1[0] = cell.second_block if phase == 0 else cell.G


cdef inline const floating* _source(const Call* call, floating* ws, int phase, Py_ssize_t t,
                                    Py_ssize_t cur, Py_ssize_t* ld) noexcept nogil:
    # the source of product `phase` of step t, (B, *ld): h (in slot cur), or the step's saved
    # buffer
    cdef Py_ssize_t B = call.sizes.B, H = call.sizes.H
    if phase == 0 and call.proj != NULL:           # h, P wide (forward_projected_loop)
        ld[0] = call.proj.P
        return <floating*>call.proj.slots + cur * B * ld[0]
    if phase == 0:
        ld[0] = H
        return ws + call.L.h_slots + cur * B * H
    ld[0] = call.cell.saved_width * H
    return ws + call.L.saved + (t * B * ld[0] if call.train else 0)


cdef void forward_loop(const Call* call, floating* ws, Plan plan) noexcept nogil:
    # the whole forward call; the state before the first step is in its slot (_first_slot)
    cdef Call widened
    cdef float* wide = NULL
    cdef fr_team team                   # the unit-split loop's barrier (fr_team_wait)
    memset(&team, 0, sizeof(team))
    if floating is float:
        if call.p.q_hh.format == FR_Q_BF16 and _widened_steps(call, plan):
            # the weights widened once for the call, the source of each step rounded
            # (Params.round_source), on the float32 loops
            wide = <float*>malloc(call.cell.G * call.sizes.H * call.p.q_hh.ld * sizeof(float))
            if wide != NULL:
                fr_q_widen_bf16(&call.p.q_hh, 0, call.cell.G * call.sizes.H, wide)
                widened = call[0]
                widened.p.w_hh, widened.p.ld_hh = wide, <int>call.p.q_hh.ld
                widened.p.q_hh.format = FR_Q_NONE
                widened.p.round_source = True
                call = &widened
    if plan.loop == ROWS:
        forward_rows_loop(call, ws, plan.threads, plan.pool)
    else:
        if not plan.input_dots:
            _input_projection(call, ws)
        if plan.threads > 1:
            with parallel(num_threads=plan.threads):
                forward_units_loop(call, ws, plan.input_dots, openmp.omp_get_thread_num(),
                                   openmp.omp_get_num_threads(), &team)
        else:
            forward_units_loop(call, ws, plan.input_dots, 0, 1, &team)
    free(wide)


# bytes of one core's L2 (what the CPU reports; 1 MiB where it reports nothing)
cdef Py_ssize_t _L2_BYTES = 1 << 20
try:
    _L2_BYTES = os.sysconf("SC_LEVEL2_CACHE_SIZE") or _L2_BYTES
except (ValueError, OSError):
    pass
if _L2_BYTES <= 0:
    _L2_BYTES = 1 << 20


cdef inline bint _widened_steps(const Call* call, Plan plan) noexcept nogil:
    # whether a bfloat16 layer's steps run on float32 kernels (widened weights): over more
    # rows than vdpbf16ps pays for (lowp.h), or over 2-4 rows when a thread's float32 weights
    # would fit in half its L2, where the products are compute-bound and vdpbf16ps runs at
    # half the rate of FMA (Intel Xeon, 2 MB L2: LSTM H = 256, B = 4, 0.79x the float32 call
    # on vdpbf16ps, 0.97x widened; H = 1024, B = 4: 1.17x against 0.86x). One row stays on
    # vdpbf16ps (H = 256, B = 1: 1.12x)
    cdef Py_ssize_t B = call.sizes.B, H = call.sizes.H
    cdef Py_ssize_t threads = max(1, plan.threads) if plan.loop == UNITS else 1
    if B > FR_Q_BF16_DOT_ROWS:
        return True
    return B > 1 and call.cell.G * H * H * <Py_ssize_t>sizeof(float) // threads <= _L2_BYTES // 2


cdef inline void _input_projection(const Call* call, floating* ws) noexcept nogil:
    # gates = x @ w_ih.T for all steps:  (T*B, I) x (I, G*H)
    cdef Py_ssize_t GH = call.cell.G * call.sizes.H, I = call.sizes.I
    if _widened_input(call):
        _widened_input_dots(call, ws, 0, call.sizes.H, _amx(ws, call.sizes.T * call.sizes.B))
        return
    if call.p.q_ih.format != FR_Q_NONE:
        _q_multiply_mt(&call.p.q_ih, GH, <const floating*>call.x, I, call.sizes.T * call.sizes.B,
                       ws + call.L.gates, GH, 1)
        return
    gemm(False, True, <int>(call.sizes.T * call.sizes.B), <int>GH, <int>I, 1,
         <const floating*>call.x, <int>I, <const floating*>call.p.w_ih, call.p.ld_ih, 0,
         ws + call.L.gates, <int>GH)


cdef void forward_rows_loop(const Call* call, floating* ws, int threads, int pool) noexcept nogil:
    # the batch-row loop: per step and phase one product for all rows, then the pass (rows
    # split over `threads`). pool: threads of the packed loop's pool (_pool_threads), 0: none.
    # When the call has the rows to pay for it (_packs) the products run over weights packed
    # once; then with a pool the input projection is a packed product too, and with no BLAS
    # call in the call every product and pass uses the pool's threads
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, I = call.sizes.I, H = call.sizes.H
    cdef Py_ssize_t G = call.cell.G, GH = G * H, k0 = call.cell.second_block * H
    cdef const floating* w_hh = <const floating*>call.p.w_hh
    cdef Py_ssize_t s, t, cur, nxt, g0, g1, ld
    cdef const floating* source
    cdef int phase
    cdef bint active
    # packed w_hh: product 0's rows, then product 1's at n_at
    cdef bint amx_in = _amx(ws, T * B), amx_h = _amx(ws, B)
    cdef Py_ssize_t n_at = _packed_size(ws, k0, H, amx_h)
    cdef floating* packed = NULL
    cdef int pool_threads = 0
    cdef const floating* mask = <const floating*>call.mask
    cdef floating* h_masked = NULL
    if mask != NULL:
        # recurrent dropout: products block by block, of h * mask[g], on BLAS (never packed)
        h_masked = <floating*>malloc(B * H * sizeof(floating))
    # fastrnn.quantize's weights: products on lowp.h (each step's source rounded once for all
    # rows, into qx), or bfloat16 ones widened (forward_loop), of a rounded source (rounded)
    cdef bint quantized = call.p.q_hh.format != FR_Q_NONE
    cdef bint q_input = call.p.q_ih.format != FR_Q_NONE
    cdef void* qx = NULL
    cdef float* rounded = NULL
    if quantized or q_input:
        threads = max(threads, pool, 1)
    if quantized:
        qx = malloc(fr_q_scratch_bytes(call.p.q_hh.format, call.p.q_hh.ld, B))
    elif _packs(T, B) and mask == NULL:
        # one buffer: the input projection's packed w_ih first, then w_hh for the steps
        packed = <floating*>fr_panel_alloc(max(n_at + _packed_size(ws, GH - k0, H, amx_h),
                                       _packed_size(ws, GH, I, amx_in)) * sizeof(floating))
        pool_threads = pool if packed != NULL else 0
    if call.p.round_source:
        rounded = <float*>malloc(B * H * sizeof(float))
    if q_input and _widened_input(call) and threads > 1:
        with parallel(num_threads=threads):
            _widened_input_part(call, ws, openmp.omp_get_thread_num(),
                                openmp.omp_get_num_threads(), amx_in)
    elif q_input and _widened_input(call):
        _widened_input_dots(call, ws, 0, H, amx_in)
    elif q_input:
        _q_multiply_mt(&call.p.q_ih, GH, <const floating*>call.x, I, T * B, ws + call.L.gates,
                       GH, threads)
    elif pool_threads > 0:
        # gates = x @ w_ih.T for all steps:  (T*B, I) x (I, G*H)
        _pack_and_multiply_mt(Strided(call.p.w_ih, call.p.ld_ih, 1), GH, I, Strided(call.x, I, 1),
                              T * B, ws + call.L.gates, GH, False, packed, pool_threads, amx_in)
    else:
        _input_projection(call, ws)
    if packed != NULL:
        threads = max(pool_threads, 1)
        _pack_mt(w_hh, call.p.ld_hh, 1, k0, H, packed, threads, amx_h)
        if k0 < GH:
            _pack_mt(w_hh + k0 * call.p.ld_hh, call.p.ld_hh, 1, GH - k0, H, packed + n_at,
                     threads, amx_h)
    for s in range(T):
        t = T - 1 - s if call.reverse else s
        cur = _state_slot(s, t, T, call.reverse, call.train, False)
        nxt = _state_slot(s, t, T, call.reverse, call.train, True)
        active = _any_active(call.lengths, t, B)     # else every row is padding: no product
        for phase in range(call.cell.phases):
            if active:
                # hh[:, blocks] = source @ w_hh[blocks].T:  (B, H) x (H, blocks*H)
                _phase_blocks(&call.cell, phase, &g0, &g1)
                source = _source(call, ws, phase, t, cur, &ld)
                if rounded != NULL:
                    source = _rounded_source(source, ld, B, H, rounded, &ld)
                if mask != NULL and phase == 1:
                    # rh = r * (h * mask[n]): the phase made r * h
                    _scale_rows(<floating*>source, ld, mask + g0 * B * H, B, H)
                if mask != NULL and phase == 0:
                    _masked_products(source, mask, w_hh, call.p.ld_hh, g0, g1, B, H, h_masked,
                                     ws + call.L.hh, GH)
                elif quantized:
                    _q_prepare(&call.p.q_hh, source, ld, B, qx)
                    _q_product_mt(&call.p.q_hh, g0 * H, (g1 - g0) * H, qx, B,
                                  ws + call.L.hh + g0 * H, GH, threads)
                elif packed != NULL:
                    _packed_product_mt(packed + phase * n_at, (g1 - g0) * H, H, source, ld, B,
                                       ws + call.L.hh + g0 * H, GH, False, threads, amx_h)
                else:
                    gemm(False, True, <int>B, <int>((g1 - g0) * H), <int>H, 1, source, <int>ld,
                         w_hh + g0 * H * call.p.ld_hh, call.p.ld_hh, 0,
                         ws + call.L.hh + g0 * H, <int>GH)
            forward_pass(call, ws, phase, t, cur, nxt, threads)
    free(packed)
    free(h_masked)
    free(qx)
    free(rounded)


cdef inline const floating* _rounded_source(const floating* source, Py_ssize_t ld,
                                            Py_ssize_t B, Py_ssize_t H, float* rounded,
                                            Py_ssize_t* ld_out) noexcept nogil:
    # source (B rows of H, ld apart) rounded to bfloat16 into rounded (rows H apart)
    if floating is float:
        fr_q_round_bf16(source, ld, B, H, rounded, H)
        ld_out[0] = H
        return rounded
    else:
        return source


# fastrnn.quantize's products (lowp.h), float32 only: the rows of x rounded to the weights'
# format (_q_prepare), then multiplied by rows of the weights

cdef Py_ssize_t _Q_CHUNK = 256        # rows of x rounded at a time for a call's input product


cdef inline void _q_prepare(const fr_qweights* q, const floating* x, Py_ssize_t ldx,
                            Py_ssize_t nx, void* scratch) noexcept nogil:
    if floating is float:
        fr_q_prepare(q.format, q.ld, q.k, x, ldx, nx, scratch)


cdef inline void _q_product(const fr_qweights* q, Py_ssize_t r0, Py_ssize_t rows,
                            const void* xq, Py_ssize_t nx, floating* out,
                            Py_ssize_t ldo) noexcept nogil:
    # out[b*ldo + r] = x[b] . W[r0 + r] for r < rows, b < nx, x prepared
    if floating is float:
        fr_q_product(q, r0, rows, xq, nx, out, ldo)


cdef void _q_product_mt(const fr_qweights* q, Py_ssize_t r0, Py_ssize_t rows, const void* xq,
                        Py_ssize_t nx, floating* out, Py_ssize_t ldo, int threads) noexcept nogil:
    # _q_product with the weight rows split over `threads` threads, in parts of 16 rows
    cdef Py_ssize_t per, part, a, z
    threads = _panel_parts(rows, 16, threads, &per)
    if threads <= 1:
        _q_product(q, r0, rows, xq, nx, out, ldo)
        return
    for part in prange(threads, num_threads=threads, schedule="static"):
        a = part * per
        z = min(rows, a + per)
        if a < z:
            _q_product(q, r0 + a, z - a, xq, nx, out + a, ldo)


cdef inline bint _widened_input(const Call* call) noexcept nogil:
    # whether the input product is a bfloat16 one over more rows than vdpbf16ps pays for
    return call.p.q_ih.format == FR_Q_BF16 \
        and call.sizes.T * call.sizes.B > FR_Q_BF16_INPUT_DOT_ROWS


cdef void _widened_input_part(const Call* call, floating* ws, int tid, int threads,
                              bint amx) noexcept nogil:
    # thread tid's units of _widened_input_dots
    cdef Py_ssize_t j0, j1
    _unit_range(call.sizes.H, tid, threads, &j0, &j1)
    if j1 > j0:
        _widened_input_dots(call, ws, j0, j1 - j0, amx)


cdef void _widened_input_dots(const Call* call, floating* ws, Py_ssize_t j0, Py_ssize_t n,
                              bint amx) noexcept nogil:
    # gates[:, :, block g, units j0 .. j0+n] = x @ W_ih[block g, units].T, W_ih bfloat16:
    # x rounded to bfloat16 (kept as float32), the weight rows widened to float32, then the
    # float32 products (packed, on the tile unit where there is one), as a float32 layer's
    # input product runs: the exact products fr_q_product makes, summed in another order
    # (widened row by row inside fr_q_product they ran at a third of the speed: lowp.h)
    cdef const fr_qweights* q = &call.p.q_ih
    cdef Py_ssize_t TB = call.sizes.T * call.sizes.B, I = call.sizes.I, ld = q.ld
    cdef Py_ssize_t GH = call.cell.G * call.sizes.H, H = call.sizes.H, g, b0, nb
    cdef floating* gates = ws + call.L.gates
    cdef float* rounded = NULL
    cdef float* wide = NULL
    cdef float* packed = NULL
    if floating is float:
        # chunks of _Q_CHUNK * 4 rows of x
        nb = min(TB, _Q_CHUNK * 4)
        rounded = <float*>malloc(nb * ld * sizeof(float))
        wide = <float*>malloc(n * ld * sizeof(float))
        if nb >= _PACK_MIN_ROWS:
            packed = <float*>fr_panel_alloc(_packed_size(ws, n, I, amx) * sizeof(float))
        if rounded == NULL or wide == NULL:
            for b0 in range(TB):                # no memory: NaN, not garbage
                for g in range(call.cell.G):
                    for nb in range(n):
                        gates[b0 * GH + g * H + j0 + nb] = NAN
        else:
            b0 = 0
            while b0 < TB:
                nb = min(_Q_CHUNK * 4, TB - b0)
                fr_q_round_bf16(<const float*>call.x + b0 * I, I, nb, I, rounded, ld)
                for g in range(call.cell.G):
                    fr_q_widen_bf16(q, g * H + j0, n, wide)
                    if packed != NULL and nb >= _PACK_MIN_ROWS:
                        _pack(wide, ld, 1, n, I, packed, amx)
                        _packed_product(<const float*>packed, n, I, rounded, ld, 1, nb,
                                        gates + b0 * GH + g * H + j0, GH, False, amx)
                    else:
                        _rowdot(<const float*>wide, ld, n, I, rounded, ld, nb,
                                gates + b0 * GH + g * H + j0, GH)
                b0 += nb
        free(rounded)
        free(wide)
        free(packed)


cdef void _q_multiply_mt(const fr_qweights* q, Py_ssize_t rows, const floating* x,
                         Py_ssize_t ldx, Py_ssize_t nx, floating* out, Py_ssize_t ldo,
                         int threads) noexcept nogil:
    # out[b*ldo + r] = x[b] . W[r] for r < rows, b < nx: x rounded _Q_CHUNK rows at a time
    cdef Py_ssize_t b0 = 0, nb
    cdef void* xq = malloc(fr_q_scratch_bytes(q.format, q.ld, min(nx, _Q_CHUNK)))
    while b0 < nx:
        nb = min(_Q_CHUNK, nx - b0)
        _q_prepare(q, x + b0 * ldx, ldx, nb, xq)
        _q_product_mt(q, 0, rows, xq, nb, out + b0 * ldo, ldo, threads)
        b0 += nb
    free(xq)


# Recurrent dropout (Call.mask, (G, B, H)): gate block g's product is of h * mask[g]. The loops
# take masks on their BLAS path only (never packed, never the unit-split loop): block by block,
# through a (B, H) buffer of the masked state.

cdef void _masked_products(const floating* h, const floating* mask, const floating* w_hh,
                           int ld_hh, Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t B, Py_ssize_t H,
                           floating* h_masked, floating* hh, Py_ssize_t ld_out) noexcept nogil:
    # hh[:, block g] = (h * mask[g]) @ w_hh[block g].T for g in [g0, g1); h (B, H) rows H apart
    cdef Py_ssize_t g, i
    for g in range(g0, g1):
        for i in range(B * H):
            h_masked[i] = h[i] * mask[g * B * H + i]
        gemm(False, True, <int>B, <int>H, <int>H, 1, h_masked, <int>H, w_hh + g * H * ld_hh,
             ld_hh, 0, hh + g * H, <int>ld_out)


cdef void _masked_products_backward(const floating* d, Py_ssize_t ldd, const floating* mask,
                                    const floating* w_hh, int ld_hh, Py_ssize_t blocks,
                                    Py_ssize_t B, Py_ssize_t H, floating* d_masked,
                                    floating* dh) noexcept nogil:
    # dh += sum over blocks g < blocks of (d[:, block g] @ w_hh[block g]) * mask[g]
    cdef Py_ssize_t g, i
    for g in range(blocks):
        gemm(False, False, <int>B, <int>H, <int>H, 1, d + g * H, <int>ldd, w_hh + g * H * ld_hh,
             ld_hh, 0, d_masked, <int>H)
        for i in range(B * H):
            dh[i] = dh[i] + d_masked[i] * mask[g * B * H + i]


cdef inline void _scale_rows(floating* a, Py_ssize_t lda, const floating* scale, Py_ssize_t B,
                             Py_ssize_t H) noexcept nogil:
    # a[:, :H] *= scale (B, H), a's rows lda apart
    cdef Py_ssize_t b, j
    for b in range(B):
        for j in range(H):
            a[b * lda + j] = a[b * lda + j] * scale[b * H + j]


# ---------------------------------------------------------------------------------------------
# Products: dot products (rowdot.h), packed weights (panel.h; amx.h for float32 on the tile unit)

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


cdef inline int _panel_parts(Py_ssize_t rows, Py_ssize_t nr, int threads,
                             Py_ssize_t* per) noexcept nogil:
    # rows in panels of nr split over threads by whole panels: the threads to use (1 ..
    # threads, no more than there are panels) and in *per the rows of each part; part p has
    # rows [p * per, min(rows, (p + 1) * per))
    cdef Py_ssize_t panels = (rows + nr - 1) // nr
    if threads > panels:
        threads = <int>max(1, panels)
    per[0] = (panels + threads - 1) // threads * nr
    return threads


cdef void _pack_mt(const floating* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                   Py_ssize_t k, floating* packed, int threads, bint amx) noexcept nogil:
    # _pack with the panels split over `threads` threads (a once-per-call packing of 1-4 MB took
    # 0.3-0.4 ms on one thread while the other waited)
    cdef Py_ssize_t per, part, r0, r1
    threads = _panel_parts(rows, _panel_width(w, amx), threads, &per)
    if threads <= 1:
        _pack(w, rs, cs, rows, k, packed, amx)
        return
    for part in prange(threads, num_threads=threads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            _pack(w + r0 * rs, rs, cs, r1 - r0, k, <floating*>_panel_at(packed, r0, k, amx), amx)


cdef void _packed_product_mt(const floating* packed, Py_ssize_t rows, Py_ssize_t k,
                             const floating* x, Py_ssize_t ldx, Py_ssize_t nx,
                             floating* out, Py_ssize_t ldo, bint accumulate,
                             int threads, bint amx) noexcept nogil:
    # _packed_product with the rows (whole panels) split over `threads` threads
    cdef Py_ssize_t per, part, r0, r1
    threads = _panel_parts(rows, _panel_width(packed, amx), threads, &per)
    if threads <= 1:
        _packed_product(packed, rows, k, x, ldx, 1, nx, out, ldo, accumulate, amx)
        return
    for part in prange(threads, num_threads=threads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            _packed_product(_panel_at(packed, r0, k, amx), r1 - r0, k, x, ldx, 1, nx, out + r0,
                            ldo, accumulate, amx)


cdef void _product_by_rows_mt(const floating* packed, Py_ssize_t rows, Py_ssize_t k,
                              const floating* x, Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx,
                              floating* out, Py_ssize_t ldo, bint accumulate, int threads,
                              bint amx) noexcept nogil:
    # _packed_product with the rows of x (and of out) split over `threads` threads, in parts of
    # whole 16-row tiles; every thread reads all of the packed weights
    cdef Py_ssize_t per, part, b0, b1
    threads = _panel_parts(nx, 16, threads, &per)
    if threads <= 1:
        _packed_product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate, amx)
        return
    for part in prange(threads, num_threads=threads, schedule="static"):
        b0 = part * per
        b1 = min(nx, b0 + per)
        if b0 < b1:
            _packed_product(packed, rows, k, x + b0 * ldx, ldx, incx, b1 - b0, out + b0 * ldo,
                            ldo, accumulate, amx)


cdef struct Strided:
    # a matrix M[r, i] = data[r*rs + i*cs] (untyped, as in the structs above)
    const void* data
    Py_ssize_t rs, cs


cdef void _pack_and_multiply_mt(Strided w, Py_ssize_t rows, Py_ssize_t k, Strided x,
                                Py_ssize_t nx, floating* out, Py_ssize_t ldo, bint accumulate,
                                floating* packed, int threads, bint amx) noexcept nogil:
    # a one-off product (the input projection of all steps, dx, weight gradients):
    # out[b*ldo + r] (+)= x[b, :] . W[r, :] with W = w (rows, k) and x (nx, k); the rows of W
    # (whole panels) split over the threads, each packing its own into its part of `packed`
    # (_packed_size(rows, k, amx) elements)
    cdef Py_ssize_t per, part, r0, r1
    cdef floating* mine
    cdef const floating* w_data = <const floating*>w.data
    cdef const floating* x_data = <const floating*>x.data
    threads = _panel_parts(rows, _panel_width(out, amx), threads, &per)
    for part in prange(threads, num_threads=threads, schedule="static"):
        r0 = part * per
        r1 = min(rows, r0 + per)
        if r0 < r1:
            mine = <floating*>_panel_at(packed, r0, k, amx)
            _pack(w_data + r0 * w.rs, w.rs, w.cs, r1 - r0, k, mine, amx)
            _packed_product(mine, r1 - r0, k, x_data, x.rs, x.cs, nx, out + r0, ldo,
                            accumulate, amx)


def _pack_and_multiply(cnp.ndarray w, cnp.ndarray v, cnp.ndarray out, bint accumulate,
                       int threads, bint amx=False):
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
    cdef Strided w_op = Strided(cnp.PyArray_DATA(w), rs, cs)
    cdef Strided v_op = Strided(cnp.PyArray_DATA(v), ldx, incx)
    if dtype == np.float32:
        _pack_and_multiply_mt(w_op, n, K, v_op, B, <float*>cnp.PyArray_DATA(out), n, accumulate,
                              <float*>cnp.PyArray_DATA(packed), threads, amx)
    else:
        _pack_and_multiply_mt(w_op, n, K, v_op, B, <double*>cnp.PyArray_DATA(out), n, accumulate,
                              <double*>cnp.PyArray_DATA(packed), threads, False)


# ---------------------------------------------------------------------------------------------
# Forward, small batches: the unit-split loop
#
# For B <= small_batch_max the recurrent product of a step, (B, H) x (H, G*H), is too thin for a
# GEMM (BLAS packs the whole weight matrix for a few rows; measured 10-20x slower than reading
# it once). Instead the hidden units [0, H) are split into one contiguous range per thread;
# thread p computes, for its units only, the gate rows of each product as dot products of rows
# of w_hh with the B rows of the source (each weight read once per step for all rows,
# rowdot.h), then runs the cell's step on its units of every row (forward_row with a unit
# range). Its weight rows are the same every step, so they stay in its own cache. The state is
# double-buffered (the layouts' slots), so one barrier per phase suffices: nobody reads h_new
# (or the saved source of product 1) before every thread has written its part.

cdef inline void _unit_range(Py_ssize_t H, int tid, int threads, Py_ssize_t* j0,
                             Py_ssize_t* j1) noexcept nogil:
    # contiguous ranges, a multiple of 16 units long when they are longer than 16
    cdef Py_ssize_t chunk = (H + threads - 1) // threads
    if chunk > 16:
        chunk = (chunk + 15) // 16 * 16
    j0[0] = min(H, tid * chunk)
    j1[0] = min(H, j0[0] + chunk)


cdef void forward_units_loop(const Call* call, floating* ws, bint input_dots, int tid,
                             int threads, fr_team* team) noexcept nogil:
    # thread tid of `threads` (every thread of the region runs this, meeting at the same
    # barriers of `team`);
    # the same slots and buffers as the batch-row loop, so the cache is the same. input_dots:
    # x W_ih^T by this thread for its units too
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, I = call.sizes.I, H = call.sizes.H
    cdef Py_ssize_t G = call.cell.G, GH = G * H
    cdef const floating* w_ih = <const floating*>call.p.w_ih
    cdef const floating* w_hh = <const floating*>call.p.w_hh
    cdef floating* gates = ws + call.L.gates
    cdef floating* hh = ws + call.L.hh
    cdef const floating* source
    cdef Py_ssize_t s, t, t_next, cur, nxt, j0, j1, n, g, g0, g1, b, ld, block_size = 0
    cdef floating* packed = NULL        # this thread's rows of w_hh, packed; NULL: dot products
    cdef bint active, zigzag
    cdef int phase
    # the tile unit for the input projection only: a step's products here are 4-8 small ones a
    # thread (its units of each gate block), and each would split h and set up the tiles
    # again (measured: bilstm-infer 95 ms on the tile unit, 53 without)
    cdef bint amx_in = _amx(ws, T * B)
    # fastrnn.quantize's weights: the steps' products on lowp.h (quantized) or bfloat16 ones
    # widened by forward_loop (a rounded source); the input product on lowp.h (q_input) or
    # widened (_widened_input), independently of the steps
    cdef bint quantized = call.p.q_hh.format != FR_Q_NONE
    cdef bint widened_input = _widened_input(call)
    cdef bint q_input = call.p.q_ih.format != FR_Q_NONE and not widened_input
    cdef bint float_input = call.p.q_ih.format == FR_Q_NONE
    cdef void* qx = NULL                # this thread's rows of x or h in the weights' format
    cdef float* rounded = NULL          # round_source: this thread's rounded source
    cdef Py_ssize_t b0, nb
    _unit_range(H, tid, threads, &j0, &j1)
    n = j1 - j0
    if call.p.round_source:
        rounded = <float*>malloc(B * H * sizeof(float))
    if quantized or (q_input and input_dots):
        qx = malloc(max(fr_q_scratch_bytes(call.p.q_hh.format, call.p.q_hh.ld, B)
                        if quantized else 0,
                        fr_q_scratch_bytes(call.p.q_ih.format, call.p.q_ih.ld,
                                           min(T * B, _Q_CHUNK)) if q_input and input_dots else 0))
    if not quantized and n > 0 and T * B >= _PACK_MIN_ROWS \
            and G * _packed_size(ws, n, H, False) * <Py_ssize_t>sizeof(floating) <= _PACK_MAX_BYTES:
        # allocated by the thread that uses it (its pages near its core); one buffer serves
        # w_ih's blocks one at a time first, then all of w_hh's
        block_size = _packed_size(ws, n, H, False)
        packed = <floating*>fr_panel_alloc(
            max(G * block_size, _packed_size(ws, n, I, amx_in) if input_dots and float_input
                else 0) * sizeof(floating))
    if input_dots and n > 0 and widened_input:
        _widened_input_dots(call, ws, j0, n, amx_in)
    elif input_dots and n > 0 and q_input:
        b0 = 0
        while b0 < T * B:
            nb = min(_Q_CHUNK, T * B - b0)
            _q_prepare(&call.p.q_ih, <const floating*>call.x + b0 * I, I, nb, qx)
            for g in range(G):
                _q_product(&call.p.q_ih, g * H + j0, n, qx, nb, gates + b0 * GH + g * H + j0, GH)
            b0 += nb
    elif input_dots and n > 0:
        # gates[:, :, block g, units] = x @ w_ih[block g, units].T for all T*B rows: the thread's
        # own columns, so no barrier; no BLAS call in the region (BLAS threads spinning after a
        # GEMM take the cores these threads need: measured 1.7x slower per step)
        for g in range(G):
            if packed != NULL:
                _pack(w_ih + (g * H + j0) * call.p.ld_ih, call.p.ld_ih, 1, n, I, packed, amx_in)
                _packed_product(packed, n, I, <const floating*>call.x, I, 1, T * B,
                                gates + g * H + j0, GH, False, amx_in)
            else:
                _rowdot(w_ih + (g * H + j0) * call.p.ld_ih, call.p.ld_ih, n, I,
                        <const floating*>call.x, I, T * B, gates + g * H + j0, GH)
    if packed != NULL:
        for g in range(G):
            _pack(w_hh + (g * H + j0) * call.p.ld_hh, call.p.ld_hh, 1, n, H,
                  packed + g * block_size, False)
    for s in range(T):
        t = T - 1 - s if call.reverse else s
        cur = _state_slot(s, t, T, call.reverse, call.train, False)
        nxt = _state_slot(s, t, T, call.reverse, call.train, True)
        active = _any_active(call.lengths, t, B)
        if s + 1 < T and 0 < n < H:
            # the next step's rows of x W_ih^T, computed before the loop and long out of L1/L2:
            # fetched while this step multiplies (read cold, they were a fifth of the call).
            # Only when the thread has part of the units: else a row is one contiguous run the
            # hardware prefetcher follows, and these hints only fill the line-fill buffers
            t_next = T - 2 - s if call.reverse else s + 1
            for b in range(B):
                for g in range(G):
                    fr_prefetch(gates + (t_next * B + b) * GH + g * H + j0, n * sizeof(floating))
        for phase in range(call.cell.phases):
            if phase > 0:
                fr_team_wait(team, threads)     # all of product 1's source is written
            if active and n > 0:
                # hh[:, block g, units] = source @ w_hh[block g, units].T. Every other step
                # reads product 0's weight rows last to first: the rows read last are still in
                # L2 then, where the same order every step would evict each row just before it
                # is read again
                source = _source(call, ws, phase, t, cur, &ld)
                if rounded != NULL:
                    source = _rounded_source(source, ld, B, H, rounded, &ld)
                zigzag = _zigzag and (s & 1) == 1 and phase == 0
                _phase_blocks(&call.cell, phase, &g0, &g1)
                if quantized:
                    _q_prepare(&call.p.q_hh, source, ld, B, qx)
                    for g in range(g0, g1):
                        _q_product(&call.p.q_hh, g * H + j0, n, qx, B, hh + g * H + j0, GH)
                    g0 = g1                     # no product left below
                for g in range(g0, g1):
                    _units_product(call, packed, block_size, g1 - 1 - (g - g0) if zigzag else g,
                                   j0, n, source, ld, hh, zigzag)
            for b in range(B):
                forward_row(call, ws, phase, t, cur, nxt, b, j0, n)
        fr_team_wait(team, threads)             # the new state is complete
    free(packed)
    free(qx)
    free(rounded)


cdef inline void _units_product(const Call* call, const floating* packed, Py_ssize_t block_size,
                                Py_ssize_t g, Py_ssize_t j0, Py_ssize_t n,
                                const floating* v, Py_ssize_t ldv, floating* hh,
                                bint backwards) noexcept nogil:
    # hh[:, block g, units j0 .. j0+n] = v @ w_hh[block g, units].T, v (B, H) with rows ldv
    # apart: from the packed copy of the thread's rows when there is one. backwards: the dot
    # products' rows last to first, in runs of _ZIGZAG_ROWS from the block's start (so the
    # kernel groups its rows as it does forwards, and every sum is the same to the last bit;
    # see forward_units_loop)
    cdef Py_ssize_t H = call.sizes.H, B = call.sizes.B, GH = call.cell.G * H, r1, r0
    cdef int ld_hh = call.p.ld_hh
    cdef const floating* w_hh = <const floating*>call.p.w_hh
    if packed != NULL:
        _packed_product(packed + g * block_size, n, H, v, ldv, 1, B, hh + g * H + j0, GH, False,
                        False)
    elif not backwards:
        _rowdot(w_hh + (g * H + j0) * ld_hh, ld_hh, n, H, v, ldv, B, hh + g * H + j0, GH)
    else:
        r1 = n
        while r1 > 0:
            r0 = (r1 - 1) // _ZIGZAG_ROWS * _ZIGZAG_ROWS
            _rowdot(w_hh + (g * H + j0 + r0) * ld_hh, ld_hh, r1 - r0, H, v, ldv, B,
                    hh + g * H + j0 + r0, GH)
            r1 = r0


# ---------------------------------------------------------------------------------------------
# Backward: the row step (the switch on the cell's code), the pass over a step's rows, the loop

cdef void backward_row(const Call* call, const floating* ws, floating* bws, int phase,
                       Py_ssize_t t, Py_ssize_t b) noexcept nogil:
    # row b of step t, the pass that undoes forward phase `phase`; not inline, for the same
    # reason as forward_row
    cdef Py_ssize_t H = call.sizes.H, B = call.sizes.B, GH = call.cell.G * H, j
    cdef Py_ssize_t HB = call.cell.hidden_blocks * H, row = t * B + b
    cdef int code = call.cell.code
    cdef floating* dgates = bws + call.K.dgates + row * GH
    cdef floating* dh = bws + call.K.dh + b * H
    cdef floating* dc = NULL
    cdef floating* dhh = NULL
    cdef floating* dgates_hh = NULL
    cdef floating* dsaved = NULL
    cdef floating* dpeep = NULL
    cdef const floating* gates = ws + call.L.gates + row * GH
    cdef const floating* h = ws + call.L.h_slots + row * H      # slot t: h before step t
    cdef const floating* c = NULL
    cdef const floating* c_new = NULL
    cdef const floating* saved = NULL
    cdef const floating* dy
    if call.K.dhh >= 0:
        dhh = bws + call.K.dhh + b * GH
        dgates_hh = bws + call.K.dgates_hh + row * HB
    if t >= call.lengths[b]:
        # padding: no gradient to the parameters or x, the state gradient passes through
        if phase + 1 == call.cell.phases:
            memset(dgates, 0, GH * sizeof(floating))
            if dhh != NULL:
                memset(dhh, 0, GH * sizeof(floating))
                memset(dgates_hh, 0, HB * sizeof(floating))
        return
    if call.K.dc >= 0:
        dc = bws + call.K.dc + b * H
        c = ws + call.L.c_slots + row * H
        c_new = ws + call.L.c_slots + \
            (_state_slot(0, t, call.sizes.T, call.reverse, True, True) * B + b) * H
        if call.L.raw_c >= 0:
            c_new = ws + call.L.raw_c + row * H    # zoneout: the step's own, not the mixed
    if call.K.dsaved >= 0:
        dsaved = bws + call.K.dsaved + b * H
    if call.K.dpeep >= 0:
        dpeep = bws + call.K.dpeep + b * call.cell.row_sums * H
    if call.L.saved >= 0:
        saved = ws + call.L.saved + row * call.cell.saved_width * H
    if phase + 1 == call.cell.phases and call.dy != NULL:
        dy = <const floating*>call.dy + t * call.dy_step + b * call.dy_row
        for j in range(H):
            dh[j] = dh[j] + dy[j]                         # dL/dh' = from later steps + from y
    if call.zone != NULL and phase + 1 == call.cell.phases:
        _zoneout_split(call, bws, t, b, dh, dc)
    if code == RNN_TANH or code == RNN_RELU:
        rnn_backward_row(dgates, dh, gates, H, code == RNN_RELU)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_backward_row(dgates, dh, dc, dpeep, gates, c, c_new,
                          <const floating*>call.p.peephole, H)
    elif code == GRU:
        gru_backward_row(dgates, dhh, dgates_hh, dh, gates, h, saved, H)
    elif code == GRU_RESET_BEFORE:
        gru_reset_before_backward_row(phase, dgates, dh, dsaved, gates, h, H)
    elif code == RNN_OPTIONS:
        rnn_options_backward_row(dgates, dh, gates, call.p.options, H)
    elif code == LSTM_OPTIONS:
        lstm_options_backward_row(dgates, dh, dc, dpeep, gates, c, c_new,
                                  <const floating*>call.p.peephole, call.p.options, H)
    elif code == GRU_OPTIONS:
        gru_options_backward_row(phase, call.cell.phases == 1, dgates, dhh, dgates_hh, dh,
                                 dsaved, gates, h, saved, call.p.options, H)
    elif code == LSTM_NORM:
        lstm_norm_backward_row(dgates, dgates_hh, dhh, dh, dc, dpeep, gates, c, c_new, saved,
                               <const floating*>call.p.peephole, call.p.options[0], H)
    elif code == GRU_NORM:
        gru_norm_backward_row(phase, call.cell.phases == 1, dgates, dgates_hh, dhh, dh, dsaved,
                              dpeep, gates, h, saved, saved + H,
                              <const floating*>call.p.peephole, call.p.options[0], H)
    if call.zone != NULL and phase == 0:
        _zoneout_carry(call, bws, b, dh, dc)


cdef void backward_pass(const Call* call, const floating* ws, floating* bws, int phase,
                        Py_ssize_t t, int threads) noexcept nogil:
    cdef Py_ssize_t b, B = call.sizes.B
    if threads > 1 and B > 1:
        for b in prange(B, schedule="static", num_threads=threads):
            backward_row(call, ws, bws, phase, t, b)
    else:
        for b in range(B):
            backward_row(call, ws, bws, phase, t, b)


cdef void backward_loop(const Call* call, const floating* ws, floating* bws, int threads,
                        int pool) noexcept nogil:
    # on entry dh / dc hold dL/dh_n, dL/dc_n; on exit dL/dh0, dL/dc0 (the caller adds them)
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, I = call.sizes.I, H = call.sizes.H
    cdef Py_ssize_t GH = call.cell.G * H, BH = B * H, k0 = call.cell.second_block * H
    cdef const floating* w_hh = <const floating*>call.p.w_hh
    cdef int ld_hh = call.p.ld_hh
    cdef floating* dh = bws + call.K.dh
    # the step's hidden side: dhh when some blocks have their own, else dgates[t]
    cdef floating* d_hidden
    cdef Py_ssize_t s, t, boundary
    cdef bint active, cut
    cdef int phase
    # the per-step products over w_hh packed once, as in forward_rows_loop; packed columns of
    # w_hh: W[u, g] = w_hh[g, u], product 0's blocks, then product 1's at n_at
    cdef bint amx_h = _amx(bws, B)
    cdef Py_ssize_t n_at = _packed_size(bws, H, k0, amx_h)
    cdef floating* packed = NULL
    cdef bint pooled = False               # no BLAS call at all (see forward_rows_loop)
    cdef Py_ssize_t grad_rows = min(T * B, _GRAD_CHUNK)
    cdef const floating* mask = <const floating*>call.mask
    cdef floating* d_masked = NULL
    if mask != NULL:
        d_masked = <floating*>malloc(B * H * sizeof(floating))
    if _packs(T, B) and mask == NULL:
        # one buffer: w_hh's columns for the steps, then the operands of the products after
        # the loop (_parameter_gradients)
        packed = <floating*>fr_panel_alloc(max(n_at + _packed_size(bws, H, GH - k0, amx_h),
                                       _packed_size_any(bws, I, GH),
                                       _packed_size_any(bws, max(I, H), grad_rows))
                                   * sizeof(floating))
        if packed != NULL:
            threads = max(pool, 1)
            _pack_mt(w_hh, 1, ld_hh, H, k0, packed, threads, amx_h)
            if k0 < GH:
                _pack_mt(w_hh + k0 * ld_hh, 1, ld_hh, H, GH - k0, packed + n_at, threads, amx_h)
            pooled = pool > 0
    for s in range(T):
        t = s if call.reverse else T - 1 - s
        d_hidden = bws + (call.K.dhh if call.K.dhh >= 0 else call.K.dgates + t * B * GH)
        active = _any_active(call.lengths, t, B)
        # the state gradient leaving step t is cut at the time boundaries m*k (see cells.py)
        boundary = t + 1 if call.reverse else t
        cut = call.truncate > 0 and 0 < boundary < T and boundary % call.truncate == 0
        for phase in range(call.cell.phases - 1, -1, -1):
            backward_pass(call, ws, bws, phase, t, threads)
            if active and phase > 0:
                # dsaved = d_hidden[:, product 1's blocks] @ w_hh[those blocks]
                _state_product(w_hh + k0 * ld_hh, ld_hh, packed + n_at if packed != NULL else NULL,
                               GH - k0, d_hidden + k0, GH, B, H, bws + call.K.dsaved, False,
                               threads, amx_h)
                if mask != NULL:            # rh = r * (h * mask[n])
                    _scale_rows(bws + call.K.dsaved, H, mask + call.cell.second_block * BH, B, H)
            elif active and not cut and mask != NULL:
                _masked_products_backward(d_hidden, GH, mask, w_hh, ld_hh,
                                          call.cell.second_block, B, H, d_masked, dh)
            elif active and not cut:
                # dh += d_hidden[:, product 0's blocks] @ w_hh[those blocks]
                _state_product(w_hh, ld_hh, packed, k0, d_hidden, GH, B, H, dh, True, threads,
                               amx_h)
        if cut:
            memset(dh, 0, BH * sizeof(floating))
            if call.K.dc >= 0:
                memset(bws + call.K.dc, 0, BH * sizeof(floating))
    _parameter_gradients(call, ws, bws, packed if pooled else NULL, threads)
    free(packed)
    free(d_masked)


cdef inline void _state_product(const floating* w, int ldw, const floating* packed,
                                Py_ssize_t k, const floating* v, Py_ssize_t ldv, Py_ssize_t B,
                                Py_ssize_t H, floating* out, bint accumulate,
                                int threads, bint amx) noexcept nogil:
    # out (+)= v @ w, v (B, k) with row stride ldv, w (k, H) with row stride ldw, out (B, H):
    # over w packed by columns when there is a packed copy, else one GEMM
    if packed != NULL:
        _packed_product_mt(packed, H, k, v, ldv, B, out, H, accumulate, threads, amx)
    else:
        gemm(False, False, <int>B, <int>H, <int>k, 1, v, <int>ldv, w, ldw,
             1 if accumulate else 0, out, <int>H)


cdef void _parameter_gradients(const Call* call, const floating* ws, floating* bws,
                               floating* packed, int threads) noexcept nogil:
    # after backward's loop, over all T*B rows (dgates is zero at padding): dx += dgates @ w_ih,
    # dw_ih += dgates.T @ x, db_ih += dgates.sum(0); for each product, dw_hh[its blocks] +=
    # D.T @ its source and db_hh[its blocks] += D.sum(0), D = dgates except on the hidden-side
    # blocks, dgates_hh. packed: room for w_ih's columns and a chunk of an operand (see
    # backward_loop): packed products on `threads` threads; NULL: BLAS
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, I = call.sizes.I, H = call.sizes.H
    cdef Py_ssize_t G = call.cell.G, GH = G * H, TB = T * B, t, i, g, end, ld_source, ld_d
    cdef Py_ssize_t h0 = call.cell.first_hidden, h1 = h0 + call.cell.hidden_blocks
    cdef const floating* dgates = bws + call.K.dgates
    cdef const floating* w_ih = <const floating*>call.p.w_ih
    cdef const floating* x = <const floating*>call.x
    cdef const floating* source
    cdef const floating* d
    cdef floating* dx = <floating*>call.d.dx
    cdef floating* dw_hh = <floating*>call.d.dw_hh
    cdef floating* db_hh = <floating*>call.d.db_hh
    cdef floating* ones = NULL
    cdef bint whole = call.d.dx_step == B * call.d.dx_row     # dx's rows: one (T*B, I) matrix
    cdef bint amx = _amx(dgates, TB if whole else B)
    cdef int phase
    cdef const floating* mask = <const floating*>call.mask
    cdef floating* source_masked = NULL
    cdef Py_ssize_t row, j, b_row
    if packed == NULL:
        ones = bws + call.K.ones                   # the bias sums as GEMV
        for i in range(TB):
            ones[i] = 1
    else:
        _pack_mt(w_ih, 1, call.p.ld_ih, I, GH, packed, threads, amx)   # w_ih's columns
    # dx += dgates @ w_ih:  (T*B, G*H) x (G*H, I)
    for t in range(1 if whole else T):
        if packed != NULL:
            _packed_product_mt(packed, I, GH, dgates + t * B * GH, GH, TB if whole else B,
                               dx + t * call.d.dx_step, call.d.dx_row, True, threads, amx)
        else:
            gemm(False, False, <int>(TB if whole else B), <int>I, <int>GH, 1,
                 dgates + t * B * GH, <int>GH, w_ih, call.p.ld_ih, 1, dx + t * call.d.dx_step,
                 <int>call.d.dx_row)
    # dw_ih += dgates.T @ x:  (G*H, T*B) x (T*B, I);  db_ih += dgates.sum(axis=0)
    _gradient_product(dgates, GH, GH, x, I, I, TB, <floating*>call.d.dw_ih, call.d.ld_dw_ih,
                      packed, threads)
    _gradient_sums(dgates, GH, GH, TB, <floating*>call.d.db_ih, call.d.inc_db_ih, ones,
                   threads)
    for phase in range(call.cell.phases):
        # dw_hh[blocks] += D[:, blocks].T @ source, in runs of blocks with one D
        _phase_blocks(&call.cell, phase, &g, &end)
        source = _source(call, <floating*>ws, phase, 0, 0, &ld_source)   # (T*B, ld_source)
        if mask != NULL and phase == 0 and source_masked == NULL:
            source_masked = <floating*>malloc(TB * H * sizeof(floating))
        while g < end:
            if h0 <= g < h1:
                d, ld_d, i = bws + call.K.dgates_hh + (g - h0) * H, h1 * H - h0 * H, min(end, h1)
            else:
                d, ld_d, i = dgates + g * H, GH, min(end, h0) if g < h0 else end
            if mask != NULL and phase == 0:
                # recurrent dropout: block by block, of h * mask[block] (rows t*B + b)
                i = g + 1
                for row in range(TB):
                    b_row = row % B
                    for j in range(H):
                        source_masked[row * H + j] = source[row * ld_source + j] * \
                            mask[(g * B + b_row) * H + j]
                _gradient_product(d, ld_d, H, source_masked, H, H, TB,
                                  dw_hh + g * H * call.d.ld_dw_hh, call.d.ld_dw_hh, NULL,
                                  threads)
            else:
                _gradient_product(d, ld_d, (i - g) * H, source, ld_source,
                                  ld_source if phase == 0 else H, TB,
                                  dw_hh + g * H * call.d.ld_dw_hh, call.d.ld_dw_hh, packed,
                                  threads)
            _gradient_sums(d, ld_d, (i - g) * H, TB, db_hh + g * H * call.d.inc_db_hh,
                           call.d.inc_db_hh, ones, threads)
            g = i
    free(source_masked)


cdef inline void _gradient_product(const floating* d, Py_ssize_t ldd, Py_ssize_t M,
                                   const floating* v, Py_ssize_t ldv, Py_ssize_t K,
                                   Py_ssize_t TB, floating* out, int ldo, floating* packed,
                                   int threads) noexcept nogil:
    # out[:M, :K] += d[:, :M].T @ v[:, :K] over TB rows: packed products (packed: room for a
    # chunk, see _weight_gradient) or one GEMM (packed NULL)
    if packed != NULL:
        _weight_gradient(d, ldd, M, v, ldv, K, TB, out, ldo, packed, threads)
    else:
        gemm(True, False, <int>M, <int>K, <int>TB, 1, d, <int>ldd, v, <int>ldv, 1, out, ldo)


cdef inline void _gradient_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t M, Py_ssize_t TB,
                                floating* out, int inc, const floating* ones,
                                int threads) noexcept nogil:
    # out[:M] += d[:, :M].sum(axis=0) over TB rows: column sums on threads, or a GEMV with
    # `ones` (TB ones)
    if ones == NULL:
        _column_sums(d, ldd, M, TB, out, inc, threads)
    else:
        gemv(True, <int>TB, <int>M, 1, d, <int>ldd, ones, 1, 1, out, inc)


cdef void _weight_gradient(const floating* d, Py_ssize_t ldd, Py_ssize_t M, const floating* v,
                           Py_ssize_t ldv, Py_ssize_t K, Py_ssize_t TB, floating* out,
                           Py_ssize_t ldo, floating* packed, int threads) noexcept nogil:
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
        _pack_mt(v + r0 * ldv, 1, ldv, K, rows, packed, threads, amx)
        _product_by_rows_mt(packed, K, rows, d + r0 * ldd, 1, ldd, M, out, ldo, True, threads,
                            amx)
        r0 += rows


cdef void _column_sums(const floating* d, Py_ssize_t ldd, Py_ssize_t M, Py_ssize_t TB,
                       floating* out, Py_ssize_t inc, int threads) noexcept nogil:
    # out[m*inc] += sum_r d[r*ldd + m] for m < M, r < TB; columns split over the threads, the
    # rows read in order (a column at a time was a quarter of a training call's time)
    cdef Py_ssize_t part, per = (M + threads - 1) // threads, m0, m1, m, r
    cdef floating* acc
    for part in prange(threads, num_threads=threads, schedule="static"):
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
# A projected LSTM whose h is zoned out per unit (fastrnn.projection.zones_h): h is P wide, h' =
# k h + (1 - k) w_hr m with m = o * tanh(c') the cell's own output, H wide. Such an h is no
# product of the m the cell makes, so these loops carry it beside the cell's state: the cell's
# slots (h_slots) hold m, the Projection's slots hold h, each step's product is of h with w_hh
# (G*H, P) (_source), and after the pass m is projected and mixed. The cell's own zoneout sees
# only c (its h weights are 0). The batch-row loop on BLAS, never packed (as recurrent
# dropout's masks). Numba's kernels.forward_projected is the same loop.

cdef inline void _projected_zoneout_row(const Call* call, Py_ssize_t t, Py_ssize_t b,
                                        const floating* h, const floating* h_raw,
                                        floating* h_new) noexcept nogil:
    # row b of step t: h_new = k h + (1 - k) h_raw, y the same; a padding row keeps h, y zero
    cdef const Projection* pj = call.proj
    cdef floating* y = <floating*>pj.y + t * pj.y_step + b * pj.y_row
    cdef const floating* k = <const floating*>pj.keep + t * pj.keep_step + b * pj.keep_row
    cdef Py_ssize_t j, P = pj.P
    cdef floating one = 1, v
    if t >= call.lengths[b]:
        memcpy(h_new, h, P * sizeof(floating))
        memset(y, 0, P * sizeof(floating))
        return
    for j in range(P):
        v = k[j] * h[j] + (one - k[j]) * h_raw[j]
        h_new[j] = v
        y[j] = v


cdef inline void _projected_zoneout_backward_row(const Call* call, Py_ssize_t t, Py_ssize_t b,
                                                 floating* dh, floating* dh_raw) noexcept nogil:
    # undoes _projected_zoneout_row: dh (the gradient of h after step t) with dy[t] splits into
    # dh_raw = (1 - k) of it, for w_hr m, and k of it, kept in dh for h before the step; a
    # padding row keeps dh, dh_raw zero
    cdef const Projection* pj = call.proj
    cdef const floating* k = <const floating*>pj.keep + t * pj.keep_step + b * pj.keep_row
    cdef const floating* dy = NULL
    cdef Py_ssize_t j, P = pj.P
    cdef floating one = 1, d
    if t >= call.lengths[b]:
        memset(dh_raw, 0, P * sizeof(floating))
        return
    if pj.dy != NULL:
        dy = <const floating*>pj.dy + t * pj.dy_step + b * pj.dy_row
    for j in range(P):
        d = dh[j] + dy[j] if dy != NULL else dh[j]
        dh_raw[j] = (one - k[j]) * d
        dh[j] = k[j] * d


cdef void forward_projected_loop(const Call* call, floating* ws, int threads) noexcept nogil:
    # the state before the first step in its slots (m's: zero, any value); call.y a (B, H)
    # scratch (y_step 0) for the cell's m
    cdef const Projection* pj = call.proj
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, H = call.sizes.H, P = pj.P
    cdef Py_ssize_t GH = call.cell.G * H, s, t, cur, nxt, b
    cdef floating* h_slots = <floating*>pj.slots
    cdef floating* h_raw = <floating*>pj.h_raw
    cdef bint active
    _input_projection(call, ws)
    for s in range(T):
        t = T - 1 - s if call.reverse else s
        cur = _state_slot(s, t, T, call.reverse, call.train, False)
        nxt = _state_slot(s, t, T, call.reverse, call.train, True)
        active = _any_active(call.lengths, t, B)
        if active:
            # hh = h @ w_hh.T:  (B, P) x (P, G*H)
            gemm(False, True, <int>B, <int>GH, <int>P, 1, h_slots + cur * B * P, <int>P,
                 <const floating*>call.p.w_hh, call.p.ld_hh, 0, ws + call.L.hh, <int>GH)
        forward_pass(call, ws, 0, t, cur, nxt, threads)
        if active:
            # h_raw = m @ w_hr.T:  (B, H) x (H, P)
            gemm(False, True, <int>B, <int>P, <int>H, 1, ws + call.L.h_slots + nxt * B * H,
                 <int>H, <const floating*>pj.w_hr, pj.ld_hr, 0, h_raw, <int>P)
        for b in range(B):
            _projected_zoneout_row(call, t, b, h_slots + (cur * B + b) * P, h_raw + b * P,
                                   h_slots + (nxt * B + b) * P)


cdef void backward_projected_loop(const Call* call, const floating* ws, floating* bws,
                                  floating* dh_raw, int threads) noexcept nogil:
    # backward of forward_projected_loop: the Projection's dh holds dL/dh_n on entry, dL/dh0 on
    # exit, the BackLayout's dh the gradient of m; dh_raw (B, P) scratch; call.dy NULL (the
    # Projection's dy is the output's)
    cdef const Projection* pj = call.proj
    cdef Py_ssize_t T = call.sizes.T, B = call.sizes.B, H = call.sizes.H, P = pj.P
    cdef Py_ssize_t GH = call.cell.G * H, s, t, b, boundary, after
    cdef floating* dh = <floating*>pj.dh
    cdef floating* dm = bws + call.K.dh
    cdef const floating* d_hidden
    cdef bint active, cut
    for s in range(T):
        t = s if call.reverse else T - 1 - s
        active = _any_active(call.lengths, t, B)
        boundary = t + 1 if call.reverse else t      # as in backward_loop
        cut = call.truncate > 0 and 0 < boundary < T and boundary % call.truncate == 0
        after = _state_slot(0, t, T, call.reverse, True, True)
        for b in range(B):
            _projected_zoneout_backward_row(call, t, b, dh + b * P, dh_raw + b * P)
        if active:
            # dm = dh_raw @ w_hr:  (B, P) x (P, H);  dw_hr += dh_raw.T @ m:  (P, B) x (B, H)
            gemm(False, False, <int>B, <int>H, <int>P, 1, dh_raw, <int>P,
                 <const floating*>pj.w_hr, pj.ld_hr, 0, dm, <int>H)
            gemm(True, False, <int>P, <int>H, <int>B, 1, dh_raw, <int>P,
                 ws + call.L.h_slots + after * B * H, <int>H, 1, <floating*>pj.dw_hr,
                 pj.ld_dw_hr)
        backward_pass(call, ws, bws, 0, t, threads)
        if active and not cut:
            # dh += d_hidden @ w_hh:  (B, G*H) x (G*H, P)
            d_hidden = bws + (call.K.dhh if call.K.dhh >= 0 else call.K.dgates + t * B * GH)
            gemm(False, False, <int>B, <int>P, <int>GH, 1, d_hidden, <int>GH,
                 <const floating*>call.p.w_hh, call.p.ld_hh, 1, dh, <int>P)
        if cut:
            memset(dh, 0, B * P * sizeof(floating))
            memset(bws + call.K.dc, 0, B * H * sizeof(floating))
    _parameter_gradients(call, ws, bws, NULL, threads)    # w_hh's of h (_source)


# ---------------------------------------------------------------------------------------------
# Python entry points (the contract of fastrnn.cells). The layers and fastrnn.functional have
# checked the arguments; what is checked here picks the compiled variant or keeps memory safe.

cdef inline void* _data(object a) except? NULL:
    return cnp.PyArray_DATA(<cnp.ndarray?>a) if a is not None else NULL


cdef inline Py_ssize_t _ld(Py_ssize_t row_stride, Py_ssize_t cols, Py_ssize_t item) noexcept nogil:
    # a leading dimension BLAS accepts: the row stride, or the width when it never matters
    cdef Py_ssize_t ld = row_stride // item
    return ld if ld >= cols and ld >= 1 else max(1, cols)


cdef bint _is_float32(object x) except -1:
    # the dtype of the call, which picks the compiled variant
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray?>x)
    if typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    return typenum == cnp.NPY_FLOAT


# cell -> its option values as a float64 array, kept for the life of the process (calls and
# caches point into it)
_options = {}


cdef Params _params(tuple params, Py_ssize_t item, cell) except *:
    # params in cells.Cell.param_names order: w_ih, w_hh, b_ih, b_hh[, peephole]; the cell's
    # options (NULL for a plain cell)
    cdef Params p
    cdef cnp.ndarray options
    p.options = NULL
    if not cell.plain:
        if cell not in _options:
            _options[cell] = np.array(cell.option_values(), np.float64)
        options = _options[cell]
        p.options = <const double*>cnp.PyArray_DATA(options)
    p.q_ih.format = p.q_hh.format = FR_Q_NONE
    p.round_source = False
    if isinstance(params[1], QuantizedWeight):
        if item != 4:
            raise TypeError("params: quantized weights serve float32 calls only")
        p.w_ih = p.w_hh = NULL
        p.ld_ih = p.ld_hh = 0
        p.q_ih, p.q_hh = _quantized(params[0]), _quantized(params[1])
        p.b_ih, p.b_hh = _data(params[2]), _data(params[3])
        p.peephole = _data(params[4]) if len(params) > 4 else NULL
        return p
    cdef cnp.ndarray w_ih = params[0], w_hh = params[1]
    p.w_ih, p.w_hh = _data(w_ih), _data(w_hh)
    p.ld_ih = <int>_ld(w_ih.strides[0], w_ih.shape[1], item)
    p.ld_hh = <int>_ld(w_hh.strides[0], w_hh.shape[1], item)
    p.b_ih, p.b_hh = _data(params[2]), _data(params[3])
    p.peephole = _data(params[4]) if len(params) > 4 else NULL
    return p


cdef fr_qweights _quantized(w) except *:
    # a fastrnn.quantize.QuantizedWeight as lowp.h reads it (w keeps the arrays alive)
    cdef fr_qweights q
    q.format = FR_Q_BF16 if w.format == "bfloat16" else FR_Q_INT8
    q.data, q.ld, q.k = _data(w.data), w.data.shape[1], w.shape[1]
    q.scale = <const float*>_data(w.scale)
    q.row_sum = <const int32_t*>_data(w.row_sum)
    return q


# fastrnn.quantize's instruction paths (lowp.h), by name
_Q_PATHS = {"plain": FR_Q_PLAIN, "avx2": FR_Q_AVX2, "avx512": FR_Q_AVX512}
_Q_PATH_NAMES = {v: k for k, v in _Q_PATHS.items()}


def quantized_path(format):
    """The instructions products with weights of `format` ("bfloat16", "int8") run on here:
    "avx512" (AVX-512 BF16's vdpbf16ps, AVX-512 VNNI's vpdpbusd), "avx2" (AVX2 and FMA) or
    "plain" (loops the compiler vectorises), the best the CPU has up to set_quantized_path's."""
    if format not in ("bfloat16", "int8"):
        raise ValueError(f"format: expected 'bfloat16' or 'int8', got {format!r}")
    return _Q_PATH_NAMES[fr_q_path(FR_Q_BF16 if format == "bfloat16" else FR_Q_INT8)]


def _set_bf16_dot_rows(steps, inputs):
    """Rows of x up to which bfloat16 products run on vdpbf16ps (lowp.h), in each step and in
    a call's input product; returns the old pair."""
    global fr_q_bf16_dot_rows, fr_q_bf16_input_dot_rows
    old = fr_q_bf16_dot_rows, fr_q_bf16_input_dot_rows
    fr_q_bf16_dot_rows, fr_q_bf16_input_dot_rows = int(steps), int(inputs)
    return old


def set_quantized_path(path):
    """The most quantized products may use from now on: "avx512" (the default: the best the
    CPU has), "avx2" or "plain" (for tests and measurements; int8 gives the same numbers on
    every path, to the bit). Returns the old setting's name."""
    if path not in _Q_PATHS:
        raise ValueError(f"path: expected one of {sorted(_Q_PATHS)}, got {path!r}")
    return _Q_PATH_NAMES[fr_q_set_max_path(_Q_PATHS[path])]


cdef class _Cache:
    """What layer_forward keeps for layer_backward: the workspace, the call it was cut for and
    the call's arrays (x, state0, params, lengths), which backward reads again."""
    cdef readonly object workspace
    cdef readonly tuple arrays
    cdef Call call

    def __repr__(self):
        return (f"<fastrnn Cython cache: cell code {self.call.cell.code}, T={self.call.sizes.T}, "
                f"B={self.call.sizes.B}, I={self.call.sizes.I}, H={self.call.sizes.H}, "
                f"{self.workspace.dtype}, {self.workspace.nbytes} bytes>")


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


def layer_forward(cell, x, tuple state0, tuple params, lengths, bint reverse, bint train, y,
                  tuple state_n, threads=None, recurrent_mask=None, zoneout=None):
    """One layer, one direction, all T steps; see fastrnn.cells for the contract."""
    if cell.projected and projection.zones_h(zoneout, train):
        return _zoned_projection_forward(cell, x, state0, params, lengths, reverse, train, y,
                                         state_n, threads, recurrent_mask, zoneout)
    if cell.projected:          # run on the unprojected cell's kernels (fastrnn.projection)
        return projection.forward(layer_forward, cell, x, state0, params, lengths, reverse,
                                  train, y, state_n, threads, recurrent_mask, zoneout)
    cdef Call call
    cdef Plan plan
    cdef bint f32 = _is_float32(x)
    cdef Py_ssize_t item = 4 if f32 else 8, T, B, I, H, G, first, final, k, units
    call.cell = _cell_spec(cell)
    T, B, I = x.shape
    H = state0[0].shape[1]
    G = call.cell.G
    if T * B >= 2**31 or G * H * max(I, H) >= 2**31:
        raise ValueError(f"x: T*B = {T * B} rows or G*H = {G * H} columns are too many for BLAS")
    call.sizes = Sizes(T=T, B=B, I=I, H=H)
    if cell.layer_norm:
        # the gains and shifts in the peephole's place; kept in the cache below (call points
        # into it)
        params = tuple(params[:4]) + (cell.norm_array(params),)
    call.p = _params(params, item, cell)
    zone = zoneout_weights(zoneout, x.dtype, T, B, H)
    call.zone = NULL if zone is None else _data(zone)
    call.zone_step = call.zone_row = 0
    if zone is not None and zone.shape[0] > 1:
        call.zone_step, call.zone_row = zone.shape[1] * zone.shape[2], zone.shape[2]
    call.L = _layout(&call.cell, call.sizes, train, call.zone != NULL)
    call.lengths = <const int64_t*>_data(lengths)
    call.reverse, call.train = reverse, train
    call.x = _data(x)
    call.mask = NULL
    call.proj = NULL
    if recurrent_mask is not None and train:
        recurrent_mask = np.require(recurrent_mask, x.dtype, "C")
        call.mask = _data(recurrent_mask)
    ws = _scratch.empty(max(1, call.L.size), x.dtype)   # kept by the cache; pooled (_scratch)
    cdef void* ws_data = cnp.PyArray_DATA(<cnp.ndarray>ws)
    first, final = _first_slot(T, reverse, train), _final_slot(T, train)
    slots = (call.L.h_slots, call.L.c_slots)
    for k in range(call.cell.states):
        ws[slots[k] + first * B * H: slots[k] + (first + 1) * B * H] = state0[k].reshape(-1)
    if T and B and H:
        y_work = y if _blas_ready(y) else np.empty((T, B, H), x.dtype)
        call.y = cnp.PyArray_DATA(<cnp.ndarray?>y_work)
        call.y_step, call.y_row = y_work.strides[0] // item, y_work.strides[1] // item
        limit = _thread_limit(threads)
        units = _unit_threads(G, H, H, B, limit, _UNIT_PARALLEL_MIN) \
            if B <= (_small_batch_max_train if train else _small_batch_max) \
            and call.mask == NULL and not cell.whole_rows else 0
        plan.loop = UNITS if units else ROWS
        plan.threads = units if units else min(_pass_threads, limit)
        plan.pool = _pool_threads(limit, threads is not None)
        # a limited call makes no BLAS call: one thread computes x W_ih^T by itself too
        plan.input_dots = units > 1 or (units == 1 and threads is not None)
        with nogil:
            if f32:
                forward_loop(&call, <float*>ws_data, plan)
            else:
                forward_loop(&call, <double*>ws_data, plan)
        if y_work is not y:
            y[...] = y_work
    else:
        final = first                                 # no step: the state stays as it was
        y[...] = 0
    for k in range(call.cell.states):
        state_n[k][...] = ws[slots[k] + final * B * H: slots[k] + (final + 1) * B * H] \
            .reshape(B, H)
    if not train:
        return None
    cdef _Cache cache = _Cache()
    cache.workspace, cache.call = ws, call
    cache.arrays = (x, state0, params, lengths, recurrent_mask, zone)  # what call points into
    return cache


cdef list _gradient_arrays(Call* call, list grads, bint whole_rows, Py_ssize_t h_width, dtype,
                          Py_ssize_t item):
    # call.d for grads = [dx, dw_ih, dw_hh, db_ih, db_hh, ...] (dw_hh (G*H, h_width)): the
    # arrays the loop adds into, returned: each itself where BLAS can add into it in place, else
    # zeros, summed first and added after the loop (grads' entry None: added nowhere)
    work = [g if _blas_ready(g) else np.zeros(g.shape, dtype) for g in grads]
    if whole_rows:
        # the loop's bias sums are of the gate gradients, not the biases': to scratch
        work[3], work[4] = (np.zeros(call.cell.G * call.sizes.H, dtype) for _ in range(2))
        grads[3] = grads[4] = None
    call.d.dx, call.d.dw_ih, call.d.dw_hh = _data(work[0]), _data(work[1]), _data(work[2])
    call.d.db_ih, call.d.db_hh = _data(work[3]), _data(work[4])
    call.d.dx_step = work[0].strides[0] // item
    call.d.dx_row = _ld(work[0].strides[1], call.sizes.I, item)
    call.d.ld_dw_ih = <int>_ld(work[1].strides[0], call.sizes.I, item)
    call.d.ld_dw_hh = <int>_ld(work[2].strides[0], h_width, item)
    call.d.inc_db_ih = <int>(work[3].strides[0] // item)
    call.d.inc_db_hh = <int>(work[4].strides[0] // item)
    return work


def layer_backward(cell, cache, dy, tuple dstate_n, truncate, dx, tuple dstate0, tuple dparams,
                   threads=None):
    """Gradients of one layer_forward call, ADDED into dx, dstate0 and dparams; returns the
    hidden-side gate gradients; see fastrnn.cells."""
    if isinstance(cache, _ProjectionCache):
        return _zoned_projection_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0,
                                          dparams, threads)
    if cell.projected:
        return projection.backward(layer_backward, cell, cache, dy, dstate_n, truncate, dx,
                                   dstate0, dparams, threads)
    if not isinstance(cache, _Cache):
        raise TypeError(f"cache: expected what the Cython layer_forward returned with "
                        f"train=True, got {type(cache).__name__}")
    cdef _Cache ca = cache
    cdef Call call = ca.call
    ws = ca.workspace
    dtype = ws.dtype
    cdef bint f32 = dtype == np.float32
    cdef Py_ssize_t item = 4 if f32 else 8, T = call.sizes.T, B = call.sizes.B, H = call.sizes.H
    cdef Py_ssize_t k, BH = B * H
    cdef int passes, pool
    call.K = _back_layout(&call.cell, call.sizes, call.zone != NULL)
    bws = _scratch.empty(max(1, call.K.size), dtype)
    slots = (call.K.dh, call.K.dc)
    for k in range(call.cell.states):
        bws[slots[k]: slots[k] + BH] = 0 if dstate_n[k] is None else dstate_n[k].reshape(-1)
    cdef Py_ssize_t sums = call.cell.row_sums * BH
    if call.K.dpeep >= 0:
        bws[call.K.dpeep: call.K.dpeep + sums] = 0
    call.truncate = 0 if truncate is None else truncate
    cdef void* ws_data = cnp.PyArray_DATA(<cnp.ndarray>ws)
    cdef void* bws_data = cnp.PyArray_DATA(<cnp.ndarray>bws)
    if T and B and H:
        call.dy = NULL
        if dy is not None:
            if H > 1 and dy.strides[2] != item or any(st % item for st in dy.strides):
                dy = np.ascontiguousarray(dy)          # rows must be unit-stride runs
            call.dy = _data(dy)
            call.dy_step, call.dy_row = dy.strides[0] // item, dy.strides[1] // item
        grads = [dx, *dparams[:4]]
        work = _gradient_arrays(&call, grads, cell.whole_rows, H, dtype, item)
        limit = _thread_limit(threads)
        passes, pool = min(_pass_threads, limit), _pool_threads(limit, threads is not None)
        with nogil:
            if f32:
                backward_loop[float](&call, <float*>ws_data, <float*>bws_data, passes, pool)
            else:
                backward_loop[double](&call, <double*>ws_data, <double*>bws_data, passes, pool)
        for g, w in zip(grads, work):
            if w is not g and g is not None:
                g += w
        if cell.layer_norm:
            cell.add_norm_gradients(bws[call.K.dpeep: call.K.dpeep + sums]
                                    .reshape(B, cell.norm_rows, call.cell.G * H).sum(axis=0),
                                    dparams)
        elif call.K.dpeep >= 0:
            dpeephole = dparams[4]
            dpeephole += bws[call.K.dpeep: call.K.dpeep + sums].reshape(B, 3, H).sum(axis=0)
    for k in range(call.cell.states):
        d0 = dstate0[k]
        d0 += bws[slots[k]: slots[k] + BH].reshape(B, H)
    if not (T and B and H) or call.K.dgates_hh < 0:
        return None
    HB = call.cell.hidden_blocks * BH
    return bws[call.K.dgates_hh: call.K.dgates_hh + T * HB].reshape(T, B, -1)


cdef class _ProjectionCache(_Cache):
    """_Cache of _zoned_projection_forward: the Projection (call.proj points at it) and the
    arrays it points into."""
    cdef Projection proj
    cdef readonly tuple projection_arrays
    cdef readonly object kernel_cell


def _zoned_projection_forward(cell, x, tuple state0, tuple params, lengths, bint reverse,
                              bint train, y, tuple state_n, threads, recurrent_mask, zoneout):
    """layer_forward of a projected LSTM whose zoneout mixes h per unit
    (fastrnn.projection.zones_h), on forward_projected_loop."""
    if recurrent_mask is not None and train:
        raise ValueError("recurrent_mask: a projected LSTM takes no recurrent dropout")
    cdef Call call
    cdef Projection pj
    cdef bint f32 = _is_float32(x)
    cdef Py_ssize_t item = 4 if f32 else 8, T, B, I, H, P, G, first, final
    kernel_cell = unprojected(cell)
    call.cell = _cell_spec(kernel_cell)
    T, B, I = x.shape
    w_hr = np.ascontiguousarray(params[len(params) - 1])     # (wraparound is off)
    P, H = w_hr.shape
    G = call.cell.G
    if T * B >= 2**31 or G * H * max(I, H) >= 2**31:
        raise ValueError(f"x: T*B = {T * B} rows or G*H = {G * H} columns are too many for BLAS")
    call.sizes = Sizes(T=T, B=B, I=I, H=H)
    params = params[:len(params) - 1]
    if kernel_cell.layer_norm:
        params = tuple(params[:4]) + (kernel_cell.norm_array(params),)
    call.p = _params(params, item, kernel_cell)
    z_h, z_c = zoneout
    # the cell's own zoneout: c's weights, none for its h (m)
    zone = zoneout_weights((0.0, z_c), x.dtype, T, B, H)
    call.zone = _data(zone)
    call.zone_step = call.zone_row = 0
    if zone.shape[0] > 1:
        call.zone_step, call.zone_row = zone.shape[1] * zone.shape[2], zone.shape[2]
    keep = np.full((1, 1, P), z_h, x.dtype) if np.isscalar(z_h) else \
        np.require(z_h, x.dtype, "C")
    pj.keep = _data(keep)
    pj.keep_step = pj.keep_row = 0
    if keep.shape[0] > 1:
        pj.keep_step, pj.keep_row = B * P, P
    call.L = _layout(&call.cell, call.sizes, train, True)
    call.lengths = <const int64_t*>_data(lengths)
    call.reverse, call.train = reverse, train
    call.x = _data(x)
    call.mask = NULL
    call.proj = &pj
    slots = T + 1 if train else 2
    ws = _scratch.empty(max(1, call.L.size), x.dtype)   # kept by the cache
    h_slots = np.empty((slots, B, P), x.dtype)
    scratch = np.empty((B, P + H), x.dtype)            # h_raw, then the cell's y (m)
    pj.P, pj.w_hr, pj.ld_hr = P, _data(w_hr), <int>H
    pj.slots, pj.h_raw = _data(h_slots), _data(scratch)
    first, final = _first_slot(T, reverse, train), _final_slot(T, train)
    ws[call.L.h_slots + first * B * H: call.L.h_slots + (first + 1) * B * H] = 0
    ws[call.L.c_slots + first * B * H: call.L.c_slots + (first + 1) * B * H] = \
        state0[1].reshape(-1)
    h_slots[first] = state0[0]
    cdef void* ws_data = cnp.PyArray_DATA(<cnp.ndarray>ws)
    cdef int passes
    if T and B and H:
        y_work = y if _blas_ready(y) else np.empty((T, B, P), x.dtype)
        pj.y = _data(y_work)
        pj.y_step, pj.y_row = y_work.strides[0] // item, y_work.strides[1] // item
        call.y = <char*>_data(scratch) + P * item
        call.y_step, call.y_row = 0, P + H
        passes = min(_pass_threads, _thread_limit(threads))
        with nogil:
            if f32:
                forward_projected_loop[float](&call, <float*>ws_data, passes)
            else:
                forward_projected_loop[double](&call, <double*>ws_data, passes)
        if y_work is not y:
            y[...] = y_work
    else:
        final = first
        y[...] = 0
    state_n[0][...] = h_slots[final]
    state_n[1][...] = ws[call.L.c_slots + final * B * H: call.L.c_slots + (final + 1) * B * H] \
        .reshape(B, H)
    if not train:
        return None
    cdef _ProjectionCache cache = _ProjectionCache()
    cache.workspace, cache.call, cache.proj = ws, call, pj
    cache.call.proj = &cache.proj
    cache.arrays = (x, state0, params, lengths, None, zone)
    cache.projection_arrays = (w_hr, keep, h_slots)
    cache.kernel_cell = kernel_cell
    return cache


def _zoned_projection_backward(cell, _ProjectionCache cache, dy, tuple dstate_n, truncate, dx,
                               tuple dstate0, tuple dparams, threads):
    """layer_backward of _zoned_projection_forward (backward_projected_loop)."""
    cdef Call call = cache.call
    cdef Projection pj = cache.proj
    kernel_cell = cache.kernel_cell
    ws = cache.workspace
    dtype = ws.dtype
    cdef bint f32 = dtype == np.float32
    cdef Py_ssize_t item = 4 if f32 else 8, T = call.sizes.T, B = call.sizes.B, H = call.sizes.H
    cdef Py_ssize_t P = pj.P, BH = B * H
    call.proj = &pj
    call.K = _back_layout(&call.cell, call.sizes, True)
    bws = _scratch.empty(max(1, call.K.size), dtype)
    bws[call.K.dh: call.K.dh + BH] = 0
    bws[call.K.dc: call.K.dc + BH] = 0 if dstate_n[1] is None else dstate_n[1].reshape(-1)
    dh = np.zeros((B, P), dtype) if dstate_n[0] is None else np.array(dstate_n[0], dtype)
    dh_raw = np.empty((B, P), dtype)
    pj.dh = _data(dh)
    cdef Py_ssize_t sums = call.cell.row_sums * BH
    if call.K.dpeep >= 0:
        bws[call.K.dpeep: call.K.dpeep + sums] = 0
    call.truncate = 0 if truncate is None else truncate
    call.dy = NULL
    cdef void* ws_data = cnp.PyArray_DATA(<cnp.ndarray>ws)
    cdef void* bws_data = cnp.PyArray_DATA(<cnp.ndarray>bws)
    cdef void* dh_raw_data = _data(dh_raw)
    cdef int passes
    if T and B and H:
        pj.dy = NULL
        if dy is not None:
            if P > 1 and dy.strides[2] != item or any(st % item for st in dy.strides):
                dy = np.ascontiguousarray(dy)
            pj.dy = _data(dy)
            pj.dy_step, pj.dy_row = dy.strides[0] // item, dy.strides[1] // item
        grads = [dx, *dparams[:4], dparams[len(dparams) - 1]]
        work = _gradient_arrays(&call, grads, kernel_cell.whole_rows, P, dtype, item)
        pj.dw_hr = _data(work[5])
        pj.ld_dw_hr = <int>_ld(work[5].strides[0], H, item)
        passes = min(_pass_threads, _thread_limit(threads))
        with nogil:
            if f32:
                backward_projected_loop[float](&call, <float*>ws_data, <float*>bws_data,
                                               <float*>dh_raw_data, passes)
            else:
                backward_projected_loop[double](&call, <double*>ws_data, <double*>bws_data,
                                                <double*>dh_raw_data, passes)
        for g, w in zip(grads, work):
            if w is not g and g is not None:
                g += w
        if kernel_cell.layer_norm:
            kernel_cell.add_norm_gradients(bws[call.K.dpeep: call.K.dpeep + sums]
                                           .reshape(B, kernel_cell.norm_rows, call.cell.G * H)
                                           .sum(axis=0), dparams)
        elif call.K.dpeep >= 0:
            dpeephole = dparams[4]
            dpeephole += bws[call.K.dpeep: call.K.dpeep + sums].reshape(B, 3, H).sum(axis=0)
    dstate0[0][...] += dh
    dstate0[1][...] += bws[call.K.dc: call.K.dc + BH].reshape(B, H)
    return None


# ---------------------------------------------------------------------------------------------
# layer_call_step: a whole one-step call of a layer (fastrnn.layers' __call__ on one time step),
# every layer and direction, with the per-call work of layers.py's Python fast path done here:
# that path cost about 2.5 us a call in Python (attribute and flag look-ups, a dict look-up and
# tuple per parameter, three array allocations), more than half the work of an LSTM step of
# H = 128. Anything this path does not take (another array type or layout, an unusable
# parameter) returns None, and the layer takes its general path, which converts or raises.

cdef void _one_step(Call* call, floating* ws, Py_ssize_t row, char* h_n, char* c_n,
                    const char* h0, const char* c0, Plan plan) noexcept nogil:
    # one step of inference of state row `row` of the (rows, B, H) arrays h0 (c0) into h_n
    # (c_n), y = h_n: the state goes into slot 0 of the inference layout, the step writes slot 1
    cdef Py_ssize_t BH = call.sizes.B * call.sizes.H
    memcpy(ws + call.L.h_slots, <const floating*>h0 + row * BH, BH * sizeof(floating))
    if call.L.c_slots >= 0:
        memcpy(ws + call.L.c_slots, <const floating*>c0 + row * BH, BH * sizeof(floating))
    call.y, call.y_step, call.y_row = <floating*>h_n + row * BH, BH, call.sizes.H
    forward_loop(call, ws, plan)
    if call.L.c_slots >= 0:
        memcpy(<floating*>c_n + row * BH, ws + call.L.c_slots + BH, BH * sizeof(floating))


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
    if type(spec) is not tuple or type(params) is not dict:
        return None
    cdef tuple sp = <tuple>spec
    cdef dict pdict = <dict>params     # typed: its look-ups are C calls, not method calls
    cdef int code = sp[0]
    cdef int typenum = cnp.NPY_DOUBLE if sp[1] else cnp.NPY_FLOAT
    cdef Py_ssize_t I = sp[2], H = sp[3]
    cdef int nlayers = sp[4], D = sp[5]
    cdef tuple names = sp[6]
    cdef object zero_bias = sp[7]
    if not 0 <= code < NUM_CODES or _specs_by_code[code].G == 0:
        return None                     # the general path says why
    cdef Call call
    call.cell = _specs_by_code[code]
    cdef bint has_c = call.cell.states == 2
    cdef Py_ssize_t rows = nlayers * D, GH = call.cell.G * H, B, BH, I_l, layer, d, r, b, k
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
    cdef list held = []
    cdef tuple row_names
    cdef object name, a, q_ih, q_hh
    cdef const void* ptrs[5]
    cdef Params* row_params = <Params*>malloc(rows * sizeof(Params))
    cdef Plan* plans = <Plan*>malloc(nlayers * sizeof(Plan))
    cdef char* ws = NULL
    call.sizes.T, call.sizes.B, call.sizes.H = 1, B, H
    call.L = _layout(&call.cell, call.sizes, False, False)
    call.lengths = NULL
    call.mask = NULL                    # inference: no recurrent dropout
    call.zone = NULL                    # the layers take no zoneout here
    call.proj = NULL
    call.reverse = call.train = False
    cdef size_t item = 4 if typenum == cnp.NPY_FLOAT else 8
    cdef Py_ssize_t ws_bytes = max(1, call.L.size) * item
    cdef Py_ssize_t out_bytes = B * D * H * item
    cdef object h_n, c_n, y
    cdef char* p_y
    cdef char* p_h0
    cdef char* p_c0
    cdef char* p_h_n
    cdef char* p_c_n
    cdef char* layer_in
    cdef char* layer_out
    cdef int units
    try:
        if row_params == NULL or plans == NULL:
            raise MemoryError()
        for r in range(rows):
            row_names = <tuple>names[r]
            I_l = I if r < D else D * H
            q_ih = q_hh = None                  # fastrnn.quantize's w_ih, w_hh
            for k in range(5):
                name = row_names[k]
                if name is None:
                    a = zero_bias if k == 2 or k == 3 else None
                    ptrs[k] = _data(a)
                    continue
                a = pdict.get(name)
                if k <= 1 and not cnp.PyArray_CheckExact(a) and isinstance(a, QuantizedWeight):
                    if typenum != cnp.NPY_FLOAT or a.shape != (GH, I_l if k == 0 else H):
                        return None
                    held.append(a)
                    if k == 0:
                        q_ih = a
                    else:
                        q_hh = a
                    ptrs[k] = NULL
                    continue
                if a is None or not (
                        _fits(a, typenum, 2, GH, I_l, 0) if k == 0 else
                        _fits(a, typenum, 2, GH, H, 0) if k == 1 else
                        _fits(a, typenum, 1, GH, 0, 0) if k <= 3 else
                        _fits(a, typenum, 2, 3, H, 0)):
                    return None
                held.append(a)
                ptrs[k] = _data(a)
            row_params[r].w_ih, row_params[r].w_hh = ptrs[0], ptrs[1]
            row_params[r].b_ih, row_params[r].b_hh = ptrs[2], ptrs[3]
            row_params[r].peephole = ptrs[4]
            row_params[r].ld_ih, row_params[r].ld_hh = <int>I_l, <int>H
            row_params[r].options = NULL
            row_params[r].q_ih.format = row_params[r].q_hh.format = FR_Q_NONE
            row_params[r].round_source = False
            if q_ih is not None and q_hh is not None:
                row_params[r].q_ih = _quantized(q_ih)
                row_params[r].q_hh = _quantized(q_hh)
            elif q_ih is not None or q_hh is not None:
                return None                     # one of two: the general path refuses it
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
            # the unit-split loop with x W_ih^T inside (no BLAS call), or the batch-row loop
            units = _unit_threads(call.cell.G, H, (I if layer == 0 else D * H) + H, B,
                                  _num_threads, _STEP_PARALLEL_MIN) \
                if B <= _small_batch_max else 0
            plans[layer] = Plan(UNITS if units else ROWS, units if units else _pass_threads,
                                _pool_threads(_num_threads, False), units > 0)
        p_y, p_h0, p_c0 = <char*>_data(y), <char*>_data(h0), <char*>_data(c0)
        p_h_n, p_c_n = <char*>_data(h_n), <char*>_data(c_n)
        layer_in = <char*>_data(x)
        BH = B * H
        with nogil:
            for layer in range(nlayers):
                call.sizes.I = I if layer == 0 else D * H
                call.x = layer_in
                layer_out = p_y if layer == nlayers - 1 else \
                    ws + ws_bytes + (layer & 1) * out_bytes
                for d in range(D):
                    r = layer * D + d
                    call.p = row_params[r]
                    if item == 4:
                        _one_step(&call, <float*>ws, r, p_h_n, p_c_n, p_h0, p_c0, plans[layer])
                    else:
                        _one_step(&call, <double*>ws, r, p_h_n, p_c_n, p_h0, p_c0, plans[layer])
                    # this direction's h_n rows into its columns of the layer's output
                    for b in range(B):
                        memcpy(layer_out + (b * D + d) * H * item,
                               p_h_n + (r * BH + b * H) * item, H * item)
                layer_in = layer_out
    finally:
        free(ws)
        free(plans)
        free(row_params)
    return y, ((h_n, c_n) if has_c else h_n)
