"""float32 products on the AMX tile unit (kernels/amx.h, called by both compiled backends): each
operand split into three bfloat16 parts, six part products. Against float64 NumPy with a bound
of float32 rounding (a bfloat16 product misses it by 100x or more): every layout, remainder and
block of the product (through the Cython test hook and through fastrnn._numba.amx), NaN, the
switch, and whole layers of every cell against the reference on the tile unit.

Tests that need the tile unit skip on a CPU without it. What runs anywhere can still fail: the
Numba backend reaches the tile unit only through two C symbols (fastrnn/_numba/amx.py), so a
child process can stand an EMULATED tile unit in for kernels/amx.h (a fake amx_export whose two
kernels are NumPy code behind ctypes, counting their calls). Its layers then run their tile-unit
branch on any CPU: compared with the reference, with a count proving the branch ran, and none
when the switch, the environment, float64 or too few rows keep it off."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastrnn

from conftest import (CELL_OPTIONS, CELLS, COMPILED_BACKENDS, assert_all_close, child_python, make_layer,
                      random_state, result_dict)


def _layers():
    if "cython" not in COMPILED_BACKENDS:
        pytest.skip("cython not under test")
    from fastrnn._cy import layers
    return layers


def _needs_amx(backend="cython"):
    kernels = _layers() if backend == "cython" else fastrnn.get_backend(backend)
    if not kernels.amx_available():
        pytest.skip("this CPU (or OS) gives no AMX tile unit")
    return kernels


@pytest.fixture
def amx_on():
    layers = _needs_amx()
    previous = layers.set_amx(True)
    yield
    layers.set_amx(previous)


def _bound_err(got, v, w, start=None):
    """Largest |got - exact| relative to sum |v_i w_i| (+ |start|): float32 rounding of a
    length-K sum is a few 1e-7 of it (measured: 7e-8 to 3e-7 here)."""
    v64, w64 = v.astype(np.float64), w.astype(np.float64)
    exact = v64 @ w64.T
    scale = np.abs(v64) @ np.abs(w64).T
    if start is not None:
        exact = exact + start
        scale = scale + np.abs(start)
    return (np.abs(got - exact) / np.maximum(scale, 1e-300)).max()


# (n weight rows, K terms, B rows of x): ragged panels (32 rows) and tiles (16 output columns),
# K not a multiple of 32, B from one tile row to several 16-row tiles, odd tile counts, and x
# split in several blocks (192 KiB of split rows: 64 rows at K = 512) with a ragged last one
SHAPES = [(70, 37, B) for B in (1, 5, 15, 16, 17, 31, 32, 33, 48)] + \
         [(33, 512, 200), (16, 1, 20), (2048, 64, 32), (40, 1000, 16), (1, 300, 70)]


@pytest.mark.parametrize("n,K,B", SHAPES)
def test_amx_product_is_float32_accurate(amx_on, n, K, B):
    layers = _layers()
    rng = np.random.default_rng(n * 7919 + K * 31 + B)
    w = rng.standard_normal((n, K)).astype(np.float32)
    v = rng.standard_normal((B, K)).astype(np.float32)
    # a wide range of magnitudes: the split must hold for every exponent
    w *= np.exp2(rng.integers(-20, 20, size=(n, K))).astype(np.float32)
    wt, vt = np.ascontiguousarray(w.T), np.ascontiguousarray(v.T)
    for threads in (1, 2):
        for wa, va in [(w, v), (wt.T, v), (w, vt.T), (wt.T, vt.T)]:
            out = np.full((B, n), np.nan, np.float32)
            layers._pack_and_multiply(wa, va, out, False, threads, True)
            assert _bound_err(out, v, w) < 5e-7, (n, K, B, threads)
            start = rng.standard_normal((B, n)).astype(np.float32)
            out = start.copy()
            layers._pack_and_multiply(wa, va, out, True, threads, True)
            assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads, "accumulate")


def test_amx_product_is_not_plain_bfloat16(amx_on):
    # the bound above is tight enough to tell: one bfloat16 product (or a0 b0 + a0 b1 + a1 b0)
    # misses it by orders of magnitude
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    v = rng.standard_normal((32, 256)).astype(np.float32)

    def bf16(a):
        return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

    assert _bound_err(bf16(v).astype(np.float64) @ bf16(w).T.astype(np.float64), v, w) > 1e-4
    out = np.zeros((32, 64), np.float32)
    _layers()._pack_and_multiply(w, v, out, False, 2, True)
    assert _bound_err(out, v, w) < 5e-7


@pytest.mark.parametrize("where", ["x", "w", "x-columns"])
def test_amx_product_keeps_nan(amx_on, where):
    # NaN exactly where one operand has it, and float32-accurate numbers everywhere else
    rng = np.random.default_rng(1)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    v = rng.standard_normal((100, 40)).astype(np.float32)
    out = np.zeros((100, 70), np.float32)
    if where == "w":
        w[13, 7] = np.nan
        _layers()._pack_and_multiply(w, v, out, False, 2, True)
        assert np.isnan(out[:, 13]).all()
        rest = np.delete(out, 13, axis=1)
        assert _bound_err(rest, v, np.delete(w, 13, axis=0)) < 5e-7
        return
    v[61, 3] = np.nan
    va = np.ascontiguousarray(v.T).T if where == "x-columns" else v
    _layers()._pack_and_multiply(w, va, out, False, 2, True)
    assert np.isnan(out[61]).all()
    assert _bound_err(np.delete(out, 61, axis=0), np.delete(v, 61, axis=0), w) < 5e-7


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_amx_switch_refuses_anything_but_a_bool(backend):
    kernels = fastrnn.get_backend(backend)
    previous = kernels.get_amx()
    try:
        for bad in ("no", 0, None):
            with pytest.raises(TypeError, match="on: expected True or False"):
                kernels.set_amx(bad)
            assert kernels.get_amx() is previous                       # left as it was
        assert kernels.set_amx(np.False_) is previous and kernels.get_amx() is False
    finally:
        kernels.set_amx(previous)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_amx_switch_turns_the_tile_unit_on_and_off(backend):
    # (the Numba backend's switch on any CPU: test_numba_layers_on_an_emulated_tile_unit)
    kernels = _needs_amx(backend)
    previous = kernels.get_amx()
    try:
        assert kernels.set_amx(False) is previous and kernels.get_amx() is False
        assert kernels.set_amx(True) is False and kernels.get_amx() is True
        assert kernels.set_amx(False) is True and kernels.get_amx() is False
    finally:
        kernels.set_amx(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_amx_hook_takes_float32_only_and_only_on_a_tile_unit(dtype):
    # the same product off the tile unit works for both dtypes: the refusal is the tile unit's
    layers = _layers()
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 33)).astype(dtype)
    v = rng.standard_normal((20, 33)).astype(dtype)
    out = np.zeros((20, 40), dtype)
    layers._pack_and_multiply(w, v, out, False, 1, False)
    assert _bound_err(out, v, w) < (5e-7 if dtype == np.float32 else 1e-15)
    if dtype == np.float32 and layers.amx_available():
        out[...] = 0
        layers._pack_and_multiply(w, v, out, False, 1, True)
        assert _bound_err(out, v, w) < 5e-7
    else:
        out[...] = 0
        with pytest.raises(ValueError, match="amx: the tile unit takes float32 only"):
            layers._pack_and_multiply(w, v, out, False, 1, True)
        assert not out.any(), "refused, yet wrote"


def _get_amx_in_a_child(backend, environment, emulated=False):
    env = dict(os.environ)
    env.pop("FASTRNN_AMX", None)
    if environment is not None:
        env["FASTRNN_AMX"] = environment
    code = (EMULATED_TILE_UNIT if emulated else "") + textwrap.dedent(f"""
        import fastrnn
        kernels = fastrnn.get_backend({backend!r})
        print(kernels.amx_available(), kernels.get_amx())
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         **child_python(env))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


