"""fastrnn.charlm and the ``fastrnn`` command: corpus, vocabulary, the model's gradients,
evaluation, training, sampling, checkpoints and the command's errors."""
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from fastrnn import charlm, cli
from fastrnn.charlm import CharLM, CheckpointError, CorpusError, Vocabulary
from fastrnn.train import softmax_cross_entropy

from conftest import child_python
from test_train import CENTRAL_TOL, central_difference, rel_err

TEXT = "the quick brown fox jumps over the lazy dog.\nspam and eggs, eggs and spam.\n" * 40


def tiny(vocab_size=5, cell="lstm", layers=2, dtype=np.float64, seed=0, **options):
    return CharLM(vocab_size, embed=3, hidden=4, layers=layers, cell=cell, dtype=dtype,
                  backend="reference", seed=seed, **options)


# ---------------------------------------------------------------------------------------------
# corpus and vocabulary

def test_stdlib_corpus_is_the_listed_modules_in_order():
    stdlib = sysconfig.get_path("stdlib")
    corpus = charlm.stdlib_corpus()
    expected = []
    for modules in (charlm.STDLIB_TRAIN_MODULES, charlm.STDLIB_HELDOUT_MODULES):
        text = ""
        for module in modules:
            path = os.path.join(stdlib, *module.split(".")) + ".py"
            if not os.path.exists(path):
                path = os.path.join(stdlib, *module.split("."), "__init__.py")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    text += f.read()
        expected.append(text)
    assert corpus.train == expected[0] and corpus.heldout == expected[1]
    assert len(corpus.train) > 500_000 and len(corpus.heldout) > 20_000
    assert not set(charlm.STDLIB_TRAIN_MODULES) & set(charlm.STDLIB_HELDOUT_MODULES)
    assert charlm.stdlib_corpus() == corpus                     # read again: the same


def test_stdlib_corpus_finds_packages_skips_missing_and_explains_absence(tmp_path):
    (tmp_path / "collections").mkdir()
    (tmp_path / "collections" / "__init__.py").write_text("COLLECTIONS\n")
    (tmp_path / "abc.py").write_text("ABC\n")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "decoder.py").write_text("DECODER\n")
    (tmp_path / "heapq.py").write_text("HEAPQ\n")
    corpus = charlm.stdlib_corpus(str(tmp_path))
    assert corpus.train == "ABC\nCOLLECTIONS\nDECODER\n"        # list order, not file order
    assert corpus.heldout == "HEAPQ\n"
    assert "3 modules for training and 1 held out" in corpus.description
    with pytest.raises(CorpusError, match="standard library sources are not in .*--text FILE"):
        charlm.stdlib_corpus(str(tmp_path / "collections"))


def test_split_text_cuts_at_a_line_start():
    text = "".join(f"line {i:02d}\n" for i in range(20))          # 8 characters a line
    train, heldout = charlm.split_text(text, 0.1)
    assert train + heldout == text
    assert heldout == "line 18\nline 19\n"
    train, heldout = charlm.split_text("abcdefghij", 0.3)        # no newline: exact cut
    assert (train, heldout) == ("abcdefg", "hij")


def test_text_corpus_reads_utf8_and_refuses_other_encodings(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(("\ufeff" + "h\u00e9llo w\u00f6rld\n" * 10).encode("utf-8"))
    corpus = charlm.text_corpus(str(good))
    assert (corpus.train + corpus.heldout) == "h\u00e9llo w\u00f6rld\n" * 10   # BOM dropped
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"--text: .*latin1.txt is not UTF-8 text "
                                          r"\(byte 0xe9 at offset 3"):
        charlm.text_corpus(str(bad))
    with pytest.raises(CorpusError, match="--text: cannot read .*missing.txt"):
        charlm.text_corpus(str(tmp_path / "missing.txt"))


