"""What tests/test_distributed.py runs on each rank under ``mpiexec -n N`` (and, without
mpiexec, in one process as the oracle): a tiny character model trained for a few updates.

    python tests/mpi_worker.py train OUT.npz --dtype float64 --steps 3 [--k2 K] [--seed-by-rank]
    python tests/mpi_worker.py die --steps 100       # rank 1 kills itself after 2 updates
    python tests/mpi_worker.py nonfinite OUT.npz     # rank 1's 2nd gradient is NaN
    python tests/mpi_worker.py layer OUT.npz         # TruncatedBPTT(comm=) on a bare GRU

``train`` writes on rank 0: the parameters, the losses of the updates and the largest
difference between any rank's parameters and rank 0's.
"""
import argparse
import os
import signal
import sys

import numpy as np

TEXT = ("def f(x):\n    return x * 2 + 1\n\nclass A:\n    pass\n" * 40)
BATCH = 4


def train(comm, dtype="float64", steps=3, k2=None, seed=0, backend="reference", clip=5.0,
          lr=0.01, window=7, after_update=None):
    """Parameters and update losses after ``steps`` updates of the batch of ``BATCH`` streams
    (this rank's share of it when ``comm`` is given)."""
    from fastrnn import charlm
    vocab = charlm.Vocabulary.from_text(TEXT)
    ids = vocab.encode(TEXT)
    model = charlm.CharLM(len(vocab), embed=5, hidden=6, layers=2, cell="lstm", dtype=dtype,
                          backend=backend, seed=seed)
    trainer = charlm.Trainer(model, ids[:1500], ids[1500:], batch=BATCH, window=window, k2=k2,
                             lr=lr, clip=clip, comm=comm)
    losses = []
    for _ in range(steps):
        losses.append(trainer.update().loss)
        if after_update is not None:
            after_update(trainer)
    return model, trainer, np.array(losses)


def train_layer(comm, dtype="float64", steps=3, seed=0):
    """A 2-layer GRU regressing random targets with ``TruncatedBPTT(comm=)`` and Adam: the
    driver on a model without buckets (one bucket of everything)."""
    import fastrnn
    from fastrnn import distributed
    from fastrnn.train import Adam, TruncatedBPTT, mse_loss
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4 * steps, BATCH, 3))
    target = rng.standard_normal((4 * steps, BATCH, 4))
    model = fastrnn.GRU(3, 4, 2, dtype=dtype, backend="reference", seed=seed)
    rows = slice(None)
    if comm is not None:
        distributed.broadcast_parameters(comm, model.params)
        rows = distributed.batch_share(BATCH, comm.size, comm.rank)
    driver = TruncatedBPTT(model, mse_loss, Adam(model.params, lr=0.01), 4, 6, clip_norm=1.0,
                           comm=comm)
    losses = [u.loss for u in driver.run(x[:, rows], target[:, rows])]
    return model, np.array(losses)


def largest_difference_from_rank_0(comm, params):
    """The largest difference between any rank's parameters and rank 0's (0: all agree)."""
    from fastrnn import distributed
    flat = np.concatenate([p.ravel() for p in params.values()]).astype(np.float64)
    return comm.allreduce(float(np.max(np.abs(flat - comm.bcast(flat, root=0)))),
                          op=distributed.mpi().MAX)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "die", "nonfinite", "layer"))
    parser.add_argument("out", nargs="?")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k2", type=int, default=None)
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--seed-by-rank", action="store_true")
    parser.add_argument("--backend", default="reference")
    args = parser.parse_args(argv)
    from fastrnn import distributed
    comm = distributed.world()

    if args.mode == "layer":
        model, losses = train_layer(comm, args.dtype, args.steps,
                                    seed=comm.rank if args.seed_by_rank else 0)
        spread = largest_difference_from_rank_0(comm, model.params)
        if comm.rank == 0:
            np.savez(args.out, losses=losses, spread=spread,
                     **{"param/" + k: v for k, v in model.params.items()})
        return 0
    skipped = []

    def after_update(trainer):
        skipped.append(trainer.skipped)
        if args.mode == "die" and comm.rank == 1 and trainer.updates == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.mode == "nonfinite" and comm.rank == 1 and trainer.updates == 1:
            loss = trainer.driver.loss

            def nan_once(y, target):          # this rank alone sees a NaN gradient, once
                trainer.driver.loss = loss
                value, dy = loss(y, target)
                return value, dy * np.nan
            trainer.driver.loss = nan_once

    model, trainer, losses = train(
        comm, args.dtype, args.steps, args.k2, seed=comm.rank if args.seed_by_rank else 0,
        backend=args.backend, clip=args.clip, after_update=after_update)
    spread = largest_difference_from_rank_0(comm, model.params)
    state = trainer.state_dict()                 # collective: the whole batch's on rank 0
    if comm.rank == 0:
        h, c = state["driver"]["state"]
        np.savez(args.out, losses=losses, spread=spread, state_h=h, state_c=c,
                 skipped=np.array(skipped),
                 **{"param/" + k: v for k, v in model.params.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
