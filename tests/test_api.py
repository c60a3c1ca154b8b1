"""The layer API: bad input gives errors that name the argument, inputs are never written,
NaN propagates, parameters load and save by PyTorch's names, backends are reported honestly."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastrnn
from fastrnn import dispatch
from conftest import (CELL_OPTIONS, COMPILED_BACKENDS, assert_all_close,
                      check_caller_arrays_untouched, child_python, make_layer, packing,
                      random_state, run_layer, state_parts)


@pytest.fixture
def lstm():
    return fastrnn.LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, backend="reference",
                        seed=0)


def _x(T=5, B=2, I=3, dtype=np.float64):
    return np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)


# -- construction ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(input_size=3, hidden_size=0), "hidden_size"),
    (dict(input_size=0, hidden_size=3), "input_size"),
    (dict(input_size=3, hidden_size=2.5), "hidden_size"),
    (dict(input_size=3, hidden_size=4, num_layers=0), "num_layers"),
    (dict(input_size=3, hidden_size=4, dropout=1.0), "dropout"),
    (dict(input_size=3, hidden_size=4, dropout=-0.1), "dropout"),
    (dict(input_size=3, hidden_size=4, dtype=np.int32), "dtype"),
    (dict(input_size=3, hidden_size=4, dtype=np.float16), "dtype"),
    (dict(input_size=3, hidden_size=4, backend="gpu"), "backend"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        fastrnn.LSTM(**kwargs)


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity.*'tanh' or 'relu'.*'sigmoid'"):
        fastrnn.RNN(3, 4, nonlinearity="sigmoid")


def test_unavailable_backend_says_why_and_does_not_fall_back(monkeypatch):
    monkeypatch.setitem(dispatch._MODULES, "cython", "fastrnn._no_such_extension")
    monkeypatch.setattr(dispatch, "_loaded", {k: v for k, v in dispatch._loaded.items()
                                              if k != "cython"})
    monkeypatch.setattr(dispatch, "_errors", {})
    with pytest.raises(fastrnn.BackendUnavailable, match="cython.*not available.*pip install"):
        fastrnn.GRU(3, 4, backend="cython")
    assert "cython" not in fastrnn.backends()


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    assert fastrnn.LSTM(2, 3).backend == "reference"
    monkeypatch.setenv("FASTRNN_BACKEND", "nonsense")
    with pytest.raises(fastrnn.BackendUnavailable, match="FASTRNN_BACKEND.*nonsense"):
        fastrnn.LSTM(2, 3)


@pytest.mark.parametrize("env, expected", [
    ({}, "10000"),                                   # shorter OpenMP spinning by default
    ({"GOMP_SPINCOUNT": "123"}, "123"),              # the user's choice stays
    ({"OMP_WAIT_POLICY": "active"}, None),           # a policy set: no spin count added
])
def test_openmp_spin_count_default(env, expected):
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", "import os, fastrnn; print(os.environ.get('GOMP_SPINCOUNT'))"],
        capture_output=True, text=True, check=True, **child_python(child_env)).stdout.strip()
    assert out == str(expected)


def test_backends_lists_reference_and_compiled_backends():
    names = fastrnn.backends()
    assert names[0] == "reference"
    assert set(names) <= {"reference", "numba", "cython"}


def test_installed_package_has_every_backend():
    """pip install . must give both compiled backends; a missing one is an install bug."""
    assert set(fastrnn.backends()) == {"reference", "numba", "cython"}, dispatch._errors


# -- bad call arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("x, pattern", [
    (np.zeros((5, 3)), r"x: expected 3 dimensions.*\(5, 3\)"),
    (np.zeros((5, 2, 4)), r"x: expected input_size 3.*\(5, 2, 4\)"),
    (np.zeros((5, 2, 3), dtype=np.int64), "x: expected a floating-point array.*int64"),
    (np.zeros((5, 2, 3), dtype=np.complex128), "x: expected a floating-point.*complex128"),
    (np.zeros((5, 2, 3), dtype=object), "x: expected a floating-point.*object"),
    (np.zeros((0, 2, 3)), "x: expected at least one time step"),
])
def test_bad_x(lstm, x, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lstm(x)


def test_bad_states(lstm):
    x = _x()
    good = np.zeros((4, 2, 4))
    with pytest.raises(TypeError, match=r"state: expected a tuple \(h0, c0\)"):
        lstm(x, good)
    with pytest.raises(ValueError, match=r"state c0: expected shape \(4, 2, 4\), got \(4, 2, 5\)"):
        lstm(x, (good, np.zeros((4, 2, 5))))
    with pytest.raises(TypeError, match="state h0: expected a floating-point array.*int"):
        lstm(x, (good.astype(int), good))
    gru = fastrnn.GRU(3, 4, backend="reference")
    with pytest.raises(TypeError, match=r"state: expected an array of shape \(1, 2, 4\)"):
        gru(x, (good[:1], good[:1]))


@pytest.mark.parametrize("lengths, pattern", [
    ([5, 6], r"lengths: expected values in \[0, 5\].*max 6"),
    ([-1, 2], r"lengths: expected values in \[0, 5\].*min -1"),
    ([5, 5, 5], r"lengths: expected shape \(2,\)"),
    ([2.0, 3.0], "lengths: expected integers, got dtype float64"),
])
def test_bad_lengths(lstm, lengths, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        lstm(_x(), lengths=lengths)


def test_bad_backward_arguments(lstm):
    x = _x()
    _, _, cache = lstm.forward(x)
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 2, 8\)"):
        lstm.backward(np.zeros((5, 2, 4)), cache)
    with pytest.raises(ValueError, match="truncate: expected an int >= 1, got 0"):
        lstm.backward(None, cache, truncate=0)
    with pytest.raises(TypeError, match="cache: expected the cache returned by forward"):
        lstm.backward(None, None)
    with pytest.raises(TypeError, match=r"dstate: expected a tuple \(dh_n, dc_n\)"):
        lstm.backward(None, cache, np.zeros((4, 2, 4)))


# -- semantics -------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_nan_in_gives_nan_out(backend, cell):
    m = make_layer(cell, 3, 4, 2, backend=backend)
    x = _x()
    x[2, 1, 0] = np.nan
    y, final = m(x)
    assert np.isnan(y[2:, 1]).all() and not np.isnan(y[:2]).any() and not np.isnan(y[:, 0]).any()
    assert np.isnan(state_parts(final)[0][:, 1]).all()
    _, _, cache = m.forward(x)
    dx, _ = m.backward(np.ones_like(y), cache)
    assert np.isnan(dx[:, 1]).any() and not np.isnan(dx[:, 0]).any()


@pytest.mark.parametrize("packed", [False, True], ids=["default", "packed"])
@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_caller_arrays_are_never_written(backend, cell, packed):
    if packed and backend == "reference":
        pytest.skip("the reference packs nothing")
    with packing(backend, True) if packed else contextlib.nullcontext():
        check_caller_arrays_untouched(backend, cell)


def test_other_float_dtypes_are_cast_once(backend):
    m64 = make_layer("gru", 3, 4, backend=backend, dtype=np.float64)
    x32 = _x(dtype=np.float32)
    y, _ = m64(x32)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, m64(x32.astype(np.float64))[0])


def test_backward_adds_into_grads(backend):
    m = make_layer("lstm", 3, 4, backend=backend)
    x = _x()
    y, _, cache = m.forward(x)
    dy = np.ones_like(y)
    m.zero_grad()
    m.backward(dy, cache)
    once = {k: g.copy() for k, g in m.grads.items()}
    m.backward(dy, cache)
    for k in once:
        np.testing.assert_allclose(m.grads[k], 2 * once[k], rtol=1e-12)
    m.zero_grad()
    assert all((g == 0).all() for g in m.grads.values())


def test_no_gradient_gives_zeros(backend):
    m = make_layer("gru", 3, 4, backend=backend)
    _, _, cache = m.forward(_x())
    m.zero_grad()
    dx, dh0 = m.backward(None, cache, None)
    assert (dx == 0).all() and (dh0 == 0).all()
    assert all((g == 0).all() for g in m.grads.values())


def test_dropout_only_in_training_and_kept_in_cache(backend):
    m = make_layer("lstm", 3, 4, 3, dropout=0.5, backend=backend)
    x = _x()
    y_infer, _ = m(x)
    y_again, _ = m(x)
    np.testing.assert_array_equal(y_infer, y_again)
    _, _, cache = m.forward(x, train=True)
    assert len(cache.masks) == 2
    for mask in cache.masks:
        assert set(np.unique(mask)) <= {0.0, 2.0} and 0 < (mask == 0).mean() < 1
    y_train, _, _ = m.forward(x, train=True)
    assert not np.allclose(y_train, y_infer)


# -- parameters ------------------------------------------------------------------------------

def test_parameter_names_shapes_and_seeded_init():
    m = fastrnn.GRU(3, 4, 2, bidirectional=True, seed=42, backend="reference")
    assert list(m.params) == [
        f"{kind}_l{k}{suffix}" for k in range(2) for suffix in ("", "_reverse")
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert m.params["weight_ih_l1"].shape == (12, 8)
    assert m.params["bias_hh_l0_reverse"].shape == (12,)
    assert all(p.dtype == np.float32 for p in m.params.values())
    assert max(np.abs(p).max() for p in m.params.values()) <= 0.5
    again = fastrnn.GRU(3, 4, 2, bidirectional=True, seed=42, backend="reference")
    for k in m.params:
        np.testing.assert_array_equal(m.params[k], again.params[k])
    other = fastrnn.GRU(3, 4, 2, bidirectional=True, seed=43, backend="reference")
    assert not np.array_equal(m.params["weight_hh_l0"], other.params["weight_hh_l0"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_and_gradients_start_on_a_cache_line(dtype):
    # 64-byte aligned (the kernels' vector loads); the values are still the seeded draws
    m = fastrnn.LSTM(5, 7, 2, bidirectional=True, dtype=dtype, seed=11, backend="reference")
    for store in (m.params, m.grads):
        for name, p in store.items():
            assert p.ctypes.data % 64 == 0, name
            assert p.flags.c_contiguous and p.flags.writeable and p.dtype == dtype, name
    init_seed, _ = np.random.SeedSequence(11).spawn(2)
    rng, bound = np.random.default_rng(init_seed), 1 / np.sqrt(7)
    for name, p in m.params.items():
        np.testing.assert_array_equal(p, rng.uniform(-bound, bound, p.shape).astype(dtype))
    assert not any(g.any() for g in m.grads.values())


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_layers_deepcopy_and_pickle(backend):
    """A copy (copy.deepcopy, pickle) gives the same numbers, owns its parameters (aligned as
    the original's) and uses the same backend."""
    import copy
    import pickle
    m = fastrnn.GRU(4, 9, 2, dtype=np.float32, seed=2, backend=backend)
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    h0 = np.random.default_rng(1).standard_normal((2, 2, 9)).astype(np.float32)
    want_y, want_h = m(x, h0)
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.backend == m.backend
        for step in (x, x[:1]):             # the general path and the one-step path
            y, h = twin(step, h0)
            wy, wh = m(step, h0)
            np.testing.assert_array_equal(y, wy)
            np.testing.assert_array_equal(h, wh)
        for store in (twin.params, twin.grads):
            assert all(p.ctypes.data % 64 == 0 for p in store.values())
        twin.params["weight_hh_l0"][...] = 0
        assert twin.params["weight_hh_l0"] is not m.params["weight_hh_l0"]
        assert not np.array_equal(twin(x, h0)[0], want_y)
    np.testing.assert_array_equal(m(x, h0)[0], want_y)


def test_state_dict_round_trip_and_errors(lstm):
    saved = lstm.state_dict()
    saved["weight_hh_l0"] += 1            # a copy: the layer is unchanged
    assert not np.array_equal(saved["weight_hh_l0"], lstm.params["weight_hh_l0"])
    other = fastrnn.LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, backend="reference")
    other.load_state_dict({k: v.tolist() for k, v in saved.items()})   # any array-like
    np.testing.assert_array_equal(other.params["weight_hh_l0"], saved["weight_hh_l0"])
    missing = dict(saved)
    del missing["bias_ih_l1_reverse"]
    with pytest.raises(KeyError, match="missing.*bias_ih_l1_reverse"):
        other.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*bogus"):
        other.load_state_dict({**saved, "bogus": np.zeros(3)})
    wrong = {**saved, "weight_ih_l0": np.zeros((16, 4))}
    with pytest.raises(ValueError, match=r"weight_ih_l0.*expected shape \(16, 3\), got \(16, 4\)"):
        other.load_state_dict(wrong)


