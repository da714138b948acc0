"""Time message exchanges between ranks 0 and 1, for the alpha-beta cost model (``workshop_lib.scaling``).

Run it under MPI; rank 0 prints one JSON line of message sizes (bytes) and seconds per exchange::

    mpiexec -n 2 python link_timing.py
"""

import argparse
import json

from mpi4py import MPI

from workshop_lib.scaling import measure_link


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 1024, 16384, 262144, 4 << 20, 16 << 20],
                        help="bytes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for flag, values in (("--sizes", args.sizes), ("--repeats", [args.repeats])):
        if any(v < 1 for v in values):
            parser.error(f"argument {flag}: expected positive integers, got {' '.join(map(str, values))}")
    sizes, seconds = measure_link(sizes=args.sizes, repeats=args.repeats)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps({"ranks": MPI.COMM_WORLD.Get_size(), "bytes": sizes, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
