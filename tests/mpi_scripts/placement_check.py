"""Each rank prints the placement it got from hvd.init(), d4p.daalinit() or a Communicator, as one JSON line.

Run:  mpiexec -n 2 python tests/mpi_scripts/placement_check.py hvd
"""

import argparse
import json
import os
import sys

import numba

from workshop_lib import placement

parser = argparse.ArgumentParser()
parser.add_argument("entry", choices=["hvd", "d4p", "comm"])
args = parser.parse_args()
if args.entry == "hvd":
    import workshop_lib.hvd as hvd

    hvd.init()
    rank = hvd.rank()
elif args.entry == "d4p":
    import workshop_lib.d4p as d4p

    d4p.daalinit()
    rank = d4p.my_procid()
else:
    from workshop_lib.comm import Communicator

    rank = Communicator().rank
threads = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
sys.stdout.write(json.dumps({"rank": rank, "numba": numba.get_num_threads(), "blas": placement.blas_threads(),
                  "affinity": sorted(os.sched_getaffinity(0)), "every_thread": sorted(set(map(tuple, threads.values()))),
                  "binding": placement.current().binding}) + "\n")  # one write: ranks' lines never interleave
sys.stdout.flush()
