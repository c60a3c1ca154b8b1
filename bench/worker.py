"""One implementation in its own process, timed on request by ``bench.report``.

    python -m bench.worker IMPL --threads N             serve requests, one JSON line each way
    python -m bench.worker IMPL --threads N --memory CASE   peak RSS of training CASE, then exit

IMPL is ``torch``, ``onnxruntime``, a fastrnn backend name, or ``blas`` (only the sgemm peak). The
thread counts are set by the parent through the environment (OMP/OpenBLAS/MKL) before anything is
imported, and again here with ``torch.set_num_threads`` / ``fastrnn.set_num_threads`` / the
intra-op threads of every ONNX Runtime session (``bench.runners.set_threads``).

Requests (stdin) and replies (stdout), one JSON object a line, after the first reply
``{"ready": IMPL, "fastrnn": the __file__ of the fastrnn imported}``:

    {"op": "prepare", "case": NAME}                  -> {"seconds": build and warm-up time}
    {"op": "sample", "case": NAME, "min_time": s, "min_iters": n, "max_iters": m}
                                  -> {"times": [seconds per call, ...], "other_load": 0..1}
    {"op": "peak", "size": n, "min_iters": k}        -> {"gflops": {gemm name: best GFLOP/s}}
    {"op": "quit"}
Any failure replies {"error": traceback}. Everything else the process prints goes to stderr.
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import sys
import time
import traceback

__all__ = ["time_calls", "rss_kib", "OtherLoad"]

BLAS = "blas"


def time_calls(run, min_time, min_iters, max_iters):
    """Seconds per call of ``run()``: at least ``min_iters`` calls and ``min_time`` seconds in all,
    at most ``max_iters`` calls. The garbage collector is off meanwhile, as in ``timeit``."""
    times = []
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(times) < min_iters or (len(times) < max_iters
                                         and time.perf_counter() - start < min_time):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


class OtherLoad:
    """How busy the machine was with other processes between ``start()`` and ``stop()``: the
    share of all CPUs' time (0..1) that was busy but not this process's (/proc/stat against
    getrusage). Other engineers compile and test on this machine; a sample taken while they do
    is slower, and the report says how much of that there was."""

    _TICK = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy_seconds():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
        return (sum(fields[:8]) - idle) / OtherLoad._TICK            # guest time is in user

    @staticmethod
    def _own_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self):
        self._t0, self._busy0, self._own0 = (time.perf_counter(), self._busy_seconds(),
                                             self._own_seconds())

    def stop(self):
        elapsed = time.perf_counter() - self._t0
        others = (self._busy_seconds() - self._busy0) - (self._own_seconds() - self._own0)
        return min(1.0, max(0.0, others / (elapsed * (os.cpu_count() or 1))))


def _gemm_peaks(impl, n, min_iters):
    """Best GFLOP/s of an (n, n) x (n, n) float32 product, per library reachable from ``impl``.

    In the ``blas`` worker: scipy.linalg.blas.sgemm (the OpenBLAS the compiled kernels call, given
    Fortran-ordered views so nothing is copied) and numpy's matmul (numpy's own OpenBLAS); in the
    ``torch`` worker: torch.mm."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    gemms = {}
    if impl == BLAS:
        from scipy.linalg import blas
        out = np.empty((n, n), np.float32, order="F")
        # (a @ b).T = b.T @ a.T: C-ordered a, b are Fortran-ordered a.T, b.T
        gemms["scipy sgemm"] = lambda: blas.sgemm(1.0, b.T, a.T, c=out, overwrite_c=True)
        c = np.empty((n, n), np.float32)
        gemms["numpy matmul"] = lambda: np.matmul(a, b, out=c)
    elif impl == "torch":
        import torch
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
        gemms["torch mm"] = lambda: torch.mm(ta, tb, out=tc)
    result = {}
    for name, gemm in gemms.items():
        gemm()
        times = time_calls(gemm, 0.0, min_iters, min_iters)
        result[name] = 2.0 * n ** 3 / min(times) / 1e9
    return result


