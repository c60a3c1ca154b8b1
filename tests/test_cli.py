"""The ``fastrnn`` command: every option of ``train`` and ``sample`` run with a valid value and
checked against the library doing the same (so an ignored option fails), the command's errors and
exit statuses, and what it does to keep training: Ctrl-C, SIGTERM and errors save the checkpoint,
a non-finite model never replaces a good checkpoint, ``--resume`` continues a run exactly.

Most tests call ``cli.main`` in this process (fast, and able to watch the library's calls);
the ones about the real program (signals, ``python -m fastrnn``, the options' end-to-end effect)
run it in a child process with tiny models."""
import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastrnn
from fastrnn import charlm, cli
from fastrnn.charlm import CharLM, Vocabulary

from conftest import BACKENDS, child_python
from test_charlm import TEXT, tiny
from test_train import rel_err

# ---------------------------------------------------------------------------------------------
# the command

TINY = ["--hidden", "8", "--layers", "1", "--embed", "4", "--batch", "4", "--window", "10",
        "--backend", "reference", "--sample-length", "30"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def test_cli_train_then_sample(tmp_path, text_file, capsys, monkeypatch):
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

    # --quantize: the same draws as the model whose layers fastrnn.quantize made (and made
    # they are: the tiny model draws the same characters either way)
    made = []

    def quantize(layer, weights, backend):
        made.append((weights, backend))
        return fastrnn.quantize(layer, weights, backend=backend)
    monkeypatch.setattr(cli.quantized, "quantize", quantize)
    for fmt in ("bfloat16", "int8"):
        assert cli.main(["sample", out, "--length", "25", "--seed", "9", "--prime", "spam",
                         "--backend", "reference", "--quantize", fmt]) == 0
        model.rnn = fastrnn.quantize(charlm.load_checkpoint(out, backend="reference")[0].rnn,
                                     fmt, backend="reference")
        assert capsys.readouterr().out[4:-1] == charlm.sample(model, vocab, 25, 0.8,
                                                              prime="spam", seed=9)
    assert made == [("bfloat16", "reference"), ("int8", "reference")]


@pytest.mark.parametrize("argv, message", [
    (["train", "--hidden", "0"], "argument --hidden: expected an integer >= 1, got '0'"),
    (["train", "--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    (["train", "--cell", "tcn"], "argument --cell: invalid choice: 'tcn'"),
    (["train", "--dropout", "1"], r"argument --dropout: expected a number in \[0, 1\), got '1'"),
    (["sample", "x.npz", "--temperature", "0"],
     "argument --temperature: expected a positive number, got '0'"),
    (["sample", "x.npz", "--length", "ten"],
     r"argument --length: expected an integer in \[0, 100,000,000\], got 'ten'"),
    (["sample", "x.npz", "--length", str(10**12)],
     r"argument --length: expected an integer in \[0, 100,000,000\], got '1000000000000'"),
    (["train", "--sample-length", str(10**9)], r"argument --sample-length: expected an integer "
                                               r"in \[0, 100,000,000\]"),
    (["train", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["sample", "x.npz", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["train", "--save-every", "0"], "argument --save-every: expected an integer >= 1, got '0'"),
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
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text(TEXT, encoding="utf-16")
    utf16_no_bom = tmp_path / "utf16le.txt"
    utf16_no_bom.write_bytes(TEXT.encode("utf-16-le"))
    vocab = Vocabulary("xyz")
    charlm.save_checkpoint(str(tmp_path / "xyz.npz"), tiny(vocab_size=3), vocab)
    cases = [
        (["sample", str(tmp_path / "none.npz")], 1, "checkpoint .*none.npz: no such file"),
        (["sample", text_file], 1, "not a readable fastrnn checkpoint"),
        (["sample", str(tmp_path / "xyz.npz"), "--prime", "xa", "--backend", "reference"], 2,
         "--prime: expected characters of the vocabulary, got 'a'"),
        (["train", "--text", str(latin1), *TINY], 1, "--text: .*latin1.txt is not UTF-8 text"),
        (["train", "--text", str(tmp_path / "no.txt"), *TINY], 1, "--text: cannot read"),
        (["train", "--text", str(short), *TINY], 1,
         "--text: .*short.txt has 8 characters; --batch 4 needs at least 12"),
        (["train", "--text", str(empty), *TINY], 1, "--text: .*empty.txt is empty"),
        (["train", "--text", str(utf16), *TINY], 1,
         "--text: .*utf16.txt is UTF-16 text, not UTF-8; convert it first, e.g. iconv -f UTF-16"),
        (["train", "--text", str(utf16_no_bom), *TINY], 1, "utf16le.txt is UTF-16 text"),
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


# ---------------------------------------------------------------------------------------------
# helpers

def run_fastrnn(*argv, timeout=300):
    """``python -m fastrnn ARGV`` in a child process; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "fastrnn", *argv], capture_output=True,
                          text=True, timeout=timeout, **child_python())


def library_run(text, options, steps):
    """What ``fastrnn train`` with these run options should do, done with the library."""
    o = {**cli.RUN_DEFAULTS, **options}
    train, heldout = charlm.split_text(text, 0.1)
    vocab = Vocabulary.from_text(text)
    model = CharLM(len(vocab), embed=o["embed"], hidden=o["hidden"], layers=o["layers"],
                   cell=o["cell"], dropout=o["dropout"], layer_norm=o["layer_norm"],
                   zoneout=o["zoneout"], dtype=o["dtype"], backend=o.get("backend", "reference"), seed=o["seed"])
    trainer = charlm.Trainer(model, vocab.encode(train), vocab.encode(heldout), batch=o["batch"],
                             window=o["window"], k2=o["bptt"], lr=o["lr"], clip=o["clip"])
    updates = [trainer.update() for _ in range(steps)]
    return model, vocab, updates


def _argv(options):
    """The command line of these run options (a flag, such as --layer-norm, when True)."""
    argv = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [] if v is False else [flag, str(v)]
    return argv


# ---------------------------------------------------------------------------------------------
# every option with a valid value

# every run option away from its default (--bptt > --window: the history windows of BPTT(k1, k2))
RUN_OPTIONS = {"cell": "gru", "hidden": 6, "layers": 3, "embed": 5, "window": 6, "bptt": 9,
               "batch": 3, "lr": 0.01, "clip": 0.05, "dropout": 0.3, "layer_norm": True,
               "zoneout": 0.2, "dtype": "float64", "seed": 7}


def test_every_train_option_does_what_the_library_does(tmp_path, text_file):
    """One real run with every run option changed, compared with the library run with the same
    options (float64, same backend: to 1e-12); then each option put back to its default in the
    library run must change the result, so a command that ignored any of them fails."""
    assert set(RUN_OPTIONS) == set(cli.RUN_DEFAULTS)
    out = str(tmp_path / "lm.npz")
    proc = run_fastrnn("train", "--text", text_file, "--steps", "4", *_argv(RUN_OPTIONS),
                       "--backend", "reference", "--eval-every", "2", "--sample-length", "17",
                       "--temperature", "0.3", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "3-layer GRU, hidden 6, embedding 5" in proc.stdout and "layer norm" in proc.stdout
    assert "zoneout 0.2" in proc.stdout
    assert "backend reference" in proc.stdout                     # not auto's choice
    assert re.search(r"held-out \d\.\d{3} bits/char", proc.stderr)  # evaluated before the end
    model, vocab, config = charlm.load_checkpoint(out, backend="reference")
    assert config["steps"] == 4 and config["model"]["dropout"] == 0.3
    for k, v in model.params.items():
        assert v.dtype == np.float64, k

    expected, _, updates = library_run(TEXT, RUN_OPTIONS, 4)
    assert updates[0].grad_norm > RUN_OPTIONS["clip"]              # the clipping acted
    for k, v in expected.params.items():
        assert rel_err(model.params[k], v) < 1e-12, k
    for name, default in cli.RUN_DEFAULTS.items():
        if name in ("dtype", "window"):
            continue    # dtype checked above; --window ignored would make --bptt 9 an error
        other, _, _ = library_run(TEXT, {**RUN_OPTIONS, name: default}, 4)
        differs = any(k not in other.params or other.params[k].shape != v.shape
                      or rel_err(other.params[k], v) > 1e-6 for k, v in model.params.items())
        assert differs, f"--{name} made no difference"

    # --sample-length, --temperature and --seed of the final sample
    printed = proc.stdout.split("sample (temperature 0.3, seed 7):\n")[1]
    assert printed == charlm.sample(model, vocab, 17, 0.3, seed=7) + "\n"
    assert printed != charlm.sample(model, vocab, 17, 0.8, seed=7) + "\n"


@pytest.mark.skipif("cython" not in BACKENDS, reason="needs the cython backend")
def test_threads_sets_the_chosen_backend_only(tmp_path, text_file, capsys):
    """--threads reaches the backend that runs; with cython, a count above Numba's limit is
    fine and no message speaks of Numba."""
    kernels = fastrnn.get_backend("cython")
    before = kernels.get_num_threads()
    out = str(tmp_path / "lm.npz")
    try:
        for n in (before + 1, 64):
            status = cli.main(["train", "--text", text_file, "--steps", "1", "--out", out,
                               *TINY[:-4], "--backend", "cython", "--sample-length", "0",
                               "--threads", str(n)])
            err = capsys.readouterr().err
            assert status == 0, err
            assert "numba" not in err.lower()
            assert kernels.get_num_threads() == n
        kernels.set_num_threads(before)
        assert cli.main(["sample", out, "--length", "3", "--backend", "cython",
                         "--threads", str(before + 2)]) == 0
        assert kernels.get_num_threads() == before + 2
    finally:
        kernels.set_num_threads(before)


def test_out_force_and_save_every(tmp_path, text_file, capsys, monkeypatch):
    saved = []
    real_save = charlm.save_checkpoint

    def spy(path, model, vocab, info=None, training=None, **options):
        saved.append((path, info["steps"], training["updates"]))
        return real_save(path, model, vocab, info, training, **options)

    monkeypatch.setattr(charlm, "save_checkpoint", spy)
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    argv = ["train", "--text", text_file, "--steps", "5", "--out", str(out), *TINY]
    assert cli.main(argv) == 2
    assert re.search("--out: .*notes.txt exists and is not a fastrnn checkpoint; give another "
                     "file name, or --force to replace it", capsys.readouterr().err)
    assert out.read_text() == "my notes\n" and not saved
    assert cli.main(["train", "--text", text_file, "--out", text_file, *TINY]) == 2
    assert re.search("--out: .*text.txt is the text to train on", capsys.readouterr().err)
    assert open(text_file).read() == TEXT
    assert cli.main(argv + ["--force", "--save-every", "2"]) == 0, capsys.readouterr().err
    assert saved == [(str(out), 2, 2), (str(out), 4, 4), (str(out), 5, 5)]
    assert charlm.is_checkpoint(str(out))
    assert cli.main(argv) == 0                   # now a checkpoint: replaced without --force


def test_resume_continues_exactly(tmp_path):
    """6 updates in one run == 3 updates, then --resume for 3 more (float64 to 1e-12), with
    dropout (its generator), BPTT(6, 8) (the kept history) and an epoch boundary (5 updates an
    epoch)."""
    text = tmp_path / "short.txt"
    text.write_text(TEXT[:100])
    backend = "cython" if "cython" in BACKENDS else "reference"
    common = ["--text", str(text), "--cell", "lstm", "--layers", "2", "--dropout", "0.25",
              "--hidden", "8", "--embed", "4", "--batch", "3", "--window", "6", "--bptt", "8",
              "--dtype", "float64", "--lr", "0.01", "--seed", "2"]
    rest = ["--backend", backend, "--sample-length", "5", "--eval-every", "2"]
    full, part, resumed = (str(tmp_path / f"{n}.npz") for n in ("full", "part", "resumed"))
    for argv in (["train", *common, "--steps", "6", "--out", full, *rest],
                 ["train", *common, "--steps", "3", "--out", part, *rest],
                 ["train", "--resume", part, "--steps", "3", "--out", resumed, *rest]):
        proc = run_fastrnn(*argv)
        assert proc.returncode == 0, proc.stderr
    assert f"resume: from update 3 of {part}" in proc.stdout
    assert f"backend {backend}" in proc.stdout
    m_full, _, c_full = charlm.load_checkpoint(full, backend="reference")
    m_res, _, c_res = charlm.load_checkpoint(resumed, backend="reference")
    m_part, _, _ = charlm.load_checkpoint(part, backend="reference")
    assert c_full["steps"] == c_res["steps"] == 6
    s_full, s_res = charlm.load_training_state(full), charlm.load_training_state(resumed)
    assert s_full["epoch"] == s_res["epoch"] == 1
    assert s_full["driver"]["optimizer"]["steps"] == s_res["driver"]["optimizer"]["steps"] == 6
    for k, v in m_full.params.items():
        assert rel_err(m_res.params[k], v) < 1e-12, k
        assert rel_err(m_part.params[k], v) > 1e-6, k        # the resumed run did train


def test_resume_errors(tmp_path, text_file, capsys):
    out = str(tmp_path / "lm.npz")
    assert cli.main(["train", "--text", text_file, "--steps", "2", "--out", out, *TINY]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    old = str(tmp_path / "old.npz")
    charlm.save_checkpoint(old, tiny(vocab_size=3), Vocabulary("abc"))     # no training state
    cases = [
        (["--resume", out, "--hidden", "8"], 2,
         "--hidden: the run's options come from the checkpoint with --resume; leave --hidden "
         "out"),
        (["--resume", out, "--text", str(other)], 1,
         "--text: .*other.txt is not the text the checkpoint .*lm.npz was trained on"),
        (["--resume", old], 1, "old.npz: holds no training state"),
        (["--resume", str(tmp_path / "none.npz")], 1, "none.npz: no such file"),
    ]
    for argv, status, message in cases:
        assert cli.main(["train", *argv, "--steps", "1", "--out", out]) == status, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)


# ---------------------------------------------------------------------------------------------
# no training is lost

def test_an_error_during_training_saves_what_was_trained(tmp_path, text_file, capsys,
                                                         monkeypatch):
    real_update = charlm.Trainer.update

    def update_then_fail(self):
        if self.updates == 2:
            raise RuntimeError("a bug")
        return real_update(self)

    monkeypatch.setattr(charlm.Trainer, "update", update_then_fail)
    out = str(tmp_path / "lm.npz")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "--text", text_file, "--steps", "50", "--out", out, *TINY])
    assert "error after 2 updates (RuntimeError); checkpoint saved to" in capsys.readouterr().err
    assert charlm.load_checkpoint(out)[2]["steps"] == 2
    assert charlm.load_training_state(out)["updates"] == 2


def test_a_non_finite_model_never_replaces_a_good_checkpoint(tmp_path, text_file, capsys):
    out = tmp_path / "lm.npz"
    assert cli.main(["train", "--text", text_file, "--steps", "2", "--out", str(out),
                     *TINY]) == 0
    good = out.read_bytes()
    capsys.readouterr()
    # lr 1e300: the first update overflows the float32 weights; the next gradients are NaN
    with np.errstate(all="ignore"):
        status = cli.main(["train", "--text", text_file, "--steps", "3", "--lr", "1e300",
                           "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert status == 1, err
    assert out.read_bytes() == good
    beside = tmp_path / "lm.nonfinite.npz"
    assert re.search(r"the model's parameters are not finite \(NaN or infinity\) after 3 "
                     rf"updates .*saved to {re.escape(str(beside))}; .*lm.npz is left as it "
                     "was", err), err
    assert "skipped 2" in err                                    # the progress bar says so
    model, _, _ = charlm.load_checkpoint(str(beside))
    assert not all(np.isfinite(p).all() for p in model.params.values())
    assert charlm.load_training_state(str(beside))["driver"]["skipped"] == 2
    # more non-finite updates in a row than --max-skipped: stop with an error
    with np.errstate(all="ignore"):
        status = cli.main(["train", "--text", text_file, "--steps", "50", "--lr", "1e300",
                           "--max-skipped", "1", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert status == 1 and out.read_bytes() == good
    assert re.search(r"stopped after 2 updates: the gradient was not finite \(norm nan\) in 2 "
                     r"updates in a row \(max_skipped=1\)", err), err


def test_a_failed_save_keeps_the_checkpoint_somewhere_it_names(tmp_path, text_file, capsys,
                                                                monkeypatch):
    import tempfile
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    real_write = charlm._write_file

    def disk_full(path, data):
        if os.path.dirname(path) == str(tmp_path):
            with open(path, "wb") as f:                        # half written, then full
                f.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(charlm, "_write_file", disk_full)
    out = str(tmp_path / "lm.npz")
    assert cli.main(["train", "--text", text_file, "--steps", "3", "--out", out, *TINY]) == 1
    err = capsys.readouterr().err
    match = re.search(r"cannot write .*lm.npz: No space left on device; the checkpoint was "
                      r"saved to (\S+) instead", err)
    assert match, err
    assert os.path.dirname(match.group(1)) == str(elsewhere)
    assert charlm.load_checkpoint(match.group(1))[2]["steps"] == 3
    assert os.listdir(tmp_path) == ["text.txt", "elsewhere"] or \
        sorted(os.listdir(tmp_path)) == ["elsewhere", "text.txt"]   # no temporary left


def test_a_save_killed_half_way_leaves_no_temporary_for_ever(tmp_path):
    """The next save removes the temporaries of writers that are gone (not a live one's)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = str(tmp_path / "m.npz")
        for pid in (dead.pid, live.pid):
            (tmp_path / f"m.npz.tmp{pid}").write_bytes(b"half a checkpoint")
        charlm.save_checkpoint(path, tiny(vocab_size=3), Vocabulary("abc"))
        assert sorted(os.listdir(tmp_path)) == ["m.npz", f"m.npz.tmp{live.pid}"]
    finally:
        live.kill()
        live.wait()


def _start_training(tmp_path, text_file, *extra):
    """A long training run in a child; returns (process, out, stderr read so far) once the
    progress bar shows."""
    out = str(tmp_path / "lm.npz")

    def sigint_default():
        # a child of a process started in the background inherits SIGINT ignored (and Python
        # then leaves it so); the child of a terminal, which this test plays, has the default
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "fastrnn", "train", "--text", text_file,
                             "--steps", "1000000", "--out", out, *TINY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default, **child_python())
    seen = b""
    deadline = time.monotonic() + 120
    while b"chars/s" not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    return proc, out, seen


@pytest.mark.parametrize("signals, status, word", [
    ((signal.SIGINT,), 130, "interrupted"),
    ((signal.SIGTERM,), 143, "terminated"),
    ((signal.SIGINT, signal.SIGINT), 130, "interrupted"),
])
def test_signals_in_a_real_process_save_the_checkpoint(tmp_path, text_file, signals, status,
                                                       word):
    """Real SIGINT (Ctrl-C), SIGTERM (kill, timeout, schedulers), two Ctrl-C at once: the
    checkpoint is saved, the exit status says which, no traceback."""
    proc, out, seen = _start_training(tmp_path, text_file)
    try:
        assert b"chars/s" in seen, seen
        for signum in signals:
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (seen + stderr).decode()
    assert proc.returncode == status, stderr
    assert re.search(rf"{word} after \d+ updates; checkpoint saved to", stderr), stderr
    assert "Traceback" not in stderr
    assert charlm.load_checkpoint(out)[2]["steps"] >= 1


def test_a_second_ctrl_c_in_the_progress_bar_close_still_saves(tmp_path, text_file, capsys,
                                                               monkeypatch):
    """The race the real-process test can only hit by chance: the second SIGINT lands while the
    progress bar closes after the first."""
    import tqdm
    real_update, real_close = charlm.Trainer.update, tqdm.tqdm.close

    def update_then_ctrl_c(self):
        if self.updates == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)                    # the handler runs here and raises
        return real_update(self)

    def close_with_ctrl_c(self):
        if not getattr(self, "_second_sent", False) and self.n == 2:
            self._second_sent = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        return real_close(self)

    monkeypatch.setattr(charlm.Trainer, "update", update_then_ctrl_c)
    monkeypatch.setattr(tqdm.tqdm, "close", close_with_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
    try:
        out = str(tmp_path / "lm.npz")
        status = cli.main(["train", "--text", text_file, "--steps", "50", "--out", out, *TINY])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert "interrupted after 2 updates; checkpoint saved to" in capsys.readouterr().err
    assert charlm.load_checkpoint(out)[2]["steps"] == 2


# ---------------------------------------------------------------------------------------------
# errors that help

def test_errors_that_help(tmp_path, text_file, capsys):
    out = str(tmp_path / "lm.npz")
    assert cli.main(["train", "--text", text_file, "--steps", "1", "--out", out, *TINY]) == 0
    nan_model = str(tmp_path / "nan.npz")
    model, vocab, _ = charlm.load_checkpoint(out)
    model.params["head.bias"][0] = np.nan
    charlm.save_checkpoint(nan_model, model, vocab, allow_nonfinite=True)
    capsys.readouterr()
    cases = [
        (["train", "--text", text_file, "--out", out, *TINY, "--hidden", "10000000"], 2,
         r"--hidden 10000000, --embed 4, --layers 1: a model of [0-9,]+ parameters; training "
         r"it needs about [0-9,.]+ [TP]iB \(weights, gradients, Adam's two moments and the "
         r"activations of an update, float32\), more than this machine's .* of memory"),
        (["train", "--text", text_file, "--out", out, *TINY, "--dropout", "0.2"], 2,
         "--dropout 0.2: dropout acts between recurrent layers, so with --layers 1 it would "
         "do nothing"),
        (["sample", out, "--temperature", "1e-320", "--backend", "reference"], 2,
         r"--temperature: expected at least .* for this model \(logits / temperature "
         r"overflows\), got 1e-320"),
        (["sample", nan_model, "--backend", "reference"], 1,
         r"the model's logits are not finite \(NaN or infinity\) after 0 characters"),
    ]
    for argv, status, message in cases:
        assert cli.main(argv) == status, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert "Traceback" not in err


def test_exit_statuses_are_the_documented_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "1    a file that cannot be used (missing, unreadable, not UTF-8, empty" in help_text
    for status in ("2    a bad option", "130  interrupted by Ctrl-C",
                   "143  terminated by SIGTERM"):
        assert status in help_text