def test_functional_matches_layer(backend):
    m = make_layer("lstm", 3, 4, backend=backend)
    rng = np.random.default_rng(3)
    x, dy = _x(), rng.standard_normal((5, 2, 4))
    state = random_state(m, 2, rng)
    expected = run_layer(m, x, state, np.array([5, 2]), dy)
    p = m.params
    wide = np.zeros((5, 2, 8))
    y, h_n, c_n, cache = fastrnn.functional.forward(
        "lstm", x, state[0][0], state[1][0], p["weight_ih_l0"], p["weight_hh_l0"],
        p["bias_ih_l0"], p["bias_hh_l0"], lengths=[5, 2], train=True, out=wide[..., 4:],
        backend=backend)
    assert y.base is wide or np.shares_memory(y, wide)
    grads = fastrnn.functional.backward(cache, dy=dy)
    got = {"y": wide[..., 4:], "dx": grads["dx"], "state_n[0]": h_n[None],
           "state_n[1]": c_n[None], "dstate0[0]": grads["dh0"][None],
           "dstate0[1]": grads["dc0"][None], "grad weight_ih_l0": grads["dw_ih"],
           "grad weight_hh_l0": grads["dw_hh"], "grad bias_ih_l0": grads["db_ih"],
           "grad bias_hh_l0": grads["db_hh"]}
    assert_all_close(got, expected, np.float64, "functional")


