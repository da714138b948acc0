"""SPMD worker for tests/test_mpi_comm.py: workshop_lib.comm against MPI's own collectives.

Launch:  mpiexec -n 3 python tests/mpi_scripts/comm_check.py {correctness|mismatch|defaults|timeout|timeout_checked}
"""

import sys
import time

import numpy as np
from mpi4py import MPI

from workshop_lib.comm import CollectiveTimeout, Communicator

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
# small thresholds, so that "auto" takes every path (recursive doubling, shared memory in several blocks, ring)
comm = Communicator(small_bytes=4096, segment_bytes=8192, shm_block_bytes=4096, shm_min_bytes=1024,
                    shm_max_bytes=100_000)
mode = sys.argv[1]


def reference(x, op):
    mpi_op = {"sum": MPI.SUM, "average": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
    out = np.empty_like(x)
    world.Allreduce(x, out, op=mpi_op)
    if op == "average":
        out = out // size if np.issubdtype(x.dtype, np.integer) else out / size
    return out


def report(lines):
    gathered = world.gather("\n".join(lines), root=0)
    if rank == 0:
        print("\n".join(g for g in gathered if g), flush=True)


if mode == "correctness":
    failures, checked = [], 0
    rng = np.random.default_rng(1000 + rank)
    for n in (0, 1, size - 1, 7, 1001, 5003, 100_003):
        for dtype in (np.float16, np.float32, np.float64, np.int32, np.int64):
            for op in ("sum", "average", "min", "max"):
                for algorithm in ("auto", "ring", "recursive_doubling", "shared_memory"):
                    if np.issubdtype(dtype, np.integer):
                        x = rng.integers(-1000, 1000, n).astype(dtype)
                    else:
                        x = (rng.standard_normal(n) * 10).astype(dtype)
                    in_place = x.copy()
                    got = comm.allreduce(x, op=op, algorithm=algorithm)
                    comm.allreduce(in_place, op=op, out=in_place, algorithm=algorithm)  # repeated: a cached plan
                    separate = np.full_like(x, 7)
                    comm.allreduce(x, op=op, out=separate, algorithm=algorithm)
                    ref = reference(x, op)
                    same_everywhere = all(np.array_equal(g, got) for g in world.allgather(got))
                    if np.issubdtype(dtype, np.integer) or op in ("min", "max"):
                        ok = np.array_equal(got, ref)
                    else:
                        tol = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
                        ok = np.allclose(got, ref, rtol=tol, atol=tol * 10)
                    ok = ok and np.array_equal(in_place, got) and np.array_equal(separate, got) and same_everywhere
                    checked += 1
                    if not ok:
                        failures.append(f"rank {rank}: n={n} {np.dtype(dtype).name} {op} {algorithm}")
    # tensor fusion equals one allreduce per array; fp16 compression stays close
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (3, 1000, 17, 5000)] + [np.arange(5, dtype=np.int64)]
    fused = comm.fused_allreduce(arrays, threshold_bytes=8000)
    single = [comm.allreduce(a) for a in arrays]
    # equal up to rounding: the fused buffer is larger, so it may take another algorithm (another summation order)
    if not all(np.allclose(f, s, rtol=1e-6, atol=1e-6) if f.dtype.kind == "f" else np.array_equal(f, s)
               for f, s in zip(fused, single)):
        failures.append(f"rank {rank}: fused_allreduce differs from per-array allreduce")
    compressed = comm.fused_allreduce(arrays[:4], compression="fp16")
    if not all(np.allclose(c, s, rtol=1e-2, atol=1e-2) for c, s in zip(compressed, single[:4])):
        failures.append(f"rank {rank}: fp16-compressed allreduce is not close")
    # parameter server, broadcast, allgatherv
    x = rng.standard_normal(999)
    if not np.allclose(comm.parameter_server_allreduce(x), reference(x, "average"), rtol=1e-12):
        failures.append(f"rank {rank}: parameter server differs")
    b = np.full(4, float(rank))
    if not np.array_equal(comm.broadcast(b, root=size - 1), np.full(4, float(size - 1))):
        failures.append(f"rank {rank}: broadcast")
    parts = comm.allgather(np.full((rank + 1, 2), rank, dtype=np.int32))
    expected = np.concatenate([np.full((r + 1, 2), r, dtype=np.int32) for r in range(size)])
    if not np.array_equal(parts, expected):
        failures.append(f"rank {rank}: allgatherv")
    report(failures + ([f"rank {rank}: {checked} allreduce cases checked"] if rank == 0 else []))

