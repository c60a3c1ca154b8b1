"""The Numba backend's packed GEMM loop pieces (kernels.block_product, pack_and_multiply,
weight_gradient, column_sums) against NumPy: transposed and strided operands, accumulation,
every remainder of the row tiles, ragged panels, one and two threads. The loops that use them
are covered in test_small_batch.py (the gemm-packed and gemm-packed-serial paths)."""
import numpy as np
import pytest

from conftest import COMPILED_BACKENDS

pytestmark = pytest.mark.skipif("numba" not in COMPILED_BACKENDS, reason="numba not under test")


def _tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-13


def _err(got, ref):
    return np.abs(got - ref).max() / max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_pack_and_multiply_matches_numpy(dtype):
    """out (+)= v @ w.T with w or v transposed views, and a column offset with packed_product."""
    from fastrnn._numba import kernels
    NR = kernels.panel_width(np.zeros(1, dtype))
    # the last: several blocks of v's rows, transposed v copied into micro-panels per block
    for n, K, B in [(70, 37, 1), (2 * NR, 64, 13), (3, 5, 19), (5 * NR + 1, 9, 300),
                    (NR + 3, 256, 605)]:
        rng = np.random.default_rng(n * 1000 + B)
        w = rng.standard_normal((n, K)).astype(dtype)
        wt = np.ascontiguousarray(w.T)             # w is wt.T: packed from a transposed view
        v = rng.standard_normal((B, K)).astype(dtype)
        vt = np.ascontiguousarray(v.T)
        ref = v.astype(np.float64) @ w.T.astype(np.float64)
        flat = kernels.panel_buffer(((-(-n // NR)) * K * NR,), w)
        for P in (1, 2):
            # w's layout matters to the packing only, v's to the product only: both transposed
            # at once covers each branch (every layout is a compile of its own, ~15 s each)
            for wa, va in [(w, v), (wt.T, vt.T)]:
                out = np.full((B, n), np.nan, dtype)
                kernels.pack_and_multiply(P, wa, n, va, out, False, flat)
                assert _err(out, ref) < _tol(dtype), (n, K, B, P)
                start = rng.standard_normal((B, n)).astype(dtype)
                out = start.copy()
                kernels.pack_and_multiply(P, wa, n, va, out, True, flat)
                assert _err(out, ref + start) < _tol(dtype), (n, K, B, P, "accumulate")
            # the packed copy kept: a product into columns [3, 3 + n) of a wider out
            packed = flat[:(-(-n // NR)) * K * NR].reshape((-(-n // NR), K, NR))
            kernels.pack_panels(w, 0, n, packed)
            out = np.full((B, n + 8), 7, dtype)
            kernels.packed_product(P, packed, n, vt.T, out, 3, False)
            assert _err(out[:, 3:3 + n], ref) < _tol(dtype)
            assert (out[:, :3] == 7).all() and (out[:, 3 + n:] == 7).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_weight_gradient_and_column_sums_match_numpy(dtype):
    from fastrnn._numba import kernels
    NR = kernels.panel_width(np.zeros(1, dtype))
    for TB, M, K in [(7, 40, 33), (600, 96, 2 * NR), (257, 3, 1)]:
        rng = np.random.default_rng(TB + M + K)
        wide = rng.standard_normal((TB, M + 5)).astype(dtype)
        d = wide[:, 2:2 + M]                        # strided rows, as dgates[:, :2H]
        v = rng.standard_normal((TB, K)).astype(dtype)
        start = rng.standard_normal((M, K)).astype(dtype)
        flat = kernels.panel_buffer(((-(-K // NR)) * 256 * NR,), v)
        ref = start + d.T.astype(np.float64) @ v.astype(np.float64)
        sums = np.ones(M, dtype) + d.astype(np.float64).sum(axis=0)
        for P in (1, 2):
            out = start.copy()
            kernels.weight_gradient(P, d, v, out, flat)
            assert _err(out, ref) < _tol(dtype) * max(1, TB / 50), (TB, M, K, P)
            acc = np.ones(M, dtype)
            kernels.column_sums(P, d, acc)
            assert _err(acc, sums) < _tol(dtype) * max(1, TB / 50), (TB, M, P)


def test_packed_products_keep_nan():
    from fastrnn._numba import kernels
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 9)).astype(np.float32)
    v = rng.standard_normal((11, 9)).astype(np.float32)
    v[5, 3] = np.nan
    flat = kernels.panel_buffer((3 * 9 * 32,), w)
    out = np.zeros((11, 70), np.float32)
    kernels.pack_and_multiply(2, w, 70, v, out, True, flat)
    assert np.isnan(out[5]).all()
    assert not np.isnan(np.delete(out, 5, axis=0)).any()
