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

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # a set: Numba refuses a frozenset

# Serial compiled code: the generic time loops, the row steps, the BLAS wrapper.
KERNEL = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

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

# layer_step splits the units over threads from this many multiply-adds (G*H*(I+H)*B) on
# (measured, whole call: LSTM I=H=64 B=1, 32K: 4.8 us on one thread, 5.5 on two; I=H=128, 128K:
# 9.8 and 8.2; GRU I=H=128, 96K: 7.6 and 7.1).
STEP_PARALLEL_MIN_WORK = 1 << 16
