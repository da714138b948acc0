"""workshop_lib.hvd and the Horovod MNIST script under mpiexec -n 1, 2, 3, 4 (oversubscribed on 2 cores)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

CHECK = "tests/mpi_scripts/hvd_check.py"
MNIST = "solutions/scripts/tensorflow_mnist.py"


def test_without_mpiexec_there_is_one_rank_and_everything_works():
    proc = subprocess.run([sys.executable, CHECK, "api"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "rank 0: api ok (size 1)"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_collectives_match_mpi_and_their_gradients_are_horovods(mpirun, n):
    proc = mpirun(n, [CHECK, "api"], timeout=180)
    assert all(f"rank {r}: api ok (size {n})" in proc.stdout for r in range(n)), proc.stdout  # lines may interleave


def test_a_mismatch_across_ranks_raises_on_every_rank(mpirun):
    proc = mpirun(3, [CHECK, "mismatch"], timeout=120)
    eager = [line for line in proc.stdout.splitlines() if " eager: ValueError" in line]
    variables = [line for line in proc.stdout.splitlines() if " variables: ValueError" in line]
    assert len(eager) == 3 and all("sizes differ" in line and "rank 2: 5 x float32" in line for line in eager), eager
    assert len(variables) == 3 and all("only_on_rank_2" in line for line in variables), variables


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, whole batches of 12 (and 24) images: the run that N ranks must reproduce."""
    out = tmp_path_factory.mktemp("hvd")
    runs = {}
    for name, extra in (("b12", []), ("b24", ["--global-batch", "24", "--updates", "3"]), ("b6", ["--global-batch", "6"])):
        path = out / f"{name}.npz"
        subprocess.run([sys.executable, CHECK, "train", "--no-hvd", "--out", str(path), *extra], cwd=ROOT, check=True,
                       timeout=120, capture_output=True)
        runs[name] = dict(np.load(path))
    return runs


def _max_relative_difference(a, b):
    return max(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max() for k in b if k != "step")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_n_ranks_with_batch_b_match_one_process_with_batch_n_times_b(mpirun, tmp_path, reference, n):
    out = tmp_path / "weights.npz"
    mpirun(n, [CHECK, "train", "--out", str(out)], timeout=180)
    got = dict(np.load(out))
    assert int(got["step"]) == 4
    assert _max_relative_difference(got, reference["b12"]) < 1e-10
    # and the comparison can fail: a process that saw only one rank's share of each batch ends elsewhere
    assert _max_relative_difference(reference["b6"], reference["b12"]) > 1e-3


def test_backward_passes_per_step_accumulate_then_apply_every_kth_pass(mpirun, tmp_path, reference):
    out = tmp_path / "weights.npz"
    mpirun(2, [CHECK, "train", "--passes", "2", "--updates", "3", "--out", str(out)], timeout=180)
    got = dict(np.load(out))
    assert int(got["step"]) == 6  # the global step counts passes, as in Horovod
    assert _max_relative_difference(got, reference["b24"]) < 1e-10


def test_a_failing_rank_ends_the_job_quickly_with_its_message(mpirun):
    for n in (2, 3):
        t0 = time.monotonic()
        proc = mpirun(n, [CHECK, "fail"], timeout=60, check=False)
        elapsed = time.monotonic() - t0
        assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
        assert f"[rank {n - 1}] RuntimeError: rank {n - 1} failed on purpose" in proc.stderr, proc.stderr
        assert "aborting the whole job" in proc.stderr and "unreachable" not in proc.stdout


def test_a_rank_that_exits_early_never_leaves_the_others_waiting(mpirun):
    import os

    env = dict(os.environ, WORKSHOP_HVD_EXIT_TIMEOUT="5")
    t0 = time.monotonic()
    proc = mpirun(2, [CHECK, "exit", "--how", "status"], timeout=60, check=False, env=env)
    assert proc.returncode == 3 and time.monotonic() - t0 < 30, proc.stderr
    assert "[rank 1] sys.exit(3) on rank 1 of 2: aborting the whole job" in proc.stderr
    t0 = time.monotonic()
    proc = mpirun(2, [CHECK, "exit", "--how", "plain"], timeout=60, check=False, env=env)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30, proc.stderr
    assert "rank 1 of 2 has ended, but not every rank has ended within 5 s" in proc.stderr
    assert "unreachable" not in proc.stdout
    # a normal early end is not a failure: the last rank waits at its exit until rank 0 is done
    proc = mpirun(2, [CHECK, "exit", "--how", "early"], timeout=60, env=env)
    assert "rank 0: finished after the last rank" in proc.stdout


