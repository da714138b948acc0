"""SPMD worker for tests/test_mpi_comm_recorded.py: comm's results on fixed inputs, as digests, per algorithm.

Every rank computes allreduce (every algorithm, dtype and op, several sizes, each small case twice so that the
cached fast path runs too, and again under a timeout, which takes the segmented and non-blocking paths),
fused_allreduce, parameter_server_allreduce, broadcast and allgather on seeded inputs, and hashes the bytes of
every result. Rank 0 prints one line per group: ``rank 0: <group> <sha256 prefix>``, after checking that
every rank's digests are equal.

Launch:  mpiexec -n 2 python tests/mpi_scripts/comm_recorded.py
"""

import hashlib

import numpy as np
from mpi4py import MPI

from workshop_lib.comm import Communicator

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
# small thresholds, so that "auto" and the explicit algorithms run their block, segment and size switches
comm = Communicator(small_bytes=4096, segment_bytes=8192, shm_block_bytes=4096, shm_min_bytes=1024,
                    shm_max_bytes=100_000)
timed = Communicator(comm=world.Dup(), small_bytes=4096, segment_bytes=8192, timeout=120.0)
SIZES = (0, 1, size - 1, 7, 1001, 5003, 40_001)
DTYPES = (np.float16, np.float32, np.float64, np.int32, np.int64)
OPS = ("sum", "average", "min", "max")
ALGORITHMS = ("auto", "ring", "recursive_doubling", "hierarchical") + (() if comm.nodes.simulated else ("shared_memory",))


def values(seed, n, dtype):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        return rng.integers(-1000, 1000, n).astype(dtype)
    return (rng.standard_normal(n) * 10).astype(dtype)


digests = {}


def add(group, array):
    h = digests.setdefault(group, hashlib.sha256())
    h.update(str((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).tobytes())


for algorithm in ALGORITHMS:
    for dtype in DTYPES:
        for op in OPS:
            for n in SIZES:
                x = values(1000 * rank + n, n, dtype)
                repeats = 2 if n * np.dtype(dtype).itemsize <= 64 * 1024 else 1
                for _ in range(repeats):
                    add(f"allreduce/{algorithm}", comm.allreduce(x, op=op, algorithm=algorithm))
                inplace = x.copy()
                comm.allreduce(inplace, op=op, out=inplace, algorithm=algorithm)
                add(f"allreduce/{algorithm}", inplace)
                if algorithm != "shared_memory":
                    add(f"allreduce_timeout/{algorithm}", timed.allreduce(x, op=op, algorithm=algorithm))

for dtype in DTYPES:
    for op in OPS:
        arrays = [values(7 * rank + k, n, dtype).reshape(-1, 1) for k, n in enumerate((3, 1001, 5003, 1))]
        for out in comm.fused_allreduce(arrays, op=op, threshold_bytes=8192):
            add("fused_allreduce", out)
        if dtype in (np.float32, np.float64):
            for out in comm.fused_allreduce(arrays, op=op, compression="fp16"):
                add("fused_allreduce_fp16", out)
        add("parameter_server", comm.parameter_server_allreduce(values(rank, 1001, dtype), op=op))

for dtype in DTYPES:
    for n in (1, 1001, 40_001):
        for root in range(size):
            add("broadcast", comm.broadcast(values(31 * rank + n, n, dtype).reshape(-1, 1), root=root))
        add("allgather", comm.allgather(values(17 * rank + n, n + rank, dtype)))
        add("allgather", comm.allgather(values(17 * rank + n, (rank + 1, 3), dtype).reshape(rank + 1, 3)))

lines = [f"{group} {h.hexdigest()[:16]}" for group, h in sorted(digests.items())]
everyone = world.gather(lines, root=0)
if rank == 0:
    for r, theirs in enumerate(everyone):
        if theirs != lines:
            print(f"rank 0: rank {r}'s results differ from rank 0's: {theirs} vs {lines}", flush=True)
    print("\n".join(f"rank 0: {line}" for line in lines), flush=True)
comm.free()