elif mode == "mismatch":
    outcomes = []
    for label, x, op, algorithm in (
            ("size", np.zeros(10 + rank), "sum", "auto"),
            ("dtype", np.zeros(10, dtype=np.float32 if rank == 0 else np.float64), "sum", "auto"),
            ("op", np.zeros(10), "sum" if rank else "max", "auto"),
            ("algorithm", np.zeros(10), "sum", "ring" if rank == 0 else "shared_memory"),
            ("path", np.zeros(10 if rank == 0 else 5000), "sum", "auto"),  # recursive doubling vs shared memory
            ("shape", np.zeros((10, 100) if rank == 0 else (100, 10)), "sum", "auto"),
            ("shape_ring", np.zeros((100, 1000) if rank == 0 else (1000, 100)), "sum", "ring")):
        try:
            comm.allreduce(x, op=op, algorithm=algorithm)
            outcomes.append(f"rank {rank} {label}: no error")
        except ValueError as exc:
            outcomes.append(f"rank {rank} {label}: ValueError: {exc}")
    # a local error on one rank (a bad out=) is raised on every rank; so is a different collective
    x = np.zeros(10)
    for label, call in (("out", lambda: comm.allreduce(x, out=np.zeros(11) if rank == 1 else None)),
                        ("collective", lambda: comm.broadcast(x) if rank == 1 else comm.allreduce(x, algorithm="ring")),
                        # after an agreed call of the same shape (rank 0 reuses the plan it kept), a new shape elsewhere
                        ("cached", lambda: [comm.allreduce(np.zeros((2, 5))),
                                            comm.allreduce(np.zeros((2, 5) if rank == 0 else (5, 2)))])):
        try:
            call()
            outcomes.append(f"rank {rank} {label}: no error")
        except ValueError as exc:
            outcomes.append(f"rank {rank} {label}: ValueError: {exc}")
    report(outcomes)

elif mode == "defaults":  # the default Communicator at the sizes where its algorithms and block sizes change
    default = Communicator(comm=world.Dup())
    failures, used = [], set()
    rng = np.random.default_rng(2000 + rank)
    for nbytes in (4096, 65536 + 12, (3 << 20) + 28, (9 << 20) + 24, (17 << 20) + 8):
        for dtype, op in ((np.float32, "sum"), (np.float64, "average"), (np.int64, "sum"), (np.int32, "max")):
            n = nbytes // np.dtype(dtype).itemsize
            x = (rng.integers(-1000, 1000, n) if np.issubdtype(dtype, np.integer) else rng.standard_normal(n)).astype(dtype)
            ref = reference(x, op)
            if np.issubdtype(dtype, np.floating):  # floats: within the rounding of a float64 reference
                wide = x.astype(np.float64)
                ref, magnitude = reference(wide, op), reference(np.abs(wide), op)
                bound = (size + 2) * np.finfo(dtype).eps * magnitude + np.finfo(dtype).tiny
            for out in (None, "separate", "in place"):
                buf = x.copy() if out == "in place" else np.empty_like(x) if out == "separate" else None
                got = default.allreduce(buf if out == "in place" else x, op=op, out=buf)
                used.add(default.last_algorithm)
                ok = np.array_equal(got, ref) if np.issubdtype(dtype, np.integer) else \
                    bool(np.all(np.abs(got.astype(np.float64) - ref) <= bound))
                if not ok:
                    failures.append(f"rank {rank}: {nbytes} B {np.dtype(dtype).name} {op} out={out} "
                                    f"({default.last_algorithm}) differs from MPI")
    window = default._window
    report(failures + ([f"rank {rank}: defaults match MPI ({', '.join(sorted(used))}; blocks of "
                        f"{window.block if window else 0} B; oversubscribed {window and window.oversubscribed})"]
                       if rank == 0 else []))

elif mode == "timeout_checked":  # the default check=True, on the communicator's own timeout
    if rank == 0:
        late = Communicator(comm=world.Dup(), timeout=2.0)
        for n in (10, 100_000):  # recursive doubling and the ring: the check itself must time out
            t0 = time.monotonic()
            try:
                late.allreduce(np.ones(n))
                print(f"rank 0: n={n} no timeout", flush=True)
            except CollectiveTimeout as exc:
                print(f"rank 0: n={n} CollectiveTimeout after {time.monotonic() - t0:.1f} s: {exc}", flush=True)
        time.sleep(0.5)
        world.Abort(3)
    else:
        Communicator(comm=world.Dup(), timeout=2.0)  # creating it is collective; the allreduce never comes
        time.sleep(30)

elif mode == "timeout":
    if rank == 0:
        try:
            comm.allreduce(np.ones(100_000), timeout=2.0, check=False)
            print("rank 0: no timeout", flush=True)
        except CollectiveTimeout as exc:
            print(f"rank 0: CollectiveTimeout: {exc}", flush=True)
        time.sleep(0.5)  # let mpiexec forward the line above before the job is torn down
        world.Abort(3)  # the peers are not coming: end the job instead of hanging in MPI_Finalize
    else:
        time.sleep(30)  # never calls the collective
