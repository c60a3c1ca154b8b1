"""The row-major BLAS wrappers of kernels/blas.pxd, callable from Python so tests can compare them
with NumPy. Not used by the library itself.

Arrays may be strided views (rows any positive distance apart) but each row must be contiguous;
vectors may have any positive stride.
"""
from cython cimport floating

from blas cimport gemm as _gemm, gemv as _gemv


cdef int _leading_dim(const char* name, const floating[:, :] a) except -1:
    """Distance between rows in elements, as BLAS wants it; refuses layouts BLAS cannot take."""
    cdef Py_ssize_t item = sizeof(floating)
    if a.shape[1] > 1 and a.strides[1] != item:
        raise ValueError(f"{name.decode()}: expected unit stride along the last axis, got a stride "
                         f"of {a.strides[1]} bytes")
    if a.shape[0] <= 1 or a.shape[1] == 0:
        return max(1, a.shape[1])          # one row or none: the row stride never matters
    if a.strides[0] % item or a.strides[0] // item < max(1, a.shape[1]):
        raise ValueError(f"{name.decode()}: expected rows at least a row apart, a positive "
                         f"multiple of the item size, got a row stride of {a.strides[0]} bytes")
    return <int>(a.strides[0] // item)


def gemm(bint trans_a, bint trans_b, double alpha, const floating[:, :] a,
         const floating[:, :] b, double beta, floating[:, :] c):
    """c[...] = alpha * op(a) @ op(b) + beta * c, in place; op(a) = a.T if trans_a, likewise b."""
    cdef Py_ssize_t m = c.shape[0], n = c.shape[1]
    cdef Py_ssize_t k = a.shape[0] if trans_a else a.shape[1]
    shape_a = (k, m) if trans_a else (m, k)
    shape_b = (n, k) if trans_b else (k, n)
    if (a.shape[0], a.shape[1]) != shape_a or (b.shape[0], b.shape[1]) != shape_b:
        raise ValueError(f"shapes do not fit: a {(a.shape[0], a.shape[1])} (trans {trans_a}), "
                         f"b {(b.shape[0], b.shape[1])} (trans {trans_b}), "
                         f"c {(c.shape[0], c.shape[1])}")
    # a row's stride only matters when the matrix has more than one row; give BLAS a legal one
    cdef int lda = _leading_dim(b"a", a)
    cdef int ldb = _leading_dim(b"b", b)
    cdef int ldc = _leading_dim(b"c", c)
    if m == 0 or n == 0:
        return
    with nogil:
        _gemm(trans_a, trans_b, <int>m, <int>n, <int>k, <floating>alpha, &a[0, 0] if k else NULL,
              lda, &b[0, 0] if k else NULL, ldb, <floating>beta, &c[0, 0], ldc)


def gemv(bint trans_a, double alpha, const floating[:, :] a, const floating[:] x,
         double beta, floating[:] y):
    """y[...] = alpha * op(a) @ x + beta * y, in place; op(a) = a.T if trans_a."""
    cdef Py_ssize_t m = a.shape[0], n = a.shape[1]
    cdef Py_ssize_t item = sizeof(floating)
    if x.shape[0] != (m if trans_a else n) or y.shape[0] != (n if trans_a else m):
        raise ValueError(f"shapes do not fit: a {(m, n)} (trans {trans_a}), "
                         f"x ({x.shape[0]},), y ({y.shape[0]},)")
    if x.strides[0] <= 0 or y.strides[0] <= 0:
        raise ValueError("x, y: expected positive strides")
    cdef int lda = _leading_dim(b"a", a)
    cdef int incx = <int>(x.strides[0] // item), incy = <int>(y.strides[0] // item)
    if y.shape[0] == 0:
        return
    with nogil:
        _gemv(trans_a, <int>m, <int>n, <floating>alpha, &a[0, 0] if m and n else NULL, lda,
              &x[0] if x.shape[0] else NULL, incx, <floating>beta, &y[0], incy)
