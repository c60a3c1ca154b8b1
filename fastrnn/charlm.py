"""The character-level language model: embedding, stacked LSTM or GRU, dense layer, softmax.

    corpus = stdlib_corpus()                       # or text_corpus("my.txt")
    vocab = Vocabulary.from_text(corpus.train + corpus.heldout)
    model = CharLM(len(vocab), hidden=256, layers=2, cell="lstm", seed=0)
    trainer = Trainer(model, vocab.encode(corpus.train), vocab.encode(corpus.heldout))
    for _ in range(300):
        trainer.update()                           # one truncated-BPTT window, one Adam step
    print(trainer.heldout_bpc())                   # held-out bits per character
    print(sample(model, vocab, 200, temperature=0.8, prime="def ", seed=1))
    save_checkpoint("charlm.npz", model, vocab, {"steps": 300})

Training walks ``batch`` parallel streams of the training text (the text cut into ``batch``
equal pieces) in windows of ``window`` characters with ``fastrnn.train.TruncatedBPTT``, carrying
the recurrent state from window to window.
"""
from collections import namedtuple
import codecs
import glob
import io
import json
import math
import os
import sys
import sysconfig
import tempfile
import zipfile
import zlib

import numpy as np

from . import layers
from .dispatch import BackendUnavailable
from .train import (Adam, Embedding, Linear, TruncatedBPTT, softmax_cross_entropy,
                    _check_same_keys, _load_arrays, _positive_int)

__all__ = [
    "CharLM", "Vocabulary", "Trainer", "Corpus", "CorpusError", "CheckpointError",
    "STDLIB_TRAIN_MODULES", "STDLIB_HELDOUT_MODULES", "stdlib_corpus", "text_corpus",
    "split_text", "streams", "evaluate", "sample", "save_checkpoint", "load_checkpoint",
    "load_training_state", "is_checkpoint", "ModelTooLarge", "NonFiniteParameters",
    "CheckpointSaveError", "MAX_SAMPLE_LENGTH", "num_params", "physical_memory",
]


