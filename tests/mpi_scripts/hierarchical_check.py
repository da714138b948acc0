"""SPMD worker for tests/test_mpi_comm.py: the hierarchical allreduce against MPI's own Allreduce.

Launch:  WORKSHOP_SIMULATE_NODES=2 mpiexec -n 4 python tests/mpi_scripts/hierarchical_check.py {correctness|uneven}
"""

import sys

import numpy as np
from mpi4py import MPI

from workshop_lib.comm import Communicator

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
comm = Communicator(small_bytes=4096)
mode = sys.argv[1]
MPI_OPS = {"sum": MPI.SUM, "average": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}


def report(line):
    lines = world.gather(line, root=0)
    if rank == 0:
        print("\n".join(lines), flush=True)


def check(x, op, algorithm):
    """None if allreduce(x) equals MPI's: integers exactly, floats within the rounding of a float64 reference."""
    got = comm.allreduce(x, op=op, algorithm=algorithm)
    if got.dtype != x.dtype or got.shape != x.shape:
        return f"{x.dtype}/{op}: got {got.dtype} {got.shape}"
    if np.issubdtype(x.dtype, np.integer) or op in ("min", "max"):
        expected = np.empty_like(x)
        world.Allreduce(x, expected, op=MPI_OPS[op])
        if op == "average":
            expected //= size
        ok = np.array_equal(got, expected)
    else:
        wide = x.astype(np.float64)
        exact, magnitude = np.empty_like(wide), np.empty_like(wide)
        world.Allreduce(wide, exact, op=MPI.SUM)
        world.Allreduce(np.abs(wide), magnitude, op=MPI.SUM)
        if op == "average":
            exact, magnitude = exact / size, magnitude / size
        # p - 1 roundings of partial sums, one of the result (and one of the average's division)
        bound = (size + 2) * np.finfo(x.dtype).eps * magnitude + np.finfo(x.dtype).tiny
        ok = bool(np.all(np.abs(got.astype(np.float64) - exact) <= bound))
    same = world.allgather(got.tobytes())  # every rank holds the same bits
    return None if ok and len(set(same)) == 1 else f"{x.size} x {x.dtype}, {op}: differs from MPI (or across ranks)"


if mode == "correctness":
    groups = comm.nodes
    assert (groups.simulated, groups.nodes, groups.local_size) == (True, 2, size // 2), vars(groups)
    assert not comm.shared_memory, "shared memory must not be used across simulated nodes"
    rng = np.random.default_rng(100 + rank)
    failures, checked = [], 0
    for n in (0, 1, 3, size - 1, 7, 1001, 5003, 100_003):
        for dtype in (np.float16, np.float32, np.float64, np.int32, np.int64):
            for op in ("sum", "average", "min", "max"):
                if np.issubdtype(dtype, np.integer):
                    x = rng.integers(-1000, 1000, n).astype(dtype)
                else:
                    x = (rng.standard_normal(n) * 10).astype(dtype)
                for algorithm in ("hierarchical", "auto"):
                    problem = check(x, op, algorithm)
                    checked += 1
                    if problem:
                        failures.append(f"{algorithm}: {problem}")
                    if algorithm == "auto" and x.nbytes >= 4096:
                        assert comm.last_algorithm == "hierarchical", (x.nbytes, comm.last_algorithm)
    y = rng.standard_normal((3, 5, 7)).astype(np.float32)  # any shape: reduced as its flat buffer
    problem = check(y, "sum", "hierarchical")
    report(f"rank {rank}: " + ("; ".join(failures[:5]) if failures or problem else
                               f"{checked + 1} hierarchical cases match MPI"))
elif mode == "forced":  # HOROVOD_HIERARCHICAL_ALLREDUCE=1 on one node: even small messages take it
    rng = np.random.default_rng(7 + rank)
    x = rng.integers(-50, 50, 37).astype(np.int64)
    problem = check(x, "sum", "auto")
    report(f"rank {rank}: {comm.last_algorithm} " + (problem or "ok"))
elif mode == "uneven":  # 3 ranks on 2 simulated nodes: auto falls back to the ring, asking for it is an error
    x = np.arange(10_000, dtype=np.float64)
    problem = check(x, "sum", "auto")
    used = comm.last_algorithm
    try:
        comm.allreduce(x, algorithm="hierarchical")
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    report(f"rank {rank}: auto took {used} ({problem or 'ok'}); hierarchical: {error}")
