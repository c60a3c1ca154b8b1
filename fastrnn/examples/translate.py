"""Encoder-decoder: dates written in many ways, translated to ISO dates.

    python -m fastrnn.examples.translate [--steps N] [--seed S] [--backend B]

The data is made with ``datetime``: a date between 1950 and 2049 written as "3rd of May 1987",
"Sun 5/3/87" (month first, as in the US), "03.05.1987" (day first), "MAY 3RD 1987", ... is to
become "1987-05-03". Two-digit years are 1950-2049. The dates held out are never trained on, in
any of their forms.

Model: an LSTM encoder reads the characters (``lengths`` make it stop at each input's own end);
its final state ``(h, c)`` is the initial state of an LSTM decoder, which writes the ten output
characters one at a time. Training feeds the decoder the true previous character (teacher
forcing) and sends the gradient of its initial state back into the encoder as the gradient of
the encoder's final state. At test time the decoder reads its own previous output: ten one-step
calls ``y, state = decoder(x_t, state)`` for the whole batch (greedy decoding).
"""
import datetime
import string

import numpy as np

import fastrnn
from fastrnn.sequence import pad
from fastrnn.train import Embedding, Linear, softmax_cross_entropy

from ._common import Model, parse_args, train

INPUT_CHARS = string.ascii_letters + string.digits + " ,./-"
OUTPUT_CHARS = "0123456789-"
START = len(OUTPUT_CHARS)          # the decoder's first input: no character before it
FIRST_DAY = datetime.date(1950, 1, 1).toordinal()
DAYS = datetime.date(2049, 12, 31).toordinal() - FIRST_DAY + 1


