"""The README's benchmark commands, run as a user pastes them from a fresh clone.

The commands are the lines of the ```sh blocks of the README's "## Benchmarks" section, run one
after another, literally, through bash in a clean copy of the tree (tracked files only: no
compiled extension, no Numba cache, no saved benchmarks), by the Python running this test, with
the fastrnn installed here. Its ``pip install`` lines are not run (this test runs after the
package is installed: `pip install .` in CI's fresh virtual environment, editable here); the
others must time the installed package on every compiled backend it has (and PyTorch where the
command asks for it). To stay cheap, the environment holds FASTRNN_BENCH_QUICK=1 (3 calls a
benchmark, ``bench.report --quick``) and FASTRNN_BENCH_CASES with one small case, as the README
documents; nothing is added to the commands.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import fastrnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "lstm-step-128"
# what a clean clone lacks: build products, caches and saved runs (.gitignore's entries)
NOT_IN_A_CLONE = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "build", "*.egg-info",
                                        ".benchmarks", ".pytest_cache", "*.nbi", "*.nbc", "*.npz",
                                        ".git")


def benchmark_commands(readme):
    """The command lines of the ```sh blocks in the README's Benchmarks section, in order."""
    match = re.search(r"^## Benchmarks\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert match, "README.md has no '## Benchmarks' section"
    blocks = re.findall(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def clean_copy(destination):
    """The tree as a fresh clone has it: git's tracked (and new, not ignored) files when this is
    a git checkout; otherwise (CI's copy) everything but what .gitignore leaves out."""
    if os.path.isdir(os.path.join(REPO, ".git")):
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=REPO, capture_output=True,
                                check=True).stdout.decode().split("\0")
        for name in filter(None, listed):
            source = os.path.join(REPO, name)
            if os.path.isfile(source):     # skip files deleted but not committed
                os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
                shutil.copy2(source, os.path.join(destination, name))
    else:
        shutil.copytree(REPO, destination, ignore=NOT_IN_A_CLONE)


def timed_here(command, compiled):
    """The implementations ``command`` should time: FASTRNN_BENCH_BACKENDS when it sets it,
    else the compiled backends, and PyTorch and ONNX Runtime too for bench.report (CASE is a
    step case: ONNX Runtime times it)."""
    named = re.search(r"FASTRNN_BENCH_BACKENDS=(\S+)", command)
    if named:
        return named.group(1).split(",")
    have_torch = importlib.util.find_spec("torch") is not None
    have_ort = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    with_torch = "bench.report" in command and "--no-torch" not in command and have_torch
    with_ort = "bench.report" in command and "--no-ort" not in command and have_ort
    return (["torch"] if with_torch else []) + (["onnxruntime"] if with_ort else []) + compiled


@pytest.mark.float32_kernels          # the commands' Numba cases, in children
def test_readme_benchmark_commands_time_every_backend_of_the_installed_package(tmp_path):
    try:
        importlib.metadata.distribution("fastrnn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastrnn is not installed (pip install .): the README's commands assume it")
    with open(os.path.join(REPO, "README.md")) as f:
        commands = benchmark_commands(f.read())
    assert commands, "the README's Benchmarks section has no ```sh block of commands"
    installs = [c for c in commands if c.startswith("pip install")]
    assert installs == ['pip install ".[bench]"'], installs
    compiled = [b for b in fastrnn.backends() if b != "reference"]
    assert {"numba", "cython"} <= set(compiled), f"this fastrnn has only {fastrnn.backends()}"
    package_dir = os.path.dirname(os.path.abspath(fastrnn.__file__))

    clone = tmp_path / "clone"
    clean_copy(clone)
    assert not list(clone.glob("fastrnn/_cy/*.so"))
    # not this run's: a pytest-xdist worker's variables would make the child's pytest-benchmark
    # think it runs under xdist too and turn itself off
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTRNN_BENCH_", "PYTEST_XDIST_")) and k != "PYTHONPATH"}
    env.update(FASTRNN_BENCH_QUICK="1", FASTRNN_BENCH_CASES=CASE,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))

    for command in commands:
        if command in installs:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900)
        out = proc.stdout + proc.stderr
        context = f"{command}\nexit {proc.returncode}; its output ends:\n{out[-6000:]}"
        regressed = "--benchmark-compare-fail" in command and "Performance has regressed" in out
        # a comparison may fail on noise (the machine is shared): that is the command working
        assert proc.returncode == 0 or (regressed and proc.returncode == 1), context
        assert f"fastrnn {fastrnn.__version__} from {package_dir}:" in out, context
        assert "warm-up before any timing" in out, context
        impls = timed_here(command, compiled)
        if command.startswith("python -m bench.report"):
            header = re.search(r"^case +kind .*$", proc.stdout, re.M)
            assert header, context
            for impl in impls:
                assert f"{impl} ms" in header.group(0), context
            words = shlex.split(command)
            if "--json" in words:
                with open(clone / words[words.index("--json") + 1]) as f:
                    ms = json.load(f)["cases"][CASE]["ms"]
                assert sorted(ms) == sorted(impls), (ms, context)
                assert all(v > 0 for v in ms.values()), (ms, context)
        else:
            for impl in ["reference", "torch", "onnxruntime"] + compiled:
                timed = f"test_case[{CASE}-{impl}]" in out
                assert timed == (impl in impls), f"{impl}: timed {timed}\n{context}"