@pytest.mark.float32_kernels
@pytest.mark.parametrize("step", [False, True], ids=["sequence", "one-step"])
def test_a_replaced_parameter_is_named_by_every_backend(backend, step):
    """A parameter replaced in ``params`` by something unusable: every backend's forward (and
    backward) says which, by its name, instead of a broadcasting error or garbage."""
    rng = np.random.default_rng(11)
    T = 1 if step else 4
    x = rng.standard_normal((T, 2, 5)).astype(np.float32)
    bad = {
        "weight_ih_l0": (np.zeros((4 * 7, 4), np.float32), ValueError, r"\(28, 5\)"),
        "weight_hh_l1_reverse": (np.zeros((4 * 7, 7), np.float64), TypeError, "float32"),
        "bias_hh_l1": ([0.0] * 28, TypeError, "list"),
        "bias_ih_l0": (None, TypeError, "NoneType"),
    }
    for name, (value, error, detail) in bad.items():
        m = fastrnn.LSTM(5, 7, 2, bidirectional=True, backend=backend, seed=1)
        y, _ = m(x)                                   # usable as made
        if value is None:
            del m.params[name]
        else:
            m.params[name] = value
        with pytest.raises(error, match=rf"params\['{name}'\].*{detail}"):
            m(x)
        m.params[name] = np.zeros(m._param_shape[name], np.float32)   # usable again
        _, _, cache = m.forward(x)
        if value is None:
            del m.params[name]
        else:
            m.params[name] = value
        with pytest.raises(error, match=rf"params\['{name}'\]"):
            m.backward(np.ones_like(y), cache)


