"""The first call of a layer in a new process: with an empty Numba cache (cold) and with the
cache the cold run left (warm), per backend and, for Numba, per compile mode.

    python -m bench.cold_start [--backends numba,cython] [--kinds infer,train]
                               [--modes background,wait] [--runs 3] [--markdown FILE]

The call is issue 24's: ``LSTM(64, 256, 2)`` on float32 inputs of T=100, B=32; "infer" is
``m(x)``, "train" ``forward(x, train=True)`` then ``backward``. Each run is a new Python
process that times, apart, the import of fastrnn, building the layer, the first call and a
second one. A cold run gets a new, empty ``NUMBA_CACHE_DIR``; the warm run after it reuses that
directory. Numba's compile modes (fastrnn._numba.set_compile_mode): "wait", the first call
compiles its loops and waits; "background", it runs on the NumPy reference while another
process compiles them; the child then waits for that process ("compiled": seconds from the
first call's start until the loops are in the cache) and times a call after it ("then": the
loops loaded from the cache and run). The Cython backend compiles nothing at run time: it is
there for contrast. Figures are medians over ``--runs`` (each run: cold, then warm).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench import installed
from bench.options import cpu_name, report

CHILD = """
import bench        # the installed fastrnn, as for every entry point of bench/ (bench.installed)
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastrnn
t1 = time.perf_counter()
backend, kind, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if backend == "numba":
    from fastrnn import _numba
    _numba.set_compile_mode(mode)
m = fastrnn.LSTM(64, 256, 2, backend=backend, seed=0)
rng = np.random.default_rng(0)
x = rng.standard_normal((100, 32, 64)).astype(np.float32)
dy = rng.standard_normal((100, 32, 256)).astype(np.float32)
t2 = time.perf_counter()

def call():
    if kind == "infer":
        m(x)
    else:
        _, _, cache = m.forward(x, train=True)
        m.backward(dy, cache)

call()
t3 = time.perf_counter()
call()
t4 = time.perf_counter()
times = {"import": t1 - t0, "build": t2 - t1, "first call": t3 - t2, "second call": t4 - t3}
if backend == "numba" and mode == "background":
    _numba.wait_compiled()
    t5 = time.perf_counter()
    call()
    times.update({"compiled": t5 - t2, "then": time.perf_counter() - t5})
print(json.dumps(times))
"""

PARTS = ("import", "build", "first call", "second call", "compiled", "then")


def run_child(backend, kind, mode, cache_dir):
    """One new process's timings (seconds), with NUMBA_CACHE_DIR = cache_dir."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", CHILD, backend, kind, mode],
                          capture_output=True, text=True, env=env, cwd=installed.CHECKOUT,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {backend} {kind} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(backends, kinds, modes, runs):
    """Rows: backend, kind, mode, cache ("cold"/"warm") and the median seconds of each part
    (None where the part is not measured)."""
    samples = {}
    for _ in range(runs):
        for backend in backends:
            for mode in (modes if backend == "numba" else ["-"]):
                for kind in kinds:
                    with tempfile.TemporaryDirectory(prefix="fastrnn-cold-") as cache_dir:
                        for cache in ("cold", "warm"):
                            samples.setdefault((backend, kind, mode, cache), []).append(
                                run_child(backend, kind, mode, cache_dir))
    rows = []
    for (backend, kind, mode, cache), got in samples.items():
        row = {"backend": backend, "kind": kind, "mode": mode, "cache": cache}
        for part in PARTS:
            values = [s[part] for s in got if part in s]
            row[part] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def markdown(rows, runs):
    lines = [f"CPU: {cpu_name()}; LSTM(64, 256, 2), float32, T=100, B=32; a new process per "
             f"call, medians of {runs} run(s), seconds", "",
             "| backend | call | compile mode | Numba cache | " + " | ".join(PARTS) + " |",
             "|---|---|---|---|" + "---|" * len(PARTS)]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['kind']} | {r['mode']} | {r['cache']} | "
                     + " | ".join("-" if r[p] is None else f"{r[p]:.2f}" for p in PARTS)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="numba,cython")
    p.add_argument("--kinds", default="infer,train", help="of infer, train")
    p.add_argument("--modes", default="background,wait",
                   help="Numba's compile modes, of background, wait")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--markdown", metavar="FILE", help="also write the table to this file")
    args = p.parse_args(argv)
    for line in installed.summary():       # which fastrnn is timed, as bench.report says
        print(line)
    backends = [b for b in args.backends.split(",") if b]
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in ("infer", "train")]
    if bad:
        p.error(f"--kinds: expected infer and/or train, got {', '.join(bad)}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("background", "wait")]
    if bad or not modes:
        p.error(f"--modes: expected background and/or wait, got {args.modes!r}")
    report(markdown(measure(backends, kinds, modes, args.runs), args.runs), args.markdown)


if __name__ == "__main__":
    main()
