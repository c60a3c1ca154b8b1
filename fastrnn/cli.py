"""The ``fastrnn`` command: train a character-level language model, then sample from it.

    fastrnn train [--text FILE] [--cell lstm|gru] [--hidden 256] [--layers 2] [--steps N] ...
    fastrnn sample CHECKPOINT [--length 500] [--temperature 0.8] [--prime TEXT] [--seed N]

Also ``python -m fastrnn``. Errors about options and files are one line on stderr (exit status 2
for bad options, 1 for files that cannot be used); Ctrl-C during training saves the checkpoint
and exits with status 130.
"""
import argparse
import math
import os
import signal
import sys
import threading
import time

from . import charlm
from .dispatch import BackendUnavailable

__all__ = ["main", "build_parser", "DEFAULT_STEPS"]

# Updates of the default run (2-layer LSTM, hidden 256, batch 32 x 100 steps), chosen so that
# `fastrnn train` ends in about two minutes on a 2-core machine with the fastest backend; the
# measurement is in the README.
DEFAULT_STEPS = 300
# held-out characters read by the evaluations during training (the last one reads them all)
EVAL_CHARS = 16_384
BACKEND_CHOICES = ("auto", "reference", "numba", "cython")


class UsageError(Exception):
    """An option that cannot be used; the message names it."""


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _float_where(accept, expected):
    """An argparse type: a float that ``accept`` takes (NaN and non-numbers never are)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_float = _float_where(lambda v: math.isfinite(v) and v > 0, "a positive number")
_fraction = _float_where(lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastrnn",
        description="Train a character-level language model with fastrnn's kernels, "
                    "and sample from it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample}")

    train = commands.add_parser(
        "train", help="train a character-level language model",
        description="Train a character-level language model (embedding, stacked LSTM or GRU, "
                    "softmax) with truncated BPTT on parallel streams of a text; by default the "
                    "Python standard library's own sources. Shows the training loss, held-out "
                    "bits per character and speed; saves a checkpoint (also on Ctrl-C) and "
                    "prints a sample.")
    train.add_argument("--text", metavar="FILE",
                       help="UTF-8 text to train on; its last 10%% is held out "
                            "(default: Python's standard library sources)")
    train.add_argument("--cell", choices=("lstm", "gru"), default="lstm",
                       help="recurrent cell (default lstm)")
    train.add_argument("--hidden", type=_int_at_least(1), default=256,
                       help="hidden units per layer (default 256)")
    train.add_argument("--layers", type=_int_at_least(1), default=2,
                       help="recurrent layers (default 2)")
    train.add_argument("--embed", type=_int_at_least(1), default=64,
                       help="character embedding size (default 64)")
    train.add_argument("--window", type=_int_at_least(1), default=100,
                       help="time steps per update, k1 of truncated BPTT (default 100)")
    train.add_argument("--bptt", type=_int_at_least(1), default=None, metavar="K2",
                       help="steps back-propagated per update, k2 >= --window "
                            "(default: --window)")
    train.add_argument("--batch", type=_int_at_least(1), default=32,
                       help="parallel streams (default 32)")
    train.add_argument("--steps", type=_int_at_least(1), default=DEFAULT_STEPS,
                       help=f"updates (default {DEFAULT_STEPS}, about two minutes)")
    train.add_argument("--lr", type=_positive_float, default=2e-3,
                       help="Adam learning rate (default 0.002)")
    train.add_argument("--clip", type=_positive_float, default=5.0,
                       help="clip the gradient to this global norm (default 5)")
    train.add_argument("--dropout", type=_fraction, default=0.0,
                       help="dropout between recurrent layers (default 0)")
    train.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="floating-point type (default float32)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the initial weights and the final sample (default 0)")
    train.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                       help="kernel backend (default auto: the fastest available)")
    train.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                       help="threads of the compiled kernels and their BLAS "
                            "(default: fastrnn's default)")
    train.add_argument("--out", default="charlm.npz", metavar="CHECKPOINT",
                       help="checkpoint file to write (default charlm.npz)")
    train.add_argument("--eval-every", type=_int_at_least(1), default=50, metavar="N",
                       help="measure held-out bits per character every N updates on its first "
                            f"{EVAL_CHARS:,} characters (default 50)")
    train.add_argument("--sample-length", type=_int_at_least(0), default=400, metavar="N",
                       help="characters sampled at the end (default 400)")
    train.add_argument("--temperature", type=_positive_float, default=0.8,
                       help="temperature of the final sample (default 0.8)")

    sample = commands.add_parser(
        "sample", help="sample text from a trained checkpoint",
        description="Print text drawn one character at a time from a checkpoint written by "
                    "`fastrnn train`, after the --prime text.")
    sample.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz from fastrnn train")
    sample.add_argument("--length", type=_int_at_least(0), default=500,
                        help="characters to draw (default 500)")
    sample.add_argument("--temperature", type=_positive_float, default=0.8,
                        help="softmax temperature: lower is more conservative (default 0.8)")
    sample.add_argument("--prime", default="",
                        help="text the model reads first and the sample continues "
                             "(default: a newline)")
    sample.add_argument("--seed", type=int, default=None,
                        help="seed of the draws (default: a fresh one each time)")
    sample.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="kernel backend (default auto)")
    sample.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                        help="threads of the compiled kernels (default: fastrnn's default)")
    return parser


def main(argv=None):
    """Run the command; returns the exit status (0 ok, 1 unusable file, 2 bad option,
    130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            _set_threads(args.threads)
        if args.command == "train":
            return _train(args)
        return _sample(args)
    except UsageError as exc:
        print(f"fastrnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (charlm.CorpusError, charlm.CheckpointError, BackendUnavailable) as exc:
        print(f"fastrnn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfastrnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fastrnn sample ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------------------------------------

def _set_threads(n):
    from . import set_num_threads
    try:
        set_num_threads(n)
    except ValueError as exc:
        raise UsageError(f"--threads: {exc}") from None


def _check_writable(path):
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--out: expected a file name, got the directory {path}")
    if not os.path.isdir(directory):
        raise UsageError(f"--out: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"--out: cannot write in {directory} (permission denied)")


def _save(path, model, vocab, info):
    """Save with Ctrl-C held off, so that a second Ctrl-C cannot stop the checkpoint half-way."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        charlm.save_checkpoint(path, model, vocab, info)
    except OSError as exc:
        raise UsageError(f"--out: cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _duration(seconds):
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"


def _train(args):
    from tqdm import tqdm

    started = time.perf_counter()
    if args.bptt is not None and args.bptt < args.window:
        raise UsageError(f"--bptt: expected a number >= --window ({args.window}), "
                         f"got {args.bptt}")
    _check_writable(args.out)
    corpus = charlm.text_corpus(args.text) if args.text else charlm.stdlib_corpus()
    need = 2 * args.batch + 1
    if len(corpus.train) < need or len(corpus.heldout) < 2:
        where = f"--text: {args.text}" if args.text else "the corpus"
        raise UsageError(f"{where} has {len(corpus.train) + len(corpus.heldout):,} characters; "
                         f"--batch {args.batch} needs at least {math.ceil(need / 0.9) + 2:,} "
                         f"(90% for training, 10% held out)")
    vocab = charlm.Vocabulary.from_text(corpus.train + corpus.heldout)
    train_ids = vocab.encode(corpus.train)
    heldout_ids = vocab.encode(corpus.heldout)
    model = charlm.CharLM(len(vocab), embed=args.embed, hidden=args.hidden, layers=args.layers,
                          cell=args.cell, dropout=args.dropout, dtype=args.dtype,
                          backend=args.backend, seed=args.seed)
    trainer = charlm.Trainer(model, train_ids, heldout_ids, batch=args.batch,
                             window=args.window, k2=args.bptt, lr=args.lr, clip=args.clip)
    print(f"corpus: {corpus.description}")
    print(f"        {len(train_ids):,} characters for training, {len(heldout_ids):,} held out, "
          f"vocabulary of {len(vocab)}")
    print(f"model:  {args.layers}-layer {args.cell.upper()}, hidden {args.hidden}, embedding "
          f"{args.embed}, {model.num_params():,} parameters, {args.dtype}, "
          f"backend {model.backend}")
    print(f"train:  {args.steps} updates of {args.batch} streams x {args.window} steps"
          + (f" (back-propagating {args.bptt})" if args.bptt else "")
          + f", Adam lr {args.lr:g}, clip {args.clip:g}", flush=True)

    info = {"steps": 0, "batch": args.batch, "window": args.window, "bptt": args.bptt,
            "lr": args.lr, "clip": args.clip, "seed": args.seed,
            "corpus": corpus.description, "heldout_bpc": None}
    heldout = math.nan
    train_seconds, chars = 0.0, 0
    interrupted = False
    bar = tqdm(total=args.steps, desc="training", unit="update", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
    try:
        for i in range(args.steps):
            t0 = time.perf_counter()
            update = trainer.update()
            train_seconds += time.perf_counter() - t0
            chars += update.steps * args.batch
            info["steps"] = i + 1
            if (i + 1) % args.eval_every == 0:
                heldout = trainer.heldout_bpc(max_chars=EVAL_CHARS)
                info["heldout_bpc"] = heldout
            shown = "--" if math.isnan(heldout) else f"{heldout:.3f}"
            bar.set_postfix_str(f"loss {update.loss / math.log(2):.3f}, held-out {shown} "
                                f"bits/char, {chars / train_seconds:,.0f} chars/s",
                                refresh=False)
            bar.update()
        bar.close()
        heldout = trainer.heldout_bpc()                   # all of the held-out text
        info["heldout_bpc"] = heldout
        info["heldout_chars"] = len(heldout_ids)
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
    info["seconds"] = round(time.perf_counter() - started, 1)
    _save(args.out, model, vocab, info)
    if interrupted:
        print(f"interrupted after {info['steps']} updates; checkpoint saved to {args.out}",
              file=sys.stderr)
        return 130
    print(f"done:   {args.steps} updates, {chars:,} characters in {_duration(train_seconds)} of "
          f"training ({chars / train_seconds:,.0f} chars/s), "
          f"{_duration(time.perf_counter() - started)} in all")
    print(f"held-out: {heldout:.3f} bits per character ({len(heldout_ids):,} characters)")
    print(f"checkpoint: {args.out}")
    print(f"sample (temperature {args.temperature:g}, seed {args.seed}):")
    text = charlm.sample(model, vocab, args.sample_length, args.temperature, seed=args.seed)
    print(text, flush=True)
    return 0


def _sample(args):
    model, vocab, _ = charlm.load_checkpoint(args.checkpoint, backend=args.backend)
    try:
        vocab.encode(args.prime, name="--prime")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    text = charlm.sample(model, vocab, args.length, args.temperature, prime=args.prime,
                         seed=args.seed)
    sys.stdout.write(args.prime + text + "\n")
    sys.stdout.flush()
    return 0
