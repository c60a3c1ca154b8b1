"""The comparison report: each fastrnn backend against PyTorch and ONNX Runtime, case by case.

    python -m bench.report                       # every case, compiled backends, the references
    python -m bench.report --quick --cases lstm-train-256,gru-step-128
    python -m bench.report --backends numba,cython --markdown bench/RESULTS.md \\
        --plot bench/speedup.png --json bench/results.json

Run it from the checkout: it times the installed fastrnn (``bench.installed``) and says at its
top which one, what it times and what it does not, with the reason. The environment variables
FASTRNN_BENCH_CASES (case names) and FASTRNN_BENCH_QUICK=1 (as ``--quick``) are the defaults of
``--cases`` and ``--quick``, as for the pytest-benchmark suite.

The references: PyTorch, and ONNX Runtime for the infer and step cases (it has no training; the
model is the same fastrnn layer, written by ``fastrnn.onnx.export``), each when installed and
not left out (``--no-torch``, ``--no-ort``).

How it measures. Every implementation (PyTorch, ONNX Runtime, each fastrnn backend, and a BLAS-only
process for the sgemm peak) runs in its own worker process (``bench.worker``) with the same thread
count set before any import. The workers build every case and call it once (JIT compiled, memory
touched) before any timing (the warm-up, whose time is printed per implementation). Then, for
``--rounds`` rounds, each case is timed on each implementation in turn, the order rotated from case
to case and round to round; only one worker runs at a time.
Before each sample the report waits until the machine is quiet (at least ``--pause`` seconds, so
that the previous worker's spinning BLAS/OpenMP threads have gone to sleep, and while other
processes keep it busy, up to ``--settle`` seconds). A sample is the median time of the calls
made in ``--min-time`` seconds (at least 3 calls), together with the share of the machine other
processes used meanwhile; a busy sample is taken again (``--retries``) and left out of the
median when quieter ones exist. A case's time is the median of its samples over the rounds.
The sgemm peak (scipy's sgemm, numpy's matmul and torch.mm on 2048 x 2048 float32, at the same
thread count) is measured every round; the best call of any round is the peak "% peak" divides
by (noise only ever lowers a peak). Peak RSS of training is measured once per case and
implementation, each in a fresh process (``bench.worker.measure_memory``). ``--budget`` stops
starting rounds after so many seconds: the machine is shared.
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from bench import cases as case_table
from bench import installed
from bench.runners import (ORT, ORT_INSTALL, ORT_NO_TRAIN, REFERENCES, TORCH, choose, have_ort,
                           numba_cache_place, runs)
from bench.worker import BLAS, OtherLoad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_INSTALL = "pip install torch==2.13.0   (on this machine: the CPU build already on disk)"
PEAK_SIZE = 2048
# In the Markdown file, this line and everything after it are kept when the report rewrites it.
NOTES_MARKER = "<!-- notes: kept when bench.report rewrites this file -->"


# ---------------------------------------------------------------------------------------------
# Worker processes

def worker_env(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class WorkerError(RuntimeError):
    pass


class Worker:
    """A ``python -m bench.worker IMPL`` process, spoken to one JSON line at a time."""

    def __init__(self, impl, threads, fastrnn_file):
        self.impl = impl
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", impl, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=worker_env(threads), cwd=REPO)
        hello = self._read()
        if "ready" not in hello:
            raise WorkerError(f"{impl}: worker did not start:\n{hello.get('error', hello)}")
        if impl != BLAS and hello.get("fastrnn") != fastrnn_file:
            raise WorkerError(f"{impl}: the worker imported fastrnn from {hello.get('fastrnn')}, "
                              f"this process from {fastrnn_file}")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise WorkerError(f"{self.impl}: worker exited (code {self.proc.poll()}); "
                              f"its stderr:\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise WorkerError(f"{self.impl} {request}: {reply['error']}")
        return reply

    def close(self):
        try:
            if self.proc.poll() is None:
                self.ask(op="quit")
            self.proc.wait(timeout=30)
        except (WorkerError, OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()


def measure_memory(impl, case, threads, iters=2):
    """The reply of a fresh ``python -m bench.worker IMPL --memory CASE`` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", impl, "--threads", str(threads),
         "--memory", case.name, "--iters", str(iters)],
        capture_output=True, text=True, env=worker_env(threads), cwd=REPO, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"error": f"no reply (code {proc.returncode}): {proc.stderr[-2000:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# The machine and the software

