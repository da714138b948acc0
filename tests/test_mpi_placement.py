"""Under mpiexec, hvd.init(), d4p.daalinit() and a Communicator give each rank its own share of the cores."""

import json
import os
import shutil

import pytest

from workshop_lib import placement, sysinfo

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

SCRIPT = "tests/mpi_scripts/placement_check.py"
def _clean_env(**extra):
    return {**placement.without_thread_settings(), **extra}


def _ranks(proc):
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda row: row["rank"])


@pytest.fixture(scope="module")
def cpus():
    usable = placement.usable_cpus()
    if len(usable) < 2:
        pytest.skip("needs at least 2 usable CPUs")
    return usable


@pytest.mark.parametrize("entry", ["hvd", "d4p", "comm"])
def test_two_ranks_with_nothing_set_get_disjoint_cores_and_their_share_of_threads(mpirun, cpus, entry):
    rows = _ranks(mpirun(2, [SCRIPT, entry], threads_per_rank=None, env=_clean_env()))
    assert [row["rank"] for row in rows] == [0, 1]
    share = len(cpus) // 2
    halves = [list(cpus[:len(cpus) // 2]), list(cpus[len(cpus) // 2:])]
    for row, half in zip(rows, halves):
        assert row["affinity"] == half and row["binding"] == "workshop"
        assert row["every_thread"] == [half]  # the BLAS's threads, started before, are bound too
        assert row["numba"] == len(half) and row["blas"] == len(half)
    assert not set(rows[0]["affinity"]) & set(rows[1]["affinity"])
    if len(cpus) == 2:
        assert share == 1 and [(row["numba"], row["blas"]) for row in rows] == [(1, 1), (1, 1)]


def test_omp_num_threads_set_by_the_user_is_respected(mpirun, cpus):
    rows = _ranks(mpirun(2, [SCRIPT, "hvd"], threads_per_rank=None, env=_clean_env(OMP_NUM_THREADS="2")))
    assert [(row["numba"], row["blas"]) for row in rows] == [(2, 2), (2, 2)]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_binding_set_by_the_user_is_kept(cpus):
    # MPMD: rank 0 on the last CPU, rank 1 on the first, the reverse of what placement would choose
    exe = sysinfo.mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec")
    import subprocess
    import sys

    first, last = str(cpus[0]), str(cpus[-1])
    cmd = [exe, "-n", "1", "taskset", "-c", last, sys.executable, SCRIPT, "comm", ":",
           "-n", "1", "taskset", "-c", first, sys.executable, SCRIPT, "comm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_clean_env(),
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    rows = _ranks(proc)
    assert [(row["affinity"], row["binding"]) for row in rows] == [([int(last)], "inherited"), ([int(first)], "inherited")]
    assert [(row["numba"], row["blas"]) for row in rows] == [(1, 1), (1, 1)]


def test_workshop_verbose_prints_each_ranks_placement_once(mpirun, cpus):
    proc = mpirun(2, [SCRIPT, "hvd"], threads_per_rank=None, env=_clean_env(WORKSHOP_VERBOSE="1"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("workshop_verbose,placement,")]
    assert sorted(line.split(",")[2].split(" (")[0] for line in lines) == ["rank 0/2", "rank 1/2"]
    assert all("numba threads" in line and "BLAS threads" in line and "cores" in line for line in lines)