ENVIRONMENTS = [(None, "True"), ("1", "True"), ("0", "False"), (" 0 ", "False")]


@pytest.mark.parametrize("environment,on", ENVIRONMENTS, ids=["unset", "1", "0", "0-spaces"])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_amx_from_the_environment(backend, environment, on):
    # on a CPU without the tile unit: the Numba backend on the emulated one, Cython skips
    emulated = not fastrnn.get_backend(backend).amx_available()
    if emulated and backend != "numba":
        pytest.skip("this CPU (or OS) gives no AMX tile unit")
    assert _get_amx_in_a_child(backend, environment, emulated) == ["True", on]


@pytest.mark.parametrize("n,K,B", SHAPES)
def test_numba_amx_products_are_float32_accurate(n, K, B):
    if "numba" not in COMPILED_BACKENDS:
        pytest.skip("numba not under test")
    _needs_amx("numba")
    from fastrnn._numba import amx
    rng = np.random.default_rng(n * 7919 + K * 31 + B + 1)
    w = rng.standard_normal((n, K)).astype(np.float32)
    v = rng.standard_normal((B, K)).astype(np.float32)
    w *= np.exp2(rng.integers(-20, 20, size=(n, K))).astype(np.float32)
    flat = np.empty(amx.packed_size(n, K), np.float32)
    for threads in (1, 2):
        # rows of w and v, or columns (transposed views, as backward and the gradients pass)
        for wa, va in [(w, v), (np.ascontiguousarray(w.T).T, np.ascontiguousarray(v.T).T)]:
            start = rng.standard_normal((B, n)).astype(np.float32)
            out = start.copy()
            amx.pack_and_multiply(threads, wa, n, va, out, True, flat)
            assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads)
            out = np.full((B, n), np.nan, np.float32)
            amx.pack_parts(threads, wa, 0, n, flat)
            amx.product_parts(threads, flat, n, va, out, 0, False)
            assert _bound_err(out, v, w) < 5e-7, (n, K, B, threads, "parts")
    # the weight gradient: out (B, n) += v^T-side sums over rows, d = v^T laid out (K, B)
    d, e = np.ascontiguousarray(v.T), np.ascontiguousarray(w.T)       # (K, B), (K, n)
    start = rng.standard_normal((B, n)).astype(np.float32)
    for threads in (1, 2):
        out = start.copy()
        grad_flat = np.empty(amx.packed_size(n, 256), np.float32)
        amx.weight_gradient(threads, d, e, out, grad_flat)
        assert _bound_err(out, v, w, start) < 5e-7, (n, K, B, threads, "gradient")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("B", [16, 20])
