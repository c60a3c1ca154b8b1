"""Every Numba option of the backend, in one place.

FASTMATH keeps NaN and infinity semantics (no "nnan", no "ninf"): NaN in the input must give NaN
out, and relu must pass NaN through, so the compiler may not assume finite values.
error_model="numpy": a division by zero gives inf or NaN instead of a check and a Python exception
in the inner loops (the activations divide, and NaN must flow through them).

cache=True writes the compiled kernels next to the sources (__pycache__, or NUMBA_CACHE_DIR).
Numba checks only the source file of the function it caches: after editing blas.py or this file,
delete the cache (``find fastrnn -name '*.nb[ic]' -delete``) or the old machine code keeps
running. kernels.py holds all the steps and loops together for that reason.
"""
import llvmlite.binding as _llvm
import numba as _numba

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # a set: Numba refuses a frozenset

# Serial compiled code: the generic time loops, the row steps, the BLAS wrapper.
KERNEL = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

# Zoneout's mix, k * old + (1 - k) * new: without "reassoc", so that a unit whose mask keeps it
# (k = 1) keeps its value exactly (reassociated, the mix rounded it in the last bit).
EXACT_MIX = dict(KERNEL, fastmath=FASTMATH - {"reassoc"})

# The elementwise passes, which split the batch rows over threads with prange.
PARALLEL = dict(KERNEL, parallel=True)

# Offsets of the buffers cut from one workspace are rounded up to this many elements, so every
# buffer starts on a 64-byte boundary for both float32 and float64.
ALIGN_ELEMENTS = 16

# The elementwise pass of a step is split over threads only from this many elements (batch rows
# times gate units, B * G * H) on; smaller passes run on the calling thread (see _launch in
# __init__.py for why). At this size a float32 pass takes on the order of 100 microseconds.
PARALLEL_MIN_ELEMENTS = 1 << 17

# Inference calls with at most this many batch rows run the unit-split forward loop (hidden
# units split over threads, dot products instead of a GEMM per step);
# fastrnn._numba.set_small_batch_max changes it. Measured faster than the GEMM loop up to B = 16
# (float32, 2 threads: 2x at B = 4, H = 256; 1.2x at B = 16, H = 256, 2 layers bidirectional),
# about even from B = 32 on, as in the Cython backend.
SMALL_BATCH_MAX = 16
# The same for forward calls that keep a cache for training: off. Measured 1.1-1.6x SLOWER than
# the GEMM loop at every B from 1 to 32 (LSTM T=100, H=256, forward + backward): backward's GEMMs
# leave OpenBLAS's threads spinning, and they take the cores the unit threads need each step.
SMALL_BATCH_MAX_TRAIN = 0

# The unit-split loop uses every thread from this many multiply-adds per step (G*H*H*B, the
# recurrent product) on, one thread below: a parallel launch per step costs about a microsecond
# and waking the other thread more (measured: LSTM H=64 B=1, 16K: 4.0 us a step on one thread,
# 4.9 on two; H=128 B=1, 64K: 8.6 and 7.2).
UNITS_PARALLEL_MIN_WORK = 1 << 16

# a one-step call (layer_call_step) splits the units over threads from this many multiply-adds (G*H*(I+H)*B) on; the
# Cython backend's limit too (measured, whole one-step layer calls, weights 64-byte aligned and
# the dot products in vector tiles, one thread vs two: LSTM I=H=128, 131K: 10.8 and 11.0 us;
# I=H=144, 166K: 12.6 and 11.2; GRU I=H=128, 98K: 8.5 and 9.4; I=H=144, 124K: 9.6 and 9.9).
STEP_PARALLEL_MIN_WORK = 150000


def _vector_registers():
    """(bytes, count) of the vector registers Numba compiles for: its target's CPU features
    (NUMBA_CPU_FEATURES, else the host's, as Numba takes them)."""
    features = _numba.config.CPU_FEATURES
    if features is None:
        features = _llvm.get_host_cpu_features().flatten()
    features = set(features.split(","))
    if "+avx512f" in features:
        return 64, 32
    if "+avx" in features:
        return 32, 16
    return 16, 16 if "+sse2" in features else 32   # SSE: 16 registers; NEON and others: 32


