"""The ``fastrnn`` command: train a character-level language model, then sample from it.

    fastrnn train [--text FILE] [--cell lstm|gru] [--hidden 256] [--layers 2] [--steps N] ...
    fastrnn sample CHECKPOINT [--length 500] [--temperature 0.8] [--prime TEXT] [--seed N]

Also ``python -m fastrnn``. Errors about options and files are one line on stderr; the exit
statuses are in ``EXIT_STATUSES`` (and ``fastrnn train --help``). Ctrl-C (SIGINT) and SIGTERM
during training save the checkpoint first, as does an error; a model whose parameters are not
finite is saved beside the checkpoint, never over it.
"""
import argparse
import contextlib
import hashlib
import math
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from . import charlm, distributed, quantized
from .dispatch import (BackendUnavailable, _openblas_threads_functions, get_backend,
                       limit_numpy_blas_threads, resolve)
from .train import NonFiniteGradientError

__all__ = ["main", "build_parser", "DEFAULT_STEPS"]

# Updates of the default run (2-layer LSTM, hidden 256, batch 32 x 100 steps), chosen so that
# `fastrnn train` ends in about two minutes on a 2-core machine with the fastest backend; the
# measurement is in the README.
DEFAULT_STEPS = 300
# held-out characters read by the evaluations during training (the last one reads them all)
EVAL_CHARS = 16_384
BACKEND_CHOICES = ("auto", "reference", "numba", "cython")
# The options that make a run: fixed by the checkpoint on --resume. Their defaults:
RUN_DEFAULTS = {"cell": "lstm", "hidden": 256, "layers": 2, "embed": 64, "window": 100,
                "bptt": None, "batch": 32, "lr": 2e-3, "clip": 5.0, "dropout": 0.0,
                "layer_norm": False, "zoneout": 0.0, "dtype": "float32", "seed": 0}
EXIT_STATUSES = """\
exit status:
  0    done
  1    a file that cannot be used (missing, unreadable, not UTF-8, empty or too short
       for --batch; a damaged checkpoint), a checkpoint that could not be written, or
       training stopped: the gradient was not finite in more than --max-skipped updates
       in a row, or the model's parameters became NaN or infinite (then saved beside
       --out, not over it)
  2    a bad option
  130  interrupted by Ctrl-C (SIGINT); the checkpoint is saved first
  143  terminated by SIGTERM (kill, timeout, job schedulers); the checkpoint is saved first
"""


class UsageError(Exception):
    """An option that cannot be used; the message names it."""


