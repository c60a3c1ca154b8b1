"""What layer normalization costs, and what it saves over PyTorch: a layer-normalized LSTM or
GRU (``layer_norm=True``) training call against the same layer without it, per backend that
has the cells, and against the same model in PyTorch written as its users must (a loop over
time of torch products and ``nn.LayerNorm``, autograd; PyTorch fuses no such cell).

    python -m bench.layer_norm [--backends cython,numba] [--rounds 7] [--markdown FILE]

Each round times every variant once, in turn (alternating; the PyTorch loop in a process of
its own); a variant's figure is the median over rounds of its best of ``--repeat`` calls, a
ratio the median of the per-round ratios. Float32; fastrnn on its default threads (every
core), PyTorch on 2.
"""
import argparse
import statistics

import numpy as np

import fastrnn
from bench.options import _best, cpu_name, report

# (name, layer class, B, I, H, T): bench/cases.py's lstm-train-256, and a GRU of that size
SHAPES = (("lstm-train-256", "LSTM", 32, 256, 256, 150),
          ("gru-train-256", "GRU", 32, 256, 256, 150))


def _fastrnn_runner(mode, B, I, H, T, backend, layer_norm):
    layer = getattr(fastrnn, mode)(I, H, dtype=np.float32, backend=backend, seed=0,
                                   layer_norm=layer_norm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)

    def train():
        _, _, cache = layer.forward(x, train=True)
        layer.backward(dy, cache)
    return train


def torch_loop(torch, mode, I, H):
    """The layer-normalized cell as a PyTorch user writes it (as PyTorch's own
    benchmarks/fastrnns/custom_lstms.py does, with the carried c not normalized, the
    equations of fastrnn's cells), run over time in Python."""
    nn = torch.nn
    G = 4 if mode == "LSTM" else 3

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.ih = nn.Linear(I, G * H)
            self.hh = nn.Linear(H, G * H)
            self.ln_ih, self.ln_hh = nn.LayerNorm(G * H), nn.LayerNorm(G * H)
            self.ln_cell = nn.LayerNorm(H)

        def forward(self, x, state):
            # the Linear layers' biases stand for b_ih and b_hh, added after the norms in
            # fastrnn: the same work
            if mode == "LSTM":
                h, c = state
                a = self.ln_ih(x @ self.ih.weight.T) + self.ln_hh(h @ self.hh.weight.T) \
                    + self.ih.bias + self.hh.bias
                i, f, g, o = a.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                return torch.sigmoid(o) * torch.tanh(self.ln_cell(c)), c
            (h,) = state
            nx = self.ln_ih(x @ self.ih.weight.T) + self.ih.bias
            nh = self.ln_hh(h @ self.hh.weight.T) + self.hh.bias
            x_r, x_z, x_n = nx.chunk(3, 1)
            h_r, h_z, h_n = nh.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return ((1 - z) * n + z * h,)

    return Cell()


def _torch_runner(mode, B, I, H, T):
    import torch
    torch.set_num_threads(2)
    cell = torch_loop(torch, mode, I, H)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((T, B, I)).astype(np.float32), requires_grad=True)
    dy = torch.tensor(rng.standard_normal((T, B, H)).astype(np.float32))

    def train():
        state = tuple(torch.zeros(B, H) for _ in range(2 if mode == "LSTM" else 1))
        ys = []
        for t in range(T):
            state = cell(x[t], state)
            ys.append(state[0])
        torch.stack(ys).backward(dy)
    return train


def _torch_process(connection, mode, B, I, H, T, repeat):
    """In a process of its own (PyTorch's threads would otherwise spin on the cores fastrnn's
    threads need, and the other way round): time the PyTorch loop once per request."""
    fn = _torch_runner(mode, B, I, H, T)
    fn()
    while connection.recv():
        connection.send(_best(fn, repeat))


class _InChild:
    """A runner whose best-of-``repeat`` time comes from _torch_process."""

    def __init__(self, mode, B, I, H, T, repeat):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_torch_process,
                                       args=(child, mode, B, I, H, T, repeat), daemon=True)
        self.process.start()

    def time(self):
        self.connection.send(True)
        return self.connection.recv()

    def close(self):
        self.connection.send(False)
        self.process.join()


def measure(backends, rounds, repeat, with_torch=True):
    rows = []
    for name, mode, B, I, H, T in SHAPES:
        labels, runners = [], []
        for backend in backends:
            labels += [(backend, "plain"), (backend, "layer_norm")]
            runners += [_fastrnn_runner(mode, B, I, H, T, backend, False),
                        _fastrnn_runner(mode, B, I, H, T, backend, True)]
        child = _InChild(mode, B, I, H, T, repeat) if with_torch else None
        if with_torch:
            labels.append(("torch", "layer_norm, Python loop"))
        for fn in runners:
            fn()                                    # compile, warm the caches
        times = [[] for _ in labels]
        for _ in range(rounds):
            for k, fn in enumerate(runners):
                times[k].append(_best(fn, repeat))
            if child is not None:
                times[-1].append(child.time())
        if child is not None:
            child.close()
        for k, (impl, label) in enumerate(labels):
            row = {"case": name, "impl": impl, "variant": label,
                   "ms": statistics.median(times[k]) * 1e3}
            if impl != "torch" and label == "layer_norm":
                plain, torch_k = labels.index((impl, "plain")), len(labels) - 1
                row["x plain"] = statistics.median(a / b for a, b in zip(times[k], times[plain]))
                if with_torch:
                    row["speedup over torch"] = statistics.median(
                        b / a for a, b in zip(times[k], times[torch_k]))
            rows.append(row)
    return rows


def markdown(rows, rounds, repeat):
    lines = [f"CPU: {cpu_name()}; float32, training (forward + backward); medians of "
             f"{rounds} alternating rounds, best of {repeat} calls each", "",
             "| case | implementation | variant | ms | x plain | speedup over the PyTorch loop |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['x plain']:.2f}" if "x plain" in r else ""
        speedup = f"{r['speedup over torch']:.2f}" if "speedup over torch" in r else ""
        lines.append(f"| {r['case']} | {r['impl']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{ratio} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(
        b for b in fastrnn.backends() if b != "reference"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="without the PyTorch loop")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    rows = measure(backends, args.rounds, args.repeat, with_torch=not args.no_torch)
    report(markdown(rows, args.rounds, args.repeat), args.markdown)


if __name__ == "__main__":
    main()
