"""Shared test helpers: the backends under test, tolerances per dtype, building and running layers.

Every test that runs kernels takes the ``backend`` fixture, so the whole suite runs once per
available backend. ``FASTRNN_TEST_BACKENDS=numba,cython`` restricts the list (CI uses it to run
the suite per backend); by default every backend available here is tested.
"""
import contextlib
import os
import re
import zlib

# The Numba tests test the compiled loops: a call waits for its loop to compile instead of
# running on the reference while another process compiles it (fastrnn._numba's "background"
# mode, which test_numba_cache.py tests). Set before fastrnn is imported, and inherited by the
# tests' child processes.
os.environ["FASTRNN_NUMBA_COMPILE"] = "wait"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402

# relative to the largest magnitude of the reference array, with a floor for tiny arrays
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def backends_under_test():
    available = fastrnn.backends()
    wanted = os.environ.get("FASTRNN_TEST_BACKENDS", "").strip()
    if not wanted:
        return available
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    missing = [n for n in names if n not in available]
    if missing:  # asked to test a backend that isn't there: fail loudly, don't skip
        raise RuntimeError(f"FASTRNN_TEST_BACKENDS asks for {missing}, not available here "
                           f"(available: {available})")
    return names


# The folder holding the fastrnn this process imported (site-packages when installed, the
# checkout when built in place). A child Python must import the same one: run from the checkout,
# its '' entry would pick the source tree, which has no compiled extensions after `pip install .`.
FASTRNN_HOME = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))


def child_python(env=None):
    """Keyword arguments for subprocess.run / Popen so a child Python imports this fastrnn."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (FASTRNN_HOME, env.get("PYTHONPATH")) if p)
    return {"cwd": FASTRNN_HOME, "env": env}


BACKENDS = backends_under_test()
COMPILED_BACKENDS = [b for b in BACKENDS if b != "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# cell name -> (layer class, keyword options)
CELL_OPTIONS = {
    "rnn_tanh": (fastrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"}),
    "lstm": (fastrnn.LSTM, {}),
    "lstm_peephole": (fastrnn.LSTM, {"peephole": True}),
    "gru": (fastrnn.GRU, {"reset_after": True}),
    "gru_reset_before": (fastrnn.GRU, {"reset_after": False}),
}
assert set(CELL_OPTIONS) == set(CELLS), "a new cell needs its layer options here"


def make_layer(cell, input_size, hidden_size, num_layers=1, *, backend="reference",
               dtype=np.float64, seed=0, **options):
    cls, cell_options = CELL_OPTIONS[cell]
    return cls(input_size, hidden_size, num_layers, backend=backend, dtype=dtype, seed=seed,
               **cell_options, **options)


def random_state(m, B, rng, scale=0.5):
    shape = (m.num_layers * m.num_directions, B, m.hidden_size)
    parts = tuple((scale * rng.standard_normal(shape)).astype(m.dtype)
                  for _ in m.cell.state_names)
    return parts if m.cell.has_cell_state else parts[0]


def state_parts(state):
    return list(state) if isinstance(state, tuple) else [state]


def state_arg(parts):
    """A state as the layers take it: (h, c) for an LSTM, h alone for the others."""
    return tuple(parts) if len(parts) == 2 else parts[0]


def layer_arrays(m, T, B, rng):
    """Random x, initial state (a tuple of parts, h as wide as the layer's output h: proj_size's
    when it has one), dy and dstate (the same shapes) in m's dtype."""
    L, D = m.num_layers, m.num_directions
    widths = (m._h_size, m.hidden_size)[:len(m.cell.state_names)]
    state = tuple((0.5 * rng.standard_normal((L * D, B, w))).astype(m.dtype) for w in widths)
    x = rng.standard_normal((T, B, m.input_size)).astype(m.dtype)
    dy = rng.standard_normal((T, B, m.output_size)).astype(m.dtype)
    dstate = tuple(rng.standard_normal(s.shape).astype(m.dtype) for s in state)
    return x, state, dy, dstate