def _int_at_least(minimum, maximum=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            expected = (f"an integer >= {minimum}" if maximum is None
                        else f"an integer in [{minimum}, {maximum:,}]")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
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
                    "and sample from it.",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample}")

    train = commands.add_parser(
        "train", help="train a character-level language model",
        description="Train a character-level language model (embedding, stacked LSTM or GRU, "
                    "softmax) with truncated BPTT on parallel streams of a text; by default the "
                    "Python standard library's own sources. Shows the training loss, held-out "
                    "bits per character and speed; saves a checkpoint (also on Ctrl-C, SIGTERM "
                    "or an error) and prints a sample. An update whose gradient is not finite "
                    "is skipped, never applied. Under `mpiexec -n N` it trains on N processes, "
                    "each on its share of --batch (data-parallel; needs the mpi extra; see "
                    "docs/distributed.md).",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the run's options have no argparse default, so that --resume can tell which were given
    run = argparse.SUPPRESS
    train.add_argument("--text", metavar="FILE",
                       help="UTF-8 text to train on; its last 10%% is held out "
                            "(default: Python's standard library sources)")
    train.add_argument("--cell", choices=("lstm", "gru"), default=run,
                       help="recurrent cell (default lstm)")
    train.add_argument("--hidden", type=_int_at_least(1), default=run,
                       help="hidden units per layer (default 256)")
    train.add_argument("--layers", type=_int_at_least(1), default=run,
                       help="recurrent layers (default 2)")
    train.add_argument("--embed", type=_int_at_least(1), default=run,
                       help="character embedding size (default 64)")
    train.add_argument("--window", type=_int_at_least(1), default=run,
                       help="time steps per update, k1 of truncated BPTT (default 100)")
    train.add_argument("--bptt", type=_int_at_least(1), default=run, metavar="K2",
                       help="steps back-propagated per update, k2 >= --window "
                            "(default: --window)")
    train.add_argument("--batch", type=_int_at_least(1), default=run,
                       help="parallel streams (default 32)")
    train.add_argument("--steps", type=_int_at_least(1), default=DEFAULT_STEPS,
                       help=f"updates (default {DEFAULT_STEPS}, about two minutes; with "
                            "--resume, updates more)")
    train.add_argument("--lr", type=_positive_float, default=run,
                       help="Adam learning rate (default 0.002)")
    train.add_argument("--clip", type=_positive_float, default=run,
                       help="clip the gradient to this global norm (default 5)")
    train.add_argument("--dropout", type=_fraction, default=run,
                       help="dropout between recurrent layers, so only with --layers 2 or more "
                            "(default 0)")
    train.add_argument("--layer-norm", action="store_true", default=run,
                       help="layer-normalized LSTM or GRU cells (the products and the LSTM's "
                            "cell state normalized; see the README)")
    train.add_argument("--zoneout", type=_fraction, default=run, metavar="Z",
                       help="zoneout: in training each state unit keeps its previous value "
                            "with probability Z at each step (LSTM: h and c alike; default 0)")
    train.add_argument("--dtype", choices=("float32", "float64"), default=run,
                       help="floating-point type (default float32)")
    train.add_argument("--seed", type=_int_at_least(0), default=run,
                       help="seed of the initial weights, the dropout and the final sample "
                            "(default 0)")
    train.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                       help="kernel backend (default auto: the fastest available)")
    train.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                       help="threads of the backend's compiled kernels (numba: also its BLAS) "
                            "(default: the backend's default)")
    train.add_argument("--out", default="charlm.npz", metavar="CHECKPOINT",
                       help="checkpoint file to write (default charlm.npz); an existing file "
                            "that is not a fastrnn checkpoint is refused without --force")
    train.add_argument("--force", action="store_true",
                       help="replace --out even if it is not a fastrnn checkpoint")
    train.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue the run saved in CHECKPOINT for --steps more updates, "
                            "with its model, options, optimizer state, stream positions and "
                            "random generators (exactly as if it had not stopped); the run's "
                            "options (--cell ... --seed) cannot be given again")
    train.add_argument("--save-every", type=_int_at_least(1), default=None, metavar="N",
                       help="also save the checkpoint every N updates (default: at the end)")
    train.add_argument("--max-skipped", type=_int_at_least(0), default=10, metavar="N",
                       help="stop with an error when the gradient is not finite (NaN or "
                            "infinity) in more than N updates in a row; such updates are "
                            "skipped, never applied (default 10)")
    train.add_argument("--eval-every", type=_int_at_least(1), default=50, metavar="N",
                       help="measure held-out bits per character every N updates on its first "
                            f"{EVAL_CHARS:,} characters (default 50)")
    train.add_argument("--sample-length", type=_int_at_least(0, charlm.MAX_SAMPLE_LENGTH),
                       default=400, metavar="N", help="characters sampled at the end "
                                                      "(default 400)")
    train.add_argument("--temperature", type=_positive_float, default=0.8,
                       help="temperature of the final sample (default 0.8)")

    sample = commands.add_parser(
        "sample", help="sample text from a trained checkpoint",
        description="Print text drawn one character at a time from a checkpoint written by "
                    "`fastrnn train`, after the --prime text.",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz from fastrnn train")
    sample.add_argument("--length", type=_int_at_least(0, charlm.MAX_SAMPLE_LENGTH),
                        default=500, help="characters to draw (default 500)")
    sample.add_argument("--temperature", type=_positive_float, default=0.8,
                        help="softmax temperature: lower is more conservative (default 0.8)")
    sample.add_argument("--prime", default="",
                        help="text the model reads first and the sample continues "
                             "(default: a newline)")
    sample.add_argument("--seed", type=_int_at_least(0), default=None,
                        help="seed of the draws (default: a fresh one each time)")
    sample.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="kernel backend (default auto)")
    sample.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                        help="threads of the backend's compiled kernels (default: the "
                             "backend's default)")
    sample.add_argument("--quantize", choices=quantized.FORMATS, default=None,
                        help="run the recurrent layers with bfloat16 or int8 weights "
                             "(fastrnn.quantize; on the Cython kernels, or NumPy's with "
                             "--backend reference)")
    return parser


