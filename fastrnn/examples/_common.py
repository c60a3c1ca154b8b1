"""What the examples share: their command line, the model built from named parts, the loop."""
import argparse
import sys

import fastrnn


def parse_args(name, description, steps, threads, argv=None):
    """--steps (default ``steps``), --seed, --backend, as every example takes them, and
    --threads (default ``threads``), which it sets with ``fastrnn.set_num_threads``."""
    parser = argparse.ArgumentParser(prog=f"python -m fastrnn.examples.{name}",
                                     description=description)
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"training updates (default {steps})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data and of the initial weights (default 0)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "reference", "numba", "cython"],
                        help="kernels of the recurrent layers (default auto: the fastest here)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"threads of fastrnn's kernels, fastrnn.set_num_threads "
                             f"(default {threads})")
    args = parser.parse_args(argv)
    for option in ("steps", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option}: expected an integer >= 1, got {getattr(args, option)}")
    try:
        fastrnn.get_backend(args.backend)
    except fastrnn.BackendUnavailable as exc:
        parser.error(f"--backend: {exc}")
    fastrnn.set_num_threads(args.threads)
    fastrnn.limit_numpy_blas_threads(1)     # the dense layers are small; see its docstring
    return args


class Model:
    """Named parts (``fastrnn.train`` modules and recurrent layers) seen as one: ``params`` and
    ``grads`` hold every part's arrays as ``part.name`` (the same arrays, so an optimizer built
    on ``params`` updates the parts), ``zero_grad`` zeroes them all."""

    def __init__(self, **parts):
        self.parts = parts
        self.params = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.params.items()}
        self.grads = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.grads.items()}

    def __getattr__(self, name):
        try:
            return self.__dict__["parts"][name]
        except KeyError:
            raise AttributeError(name) from None

    def zero_grad(self):
        for m in self.parts.values():
            m.zero_grad()


def train(model, batches, step, steps, *, lr, clip=5.0):
    """``steps`` updates with Adam and the gradient norm clipped to ``clip``: ``step(batch) ->
    loss`` runs forward and backward on the next of ``batches`` (gradients zeroed before).
    The learning rate falls linearly from ``lr`` to ``lr / 10``: the last updates settle
    instead of jumping about. Shows progress with the running loss."""
    from tqdm import tqdm

    optimizer = fastrnn.train.Adam(model.params, lr=lr)
    running = None
    with tqdm(range(steps), desc="training", unit="update", file=sys.stderr, mininterval=0.5,
              dynamic_ncols=True) as bar:
        for i in bar:
            optimizer.lr = lr * (1 - 0.9 * i / steps)
            model.zero_grad()
            loss = step(next(batches))
            fastrnn.train.clip_grad_norm(model.grads, clip)
            optimizer.step(model.grads)
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.set_postfix_str(f"loss {running:.4f}", refresh=False)
