"""Time four ways to allreduce: MPI's own MPI_Allreduce, the ring, workshop_lib's default, a parameter server.

Run it under MPI; rank 0 prints one JSON line of seconds per call::

    mpiexec -n 4 python allreduce_timing.py --sizes 65536 1048576 16777216
"""

import argparse
import json

from mpi4py import MPI

from workshop_lib.bench import time_allreduce


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 20, 1 << 24], help="bytes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for flag, values in (("--sizes", args.sizes), ("--repeats", [args.repeats])):
        if any(v < 1 for v in values):
            parser.error(f"argument {flag}: expected positive integers, got {' '.join(map(str, values))}")
    rows = [time_allreduce(n, ("mpi", "ring", "ours", "parameter_server"), args.repeats) for n in args.sizes]
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps({"ranks": MPI.COMM_WORLD.Get_size(), "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
