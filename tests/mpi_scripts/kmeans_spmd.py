"""SPMD worker for tests/test_mpi_d4p.py: every rank clusters its rows of a shared data file.

Launch:  mpiexec -n 3 python tests/mpi_scripts/kmeans_spmd.py DATA.npz OUT.npz [--nan-on-rank R | --k K]
"""

import argparse

import numpy as np

from workshop_lib import d4p

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("--k", type=int, default=6)
parser.add_argument("--nan-on-rank", type=int, default=None)
parser.add_argument("--bad-centroids-on-rank", type=int, default=None)
args = parser.parse_args()

d4p.daalinit()
rank, size = d4p.my_procid(), d4p.num_procs()
X = np.load(args.data)["X"]
chunk = np.array_split(X, size)[rank].copy()  # the domain decomposition: contiguous rows, in rank order

if args.nan_on_rank is not None or args.bad_centroids_on_rank is not None:
    centroids = X[: args.k].copy()
    if rank == args.nan_on_rank:
        chunk[0, 0] = np.nan
    if rank == args.bad_centroids_on_rank:
        centroids = centroids[:-1]
    outcome = f"rank {rank} raised nothing"
    try:
        d4p.kmeans(args.k, 5, distributed=True).compute(chunk, centroids)
    except ValueError as exc:
        outcome = f"rank {rank} raised ValueError: {exc}"
    from mpi4py import MPI

    outcomes = MPI.COMM_WORLD.gather(outcome, root=0)  # one writer, so lines never interleave
    if rank == 0:
        print("\n".join(outcomes), flush=True)
    d4p.daalfini()
    raise SystemExit(0)

results = {}
for method in d4p.INIT_METHODS:
    for trials in (1, 3) if method == "plusPlusDense" else (1,):
        init = d4p.kmeans_init(args.k, method=method, nTrials=trials, engine=d4p.engines_mt19937(seed=11),
                               distributed=True).compute(chunk)
        results[f"init_{method}_{trials}"] = init.centroids
fit = d4p.kmeans(args.k, 30, distributed=True).compute(chunk, results["init_plusPlusDense_1"])
assign_only = d4p.kmeans(args.k, 0, distributed=True).compute(chunk, fit.centroids)

# every rank must hold the same global result: compare against rank 0's
from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
same = all(np.array_equal(a, b) for a, b in zip(comm.allgather(fit.centroids), [fit.centroids] * size))
labels = comm.gather(fit.assignments[:, 0], root=0)
labels0 = comm.gather(assign_only.assignments[:, 0], root=0)
if rank == 0:
    np.savez(args.out, **results, centroids=fit.centroids, labels=np.concatenate(labels),
             labels_assign_only=np.concatenate(labels0), objective=fit.objectiveFunction,
             iterations=fit.nIterations, same_on_all_ranks=same)
d4p.daalfini()
