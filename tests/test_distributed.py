"""fastrnn.distributed and `mpiexec -n 2 fastrnn train`, run as subprocesses with timeouts.

The oracle is one process on the whole batch: 2 ranks must reach its parameters to float
rounding (float64 1e-10, float32 1e-5, relative to the largest parameter)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import child_python

pytest.importorskip("mpi4py", reason='needs the mpi extra: pip install mpi4py mpich')
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_worker  # noqa: E402

WORKER = os.path.join(HERE, "mpi_worker.py")
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
TIMEOUT = 120          # seconds for a whole mpiexec run; a hang fails the test, not the suite


def mpiexec(n, *argv, timeout=TIMEOUT):
    return subprocess.run([MPIEXEC, "-n", str(n), *argv], capture_output=True, text=True,
                          timeout=timeout, **child_python())


def worker(n, *argv):
    done = mpiexec(n, sys.executable, WORKER, *argv)
    assert done.returncode == 0, done.stderr
    return done


def max_relative_difference(params, npz):
    scale = max(float(np.max(np.abs(p))) for p in params.values())
    return max(float(np.max(np.abs(p - npz["param/" + k]))) for k, p in params.items()) / scale


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k2", [None, 10])
def test_two_ranks_make_the_updates_of_one_process(tmp_path, dtype, k2):
    out = tmp_path / "ranks.npz"
    # each rank builds its model from its own seed: rank 0's weights must win
    worker(2, "train", str(out), "--dtype", dtype, "--steps", "3", "--seed-by-rank",
           *(["--k2", str(k2)] if k2 else []))
    model, trainer, losses = mpi_worker.train(None, dtype, 3, k2, seed=0)
    got = np.load(out)
    assert float(got["spread"]) == 0.0                  # the ranks hold the same parameters
    assert max_relative_difference(model.params, got) < TOLERANCE[dtype]
    np.testing.assert_allclose(got["losses"], losses, rtol=TOLERANCE[dtype])
    h, c = trainer.state_dict()["driver"]["state"]     # the whole batch's, gathered on rank 0
    np.testing.assert_allclose(got["state_h"], h, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(got["state_c"], c, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_driver_on_a_plain_layer_makes_the_updates_of_one_process(tmp_path, dtype):
    out = tmp_path / "ranks.npz"
    worker(2, "layer", str(out), "--dtype", dtype, "--steps", "3", "--seed-by-rank")
    model, _ = mpi_worker.train_layer(None, dtype, 3, seed=0)
    got = np.load(out)
    assert float(got["spread"]) == 0.0
    assert max_relative_difference(model.params, got) < TOLERANCE[dtype]


def test_a_nonfinite_gradient_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    out = tmp_path / "ranks.npz"
    worker(2, "nonfinite", str(out), "--steps", "3")
    got = np.load(out)
    assert list(got["skipped"]) == [0, 1, 1]            # rank 0's own gradient was finite
    assert float(got["spread"]) == 0.0


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    start = time.monotonic()
    done = mpiexec(2, sys.executable, WORKER, "die", str(tmp_path / "x.npz"), "--steps",
                   "100000", timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "KILLED" in done.stdout + done.stderr or "Killed" in done.stdout + done.stderr


def test_batch_share_refuses_an_uneven_split():
    from fastrnn.distributed import batch_share
    assert [batch_share(32, 4, r) for r in range(4)] == [slice(0, 8), slice(8, 16),
                                                        slice(16, 24), slice(24, 32)]
    with pytest.raises(ValueError, match=r"--batch: 32 streams cannot be split evenly over 3 "
                                         r"ranks; give a multiple of 3 \(30, 33\)"):
        batch_share(32, 3, 0)


def test_without_mpi4py_the_error_names_the_extra(monkeypatch):
    from fastrnn import distributed
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.MPIUnavailable, match=r'pip install mpi4py mpich'):
        distributed.mpi()


def test_fastrnn_and_its_command_do_not_import_mpi4py():
    check = ("import sys, fastrnn, fastrnn.cli, fastrnn.charlm, fastrnn.distributed; "
             "assert 'mpi4py' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=TIMEOUT, **child_python())
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# the command

CLI_OPTIONS = ["--hidden", "8", "--embed", "4", "--layers", "2", "--window", "10", "--batch",
               "4", "--dtype", "float64", "--backend", "reference", "--sample-length", "10",
               "--eval-every", "1000"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(mpi_worker.TEXT * 3)
    return str(path)


def fastrnn_command(*argv):
    return [sys.executable, "-m", "fastrnn", *argv]


def run_one_process(*argv):
    done = subprocess.run(fastrnn_command(*argv), capture_output=True, text=True,
                          timeout=TIMEOUT, **child_python())
    assert done.returncode == 0, done.stderr
    return done


def checkpoint_arrays(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files if k.startswith(("param/", "training/"))
                and npz[k].dtype.kind == "f"}


def assert_same_checkpoints(a, b):
    a, b = checkpoint_arrays(a), checkpoint_arrays(b)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-10, err_msg=k)


def test_mpiexec_fastrnn_train_writes_the_checkpoint_of_one_process(tmp_path, text):
    ranks, one = str(tmp_path / "ranks.npz"), str(tmp_path / "one.npz")
    done = mpiexec(2, *fastrnn_command("train", "--text", text, "--steps", "3", "--out", ranks,
                                       *CLI_OPTIONS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("corpus:") == 1         # rank 0 alone prints
    threads = max(1, os.cpu_count() // 2)           # the cores shared by the 2 ranks
    assert f"ranks:  2 (MPI), 2 streams each, --threads {threads}" in done.stdout
    run_one_process("train", "--text", text, "--steps", "3", "--out", one, *CLI_OPTIONS)
    assert_same_checkpoints(ranks, one)
    # the checkpoint is the whole batch's: one process resumes it as if it had made it
    resumed, longer = str(tmp_path / "resumed.npz"), str(tmp_path / "longer.npz")
    run_one_process("train", "--resume", ranks, "--steps", "2", "--out", resumed,
                    "--backend", "reference", "--sample-length", "0")
    run_one_process("train", "--text", text, "--steps", "5", "--out", longer, *CLI_OPTIONS)
    assert_same_checkpoints(resumed, longer)
    # and the other way: 2 ranks resume one process's checkpoint, each taking its streams' state
    resumed_on_ranks = str(tmp_path / "resumed_on_ranks.npz")
    done = mpiexec(2, *fastrnn_command("train", "--resume", one, "--steps", "2", "--out",
                                       resumed_on_ranks, "--backend", "reference",
                                       "--sample-length", "0"))
    assert done.returncode == 0, done.stderr
    assert_same_checkpoints(resumed_on_ranks, longer)


def test_mpiexec_fastrnn_sample_samples_once(tmp_path, text):
    checkpoint = str(tmp_path / "one.npz")
    run_one_process("train", "--text", text, "--steps", "1", "--out", checkpoint, *CLI_OPTIONS)
    argv = ("sample", checkpoint, "--prime", "def ", "--length", "40", "--seed", "3",
            "--backend", "reference")
    one = run_one_process(*argv)
    done = mpiexec(2, *fastrnn_command(*argv))
    assert done.returncode == 0, done.stderr
    assert one.stdout.strip() and done.stdout == one.stdout      # rank 0's alone


def test_mpiexec_fastrnn_train_refuses_an_uneven_split_on_every_rank(tmp_path, text):
    done = mpiexec(3, *fastrnn_command("train", "--text", text, "--steps", "3", "--out",
                                       str(tmp_path / "x.npz"), *CLI_OPTIONS))
    assert done.returncode == 2
    assert done.stderr.count("--batch: 4 streams cannot be split evenly over 3 ranks") == 1
    assert not os.path.exists(tmp_path / "x.npz")


def _rank_pid(launcher_pid, rank):
    """The pid of the process of ``rank`` among the descendants of ``launcher_pid``."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ and pid != launcher_pid:
            return pid
        pending.extend(children)
    return None


