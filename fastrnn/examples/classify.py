"""Many-to-one: the sentiment of sentences whose class depends on word order.

    python -m fastrnn.examples.classify [--steps N] [--seed S] [--backend B]

The sentences are made here: one clause ("the food was not good") or two joined by "and" (same
sentiment) or "but" (opposite sentiment; the second one decides, as people read "but"). A
negation flips its clause. "the food was not good but the service was great" and "the food was
good but the service was not great" hold the same words and have opposite classes, so a
bag-of-tokens classifier (logistic regression on word counts, trained here too) stays near
chance, while a bidirectional LSTM read at each sentence's own last step gets them right.

Model: embedding -> bidirectional LSTM -> ``fastrnn.sequence.last_step`` (the forward direction
at the sentence's last word, the reverse direction at its first) -> linear -> softmax.
"""
import numpy as np

import fastrnn
from fastrnn.sequence import last_step, last_step_backward, length_mask, pad
from fastrnn.train import Adam, Embedding, Linear, softmax_cross_entropy

from ._common import Model, parse_args, train

SUBJECTS = ["the food", "the service", "the movie", "the plot", "the acting", "this phone",
            "the battery", "the hotel", "the room", "my day", "the staff", "the music",
            "the book", "the ending", "the price", "the weather"]
VERBS = ["was", "is", "seemed", "felt", "looked"]
NEGATED_VERBS = ["wasn't", "isn't"]
INTENSIFIERS = ["", "", "very", "really", "quite", "so"]
POSITIVE = ["good", "great", "excellent", "nice", "fine", "wonderful", "pleasant", "amazing",
            "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "boring", "horrible", "dreadful", "weak", "dull",
            "disappointing"]
CLASSES = ["negative", "positive"]


def clause(rng, positive):
    """A clause of the given sentiment: half of them say it by negating the opposite word."""
    negated = rng.random() < 0.5
    word = rng.choice(NEGATIVE if positive != negated else POSITIVE)
    words = [rng.choice(SUBJECTS)]
    if negated:
        form = rng.integers(3)
        words += [rng.choice(NEGATED_VERBS)] if form == 2 else [rng.choice(VERBS),
                                                                ("not", "never")[form]]
    else:
        words.append(rng.choice(VERBS))
    return " ".join(words + [rng.choice(INTENSIFIERS), word]).replace("  ", " ")


def sentence(rng):
    """``(text, label)``: label 1 positive, 0 negative."""
    positive = rng.random() < 0.5
    kind = rng.choice(["one", "and", "but"])
    if kind == "one":
        return clause(rng, positive), int(positive)
    first_positive = positive if kind == "and" else not positive
    return f"{clause(rng, first_positive)} {kind} {clause(rng, positive)}", int(positive)


def vocabulary():
    words = set(VERBS + NEGATED_VERBS + POSITIVE + NEGATIVE + ["not", "never", "and", "but"])
    words |= {w for s in SUBJECTS + INTENSIFIERS for w in s.split()}
    return {w: i for i, w in enumerate(sorted(words))}


def encode(texts, vocab):
    """Word ids padded to ``(T, B)`` and the lengths ``(B,)``."""
    return pad([[vocab[w] for w in t.split()] for t in texts])


def bag_of_tokens_accuracy(train_ids, train_lengths, train_labels, test_ids, test_lengths,
                           test_labels, vocab_size, seed):
    """Logistic regression on word counts: the classifier that sees content but not order."""
    def counts(ids, lengths):
        real = length_mask(lengths, len(ids))                              # (T, B)
        sentence_of = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)  # (T, B)
        c = np.zeros((ids.shape[1], vocab_size), np.float32)               # (B, V)
        np.add.at(c, (sentence_of[real], ids[real]), 1)
        return c

    x_train, x_test = counts(train_ids, train_lengths), counts(test_ids, test_lengths)
    linear = Linear(vocab_size, len(CLASSES), seed=seed)
    optimizer = Adam(linear.params, lr=0.1)
    for _ in range(100):
        linear.zero_grad()
        logits, cache = linear.forward(x_train)
        _, dlogits = softmax_cross_entropy(logits, train_labels)
        linear.backward(dlogits, cache)
        optimizer.step(linear.grads)
    return float(np.mean(linear(x_test).argmax(axis=1) == test_labels))


def main(argv=None):
    args = parse_args("classify", __doc__.splitlines()[0], steps=300, threads=1, argv=argv)
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary()
    test = [sentence(rng) for _ in range(2000)]
    held_out = {text for text, _ in test}
    train_set = []
    while len(train_set) < 10000:               # no held-out sentence is trained on
        text, label = sentence(rng)
        if text not in held_out:
            train_set.append((text, label))
    test_ids, test_lengths = encode([t for t, _ in test], vocab)
    test_labels = np.array([label for _, label in test])

    seeds = np.random.SeedSequence(args.seed).generate_state(3)
    embed, hidden = 16, 32
    model = Model(embedding=Embedding(len(vocab), embed, seed=seeds[0]),
                  lstm=fastrnn.LSTM(embed, hidden, bidirectional=True, backend=args.backend,
                                    seed=seeds[1]),
                  head=Linear(2 * hidden, len(CLASSES), seed=seeds[2]))
    print(f"data:  {len(train_set)} sentences for training, {len(test)} held out, "
          f"vocabulary of {len(vocab)} words")
    print(f"model: embedding {embed}, bidirectional LSTM hidden {hidden}, "
          f"backend {model.lstm.backend}", flush=True)

    def batches(batch=64):
        while True:
            chosen = [train_set[i] for i in rng.integers(0, len(train_set), batch)]
            ids, lengths = encode([t for t, _ in chosen], vocab)
            yield ids, lengths, np.array([label for _, label in chosen])

    def step(batch):
        ids, lengths, labels = batch
        x, embed_cache = model.embedding.forward(ids)                     # (T, B, E)
        y, _, lstm_cache = model.lstm.forward(x, lengths=lengths, train=True)
        summary = last_step(y, lengths, bidirectional=True)               # (B, 2H)
        logits, head_cache = model.head.forward(summary)                  # (B, classes)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        dsummary = model.head.backward(dlogits, head_cache)
        dy = last_step_backward(dsummary, lengths, len(ids), bidirectional=True)
        dx, _ = model.lstm.backward(dy, lstm_cache)
        model.embedding.backward(dx, embed_cache)
        return loss

    train(model, batches(), step, args.steps, lr=0.01)

    y, _ = model.lstm(model.embedding(test_ids), lengths=test_lengths)
    logits = model.head(last_step(y, test_lengths, bidirectional=True))
    accuracy = float(np.mean(logits.argmax(axis=1) == test_labels))
    train_ids, train_lengths = encode([t for t, _ in train_set], vocab)
    baseline = bag_of_tokens_accuracy(train_ids, train_lengths,
                                      np.array([label for _, label in train_set]),
                                      test_ids, test_lengths, test_labels, len(vocab),
                                      int(seeds[2]))
    print(f"classify: accuracy {accuracy:.3f} on {len(test)} held-out sentences "
          f"(bag-of-tokens baseline {baseline:.3f})", flush=True)
    return accuracy


if __name__ == "__main__":
    main()
