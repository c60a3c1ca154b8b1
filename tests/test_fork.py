"""Layers, fastrnn.functional and the training toolkit used in worker processes after the parent
ran the compiled kernels on threads: fork, spawn and forkserver pools, ProcessPoolExecutor, and
a layer pickled to a spawned worker. Each worker's results must match the parent's.

GNU OpenMP's thread pool does not survive fork: without the backends' fork handlers a forked
worker hangs (cython) or is killed by Numba ("fork() called from a process already using GNU
OpenMP"), and its pool waits for ever; hence every wait here has a timeout, after which the
pool is terminated and the test fails.

The parent runs every case on THREADS threads with sizes above the backends' thresholds for
threads (README, Backends): packed GEMM-loop training with B*G*H*(H + 64) >= 2^20 (a pool of
every thread), unit-split inference with G*H*H*B >= 2^16, a bidirectional layer whose
directions run at once (2^21 multiply-adds a direction: the helper thread), and a batch above
64 rows (BLAS's threads).
"""
import concurrent.futures
import copy
import multiprocessing
import os

import numpy as np
import pytest

import fastrnn
from fastrnn import functional
from fastrnn.train import Adam, TruncatedBPTT, mse_loss

from conftest import BACKENDS, COMPILED_BACKENDS, assert_all_close

# the layers are float32: their Numba kernels compile with the other float32 ones (conftest)
pytestmark = pytest.mark.float32_kernels

THREADS = 2
TIMEOUT = 120       # seconds for a worker's answer: spawned workers import Numba first
I, H = 32, 128

_layers = {}        # backend -> the layers of the cases, built once per process


def _build(backend):
    if backend not in _layers:
        _layers[backend] = {
            "lstm": fastrnn.LSTM(I, H, backend=backend, seed=1),
            "infer": fastrnn.LSTM(I, 2 * H, backend=backend, seed=2),
            "bilstm": fastrnn.LSTM(I, H, bidirectional=True, backend=backend, seed=3),
            "gru": fastrnn.GRU(I, H // 2, backend=backend, seed=4),
        }
    return _layers[backend]


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "train": rng.standard_normal((16, 32, I)).astype(np.float32),    # packed, pooled
        "dy": rng.standard_normal((16, 32, H)).astype(np.float32),
        "infer": rng.standard_normal((25, 1, I)).astype(np.float32),     # unit-split
        "blas": rng.standard_normal((4, 80, I)).astype(np.float32),      # B > 64: BLAS GEMMs
        "target": rng.standard_normal((16, 32, H)).astype(np.float32),
    }


def _train(m, x, dy):
    y, _, cache = m.forward(x, train=True)
    m.zero_grad()
    dx, _ = m.backward(dy, cache)
    return y, dx, m.grads["weight_hh_l0"].copy()