def machine_info():
    info = {"cpu": platform.processor() or platform.machine(), "cores": None,
            "logical_cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        info["cores"] = int(fields["Core(s) per socket"]) * int(fields.get("Socket(s)", 1))
        flags = fields.get("Flags", "").split()
        info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "amx_tile", "amx_bf16")
                                if f in flags)
        if fields.get("Hypervisor vendor"):
            info["cpu"] += f" (virtual machine, {fields['Hypervisor vendor']})"
        info["caches"] = ", ".join(f"{k.split()[0]} {fields[k]}" for k in
                                   ("L1d cache", "L2 cache", "L3 cache") if k in fields)
    except (OSError, KeyError, ValueError):
        pass
    return info


def versions():
    result = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "numba", "torch", "onnxruntime", "onnx", "pytest-benchmark"):
        try:
            result[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result[dist] = None
    import fastrnn
    result["fastrnn"] = fastrnn.__version__
    try:
        import scipy
        blas = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        result["scipy BLAS"] = blas.get("openblas configuration") or blas.get("name")
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        result["fastrnn commit"] = commit + (" + uncommitted or untracked changes" if dirty
                                             else "")
    except OSError:
        pass
    return result


# ---------------------------------------------------------------------------------------------
# Running

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wait_quiet(seconds, threshold, slice_seconds=1.0, say=True):
    """Wait, at most ``seconds``, until other processes (anything but this one: the idle
    workers' lingering BLAS/OpenMP spinning counts too) use no more than ``threshold`` of the
    machine over ``slice_seconds``; at least one slice is always waited. True if it got quiet."""
    deadline = time.time() + seconds
    while True:
        load = OtherLoad()
        load.start()
        time.sleep(slice_seconds)
        busy = load.stop()
        if busy <= threshold:
            return True
        if time.time() >= deadline:
            return False
        if say:
            log(f"  waiting for a quieter machine: others use {100 * busy:.0f} %")


def take_sample(worker, case, args, min_iters):
    """One sample of ``case`` on ``worker``, taken when the machine looks quiet (waiting up to
    ``--settle`` seconds); taken again (up to ``--retries`` times) if other processes kept more
    than ``--max-other-load`` of the machine busy meanwhile, keeping the quietest."""
    best = None
    for _ in range(1 + args.retries):
        wait_quiet(args.settle, args.max_other_load, args.pause, say=False)
        sample = worker.ask(op="sample", case=case.name, min_time=args.min_time,
                            min_iters=min_iters, max_iters=10_000)
        if best is None or sample["other_load"] < best["other_load"]:
            best = sample
        if best["other_load"] <= args.max_other_load:
            break
    return best


def run_benchmarks(args, selected, impls):
    import fastrnn
    started = time.time()
    workers = {}
    results = {"samples": {c.name: {i: [] for i in impls} for c in selected},
               "load": {c.name: {i: [] for i in impls} for c in selected},
               "errors": {}, "peaks": {}, "memory": {}, "rounds_done": 0}
    try:
        for impl in [BLAS] + impls:
            log(f"starting worker: {impl}")
            workers[impl] = Worker(impl, args.threads, fastrnn.__file__)
        log("warm-up before any timing: every case built and called once on each implementation "
            f"(Numba compiles its kernels here, or loads them from its cache in "
            f"{numba_cache_place()})")
        warm_seconds = dict.fromkeys(impls, 0.0)
        for case in selected:
            for impl in impls:
                if not runs(case, impl):
                    continue
                try:
                    warm_seconds[impl] += workers[impl].ask(op="prepare", case=case.name)["seconds"]
                except WorkerError as exc:
                    results["errors"][(case.name, impl)] = str(exc)
                    log(f"  {case.name} on {impl}: FAILED\n{exc}")
        for impl, seconds in warm_seconds.items():
            count = sum(1 for case in selected if runs(case, impl))
            log(f"  {impl}: {count} cases in {seconds:.1f} s")
        peak_workers = [i for i in (BLAS, TORCH) if i in workers]
        min_iters = 1 if args.quick else 3
        for rnd in range(args.rounds):
            if rnd and time.time() - started > args.budget:
                log(f"time budget of {args.budget:g} s spent: stopping after {rnd} rounds")
                break
            wait_quiet(args.wait_quiet, args.max_other_load)
            log(f"round {rnd + 1}/{args.rounds}")
            for impl in peak_workers:
                reply = workers[impl].ask(op="peak", size=PEAK_SIZE, min_iters=3)
                for name, gflops in reply["gflops"].items():
                    results["peaks"].setdefault(name, []).append(gflops)
                wait_quiet(args.settle, args.max_other_load, args.pause, say=False)
            for index, case in enumerate(selected):
                shift = (rnd + index) % len(impls)
                for impl in impls[shift:] + impls[:shift]:
                    if (case.name, impl) in results["errors"] or not runs(case, impl):
                        continue
                    try:
                        sample = take_sample(workers[impl], case, args, min_iters)
                    except WorkerError as exc:
                        results["errors"][(case.name, impl)] = str(exc)
                        log(f"  {case.name} on {impl}: FAILED\n{exc}")
                        continue
                    results["samples"][case.name][impl].append(statistics.median(sample["times"]))
                    results["load"][case.name][impl].append(sample["other_load"])
            results["rounds_done"] = rnd + 1
    finally:
        for worker in workers.values():
            worker.close()
    if args.memory:
        for case in selected:
            if case.kind != "train":
                continue
            for impl in impls:
                if (case.name, impl) in results["errors"] or not runs(case, impl):
                    continue
                log(f"peak RSS: {case.name} on {impl}")
                results["memory"][(case.name, impl)] = measure_memory(impl, case, args.threads)
    return results


# ---------------------------------------------------------------------------------------------
# Summaries and tables

def summarize(selected, impls, backends, results, max_other_load):
    """One row per case: medians, speedups, GFLOP/s, share of peak, memory, targets."""
    # a peak is the best the machine does: noise only lowers it, so the best round counts
    peak = max((max(v) for v in results["peaks"].values()), default=None)
    rows = []
    for case in selected:
        work = case_table.flops(case)
        row = {"case": case, "gflop": work / 1e9, "ms": {}, "spread": {}, "gflops": {},
               "peak_share": {}, "speedup": {}, "speedup_ort": {}, "rss_mb": {}, "errors": {},
               "noisy": set(), "kept": {}}
        for impl in impls:
            samples = results["samples"][case.name][impl]
            if (case.name, impl) in results["errors"]:
                row["errors"][impl] = results["errors"][(case.name, impl)]
            if not samples:
                continue
            # samples taken while others kept the machine busy are left out, unless that
            # leaves none (the cell is then marked noisy)
            loads = results["load"][case.name][impl]
            quiet = [t for t, load in zip(samples, loads) if load <= max_other_load]
            if quiet:
                samples = quiet
            else:
                row["noisy"].add(impl)
            row["kept"][impl] = (len(samples) if quiet else 0, len(loads))
            seconds = statistics.median(samples)
            row["ms"][impl] = 1e3 * seconds
            row["spread"][impl] = (max(samples) - min(samples)) / seconds
            row["gflops"][impl] = work / seconds / 1e9
            if peak:
                row["peak_share"][impl] = 100.0 * row["gflops"][impl] / peak
            memory = results["memory"].get((case.name, impl))
            if memory and "delta_kib" in memory:
                row["rss_mb"][impl] = memory["delta_kib"] / 1024
            elif memory:
                row["errors"][impl] = memory.get("error")
        loads = [v for i in impls for v in results["load"][case.name][i]]
        row["other_load"] = 100 * statistics.median(loads) if loads else None
        torch_ms, ort_ms = row["ms"].get(TORCH), row["ms"].get(ORT)
        for b in backends:
            if torch_ms and b in row["ms"]:
                row["speedup"][b] = torch_ms / row["ms"][b]
            if ort_ms and b in row["ms"]:
                row["speedup_ort"][b] = ort_ms / row["ms"][b]
        timed = sorted((b for b in backends if b in row["ms"]), key=row["ms"].get)
        row["fastest"] = timed[0] if timed else None
        row["margin"] = row["ms"][timed[1]] / row["ms"][timed[0]] if len(timed) > 1 else None
        rows.append(row)
    return rows, peak


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(rows, impls, backends, markdown=False):
    """The main table as text lines (aligned columns, or a Markdown table)."""
    joined = " / ".join(impls)
    header = ["case", "kind", "GFLOP"]
    header += [f"{i} ms" for i in impls]
    header += [f"{b} speedup" for b in backends if TORCH in impls]
    header += [f"{b} vs {ORT}" for b in backends if ORT in impls]
    header += ["fastest backend", f"GFLOP/s ({joined})", f"% peak ({joined})",
               f"train peak RSS MB ({joined})", "others' CPU %"]
    body = []
    for row in rows:
        case = row["case"]
        cells = [case.name, case.kind, _fmt(row["gflop"], ".3g")]
        cells += ["" if not runs(case, i)          # blank: nothing to time (ORT's training)
                  else _fmt(row["ms"].get(i), ".3f") + ("*" if i in row["noisy"] else "")
                  if i not in row["errors"] or i in row["ms"] else "error" for i in impls]
        for reference, speedups in ((TORCH, row["speedup"]), (ORT, row["speedup_ort"])):
            if reference in impls:
                cells += ["" if not runs(case, reference)
                          else _fmt(speedups.get(b), ".2f") + ("x" if b in speedups else "")
                          for b in backends]
        cells.append((row["fastest"] or "-") + (f" by {row['margin']:.2f}x" if row["margin"]
                                                 else ""))
        cells.append(" / ".join(_fmt(row["gflops"].get(i), ".1f") for i in impls))
        cells.append(" / ".join(_fmt(row["peak_share"].get(i), ".0f") for i in impls))
        cells.append(" / ".join(_fmt(row["rss_mb"].get(i), ".0f") for i in impls)
                     if case.kind == "train" and row["rss_mb"] else "")
        cells.append(_fmt(row["other_load"], ".0f"))
        body.append(cells)
    left = {0, 1, header.index("fastest backend")}
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if k in left else "---:"
                                for k in range(len(header))) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return lines
    widths = [max(len(str(r[k])) for r in [header] + body) for k in range(len(header))]
    fmt_row = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if k in left else str(c).rjust(w)
        for k, (c, w) in enumerate(zip(cells, widths)))
    return [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]