class CorpusError(Exception):
    """The text to train on cannot be read or used."""


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or not one of ours."""


class NonFiniteParameters(CheckpointError):
    """The model to save holds NaN or infinity: saving it over a checkpoint would lose that one."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written where asked; ``saved_to`` names where its content went
    instead (None if nowhere)."""

    def __init__(self, message, saved_to=None):
        super().__init__(message)
        self.saved_to = saved_to


class ModelTooLarge(MemoryError):
    """The model asked for cannot be held in this machine's memory; the message says how much
    it needs."""


# ---------------------------------------------------------------------------------------------
# the default corpus: Python's own standard library, read from the running interpreter

# Fixed lists, read in this order. A module is the file <stdlib>/<a/b>.py or, for a package,
# <stdlib>/<a/b>/__init__.py, so that a module turned into a package in a later Python is still
# found. The text therefore depends on the Python version; within one version it is fixed.
STDLIB_TRAIN_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codeop",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fnmatch", "ftplib", "functools", "gettext", "glob", "hashlib", "hmac", "http.client",
    "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "numbers", "operator",
    "optparse", "os", "posixpath", "queue", "random", "sched", "secrets", "selectors", "shutil",
    "socket", "statistics", "string", "subprocess", "tempfile", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest.case", "urllib.parse", "weakref",
)
# held out: whole modules the model never trains on
STDLIB_HELDOUT_MODULES = ("fractions", "heapq", "pprint", "textwrap")

Corpus = namedtuple("Corpus", "train heldout description")


def _stdlib_file(stdlib, module):
    base = os.path.join(stdlib, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def stdlib_corpus(stdlib_dir=None):
    """The sources of ``STDLIB_TRAIN_MODULES`` (train) and ``STDLIB_HELDOUT_MODULES`` (held
    out) of the running interpreter, each list concatenated in its order. Modules missing from
    this Python are skipped; a part with none of its modules raises ``CorpusError``."""
    stdlib = stdlib_dir or sysconfig.get_path("stdlib")
    parts, counts = [], []
    for modules in (STDLIB_TRAIN_MODULES, STDLIB_HELDOUT_MODULES):
        texts = []
        for module in modules:
            path = _stdlib_file(stdlib, module)
            if path is None:
                continue
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        if not texts:
            raise CorpusError(
                f"the Python standard library sources are not in {stdlib} (none of "
                f"{', '.join(modules[:3])}, ... found; some installations ship only compiled "
                "files): train on your own text with --text FILE")
        parts.append("".join(texts))
        counts.append(len(texts))
    version = ".".join(map(str, sys.version_info[:3]))
    description = (f"Python {version} standard library sources, {counts[0]} modules for "
                   f"training and {counts[1]} held out ({stdlib})")
    return Corpus(parts[0], parts[1], description)


def split_text(text, heldout_fraction=0.1):
    """``(train, heldout)``: the last ``heldout_fraction`` of ``text`` is held out, cut at the
    start of a line when there is one in the last tenth before the cut point."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {heldout_fraction!r}")
    cut = int(round(len(text) * (1 - heldout_fraction)))
    newline = text.rfind("\n", cut - max(1, len(text) // 10), cut)
    if newline > 0:
        cut = newline + 1
    return text[:cut], text[cut:]


def text_corpus(path, heldout_fraction=0.1):
    """A user's UTF-8 text file, split by ``split_text``. Raises ``CorpusError`` if the file
    cannot be read or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CorpusError(f"--text: cannot read {path}: {exc.strerror or exc}") from None
    wide = _wide_encoding(data)
    if wide:
        raise CorpusError(f"--text: {path} is {wide} text, not UTF-8; convert it first, e.g. "
                          f"iconv -f {wide} -t utf-8 {path} > text.txt")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"--text: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} cannot be decoded); convert it first, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > text.txt") from None
    if not text:
        raise CorpusError(f"--text: {path} is empty")
    train, heldout = split_text(text, heldout_fraction)
    return Corpus(train, heldout, f"{path}, {len(text):,} characters")


def _wide_encoding(data):
    """'UTF-32' or 'UTF-16' if ``data`` looks like text in one (a byte order mark, or a zero
    byte at most even or most odd offsets, as ASCII characters give), else None."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    head = data[:4096]
    half = len(head) // 2
    if half >= 8 and max(head[0::2].count(0), head[1::2].count(0)) > 0.4 * half:
        return "UTF-16"
    return None


# ---------------------------------------------------------------------------------------------
# vocabulary

class Vocabulary:
    """The characters a model knows, sorted by code point; character <-> index."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("chars: expected at least one character, got none")
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(text)

    def __len__(self):
        return len(self.chars)

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and other.chars == self.chars

    def encode(self, text, name="text"):
        """An int64 array of the indices of ``text``'s characters; unknown ones raise."""
        try:
            return np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError:
            unknown = sorted(set(text) - set(self.chars))
            raise ValueError(f"{name}: expected characters of the vocabulary, got "
                             f"{''.join(unknown)!r} which it does not have") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in np.asarray(ids).reshape(-1))


# ---------------------------------------------------------------------------------------------
# the model

_CELLS = {"lstm": layers.LSTM, "gru": layers.GRU}
_GATES = {"lstm": 4, "gru": 3}


def num_params(vocab_size, embed, hidden, layers, cell, layer_norm=False):
    """The parameter count of ``CharLM`` with these sizes, computed without building it."""
    V, E, H, L, G = vocab_size, embed, hidden, layers, _GATES[cell]
    rnn = G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2)
    if layer_norm:      # gains and shifts of both products (and of an LSTM's cell state)
        rnn += L * (4 * G * H + (2 * H if cell == "lstm" else 0))
    return V * E + rnn + H * V + V