def torch_loop_results(torch, y, finals, leaves, dy=None, dstate=None):
    """A PyTorch loop oracle's outputs as run_layer's dict: y and state_n[s] (finals[s], one
    tensor per layer and direction, stacked) and, given dy, the gradients of sum(y * dy) +
    sum(state_n[s] * dstate[s]): dx, dstate0[s] and "grad " + every parameter's name.
    leaves = (x, state0 parts, {name: parameter}), the tensors that require grad."""
    xt, s0, P = leaves
    result = {"y": y}
    for s in range(len(s0)):
        result[f"state_n[{s}]"] = torch.stack(finals[s])
    if dy is not None:
        loss = (y * torch.tensor(dy)).sum() + sum(
            (result[f"state_n[{s}]"] * torch.tensor(dstate[s])).sum() for s in range(len(s0)))
        loss.backward()
    result = {key: v.detach().numpy() for key, v in result.items()}
    if dy is not None:
        result["dx"] = xt.grad.numpy()
        for s in range(len(s0)):
            result[f"dstate0[{s}]"] = s0[s].grad.numpy()
        for name, p in P.items():
            result["grad " + name] = p.grad.numpy()
    return result


def run_layer(m, x, state=None, lengths=None, dy=None, dstate=None, truncate=None):
    """Forward with the cache and backward; every output and gradient in a flat dict."""
    y, final, cache = m.forward(x, state, lengths, train=True)
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate, truncate=truncate)
    return result_dict(y, dx, final, dstate0, m.grads)


def result_dict(y, dx, final, dstate0, grads):
    """Outputs, final states, input and initial-state gradients and a copy of every parameter
    gradient, in one flat dict keyed the same way for every implementation compared."""
    result = {"y": y, "dx": dx}
    for i, part in enumerate(state_parts(final)):
        result[f"state_n[{i}]"] = part
    for i, part in enumerate(state_parts(dstate0)):
        result[f"dstate0[{i}]"] = part
    for name, g in grads.items():
        result["grad " + name] = g.copy()
    return result


def central_difference(f, arr, h=1e-6):
    """d f / d arr by central differences; ``arr`` (the test's own float64 array) is perturbed
    in place and restored."""
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2 * h)
    return grad


def stable_seed(*parts):
    """A seed made of ``parts`` (strings, numbers, tuples of them) that is the same in every
    process: hash() of a str is not (PYTHONHASHSEED), which made the data of a test differ from
    run to run."""
    return zlib.crc32(repr(parts).encode())


def max_rel_error(actual, expected):
    """Largest absolute difference over the largest magnitude of ``expected`` (floor 1)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = max(1.0, float(np.nanmax(np.abs(expected))))
    same_nan = np.isnan(actual) == np.isnan(expected)
    assert same_nan.all(), "NaN in different places"
    diff = np.abs(np.nan_to_num(actual) - np.nan_to_num(expected))
    return float(diff.max()) / scale


def assert_all_close(actual, expected, dtype, what=""):
    """Compare two result dicts key by key at the tolerance of ``dtype``; returns worst error."""
    assert actual.keys() == expected.keys()
    tol = TOLERANCE[np.dtype(dtype)]
    worst = 0.0
    for key in expected:
        err = max_rel_error(actual[key], expected[key])
        assert err <= tol, f"{what} {key}: relative error {err:.3g} > {tol:g}"
        worst = max(worst, err)
    return worst


@contextlib.contextmanager
def small_batch_max(backend_name, value):
    """The backend's small_batch_max set to ``value`` for inference and for training."""
    kernels = fastrnn.get_backend(backend_name)
    old = [kernels.get_small_batch_max(train=train) for train in (False, True)]
    for train in (False, True):
        kernels.set_small_batch_max(value, train=train)
    try:
        yield
    finally:
        for train, n in zip((False, True), old):
            kernels.set_small_batch_max(n, train=train)


@contextlib.contextmanager
def packing(backend_name, on):
    """The compiled backend's products over weights packed once per call (``_set_pack_limits``)
    forced on for every call (on=True) or off (on=False) while the block runs."""
    kernels = fastrnn.get_backend(backend_name)
    old = kernels._set_pack_limits(0, 2**62) if on else kernels._set_pack_limits(2**62, 0)
    try:
        yield
    finally:
        kernels._set_pack_limits(*old)



