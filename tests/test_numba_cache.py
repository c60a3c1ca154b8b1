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


def test_the_plain_run_keeps_each_dtype_on_one_worker(request):
    """The README's plain `pytest` runs the Numba tests of each dtype on one worker (conftest's
    groups): a worker of that run sees this test under its group's id, or the groups were lost
    (as they were until the workers were told, each compiling both dtypes' loops)."""
    if "PYTEST_XDIST_WORKER" not in os.environ or not os.environ.get("FASTRNN_TEST_LOADGROUP"):
        pytest.skip("not a worker of the plain two-worker run")
    assert request.node.nodeid.endswith("@numba-float64"), request.node.nodeid
