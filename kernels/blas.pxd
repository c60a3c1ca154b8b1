# Row-major BLAS for float and double over scipy.linalg.cython_blas (Fortran, column-major).
#
# A row-major (m, n) matrix with leading dimension ld is the column-major (n, m) matrix with the
# same ld, i.e. its transpose. So C = op(A) op(B) in row-major is C^T = op(B)^T op(A)^T in
# column-major: the same call with the operands (and m, n) swapped. Every wrapper states its
# NumPy meaning; `ld*` is the distance in elements between consecutive rows (a[i, 0] to a[i+1, 0]).
#
# All wrappers are `noexcept nogil`, take const inputs (BLAS does not write them; the Fortran
# prototypes are just not const-qualified) and accept empty sizes.
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* a, int lda,
                      const floating* b, int ldb,
                      floating beta, floating* c, int ldc) noexcept nogil:
    # c[:m, :n] = alpha * op(a) @ op(b) + beta * c     op(a) is (m, k), op(b) is (k, n)
    #   op(a) = a[:m, :k] or a[:k, :m].T (trans_a); op(b) = b[:k, :n] or b[:n, :k].T (trans_b)
    # beta == 0 overwrites c (NaN in c does not propagate), as BLAS defines it.
    cdef char ta = b"T" if trans_a else b"N"
    cdef char tb = b"T" if trans_b else b"N"
    cdef Py_ssize_t i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        # nothing to multiply: c = beta * c (BLAS would reject the leading dims of empty a, b)
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    if m == 1 or n == 1:
        # one row or one column of c is a matrix-vector product; GEMM would pack the whole
        # matrix for it (8x slower measured: OpenBLAS sgemm (1, 512) x (512, 2048))
        _gemm_as_gemv(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    # column-major: c^T (n, m) = op(b)^T (n, k) @ op(a)^T (k, m)
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda, &beta, c, &ldc)


cdef inline void _gemm_as_gemv(bint trans_a, bint trans_b, int m, int n, int k,
                               floating alpha, const floating* a, int lda,
                               const floating* b, int ldb,
                               floating beta, floating* c, int ldc) noexcept nogil:
    # gemm when m == 1 or n == 1, sizes > 0; beta == 0 overwrites c, whatever the BLAS does
    cdef Py_ssize_t i
    cdef int len_c = n if m == 1 else m
    cdef int inc_c = 1 if m == 1 else ldc
    if beta == 0:
        for i in range(len_c):
            c[i * inc_c] = 0
    if m == 1:
        # c[0, :] = alpha * op(a)[0, :] @ op(b) + beta * c[0, :]; op(a)[0, :] is a[0, :k] or a[:k, 0]
        if trans_b:
            gemv(False, n, k, alpha, b, ldb, a, lda if trans_a else 1, beta, c, 1)   # b (n, k)
        else:
            gemv(True, k, n, alpha, b, ldb, a, lda if trans_a else 1, beta, c, 1)    # b (k, n)
    else:
        # c[:, 0] = alpha * op(a) @ op(b)[:, 0] + beta * c[:, 0]; op(b)[:, 0] is b[:k, 0] or b[0, :k]
        if trans_a:
            gemv(True, k, m, alpha, a, lda, b, 1 if trans_b else ldb, beta, c, ldc)  # a (k, m)
        else:
            gemv(False, m, k, alpha, a, lda, b, 1 if trans_b else ldb, beta, c, ldc) # a (m, k)


cdef inline void gemv(bint trans_a, int m, int n, floating alpha, const floating* a, int lda,
                      const floating* x, int incx,
                      floating beta, floating* y, int incy) noexcept nogil:
    # y = alpha * op(a) @ x + beta * y     a is a[:m, :n]; op(a) = a or a.T (trans_a)
    #   x has n entries (m with trans_a) at stride incx, y has m entries (n with trans_a) at incy
    cdef char ta = b"N" if trans_a else b"T"    # row-major a is column-major a.T
    cdef int len_y = n if trans_a else m
    cdef Py_ssize_t i
    if len_y <= 0:
        return
    if (m if trans_a else n) <= 0:
        for i in range(len_y):
            y[i * incy] = 0 if beta == 0 else beta * y[i * incy]
        return
    # column-major: a.T is (n, m) with leading dimension lda
    if floating is float:
        sgemv(&ta, &n, &m, &alpha, <float*>a, &lda, <float*>x, &incx, &beta, y, &incy)
    else:
        dgemv(&ta, &n, &m, &alpha, <double*>a, &lda, <double*>x, &incx, &beta, y, &incy)
