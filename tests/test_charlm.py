"""fastrnn.charlm: corpus, vocabulary, the model's gradients, evaluation, training, sampling and
checkpoints (the ``fastrnn`` command is in test_cli.py)."""
import json
import math
import os
import sysconfig

import numpy as np
import pytest

from fastrnn import charlm
from fastrnn.charlm import CharLM, CheckpointError, CorpusError, Vocabulary
from fastrnn.train import softmax_cross_entropy

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
    with pytest.raises(KeyError, match=r"missing \['head.bias'\], unexpected \[\]"):
        other.load_state_dict({k: v for k, v in m.state_dict().items() if k != "head.bias"})


def test_charlm_load_state_dict_checks_everything_before_writing():
    """A bad last entry leaves every parameter as it was, and the error names it with its
    part's prefix."""
    m, other = tiny(seed=1), tiny(seed=2)
    before = other.state_dict()
    bad = m.state_dict()
    bad["head.weight"] = bad["head.weight"][:, :3]             # head comes after embedding, rnn
    with pytest.raises(ValueError, match=r"state_dict\['head.weight'\]: expected shape "
                                         r"\(5, 4\), got \(5, 3\)"):
        other.load_state_dict(bad)
    for k, v in before.items():
        np.testing.assert_array_equal(other.params[k], v, err_msg=k)
    bad = m.state_dict()
    bad["rnn.weight_hh_l1"] = bad["rnn.weight_hh_l1"].astype(complex)
    with pytest.raises(TypeError, match=r"state_dict\['rnn.weight_hh_l1'\]: expected a real "
                                        "array, got dtype complex128"):
        other.load_state_dict(bad)
    for k, v in before.items():
        np.testing.assert_array_equal(other.params[k], v, err_msg=k)


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
    with pytest.raises(CheckpointError, match=r"damaged \(ValueError: "
                                              r"state_dict\['head.weight'\]: expected shape"):
        charlm.load_checkpoint(str(tmp_path / "damaged.npz"))
    with np.load(path) as npz:
        arrays = dict(npz)
    for name, changes, message in [
        ("future.npz", {"version": np.array(3)},
         "format version 3, this fastrnn reads versions 1, 2"),
        ("repeats.npz", {"vocab": np.array([ord(c) for c in "aab"], dtype=np.int32)},
         "damaged: its vocabulary repeats the character\\(s\\) 'a'"),
        ("huge.npz", {"config": np.array(json.dumps(
            {"model": {**tiny(vocab_size=3).config(), "hidden": 10**9}}))},
         "its model cannot be built here: a 2-layer LSTM with hidden 1000000000, .* has "
         "[0-9,]+ parameters: [0-9,.]+ PiB for its weights and gradients in float64, more than "
         "this machine's .* of memory"),
    ]:
        np.savez(tmp_path / name, **{**arrays, **changes})
        with pytest.raises(CheckpointError, match=f"checkpoint .*{name}: {message}"):
            charlm.load_checkpoint(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="is a directory"):
        charlm.load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# options the tests above leave out; what the driver and the command rely on

def test_charlm_backward_without_dlogits_is_backward_with_zero_dlogits():
    """TruncatedBPTT's history windows (k2 > k1) have no loss: dlogits is None."""
    rng = np.random.default_rng(2)
    m = tiny()
    idx = rng.integers(0, 5, size=(3, 2))
    dstate = tuple(rng.standard_normal((2, 2, 4)) for _ in range(2))
    grads = []
    for dlogits in (None, np.zeros((3, 2, 5))):
        _, _, cache = m.forward(idx)
        m.zero_grad()
        _, dstate0 = m.backward(dlogits, cache, dstate=dstate)
        grads.append({**{k: g.copy() for k, g in m.grads.items()}, "dh0": dstate0[0]})
    for k in grads[1]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)
    assert np.abs(grads[0]["rnn.weight_hh_l0"]).max() > 0


def test_charlm_dropout_gradients_central_difference():
    """dropout > 0: the masks replayed (the layer's generator reset before every forward)."""
    rng = np.random.default_rng(5)
    m = tiny(layers=3, dropout=0.4)
    idx = rng.integers(0, 5, size=(4, 3))
    targets = rng.integers(0, 5, size=(4, 3))

    def loss_and_cache():
        m.rnn.rng = np.random.default_rng(11)
        logits, _, cache = m.forward(idx)
        return softmax_cross_entropy(logits, targets), cache

    (loss, dlogits), cache = loss_and_cache()
    m.zero_grad()
    m.backward(dlogits, cache)
    f = lambda: loss_and_cache()[0][0]                     # noqa: E731
    for name in ("rnn.weight_ih_l1", "rnn.weight_ih_l2", "embedding.weight", "head.weight"):
        assert rel_err(m.grads[name], central_difference(f, m.params[name])) < CENTRAL_TOL, name
    # the masks act: inference (no dropout) gives other logits than training
    m.rnn.rng = np.random.default_rng(11)
    assert rel_err(m.forward(idx)[0], m(idx)[0]) > 1e-3