# Numba compiles each of its loops once per dtype, most of this suite's time when its cache is
# cold (about 350 s a dtype on a 2-core machine). The Numba tests go to two groups by the dtype
# they run, and the plain run keeps each group on one worker (xdist_groups.py; the xdist_group
# marks serve an explicit `--dist loadgroup`), so the two dtypes compile at the same time on
# two cores. A test whose dtype is not among its parameters
# goes with float64, make_layer's default, unless it is marked ``float32_kernels``. The workers
# share one Numba cache (fastrnn/_numba/cache.py makes that safe): a test in the wrong group
# still passes, and waits for the other worker to compile the loop it wants, then loads it. A
# test runs one dtype's kernels only.
_NUMBA_FILES = ("test_numba_panel.py", "test_numba_pool.py", "test_amx.py",
                "test_numba_cache.py")


def _param_dtype(value):
    if isinstance(value, str):
        return value if value in ("float32", "float64") else None
    if isinstance(value, (type, np.dtype)) and value in (np.float32, np.float64):
        return np.dtype(value).name
    return None


def numba_group(item):
    """The xdist group of a test that runs Numba kernels ("numba-float32" or "numba-float64"),
    None for the others."""
    callspec = getattr(item, "callspec", None)
    values = list(callspec.params.values()) if callspec else []
    float32_marked = item.get_closest_marker("float32_kernels") is not None
    if not any(isinstance(v, str) and v == "numba" for v in values) \
            and item.path.name not in _NUMBA_FILES and not float32_marked:
        return None
    dtypes = {_param_dtype(v) for v in values} - {None}
    dtypes |= {{"f32": "float32", "f64": "float64"}.get(part)
               for part in re.split(r"[-\[\]_]", item.name)} - {None}
    if float32_marked:
        dtypes.add("float32")
    assert len(dtypes) <= 1, f"{item.nodeid}: Numba kernels of both dtypes in one test"
    return "numba-float32" if dtypes == {"float32"} else "numba-float64"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "float32_kernels: the test runs Numba kernels in float32 though no parameter "
        "says so (see numba_group)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """A plain ``pytest`` (the suite from its testpaths, no -n given) runs on two pytest-xdist
    workers with the groups above; ``pytest -n 0`` runs it in one process, and a run of named
    files or tests stays in one process unless -n says otherwise. (Called for this conftest
    because pyproject.toml's testpaths make it an initial one; before xdist's own hook.)"""
    if (getattr(config.option, "numprocesses", "absent") is None
            and "PYTEST_XDIST_WORKER" not in os.environ     # a worker starts no workers
            and config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not config.option.collectonly and not config.option.usepdb):
        config.option.numprocesses = 2
        import xdist_groups     # pytest-xdist's: only where it runs
        xdist_groups.start(config)
        if hasattr(config.option, "benchmark_disable"):
            config.option.benchmark_disable = True     # no test times anything (bench/ does)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = numba_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if "PYTEST_XDIST_WORKER" in os.environ:
        import xdist_groups
        xdist_groups.write(items, numba_group)


def check_caller_arrays_untouched(backend, cell, **options):
    """A two-layer bidirectional layer's forward and backward, with lengths and padding NaN,
    on read-only caller arrays: each left as it was, the padding's outputs zero."""
    m = make_layer(cell, 3, 4, 2, bidirectional=True, backend=backend, **options)
    rng = np.random.default_rng(1)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    x[4, 1] = np.nan                       # padding: ignored, and left as it is
    lengths = np.array([5, 3])
    state, dstate = random_state(m, 2, rng), random_state(m, 2, rng)
    dy = rng.standard_normal((5, 2, 8))
    originals = [a.copy() for a in [x, lengths, dy] + state_parts(state) + state_parts(dstate)]
    arrays = [x, lengths, dy] + state_parts(state) + state_parts(dstate)
    for a in arrays:
        a.flags.writeable = False           # read-only arrays are accepted, too
    result = run_layer(m, x, state, lengths, dy, dstate)
    for a, original in zip(arrays, originals):
        np.testing.assert_array_equal(a, original)
    assert not np.isnan(result["y"]).any() and not np.isnan(result["grad weight_ih_l0"]).any()
    assert (result["y"][3:, 1] == 0).all() and (result["dx"][3:, 1] == 0).all()
