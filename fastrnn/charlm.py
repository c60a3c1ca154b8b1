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
import json
import math
import os
import sys
import sysconfig
import zipfile
import zlib

import numpy as np

from . import layers
from .dispatch import BackendUnavailable
from .train import Adam, Embedding, Linear, TruncatedBPTT, softmax_cross_entropy

__all__ = [
    "CharLM", "Vocabulary", "Trainer", "Corpus", "CorpusError", "CheckpointError",
    "STDLIB_TRAIN_MODULES", "STDLIB_HELDOUT_MODULES", "stdlib_corpus", "text_corpus",
    "split_text", "streams", "evaluate", "sample", "save_checkpoint", "load_checkpoint",
]


class CorpusError(Exception):
    """The text to train on cannot be read or used."""


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or not one of ours."""


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
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"--text: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} cannot be decoded); convert it first, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > text.txt") from None
    train, heldout = split_text(text, heldout_fraction)
    return Corpus(train, heldout, f"{path}, {len(text):,} characters")


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


class CharLM:
    """Embedding -> ``layers``-layer LSTM or GRU -> Linear: next-character logits.

    Has the layer API the training driver uses (``params``/``grads`` named ``embedding.*``,
    ``rnn.*`` and ``head.*`` and shared with the three parts, so optimizers update them)::

        logits, state = model(idx, state=None)                      # idx (T, B) ints
        logits, state, cache = model.forward(idx, state, train=True)
        _, dstate = model.backward(dlogits, cache, dstate=None)     # ADDS into grads
    """

    def __init__(self, vocab_size, *, embed=64, hidden=256, layers=2, cell="lstm",
                 dropout=0.0, dtype=np.float32, backend="auto", seed=None):
        if cell not in _CELLS:
            raise ValueError(f"cell: expected 'lstm' or 'gru', got {cell!r}")
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3)]
        self.embedding = Embedding(vocab_size, embed, dtype=dtype, seed=seeds[0])
        self.rnn = _CELLS[cell](embed, hidden, layers, dropout=dropout, dtype=dtype,
                                backend=backend, seed=seeds[1])
        self.head = Linear(hidden, vocab_size, dtype=dtype, seed=seeds[2])
        self.cell = cell
        self.dtype = np.dtype(dtype)
        self.batch_first = False
        self._parts = {"embedding": self.embedding, "rnn": self.rnn, "head": self.head}
        self.params = {f"{p}.{k}": v for p, m in self._parts.items() for k, v in m.params.items()}
        self.grads = {f"{p}.{k}": v for p, m in self._parts.items() for k, v in m.grads.items()}

    def config(self):
        """The architecture, enough to build the same model again (``CharLM(**config)``)."""
        return {"vocab_size": self.embedding.num_embeddings,
                "embed": self.embedding.embedding_dim, "hidden": self.rnn.hidden_size,
                "layers": self.rnn.num_layers, "cell": self.cell, "dropout": self.rnn.dropout,
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

    def backward(self, dlogits, cache, dstate=None, truncate=None):
        emb_cache, rnn_cache, head_cache = cache
        dy = self.head.backward(dlogits, head_cache)
        dx, dstate0 = self.rnn.backward(dy, rnn_cache, dstate, truncate=truncate)
        self.embedding.backward(dx, emb_cache)
        return None, dstate0

    def zero_grad(self):
        for m in self._parts.values():
            m.zero_grad()

    def state_dict(self):
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        missing = [k for k in self.params if k not in state_dict]
        unknown = [k for k in state_dict if k not in self.params]
        if missing or unknown:
            raise KeyError(f"state_dict: missing key(s) {missing}, unexpected key(s) {unknown}")
        for prefix, m in self._parts.items():
            m.load_state_dict({k: state_dict[f"{prefix}.{k}"] for k in m.params})


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
    they start again (a new epoch)."""

    def __init__(self, model, train_ids, heldout_ids, *, batch=32, window=100, k2=None,
                 lr=2e-3, clip=5.0):
        self.model = model
        self.inputs, self.targets = streams(train_ids, batch)
        self.heldout_ids = np.asarray(heldout_ids)
        self.batch, self.window = batch, window
        self.optimizer = Adam(model.params, lr=lr)
        self.driver = TruncatedBPTT(model, softmax_cross_entropy, self.optimizer, window, k2,
                                    clip_norm=clip)
        self.position = 0       # next time step of the streams
        self.epoch = 0
        self.updates = 0

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


# ---------------------------------------------------------------------------------------------
# sampling

def sample(model, vocab, length, temperature=1.0, prime="", seed=None):
    """``length`` characters drawn one at a time from the model, each fed back in with the
    state carried, after reading ``prime`` (without a prime, after a newline, or the first
    character of the vocabulary if it has no newline). Probabilities are
    ``softmax(logits / temperature)``; ``seed`` fixes the draws. Returns the new characters."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
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
        z = last.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        c = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(p) - 1)
        out[i] = c
        logits, state = model(out[i:i + 1, None], state)
        last = logits[0, 0]
    return vocab.decode(out)


# ---------------------------------------------------------------------------------------------
# checkpoints: one .npz with the weights, the vocabulary and the configuration

FORMAT = "fastrnn-charlm"
VERSION = 1


def save_checkpoint(path, model, vocab, info=None):
    """Write ``path`` (.npz): ``format``, ``version``, ``config`` (JSON: the model's ``config()``
    and ``info``), ``vocab`` (code points, int32) and ``param/<name>`` for every parameter.
    Written to a temporary file first and renamed, so a crash never leaves half a checkpoint."""
    config = dict(info or {})
    config["model"] = model.config()
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
              "config": np.array(json.dumps(config)),
              "vocab": np.array([ord(c) for c in vocab.chars], dtype=np.int32)}
    for k, v in model.params.items():
        arrays["param/" + k] = v
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, backend="auto"):
    """``(model, vocab, config)`` from a checkpoint written by ``save_checkpoint``. A missing,
    truncated or foreign file raises ``CheckpointError`` saying which."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if "format" not in files:
                raise CheckpointError(f"checkpoint {path}: an .npz archive but not a fastrnn "
                                      f"character-model checkpoint (no 'format' entry)")
            fmt = str(npz["format"])
            if fmt != FORMAT:
                raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, "
                                      f"got {fmt!r}")
            version = int(npz["version"])
            if version != VERSION:
                raise CheckpointError(f"checkpoint {path}: format version {version}, this "
                                      f"fastrnn reads version {VERSION}")
            config = json.loads(str(npz["config"]))
            chars = "".join(chr(c) for c in npz["vocab"])
            params = {k[len("param/"):]: npz[k] for k in npz.files if k.startswith("param/")}
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
    try:
        model = CharLM(**{**config["model"], "backend": backend})
        vocab = Vocabulary(chars)
        if len(vocab) != model.embedding.num_embeddings or vocab.chars != chars:
            raise ValueError(f"vocabulary of {len(chars)} characters for a model of "
                             f"{model.embedding.num_embeddings}")
        model.load_state_dict(params)
    except BackendUnavailable:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: damaged ({type(exc).__name__}: {exc})") \
            from None
    return model, vocab, config
