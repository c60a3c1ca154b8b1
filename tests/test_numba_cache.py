"""Numba's cache shared by processes (fastrnn/_numba/cache.py): entries saved at once by several
processes all survive, each under its own signature, and a loop that one process is compiling
is loaded, not compiled again, by another that wants it.

The function compiled here is a small one of a module written for the test, so that each child
compiles in a fraction of a second; its cache folder is put under the backend's locks the way
fastrnn._numba does it for the kernels' folder.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import BACKENDS, child_python

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="the numba backend is not here")

TIMEOUT = 120

MODULE = """
import numba

@numba.njit(cache=True)
def twice(x):
    return x + x
"""

# A child: import the module, put its cache folder under the locks (unless told not to), slow
# down the reading of the index so that children started together all read it before any of
# them writes it (the race, made certain), wait for the start signal, compile one signature,
# report whether it came from the cache.
CHILD = """
import json, os, sys, time
sys.path.insert(0, {folder!r})
import numpy as np
from numba.core import caching
import racemod
from fastrnn._numba import cache
if {locks}:
    cache.install(racemod.twice)
read = caching.IndexDataCacheFile._load_index
def slow_read(self):
    index = read(self)
    time.sleep({delay})
    return index
caching.IndexDataCacheFile._load_index = slow_read
open({ready!r}, "w").close()
while not os.path.exists({start!r}):
    time.sleep(0.01)
