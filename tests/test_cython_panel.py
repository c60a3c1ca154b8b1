"""The Cython backend's packed product (kernels/panel.h through _pack_and_multiply_mt) against
NumPy: weights packed from rows or columns, x read by rows or by columns (the weight
gradients' d^T, copied into micro-panels block by block), several blocks of x rows with every
remainder of the 8-row tiles, ragged panels, accumulation, one and two threads, NaN."""
import numpy as np
import pytest

from conftest import COMPILED_BACKENDS

pytestmark = pytest.mark.skipif("cython" not in COMPILED_BACKENDS, reason="cython not under test")


def _err(got, ref):
    return np.abs(got - ref).max() / max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_pack_and_multiply_matches_numpy(dtype):
    from fastrnn._cy import layers
    tol = 1e-5 if dtype == np.float32 else 1e-13
    # (n, K, B): one block; B = 1 .. 13 over a ragged panel; several blocks of x rows
    # (256 KiB of x rows per block: 256 rows of K = 256 in float32, 128 in float64) with a
    # last block that ends in a partial tile
    shapes = [(70, 37, B) for B in range(1, 14)] + [(35, 256, 605), (64, 300, 333), (3, 1, 9)]
    for n, K, B in shapes:
        rng = np.random.default_rng(n * 1000 + K + B)
        w = rng.standard_normal((n, K)).astype(dtype)
        v = rng.standard_normal((B, K)).astype(dtype)
        ref = v.astype(np.float64) @ w.T.astype(np.float64)
        wt, vt = np.ascontiguousarray(w.T), np.ascontiguousarray(v.T)
        for threads in (1, 2):
            for wa, va in [(w, v), (wt.T, v), (w, vt.T), (wt.T, vt.T)]:
                out = np.full((B, n), np.nan, dtype)
                layers._pack_and_multiply(wa, va, out, False, threads)
                assert _err(out, ref) < tol, (n, K, B, threads)
                start = rng.standard_normal((B, n)).astype(dtype)
                out = start.copy()
                layers._pack_and_multiply(wa, va, out, True, threads)
                assert _err(out, ref + start) < tol, (n, K, B, threads, "accumulate")


@pytest.mark.parametrize("transposed", [False, True])
def test_packed_product_keeps_nan(transposed):
    from fastrnn._cy import layers
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    v = rng.standard_normal((300, 40)).astype(np.float32)
    v[205, 3] = np.nan
    va = np.ascontiguousarray(v.T).T if transposed else v
    out = np.zeros((300, 70), np.float32)
    layers._pack_and_multiply(w, va, out, False, 2)
    assert np.isnan(out[205]).all()
    assert not np.isnan(np.delete(out, 205, axis=0)).any()