def test_vocabulary_and_streams():
    vocab = Vocabulary.from_text("banana\n")
    assert vocab.chars == "\nabn" and len(vocab) == 4
    ids = vocab.encode("nab\n")
    np.testing.assert_array_equal(ids, [3, 1, 2, 0])
    assert vocab.decode(ids) == "nab\n"
    with pytest.raises(ValueError, match="prime: expected characters of the vocabulary, "
                                         "got 'xz'"):
        vocab.encode("bxnzx", name="prime")
    inputs, targets = charlm.streams(np.arange(11), 3)          # L = (11 - 1) // 3 = 3
    np.testing.assert_array_equal(inputs, [[0, 3, 6], [1, 4, 7], [2, 5, 8]])
    np.testing.assert_array_equal(targets, [[1, 4, 7], [2, 5, 8], [3, 6, 9]])
    with pytest.raises(ValueError, match=r"ids: expected at least batch \+ 1 = 5 characters"):
        charlm.streams(np.arange(4), 4)


# ---------------------------------------------------------------------------------------------
# the model

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_charlm_gradients_central_difference(cell):
    rng = np.random.default_rng(0)
    m = tiny(cell=cell)
    idx = rng.integers(0, 5, size=(4, 2))
    targets = rng.integers(0, 5, size=(4, 2))
    shape = (2, 2, 4)                                   # (layers, B, H)
    h0 = 0.5 * rng.standard_normal(shape)
    c0 = 0.5 * rng.standard_normal(shape)
    state = (h0, c0) if cell == "lstm" else h0
    proj = [rng.standard_normal(shape) for _ in range(2)]   # a loss on the final state too

    def loss_and_grad():
        logits, final, cache = m.forward(idx, state)
        loss, dlogits = softmax_cross_entropy(logits, targets)
        parts = final if cell == "lstm" else (final,)
        loss += sum(float(np.sum(p * q)) for p, q in zip(parts, proj))
        dfinal = tuple(proj) if cell == "lstm" else proj[0]
        return loss, dlogits, dfinal, cache

    loss, dlogits, dfinal, cache = loss_and_grad()
    m.zero_grad()
    dx, dstate0 = m.backward(dlogits, cache, dstate=dfinal)
    assert dx is None
    assert set(m.params) == set(m.grads)
    assert {k.split(".")[0] for k in m.params} == {"embedding", "rnn", "head"}
    f = lambda: loss_and_grad()[0]                         # noqa: E731
    for name, p in m.params.items():
        assert rel_err(m.grads[name], central_difference(f, p)) < CENTRAL_TOL, name
    dh0 = dstate0[0] if cell == "lstm" else dstate0
    assert rel_err(dh0, central_difference(f, h0)) < CENTRAL_TOL
    if cell == "lstm":
        assert rel_err(dstate0[1], central_difference(f, c0)) < CENTRAL_TOL


def test_charlm_params_are_shared_with_its_parts_and_state_dict_round_trips():
    m, other = tiny(seed=1), tiny(seed=2)
    assert m.params["head.weight"] is m.head.params["weight"]
    assert m.params["rnn.weight_hh_l1"] is m.rnn.params["weight_hh_l1"]
    assert m.params["embedding.weight"] is m.embedding.params["weight"]
    other.load_state_dict(m.state_dict())
    for k in m.params:
        np.testing.assert_array_equal(other.params[k], m.params[k])
    with pytest.raises(KeyError, match=r"missing key\(s\) \['head.bias'\]"):
        other.load_state_dict({k: v for k, v in m.state_dict().items() if k != "head.bias"})