@pytest.mark.parametrize("dtype,on", [(np.float32, True), (np.float32, False),
                                      (np.float64, False)], ids=["f32-amx", "f32-avx", "f64"])
def test_layers_on_and_off_the_tile_unit_match_the_reference(backend, cell, B, dtype, on):
    # B = 16: inference takes the unit-split loop (its input projection on the tile unit),
    # training the packed GEMM loop with every product on it; B = 20: a ragged tile.
    # Off (and float64, which never takes it): the AVX path of the same calls, which the rest
    # of the suite, with the tile unit on by default, meets only below 16 rows
    kernels = _needs_amx(backend) if on else fastrnn.get_backend(backend)
    previous = kernels.set_amx(on)
    try:
        results = _compare_layers_with_the_reference(backend, cell, B, dtype)
        if on:  # the tile unit ran: its sums, in another order, differ from AVX's in some bits
            kernels.set_amx(False)
            off = _compare_layers_with_the_reference(backend, cell, B, dtype)
            assert any(not np.array_equal(results[k], off[k]) for k in results), \
                "the same bits with the tile unit on and off"
    finally:
        kernels.set_amx(previous)


def _compare_layers_with_the_reference(backend, cell, B, dtype):
    T, I, H = 9, 40, 48          # T*B >= 128: both backends pack (numba's limit)
    rng = np.random.default_rng(B)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    dy = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    results = []
    for name in ("reference", backend):
        layer = make_layer(cell, I, H, num_layers=2, bidirectional=True, dtype=dtype,
                           seed=3, backend=name)
        state = random_state(layer, B, np.random.default_rng(7))
        y, final, cache = layer.forward(x, state, lengths)
        layer.zero_grad()
        dx, dstate0 = layer.backward(dy, cache)
        y_infer, final_infer = layer(x, state, lengths)
        results.append(result_dict(y, dx, final, dstate0, layer.grads))
        results[-1]["y_infer"] = y_infer
    assert_all_close(results[1], results[0], dtype, f"{backend} {cell} B={B} {np.dtype(dtype)}")
    return results[1]


