"""SPMD worker for tests/test_mpi_d4p.py: d4p moves numbers through buffers, never as pickled objects.

d4p's mpi4py communicator is wrapped so that every lower-case (pickling) call fails, except an allgather of
small metadata with no array inside (the one validating exchange: parameters, shapes, messages). Every
initialisation method and Lloyd with an empty cluster (re-seeded from the farthest points) then run on each
rank's rows, and rank 0 checks the results against one process clustering all the rows.

Launch:  mpiexec -n 2 python tests/mpi_scripts/d4p_buffers.py
"""

import numpy as np
from mpi4py import MPI

from workshop_lib import d4p
from workshop_lib.comm import Communicator

PICKLING = ("bcast", "allreduce", "reduce", "gather", "scatter", "alltoall", "send", "recv", "sendrecv", "isend",
            "irecv", "exscan", "scan")


def _holds_numbers(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_holds_numbers(o) for o in obj)
    if isinstance(obj, dict):
        return any(_holds_numbers(o) for o in obj.values())
    return False


class NoPickles:
    """mpi4py's communicator, with its pickling methods refused (upper-case buffer methods pass through)."""

    def __init__(self, comm):
        self._comm, self.metadata_calls = comm, 0

    def allgather(self, obj):
        if _holds_numbers(obj):
            raise AssertionError(f"d4p pickled numbers through allgather: {obj!r:.200}")
        self.metadata_calls += 1
        return self._comm.allgather(obj)

    def __getattr__(self, name):
        if name in PICKLING:
            raise AssertionError(f"d4p called the pickling {name}()")
        return getattr(self._comm, name)


world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
collectives = Communicator()  # the real one, for the sums (its own buffers); it holds the job guard
d4p._state.comm, d4p._state.collectives = NoPickles(world), collectives
d4p.daalinit()
rng = np.random.default_rng(5)
X = np.concatenate([rng.normal(c, 0.3, (40, 3)) for c in ((0, 0, 0), (5, 5, 5), (0, 5, 0))])
X = np.concatenate([X, [[100.0, 100.0, 100.0]]])  # an outlier that the empty cluster takes
start, stop = d4p.row_range(len(X), rank, size)
mine = X[start:stop]
failures = []
for method in d4p.INIT_METHODS:
    init = d4p.kmeans_init(4, method=method, distributed=True).compute(mine)
    serial = d4p.kmeans_init(4, method=method).compute(X)
    if method != "parallelPlusDense" and not np.array_equal(init.centroids, serial.centroids):
        failures.append(f"{method}: {init.centroids} != serial {serial.centroids}")
empty = np.array([[0, 0, 0], [5, 5, 5], [0, 5, 0], [1000, 1000, 1000]], dtype=np.float64)  # the last gets no point
got = d4p.kmeans(4, 10, distributed=True).compute(mine, empty)
want = d4p.kmeans(4, 10).compute(X, empty)
if not np.allclose(got.centroids, want.centroids, rtol=1e-12, atol=1e-12):
    failures.append(f"kmeans with an empty cluster: {got.centroids} != serial {want.centroids}")
if not any(np.allclose(c, 100.0) for c in got.centroids):
    failures.append(f"the empty cluster was not re-seeded with the farthest point: {got.centroids}")
d4p.daalfini()
everyone = world.gather(failures, root=0)
if rank == 0:
    problems = [f for part in everyone for f in part]
    print("rank 0: " + ("; ".join(problems) if problems else
                        f"buffers only ({d4p._state.comm.metadata_calls} metadata allgathers)"), flush=True)