def physical_memory():
    """Bytes of memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024


def _zoneout_config(zoneout):
    """A layer's zoneout as the config keeps it: one number, or an LSTM's [z_c, z_h] when
    they differ."""
    if isinstance(zoneout, tuple):
        return zoneout[0] if zoneout[0] == zoneout[1] else list(zoneout)
    return zoneout


class CharLM:
    """Embedding -> ``layers``-layer LSTM or GRU -> Linear: next-character logits.

    Has the layer API the training driver uses (``params``/``grads`` named ``embedding.*``,
    ``rnn.*`` and ``head.*`` and shared with the three parts, so optimizers update them)::

        logits, state = model(idx, state=None)                      # idx (T, B) ints
        logits, state, cache = model.forward(idx, state, train=True)
        _, dstate = model.backward(dlogits, cache, dstate=None)     # ADDS into grads
    """

    def __init__(self, vocab_size, *, embed=64, hidden=256, layers=2, cell="lstm",
                 dropout=0.0, layer_norm=False, zoneout=0.0, dtype=np.float32, backend="auto",
                 seed=None):
        if cell not in _CELLS:
            raise ValueError(f"cell: expected 'lstm' or 'gru', got {cell!r}")
        sizes = {name: _positive_int(name, value) for name, value in
                 (("vocab_size", vocab_size), ("embed", embed), ("hidden", hidden),
                  ("layers", layers))}
        count = num_params(**sizes, cell=cell, layer_norm=bool(layer_norm))
        need = 2 * count * np.dtype(dtype).itemsize              # the weights and their gradients
        have = physical_memory()
        if have is not None and need > have:
            raise ModelTooLarge(
                f"a {layers}-layer {cell.upper()} with hidden {hidden}, embedding {embed} and "
                f"{vocab_size} characters has {count:,} parameters: {format_bytes(need)} for "
                f"its weights and gradients in {np.dtype(dtype).name}, more than this machine's "
                f"{format_bytes(have)} of memory")
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3)]
        self.embedding = Embedding(vocab_size, embed, dtype=dtype, seed=seeds[0])
        self.rnn = _CELLS[cell](embed, hidden, layers, dropout=dropout, layer_norm=layer_norm,
                                zoneout=zoneout, dtype=dtype, backend=backend, seed=seeds[1])
        self.head = Linear(hidden, vocab_size, dtype=dtype, seed=seeds[2])
        self.cell = cell
        self.dtype = np.dtype(dtype)
        self.batch_first = False
        self._parts = {"embedding": self.embedding, "rnn": self.rnn, "head": self.head}
        self.params = {f"{p}.{k}": v for p, m in self._parts.items() for k, v in m.params.items()}
        self.grads = {f"{p}.{k}": v for p, m in self._parts.items() for k, v in m.grads.items()}

    def config(self):
        """The architecture, enough to build the same model again (``CharLM(**config)``)."""
        return {"vocab_size": int(self.embedding.num_embeddings),
                "embed": int(self.embedding.embedding_dim), "hidden": int(self.rnn.hidden_size),
                "layers": int(self.rnn.num_layers), "cell": self.cell,
                "dropout": float(self.rnn.dropout), "layer_norm": self.rnn.layer_norm,
                "zoneout": _zoneout_config(self.rnn.zoneout),
                "dtype": self.dtype.name}

    @property
    def backend(self):
        return self.rnn.backend

    def num_params(self):
        return sum(p.size for p in self.params.values())

    def __call__(self, idx, state=None):
        logits, state, _ = self.forward(idx, state, train=False)
        return logits, state

    def forward(self, idx, state=None, train=True):
        x, emb_cache = self.embedding.forward(idx, train)          # (T, B, E)
        if x.ndim != 3:
            raise ValueError(f"idx: expected shape (T, B), got {np.shape(idx)}")
        if train:
            y, state, rnn_cache = self.rnn.forward(x, state, train=True)  # (T, B, H)
        else:   # the layer's call: one-step inputs (sampling) take its lean single-step path
            (y, state), rnn_cache = self.rnn(x, state), None
        logits, head_cache = self.head.forward(y, train)           # (T, B, V)
        return logits, state, ((emb_cache, rnn_cache, head_cache) if train else None)

    def backward(self, dlogits, cache, dstate=None, truncate=None, grads_ready=None):
        """``dlogits`` None: no loss on the outputs (only ``dstate``), as a history window of
        ``TruncatedBPTT`` with k2 > k1 has. ``grads_ready(i)``, if given, is called as soon
        as the gradients of ``grad_buckets()[i]`` are final (this is the last backward of
        the update), so a distributed driver can start reducing them."""
        emb_cache, rnn_cache, head_cache = cache
        L = self.rnn.num_layers
        dy = None if dlogits is None else self.head.backward(dlogits, head_cache)
        if grads_ready is not None:
            grads_ready(0)
        # recurrent layer k is bucket L - k: the top layer's gradients are final first
        layer_ready = None if grads_ready is None else (lambda k: grads_ready(L - k))
        dx, dstate0 = self.rnn.backward(dy, rnn_cache, dstate, truncate=truncate,
                                        grads_ready=layer_ready)
        self.embedding.backward(dx, emb_cache)
        if grads_ready is not None:
            grads_ready(L + 1)
        return None, dstate0

    def grad_buckets(self):
        """The keys of ``grads`` in the order ``backward`` finishes them: the head's, each
        recurrent layer's from the top one down, the embedding's."""
        def of_layer(key, k):
            name = key[len("rnn."):]
            return name.endswith(f"_l{k}") or name.endswith(f"_l{k}_reverse")
        rnn = [k for k in self.grads if k.startswith("rnn.")]
        return ([[k for k in self.grads if k.startswith("head.")]]
                + [[key for key in rnn if of_layer(key, k)]
                   for k in reversed(range(self.rnn.num_layers))]
                + [[k for k in self.grads if k.startswith("embedding.")]])

    def zero_grad(self):
        for m in self._parts.values():
            m.zero_grad()

    def state_dict(self):
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        """Copy the arrays into the parameters in place, after checking every key, shape and
        dtype: a bad entry changes nothing, and the error names it (``head.weight``)."""
        _load_arrays("state_dict", state_dict, self.params)


# ---------------------------------------------------------------------------------------------
# streams, evaluation, training

def streams(ids, batch):
    """``(inputs, targets)``, each ``(L, batch)``: the text cut into ``batch`` equal pieces, one
    a column, with ``L = (len(ids) - 1) // batch``; ``targets`` is the next character. The last
    ``len(ids) - 1 - batch * L`` characters are left out."""
    ids = np.asarray(ids)
    L = (len(ids) - 1) // batch
    if L < 1:
        raise ValueError(f"ids: expected at least batch + 1 = {batch + 1} characters, "
                         f"got {len(ids)}")
    inputs = ids[:batch * L].reshape(batch, L).T                  # (L, B)
    targets = ids[1:batch * L + 1].reshape(batch, L).T            # (L, B)
    return inputs, targets


def _nats_sum(logits, targets):
    """Sum over positions of -log softmax(logits)[target], in float64."""
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.sum(log_norm - z[np.arange(len(z)), targets.reshape(-1)]))


def evaluate(model, ids, batch=32, window=100, max_chars=None):
    """Bits per character of ``model`` predicting each character of ``ids`` (after the first)
    from the ones before it, read as ``min(batch, ...)`` parallel streams (``streams``) in
    windows of ``window`` steps carrying the state. ``max_chars`` limits the text read."""
    ids = np.asarray(ids)
    if max_chars is not None:
        ids = ids[:max_chars + 1]
    batch = max(1, min(batch, (len(ids) - 1) // 2))
    inputs, targets = streams(ids, batch)
    state, nats = None, 0.0
    for t in range(0, len(inputs), window):
        logits, state = model(inputs[t:t + window], state)
        nats += _nats_sum(logits, targets[t:t + window])
    return nats / targets.size / math.log(2)


class Trainer:
    """Trains a ``CharLM`` on ``batch`` parallel streams of ``train_ids`` in windows of
    ``window`` characters (``TruncatedBPTT(k1=window, k2)``), Adam with learning rate ``lr``,
    gradients clipped to global norm ``clip``. When the streams run out the state is reset and
    they start again (a new epoch). An update whose gradient is not finite is skipped (see
    ``TruncatedBPTT``; ``max_skipped`` in a row, then ``NonFiniteGradientError``).

    ``state_dict()`` / ``load_state_dict()``: with the model's parameters, everything needed to
    continue the run exactly (the optimizer's moments, the streams' position, the carried state,
    the dropout generator).

    ``comm`` (mpi4py communicator, ``fastrnn.distributed``): this rank trains on its even share
    of the ``batch`` streams (``batch_share``) after taking rank 0's parameters, and every
    update is the whole batch's (``TruncatedBPTT(comm=)``). ``state_dict()`` is then collective:
    rank 0 gets the whole batch's carried state (the same checkpoint one process writes, so a
    run resumes on any number of ranks), the others None. Dropout masks cannot be those of one
    process; each rank draws its own from rank 0's generator jumped ``rank`` times.
    """

    def __init__(self, model, train_ids, heldout_ids, *, batch=32, window=100, k2=None,
                 lr=2e-3, clip=5.0, max_skipped=10, comm=None):
        self.model = model
        self.inputs, self.targets = streams(train_ids, batch)
        self.comm = comm
        self.rows = slice(None)                     # this rank's streams
        if comm is not None:
            from .distributed import batch_share, broadcast_parameters
            self.rows = batch_share(batch, comm.size, comm.rank)
            self.inputs = np.ascontiguousarray(self.inputs[:, self.rows])
            self.targets = np.ascontiguousarray(self.targets[:, self.rows])
            broadcast_parameters(comm, model.params)
            self._own_dropout_stream()
        self.heldout_ids = np.asarray(heldout_ids)
        self.batch, self.window = batch, window
        self.optimizer = Adam(model.params, lr=lr)
        self.driver = TruncatedBPTT(model, softmax_cross_entropy, self.optimizer, window, k2,
                                    clip_norm=clip, max_skipped=max_skipped, comm=comm)
        self.position = 0       # next time step of the streams
        self.epoch = 0
        self.updates = 0

    @property
    def skipped(self):
        """Updates skipped so far because their gradient was not finite."""
        return self.driver.skipped

    def update(self):
        """One window, one optimizer step; returns the ``Update`` (loss in nats per char)."""
        if self.position >= len(self.inputs):
            self.position = 0
            self.epoch += 1
            self.driver.reset()
        t = self.position
        u = self.driver.step(self.inputs[t:t + self.window], self.targets[t:t + self.window])
        self.position += u.steps
        self.updates += 1
        return u

    def heldout_bpc(self, max_chars=None):
        return evaluate(self.model, self.heldout_ids, self.batch, self.window, max_chars)

    def _own_dropout_stream(self):
        rank = self.comm.rank
        if rank:
            self.model.rnn.rng = np.random.Generator(self.model.rnn.rng.bit_generator
                                                     .jumped(rank))

    def state_dict(self):
        """The run's state besides the model's parameters (copies). With ``comm``: collective;
        rank 0 gets the whole batch's state, the other ranks None."""
        driver = self.driver.state_dict()
        rng = self.model.rnn.rng.bit_generator.state
        if self.comm is not None:
            from .distributed import gather_batch
            for key in ("state", "span_state", "span_x"):
                driver[key] = _map_arrays(driver[key],
                                          lambda a: gather_batch(self.comm, a, axis=1))
            if self.comm.rank:
                return None
        return {"position": self.position, "epoch": self.epoch, "updates": self.updates,
                "driver": driver, "dropout_rng": rng}

    def load_state_dict(self, state):
        """Continue from ``state_dict()``; the model's parameters are loaded separately."""
        _check_same_keys("state", state, ["position", "epoch", "updates", "driver",
                                           "dropout_rng"])
        counts = {}
        for k in ("position", "epoch", "updates"):
            v = state[k]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"state[{k!r}]: expected an integer >= 0, got {v!r}")
            counts[k] = int(v)
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["dropout_rng"]
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state['dropout_rng']: expected a generator state, got "
                             f"{state['dropout_rng']!r} ({exc})") from None
        driver = state["driver"]
        if self.comm is not None and isinstance(driver, dict):     # the whole batch's: ours
            driver = dict(driver)
            for key in ("state", "span_state", "span_x"):
                if key in driver:
                    driver[key] = _map_arrays(driver[key], lambda a: a[:, self.rows])
        self.driver.load_state_dict(driver)
        self.model.rnn.rng.bit_generator.state = state["dropout_rng"]
        if self.comm is not None:
            self._own_dropout_stream()
        self.position, self.epoch, self.updates = (counts["position"], counts["epoch"],
                                                   counts["updates"])


