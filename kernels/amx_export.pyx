"""The addresses of kernels/amx.h's two kernels, for the Numba backend: fastrnn/_numba/amx.py
registers them as symbols its compiled loops call, so both backends run the same tile-unit
code (Numba cannot emit AMX instructions itself)."""

cdef extern from "amx.h" nogil:
    int fr_amx_init()
    void fr_amx_pack(const float* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,
                     Py_ssize_t k, float* packed)
    void fr_amx_product(const float* packed, Py_ssize_t rows, Py_ssize_t k, const float* x,
                        Py_ssize_t ldx, Py_ssize_t incx, Py_ssize_t nx, float* out,
                        Py_ssize_t ldo, int accumulate)


def available():
    """Whether this CPU and OS let this process use the AMX tile unit."""
    return fr_amx_init() != 0


def addresses():
    """{"pack": address of fr_amx_pack, "product": address of fr_amx_product}."""
    return {"pack": <size_t><void*>fr_amx_pack, "product": <size_t><void*>fr_amx_product}