def test_set_num_threads_takes_numpy_integers_and_refuses_bools():
    before = {name: fastrnn.get_backend(name).get_num_threads()
              for name in fastrnn.backends() if name != "reference"}
    try:
        fastrnn.set_num_threads(np.int64(1))
        for name in before:
            assert fastrnn.get_backend(name).get_num_threads() == 1
        for bad in (True, np.bool_(True), 0, 1.0, "2"):
            with pytest.raises(ValueError, match=r"n: expected an int >= 1"):
                fastrnn.set_num_threads(bad)
    finally:
        for name, n in before.items():
            fastrnn.get_backend(name).set_num_threads(n)


def _openblas_threads(package):
    """Threads of the OpenBLAS bundled in package's wheels (None where it has none)."""
    _, getter = dispatch._openblas_threads_functions(package)
    return None if getter is None else getter()


def test_limit_numpy_blas_threads_sets_numpys_own_blas():
    before = _openblas_threads("numpy")
    if before is None:
        pytest.skip("this NumPy has no bundled OpenBLAS")
    try:
        assert fastrnn.limit_numpy_blas_threads(np.int64(1)) is True
        assert _openblas_threads("numpy") == 1
        with pytest.raises(ValueError, match=r"n: expected an int >= 1, got 0"):
            fastrnn.limit_numpy_blas_threads(0)
    finally:
        fastrnn.limit_numpy_blas_threads(before)