def test_evaluate_is_the_mean_cross_entropy_in_bits():
    rng = np.random.default_rng(3)
    m = tiny()
    ids = rng.integers(0, 5, size=23)
    # by hand: 2 streams of L = 11, each run in one call; windows of 4 must carry the state
    inputs, targets = charlm.streams(ids, 2)
    logits, _ = m(inputs)
    loss, _ = softmax_cross_entropy(logits, targets)
    assert charlm.evaluate(m, ids, batch=2, window=4) == pytest.approx(loss / math.log(2),
                                                                       rel=1e-12)
    # a model that predicts the uniform distribution costs log2(V) bits per character
    m.head.params["weight"][...] = 0
    m.head.params["bias"][...] = 1.5
    assert charlm.evaluate(m, ids, batch=3, window=5) == pytest.approx(math.log2(5), rel=1e-12)


def test_a_few_training_steps_lower_the_heldout_loss():
    corpus = charlm.Corpus(*charlm.split_text(TEXT, 0.1), "test")
    vocab = Vocabulary.from_text(TEXT)
    m = CharLM(len(vocab), embed=8, hidden=16, layers=1, dtype=np.float32,
               backend="reference", seed=0)
    trainer = charlm.Trainer(m, vocab.encode(corpus.train), vocab.encode(corpus.heldout),
                             batch=4, window=12, lr=1e-2)
    before = trainer.heldout_bpc()
    assert before == pytest.approx(math.log2(len(vocab)), abs=0.3)   # an untrained model
    for _ in range(60):
        trainer.update()
    after = trainer.heldout_bpc()
    assert after < before - 1.0, (before, after)
    assert trainer.epoch >= 1                      # the streams ran out and started again


# ---------------------------------------------------------------------------------------------
# sampling

def test_sample_frequencies_follow_the_temperature():
    """A model whose logits are log p at every step: the draws follow p**(1/T), normalised."""
    vocab = Vocabulary("abcd")
    m = tiny(vocab_size=4, layers=1)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    m.head.params["weight"][...] = 0
    m.head.params["bias"][...] = np.log(p)
    n = 4000
    for temperature in (1.0, 0.5):
        text = charlm.sample(m, vocab, n, temperature=temperature, prime="a", seed=5)
        counts = np.array([text.count(c) for c in "abcd"])
        expected = p ** (1 / temperature) / np.sum(p ** (1 / temperature))
        sigma = np.sqrt(n * expected * (1 - expected))
        assert np.all(np.abs(counts - n * expected) < 4 * sigma), (temperature, counts)


def test_sample_at_low_temperature_is_greedy_with_the_state_carried():
    vocab = Vocabulary("abcde")
    m = tiny(vocab_size=5, seed=4)
    for name in ("head.weight", "embedding.weight", "rnn.weight_ih_l0"):
        m.params[name] *= 20 if name == "head.weight" else 3    # confident predictions
    text = charlm.sample(m, vocab, 12, temperature=1e-6, prime="ab", seed=0)
    # by hand: one character per call, the state carried, the argmax each time
    state, chars = None, []
    for c in "ab":
        logits, state = m(vocab.encode(c)[:, None], state)
    for _ in range(12):
        c = int(np.argmax(logits[0, 0]))
        chars.append(vocab.chars[c])
        logits, state = m(np.array([[c]]), state)
    assert text == "".join(chars)
    # after an "a" comes sometimes "a", sometimes "b": the carried state decides
    assert "aa" in text and "ab" in text


def test_sample_seed_and_bad_arguments():
    vocab = Vocabulary("abcde")
    m = tiny(vocab_size=5)
    one = charlm.sample(m, vocab, 50, temperature=1.0, seed=1)
    assert len(one) == 50 and set(one) <= set("abcde")
    assert charlm.sample(m, vocab, 50, temperature=1.0, seed=1) == one
    assert charlm.sample(m, vocab, 50, temperature=1.0, seed=2) != one
    assert charlm.sample(m, vocab, 0, seed=1) == ""
    with pytest.raises(ValueError, match="temperature: expected a positive number, got 0"):
        charlm.sample(m, vocab, 5, temperature=0)
    with pytest.raises(ValueError, match="length: expected an integer >= 0, got -1"):
        charlm.sample(m, vocab, -1)
    with pytest.raises(ValueError, match="prime: expected characters of the vocabulary, "
                                         "got 'z'"):
        charlm.sample(m, vocab, 5, prime="az")


