"""Where the time of a case goes: its matrix products alone, against the whole call.

    python -m bench.profile [--backends numba,cython] [--threads 2] [CASE ...]

For each case this times, in this process and with the thread count given:

- ``call``: one timed call of the case (``bench.runners``) on each backend and on PyTorch;
- ``GEMMs``: the matrix products the kernels do for it, with the same shapes, alone (NumPy's
  matmul into preallocated outputs): per layer and direction the input projection over all T
  steps and the T recurrent products (B, H) x (H, G*H); for training also the T products of
  backward (B, G*H) x (G*H, H) and the merged weight and input gradients over all T*B rows;
- ``rest``: call minus GEMMs: the elementwise passes, the per-step overheads, Python.

Medians of ``--repeat`` timings. A quick look, not the report: one process, no alternation.
"""
import argparse
import statistics
import time

import numpy as np

from bench import cases as case_table
from bench import installed, runners


def _products(case):
    """(name, m, k, n, count): the GEMMs (m, k) x (k, n) one call of ``case`` does."""
    T, B, H, G, D = case.steps, case.batch, case.hidden, case.num_gates, case.directions
    layers = 1 if case.kind == "step" else case.layers
    train = case.kind == "train"
    out = []
    for layer in range(layers):
        I = case.input_size if layer == 0 else D * H
        for _ in range(D):
            if case.kind == "step":        # one call a step: no merged input projection
                out.append(("x W_ih^T (per step)", B, I, G * H, T))
            else:
                out.append(("x W_ih^T (all steps)", T * B, I, G * H, 1))
            out.append(("h W_hh^T (per step)", B, H, G * H, T))
            if train:
                out.append(("dgates W_hh (per step)", B, G * H, H, T))
                out.append(("dW_hh = dgates^T h", G * H, T * B, H, 1))
                out.append(("dW_ih = dgates^T x", G * H, T * B, I, 1))
                out.append(("dx = dgates W_ih", T * B, G * H, I, 1))
    return out


def _median_time(run, repeat, min_time=0.2):
    samples = []
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def gemm_seconds(case, repeat):
    """{product name: seconds} of the case's GEMMs, summed over their counts."""
    rng = np.random.default_rng(0)
    totals = {}
    for name, m, k, n, count in _products(case):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        seconds = _median_time(lambda: np.matmul(a, b, out=c), repeat, min_time=0.05) * count
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--backends", default="numba,cython")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    args = parser.parse_args(argv)
    impls = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.no_torch:
        impls.append(runners.TORCH)
    for line in installed.summary():
        print(line)
    for impl in impls:
        runners.set_threads(impl, args.threads)
    for case in case_table.select(args.cases):
        calls = {impl: _median_time(runners.prepare(case, impl)[0], args.repeat) for impl in impls}
        gemms = gemm_seconds(case, args.repeat)
        gemm_total = sum(gemms.values())
        print(f"\n{case.name} ({case.kind}, T={case.steps} B={case.batch} I={case.input_size} "
              f"H={case.hidden} L={case.layers}{' bi' if case.bidirectional else ''}), "
              f"{args.threads} threads, ms per call")
        for impl, seconds in calls.items():
            rest = "" if impl == runners.TORCH else \
                f"   rest {1e3 * (seconds - gemm_total):8.3f} ({1 - gemm_total / seconds:4.0%})"
            print(f"  call {impl:8s} {1e3 * seconds:9.3f}{rest}")
        print(f"  GEMMs alone   {1e3 * gemm_total:9.3f}")
        for name, seconds in gemms.items():
            print(f"    {name:24s} {1e3 * seconds:9.3f}")


if __name__ == "__main__":
    main()
