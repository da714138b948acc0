"""hvd.elastic, the elastic driver (`workshop launch --min-np`) and the sharded optimizer (ZeRO-1).

The MPI tests kill ranks on purpose (SIGKILL through the pids the ranks leave in the elastic folder) and check that
the job finishes on the slots left with the exact global step; the sharded optimizer is compared with plain data
parallelism (same seeds) and its checkpoints are moved between sharded and unsharded runs of other rank counts.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

DOCS = "tests/mpi_scripts/horovod_elastic_tf.py"
SHARDED = "tests/mpi_scripts/sharded_check.py"


# ----------------------------------------------------------------------------------------------
# one process: the state objects and the decorator's retry


@pytest.fixture
def no_driver(monkeypatch):
    from workshop_lib import elastic

    for name in (elastic.ELASTIC_DIR, elastic.ELASTIC_RESTART, elastic.ELASTIC_CAUSE):
        monkeypatch.delenv(name, raising=False)


def test_object_state_commit_restore_and_the_retry_after_an_internal_error(no_driver):
    import workshop_lib.hvd as hvd

    state = hvd.elastic.ObjectState(epoch=0, batch=0, seen=[])
    resets, calls = [], []
    state.register_reset_callbacks([lambda: resets.append(state.batch)])

    @hvd.elastic.run
    def train(state):
        calls.append((state.epoch, state.batch))
        for state.batch in range(state.batch, 6):
            state.seen.append(state.batch)
            if state.batch == 2:
                state.commit()
            if state.batch == 4 and len(calls) == 1:
                raise hvd.elastic.HorovodInternalError("a peer is gone")
        return "done"

    assert train(state) == "done"
    # rolled back to the commit at batch 2: batches 3 and 4 (the uncommitted tail) were lost and done again
    assert calls == [(0, 0), (0, 2)] and resets == [2]
    # Horovod's loop: the commit at batch 2 records batch=2, so batch 2 is done once more after the rollback
    assert state.seen == [0, 1, 2, 2, 3, 4, 5]
    with pytest.raises(TypeError, match="attribute when=.*JSON value"):
        hvd.elastic.ObjectState(when=object())
    with pytest.raises(TypeError, match="first argument must be an hvd.elastic state"):
        train(42)


def test_hosts_updated_interrupt_without_the_driver_resyncs_and_goes_on(no_driver):
    import workshop_lib.hvd as hvd

    state = hvd.elastic.ObjectState(batch=0)
    raised = []

    @hvd.elastic.run
    def train(state):
        for state.batch in range(state.batch, 4):
            if state.batch == 1 and not raised:
                raised.append(1)
                raise hvd.elastic.HostsUpdatedInterrupt(skip_sync=True)
        return state.batch

    assert train(state) == 3 and raised == [1]


def test_tensorflow_state_restores_variables_and_attributes(no_driver, fresh_graph, tmp_path, monkeypatch):
    import workshop_lib.hvd as hvd
    import workshop_lib.tf as tf
    from workshop_lib import elastic

    w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="w")
    step = tf.train.get_or_create_global_step()
    bump = tf.group(w.assign_add(np.ones((2, 3), np.float32)), step.assign_add(np.int64(1)))
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        state = hvd.elastic.TensorFlowState(session=session, epoch=3)
        session.run(bump)
        state.epoch = 4
        state.commit()
        committed = session.run(w).copy()
        session.run(bump)
        state.epoch = 5
        state.restore()
        np.testing.assert_array_equal(session.run(w), committed)
        assert state.epoch == 4 and int(session.run(step)) == 1
        # durable: under the driver rank 0 writes the commit through the Saver; a new process resumes from it
        monkeypatch.setenv(elastic.ELASTIC_DIR, str(tmp_path))
        state.commit()
    assert (tmp_path / "checkpoint").exists() and list(tmp_path.glob("commit-*.npz"))
    tf.reset_default_graph()
    w = tf.Variable(np.zeros((2, 3), np.float32), name="w")
    step = tf.train.get_or_create_global_step()
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        state = hvd.elastic.TensorFlowState(session=session, epoch=0)
        seen = hvd.elastic.run(lambda s: (s.epoch, session.run(w).copy(), int(session.run(step))))(state)
    assert seen[0] == 4 and seen[2] == 1
    np.testing.assert_array_equal(seen[1], committed)
    events = _events(tmp_path)
    assert events[-1]["event"] == "resumed" and events[-1]["step"] == 1


def test_discovery_output_and_driver_arguments_are_checked(tmp_path):
    from workshop_lib import launch

    assert launch.parse_discovery("node1:4\nnode2\n# gone\n") == [("node1", 4), ("node2", 1)]
    with pytest.raises(ValueError, match="not `host:slots`"):
        launch.parse_discovery("node1 slots=4")
    with pytest.raises(ValueError, match="min_np <= n <= max_np.*min_np=3, n=2"):
        launch.ElasticDriver(DOCS, 2, 3)
    with pytest.raises(ValueError, match="reset_limit=-1"):
        launch.ElasticDriver(DOCS, 2, 1, reset_limit=-1)
    with pytest.raises(ValueError, match="not an executable"):
        launch.ElasticDriver(DOCS, 2, 1, host_discovery_script=tmp_path / "none.sh")


def test_relaunch_lines_for_srun_and_the_causes_read_from_the_launchers_words(tmp_path):
    from workshop_lib import launch

    driver = launch.ElasticDriver(DOCS, 4, 2, scheduler="slurm", cpus_per_node=8, elastic_dir=tmp_path)
    line = driver.command(3)  # a relaunch on 3 slots inside the Slurm allocation
    assert line[0] == "srun" and line[-1] == DOCS
    assert {"--mpi=pmi2", "--kill-on-bad-exit=1", "--nodes=1", "--ntasks=3", "--ntasks-per-node=3"} <= set(line)
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "rank-2").write_text("4242\n")
    mpich = ["=" * 20 + "\n", "=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n", "=   PID 4242 RUNNING AT n01\n",
             "=   EXIT CODE: 9\n"]
    assert driver.cause(mpich, 9) == "rank 2 (pid 4242 on n01 ended by signal 9)"
    assert driver.cause(mpich, 9, first_dead=(1, 77)) == "rank 1 (pid 77) ended first, by signal 9"
    ours = ["[elastic] restart 1: resumed ... (after: a rank stalled past HOROVOD_STALL_SHUTDOWN_TIME_SECONDS)\n"]
    assert driver.cause(ours + mpich, 9) == "rank 2 (pid 4242 on n01 ended by signal 9)"  # our log is not a cause
    assert driver.cause(["[rank 1] uncaught ValueError on rank 1 of 4: aborting\n"], 1) == "rank 1 raised ValueError"
    assert driver.cause(["nothing known\n"], 3) == "the job ended with status 3"


# ----------------------------------------------------------------------------------------------
# under the driver, with ranks killed


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _events(folder):
    from workshop_lib.elastic import read_events

    return read_events(folder)


def _drive(folder, n, min_np, script_args, kills=(), extra=(), timeout=150, on_event=None):
    """Run the docs program under `workshop launch --min-np`; SIGKILL ``rank`` once commit ``c`` is logged, for each
    (c, rank) of ``kills`` (commit numbers counted over the whole run). Returns (process, events)."""
    cmd = [sys.executable, "-m", "workshop_lib.cli", "launch", DOCS, "-n", str(n), "--min-np", str(min_np),
           "--elastic-dir", str(folder), *extra, "--", *script_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pending, deadline = list(kills), time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not finish in {timeout} s")
            events = _events(folder)
            if on_event is not None:
                on_event(events)
            commits = sum(e["event"] == "commit" for e in events)
            if pending and commits >= pending[0][0]:
                pid_file = folder / "pids" / f"rank-{pending[0][1]}"
                if pid_file.exists():
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    pending.pop(0)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), _events(folder)


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_a_killed_rank_is_survived_on_fewer_ranks_with_the_exact_global_step(tmp_path):
    out = tmp_path / "result.json"
    proc, events = _drive(tmp_path / "elastic", 3, 2, ["--batches-per-epoch", "60", "--out", str(out)],
                          kills=[(5, 1)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = [e for e in events if e["event"] == "launch"]
    assert [e["size"] for e in launches] == [3, 2]
    ended = next(e for e in events if e["event"] == "ended")
    assert ended["status"] != 0 and ended["cause"].startswith("rank 1 ") and "signal 9" in ended["cause"], ended
    resumed = next(e for e in events if e["event"] == "resumed")
    last_commit = [e for e in events if e["event"] == "commit" and e["t"] < ended["t"]][-1]
    assert (resumed["commit"], resumed["step"], resumed["size"]) == (last_commit["commit"], last_commit["step"], 2)
    assert f"resumed from commit {resumed['commit']} at global step {resumed['step']} on 2 rank(s)" in proc.stderr
    result = json.loads(out.read_text())
    # the documented loop: 2 epochs x 60 batches, and batch b of the resumed commit once more (see the program)
    assert result["global_step"] == 2 * 60 + 1
    assert result["size"] == 2 and result["lr"] == pytest.approx(0.02)  # the reset callback rescaled it


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_fewer_slots_than_min_np_end_with_a_clear_error(tmp_path):
    proc, events = _drive(tmp_path / "elastic", 2, 2, ["--batches-per-epoch", "400"], kills=[(3, 1)])
    assert proc.returncode == 2
    assert "only 1 slot(s) remain, fewer than --min-np 2" in proc.stderr and "rank 1" in proc.stderr
    assert events[-1]["event"] == "stopped"


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_discovery_brings_the_job_back_up_to_max_np(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:2\n")
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o755)
    out = tmp_path / "result.json"

    def more_slots(events):
        if sum(e["event"] == "commit" for e in events) >= 1:  # early: an idle machine runs the epochs in seconds
            hosts.write_text("localhost:3\n")

    proc, events = _drive(tmp_path / "elastic", 2, 2, ["--batches-per-epoch", "200", "--out", str(out)],
                          extra=["--max-np", "3", "--host-discovery-script", str(script)], on_event=more_slots)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["size"] for e in events if e["event"] == "launch"] == [2, 3]
    interrupted = next(e for e in events if e["event"] == "interrupted")
    resumed = next(e for e in events if e["event"] == "resumed")
    assert (resumed["commit"], resumed["step"]) == (interrupted["commit"], interrupted["step"])
    assert json.loads(out.read_text())["global_step"] == 2 * 200 + 1


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_a_rank_raising_and_a_rank_hanging_are_survived_with_exact_counts(tmp_path):
    out, folder = tmp_path / "result.json", tmp_path / "elastic"
    env = dict(_env(), HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="3", HOROVOD_STALL_CHECK_TIME_SECONDS="1")
    proc = subprocess.run([sys.executable, "-m", "workshop_lib.cli", "launch", "tests/mpi_scripts/elastic_faults.py",
                           "-n", "3", "--min-np", "1", "--elastic-dir", str(folder), "--", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(folder)
    assert [e["cause"] for e in events if e["event"] == "ended"] == [
        "rank 1 raised RuntimeError", "a rank stalled past HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]
    assert [(e["commit"], e["size"]) for e in events if e["event"] == "resumed"] == [(2, 2), (4, 1)]
    # 10 steps on 3 ranks, 10 on 2, 20 on 1: each rank adds 1 a step; the uncommitted tails are not counted twice
    assert json.loads(out.read_text()) == {"step": 40, "total": 10 * 3 + 10 * 2 + 20 * 1, "size": 1}


# ----------------------------------------------------------------------------------------------
# ZeRO-1


def _sharded_run(mpirun, n, folder, out, sharded, steps=8, elastic_dir=None, dump=None):
    env = dict(os.environ)
    env.pop("WORKSHOP_ELASTIC_DIR", None)
    if elastic_dir is not None:
        env["WORKSHOP_ELASTIC_DIR"] = str(elastic_dir)
    args = [SHARDED, "--steps", str(steps), "--out", str(folder / out)] + (["--sharded"] if sharded else [])
    if dump:
        args += ["--dump", str(folder / dump)]
    mpirun(n, args, timeout=120, env=env)
    return json.loads((folder / out).read_text())


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_adam_gives_the_losses_of_plain_data_parallelism(mpirun, tmp_path, n):
    from workshop_lib.comm.ring import chunk_bounds

    plain = _sharded_run(mpirun, n, tmp_path, "plain.json", False, dump="plain.npz")
    zero = _sharded_run(mpirun, n, tmp_path, "zero.json", True, dump="zero.npz")
    np.testing.assert_allclose(zero["losses"], plain["losses"], rtol=1e-5)
    a, b = dict(np.load(tmp_path / "plain.npz")), dict(np.load(tmp_path / "zero.npz"))
    assert sorted(a) == sorted(b)  # the gathered state has unsharded Adam's names
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # rank 0's bytes: its ring chunk of m and v, and the two float32 powers; the plain run's: m and v in full
    params = 20 * 64 + 64 + 64 * 33 + 33
    bounds = chunk_bounds(params, n)
    assert plain["state_bytes"] == 2 * 4 * params
    assert zero["state_bytes"] == 2 * 4 * (bounds[2] - bounds[1]) + 8


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_sharded_checkpoints_restore_unsharded_and_on_other_rank_counts(mpirun, tmp_path):
    ref = _sharded_run(mpirun, 2, tmp_path, "ref.json", False, steps=8)
    folder = tmp_path / "commits"
    _sharded_run(mpirun, 2, tmp_path, "first.json", True, steps=4, elastic_dir=folder, dump="first.npz")
    saved = dict(np.load(tmp_path / "first.npz"))
    for n, sharded in ((3, False), (4, True)):  # resumed at step 4: nothing to train, the state dumped
        _sharded_run(mpirun, n, tmp_path, f"r{n}.json", sharded, steps=4, elastic_dir=folder, dump=f"r{n}.npz")
        got = dict(np.load(tmp_path / f"r{n}.npz"))
        assert sorted(got) == sorted(saved)
        for key in saved:
            np.testing.assert_array_equal(got[key], saved[key], err_msg=f"{key} after restoring on {n} rank(s)")
    # the sharded commit at step 4, resumed unsharded on 2 ranks: the uninterrupted run's last 4 losses
    rest = _sharded_run(mpirun, 2, tmp_path, "rest.json", False, steps=8, elastic_dir=folder)
    np.testing.assert_allclose(rest["losses"], ref["losses"][4:], rtol=1e-6)
    assert rest["global_step"] == 8