def _map_arrays(tree, f):
    """``f`` applied to the array, or to each array of a tuple (LSTM's (h, c)); None stays."""
    if tree is None:
        return None
    if isinstance(tree, tuple):
        return tuple(f(a) for a in tree)
    return f(tree)


# ---------------------------------------------------------------------------------------------
# sampling

# more characters than any sample anyone reads; a larger request is a mistake
MAX_SAMPLE_LENGTH = 100_000_000


def sample(model, vocab, length, temperature=1.0, prime="", seed=None):
    """``length`` characters drawn one at a time from the model, each fed back in with the
    state carried, after reading ``prime`` (without a prime, after a newline, or the first
    character of the vocabulary if it has no newline). Probabilities are
    ``softmax(logits / temperature)``; ``seed`` fixes the draws. Returns the new characters.
    Non-finite logits (a damaged model), or a temperature so small that ``logits /
    temperature`` overflows, raise ``ValueError``: no draw would mean anything."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    if length > MAX_SAMPLE_LENGTH:
        raise ValueError(f"length: expected at most {MAX_SAMPLE_LENGTH:,} characters, "
                         f"got {length:,}")
    if not (isinstance(temperature, (int, float, np.integer, np.floating))
            and not isinstance(temperature, bool) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if not prime:
        prime = "\n" if "\n" in vocab.index else vocab.chars[0]
    ids = vocab.encode(prime, name="prime")
    rng = np.random.default_rng(seed)
    logits, state = model(ids[:, None], None)                      # (T, 1, V)
    last = logits[-1, 0]
    out = np.empty(length, dtype=np.int64)
    for i in range(length):
        with np.errstate(over="ignore", invalid="ignore"):
            z = last.astype(np.float64) / float(temperature)
        if not np.isfinite(z).all():
            _explain_nonfinite(last, temperature, i)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        c = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(p) - 1)
        out[i] = c
        logits, state = model(out[i:i + 1, None], state)
        last = logits[0, 0]
    return vocab.decode(out)


def _explain_nonfinite(logits, temperature, drawn):
    if not np.isfinite(logits).all():
        raise ValueError(f"the model's logits are not finite (NaN or infinity) after {drawn} "
                         "characters: its parameters are damaged or overflowed")
    smallest = float(np.max(np.abs(logits))) / 1e300
    raise ValueError(f"temperature: expected at least {smallest:.3g} for this model "
                     f"(logits / temperature overflows), got {temperature!r}")


# ---------------------------------------------------------------------------------------------
# checkpoints: one .npz with the weights, the vocabulary and the configuration

FORMAT = "fastrnn-charlm"
VERSION = 2
# version 1: no training state (such a checkpoint samples but cannot be resumed)
READABLE_VERSIONS = (1, 2)


def is_checkpoint(path):
    """True if ``path`` is a file that names itself a fastrnn character-model checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "format" in npz.files and str(npz["format"]) == FORMAT
    except Exception:       # anything unreadable is simply not one of ours
        return False