def blank_lines(rows, impls):
    """Why some cells are blank: once, not per cell."""
    if ORT in impls and any(not runs(row["case"], ORT) for row in rows):
        return [f"{ORT}: blank on the train cases: {ORT_NO_TRAIN}"]
    return []


def step_latency_lines(rows, impls):
    """Microseconds per one-step call, Python included, for the step cases."""
    lines = []
    for row in rows:
        case = row["case"]
        if case.kind != "step":
            continue
        per_call = ", ".join(f"{i} {1e3 * row['ms'][i] / case.steps:.1f} us"
                             for i in impls if i in row["ms"])
        lines.append(f"{case.name}: one call of one step: {per_call}")
    return lines


def target_lines(rows, impls, backends):
    """Issue 7's targets, met or missed, from the measured medians."""
    if TORCH not in impls:
        return ["(targets need PyTorch: " + TORCH_INSTALL + ")"]
    compiled = [b for b in backends if b in case_table.COMPILED]
    lines = []
    for row in rows:
        case = row["case"]
        best = max(row["speedup"].items(), key=lambda kv: kv[1], default=None)
        if best is None:
            continue
        ok = best[1] >= case.target
        text = (f"{case.name}: speedup {best[1]:.2f}x ({best[0]}), target {case.target:g}x: "
                + ("met" if ok else "MISSED"))
        if case.kind == "step":
            us = 1e3 * row["ms"][best[0]] / case.steps
            text += (f"; {us:.1f} us a call, target {case_table.STEP_LATENCY_TARGET_US:g} us: "
                     + ("met" if us <= case_table.STEP_LATENCY_TARGET_US else "MISSED"))
        if case.kind == "train" and TORCH in row["rss_mb"]:
            over = [b for b in backends if b in row["rss_mb"]
                    and row["rss_mb"][b] > row["rss_mb"][TORCH]]
            text += ("; peak RSS <= PyTorch's: "
                     + ("met" if not over else "MISSED by " + ", ".join(
                         f"{b} ({row['rss_mb'][b]:.0f} vs {row['rss_mb'][TORCH]:.0f} MB)"
                         for b in over)))
        timed = [b for b in compiled if b in row["ms"]]
        if len(timed) == 2:
            ratio = max(row["ms"][b] for b in timed) / min(row["ms"][b] for b in timed)
            text += (f"; {timed[0]} vs {timed[1]} within {ratio:.2f}x, target "
                     f"{case_table.BACKEND_AGREEMENT:g}x: "
                     + ("met" if ratio <= case_table.BACKEND_AGREEMENT else "MISSED"))
        lines.append(text)
    return lines


