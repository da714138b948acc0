"""SPMD worker for tests/test_mpi_d4p.py: every rank clusters its rows of a shared data file.

Launch:  mpiexec -n 3 python tests/mpi_scripts/kmeans_spmd.py DATA.npz OUT.npz [--nan-on-rank R | --k K]

--disagree PARAM     every rank passes its own value of PARAM (nClusters, method, maxIterations, fptype, seed,
                     algorithm); every rank must raise.
--huge-on-rank R     rank R's chunk is scaled to 1e170 (squared distances overflow); every rank must raise.
--raise-on-rank R    rank R raises MemoryError between daalinit() and compute(), while the others compute.
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
parser.add_argument("--disagree", default=None)
parser.add_argument("--huge-on-rank", type=int, default=None)
parser.add_argument("--raise-on-rank", type=int, default=None)
args = parser.parse_args()

d4p.daalinit()
rank, size = d4p.my_procid(), d4p.num_procs()
X = np.load(args.data)["X"]
chunk = np.array_split(X, size)[rank].copy()  # the domain decomposition: contiguous rows, in rank order



def report(outcome):
    from mpi4py import MPI

    outcomes = MPI.COMM_WORLD.gather(outcome, root=0)  # one writer, so lines never interleave
    if rank == 0:
        print("\n".join(outcomes), flush=True)


if args.raise_on_rank is not None:
    if rank == args.raise_on_rank:
        raise MemoryError(f"rank {rank} ran out of memory on purpose")
    d4p.kmeans_init(args.k, distributed=True).compute(chunk)  # waits for the rank that failed
    print(f"rank {rank}: unreachable", flush=True)

if args.disagree is not None or args.huge_on_rank is not None:
    p = args.disagree
    init_kwargs = dict(method="plusPlusDense", engine=d4p.engines_mt19937(seed=777 + (rank if p == "seed" else 0)),
                       distributed=True, fptype="float" if p == "fptype" and rank == 1 else "double")
    k = args.k + (rank if p == "nClusters" else 0)
    if p == "method":
        init_kwargs["method"] = d4p.INIT_METHODS[rank % len(d4p.INIT_METHODS)]
    if rank == args.huge_on_rank:
        chunk = chunk * 1e170
    outcome = f"rank {rank} raised nothing"
    try:
        if p in ("maxIterations", "fptype_lloyd", "algorithm"):
            centroids = X[: args.k].copy()
            if p == "algorithm" and rank == 1:
                d4p.kmeans_init(args.k, distributed=True).compute(chunk)
            else:
                d4p.kmeans(args.k, 5 + rank if p == "maxIterations" else 5, distributed=True,
                           fptype="float" if p == "fptype_lloyd" and rank == 1 else "double").compute(chunk, centroids)
        else:
            d4p.kmeans_init(k, **init_kwargs).compute(chunk)
    except ValueError as exc:
        outcome = f"rank {rank} raised ValueError: {exc}"
    report(outcome)
    d4p.daalfini()
    raise SystemExit(0)

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
    report(outcome)
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
