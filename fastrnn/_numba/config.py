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