value = np.{kind}(3)
result = racemod.twice(value)
stats = racemod.twice.stats
print(json.dumps({{"result": float(result),
                  "signatures": [str(s) for s in racemod.twice.nopython_signatures],
                  "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values())}}))
"""

KINDS = ("float32", "float64", "int64", "int32")
RESULT = {"float32": "float32", "float64": "float64", "int64": "int64", "int32": "int64"}


def _write_module(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "racemod.py").write_text(textwrap.dedent(MODULE))
    return str(folder)


def _children(tmp_path, folder, kinds, locks, delay):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    start = str(tmp_path / "start")
    procs = []
    for i, kind in enumerate(kinds):
        ready = str(tmp_path / f"ready{i}")
        code = CHILD.format(folder=folder, locks=locks, delay=delay, ready=ready, start=start,
                            kind=kind)
        procs.append((subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, **child_python(env)),
                      ready))
    return procs, start


def _wait_ready(procs):
    deadline = time.monotonic() + TIMEOUT
    for proc, ready in procs:
        while not os.path.exists(ready):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "a child never got ready"
            time.sleep(0.02)


def _results(procs):
    out = []
    for proc, _ in procs:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _race(tmp_path, locks):
    """Four processes compile four signatures of one function at once, then a fifth loads
    each: the fifth's reports."""
    folder = _write_module(tmp_path)
    procs, start = _children(tmp_path, folder, KINDS, locks, delay=1.5)
    try:
        _wait_ready(procs)
        open(start, "w").close()
        first = _results(procs)
    finally:
        for proc, _ in procs:
            proc.kill()
    for report, kind in zip(first, KINDS):
        assert report["misses"] == 1 and report["result"] == 6.0, (kind, report)
    os.remove(start)
    later = []
    for kind in KINDS:      # one at a time: each loads what the four left
        procs, start = _children(tmp_path, folder, (kind,), locks, delay=0.0)
        _wait_ready(procs)
        open(start, "w").close()
        later += _results(procs)
        os.remove(start)
    return later


def test_entries_saved_at_once_all_load(tmp_path):
    for report, kind in zip(_race(tmp_path, locks=True), KINDS):
        assert report == {"result": 6.0, "signatures": [f"({kind},) -> {RESULT[kind]}"],
                          "hits": 1, "misses": 0}, kind


def test_the_race_is_real_without_the_locks(tmp_path):
    """The same four children without the locks: entries are lost (compiled again later) or
    name another signature's machine code. If this passes without locks, the test above
    proves nothing."""
    reports = _race(tmp_path, locks=False)
    assert any(r["hits"] != 1 for r in reports), reports


def _run(code, env):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=TIMEOUT, **child_python(env))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_loop_being_compiled_elsewhere_is_loaded(tmp_path):
    """compile_once: while a loop's lock is held (here by this process, standing for one that
    compiles the loop), a child that wants the loop waits; another child then compiles it into
    the cache, the lock is released, and the waiting child loads it instead of compiling."""
    from fastrnn._numba import cache

    folder = _write_module(tmp_path)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    head = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {folder!r})
        import numba, racemod
        from fastrnn._numba import cache
    """)
    cache_folder = _run(head + "print(cache.folder(racemod.twice))", env)
    ready = str(tmp_path / "ready")
    waiter = head + textwrap.dedent(f"""
        open({ready!r}, "w").close()
        cache.compile_once(racemod.twice, (numba.float64,), "twice-float64")
        stats = racemod.twice.stats
        print(json.dumps({{"hits": sum(stats.cache_hits.values()),
                          "misses": sum(stats.cache_misses.values()),
                          "result": racemod.twice(2.5)}}))
    """)
    with cache.file_lock(os.path.join(cache_folder, "twice-float64.lock")):
        child = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, **child_python(env))
        try:
            _wait_ready([(child, ready)])
            time.sleep(1.0)     # unlocked, the child would compile and save in this time
            assert child.poll() is None, child.communicate()
            _run(head + "racemod.twice(1.0)", env)      # compiles float64 into the cache
        except BaseException:
            child.kill()
            raise
    stdout, stderr = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {"hits": 1, "misses": 0,
                                                           "result": 5.0}


# ---------------------------------------------------------------------------------------------
# The "background" compile mode: calls run on the reference while a process compiles the loops

FIRST_CALLS = """
import json
import numpy as np
import fastrnn
from fastrnn import _numba as nb
nb.set_compile_mode("background")
rng = np.random.default_rng(0)
x = rng.standard_normal((6, 3, 4)).astype(np.float32)
out = {}
for backend in ("numba", "reference"):
    m = fastrnn.LSTM(4, 5, 2, bidirectional=True, backend=backend, dtype=np.float32, seed=1)
    y, (h, c) = m(x)
    y_t, _, cache = m.forward(x, train=True)
    dx, _ = m.backward(np.ones_like(y_t), cache)
    step, _ = m(x[:1])
    out[backend] = [a.tolist() for a in (y, h, c, y_t, dx, m.grads["weight_hh_l1"], step)]
    if backend == "numba":
        out["compiling"] = nb.compiling()
        out["loops"] = [name for _, name in nb._background.loops]
        out["queued"] = [name for _, name in nb._queued]
        nb._background.kill()       # the compile itself is not what this test is about
print(json.dumps(out))
"""


def test_first_calls_run_on_the_reference_while_their_loops_compile(tmp_path):
    """With an empty cache, a first inference call, a training call and a one-step call give
    the reference's numbers exactly (they ran on it), while one process compiles the inference
    call's loop and the others wait their turn: training's forward loop (the batch-row one)
    and backward, and the step kernel."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    report = json.loads(_run(FIRST_CALLS, env).splitlines()[-1])
    assert report["numba"] == report["reference"]
    assert report["loops"] == ["forward_units"]
    assert report["queued"] == ["forward_rows", "backward", "step"]
    assert report["compiling"] == [["float32", name] for name in
                                   ("forward_units", "forward_rows", "backward", "step")]


def test_calls_take_the_loop_once_it_is_compiled(monkeypatch):
    """The process started for a loop ends; the next call loads the loop and runs on it. The
    process here compiles nothing (it sleeps), and the cache says it has nothing until then,
    so the loop this test ends up running is the one compiled (or loaded) after it."""
    import numpy as np

    import fastrnn
    from fastrnn import _numba as nb
    from conftest import TOLERANCE

    real_load = nb.cache.load
    monkeypatch.setattr(nb, "_compiled", {})
    monkeypatch.setattr(nb, "_dispatchers", {})
    monkeypatch.setattr(nb, "_tried", set())
    monkeypatch.setattr(nb, "_queued", [])
    monkeypatch.setattr(nb, "_background", None)
    monkeypatch.setattr(nb, "_call_kernels", [None, None])
    monkeypatch.setattr(nb, "_background_command",
                        lambda loops: [sys.executable, "-c", "import time; time.sleep(1)"])
    monkeypatch.setattr(nb.cache, "load", lambda d, s: nb._background is not None
                        and nb._background.poll() is not None and real_load(d, s))
    monkeypatch.setattr(nb, "_compile_mode", "background")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3))
    m = fastrnn.LSTM(3, 4, backend="numba", dtype=np.float64, seed=0)
    ref = fastrnn.LSTM(3, 4, backend="reference", dtype=np.float64, seed=0)
    expected = ref(x)[0]
    np.testing.assert_array_equal(m(x)[0], expected)     # the reference itself ran
    assert nb.compiling() == [("float64", "forward_units")]
    assert nb.wait_compiled(TIMEOUT)
    assert nb.compiling() == []
    got = m(x)[0]
    assert np.max(np.abs(got - expected)) <= TOLERANCE[np.dtype(np.float64)] * np.max(
        np.abs(expected))
    assert (np.dtype(np.float64), "forward_units") in nb._compiled


def test_bad_compile_modes_are_refused_by_name(tmp_path):
    """set_compile_mode and FASTRNN_NUMBA_COMPILE name what they expected and what came; the
    mode in force is left as it was."""
    from fastrnn import _numba as nb

    before = nb.get_compile_mode()
    with pytest.raises(ValueError, match=r"mode: expected one of \('background', 'wait'\), "
                                         r"got 'later'"):
        nb.set_compile_mode("later")
    assert nb.get_compile_mode() == before
    env = dict(os.environ, FASTRNN_NUMBA_COMPILE="soon")
    done = subprocess.run([sys.executable, "-c", "import fastrnn._numba"], capture_output=True,
                          text=True, timeout=TIMEOUT, **child_python(env))
    assert done.returncode != 0
    assert "FASTRNN_NUMBA_COMPILE: expected one of ('background', 'wait'), got 'soon'" \
        in done.stderr
