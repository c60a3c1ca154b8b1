"""The plain `pytest` keeps each group of tests on one worker (xdist_groups.py), which is how
the Numba tests of each dtype compile their loops once, on one worker each, at the same time.

A run of its own on a small tree: two groups whose tests alternate in collection order with
each other and with tests in no group, on two workers; each test records its worker.
"""
import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import os, sys
sys.path.insert(0, {TESTS!r})
import pytest
import xdist_groups

def group_of(item):
    i = item.callspec.params.get("i") if hasattr(item, "callspec") else None
    return None if i is None or i % 3 == 2 else "ab"[i % 3]

@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if "PYTEST_XDIST_WORKER" not in os.environ and config.option.numprocesses is None:
        config.option.numprocesses = 2
        xdist_groups.start(config)

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    xdist_groups.write(items, group_of)
"""

TEST = """
import os, pytest

@pytest.mark.parametrize("i", range(60))
def test_mixed(i):
    group = "ab"[i % 3] if i % 3 < 2 else "-"
    with open(os.environ["GROUPS_LOG"], "a") as f:
        f.write(f"{group} {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""


def test_each_group_runs_on_one_worker_and_the_two_apart(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = t\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "t" / "test_mixed.py").write_text(textwrap.dedent(TEST))
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "FASTRNN_TEST_GROUPS"))}
    env["GROUPS_LOG"] = str(log)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {}
    for line in log.read_text().splitlines():
        group, worker = line.split()
        workers.setdefault(group, set()).add(worker)
    assert sum(1 for _ in log.read_text().splitlines()) == 60
    assert len(workers["a"]) == 1 and len(workers["b"]) == 1, workers
    assert workers["a"] != workers["b"], workers