def ordinal(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each format writes a date d; %B, %b, %A, %a are the C locale's English names.
FORMATS = [
    lambda d: f"{ordinal(d.day)} of {d:%B %Y}",              # 3rd of May 1987
    lambda d: f"{d:%B} {d.day}, {d.year}",                    # May 3, 1987
    lambda d: f"{d.day} {d:%B %Y}",                           # 3 May 1987
    lambda d: f"{d:%A, %B} {d.day}, {d.year}",                # Sunday, May 3, 1987
    lambda d: f"{d:%a} {d.month}/{d.day}/{d:%y}",             # Sun 5/3/87
    lambda d: f"{d.month}/{d.day}/{d.year}",                  # 5/3/1987
    lambda d: f"{d:%d.%m.%Y}",                                # 03.05.1987
    lambda d: f"{d:%b} {d.day} {d.year}".lower(),             # may 3 1987
    lambda d: f"{d:%B} {ordinal(d.day)} {d.year}".upper(),    # MAY 3RD 1987
    lambda d: f"{d:%Y/%m/%d}",                                # 1987/05/03
    lambda d: f"{d:%a}, {d.day} {d:%b %Y}",                   # Sun, 3 May 1987
    lambda d: f"{d.day}-{d:%b-%y}",                           # 3-May-87
]


def example(day, rng):
    """``(written, iso)`` for the ``day``-th date from 1950-01-01, in a random format."""
    d = datetime.date.fromordinal(FIRST_DAY + int(day))
    return FORMATS[rng.integers(len(FORMATS))](d), d.isoformat()


def encode_inputs(texts):
    index = {c: i for i, c in enumerate(INPUT_CHARS)}
    return pad([[index[c] for c in t] for t in texts])                  # (T, B), (B,)


def encode_outputs(texts):
    index = {c: i for i, c in enumerate(OUTPUT_CHARS)}
    return np.array([[index[c] for c in t] for t in texts]).T           # (10, B)


def encode(model, ids, lengths, train):
    """The encoder: its final state, and what its backward needs when training."""
    x, embed_cache = model.source.forward(ids, train)                  # (T, B, E)
    if not train:
        return model.encoder(x, lengths=lengths)[1], None
    _, state, encoder_cache = model.encoder.forward(x, lengths=lengths, train=True)
    return state, (embed_cache, encoder_cache)


def translate(model, ids, lengths, length=10):
    """Greedy decoding: each output character is the decoder's most likely one, fed back in
    as its next input, one step at a time for the whole batch. Returns ``(length, B)``."""
    state, _ = encode(model, ids, lengths, train=False)
    previous = np.full(ids.shape[1], START)
    out = np.empty((length, ids.shape[1]), dtype=np.int64)
    for t in range(length):
        x_t = model.target(previous[None])                             # (1, B, E), C order
        y, state = model.decoder(x_t, state)                           # one step
        previous = out[t] = model.head(y[0]).argmax(axis=1)
    return out


def main(argv=None):
    # One thread: the steps of this small model (B=64, H=128) are too short to split over two
    # threads, which then wait for each other at every step (2-10x the CPU time when another
    # process holds a core).
    args = parse_args("translate", __doc__.splitlines()[0], steps=1500, threads=1, argv=argv)
    rng = np.random.default_rng(args.seed)
    days = rng.permutation(DAYS)
    test_days, train_days = days[:2000], days[2000:]
    test = [example(day, rng) for day in test_days]
    test_ids, test_lengths = encode_inputs([written for written, _ in test])
    test_iso = [iso for _, iso in test]

    seeds = np.random.SeedSequence(args.seed).generate_state(5)
    embed, hidden = 24, 128
    model = Model(source=Embedding(len(INPUT_CHARS), embed, seed=seeds[0]),
                  encoder=fastrnn.LSTM(embed, hidden, backend=args.backend, seed=seeds[1]),
                  target=Embedding(len(OUTPUT_CHARS) + 1, embed, seed=seeds[2]),
                  decoder=fastrnn.LSTM(embed, hidden, backend=args.backend, seed=seeds[3]),
                  head=Linear(hidden, len(OUTPUT_CHARS), seed=seeds[4]))
    print(f"data:  dates 1950-2049 in {len(FORMATS)} formats, {len(train_days):,} dates for "
          f"training, {len(test_days):,} held out (e.g. {test[0][0]!r} -> {test[0][1]})")
    print(f"model: LSTM encoder and decoder, hidden {hidden}, embedding {embed}, "
          f"backend {model.encoder.backend}", flush=True)

    def batches(batch=64):
        while True:
            chosen = [example(day, rng) for day in rng.choice(train_days, batch)]
            ids, lengths = encode_inputs([written for written, _ in chosen])
            targets = encode_outputs([iso for _, iso in chosen])        # (10, B)
            # teacher forcing: the decoder reads the true previous character
            previous = np.concatenate([np.full((1, batch), START), targets[:-1]])
            yield ids, lengths, previous, targets

    def step(batch):
        ids, lengths, previous, targets = batch
        state, (source_cache, encoder_cache) = encode(model, ids, lengths, train=True)
        x, target_cache = model.target.forward(previous)               # (10, B, E)
        y, _, decoder_cache = model.decoder.forward(x, state, train=True)
        logits, head_cache = model.head.forward(y)                     # (10, B, 11)
        loss, dlogits = softmax_cross_entropy(logits, targets)
        dy = model.head.backward(dlogits, head_cache)
        dx, dstate = model.decoder.backward(dy, decoder_cache)
        model.target.backward(dx, target_cache)
        # the decoder's initial state is the encoder's final state: its gradient goes back
        dx, _ = model.encoder.backward(None, encoder_cache, dstate=dstate)
        model.source.backward(dx, source_cache)
        return loss

    train(model, batches(), step, args.steps, lr=0.005)

    out = translate(model, test_ids, test_lengths)
    got = ["".join(OUTPUT_CHARS[i] for i in column) for column in out.T]
    accuracy = float(np.mean([g == iso for g, iso in zip(got, test_iso)]))
    print(f"translate: exact match {accuracy:.3f} on {len(test):,} held-out dates", flush=True)
    return accuracy


if __name__ == "__main__":
    main()
