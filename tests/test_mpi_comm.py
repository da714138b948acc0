"""workshop_lib.comm under mpiexec -n 1, 2, 3, 4 (oversubscribed on 2 cores) against MPI's own collectives."""

import time

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(400)]

SCRIPT = "tests/mpi_scripts/comm_check.py"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_allreduce_matches_mpi_on_every_size_dtype_op_and_algorithm(mpirun, n):
    proc = mpirun(n, [SCRIPT, "correctness"], timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank")]
    assert lines == ["rank 0: 420 allreduce cases checked"], proc.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_a_mismatch_across_ranks_raises_on_every_rank(mpirun, n):
    proc = mpirun(n, [SCRIPT, "mismatch"], timeout=120)
    for label, words in (("size", "sizes differ"), ("dtype", "dtypes differ"), ("op", "ops differ")):
        lines = [line for line in proc.stdout.splitlines() if f" {label}: " in line]
        assert len(lines) == n, proc.stdout
        assert all("ValueError" in line and words in line and "rank 1:" in line for line in lines), lines


def test_a_collective_that_a_peer_never_joins_times_out(mpirun):
    t0 = time.monotonic()
    proc = mpirun(2, [SCRIPT, "timeout"], timeout=60, check=False)
    assert "rank 0: CollectiveTimeout" in proc.stdout and "did not complete in time" in proc.stdout
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
