"""workshop_lib.job under mpiexec: a job ends, with the failing rank's message, whenever a rank cannot take part.

Each case was a hang before (the reliability review of 2026-12-08, defects 1-3): now the job ends within seconds,
with a message that names the rank, the phase it was in, and where the others were.
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

SCRIPT = "tests/mpi_scripts/job_faults.py"


def _env(**variables):
    drop = ("WORKSHOP_SIMULATE_NODES", "HOROVOD_HIERARCHICAL_ALLREDUCE") + tuple(
        k for k in os.environ if k.startswith("HOROVOD_STALL"))
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **variables}


def _run(mpirun, mode, env=None):
    t0 = time.monotonic()
    proc = mpirun(2, [SCRIPT, mode], timeout=120, check=False, env=env or _env())
    return proc, time.monotonic() - t0


def test_a_bad_stall_variable_on_one_rank_only_ends_the_job_with_its_message_on_every_rank(mpirun):
    proc, seconds = _run(mpirun, "hvd_env_one_rank")
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "HOROVOD_STALL_CHECK_TIME_SECONDS='abc' must be a number of seconds >= 0 (rank 1)" in proc.stderr
    assert "in or after 'hvd.init()'" in proc.stderr and seconds < 60


def test_simulated_nodes_on_one_rank_only_is_an_error_naming_each_rank_s_value(mpirun):
    proc, seconds = _run(mpirun, "comm_nodes_one_rank")
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "WORKSHOP_SIMULATE_NODES differs across ranks (rank 0: '2', rank 1: unset)" in proc.stderr
    assert "in or after 'Communicator()'" in proc.stderr and seconds < 60


@pytest.mark.parametrize("mode", ["d4p_mixed", "d4p_mixed_kmeans"])
def test_one_rank_calling_d4p_with_distributed_false_ends_the_job_naming_both_phases(mpirun, mode):
    proc, seconds = _run(mpirun, mode)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "'d4p.daalfini'" in proc.stderr and "'d4p compute(distributed=True)'" in proc.stderr
    assert "the ranks run different collectives" in proc.stderr and seconds < 90


def test_a_collective_timeout_ends_the_job_without_hvd_init(mpirun):
    proc, seconds = _run(mpirun, "comm_timeout")
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "CollectiveTimeout" in proc.stderr and "uncaught CollectiveTimeout on rank 0 of 2" in proc.stderr
    assert "'Communicator.allreduce'" in proc.stderr and "rank 1: has entered no collective yet" in proc.stderr
    assert seconds < 40  # the peer sleeps 60 s


@pytest.mark.parametrize("value", ["false", "OFF"])
def test_stall_check_disable_false_keeps_the_inspector_on(mpirun, value):
    proc, seconds = _run(mpirun, "stall", _env(HOROVOD_STALL_CHECK_DISABLE=value,
                                              HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="4"))
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "longer than HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=4: aborting the whole job" in proc.stderr
    assert "Missing ranks: 1: [late_tensor]" in proc.stderr and seconds < 40


def test_an_unparseable_stall_check_disable_is_a_clear_error_on_every_rank(mpirun):
    proc, seconds = _run(mpirun, "stall", _env(HOROVOD_STALL_CHECK_DISABLE="maybe"))
    assert proc.returncode != 0 and "unreachable" not in proc.stdout
    assert "HOROVOD_STALL_CHECK_DISABLE='maybe' must be a boolean" in proc.stderr and "(ranks 0, 1)" in proc.stderr
    assert seconds < 40