def noise_lines(rows, impls, results):
    worst = max(((row["spread"][i], row["case"].name, i) for row in rows for i in impls
                 if i in row["spread"]), default=None)
    if worst is None:
        return []
    loads = [v for per_case in results["load"].values() for v in per_case.values() for v in v]
    return [f"largest spread between rounds, (max - min) / median: {100 * worst[0]:.0f} % "
            f"({worst[1]} on {worst[2]})",
            f"CPU time of other processes during the samples: median "
            f"{100 * statistics.median(loads):.0f} %, max {100 * max(loads):.0f} % of the machine"]


def write_markdown(path, args, rows, peak, results, impls, backends, machine, vers, command):
    peaks = ", ".join(f"{name} {max(v):.1f}" for name, v in sorted(results["peaks"].items()))
    out = [
        "# Benchmark results",
        "",
        f"Made by `{command}` on {datetime.date.today().isoformat()}.",
        "",
        f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores "
        f"({machine.get('logical_cpus')} logical CPUs), {machine.get('simd', '')}; "
        f"caches {machine.get('caches', '?')}. Shared with other work while measuring.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
        f"- Threads: {args.threads} for every implementation (torch.set_num_threads, "
        "fastrnn.set_num_threads, ONNX Runtime's intra_op_num_threads with "
        "inter_op_num_threads 1, OMP/OpenBLAS/MKL environment variables). float32.",
        f"- {results['rounds_done']} rounds, implementations alternating in rotated order, each "
        f"in its own process; a sample is the median call time over >= {args.min_time:g} s "
        f"(>= {1 if args.quick else 3} calls); "
        "the table holds the median of the samples over the rounds.",
        f"- sgemm peak (GFLOP/s, {PEAK_SIZE}x{PEAK_SIZE} float32, the best call of any round): "
        f"{peaks}. \"% peak\" divides by the largest: {_fmt(peak, '.1f')} GFLOP/s.",
        "- GFLOP: matmul FLOPs of one timed call (`bench/cases.py:flops`): per layer and "
        "direction 2*T*B*G*H*(I_k+H) for the forward; training counts 3x the forward (backward "
        "has a product for the input side and one for the weight side of every forward "
        "product); elementwise work is not counted.",
        "- speedup = PyTorch ms / backend ms (above 1: fastrnn is faster). "
        "train = forward with cache + backward with every gradient (input, initial state, "
        "parameters); infer = one call, zero initial state (PyTorch under no_grad); step = "
        "100 calls of one step carrying the state (PyTorch: LSTMCell / GRUCell under no_grad).",
        "- others' CPU %: the share of the machine other processes kept busy during the "
        "case's samples (median; /proc/stat less the worker's own CPU time). Each sample "
        f"waits (up to {args.settle:g} s) for the machine to be quiet; a sample during which "
        f"others used more than {100 * args.max_other_load:.0f} % is taken again, up to "
        f"{args.retries} times, and is left out of the median unless no quiet sample remains "
        "(then the time is marked *).",
        "- Peak RSS of training: in a fresh process, the peak RSS over two training calls minus "
        "the RSS before the case's layer and data existed (after a toy-sized warm-up and "
        "malloc_trim), so it counts weights, gradients, inputs, dy and all the training "
        "call allocates; not the libraries.",
        "",
    ]
    if ORT in impls:
        out.insert(-1, f"- {ORT}: ONNX Runtime's CPUExecutionProvider running the same fastrnn "
                   "layer, same weights, written by `fastrnn.onnx.export` (one LSTM/GRU/RNN node); "
                   "infer = one `session.run` from the zero state; step = 100 runs of a one-step "
                   "model whose h0/c0 are the previous run's h_n/c_n. \"backend vs "
                   f"{ORT}\" = ONNX Runtime ms / backend ms. It has no training: its train cells "
                   "are blank.")
    out += table(rows, impls, backends, markdown=True)
    out += [""]
    extra = (blank_lines(rows, impls) + step_latency_lines(rows, impls)
             + noise_lines(rows, impls, results))
    out += [f"- {line}" for line in extra]
    out += ["", "## Targets (issue 7)", ""]
    out += [f"- {line}" for line in target_lines(rows, impls, backends)]
    errors = [(row["case"].name, i, e) for row in rows for i, e in row["errors"].items() if e]
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- {name} on {impl}: `{e.strip().splitlines()[-1]}`" for name, impl, e in errors]
    out.append("")
    notes = ""
    if os.path.exists(path):   # hand-written notes below the marker survive a rewrite
        with open(path) as f:
            previous = f.read()
        if NOTES_MARKER in previous:
            notes = previous[previous.index(NOTES_MARKER):]
    with open(path, "w") as f:
        f.write("\n".join(out) + ("\n" + notes if notes else ""))


