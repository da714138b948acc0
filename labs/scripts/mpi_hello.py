"""Hello from every MPI rank, and one allreduce to prove they talk.

Launch:  mpiexec -n 2 python scripts/mpi_hello.py
"""

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# Every rank contributes rank + 1; after the allreduce all of them hold 1 + 2 + ... + size.
total = comm.allreduce(rank + 1, op=MPI.SUM)
lines = comm.gather(f"rank {rank} of {size} on {MPI.Get_processor_name()}: allreduce sum = {total}", root=0)
if rank == 0:
    print(MPI.Get_library_version().splitlines()[0].strip())
    print("\n".join(lines))
