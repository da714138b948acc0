"""The setup lab's MPI script, launched exactly as its docstring says, on 1 to 4 ranks."""

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(180)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mpi_hello_runs_on_n_ranks(mpirun, root, n):
    proc = mpirun(n, ["scripts/mpi_hello.py"], cwd=root / "solutions")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == n
    assert all(f"allreduce sum = {n * (n + 1) // 2}" in line for line in lines)
    assert sorted(int(line.split()[1]) for line in lines) == list(range(n))