def test_evaluate_max_chars_reads_only_that_many():
    rng = np.random.default_rng(6)
    m = tiny()
    ids = rng.integers(0, 5, size=60)
    limited = charlm.evaluate(m, ids, batch=2, window=4, max_chars=np.int64(20))
    assert limited == charlm.evaluate(m, ids[:21], batch=2, window=4)
    assert limited != charlm.evaluate(m, ids, batch=2, window=4)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_trainer_state_dict_continues_exactly(dtype, tol):
    corpus = charlm.Corpus(*charlm.split_text(TEXT[:300], 0.1), "test")
    vocab = Vocabulary.from_text(TEXT)

    def build():
        m = CharLM(len(vocab), embed=3, hidden=5, layers=2, dropout=0.3, dtype=dtype,
                   backend="reference", seed=4)
        return m, charlm.Trainer(m, vocab.encode(corpus.train), vocab.encode(corpus.heldout),
                                 batch=np.int64(3), window=np.int64(7), k2=10, lr=0.01)

    m_once, t_once = build()
    for _ in range(16):                                   # 12 updates an epoch: one reset
        t_once.update()
    m_first, t_first = build()
    for _ in range(8):
        t_first.update()
    m_second, t_second = build()
    m_second.load_state_dict(m_first.state_dict())
    t_second.load_state_dict(t_first.state_dict())
    for _ in range(8):
        t_second.update()
    assert t_second.epoch == t_once.epoch == 1 and t_second.updates == 16
    for k in m_once.params:
        assert rel_err(m_second.params[k], m_once.params[k]) < tol, k


def test_sample_refuses_what_would_mean_nothing():
    vocab = Vocabulary("abcde")
    m = tiny(vocab_size=5)
    with pytest.raises(ValueError, match="temperature: expected at least .* for this model "
                                         r"\(logits / temperature overflows\), got 1e-320"):
        charlm.sample(m, vocab, 5, temperature=1e-320)
    with pytest.raises(ValueError, match="length: expected at most 100,000,000 characters"):
        charlm.sample(m, vocab, 10**12)
    assert len(charlm.sample(m, vocab, np.int64(4), temperature=np.float32(0.5), seed=0)) == 4
    m.params["rnn.weight_hh_l1"][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"the model's logits are not finite \(NaN or "
                                         r"infinity\) after 0 characters"), \
            np.errstate(invalid="ignore"):
        charlm.sample(m, vocab, 5)


def test_charlm_too_large_for_memory_and_numpy_integer_sizes(tmp_path):
    with pytest.raises(charlm.ModelTooLarge, match=r"a 2-layer LSTM with hidden 1000000000, "
                                                   r"embedding 64 and 100 characters has "):
        CharLM(100, hidden=10**9)
    m = CharLM(np.int64(5), embed=np.int32(3), hidden=np.int64(4), layers=np.int64(2),
               backend="reference", seed=np.int64(1))
    path = str(tmp_path / "m.npz")
    charlm.save_checkpoint(path, m, Vocabulary("abcde"), {"steps": np.int64(3)})
    loaded, _, config = charlm.load_checkpoint(path, backend="reference")
    assert config["model"] == {"vocab_size": 5, "embed": 3, "hidden": 4, "layers": 2,
                               "cell": "lstm", "dropout": 0.0, "layer_norm": False,
                               "zoneout": 0.0, "dtype": "float32"}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_parameter_count_without_building_the_model(cell, layer_norm):
    """charlm.num_params, which the memory check uses before building, counts what is built."""
    m = CharLM(7, embed=3, hidden=5, layers=3, cell=cell, layer_norm=layer_norm,
               backend="reference")
    assert charlm.num_params(7, 3, 5, 3, cell, layer_norm) == m.num_params()


@pytest.mark.parametrize("cell, zoneout, kept", [("lstm", 0.2, 0.2), ("lstm", (0.1, 0.3), [0.1, 0.3]),
                                                 ("gru", 0.25, 0.25)])
def test_zoneout_in_the_config_and_checkpoint(tmp_path, cell, zoneout, kept):
    m = CharLM(5, embed=3, hidden=4, cell=cell, zoneout=zoneout, backend="reference", seed=1)
    assert m.config()["zoneout"] == kept
    path = str(tmp_path / "m.npz")
    charlm.save_checkpoint(path, m, Vocabulary("abcde"), {"steps": 1})
    loaded, _, config = charlm.load_checkpoint(path, backend="reference")
    assert loaded.rnn.zoneout == m.rnn.zoneout and config["model"]["zoneout"] == kept


def test_a_non_finite_model_is_not_saved_over_a_checkpoint(tmp_path):
    vocab = Vocabulary("abc")
    m = tiny(vocab_size=3)
    path = tmp_path / "m.npz"
    charlm.save_checkpoint(str(path), m, vocab)
    good = path.read_bytes()
    m.params["head.bias"][1] = np.nan
    with pytest.raises(charlm.NonFiniteParameters, match=r"m.npz: not written: the model's "
                                                         r"parameters hold NaN or infinity "
                                                         r"\(head.bias\)"):
        charlm.save_checkpoint(str(path), m, vocab)
    assert path.read_bytes() == good


def test_grads_ready_reports_each_bucket_when_its_gradients_are_final(backend):
    # A distributed driver starts reducing bucket i at grads_ready(i): the gradients it sees then
    # must be the ones backward ends with, and the buckets must come head, top layer .. layer 0,
    # embedding, each key in exactly one
    model = CharLM(11, embed=5, hidden=6, layers=3, dtype=np.float64, backend=backend, seed=0)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 11, (7, 3))
    logits, _, cache = model.forward(idx, train=True)
    buckets = model.grad_buckets()
    assert sorted(k for keys in buckets for k in keys) == sorted(model.grads)
    assert [keys[0].split(".")[0] for keys in buckets] == ["head", "rnn", "rnn", "rnn",
                                                           "embedding"]
    assert all(k.endswith(("_l2", "_l2_reverse")) for k in buckets[1])
    assert all(k.endswith(("_l0", "_l0_reverse")) for k in buckets[3])
    seen = []
    model.zero_grad()
    model.backward(rng.standard_normal(logits.shape), cache,
                   grads_ready=lambda i: seen.append((i, {k: model.grads[k].copy()
                                                          for k in buckets[i]})))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    for i, at_ready in seen:
        for key, value in at_ready.items():
            assert np.array_equal(value, model.grads[key]), (i, key)
            assert np.any(value != 0), key