# The unit-split loop's panel product (kernels.panel_product) keeps an MR x NR tile of the
# result in vector registers, NR = 2 registers' worth of lanes (AVX-512: 32 float32, 16
# float64): PANEL_VECTOR_BYTES is the register width, PANEL_ACCUMULATORS how many registers the
# tile may take (16 of AVX-512's 32 registers, 8 of AVX's 16, leaving room for the weights and
# the broadcast inputs). Written in LLVM vector types, not left to the loop vectoriser: LLVM
# prefers 256-bit vectors on AVX-512 CPUs (rocketlake, icelake, ...), and half-width
# accumulators ran at ~100 GFLOP/s a core against ~150 with 512-bit ones.
PANEL_VECTOR_BYTES, _REGISTERS = _vector_registers()
PANEL_ACCUMULATORS = 16 if _REGISTERS >= 32 else 8

# The unit-split loop packs the weights into panels when a call has at least PANEL_MIN_ROWS
# rows of input, T*B, and a thread's packed w_hh takes at most PANEL_MAX_BYTES (it must stay in
# the core's L2 from step to step: a product that streams its weights from L3 or memory runs at
# the speed of memory, packed or not, measured 28.8 and 28.7 GFLOP/s, B = 2, 6 MB). Otherwise
# dot products on the weights as they are. fastrnn._numba._set_pack_limits changes both.
# Packing costs ~0.15 ns a byte of weights (0.6 ms for 4 MB of float32 on one core, about two
# copies); the panel product saves ~0.005 ns per multiply-add (float32: 85-95 GFLOP/s -> 125-160
# at B >= 4, 35 -> 46 at B = 1), so the input projection (T*B rows) and the T steps of B rows
# each win it back from about 60 rows on by that estimate (B = 1: T >= ~45; B = 4: T >= ~20;
# B = 16: T >= ~5); measured whole calls (2 threads, noisy): 64 rows a loss (LSTM B=4 T=16,
# H=256: 0.65x), 160 a small gain (T=40: 1.03x), so 128.
PANEL_MIN_ROWS = 128
PANEL_MAX_BYTES = 1 << 20

# The GEMM loop (batches above the unit-split limit, and every training call) multiplies over
# packed weights (kernels.block_product) for calls of at most PACKED_B_MAX batch rows and at
# least the pack limit's T*B rows (PANEL_MIN_ROWS, see _set_pack_limits). Its input projection
# and, in backward, the products and sums after the time loop are packed products and column
# sums too, so such a call makes no BLAS call at all and splits its products (by whole panels)
# and its elementwise passes (by batch rows) over every thread: with BLAS in the same call,
# OpenBLAS's threads spinning after a GEMM take the cores the other pool waits on. As in the
# Cython backend (its _PACKED_B_MAX); fastrnn._numba._set_pool(False) puts the packed per-step
# products on the calling thread and the rest back on BLAS.
PACKED_B_MAX = 64
# Such a call uses every thread when a step has at least this much work, B*G*H*(H + 64) (the
# multiply-adds of its product, and 64 for each element of its pass), else the calling thread
# alone: a parallel launch costs ~1.5 us and each step has two or three. Measured (float32,
# 2 threads, training, ms, 1 thread / 2): RNN H=64 B=32 (0.26M) 2.3 / 3.0, H=128 B=16 (0.5M)
# 3.3 / 3.8, GRU H=64 B=16 (0.4M) 3.0 / 3.7, RNN H=128 B=32 inference (0.8M) 2.2 / 2.5;
# LSTM H=64 B=32 (1M) 6.7 / 6.1, H=128 B=16 (1.6M) 10.7 / 7.8.
POOL_MIN_WORK = 1 << 20
# a product's rows of x (v) taken together against every panel: about a quarter of a 1 MiB L2
PANEL_X_BLOCK_BYTES = 256 * 1024
# rows of T*B per chunk of the packed weight-gradient products (kernels.weight_gradient)
GRAD_CHUNK = 256