def _pack(tree, arrays):
    """A JSON-able copy of ``tree`` (dicts, lists, tuples, arrays, numbers, None), its arrays
    moved to ``arrays`` under ``training/<n>`` and replaced by a reference."""
    if isinstance(tree, np.ndarray):
        name = f"training/{len(arrays)}"
        arrays[name] = tree
        return {"__array__": name}
    if isinstance(tree, tuple):
        return {"__tuple__": [_pack(v, arrays) for v in tree]}
    if isinstance(tree, list):
        return [_pack(v, arrays) for v in tree]
    if isinstance(tree, dict):
        return {str(k): _pack(v, arrays) for k, v in tree.items()}
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _json_scalar(value):
    """NumPy scalars (np.int64 sizes, np.float32 rates) as the Python numbers they are."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"info: expected JSON values, got {type(value).__name__}")


def _unpack(tree, npz):
    if isinstance(tree, list):
        return [_unpack(v, npz) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return npz[tree["__array__"]]
        if set(tree) == {"__tuple__"}:
            return tuple(_unpack(v, npz) for v in tree["__tuple__"])
        return {k: _unpack(v, npz) for k, v in tree.items()}
    return tree


def _nonfinite_params(model):
    return [k for k, v in model.params.items() if not np.isfinite(v).all()]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # e.g. another user's process: it exists
        return True
    return True


def _remove_stale_temporaries(path):
    """Remove ``<path>.tmp<pid>`` files whose writer is gone (a save killed half-way)."""
    prefix = path + ".tmp"
    for tmp in glob.glob(glob.escape(prefix) + "*"):
        pid = tmp[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.remove(tmp)
            except OSError:
                pass


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_elsewhere(path, data):
    """Write ``data`` to a new file in the temporary directory or the home directory; its
    path, or None if neither takes it."""
    stem = os.path.basename(path)
    for directory in (tempfile.gettempdir(), os.path.expanduser("~")):
        try:
            fd, where = tempfile.mkstemp(prefix=stem + ".", suffix=".npz", dir=directory)
            os.close(fd)
            _write_file(where, data)
            return where
        except OSError:
            continue
    return None


def save_checkpoint(path, model, vocab, info=None, training=None, *, allow_nonfinite=False):
    """Write ``path`` (.npz): ``format``, ``version``, ``config`` (JSON: the model's ``config()``
    and ``info``), ``vocab`` (code points, int32), ``param/<name>`` for every parameter and,
    if given, ``training`` (e.g. ``Trainer.state_dict()``, to resume the run) as
    ``training/state`` (JSON) and ``training/<n>`` arrays.

    Written to ``<path>.tmp<pid>`` first and renamed, so a crash never leaves half a checkpoint;
    temporaries of writers that are gone are removed. A model holding NaN or infinity raises
    ``NonFiniteParameters`` unless ``allow_nonfinite`` (a good checkpoint is never replaced by
    a broken one). If the file cannot be written (disk full, permissions), the content goes to
    a file in the temporary or the home directory and ``CheckpointSaveError`` names it."""
    bad = _nonfinite_params(model)
    if bad and not allow_nonfinite:
        raise NonFiniteParameters(f"checkpoint {path}: not written: the model's parameters "
                                  f"hold NaN or infinity ({', '.join(bad)})")
    config = dict(info or {})
    config["model"] = model.config()
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
              "config": np.array(json.dumps(config, default=_json_scalar)),
              "vocab": np.array([ord(c) for c in vocab.chars], dtype=np.int32)}
    for k, v in model.params.items():
        arrays["param/" + k] = v
    if training is not None:
        arrays["training/state"] = np.array(json.dumps(_pack(training, arrays)))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()

    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        _write_file(tmp, data)
    except OSError as exc:
        _remove_quietly(tmp)
        where = _save_elsewhere(path, data)
        raise CheckpointSaveError(
            f"cannot write {path}: {exc.strerror or exc}; "
            + (f"the checkpoint was saved to {where} instead" if where else
               "nor in the temporary or home directory: nothing was saved"), where) from exc
    except BaseException:                   # interrupted half-way: no half file left behind
        _remove_quietly(tmp)
        raise
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointSaveError(f"cannot replace {path}: {exc.strerror or exc}; the "
                                  f"checkpoint is in {tmp}", tmp) from exc


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _read(path, read):
    """``read(npz)`` on the checkpoint ``path`` after checking its format and version, with
    every way of failing turned into ``CheckpointError``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "format" not in npz.files:
                raise CheckpointError(f"checkpoint {path}: an .npz archive but not a fastrnn "
                                      f"character-model checkpoint (no 'format' entry)")
            fmt = str(npz["format"])
            if fmt != FORMAT:
                raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, "
                                      f"got {fmt!r}")
            version = int(npz["version"])
            if version not in READABLE_VERSIONS:
                raise CheckpointError(f"checkpoint {path}: format version {version}, this "
                                      f"fastrnn reads versions "
                                      f"{', '.join(map(str, READABLE_VERSIONS))}")
            return read(npz)
    except CheckpointError:
        raise
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path}: is a directory, expected an .npz file") \
            from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a readable fastrnn checkpoint (truncated, damaged or "
            f"another kind of file: {type(exc).__name__}: {exc})") from None