# ---------------------------------------------------------------------------------------------
# Peak RSS (Linux): /proc/self/status VmRSS and VmHWM, the high-water mark reset by clear_refs.

def rss_kib():
    """(current RSS, peak RSS since the last reset) in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _release_and_reset_peak():
    """Give freed heap memory back to the system, then restart the peak at the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_memory(impl, case_name, iters):
    """Peak RSS of ``iters`` training calls of the case, above the RSS before the case existed.

    Order: imports; the same layer structure at toy sizes is built and trained (JIT compiled,
    libraries initialised) and dropped; freed memory is returned (malloc_trim); the baseline RSS
    is read and the peak reset; then the case's layer, inputs and gradients are built and
    ``iters`` training calls run. The delta therefore counts parameters, their gradients, the
    input, initial state and dy, and everything a training call keeps or allocates."""
    from bench import runners
    from bench.cases import BY_NAME
    case = BY_NAME[case_name]
    runners.prepare(runners.tiny(case), impl, warm=2)
    _release_and_reset_peak()
    baseline, _ = rss_kib()
    run, model = runners.prepare(case, impl, warm=iters)
    _, peak = rss_kib()
    return {"impl": impl, "case": case_name, "baseline_kib": baseline, "peak_kib": peak,
            "delta_kib": peak - baseline}


# ---------------------------------------------------------------------------------------------

def _setup(impl, threads):
    if impl == BLAS:
        return
    from bench import runners
    if impl == runners.ORT:     # fail at the start, saying what is missing, not at each case
        import onnxruntime  # noqa: F401

        import fastrnn.onnx  # noqa: F401
    elif impl != runners.TORCH:
        import fastrnn
        available = fastrnn.backends()
        if impl not in available:
            from fastrnn.dispatch import get_backend
            get_backend(impl)   # raises, saying why
    runners.set_threads(impl, threads)


def serve(impl, threads, reply_stream):
    from bench.cases import BY_NAME
    prepared = {}

    def reply(obj):
        reply_stream.write(json.dumps(obj) + "\n")
        reply_stream.flush()

    for line in sys.stdin:
        try:
            request = json.loads(line)
            op = request["op"]
            if op == "quit":
                reply({"ok": True})
                return
            if op == "peak":
                reply({"gflops": _gemm_peaks(impl, request["size"], request["min_iters"])})
            elif op == "prepare":
                from bench import runners
                t0 = time.perf_counter()
                # one warm call compiles (or loads the JIT cache) and faults the memory in;
                # samples take the median of several calls anyway
                prepared[request["case"]], _ = runners.prepare(BY_NAME[request["case"]], impl,
                                                               warm=1)
                reply({"seconds": time.perf_counter() - t0})
            elif op == "sample":
                run = prepared[request["case"]]
                load = OtherLoad()
                load.start()
                times = time_calls(run, request["min_time"], request["min_iters"],
                                   request["max_iters"])
                reply({"times": times, "other_load": load.stop()})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("impl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", metavar="CASE")
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args(argv)
    # the protocol owns the real stdout; anything else printed, from Python or from C
    # libraries, goes to stderr
    sys.stdout.flush()
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        _setup(args.impl, args.threads)
    except Exception:
        reply_stream.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        reply_stream.flush()
        return 1
    if args.memory:
        try:
            result = measure_memory(args.impl, args.memory, args.iters)
        except Exception:
            result = {"error": traceback.format_exc()}
        reply_stream.write(json.dumps(result) + "\n")
        reply_stream.flush()
        return 0
    hello = {"ready": args.impl}
    if args.impl != BLAS:   # which fastrnn it imported: the report checks it is its own
        hello["fastrnn"] = sys.modules["fastrnn"].__file__
    reply_stream.write(json.dumps(hello) + "\n")
    reply_stream.flush()
    serve(args.impl, args.threads, reply_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
