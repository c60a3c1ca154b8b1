"""What the layers' options cost: a layer with ONNX's ``activations``, ``clip`` or
``input_forget``, Keras's ``recurrent_dropout`` or PyTorch's ``proj_size`` (H/2) against the
same layer without them, per compiled backend, training and inference.

    python -m bench.options [--backends numba,cython] [--rounds 7] [--markdown FILE]

Each round times every variant once, in turn (alternating, in one process), and a variant's
figure is the median over rounds of its best of ``--repeat`` calls; the ratio is the median of
the per-round ratios to the plain layer. Everything float32, 2 threads (fastrnn's default).
"""
import argparse
import platform
import statistics
import time

import numpy as np

import fastrnn

# (name, layer class, kind, B, I, H, T): shapes of bench/cases.py's lstm-train-256,
# lstm-infer-256-b4 and gru-infer-1024-b2
SHAPES = (
    ("lstm-train-256", "LSTM", "train", 32, 256, 256, 150),
    ("lstm-infer-256-b4", "LSTM", "infer", 4, 256, 256, 150),
    ("gru-train-512", "GRU", "train", 32, 512, 512, 50),
)
VARIANTS = {
    "LSTM": (("plain", {}), ("clip=3", {"clip": 3.0}),
             ("input_forget", {"input_forget": True}),
             ("activations", {"activations": ("hardsigmoid", "softsign", "softsign")}),
             ("recurrent_dropout", {"recurrent_dropout": 0.25}),
             ("proj_size=H/2", {"proj_size": "H/2"})),
    "GRU": (("plain", {}), ("clip=3", {"clip": 3.0}),
            ("activations", {"activations": ("hardsigmoid", "softsign")}),
            ("recurrent_dropout", {"recurrent_dropout": 0.25})),
}


def _runner(mode, kind, B, I, H, T, backend, options):
    options = {k: H // 2 if v == "H/2" else v for k, v in options.items()}
    layer = getattr(fastrnn, mode)(I, H, dtype=np.float32, backend=backend, seed=0, **options)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, layer.output_size)).astype(np.float32)
    if kind == "infer":
        return lambda: layer(x)

    def train():
        _, _, cache = layer.forward(x, train=True)
        layer.backward(dy, cache)
    return train


def _best(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(backends, rounds, repeat):
    rows = []
    for name, mode, kind, B, I, H, T in SHAPES:
        for backend in backends:
            # recurrent dropout acts in training only
            variants = [v for v in VARIANTS[mode]
                        if kind == "train" or "recurrent_dropout" not in v[1]]
            runners = [_runner(mode, kind, B, I, H, T, backend, opts) for _, opts in variants]
            for fn in runners:
                fn()                                    # compile, warm the caches
            times = [[] for _ in variants]
            for _ in range(rounds):
                for k, fn in enumerate(runners):
                    times[k].append(_best(fn, repeat))
            for k, (label, _) in enumerate(variants):
                ratio = statistics.median(t / p for t, p in zip(times[k], times[0]))
                rows.append((name, backend, label, statistics.median(times[k]) * 1e3, ratio))
    return rows


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(rows, rounds, repeat):
    lines = [f"CPU: {cpu_name()}; float32; medians of {rounds} alternating rounds, best of "
             f"{repeat} calls each", "",
             "| case | backend | options | ms | x plain |", "|---|---|---|---|---|"]
    for name, backend, label, ms, ratio in rows:
        lines.append(f"| {name} | {backend} | {label} | {ms:.2f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="numba,cython")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    report(markdown(measure(backends, args.rounds, args.repeat), args.rounds, args.repeat),
           args.markdown)


class ChildTimer:
    """A spawned process that times its runners whenever asked (PyTorch's, whose threads would
    otherwise spin on the cores this process's kernels need): ``target(connection, *args)``
    sends its results each time it receives True and stops on False."""

    def __init__(self, target, *args):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=target, args=(child,) + args, daemon=True)
        self.process.start()

    def time(self):
        self.connection.send(True)
        return self.connection.recv()

    def close(self):
        self.connection.send(False)
        self.process.join()


def report(text, path=None):
    """Print the table, and write it to ``path`` too when one is given."""
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