class TrainingStopped(Exception):
    """Training could not go on (non-finite gradients or parameters); what was trained is
    saved, the message says where. Exit status 1."""


def main(argv=None):
    """Run the command; returns the exit status (see ``EXIT_STATUSES``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.comm = None
    status, alone = _run(args)
    if alone:
        # the other ranks wait in a collective for this one: only MPI_Abort ends them
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)     # mpiexec relays output through a proxy; Abort at once can drop it
        args.comm.Abort(status)
    return status


def _run(args):
    """The exit status, and whether this rank stops while the others go on (distributed
    training only: then the job must be aborted)."""
    try:
        if args.command == "train" and distributed.launched_by_mpiexec():
            _join_ranks(args)
        if args.command == "sample" and distributed.rank_from_environment() > 0:
            return 0, False     # sampling is not distributed: under mpiexec rank 0 alone does it
        if args.threads is not None:
            _set_threads(args.threads, args.backend)
        _quiet_numpy_blas(args.backend)
        if args.command == "train":
            return _train(args), False
        return _sample(args), False
    except UsageError as exc:
        return _fail(args, exc, 2, f"fastrnn {args.command}: error: {exc}")
    except (charlm.CorpusError, charlm.CheckpointError, charlm.CheckpointSaveError,
            BackendUnavailable, TrainingStopped, MemoryError, distributed.MPIUnavailable,
            distributed.PeerTimeout) as exc:
        return _fail(args, exc, 1, f"fastrnn {args.command}: error: {exc}")
    except _PeerFailed as exc:
        return exc.status, False
    except _Signalled as exc:
        return _fail(args, exc, 128 + exc.signum, f"\nfastrnn: {exc.name}")
    except KeyboardInterrupt as exc:
        return _fail(args, exc, 130, "\nfastrnn: interrupted")
    except BrokenPipeError:  # e.g. `fastrnn sample ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0, False
    except Exception:
        if args.comm is None:
            raise
        traceback.print_exc()
        return _fail(args, None, 1, "fastrnn train: error: failed (the traceback is above)")


def _fail(args, exc, status, message):
    """Print ``message`` (under MPI: rank 0 for what all ranks met, any rank for its own
    trouble, named); returns ``(status, alone)``."""
    comm = args.comm
    agreed = exc is not None and (isinstance(exc, (_Signalled, TrainingStopped))
                                  or getattr(exc, "fastrnn_agreed", False))
    if comm is None or comm.rank == 0 or not agreed or getattr(exc, "fastrnn_rank0_ok", False):
        if comm is not None and comm.rank > 0:
            message = f"rank {comm.rank}: {message.lstrip()}"
        print(message, file=sys.stderr)
    return status, comm is not None and comm.size > 1 and not agreed


class _PeerFailed(Exception):
    """Another rank could not start training (it says why); this one stops with its status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def _status_of(exc):
    if isinstance(exc, UsageError):
        return 2
    if isinstance(exc, _Signalled):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def _join_ranks(args):
    """Under mpiexec: the communicator, and --threads by default the cores of this machine
    shared among the ranks on it (the backend's default would give each rank all of them)."""
    MPI = distributed.mpi()
    comm = MPI.COMM_WORLD
    args.comm = comm
    if args.threads is None:
        on_this_machine = comm.Split_type(MPI.COMM_TYPE_SHARED).size
        if on_this_machine > 1:
            args.threads = max(1, (os.cpu_count() or 1) // on_this_machine)


def _agree_setup(comm, exc, digest=None):
    """Every rank learns whether every rank is ready to train (and read the same text): if
    one is not, each raises, the failing ranks their own error, the others ``_PeerFailed``;
    so all stop together before the first collective of training."""
    status = 0 if exc is None else _status_of(exc)
    reports = comm.allgather((status, digest))
    root_status, root_digest = reports[0]
    other_text = [r for r, (st, d) in enumerate(reports) if st == 0 and d != root_digest]
    if not any(st for st, _ in reports) and not other_text:
        return
    if exc is None and comm.rank in other_text and root_status == 0:
        exc = charlm.CorpusError("the text to train on differs from rank 0's (every rank "
                                 "must read the same --text)")
    if exc is None:
        raise _PeerFailed(max(max(st for st, _ in reports), 1))
    exc.fastrnn_agreed = True
    exc.fastrnn_rank0_ok = root_status == 0
    raise exc


# ---------------------------------------------------------------------------------------------
# signals: the first SIGINT or SIGTERM stops training; later ones wait until the save is done

class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM received during training."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.name = "interrupted" if signum == signal.SIGINT else "terminated"


class _StopSignals:
    """While installed, the first SIGINT or SIGTERM raises ``_Signalled`` (outside ``held()``
    blocks; inside one, when the block ends) and later ones are only remembered, so a second
    Ctrl-C cannot stop the save the first one started. Signals that were ignored when the
    command started (a background job's SIGINT) stay ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, comm=None):
        self.received = None
        self.comm = comm            # under MPI: raised only when the ranks agree (``agree``)
        self._holding = False
        self._raised = False
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        if not self._holding:
            self.raise_if_received()

    def raise_if_received(self):
        """Raise ``_Signalled`` once for the first signal received (a handler's exception can be
        lost when it lands in a finalizer; the training loop asks again after each update)."""
        if self.received is not None and not self._raised and self.comm is None:
            self._raised = True
            raise _Signalled(self.received)

    def agree(self):
        """Under MPI, after an update: if any rank received a signal, every rank raises
        ``_Signalled`` here, at the same update, so none is left waiting in a collective
        (mpiexec passes Ctrl-C and SIGTERM on to every rank)."""
        if self.comm is None:
            return self.raise_if_received()
        mine = np.array([self.received or 0], dtype=np.int64)
        request = self.comm.Iallreduce(distributed.mpi().IN_PLACE, mine,
                                       op=distributed.mpi().MAX)
        distributed.wait_all([request], what="the ranks' stop signals")
        if mine[0] and not self._raised:
            self._raised = True
            raise _Signalled(int(mine[0]))

    @contextlib.contextmanager
    def held(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        self.raise_if_received()


# ---------------------------------------------------------------------------------------------

def _set_threads(n, backend):
    """Threads of the backend that will run (the others are not loaded or touched)."""
    try:
        module = get_backend(backend)
    except (ValueError, BackendUnavailable):
        return          # reported when the model is built
    setter = getattr(module, "set_num_threads", None)
    if setter is None:
        return          # the reference backend: NumPy's own threads
    try:
        setter(n)
    except ValueError as exc:
        raise UsageError(f"--threads: {exc}") from None
    # SciPy's BLAS too (the numba backend's setter does so itself): under mpiexec each rank's
    # BLAS threads otherwise spin on the cores of the other ranks (2 ranks x 1 thread, main
    # job, AMD EPYC 2 cores: 13,000 chars/s with SciPy's BLAS on 2 threads, 27,000 on 1)
    blas, _ = _openblas_threads_functions("scipy")
    if blas is not None:
        blas(n)


def _quiet_numpy_blas(backend):
    """The model's dense products (embedding, head) are small: NumPy's BLAS on one thread, so
    that its spinning threads do not take the cores from the recurrent kernels' (see
    fastrnn.dispatch.limit_numpy_blas_threads). The reference backend runs on NumPy's BLAS:
    left as it is."""
    try:
        name = resolve(backend)
    except (TypeError, ValueError, BackendUnavailable):
        return          # reported when the model is built
    if name != "reference":
        limit_numpy_blas_threads(1)


def _check_out(path, text, force):
    """--out: a file name in an existing, writable directory, not the training text, and
    either new or a fastrnn checkpoint (unless --force)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--out: expected a file name, got the directory {path}")
    if not os.path.isdir(directory):
        raise UsageError(f"--out: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"--out: cannot write in {directory} (permission denied)")
    if not os.path.exists(path):
        return
    if text and os.path.exists(text) and os.path.samefile(path, text):
        raise UsageError(f"--out: {path} is the text to train on (--text); the checkpoint "
                         "would replace it: choose another file name")
    if not force and not charlm.is_checkpoint(path):
        raise UsageError(f"--out: {path} exists and is not a fastrnn checkpoint; give another "
                         "file name, or --force to replace it")


def _beside(path):
    """Where a model with non-finite parameters goes instead of ``path``."""
    root, ext = os.path.splitext(path)
    return f"{root}.nonfinite{ext or '.npz'}"


def _training_memory(options, vocab_size):
    """Bytes that training this model needs, roughly: weights, gradients and Adam's two
    moments, and one update's activations."""
    itemsize = np.dtype(options["dtype"]).itemsize
    params = charlm.num_params(vocab_size, options["embed"], options["hidden"],
                               options["layers"], options["cell"], options["layer_norm"])
    steps = (options["bptt"] or options["window"]) * options["batch"]
    per_step = (options["embed"] + options["layers"] * options["hidden"] * 8 + 3 * vocab_size)
    return params, (4 * params + steps * per_step) * itemsize


def _check_memory(options, vocab_size):
    params, need = _training_memory(options, vocab_size)
    have = charlm.physical_memory()
    if have is not None and need > have:
        raise UsageError(
            f"--hidden {options['hidden']}, --embed {options['embed']}, --layers "
            f"{options['layers']}: a model of {params:,} parameters; training it needs about "
            f"{charlm.format_bytes(need)} (weights, gradients, Adam's two moments and the "
            f"activations of an update, {options['dtype']}), more than this machine's "
            f"{charlm.format_bytes(have)} of memory")


def _duration(seconds):
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"


def _text_digest(corpus):
    return hashlib.sha256((corpus.train + "\0" + corpus.heldout).encode("utf-8")).hexdigest()


def _run_options(args):
    """The run's options: from the command line with the defaults, or (with --resume) from the
    checkpoint, where giving one again is refused."""
    given = {k: getattr(args, k) for k in RUN_DEFAULTS if hasattr(args, k)}
    if not args.resume:
        return {**RUN_DEFAULTS, **given}, None
    if given:
        name = next(iter(given))
        raise UsageError(f"--{name}: the run's options come from the checkpoint with "
                         f"--resume; leave --{name} out")
    model, vocab, config = charlm.load_checkpoint(args.resume, backend=args.backend)
    training = charlm.load_training_state(args.resume)
    if training is None or "options" not in config:
        raise charlm.CheckpointError(
            f"checkpoint {args.resume}: holds no training state (saved by an older fastrnn or "
            "without it); it can be sampled but not resumed")
    # a checkpoint from before an option existed ran with its default
    return {**RUN_DEFAULTS, **config["options"]}, (model, vocab, config, training)


def _train(args):
    started = time.perf_counter()
    comm = args.comm
    try:
        prepared = _prepare(args)
    except Exception as exc:
        if comm is not None:
            _agree_setup(comm, exc)
        raise
    options, resumed, corpus, text_path, digest, vocab, model = prepared
    if comm is not None:
        _agree_setup(comm, None, digest)
    train_ids = vocab.encode(corpus.train)
    heldout_ids = vocab.encode(corpus.heldout)
    trainer = charlm.Trainer(model, train_ids, heldout_ids, batch=options["batch"],
                             window=options["window"], k2=options["bptt"], lr=options["lr"],
                             clip=options["clip"], max_skipped=args.max_skipped, comm=comm)
    problem = None
    if resumed:
        try:
            trainer.load_state_dict(resumed[3])
        except (KeyError, TypeError, ValueError) as exc:
            problem = charlm.CheckpointError(f"checkpoint {args.resume}: damaged training "
                                             f"state ({type(exc).__name__}: {exc})")
    if comm is not None:
        _agree_setup(comm, problem, digest)
    if problem is not None:
        raise problem
    with (contextlib.redirect_stdout(open(os.devnull, "w")) if comm is not None and comm.rank
          else contextlib.nullcontext()):
        return _train_prepared(args, started, options, resumed, corpus, text_path, digest,
                               vocab, trainer)


def _prepare(args):
    """Everything each rank does alone before training: options, text, model."""
    options, resumed = _run_options(args)
    if options["bptt"] is not None and options["bptt"] < options["window"]:
        raise UsageError(f"--bptt: expected a number >= --window ({options['window']}), "
                         f"got {options['bptt']}")
    if options["dropout"] > 0 and options["layers"] == 1:
        raise UsageError(f"--dropout {options['dropout']:g}: dropout acts between recurrent "
                         "layers, so with --layers 1 it would do nothing; use --layers 2 or "
                         "more, or leave --dropout out")
    text_path = args.text or (options["text"] if resumed else None)
    if args.comm is None or args.comm.rank == 0:          # rank 0 alone writes it
        _check_out(args.out, text_path, args.force)
    if args.comm is not None:
        try:
            distributed.batch_share(options["batch"], args.comm.size, args.comm.rank)
        except ValueError as exc:
            raise UsageError(f"{exc} (mpiexec -n {args.comm.size})") from None
    corpus = charlm.text_corpus(text_path) if text_path else charlm.stdlib_corpus()
    need = 2 * options["batch"] + 1
    if len(corpus.train) < need or len(corpus.heldout) < 2:
        where = f"--text: {text_path}" if text_path else "the corpus"
        raise charlm.CorpusError(
            f"{where} has {len(corpus.train) + len(corpus.heldout):,} characters; --batch "
            f"{options['batch']} needs at least {math.ceil(need / 0.9) + 2:,} (90% for "
            "training, 10% held out)")
    digest = _text_digest(corpus)
    if resumed:
        model, vocab, config, _ = resumed
        if digest != config.get("text_sha256"):
            raise charlm.CorpusError(
                f"{'--text: ' + text_path if text_path else 'the corpus'} is not the text the "
                f"checkpoint {args.resume} was trained on ({config.get('corpus')})")
    else:
        vocab = charlm.Vocabulary.from_text(corpus.train + corpus.heldout)
        _check_memory(options, len(vocab))
        model = charlm.CharLM(len(vocab), embed=options["embed"], hidden=options["hidden"],
                              layers=options["layers"], cell=options["cell"],
                              dropout=options["dropout"], layer_norm=options["layer_norm"],
                              zoneout=options["zoneout"], dtype=options["dtype"],
                              backend=args.backend, seed=options["seed"])
    return options, resumed, corpus, text_path, digest, vocab, model


def _train_prepared(args, started, options, resumed, corpus, text_path, digest, vocab,
                    trainer):
    model, comm = trainer.model, args.comm
    heldout_ids = trainer.heldout_ids
    first = trainer.updates
    print(f"corpus: {corpus.description}")
    print(f"        {len(corpus.train):,} characters for training, {len(heldout_ids):,} held out, "
          f"vocabulary of {len(vocab)}")
    print(f"model:  {options['layers']}-layer {options['cell'].upper()}, hidden "
          f"{options['hidden']}, embedding {options['embed']}, {model.num_params():,} "
          f"parameters, {options['dtype']}, backend {model.backend}"
          + (f", dropout {options['dropout']:g}" if options["dropout"] else "")
          + (", layer norm" if options["layer_norm"] else "")
          + (f", zoneout {options['zoneout']:g}" if options["zoneout"] else ""))
    print(("resume: " if resumed else "train:  ")
          + (f"from update {first} of {args.resume}, " if resumed else "")
          + f"{args.steps} updates of {options['batch']} streams x {options['window']} steps"
          + (f" (back-propagating {options['bptt']})" if options["bptt"] else "")
          + f", Adam lr {options['lr']:g}, clip {options['clip']:g}", flush=True)
    if comm is not None:
        print(f"ranks:  {comm.size} (MPI), {options['batch'] // comm.size} streams each"
              + (f", --threads {args.threads}" if args.threads else ""), flush=True)

    info = {"steps": first, "batch": options["batch"], "window": options["window"],
            "bptt": options["bptt"], "lr": options["lr"], "clip": options["clip"],
            "seed": options["seed"], "corpus": corpus.description,
            "heldout_bpc": resumed[2].get("heldout_bpc") if resumed else None,
            "options": {**options, "text": os.path.abspath(text_path) if text_path else None},
            "text_sha256": digest}
    if comm is not None:
        info["ranks"] = comm.size
    signals = _StopSignals(comm)
    signals.install()
    try:
        return _train_loop(args, trainer, vocab, info, signals, started)
    finally:
        signals.restore()


def _save(args, trainer, vocab, info, signals):
    """Save the checkpoint with its training state (signals held off); a model whose
    parameters are not finite goes beside --out. Returns ``(path, finite)``. Under MPI every
    rank calls it (the carried states are gathered) and rank 0 writes."""
    model = trainer.model
    with signals.held():
        training = trainer.state_dict()
        if not _is_root(args):
            return args.out, not any(not np.isfinite(p).all() for p in model.params.values())
        try:
            charlm.save_checkpoint(args.out, model, vocab, info, training)
            return args.out, True
        except charlm.NonFiniteParameters:
            beside = _beside(args.out)
            charlm.save_checkpoint(beside, model, vocab, info, training, allow_nonfinite=True)
            return beside, False


def _is_root(args):
    return args.comm is None or args.comm.rank == 0


def _tell(args, text):
    """A line on stderr, from rank 0 alone under MPI."""
    if _is_root(args):
        print(text, file=sys.stderr)


def _nonfinite_message(args, info, path):
    return (f"the model's parameters are not finite (NaN or infinity) after {info['steps']} "
            f"updates (--lr too large?): saved to {path}; {args.out} is left as it was")


def _train_loop(args, trainer, vocab, info, signals, started):
    """The updates with their progress bar, the final evaluation, the saves, the final sample;
    on any exception what was trained is saved first."""
    from tqdm import tqdm

    first = trainer.updates
    heldout = math.nan
    train_seconds, chars = 0.0, 0
    root = _is_root(args)
    bar = tqdm(total=args.steps, desc="training", unit="update", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True, disable=not root)
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            update = trainer.update()
            train_seconds += time.perf_counter() - t0
            chars += update.steps * trainer.batch
            info["steps"] = trainer.updates
            if root and trainer.updates % args.eval_every == 0:
                heldout = trainer.heldout_bpc(max_chars=EVAL_CHARS)
                info["heldout_bpc"] = heldout
            shown = "--" if math.isnan(heldout) else f"{heldout:.3f}"
            skipped = f", skipped {trainer.skipped}" if trainer.skipped else ""
            bar.set_postfix_str(f"loss {update.loss / math.log(2):.3f}, held-out {shown} "
                                f"bits/char, {chars / train_seconds:,.0f} chars/s{skipped}",
                                refresh=False)
            bar.update()
            if args.save_every and trainer.updates % args.save_every == 0:
                path, finite = _save(args, trainer, vocab, info, signals)
                if not finite:
                    raise TrainingStopped(_nonfinite_message(args, info, path))
            signals.agree()
        with signals.held():
            bar.close()
        if root:
            heldout = trainer.heldout_bpc()                   # all of the held-out text
            info["heldout_bpc"] = heldout
            info["heldout_chars"] = len(trainer.heldout_ids)
    except (TrainingStopped, charlm.CheckpointSaveError):
        raise                                   # saved (or tried to) already
    except BaseException as exc:
        with signals.held():
            bar.close()
        info["seconds"] = round(time.perf_counter() - started, 1)
        if trainer.updates == first:
            _tell(args, "stopped before the first update; nothing saved")
            raise
        if args.comm is not None and not isinstance(exc, (_Signalled, NonFiniteGradientError)):
            raise       # this rank's alone: the others cannot join a save; the job is aborted
        path, finite = _save(args, trainer, vocab, info, signals)
        done = f"after {trainer.updates} updates"
        if isinstance(exc, NonFiniteGradientError):
            raise TrainingStopped(f"stopped {done}: {exc}; checkpoint saved to {path}") \
                from None
        if not finite:
            _tell(args, f"stopped {done}; " + _nonfinite_message(args, info, path))
        elif isinstance(exc, KeyboardInterrupt):
            name = exc.name if isinstance(exc, _Signalled) else "interrupted"
            _tell(args, f"{name} {done}; checkpoint saved to {path}")
        else:
            _tell(args, f"error {done} ({type(exc).__name__}); checkpoint saved to {path}")
        raise
    info["seconds"] = round(time.perf_counter() - started, 1)
    path, finite = _save(args, trainer, vocab, info, signals)
    if not finite:
        raise TrainingStopped(_nonfinite_message(args, info, path))
    if not root:
        return 0
    options = info["options"]
    print(f"done:   {args.steps} updates, {chars:,} characters in {_duration(train_seconds)} of "
          f"training ({chars / train_seconds:,.0f} chars/s), "
          f"{_duration(time.perf_counter() - started)} in all"
          + (f"; {trainer.skipped} skipped (gradient not finite)" if trainer.skipped else ""))
    print(f"held-out: {heldout:.3f} bits per character ({len(trainer.heldout_ids):,} characters)")
    print(f"checkpoint: {path}")
    print(f"sample (temperature {args.temperature:g}, seed {options['seed']}):")
    text = _draw(trainer.model, vocab, args.sample_length, args.temperature,
                 seed=options["seed"])
    print(text, flush=True)
    return 0


def _draw(model, vocab, length, temperature, prime="", seed=None):
    """charlm.sample with its complaints about --temperature as usage errors."""
    try:
        return charlm.sample(model, vocab, length, temperature, prime=prime, seed=seed)
    except ValueError as exc:
        if str(exc).startswith("temperature:"):
            raise UsageError(f"--{exc}") from None
        raise charlm.CheckpointError(str(exc)) from None


def _sample(args):
    model, vocab, _ = charlm.load_checkpoint(args.checkpoint, backend=args.backend)
    if args.quantize:
        try:
            model.rnn = quantized.quantize(
                model.rnn, args.quantize,
                backend="reference" if args.backend == "reference" else "auto")
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--quantize {args.quantize}: {exc}") from None
    try:
        vocab.encode(args.prime, name="--prime")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    text = _draw(model, vocab, args.length, args.temperature, prime=args.prime, seed=args.seed)
    sys.stdout.write(args.prime + text + "\n")
    sys.stdout.flush()
    return 0