def load_checkpoint(path, backend="auto"):
    """``(model, vocab, config)`` from a checkpoint written by ``save_checkpoint``. A missing,
    truncated or foreign file raises ``CheckpointError`` saying which."""
    def read(npz):
        config = json.loads(str(npz["config"]))
        chars = "".join(chr(c) for c in npz["vocab"])
        params = {k[len("param/"):]: npz[k] for k in npz.files if k.startswith("param/")}
        return config, chars, params

    config, chars, params = _read(path, read)
    repeated = sorted({c for c in chars if chars.count(c) > 1})
    if repeated:
        raise CheckpointError(f"checkpoint {path}: damaged: its vocabulary repeats the "
                              f"character(s) {''.join(repeated)!r}")
    try:
        model = CharLM(**{**config["model"], "backend": backend})
        vocab = Vocabulary(chars)
        if len(vocab) != model.embedding.num_embeddings or vocab.chars != chars:
            raise ValueError(f"vocabulary of {len(chars)} characters for a model of "
                             f"{model.embedding.num_embeddings}")
        model.load_state_dict(params)
    except BackendUnavailable:
        raise
    except ModelTooLarge as exc:
        raise CheckpointError(f"checkpoint {path}: its model cannot be built here: {exc}") \
            from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: damaged ({type(exc).__name__}: {exc})") \
            from None
    return model, vocab, config


def load_training_state(path):
    """The ``training`` tree saved with the checkpoint ``path`` (arrays restored), or None if
    it has none (a version-1 checkpoint, or one saved without it)."""
    def read(npz):
        if "training/state" not in npz.files:
            return None
        return _unpack(json.loads(str(npz["training/state"])), npz)
    return _read(path, read)