# A stand-in for kernels/amx.h's two kernels, in NumPy behind ctypes, installed as the extension
# fastrnn._numba.amx takes their addresses from. Packed layout: amx.h's panel offsets (32 rows a
# panel, 48 * ceil(k/32)*32 floats each), a row's k floats at (row % 32) * ceil(k/32)*32 in its
# panel; the product in float64, rounded once. CALLS counts the calls of each kernel.
EMULATED_TILE_UNIT = textwrap.dedent("""
    import ctypes, sys, types
    import numpy as np

    CALLS = {"pack": 0, "product": 0}
    _FLOATS = ctypes.POINTER(ctypes.c_float)

    def _floats(address, last):
        return np.ctypeslib.as_array(ctypes.cast(address, _FLOATS), shape=(last + 1,))

    def _matrix(address, rows, cols, row_step, col_step):
        flat = _floats(address, (rows - 1) * row_step + (cols - 1) * col_step)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (4 * row_step, 4 * col_step))

    def _packed_rows(packed, rows, k):
        k_padded = -(-k // 32) * 32
        r = np.arange(rows)
        at = (r // 32 * 48 * k_padded + r % 32 * k_padded)[:, None] + np.arange(k)
        return _floats(packed, int(at.max())), at

    def _pack(w, rs, cs, rows, k, packed):
        CALLS["pack"] += 1
        if rows > 0 and k > 0:
            flat, at = _packed_rows(packed, rows, k)
            flat[at] = _matrix(w, rows, k, rs, cs)

    def _product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate):
        CALLS["product"] += 1
        if rows > 0 and nx > 0:
            flat, at = _packed_rows(packed, rows, k)
            result = _matrix(x, nx, k, ldx, incx).astype(np.float64) @ flat[at].T.astype(np.float64)
            o = _matrix(out, nx, rows, ldo, 1)
            o[...] = (result + o if accumulate & 0xFFFFFFFF else result).astype(np.float32)

    _KERNELS = [ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * n)(f) for n, f in
                [(6, _pack), (10, _product)]]
    _module = types.ModuleType("fastrnn._cy.amx_export")
    _module.available = lambda: True
    _module.addresses = lambda: {name: ctypes.cast(f, ctypes.c_void_p).value
                                 for name, f in zip(["pack", "product"], _KERNELS)}
    sys.modules["fastrnn._cy.amx_export"] = _module
    """)

