"""Many-to-many: a tagger of Python source, one class for each character.

    python -m fastrnn.examples.tag [--steps N] [--seed S] [--backend B]

The data is the running interpreter's standard library (the modules the character model trains
on, ``fastrnn.charlm.STDLIB_TRAIN_MODULES``, and its held-out ones), each character labelled by
the ``tokenize`` module as part of a name, keyword, number, string, comment or operator, or as
whitespace (indentation, blanks, newlines between tokens). A character's class depends on what
comes before it, sometimes far before: a line in the middle of a long docstring is a string,
and ``x = "if"`` holds no keyword, only for a reader who knows where the quotes opened.

Model: character embedding -> 2-layer bidirectional LSTM -> linear -> softmax, per character.
The source is read in windows of 256 characters as parallel streams (the training modules cut
into 32 pieces; each held-out module whole), each layer's forward direction carrying its state
from one window to the next, so that it remembers an open string, and its reverse direction
reading each window from its end. Accuracy is per character, over the whole of the held-out
modules.
"""
import importlib.util
import io
import keyword
import sys
import tokenize

import numpy as np

import fastrnn
from fastrnn.charlm import STDLIB_HELDOUT_MODULES, STDLIB_TRAIN_MODULES
from fastrnn.sequence import pad
from fastrnn.train import Embedding, Linear, softmax_cross_entropy

from ._common import Model, parse_args, train

CLASSES = ["whitespace", "name", "keyword", "number", "string", "comment", "operator"]
_TOKEN_CLASS = {tokenize.NAME: 1, tokenize.NUMBER: 3, tokenize.STRING: 4, tokenize.COMMENT: 5,
                tokenize.OP: 6}
ALPHABET = 129          # code points 0-127 are themselves; every other character is 128
WINDOW = 256            # characters a window holds, in training and in evaluation


def label(source):
    """An int8 array, the class of each character of ``source`` (whitespace where no token
    lies: indentation, blanks between tokens, line ends outside strings)."""
    line_starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    labels = np.zeros(len(source), np.int8)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        cls = _TOKEN_CLASS.get(token.type)
        if cls is None:
            continue
        if cls == 1 and keyword.iskeyword(token.string):
            cls = 2
        (row0, col0), (row1, col1) = token.start, token.end
        labels[line_starts[row0 - 1] + col0:line_starts[row1 - 1] + col1] = cls
    return labels


def encode(source):
    """The characters' ids: their code points, all above 127 as one."""
    return np.minimum(np.frombuffer(source.encode("utf-32-le"), np.uint32), ALPHABET - 1) \
        .astype(np.int64)


def modules(names):
    """``(ids, labels)`` of each module of ``names`` whose source this Python has."""
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        # a frozen module (os, abc, ...) names its source file in loader_state
        path = (getattr(spec.loader_state, "filename", None) or spec.origin) if spec else None
        if path is None or not path.endswith(".py"):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        out.append((encode(text), label(text)))
    if not out:
        sys.exit(f"tag: none of the modules {', '.join(names[:3])}, ... has its source here "
                 "(some Python installations ship only compiled files)")
    return out


def forward_state(state):
    """The state to start the next window from: each layer's forward direction goes on from
    where it stopped, its reverse direction starts from zeros (it reads the window backwards
    from the window's end, and knows nothing past it)."""
    h, c = (part.copy() for part in state)                 # (L*2, B, H), row layer*2 + direction
    h[1::2] = 0
    c[1::2] = 0
    return h, c


def predict(model, sources):
    """The class of each character of each source (an array of ids): all read at once, one a
    batch column, WINDOW characters at a time, carrying the forward state (as in training)."""
    ids, lengths = pad(sources)                                     # (T, B)
    classes = np.empty(ids.shape, dtype=np.int64)
    state = None
    for t in range(0, len(ids), WINDOW):
        window_lengths = np.clip(lengths - t, 0, WINDOW)            # a module may have ended
        y, state = model.lstm(model.embedding(ids[t:t + WINDOW]), state, lengths=window_lengths)
        state = forward_state(state)
        classes[t:t + WINDOW] = model.head(y).argmax(axis=2)
    return [classes[:n, b] for b, n in enumerate(lengths)]


def main(argv=None):
    # One thread for the layers' kernels: NumPy's BLAS (the dense layer's products) keeps its
    # own threads, and on two cores the layers' second thread and BLAS's fight for the core
    # (150 updates: 17 s with one, 23 s with two).
    args = parse_args("tag", __doc__.splitlines()[0], steps=800, threads=1, argv=argv)
    train_modules = modules(STDLIB_TRAIN_MODULES)
    test_modules = modules(STDLIB_HELDOUT_MODULES)
    train_ids = np.concatenate([ids for ids, _ in train_modules])
    train_labels = np.concatenate([labels for _, labels in train_modules])
    test_chars = sum(len(ids) for ids, _ in test_modules)

    seeds = np.random.SeedSequence(args.seed).generate_state(3)
    embed, hidden, layers = 16, 48, 2
    model = Model(embedding=Embedding(ALPHABET, embed, seed=seeds[0]),
                  lstm=fastrnn.LSTM(embed, hidden, layers, bidirectional=True,
                                    backend=args.backend, seed=seeds[1]),
                  head=Linear(2 * hidden, len(CLASSES), seed=seeds[2]))
    print(f"data:  {len(train_modules)} standard library modules for training "
          f"({len(train_ids):,} characters), {len(test_modules)} held out "
          f"({', '.join(STDLIB_HELDOUT_MODULES)}: {test_chars:,} characters)")
    print(f"model: embedding {embed}, {layers}-layer bidirectional LSTM hidden {hidden}, "
          f"backend {model.lstm.backend}", flush=True)

    # the training text cut into `batch` streams, one a column, read a window at a time
    batch = 32
    stream_length = len(train_ids) // batch
    stream_ids = train_ids[:batch * stream_length].reshape(batch, stream_length).T    # (N, B)
    stream_labels = train_labels[:batch * stream_length].reshape(batch, stream_length).T
    carried = {"state": None}

    def batches():
        while True:
            carried["state"] = None                     # the streams start again
            for t in range(0, stream_length - WINDOW + 1, WINDOW):
                yield stream_ids[t:t + WINDOW], stream_labels[t:t + WINDOW]

    def step(batch):
        ids, labels = batch
        x, embed_cache = model.embedding.forward(ids)                   # (T, B, E)
        y, state, lstm_cache = model.lstm.forward(x, carried["state"], train=True)
        carried["state"] = forward_state(state)         # held fixed: no gradient goes back
        logits, head_cache = model.head.forward(y)                      # (T, B, classes)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        dy = model.head.backward(dlogits, head_cache)
        dx, _ = model.lstm.backward(dy, lstm_cache)
        model.embedding.backward(dx, embed_cache)
        return loss

    train(model, batches(), step, args.steps, lr=0.01)

    predicted = predict(model, [ids for ids, _ in test_modules])
    correct = sum(int(np.sum(p == labels)) for p, (_, labels) in zip(predicted, test_modules))
    accuracy = correct / test_chars
    print(f"tag: per-character accuracy {accuracy:.3f} on {test_chars:,} characters of "
          f"{len(test_modules)} held-out modules", flush=True)
    return accuracy


if __name__ == "__main__":
    main()
