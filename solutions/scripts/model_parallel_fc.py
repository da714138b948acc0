"""Model parallelism with alltoall: the CNN's fc1 layer split by output columns over the ranks, checked and timed.

Data parallelism keeps a whole copy of fc1 (3136 x 1024 weights, 12.8 MB) on every rank and allreduces its gradient
every step. Model parallelism (MLSL's alltoall, Mesh-TensorFlow's split layers) gives each rank 1024 / p of fc1's
columns instead: the batch's features are gathered on every rank, each rank computes its columns for the whole
batch, and one alltoall hands every rank its own images' rows back. What moves is activations, not weights. Run it
under MPI; rank 0 prints one JSON line::

    mpiexec -n 2 python model_parallel_fc.py --batch 50 --rounds 7
"""

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

IN, OUT = 3136, 1024  # fc1 of the labs' CNN


def fc_model_parallel(comm, x_local, w_columns):
    """fc1 on this rank's images, ``x_local`` (B/p, IN), with this rank's columns ``w_columns`` (IN, OUT/p)."""
    p = comm.Get_size()
    x_all = np.empty((p * x_local.shape[0], IN), np.float32)
    comm.Allgather(x_local, x_all)  # every rank needs every image's features for its columns
    y_columns = x_all @ w_columns  # (B, OUT/p): all images, this rank's columns
    send = np.ascontiguousarray(y_columns.reshape(p, x_local.shape[0], -1))  # block r: rank r's images
    recv = np.empty_like(send)
    comm.Alltoall(send, recv)  # block r now: rank r's columns for this rank's images
    return np.concatenate(list(recv), axis=1)  # (B/p, OUT)


def seconds_per_call(comm, fn, calls):
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return comm.allreduce((time.perf_counter() - t0) / calls, op=MPI.MAX)  # the slowest rank's time counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=50, help="images per step over all ranks")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per round")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, p = comm.Get_rank(), comm.Get_size()
    if args.batch % p or OUT % p:
        raise SystemExit(f"--batch={args.batch} and {OUT} must be multiples of the {p} ranks")
    rng = np.random.default_rng(0)  # the same full weights and batch on every rank, to check against
    w = (rng.standard_normal((IN, OUT)) / np.sqrt(IN)).astype(np.float32)
    x = rng.random((args.batch, IN), dtype=np.float32)
    rows = slice(rank * args.batch // p, (rank + 1) * args.batch // p)
    columns = slice(rank * OUT // p, (rank + 1) * OUT // p)
    x_local, w_columns = np.ascontiguousarray(x[rows]), np.ascontiguousarray(w[:, columns])
    y_local = fc_model_parallel(comm, x_local, w_columns)
    reference = x[rows].astype(np.float64) @ w.astype(np.float64)
    error = float(np.abs(y_local - reference).max() / np.abs(reference).max())
    grad = np.ones((IN, OUT), np.float32)
    summed = np.empty_like(grad)
    x_all = np.empty((args.batch, IN), np.float32)
    send = np.ones((p, args.batch // p, OUT // p), np.float32)
    recv = np.empty_like(send)

    def exchange_activations():  # what model parallelism sends each forward step (its backward step mirrors it)
        comm.Allgather(x_local, x_all)
        comm.Alltoall(send, recv)

    calls = {"model parallel: allgather + alltoall of activations": exchange_activations,
             "data parallel: allreduce of fc1's gradient": lambda: comm.Allreduce(grad, summed, op=MPI.SUM)}
    for fn in calls.values():
        fn()  # warm up
    rounds = {name: [] for name in calls}
    for _ in range(args.rounds):  # interleaved, so a noisy moment hits both
        for name, fn in calls.items():
            rounds[name].append(seconds_per_call(comm, fn, args.calls))
    if rank == 0:
        moved = {"model parallel: allgather + alltoall of activations":
                 4 * (args.batch * IN * (p - 1) // p + args.batch * OUT * (p - 1) // p),
                 "data parallel: allreduce of fc1's gradient": 4 * IN * OUT * 2 * (p - 1) // p}
        worst = comm.allreduce(error, op=MPI.MAX)
        print(json.dumps({"ranks": p, "batch": args.batch, "max_relative_error": worst,
                          "seconds": rounds, "bytes_sent_per_rank": moved}), flush=True)
    else:
        comm.allreduce(error, op=MPI.MAX)


if __name__ == "__main__":
    main()