def _cases(backend):
    """Every case's arrays on this backend, in this process: name -> array."""
    layers, x = _build(backend), _inputs()
    out = {}
    lstm = layers["lstm"]
    out["train y"], out["train dx"], out["train dw_hh"] = _train(lstm, x["train"], x["dy"])
    out["infer y"], (out["infer h"], _) = layers["infer"](x["infer"])
    bilstm = layers["bilstm"]
    out["bi y"], out["bi dx"], out["bi dw_hh"] = _train(
        bilstm, x["train"], np.concatenate([x["dy"], x["dy"]], axis=2))
    gru = layers["gru"]
    out["blas y"], out["blas dx"], out["blas dw_hh"] = _train(
        gru, x["blas"], np.ones((4, 80, H // 2), np.float32))
    p = lstm.params
    zeros = np.zeros((32, H), np.float32)
    y, _, _, cache = functional.forward(
        "lstm", x["train"], zeros, zeros, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
        p["bias_hh_l0"], train=True, backend=backend)
    out["functional y"] = y
    out["functional dw_hh"] = functional.backward(cache, dy=x["dy"])["dw_hh"]
    model = copy.deepcopy(lstm)
    driver = TruncatedBPTT(model, mse_loss, Adam(model.params, lr=1e-2), k1=8)
    driver.run(x["train"], x["target"])
    out["bptt w_hh"] = model.params["weight_hh_l0"]
    return out


def _kernel_threads(backend):
    module = fastrnn.get_backend(backend)
    return module.get_num_threads() if hasattr(module, "get_num_threads") else None


def _worker(backend, threads):
    """In a worker: (the backend's thread count before the call, the cases' results);
    threads: set for the call (None: as they are)."""
    before = {b: _kernel_threads(b) for b in BACKENDS}
    if threads is not None:
        fastrnn.set_num_threads(threads)
    try:
        return before[backend], _cases(backend)
    finally:
        _set_threads(before)


def _set_threads(counts):
    for backend, n in counts.items():
        if n is not None:
            fastrnn.get_backend(backend).set_num_threads(n)


def _worker_pickled(layer, x):
    return layer(x)[0]


@pytest.fixture(scope="module")
def parent():
    """Every backend's results in this process, on THREADS threads, before any pool starts."""
    before = {b: _kernel_threads(b) for b in BACKENDS}
    fastrnn.set_num_threads(THREADS)
    for b in COMPILED_BACKENDS:
        assert _kernel_threads(b) == THREADS
    results = {b: _cases(b) for b in BACKENDS}
    yield results
    _set_threads(before)


_pools = {}


@pytest.fixture(scope="module")
def pools(parent):
    """One pool per start method, each made after the parent ran its kernels."""
    yield _pools
    for pool in _pools.values():
        pool.terminate()
        pool.join()
    _pools.clear()


def _answer(pools, method, func, args):
    """func(*args) in a worker of the method's pool; a pool that does not answer in TIMEOUT
    seconds is terminated and the test fails."""
    if method not in pools:
        # two forked workers; one of the others, which take seconds to start (imports)
        pools[method] = multiprocessing.get_context(method).Pool(2 if method == "fork" else 1)
    pending = pools[method].apply_async(func, args)
    try:
        return pending.get(timeout=TIMEOUT)
    except multiprocessing.TimeoutError:
        pools.pop(method).terminate()
        pytest.fail(f"a {method} worker did not answer in {TIMEOUT} s")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_match_the_parent(parent, pools, method, backend):
    started, results = _answer(pools, method, _worker, (backend, None))
    assert_all_close(results, parent[backend], np.float32, f"{method} worker")
    if method == "fork" and backend != "reference":
        assert started == 1          # a forked worker runs on one thread until told
        # threads of the worker's own (spawned workers have theirs from the start)
        _, results = _answer(pools, method, _worker, (backend, THREADS))
        assert_all_close(results, parent[backend], np.float32, f"fork worker on {THREADS} threads")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_pickled_to_a_spawned_worker(parent, pools, backend):
    layer, x = _build(backend)["infer"], _inputs()["infer"]
    y = _answer(pools, "spawn", _worker_pickled, (layer, x))
    assert_all_close({"infer y": y}, {"infer y": parent[backend]["infer y"]}, np.float32,
                     "pickled layer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_process_pool_executor(parent, backend):
    # the default start method (fork on Linux with Python 3.11-3.13)
    executor = concurrent.futures.ProcessPoolExecutor(max_workers=1)
    try:
        started, results = executor.submit(_worker, backend, None).result(timeout=TIMEOUT)
    except concurrent.futures.TimeoutError:
        for process in executor._processes.values():
            process.kill()
        pytest.fail(f"a ProcessPoolExecutor worker did not answer in {TIMEOUT} s")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    assert_all_close(results, parent[backend], np.float32, "ProcessPoolExecutor worker")


def test_parent_after_fork(parent):
    # the parent's own thread pools, shut down for the forks, come back
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    for backend in COMPILED_BACKENDS:
        assert_all_close(_cases(backend), parent[backend], np.float32, "parent after a fork")