# ---------------------------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip_gives_the_same_samples(tmp_path):
    vocab = Vocabulary("\nabcdé")
    m = tiny(vocab_size=len(vocab), cell="gru", dtype=np.float32, seed=3)
    path = str(tmp_path / "m.npz")
    charlm.save_checkpoint(path, m, vocab, {"steps": 7})
    loaded, vocab2, config = charlm.load_checkpoint(path, backend="reference")
    assert vocab2 == vocab and config["steps"] == 7
    assert config["model"] == m.config() and loaded.cell == "gru"
    for k, v in m.params.items():
        assert loaded.params[k].dtype == np.float32
        np.testing.assert_array_equal(loaded.params[k], v)
    assert (charlm.sample(loaded, vocab2, 40, prime="ab", seed=4)
            == charlm.sample(m, vocab, 40, prime="ab", seed=4))
    assert not [f for f in os.listdir(tmp_path) if f != "m.npz"]   # no temporary file left


def test_bad_checkpoints_give_clear_errors(tmp_path):
    vocab = Vocabulary("abc")
    path = str(tmp_path / "m.npz")
    charlm.save_checkpoint(path, tiny(vocab_size=3), vocab)
    data = open(path, "rb").read()
    cases = {
        "missing.npz": (None, "no such file"),
        "truncated.npz": (data[:len(data) // 2], "not a readable fastrnn checkpoint "
                                                 r"\(truncated, damaged"),
        "text.npz": (b"hello, world\n", "not a readable fastrnn checkpoint"),
        "empty.npz": (b"", "not a readable fastrnn checkpoint"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"checkpoint .*{name}: {message}"):
            charlm.load_checkpoint(str(tmp_path / name))
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="an .npz archive but not a fastrnn "
                                              "character-model checkpoint"):
        charlm.load_checkpoint(str(tmp_path / "foreign.npz"))
    np.savez(tmp_path / "other.npz", format=np.array("something-else"))
    with pytest.raises(CheckpointError, match="expected format 'fastrnn-charlm', "
                                              "got 'something-else'"):
        charlm.load_checkpoint(str(tmp_path / "other.npz"))
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["param/head.weight"] = arrays["param/head.weight"][:2]
    np.savez(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"damaged \(ValueError: state_dict\['weight'\]"):
        charlm.load_checkpoint(str(tmp_path / "damaged.npz"))
    with pytest.raises(CheckpointError, match="is a directory"):
        charlm.load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# the command

TINY = ["--hidden", "8", "--layers", "1", "--embed", "4", "--batch", "4", "--window", "10",
        "--backend", "reference", "--sample-length", "30"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def test_cli_train_then_sample(tmp_path, text_file, capsys):
    out = str(tmp_path / "lm.npz")
    status = cli.main(["train", "--text", text_file, "--steps", "6", "--eval-every", "3",
                       "--out", out, "--seed", "3", *TINY])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "1-layer LSTM, hidden 8" in captured.out
    assert "held-out:" in captured.out and "bits per character" in captured.out
    assert "held-out" in captured.err and "chars/s" in captured.err    # the progress bar
    sample_printed = captured.out.split("sample (temperature 0.8, seed 3):\n")[1]
    assert len(sample_printed) == 30 + 1

    model, vocab, config = charlm.load_checkpoint(out, backend="reference")
    assert config["steps"] == 6 and config["model"]["hidden"] == 8
    assert vocab == Vocabulary(TEXT)
    printed = float(captured.out.split("held-out: ")[1].split()[0])
    assert printed == pytest.approx(config["heldout_bpc"], abs=5e-4)

    runs = []
    for _ in range(2):
        assert cli.main(["sample", out, "--length", "25", "--seed", "9", "--prime", "spam",
                         "--temperature", "0.5", "--backend", "reference"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    assert runs[0].startswith("spam") and len(runs[0]) == 4 + 25 + 1
    assert runs[0][4:-1] == charlm.sample(model, vocab, 25, 0.5, prime="spam", seed=9)


@pytest.mark.parametrize("argv, message", [
    (["train", "--hidden", "0"], "argument --hidden: expected an integer >= 1, got '0'"),
    (["train", "--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    (["train", "--cell", "tcn"], "argument --cell: invalid choice: 'tcn'"),
    (["train", "--dropout", "1"], r"argument --dropout: expected a number in \[0, 1\), got '1'"),
    (["sample", "x.npz", "--temperature", "0"],
     "argument --temperature: expected a positive number, got '0'"),
    (["sample", "x.npz", "--length", "ten"], "argument --length: expected an integer >= 0"),
    (["sample"], "the following arguments are required: CHECKPOINT"),
    (["train", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
])
def test_cli_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_cli_bad_files(tmp_path, text_file, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("abc\n" * 2)
    vocab = Vocabulary("xyz")
    charlm.save_checkpoint(str(tmp_path / "xyz.npz"), tiny(vocab_size=3), vocab)
    cases = [
        (["sample", str(tmp_path / "none.npz")], 1, "checkpoint .*none.npz: no such file"),
        (["sample", text_file], 1, "not a readable fastrnn checkpoint"),
        (["sample", str(tmp_path / "xyz.npz"), "--prime", "xa", "--backend", "reference"], 2,
         "--prime: expected characters of the vocabulary, got 'a'"),
        (["train", "--text", str(latin1), *TINY], 1, "--text: .*latin1.txt is not UTF-8 text"),
        (["train", "--text", str(tmp_path / "no.txt"), *TINY], 1, "--text: cannot read"),
        (["train", "--text", str(short), *TINY], 2,
         "--text: .*short.txt has 8 characters; --batch 4 needs at least 12"),
        (["train", "--text", text_file, "--bptt", "5", *TINY], 2,
         r"--bptt: expected a number >= --window \(10\), got 5"),
        (["train", "--text", text_file, "--out", str(tmp_path / "no" / "m.npz"), *TINY], 2,
         "--out: the directory .* does not exist"),
    ]
    for argv, status, message in cases:
        assert cli.main(argv) == status, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "no")


def test_cli_ctrl_c_saves_the_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    real_update = charlm.Trainer.update
    calls = []

    def update_then_interrupt(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(self)

    monkeypatch.setattr(charlm.Trainer, "update", update_then_interrupt)
    out = str(tmp_path / "lm.npz")
    assert cli.main(["train", "--text", text_file, "--steps", "50", "--out", out, *TINY]) == 130
    assert "interrupted after 2 updates; checkpoint saved to" in capsys.readouterr().err
    _, _, config = charlm.load_checkpoint(out)
    assert config["steps"] == 2


def _sigint_default():
    # a child of a process started in the background inherits SIGINT ignored (and Python then
    # leaves it so); the child of a terminal, which this test plays, has the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_python_m_fastrnn_ctrl_c_in_a_real_process(tmp_path, text_file):
    """A real SIGINT while the progress bar runs: exit 130, a loadable checkpoint, no
    traceback."""
    out = str(tmp_path / "lm.npz")
    proc = subprocess.Popen([sys.executable, "-m", "fastrnn", "train", "--text", text_file,
                             "--steps", "1000000", "--out", out, *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_sigint_default, **child_python())
    try:
        seen = b""
        deadline = time.monotonic() + 120
        while b"chars/s" not in seen and time.monotonic() < deadline:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"chars/s" in seen, seen
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (seen + stderr).decode()
    assert proc.returncode == 130, stderr
    assert "checkpoint saved to" in stderr and "Traceback" not in stderr
    _, _, config = charlm.load_checkpoint(out)
    assert config["steps"] >= 1