def test_a_peer_that_has_ended_is_noticed_by_a_rank_waiting_in_a_collective_within_seconds(mpirun):
    import os

    env = dict(os.environ)  # WORKSHOP_HVD_EXIT_TIMEOUT's 300 s and the stall inspector's defaults
    for n in (2, 3):
        t0 = time.monotonic()
        proc = mpirun(n, [CHECK, "exit", "--how", "raise"], timeout=60, check=False, env=env)
        assert proc.returncode != 0 and time.monotonic() - t0 < 30, proc.stderr
        assert f"[rank 0] rank(s) [{n - 1}] of {n} ended while rank 0 waits for them in collective #1 " \
               "'HorovodAllreduce'" in proc.stderr, proc.stderr
        assert "unreachable" not in proc.stdout


@pytest.mark.parametrize("how, tensor", [("eager", "weights"), ("graph", "grads")])
def test_the_stall_inspector_warns_naming_the_missing_rank_and_the_tensor_then_aborts(mpirun, how, tensor):
    import os

    env = dict(os.environ, HOROVOD_STALL_CHECK_TIME_SECONDS="1", HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="4")
    t0 = time.monotonic()
    proc = mpirun(3, [CHECK, "stall", "--how", how], timeout=60, check=False, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed, proc.stderr)
    for r in (0, 1):  # every waiting rank warns (every second), then one aborts the job
        warnings = [line for line in proc.stderr.splitlines() if line.startswith(f"[rank {r}] Missing ranks: 2: ")]
        assert warnings and all(f"[{tensor}]" in line for line in warnings), proc.stderr
    assert "waiting for the remainder of ranks for more than 1 seconds" in proc.stderr
    assert "longer than HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=4: aborting the whole job" in proc.stderr
    assert "unreachable" not in proc.stdout


def test_stall_variables_are_validated():
    import os

    env = dict(os.environ, HOROVOD_STALL_CHECK_TIME_SECONDS="soon")
    proc = subprocess.run([sys.executable, CHECK, "api"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode != 0 and "HOROVOD_STALL_CHECK_TIME_SECONDS='soon' must be a number of seconds" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: expected a positive integer, got -3"),
    (["--steps", "-1"], "argument --steps: expected a positive integer, got -1"),
    (["--lr", "nan"], "argument --lr: expected a positive number, got nan"),
    (["--results", "/proc/r.json"], "--results='/proc/r.json': cannot write in the folder /proc"),  # after training
    (["--results", "r.txt"], "--results='r.txt': the extension '.txt' is not one this output can have"),
])
def test_the_horovod_mnist_script_refuses_bad_arguments_on_every_rank_before_training(mpirun, tmp_path, argv, message):
    t0 = time.monotonic()
    proc = mpirun(2, [MNIST, *argv, "--checkpoint-dir", str(tmp_path / "ckpt")], timeout=60, check=False)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30, (proc.returncode, proc.stderr)
    assert proc.stderr.count(message) == 2, proc.stderr  # each rank says it, before hvd.init()
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt").exists()


def test_a_batch_larger_than_the_training_set_ends_the_job_with_its_message(mpirun, tmp_path):
    t0 = time.monotonic()
    proc = mpirun(2, [MNIST, "--batch-size", "9000", "--checkpoint-dir", str(tmp_path / "ckpt")], timeout=120,
                  check=False)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60, (proc.returncode, proc.stderr)
    assert "--batch-size 9000: expected at most the 8000 training images" in proc.stderr, proc.stderr


def test_the_horovod_mnist_script_trains_checkpoints_on_rank_0_and_resumes(mpirun, tmp_path):
    ckpt, results = tmp_path / "checkpoints", tmp_path / "results.json"
    args = [MNIST, "--steps", "20", "--batch-size", "20", "--log-every", "5", "--checkpoint-dir", str(ckpt),
            "--results", str(results)]
    proc = mpirun(2, args, timeout=240)
    summary = json.loads(results.read_text())
    assert summary["ranks"] == 2 and summary["steps_per_rank"] == 10  # StopAtStepHook(last_step=20 // hvd.size())
    assert summary["learning_rate"] == pytest.approx(0.002) and 0.3 < summary["test_accuracy"] <= 1.0
    log = proc.stdout + proc.stderr
    assert log.count("Saving checkpoints for 10 ") == 1  # rank 0 only
    assert log.count("loss = ") == 2 * 2  # LoggingTensorHook on both ranks, steps 0 and 5
    # only complete files, written by one writer: the index, and the npz of steps 0 and 10
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint", "model.ckpt-0.npz", "model.ckpt-10.npz"]
    with np.load(ckpt / "model.ckpt-10.npz") as z:
        assert int(z["global_step"]) == 10
    # a restart resumes from rank 0's checkpoint: the broadcast gives rank 1 the restored weights
    proc = mpirun(2, [*args[:2], "40", *args[3:]], timeout=240)
    log = proc.stdout + proc.stderr
    assert "Restoring parameters from" in log and "resuming at global step 10" in log
    assert json.loads(results.read_text())["steps_per_rank"] == 10  # from 10 to 40 // 2 = 20
    assert "model.ckpt-20.npz" in {p.name for p in ckpt.iterdir()}
