"""SPMD worker for tests/test_mpi_job.py: a job ends, with the failing rank's message, whenever a rank cannot take part.

Launch:  mpiexec -n 2 python tests/mpi_scripts/job_faults.py MODE

Modes
-----
hvd_env_one_rank    HOROVOD_STALL_CHECK_TIME_SECONDS=abc on the last rank only, then hvd.init() and an allreduce.
comm_nodes_one_rank WORKSHOP_SIMULATE_NODES=2 on rank 0 only, then a Communicator and an allreduce.
d4p_mixed           daalinit(); the last rank calls kmeans_init(distributed=False), the others True; daalfini().
d4p_mixed_kmeans    the same with kmeans.
comm_timeout        no hvd.init(): Communicator(timeout=3); rank 0's allreduce times out (uncaught) while the
                    last rank sleeps 60 s.
stall               hvd.init(); the last rank sleeps 60 s while the others allreduce (the stall inspector's
                    shutdown time, from the environment, ends it).
"""

import os
import sys
import time

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
mode = sys.argv[1]
last = rank == size - 1

if mode == "hvd_env_one_rank":
    import workshop_lib.hvd as hvd

    if last:
        os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "abc"
    hvd.init()
    hvd.allreduce(np.ones(10))
    print(f"rank {rank}: unreachable", flush=True)

elif mode == "comm_nodes_one_rank":
    from workshop_lib.comm import Communicator

    if rank == 0:
        os.environ["WORKSHOP_SIMULATE_NODES"] = "2"
    Communicator().allreduce(np.ones(10))
    print(f"rank {rank}: unreachable", flush=True)

elif mode in ("d4p_mixed", "d4p_mixed_kmeans"):
    import workshop_lib.d4p as d4p

    d4p.daalinit()
    x = np.random.default_rng(rank).standard_normal((50, 3))
    init = d4p.kmeans_init(3, method="plusPlusDense", distributed=not last).compute(x)
    if mode == "d4p_mixed_kmeans":
        d4p.kmeans(3, 5, distributed=not last).compute(x, init.centroids)
    print(f"rank {rank}: computed", flush=True)
    d4p.daalfini()
    print(f"rank {rank}: unreachable after daalfini", flush=True)

elif mode == "comm_timeout":
    from workshop_lib.comm import Communicator

    comm = Communicator(timeout=3.0)
    if last:
        time.sleep(60)
    comm.allreduce(np.ones(100))
    print(f"rank {rank}: unreachable", flush=True)

elif mode == "stall":
    import workshop_lib.hvd as hvd

    hvd.init()
    if last:
        time.sleep(60)
    hvd.allreduce(np.ones(10), name="late_tensor")
    print(f"rank {rank}: unreachable", flush=True)

else:
    raise SystemExit(f"unknown mode {mode!r}")