def _start_long_run(tmp_path, text):
    out = tmp_path / "run.npz"
    launcher = subprocess.Popen([MPIEXEC, "-n", "2", *fastrnn_command(
        "train", "--text", text, "--steps", "100000", "--save-every", "2", "--out", str(out),
        *CLI_OPTIONS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **child_python())
    deadline = time.monotonic() + TIMEOUT
    while not out.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    assert out.exists(), "no checkpoint was written"
    return launcher, str(out)


def _ended(launcher, seconds):
    try:
        stdout, stderr = launcher.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.communicate()
        pytest.fail(f"the job did not end within {seconds} s")
    return launcher.returncode, stdout, stderr


def _assert_complete_checkpoint(path):
    from fastrnn import charlm
    model, vocab, config = charlm.load_checkpoint(path, backend="reference")
    training = charlm.load_training_state(path)
    assert training["updates"] == config["steps"] > 0
    assert training["driver"]["state"][0].shape == (2, 4, 8)       # the whole batch's


def test_ctrl_c_ends_every_rank_and_saves(tmp_path, text):
    launcher, out = _start_long_run(tmp_path, text)
    launcher.send_signal(signal.SIGINT)        # as Ctrl-C in the terminal: mpiexec passes it on
    status, stdout, stderr = _ended(launcher, 60)
    assert status == 130, stderr
    assert stderr.count("interrupted after") == 1, stderr
    _assert_complete_checkpoint(out)


def test_a_rank_killed_mid_training_ends_the_job_and_leaves_a_complete_checkpoint(tmp_path,
                                                                                   text):
    launcher, out = _start_long_run(tmp_path, text)
    pid = _rank_pid(launcher.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    status, stdout, stderr = _ended(launcher, 60)
    assert status != 0
    assert "KILLED" in stdout + stderr or "Killed" in stdout + stderr
    _assert_complete_checkpoint(out)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_update_and_saves(tmp_path, text):
    launcher, out = _start_long_run(tmp_path, text)
    pid = _rank_pid(launcher.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)               # e.g. a scheduler's, to that process alone
    status, stdout, stderr = _ended(launcher, 60)
    assert status == 143, stderr
    assert stderr.count("terminated after") == 1, stderr
    _assert_complete_checkpoint(out)


def test_a_stuck_rank_ends_the_job_after_the_timeout(tmp_path, text, monkeypatch):
    monkeypatch.setenv("FASTRNN_MPI_TIMEOUT", "3")
    launcher, out = _start_long_run(tmp_path, text)
    pid = _rank_pid(launcher.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)               # alive but never answers
    try:
        status, stdout, stderr = _ended(launcher, 60)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert status == 1, stderr
    assert "no answer from the other ranks in 3 s" in stderr, (stdout, stderr)
    _assert_complete_checkpoint(out)


def test_an_error_of_rank_0_alone_before_training_ends_every_rank_with_its_status(tmp_path,
                                                                                   text):
    # --out is checked on rank 0 only: the other rank must not go on to wait for it
    done = mpiexec(2, *fastrnn_command("train", "--text", text, "--steps", "3", "--out",
                                       str(tmp_path), *CLI_OPTIONS))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("--out: expected a file name, got the directory") == 1
