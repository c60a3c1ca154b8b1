"""What the fused regularizers cost, and what they save over PyTorch: a layer-normalized
(``layer_norm=True``) or zoned-out (``zoneout=0.1``) LSTM or GRU training call against the same
layer without them, per compiled backend, and against the same model in PyTorch written as its
users must (a loop over time: of torch products and ``nn.LayerNorm``, or of ``nn.LSTMCell`` /
``nn.GRUCell`` mixing the states with zoneout's masks; autograd; PyTorch fuses neither).
``--variants layer_norm_proj`` adds the layer-normalized LSTM with ``proj_size = H/2`` (its
loop projects h with a Linear layer), ``zoneout_proj`` the zoned-out one, both against the
plain layer without projection.

    python -m bench.regularizers [--backends cython,numba] [--variants layer_norm,zoneout]
                                 [--rounds 7] [--markdown FILE]

Each round times every variant once, in turn (alternating; the PyTorch loop in a process of
its own); a variant's figure is the median over rounds of its best of ``--repeat`` calls, a
ratio the median of the per-round ratios. Float32; fastrnn on its default threads (every
core), PyTorch on 2.
"""
import argparse
import statistics

import numpy as np

import fastrnn
from bench import installed
from bench.options import ChildTimer, _best, cpu_name, report

# (name, layer class, B, I, H, T): bench/cases.py's lstm-train-256, and a GRU of that size
SHAPES = (("lstm-train-256", "LSTM", 32, 256, 256, 150),
          ("gru-train-256", "GRU", 32, 256, 256, 150))


# variant: the layer's options; "layer_norm_proj" (LSTM only) with proj_size = H // 2
VARIANTS = {"plain": {}, "layer_norm": {"layer_norm": True}, "zoneout": {"zoneout": 0.1},
            "layer_norm_proj": {"layer_norm": True, "proj_size": "H/2"},
            "zoneout_proj": {"zoneout": 0.1, "proj_size": "H/2"}}


def _variants(mode, variants):
    """Those of ``variants`` a layer of this mode takes (a projection: LSTM only)."""
    return tuple(v for v in variants if mode == "LSTM" or "proj_size" not in VARIANTS[v])


def _proj_size(variant, H):
    return H // 2 if "proj_size" in VARIANTS[variant] else 0


def _fastrnn_runner(mode, B, I, H, T, backend, variant):
    options = dict(VARIANTS[variant])
    if "proj_size" in options:
        options["proj_size"] = _proj_size(variant, H)
    layer = getattr(fastrnn, mode)(I, H, dtype=np.float32, backend=backend, seed=0, **options)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, layer.output_size)).astype(np.float32)

    def train():
        _, _, cache = layer.forward(x, train=True)
        layer.backward(dy, cache)
    return train


def torch_loop(torch, mode, I, H, P=0):
    """The layer-normalized cell as a PyTorch user writes it (as PyTorch's own
    benchmarks/fastrnns/custom_lstms.py does, with the carried c not normalized, the
    equations of fastrnn's cells), run over time in Python; P > 0: an LSTM whose h is
    projected to P units (h = W_hr (o * tanh(LN(c))), as nn.LSTM's proj_size)."""
    nn = torch.nn
    G = 4 if mode == "LSTM" else 3

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.ih = nn.Linear(I, G * H)
            self.hh = nn.Linear(P or H, G * H)
            self.ln_ih, self.ln_hh = nn.LayerNorm(G * H), nn.LayerNorm(G * H)
            self.ln_cell = nn.LayerNorm(H)
            self.hr = nn.Linear(H, P, bias=False) if P else None

        def forward(self, x, state):
            # the Linear layers' biases stand for b_ih and b_hh, added after the norms in
            # fastrnn: the same work
            if mode == "LSTM":
                h, c = state
                a = self.ln_ih(x @ self.ih.weight.T) + self.ln_hh(h @ self.hh.weight.T) \
                    + self.ih.bias + self.hh.bias
                i, f, g, o = a.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(self.ln_cell(c))
                return (self.hr(h) if self.hr is not None else h), c
            (h,) = state
            nx = self.ln_ih(x @ self.ih.weight.T) + self.ih.bias
            nh = self.ln_hh(h @ self.hh.weight.T) + self.hh.bias
            x_r, x_z, x_n = nx.chunk(3, 1)
            h_r, h_z, h_n = nh.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return ((1 - z) * n + z * h,)

    return Cell()