def write_plot(path, rows, backends):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("--plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    names = [row["case"].name for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.5))
    width = 0.8 / max(1, len(backends))
    for k, b in enumerate(backends):
        xs = [i + (k - (len(backends) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [row["speedup"].get(b, 0) for row in rows], width, label=b)
    ax.scatter(range(len(names)), [row["case"].target for row in rows], marker="_", s=400,
               color="black", label="target (issue 7)", zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(
        [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for k, b in enumerate(backends):
        for i, row in enumerate(rows):
            if b in row["speedup"]:
                ax.annotate(f"{row['speedup'][b]:.2g}", (i + (k - (len(backends) - 1) / 2)
                                                         * width, row["speedup"][b]),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right")
    ax.set_ylabel("speedup over PyTorch (PyTorch ms / fastrnn ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot written: {path}")


SETTINGS = ("threads", "min_time", "max_other_load", "settle", "retries", "quick", "pause")


def write_json(path, args, rows, results, impls, backends, machine, vers, command, seconds):
    """Everything measured, raw samples included: the format to keep results in.
    ``--from-json FILE`` renders a saved run again (tables, ``--markdown``, ``--plot``).

    Keys: ``command``; ``machine`` (cpu, cores, logical_cpus, simd, caches); ``versions`` (python,
    numpy, scipy, numba, torch, onnxruntime, onnx, pytest-benchmark, fastrnn, scipy BLAS, fastrnn
    commit); ``seconds`` (the run's duration); ``settings`` (threads, min_time, max_other_load,
    settle, retries, quick, pause); ``rounds`` (rounds done); ``impls`` (every implementation timed,
    "torch" and "onnxruntime" included) and ``backends`` (the fastrnn ones); ``peaks`` ({gemm name:
    [GFLOP/s of each round]}); ``cases``: {case name: {``gflop``: matmul GFLOP of one call, and per
    implementation ``ms`` (the median), ``speedup`` (PyTorch ms / backend ms), ``speedup_ort`` (ONNX
    Runtime ms / backend ms; infer and step cases), ``gflops``, ``peak_share`` (%), ``rss_mb``
    (training's peak RSS), ``samples_ms`` (every sample, in round order), ``other_load`` (others'
    share of the machine during each sample, 0..1), ``quiet_samples_kept`` ([kept, taken]);
    ``noisy``: implementations whose every sample was busy}}; ``errors``: [[case, impl, traceback]];
    ``memory``: [[case, impl, worker reply]]."""
    data = {
        "command": command, "machine": machine, "versions": vers, "seconds": seconds,
        "settings": {name: getattr(args, name) for name in SETTINGS},
        "rounds": results["rounds_done"], "impls": impls, "backends": backends,
        "peaks": results["peaks"],
        "cases": {row["case"].name: {
            "gflop": row["gflop"], "ms": row["ms"], "speedup": row["speedup"],
            "speedup_ort": row["speedup_ort"], "gflops": row["gflops"],
            "peak_share": row["peak_share"], "rss_mb": row["rss_mb"],
            "samples_ms": {i: [1e3 * s for s in v]
                           for i, v in results["samples"][row["case"].name].items()},
            "other_load": results["load"][row["case"].name],
            "quiet_samples_kept": row["kept"], "noisy": sorted(row["noisy"])}
            for row in rows},
        "errors": [[c, i, e] for (c, i), e in results["errors"].items()],
        "memory": [[c, i, v] for (c, i), v in results["memory"].items()],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def read_json(path, args):
    """The run saved by ``write_json``: its settings go into ``args``; returns what ``main``
    needs to print and write it again."""
    with open(path) as f:
        data = json.load(f)
    for name, value in data["settings"].items():
        setattr(args, name, value)
    selected = [case_table.BY_NAME[name] for name in data["cases"]]
    results = {
        "samples": {name: {i: [ms / 1e3 for ms in v] for i, v in c["samples_ms"].items()}
                    for name, c in data["cases"].items()},
        "load": {name: c["other_load"] for name, c in data["cases"].items()},
        "errors": {(c, i): e for c, i, e in data["errors"]},
        "peaks": data["peaks"],
        "memory": {(c, i): v for c, i, v in data["memory"]},
        "rounds_done": data["rounds"],
    }
    return (selected, data["impls"], data["backends"], results, data["machine"],
            data["versions"], data["command"], data["seconds"])


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Time fastrnn's backends against PyTorch and ONNX Runtime, case by case "
        "(bench/cases.py).")
    p.add_argument("--backends", help="comma-separated fastrnn backends (default: every "
                   "compiled backend available here; the reference only if none is)")
    p.add_argument("--cases", default=os.environ.get("FASTRNN_BENCH_CASES"),
                   help="comma-separated case names (default: FASTRNN_BENCH_CASES, else all): "
                   + ", ".join(case_table.BY_NAME))
    p.add_argument("--kinds", help="only these kinds: comma-separated of train, infer, step")
    p.add_argument("--rounds", type=int, help="rounds (default 5; --quick: 2)")
    p.add_argument("--min-time", type=float,
                   help="seconds per sample (default 0.5; --quick: 0.1)")
    p.add_argument("--pause", type=float, default=0.3,
                   help="seconds between samples, so spinning threads go idle (default 0.3)")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="before a sample, wait up to this long for the machine to be quiet "
                   "(default 10; --quick: 0)")
    p.add_argument("--max-other-load", type=float, default=0.2,
                   help="a sample during which other processes used more than this share of "
                   "the machine is taken again (default 0.2)")
    p.add_argument("--retries", type=int,
                   help="at most this many retakes of a busy sample (default 2; --quick: 0)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each round, wait up to this long for the machine to be quiet "
                   "(others below --max-other-load; default 0: don't wait)")
    p.add_argument("--budget", type=float, default=420.0, metavar="SECONDS",
                   help="start no new round after this many seconds (default 420: the machine "
                   "is shared)")
    p.add_argument("--threads", type=int, default=2, help="threads for everyone (default 2)")
    p.add_argument("--quick", action="store_true",
                   default=os.environ.get("FASTRNN_BENCH_QUICK", "").strip() not in ("", "0"),
                   help="2 short rounds, 1 call a sample at least, no retakes, no memory "
                   "measurement: a smoke run (default: on if FASTRNN_BENCH_QUICK=1)")
    p.add_argument("--memory", dest="memory", action="store_true", default=None,
                   help="measure the peak RSS of training (default: on unless --quick)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--no-ort", action="store_true",
                   help="leave ONNX Runtime out (timed on the infer and step cases otherwise)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the speedups (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: print (and --markdown/--plot) a run saved by --json")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 0.5)
    if args.memory is None:
        args.memory = not args.quick
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.settle is None:
        args.settle = 0.0 if args.quick else 10.0
    if args.rounds < 1 or args.threads < 1 or args.min_time < 0 or args.pause < 0:
        p.error("--rounds and --threads must be >= 1, --min-time and --pause >= 0")
    return p, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser, args = parse_args(argv)
    if args.from_json:  # render a saved run again: nothing is measured
        selected, impls, backends, results, machine, vers, command, seconds = \
            read_json(args.from_json, args)
        report(args, selected, impls, backends, results, machine, vers, command, seconds)
        return 0
    names = [b.strip() for b in (args.backends or "").split(",") if b.strip()]
    if set(names) & set(REFERENCES):
        parser.error("--backends: fastrnn backends only (PyTorch and ONNX Runtime are compared "
                     "unless --no-torch, --no-ort)")
    try:
        backends, not_timed = choose(names, "--backends", torch_by_default=False)
    except RuntimeError as exc:
        parser.error(str(exc))
    not_timed = [(name, why) for name, why in not_timed if name not in REFERENCES]
    try:
        selected = case_table.select(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.kinds:
        kinds = {k.strip() for k in args.kinds.split(",")}
        if not kinds <= set(case_table.KINDS):
            parser.error(f"--kinds: expected some of {case_table.KINDS}, got {sorted(kinds)}")
        selected = [c for c in selected if c.kind in kinds]
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        not_timed.append((TORCH, f"not installed: no comparison. To install it: {TORCH_INSTALL}"))
    elif args.no_torch:
        not_timed.append((TORCH, "--no-torch"))
    ort_here = have_ort()
    if not ort_here:
        not_timed.append((ORT, "not installed: no inference reference. To install it: "
                          f"{ORT_INSTALL} (the bench extra has them)"))
    elif args.no_ort:
        not_timed.append((ORT, "--no-ort"))
    elif not any(runs(case, ORT) for case in selected):
        not_timed.append((ORT, f"no infer or step case selected; {ORT_NO_TRAIN}"))
    elif not all(runs(case, ORT) for case in selected):
        not_timed.append((f"{ORT} on the train cases", ORT_NO_TRAIN))
    with_ort = ort_here and not args.no_ort and any(runs(case, ORT) for case in selected)
    impls = (([TORCH] if have_torch and not args.no_torch else [])
             + ([ORT] if with_ort else []) + backends)
    for line in installed.summary():
        log(line)
    log(f"timing {', '.join(impls)} on {args.threads} threads, {len(selected)} cases"
        + (" (quick)" if args.quick else ""))
    for name, why in not_timed:
        log(f"not timed: {name}: {why}")
    command = "python -m bench.report " + " ".join(shlex.quote(a) for a in argv)

    started = time.time()
    results = run_benchmarks(args, selected, impls)
    machine, vers = machine_info(), versions()
    report(args, selected, impls, backends, results, machine, vers, command,
           time.time() - started, have_torch, ort_here)
    return 1 if results["errors"] else 0


def report(args, selected, impls, backends, results, machine, vers, command, seconds,
           have_torch=True, ort_here=True):
    """Print the tables; write the Markdown, the plot and the JSON asked for."""
    rows, peak = summarize(selected, impls, backends, results, args.max_other_load)
    print(f"fastrnn benchmark: {machine.get('cpu')}, {machine.get('cores')} cores, "
          f"{args.threads} threads, float32, {results['rounds_done']} rounds, medians "
          f"({seconds:.0f} s)")
    print("sgemm peak GFLOP/s (best round): "
          + ", ".join(f"{n} {max(v):.1f}" for n, v in sorted(results["peaks"].items())))
    print()
    for line in table(rows, impls, backends):
        print(line)
    print()
    for line in (blank_lines(rows, impls) + step_latency_lines(rows, impls)
                 + noise_lines(rows, impls, results)):
        print(line)
    print()
    print("targets (issue 7):")
    for line in target_lines(rows, impls, backends):
        print("  " + line)
    if not have_torch and not args.no_torch:
        print(f"\nPyTorch is not installed; to compare with it: {TORCH_INSTALL}")
    if not ort_here and not args.no_ort:
        print(f"\nONNX Runtime is not installed; to compare with it: {ORT_INSTALL}")
    if args.markdown:
        write_markdown(args.markdown, args, rows, peak, results, impls, backends, machine, vers,
                       command)
        log(f"markdown written: {args.markdown}")
    if args.plot:
        write_plot(args.plot, rows, backends)
    if args.json:
        write_json(args.json, args, rows, results, impls, backends, machine, vers, command,
                   seconds)
        log(f"json written: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