# Every cell on the emulated tile unit against the reference (training and inference, a full
# and a ragged tile of rows), then the calls it must leave to AVX: none with the switch off,
# float64, or fewer rows than a tile.
_EMULATED_LAYERS = """
import json
import numpy as np
import fastrnn
from fastrnn.cells import CELLS
kernels = fastrnn.get_backend("numba")
assert kernels.amx_available() and kernels.get_amx(), "the emulated unit is not in use"
OPTIONS = json.loads(OPTIONS_JSON)     # tests/conftest.py's CELL_OPTIONS

def run(cell, backend, T, B, dtype):
    rng = np.random.default_rng(B)
    cls_name, options = OPTIONS[cell]
    layer = getattr(fastrnn, cls_name)(40, 48, 2, bidirectional=True, dtype=dtype, seed=3,
                                       backend=backend, **options)
    x = rng.standard_normal((T, B, 40)).astype(dtype)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    state = tuple(rng.standard_normal((4, B, 48)).astype(dtype)
                  for _ in layer.cell.state_names)
    state = state if len(state) == 2 else state[0]
    CALLS.update(pack=0, product=0)
    y, final, cache = layer.forward(x, state, lengths, train=True)
    dx, _ = layer.backward(rng.standard_normal(y.shape).astype(dtype), cache)
    y_infer, _ = layer(x, state, lengths)
    return [y, dx, y_infer] + list(layer.grads.values()), dict(CALLS)

def error(got, want):
    return max(float(np.abs(g - w).max() / max(1.0, np.abs(w).max()))
               for g, w in zip(got, want))

report = {}
for cell in sorted(CELLS):
    for B in (16, 20):
        got, calls = run(cell, "numba", 9, B, np.float32)
        want, _ = run(cell, "reference", 9, B, np.float32)
        report[f"{cell} B={B}"] = [error(got, want), calls["pack"], calls["product"]]
report["float64"] = run("lstm", "numba", 9, 16, np.float64)[1]["product"]
report["B=1, T=9"] = run("gru", "numba", 9, 1, np.float32)[1]["product"]
assert kernels.set_amx(False) is True and kernels.get_amx() is False
report["switched off"] = run("lstm", "numba", 9, 16, np.float32)[1]["product"]
assert kernels.set_amx(True) is False and kernels.get_amx() is True
report["switched on again"] = run("lstm", "numba", 9, 16, np.float32)[1]["product"]
print(json.dumps(report))
"""


def test_numba_layers_on_an_emulated_tile_unit():
    if "numba" not in COMPILED_BACKENDS:
        pytest.skip("numba not under test")
    options = {cell: (cls.__name__, opts) for cell, (cls, opts) in CELL_OPTIONS.items()}
    out = subprocess.run([sys.executable, "-c", EMULATED_TILE_UNIT
                          + f"OPTIONS_JSON = {json.dumps(options)!r}\n" + _EMULATED_LAYERS],
                         capture_output=True, text=True, **child_python())
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    for case in [f"{cell} B={B}" for cell in sorted(CELLS) for B in (16, 20)]:
        err, packs, products = report[case]
        assert packs > 0 and products > 0, f"{case}: the tile-unit branch did not run"
        assert err <= 1e-4, f"{case}: relative error {err:.3g} on the emulated tile unit"
    assert report["switched on again"] > 0
    for case in ("float64", "B=1, T=9", "switched off"):
        assert report[case] == 0, f"{case}: {report[case]} products on the tile unit"


def test_numba_without_the_extension_runs_without_the_tile_unit():
    # the Numba backend takes the tile unit's kernels from the Cython extension; without it
    # (not built) its loops still compile and run, on AVX, and say so
    if "numba" not in COMPILED_BACKENDS:
        pytest.skip("numba not under test")
    code = """
import sys
sys.modules["fastrnn._cy.amx_export"] = None        # as if the extension were not built
import numpy as np, fastrnn
kernels = fastrnn.get_backend("numba")
assert not kernels.amx_available() and not kernels.get_amx()
assert kernels.set_amx(True) is False and not kernels.get_amx()
rng = np.random.default_rng(0)
ref = fastrnn.GRU(6, 16, backend="reference", dtype=np.float32, seed=1)
m = fastrnn.GRU(6, 16, backend="numba", dtype=np.float32, seed=1)
x = rng.standard_normal((10, 20, 6)).astype(np.float32)
for layer in (ref, m):
    y, _, cache = layer.forward(x)
    layer.backward(np.ones_like(y), cache)
np.testing.assert_allclose(m(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(m.grads["weight_hh_l0"], ref.grads["weight_hh_l0"], rtol=1e-4, atol=1e-5)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         **child_python())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