def torch_zoneout_loop(torch, mode, I, H, z, P=0):
    """Zoneout as a PyTorch user writes it: PyTorch's own cell, its new state mixed with the
    one before by masks drawn per step (as fastrnn's layer draws them); P > 0: an LSTM whose h
    is projected to P units (nn.LSTMCell has no projection: the cell written out, h = W_hr (o *
    tanh(c)), as nn.LSTM's proj_size)."""
    nn = torch.nn
    if P:
        ih, hh, hr = nn.Linear(I, 4 * H), nn.Linear(P, 4 * H), nn.Linear(H, P, bias=False)

        def cell(x, state):
            h, c = state
            i, f, g, o = (ih(x) + hh(h)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return hr(torch.sigmoid(o) * torch.tanh(c)), c
    else:
        cell = nn.LSTMCell(I, H) if mode == "LSTM" else nn.GRUCell(I, H)

    def step(x, state):
        new = cell(x, state if mode == "LSTM" else state[0])
        new = new if mode == "LSTM" else (new,)
        keeps = [(torch.rand(s.shape) < z).float() for s in new]
        return tuple(k * s + (1 - k) * n for k, s, n in zip(keeps, state, new))
    return step


def _torch_runner(mode, B, I, H, T, variant):
    import torch
    torch.set_num_threads(2)
    P = _proj_size(variant, H)
    cell = torch_loop(torch, mode, I, H, P) if "layer_norm" in VARIANTS[variant] else \
        torch_zoneout_loop(torch, mode, I, H, VARIANTS[variant]["zoneout"], P)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((T, B, I)).astype(np.float32), requires_grad=True)
    dy = torch.tensor(rng.standard_normal((T, B, P or H)).astype(np.float32))

    def train():
        state = (torch.zeros(B, P or H),) + ((torch.zeros(B, H),) if mode == "LSTM" else ())
        ys = []
        for t in range(T):
            state = cell(x[t], state)
            ys.append(state[0])
        torch.stack(ys).backward(dy)
    return train


def _torch_process(connection, mode, B, I, H, T, repeat, variants):
    """In a process of its own (PyTorch's threads would otherwise spin on the cores fastrnn's
    threads need, and the other way round): time each variant's PyTorch loop once per
    request."""
    fns = [_torch_runner(mode, B, I, H, T, variant) for variant in variants]
    for fn in fns:
        fn()
    while connection.recv():
        connection.send([_best(fn, repeat) for fn in fns])


def measure(backends, rounds, repeat, with_torch=True, variants=("layer_norm", "zoneout")):
    rows = []
    all_variants = variants
    for name, mode, B, I, H, T in SHAPES:
        variants = _variants(mode, all_variants)
        labels, runners = [], []
        for backend in backends:
            for variant in ("plain",) + tuple(variants):
                labels.append((backend, variant))
                runners.append(_fastrnn_runner(mode, B, I, H, T, backend, variant))
        child = ChildTimer(_torch_process, mode, B, I, H, T, repeat, variants) \
            if with_torch else None
        torch_labels = [("torch", f"{variant}, Python loop") for variant in variants] \
            if with_torch else []
        for fn in runners:
            fn()                                    # compile, warm the caches
        times = [[] for _ in labels + torch_labels]
        for _ in range(rounds):
            for k, fn in enumerate(runners):
                times[k].append(_best(fn, repeat))
            if child is not None:
                for k, seconds in enumerate(child.time()):
                    times[len(labels) + k].append(seconds)
        if child is not None:
            child.close()
        for k, (impl, label) in enumerate(labels + torch_labels):
            row = {"case": name, "impl": impl, "variant": label,
                   "ms": statistics.median(times[k]) * 1e3}
            if impl != "torch" and label != "plain":
                plain = labels.index((impl, "plain"))
                row["x plain"] = statistics.median(a / b for a, b in zip(times[k], times[plain]))
                if with_torch:
                    torch_k = len(labels) + list(variants).index(label)
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
    p.add_argument("--variants", default="layer_norm,zoneout",
                   help="of " + ", ".join(v for v in VARIANTS if v != "plain"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="without the PyTorch loop")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    for line in installed.summary():       # which fastrnn is timed, as bench.report says
        print(line)
    backends = [b for b in args.backends.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS) | {"plain"} & set(variants)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}")
    rows = measure(backends, args.rounds, args.repeat, with_torch=not args.no_torch,
                   variants=variants)
    report(markdown(rows, args.rounds, args.repeat), args.markdown)


if __name__ == "__main__":
    main()
