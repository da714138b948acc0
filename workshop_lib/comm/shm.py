"""The shared-memory allreduce: ranks on one node reduce through an MPI-3 shared-memory window.

The same reduce-scatter + allgather as the ring, but through memory instead of messages, in cache-sized blocks,
as MPICH's and NCCL's intra-node collectives do. Each rank copies a block into its slot of the window, reduces its
own chunk of that block reading every slot directly, and after a barrier copies out every rank's reduced chunk.
Two slots per rank, used alternately, make one barrier per phase enough.
"""

from __future__ import annotations

import os

import numpy as np

from ..placement import node_groups
from .ring import chunk_bounds

SHM_BLOCK_BYTES = 1 << 20  # the shared-memory algorithm works in blocks of this size per rank (cache-sized) ...
SHM_OVERSUBSCRIBED_BLOCK_BYTES = 8 << 20  # ... or this, with more ranks than cores (every barrier costs time slices)


class SharedWindow:
    """Two slots of ``block_bytes`` per rank in an MPI-3 shared-memory window, and the allreduce that uses them.

    Parameters
    ----------
    comm : mpi4py communicator
        Its ranks; the window is made only when they all share one node (``ok``).
    block_bytes : int, optional
        Bytes per slot (default: cache-sized, or larger with more ranks than cores).
    """

    def __init__(self, comm, block_bytes=None):
        from mpi4py import MPI

        self.comm = comm
        same_node = node_groups(comm).machine_size == comm.Get_size()
        self.ok = same_node
        if not same_node:  # every rank sees the same node sizes only if all share one node: decided together
            return
        # more ranks than cores (the union of their CPU affinities): ranks get descheduled, and the ring's
        # 2(p-1) neighbour-to-neighbour steps suffer most; then shared memory pays at every size
        cpus = comm.allgather(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else list(range(os.cpu_count() or 1)))
        self.oversubscribed = comm.Get_size() > len(set().union(*map(set, cpus)))
        if block_bytes is None:  # default: cache-sized blocks; fewer, larger ones (fewer barriers) when oversubscribed
            block_bytes = SHM_BLOCK_BYTES
            if self.oversubscribed:  # two slots per rank, within a quarter of /dev/shm's free space (Docker: 64 MB)
                free = shm_free_bytes()
                room = SHM_OVERSUBSCRIBED_BLOCK_BYTES if free is None else free // (8 * comm.Get_size())
                block_bytes = max(SHM_BLOCK_BYTES, min(SHM_OVERSUBSCRIBED_BLOCK_BYTES, room))
            block_bytes = comm.bcast(block_bytes, root=0)  # the same on every rank
        self.block = int(block_bytes)
        self.win = MPI.Win.Allocate_shared(2 * self.block, 1, comm=comm)
        self.slots = [np.frombuffer(self.win.Shared_query(k)[0], dtype=np.uint8) for k in range(comm.Get_size())]
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.parity = 0
        self._plans = {}

    def free(self):
        self.win.Unlock_all()
        self.win.Free()

    def _sync(self):
        # Win_sync orders this rank's stores and loads around the barrier (MPI's unified memory model)
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def _plan(self, dtype, n):
        """For a block of n elements in the current slot: every rank's slot view, my chunk in each, every chunk."""
        key = (self.parity, dtype.char, n)
        plan = self._plans.get(key)
        if plan is None:
            p, r = self.comm.Get_size(), self.comm.Get_rank()
            offset = self.parity * self.block
            views = [slot[offset : offset + n * dtype.itemsize].view(dtype) for slot in self.slots]
            bounds = chunk_bounds(n, p)
            lo, hi = bounds[r], bounds[r + 1]
            others = [(k, bounds[k], bounds[k + 1], views[k][bounds[k] : bounds[k + 1]])
                      for k in range(p) if k != r and bounds[k + 1] > bounds[k]]
            plan = (views[r], lo, hi, [v[lo:hi] for v in views], others)
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = plan
        self.parity ^= 1
        return plan

    def allreduce(self, src, dst, reduce, first_sync=None, finish=None):
        """dst = reduction over ranks of src (flat arrays; may be the same array), block by block.

        ``first_sync`` (the cross-rank check, a collective) replaces the first barrier; ``finish`` (the
        average's division) is applied in place to each chunk this rank reduces, before the others read it.

        Parameters
        ----------
        src, dst : numpy.ndarray
            Flat input and output (may be the same array).
        reduce : numpy ufunc
        first_sync : callable, optional
            A collective that replaces the first barrier (the cross-rank check).
        finish : callable, optional
            Applied in place to each chunk this rank reduces (the average's division).
        """
        per_block = max(self.comm.Get_size(), self.block // src.itemsize)
        for start in range(0, src.size, per_block):
            stop = min(start + per_block, src.size)
            mine, lo, hi, inputs, others = self._plan(src.dtype, stop - start)
            np.copyto(mine, src[start:stop])
            if first_sync is not None:
                first_sync()  # a collective: when it returns, every rank has written its block
                self.win.Sync()
                first_sync = None
            else:
                self._sync()
            if hi > lo:  # reduce my chunk: rank 0's values op rank 1's op ... (one order, whoever reduces)
                out = dst[start + lo : start + hi]
                reduce(inputs[0], inputs[1], out=out)
                for chunk in inputs[2:]:
                    reduce(out, chunk, out=out)
                if finish is not None:
                    finish(out)
                mine[lo:hi] = out
            self._sync()
            for _, a, b, chunk in others:  # everyone's reduced chunk, read straight from their slots
                dst[start + a : start + b] = chunk


def shm_free_bytes():
    """Free bytes of /dev/shm (where MPI's shared-memory windows live on Linux), or None where it is not found."""
    try:
        stat = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize
