"""Only the compiled extensions live here; the metadata is in pyproject.toml.

Every kernels/*.pyx becomes fastrnn._cy.<name>. Compiler directives and flags are set here, in one
place, for all of them.
"""
import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "nonecheck": False,
}
# -O3 for vectorised elementwise loops; OpenMP for prange over batch rows. No -ffast-math: it
# would let the compiler assume there are no NaNs, and NaN in must give NaN out.
# -fno-trapping-math only drops the assumption that floating-point exceptions trap (values, NaN
# and infinity are unchanged); without it GCC will not if-convert the NaN-keeping selects of the
# activations, and the gate loops stay scalar.
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LINK_ARGS = ["-fopenmp"]
# For the CPU it is built on, as Numba compiles its kernels for the CPU it runs on: the cell steps
# vectorise with AVX2/AVX-512 instead of SSE2 (measured: LSTM training 126 -> 112 ms a call,
# lstm-train-256, 2 cores). `pip install .` builds on the machine that runs it. To build a
# package for other machines (a wheel to copy elsewhere), set FASTRNN_PORTABLE=1: plain x86-64,
# with the dot-product kernels still picking AVX2/AVX-512 at run time (kernels/rowdot.h).
# -mprefer-vector-width=512: GCC's default for AVX-512 CPUs is 256-bit vectors; the gate loops
# at full width took the elementwise rows from 9.6 to 6.6 % of a bilstm-infer call (perf), and
# the core already runs 512-bit code for the products (kernels/panel.h), so no clock is lost.
if not os.environ.get("FASTRNN_PORTABLE"):
    COMPILE_ARGS += ["-march=native", "-mprefer-vector-width=512"]

extensions = [
    Extension(
        f"fastrnn._cy.{pyx.stem}",
        [str(pyx)],
        include_dirs=[numpy.get_include(), "kernels"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )
    for pyx in sorted(Path("kernels").glob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=COMPILER_DIRECTIVES,
                            include_path=["kernels"]))