def test_set_num_threads_sets_scipys_blas_without_numba_too():
    """SciPy's BLAS is the cython backend's: set_num_threads sets it whether or not the numba
    backend (whose own setter sets it too) is there; here in a child without Numba."""
    if "cython" not in fastrnn.backends() or _openblas_threads("scipy") is None:
        pytest.skip("no cython backend, or SciPy without a bundled OpenBLAS")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: BLAS keeps one thread whatever is asked")
    code = ("import sys; sys.modules['numba'] = None\n"
            "import fastrnn\n"
            "from fastrnn import dispatch\n"
            "assert 'numba' not in fastrnn.backends(), fastrnn.backends()\n"
            "get = dispatch._openblas_threads_functions('scipy')[1]\n"
            "for n in (1, 2, 1):\n"
            "    fastrnn.set_num_threads(n)\n"
            "    print(get(), fastrnn.get_backend('cython').get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, **child_python())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["1 1", "2 2", "1 1"]


def test_cli_threads_set_scipys_blas_and_quiet_numpys():
    from fastrnn import cli
    if _openblas_threads("numpy") is None or _openblas_threads("scipy") is None:
        pytest.skip("NumPy or SciPy without a bundled OpenBLAS")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: BLAS keeps one thread whatever is asked")
    backend = "cython" if "cython" in fastrnn.backends() else fastrnn.backends()[-1]
    if backend == "reference":
        pytest.skip("no compiled backend")
    kernels = fastrnn.get_backend(backend)
    saved = (_openblas_threads("numpy"), _openblas_threads("scipy"), kernels.get_num_threads())
    try:
        fastrnn.limit_numpy_blas_threads(2)
        cli._set_threads(1, backend)
        cli._quiet_numpy_blas(backend)
        assert (_openblas_threads("numpy"), _openblas_threads("scipy")) == (1, 1)
        fastrnn.limit_numpy_blas_threads(2)
        cli._quiet_numpy_blas("reference")          # NumPy's BLAS is that backend's engine
        assert _openblas_threads("numpy") == 2
    finally:
        fastrnn.limit_numpy_blas_threads(saved[0])
        dispatch._openblas_threads_functions("scipy")[0](saved[1])
        kernels.set_num_threads(saved[2])
