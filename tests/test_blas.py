"""The row-major BLAS wrappers the Cython kernels use (kernels/blas.pxd), against NumPy.

The wrappers swap operands to run row-major products on column-major BLAS; a mistake there shows
up as a transposed or garbled result, so every case below compares with the NumPy product in
float64 and with a tolerance per dtype, relative to the size of the terms summed.
"""
import itertools

import numpy as np
import pytest

try:
    from fastrnn._cy import _blas_check
except ImportError as exc:  # the foundation requires this extension: fail, do not skip
    raise ImportError("fastrnn._cy._blas_check is not built: run `pip install .` (or "
                      "`python setup.py build_ext --inplace`) with a C compiler") from exc

DTYPES = [np.float32, np.float64]
# |result - exact| <= TOL * (|alpha| |op(a)| @ |op(b)| + |beta| |c|), elementwise
TOL = {np.float32: 1e-5, np.float64: 1e-13}
SIZES = [1, 2, 7, 33]   # size 1 and odd sizes; 33 crosses BLAS blocking on every architecture


def _view(rng, shape, dtype, pad):
    """A (rows, cols) view whose rows are `pad` elements further apart than its width."""
    rows, cols = shape
    base = rng.uniform(-1, 1, size=(rows, cols + pad + 1)).astype(dtype)
    return base[:, 1:cols + 1]            # offset start and a row stride of cols + pad + 1


def _check(got, a, b, c0, alpha, beta, dtype):
    a64, b64, c64 = (np.asarray(v, dtype=np.float64) for v in (a, b, c0))
    expected = alpha * a64 @ b64 + beta * c64
    bound = abs(alpha) * np.abs(a64) @ np.abs(b64) + abs(beta) * np.abs(c64)
    err = np.abs(got.astype(np.float64) - expected)
    assert np.all(err <= TOL[dtype] * np.maximum(bound, 1e-30)), err.max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([False, True], repeat=2)))
def test_gemm_against_numpy(dtype, trans_a, trans_b):
    rng = np.random.default_rng(0)
    for m, n, k in itertools.product(SIZES, repeat=3):
        for pad, (alpha, beta) in zip([0, 3], [(1.0, 0.0), (-0.5, 1.5)]):
            a = _view(rng, (k, m) if trans_a else (m, k), dtype, pad)
            b = _view(rng, (n, k) if trans_b else (k, n), dtype, pad + 1)
            c = _view(rng, (m, n), dtype, pad + 2)
            c0 = c.copy()
            a_before, b_before = a.copy(), b.copy()
            _blas_check.gemm(trans_a, trans_b, alpha, a, b, beta, c)
            _check(c, a.T if trans_a else a, b.T if trans_b else b, c0, alpha, beta, dtype)
            np.testing.assert_array_equal(a, a_before)        # inputs are not written
            np.testing.assert_array_equal(b, b_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_writes_only_its_view(dtype):
    rng = np.random.default_rng(1)
    base = rng.uniform(-1, 1, size=(6, 10)).astype(dtype)
    before = base.copy()
    c = base[1:5, 2:5]                    # (4, 3) inside a (6, 10) array
    a = rng.uniform(-1, 1, size=(4, 7)).astype(dtype)
    b = rng.uniform(-1, 1, size=(7, 3)).astype(dtype)
    _blas_check.gemm(False, False, 1.0, a, b, 1.0, c)
    _check(c, a, b, before[1:5, 2:5], 1.0, 1.0, dtype)
    outside = np.ones(base.shape, bool)
    outside[1:5, 2:5] = False
    np.testing.assert_array_equal(base[outside], before[outside])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_beta_zero_overwrites_and_empty_k(dtype):
    rng = np.random.default_rng(2)
    for m, n in [(3, 4), (1, 4), (3, 1)]:   # one row or column goes through GEMV
        a = rng.uniform(-1, 1, size=(m, 5)).astype(dtype)
        b = rng.uniform(-1, 1, size=(5, n)).astype(dtype)
        c = np.full((m, n), np.nan, dtype)    # beta = 0: c is overwritten, its NaNs do not leak
        _blas_check.gemm(False, False, 2.0, a, b, 0.0, c)
        _check(c, a, b, np.zeros((m, n)), 2.0, 0.0, dtype)
    # k = 0: nothing to sum, c = beta * c
    c = rng.uniform(-1, 1, size=(3, 4)).astype(dtype)
    expected = 0.5 * c
    _blas_check.gemm(False, False, 1.0, np.zeros((3, 0), dtype), np.zeros((0, 4), dtype), 0.5, c)
    np.testing.assert_array_equal(c, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_propagates_nan(dtype):
    a = np.ones((2, 3), dtype)
    a[1, 2] = np.nan
    c = np.zeros((2, 2), dtype)
    _blas_check.gemm(False, False, 1.0, a, np.ones((3, 2), dtype), 0.0, c)
    assert np.all(np.isnan(c[1])) and np.all(c[0] == 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
def test_gemv_against_numpy(dtype, trans_a):
    rng = np.random.default_rng(3)
    for m, n in itertools.product(SIZES, repeat=2):
        for pad, step, (alpha, beta) in [(0, 1, (1.0, 0.0)), (2, 3, (0.75, -1.0))]:
            a = _view(rng, (m, n), dtype, pad)
            x = rng.uniform(-1, 1, size=(m if trans_a else n) * step).astype(dtype)[::step]
            y = rng.uniform(-1, 1, size=(n if trans_a else m) * step).astype(dtype)[::step]
            y0 = y.copy()
            _blas_check.gemv(trans_a, alpha, a, x, beta, y)
            _check(y[:, None], a.T if trans_a else a, x[:, None], y0[:, None], alpha, beta, dtype)


def test_bad_input_is_refused():
    a = np.ones((4, 6))
    with pytest.raises(ValueError, match="shapes do not fit"):
        _blas_check.gemm(False, False, 1.0, a, np.ones((5, 2)), 0.0, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="a: expected unit stride"):
        _blas_check.gemm(False, False, 1.0, a[:, ::2], np.ones((3, 2)), 0.0, np.zeros((4, 2)))
    with pytest.raises((TypeError, ValueError), match="dtype"):    # one dtype for all operands
        _blas_check.gemm(False, False, 1.0, a.astype(np.float32), np.ones((6, 2)), 0.0,
                         np.zeros((4, 2)))
