"""How close the memory-bound inference cases come to reading their weights at the machine's
speed (issue 24, item 5: "a profile that shows the call reading its weights at the measured
memory bandwidth of the machine ... a STREAM-like read of the same number of bytes").

    python -m bench.bandwidth [--backends numba,cython] [--threads 2] [--rounds 5] [CASE ...]

For each case (default: lstm-infer-512-b1 and gru-infer-1024-b2, where a step's B rows are too
few for the weights to be reused from registers):

- bytes: the weight bytes one call must read: per layer and direction w_ih once (the input
  product of all T*B rows at once) and w_hh once a step (each step's product reads every
  weight row; at these sizes w_hh does not stay in one core's L2 from step to step);
- read: the same bytes read in the same pattern by a loop that does nothing else, timed in the
  same run: ``threads`` threads, each summing its share of an array of w_hh's size T times
  over, then of one of w_ih's size once (float32 vector sums: loads and adds, nothing
  written), the fastest these bytes can be read on this machine in this way;
- each implementation's call: bytes / its time, and that as a fraction of the read's.

Rounds alternate the read and the calls; figures are medians over the rounds (per-round
ratios for the fractions). ``min_time`` seconds of calls make one sample.
"""
import argparse
import statistics

import numba
import numpy as np
from numba import njit, prange

from bench import cases as case_table
from bench import installed, runners
from bench.options import cpu_name, report
from bench.profile import _median_time

DEFAULT_CASES = ("lstm-infer-512-b1", "gru-infer-1024-b2")


def weight_bytes(case, itemsize=4):
    """[(bytes of w_hh, bytes of w_ih) per layer], and the total bytes a call reads."""
    G, H, T, D = case.num_gates, case.hidden, case.steps, case.directions
    layers = [(G * H * H * itemsize,
               G * H * (case.input_size if layer == 0 else D * H) * itemsize)
              for layer in range(case.layers)]
    return layers, sum(D * (T * hh + ih) for hh, ih in layers)


@njit(fastmath=True, cache=True)
def _sum(part, repeats):
    """``part`` summed ``repeats`` times: loads and vector adds (a loop of its own: inside the
    prange below, LLVM left the sum scalar, 4x slower)."""
    total = np.float32(0)
    for _ in range(repeats):
        for i in range(part.size):
            total += part[i]
    return total


@njit(parallel=True, fastmath=True, cache=True)
def read(a, parts, repeats):
    """Each of ``parts`` threads sums its contiguous share of ``a``, ``repeats`` times."""
    n = a.size
    sums = np.zeros(parts, np.float32)
    for p in prange(parts):
        sums[p] = _sum(a[p * n // parts:(p + 1) * n // parts], repeats)
    return sums.sum()


def measure(names, impls, threads, rounds, min_time):
    """Rows: case, impl ("read" or an implementation), ms, GB/s, and for the implementations
    the median per-round fraction of the read's GB/s."""
    numba.set_num_threads(threads)
    for impl in impls:
        runners.set_threads(impl, threads)
    rows = []
    for case in case_table.select(names):
        layers, total = weight_bytes(case)
        # per layer, arrays of w_hh's and w_ih's sizes, read the way the call reads the weights
        rng = np.random.default_rng(0)
        arrays = [tuple(rng.standard_normal(n // 4).astype(np.float32) for n in sizes)
                  for sizes in layers]

        def read_call():
            for a_hh, a_ih in arrays:
                for _ in range(case.directions):
                    read(a_hh, threads, case.steps)
                    read(a_ih, threads, 1)

        read_call()                                   # compile (or load) before timing
        calls = {impl: runners.prepare(case, impl)[0] for impl in impls}
        for call in calls.values():
            call()
        samples = {name: [] for name in ["read"] + list(impls)}
        for _ in range(rounds):
            samples["read"].append(_median_time(read_call, 1, min_time))
            for impl, call in calls.items():
                samples[impl].append(_median_time(call, 1, min_time))
        for name, got in samples.items():
            seconds = statistics.median(got)
            fraction = None if name == "read" else statistics.median(
                r / s for r, s in zip(samples["read"], got))
            rows.append({"case": case.name, "impl": name, "ms": 1e3 * seconds,
                         "GB/s": total / seconds / 1e9, "of read": fraction,
                         "MiB": total / 2**20})
    return rows


def markdown(rows, threads, rounds):
    lines = [f"CPU: {cpu_name()}; {threads} threads each, medians of {rounds} alternating "
             f"rounds", "",
             "| case | weight MiB a call | what | ms | GB/s | of the read |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = "" if r["of read"] is None else f"{r['of read']:.2f}"
        lines.append(f"| {r['case']} | {r['MiB']:.0f} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['GB/s']:.1f} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help=f"case names (default: {', '.join(DEFAULT_CASES)})")
    p.add_argument("--backends", default="numba,cython")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to this file")
    args = p.parse_args(argv)
    impls = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.no_torch:
        impls.append(runners.TORCH)
    for line in installed.summary():
        print(line)
    rows = measure(args.cases or list(DEFAULT_CASES), impls, args.threads, args.rounds,
                   args.min_time)
    report(markdown(rows, args.threads, args.rounds), args.markdown)


if __name__ == "__main__":
    main()
