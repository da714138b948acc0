"""workshop_lib.comm under mpiexec -n 1, 2, 3, 4 (oversubscribed on 2 cores) against MPI's own collectives."""

import time

import numpy as np

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(400)]

SCRIPT = "tests/mpi_scripts/comm_check.py"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_allreduce_matches_mpi_on_every_size_dtype_op_and_algorithm(mpirun, n):
    proc = mpirun(n, [SCRIPT, "correctness"], timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank")]
    assert lines == ["rank 0: 560 allreduce cases checked"], proc.stdout


@pytest.mark.parametrize("n", [2, 4])
def test_the_default_communicator_matches_mpi_where_its_algorithms_and_blocks_change(mpirun, n):
    """Shared memory in 1 MB blocks below 4 MB, the ring above; with more ranks than cores (4 on this machine's 2)
    shared memory at every size, in 8 MB blocks (if /dev/shm has room). Out of place, into an array, in place."""
    import os

    from workshop_lib.comm import SHM_BLOCK_BYTES, SHM_MAX_BYTES, SHM_OVERSUBSCRIBED_BLOCK_BYTES

    proc = mpirun(n, [SCRIPT, "defaults"], timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank")]
    assert len(lines) == 1 and lines[0].startswith("rank 0: defaults match MPI ("), proc.stdout
    oversubscribed = n > len(os.sched_getaffinity(0))
    shm = os.statvfs("/dev/shm")
    room = shm.f_bavail * shm.f_frsize // (8 * n)
    block = max(SHM_BLOCK_BYTES, min(SHM_OVERSUBSCRIBED_BLOCK_BYTES, room)) if oversubscribed else SHM_BLOCK_BYTES
    algorithms = "recursive_doubling, shared_memory" + ("" if oversubscribed else ", ring")
    assert SHM_MAX_BYTES < (9 << 20)  # the script's sizes reach past it
    assert lines[0].endswith(f"({', '.join(sorted(algorithms.split(', ')))}; blocks of {block} B; oversubscribed "
                             f"{oversubscribed})"), lines


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_mismatch_across_ranks_raises_on_every_rank(mpirun, n):
    proc = mpirun(n, [SCRIPT, "mismatch"], timeout=120)
    for label, words in (("size", "sizes differ"), ("dtype", "dtypes differ"), ("op", "ops differ"),
                         ("algorithm", "algorithms differ"), ("path", "sizes differ"), ("shape", "shapes differ"),
                         ("shape_ring", "shapes differ"), ("out", "rank 1: out has shape (11,)"),
                         ("collective", "collectives differ"), ("cached", "shapes differ")):
        lines = [line for line in proc.stdout.splitlines() if f" {label}: " in line]
        assert len(lines) == n, proc.stdout
        assert all("ValueError" in line and words in line and "rank 1:" in line for line in lines), lines
    shapes = [line for line in proc.stdout.splitlines() if " shape: " in line]
    assert all("rank 0: 1000 x float64 of shape (10, 100)" in line and "rank 1: 1000 x float64 of shape (100, 10)"
               in line for line in shapes), shapes


def test_a_collective_that_a_peer_never_joins_times_out(mpirun):
    t0 = time.monotonic()
    proc = mpirun(2, [SCRIPT, "timeout"], timeout=60, check=False)
    assert "rank 0: CollectiveTimeout" in proc.stdout and "did not complete in time" in proc.stdout
    assert proc.returncode != 0 and time.monotonic() - t0 < 30


def test_the_timeout_covers_the_cross_rank_check_of_the_default_call(mpirun):
    t0 = time.monotonic()
    proc = mpirun(2, [SCRIPT, "timeout_checked"], timeout=60, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank 0: n=")]
    assert len(lines) == 2 and all("CollectiveTimeout" in line and "cross-rank check" in line for line in lines), \
        proc.stdout
    assert proc.returncode != 0 and time.monotonic() - t0 < 30


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7])
def test_the_simulated_ring_sums_everything_and_each_rank_sends_2_p_minus_1_over_p(p):
    from workshop_lib.comm import ring_schedule, simulate_ring

    rng = np.random.default_rng(p)
    for n in (0, 1, p - 1, 5 * p + 3):
        values = [rng.standard_normal(n) for _ in range(p)]
        states, counts = simulate_ring(values)
        assert len(states) == len(counts) == 2 * (p - 1) + 1
        for buffer in states[-1]:
            np.testing.assert_allclose(buffer, np.sum(values, axis=0), rtol=1e-12, atol=1e-12)
        assert (counts[-1] == p).all()
    schedule = ring_schedule(p)
    for _, _, transfers in schedule:  # every step: each rank sends one chunk and receives one, round the ring
        assert sorted(src for src, _, _ in transfers) == list(range(p))
        assert all(dst == (src + 1) % p for src, dst, _ in transfers)
    sent_by_0 = sum(1 for _, _, transfers in schedule for src, _, _ in transfers if src == 0)
    assert sent_by_0 == 2 * (p - 1)  # chunks of 1/p of the buffer: 2(p-1)/p in all
    with pytest.raises(ValueError, match="equal sizes"):
        simulate_ring([np.zeros(3), np.zeros(4)])


HIERARCHICAL = "tests/mpi_scripts/hierarchical_check.py"


def _env(**variables):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WORKSHOP_SIMULATE_NODES", "HOROVOD_HIERARCHICAL_ALLREDUCE")}
    return {**env, **variables}


def test_hierarchical_allreduce_on_2_simulated_nodes_x_2_ranks_matches_mpi(mpirun):
    proc = mpirun(4, [HIERARCHICAL, "correctness"], timeout=300, env=_env(WORKSHOP_SIMULATE_NODES="2"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank")]
    assert lines == [f"rank {r}: 321 hierarchical cases match MPI" for r in range(4)], proc.stdout


def test_horovod_hierarchical_allreduce_1_forces_it_on_one_node(mpirun):
    proc = mpirun(2, [HIERARCHICAL, "forced"], timeout=120, env=_env(HOROVOD_HIERARCHICAL_ALLREDUCE="1"))
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("rank")] == \
        ["rank 0: hierarchical ok", "rank 1: hierarchical ok"], proc.stdout


def test_uneven_simulated_nodes_fall_back_to_the_ring_and_refuse_hierarchical_on_every_rank(mpirun):
    proc = mpirun(3, [HIERARCHICAL, "uneven"], timeout=120, env=_env(WORKSHOP_SIMULATE_NODES="2"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rank")]
    assert len(lines) == 3 and all("auto took ring (ok)" in ln and "[2, 2, 1] ranks" in ln for ln in lines), lines


def test_a_bad_simulate_nodes_value_is_an_error_naming_it(mpirun):
    proc = mpirun(2, [HIERARCHICAL, "forced"], timeout=60, check=False, env=_env(WORKSHOP_SIMULATE_NODES="3"))
    assert proc.returncode != 0 and "WORKSHOP_SIMULATE_NODES='3' must be a number of nodes from 1 to the 2 ranks" \
        in proc.stderr
