"""Collectives for data-parallel training, on mpi4py: ring allreduce and its relatives.

Mirrors the ring of Baidu's allreduce, Horovod and NCCL. The one idea: in a
ring every rank sends and receives 2(p-1)/p of the buffer, whatever the
number of ranks p, so the time of an allreduce stops growing with p; small
messages instead are latency-bound, and recursive doubling (log2 p exchanges)
wins there, as MPI libraries and NCCL switch algorithms by size.

Every byte moves through MPI (``Sendrecv``, ``Isend``/``Irecv``, ``Bcast``,
``Allgatherv``) on numpy buffers; nothing is pickled but small metadata.
mpi4py is imported when a Communicator is created, never at import.

Ranks on one node (the common case on a laptop, and within a cluster node) use a
third algorithm by default: the same reduce-scatter + allgather, but through an
MPI-3 shared-memory window instead of messages, in cache-sized blocks, as
MPICH's and NCCL's intra-node collectives do. Each rank copies a block into its
slot of the window, reduces its own chunk of that block reading every slot
directly, and after a barrier copies out every rank's reduced chunk. Two slots
per rank, used alternately, make one barrier per phase enough.

Across nodes the fourth algorithm, hierarchical (NCCL's and Horovod's
``HOROVOD_HIERARCHICAL_ALLREDUCE``), keeps most bytes inside each node: a
reduce-scatter among the ranks of a node, a ring among the ranks that have the
same local rank on every node (each reduces one chunk, over the network), and
an allgather inside each node. The node links carry 2(n-1)/n of a 1/L chunk
instead of the flat ring's 2(p-1)/p of the whole buffer through the slowest link.
``WORKSHOP_SIMULATE_NODES=k`` splits the ranks into k fake nodes (contiguous
blocks of ranks), so that all of this runs, and is tested, on one machine.

Shapes: a buffer of n elements is split into p contiguous chunks whose sizes
differ by at most one (:func:`_chunk_bounds`), so any n works, 0 and n < p included.

Safety: by default every collective first checks that all ranks called it alike
(shape, dtype, op, algorithm); a mismatch raises the same ValueError on every
rank instead of a hang or garbage, and a timeout covers the check too.
:class:`JobGuard` (held by ``hvd.init()`` and ``d4p.daalinit()``) ends the job
when a rank fails, and carries the notes of Horovod's stall inspector.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
import traceback

import numpy as np

from . import placement

__all__ = ["OPS", "DTYPES", "ALGORITHMS", "SMALL_BYTES", "SHM_MIN_BYTES", "SHM_MAX_BYTES", "FUSION_THRESHOLD",
           "Communicator", "CollectiveTimeout", "NodeGroups", "ring_schedule", "simulate_ring", "JobGuard", "guard_job",
           "release_job"]

OPS = ("sum", "average", "min", "max")
DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int32, np.int64))
_DTYPE_CODES = {d: i for i, d in enumerate(DTYPES)}
SMALL_BYTES = 32 * 1024  # below this, recursive doubling (latency); above, the ring (bandwidth)
SEGMENT_BYTES = 1 << 20  # the ring moves large chunks in segments, reducing one while the next arrives
FUSION_THRESHOLD = 64 * 1024 * 1024  # like HOROVOD_FUSION_THRESHOLD
SHM_BLOCK_BYTES = 1 << 20  # the shared-memory algorithm works in blocks of this size per rank (cache-sized) ...
SHM_OVERSUBSCRIBED_BLOCK_BYTES = 8 << 20  # ... or this, with more ranks than cores (every barrier costs time slices)
SHM_MIN_BYTES = 8 * 1024  # from this size ...
SHM_MAX_BYTES = 4 * 1024 * 1024  # ... to this one, ranks that share a node use the shared-memory algorithm

_COLLECTIVES = ("allreduce", "broadcast", "parameter_server_allreduce")
_HEADER_FIELDS = 8  # the check compares collective, count, dtype, op, algorithm, ndim, a code of the shape, an error
_HEADER_BYTES = 2 * _HEADER_FIELDS * 8  # (x, -x) pairs of int64
FOLD_BYTES = 64 * 1024  # an allreduce by recursive doubling up to this size travels inside its check's messages
_TAG_CHECK, _TAG_FOLD_IN, _TAG_FOLD_OUT = 41, 42, 43
_REDUCE = {"sum": np.add, "average": np.add, "min": np.minimum, "max": np.maximum}
ALGORITHMS = ("auto", "ring", "recursive_doubling", "shared_memory", "hierarchical")
SIMULATE_NODES_ENV = "WORKSHOP_SIMULATE_NODES"
HIERARCHICAL_ENV = "HOROVOD_HIERARCHICAL_ALLREDUCE"


def _shape_code(shape):
    """A 62-bit code of a shape tuple, the same in every process (a tuple of ints hashes without a random seed)."""
    return hash(shape) & ((1 << 62) - 1)


def _header(name, shape, dtype, op, algorithm):
    """The cross-rank check's header for a call: int64 (x, -x) pairs of its fields, the same as bytes, and
    whether the call is valid (a supported dtype and op)."""
    shape = tuple(int(s) for s in shape)
    fields = np.array([_COLLECTIVES.index(name), int(np.prod(shape, dtype=np.int64)), _DTYPE_CODES.get(dtype, -1),
                       OPS.index(op) if op in OPS else -1, ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else 0,
                       len(shape), _shape_code(shape), 0], dtype=np.int64)
    pairs = np.concatenate([fields, -fields])
    return pairs, pairs.tobytes(), bool(fields[2] >= 0 and fields[3] >= 0)


def _chunk_bounds(n, p):
    """The p + 1 boundaries of p contiguous chunks of n elements (sizes differ by at most one), as ints."""
    return [int(b) for b in np.linspace(0, n, p + 1).astype(np.int64)]


def _ring_chunks(phase, step, rank, size):
    """(chunk sent to the right, chunk received from the left) by ``rank`` at ``step`` of ``phase``.

    Reduce-scatter: after p-1 steps rank r holds the full reduction of chunk (r + 1) mod p. Allgather: those
    reduced chunks travel once round the ring. The communicator's ring and :func:`simulate_ring` both use this.
    """
    shift = 0 if phase == "reduce-scatter" else 1
    return (rank - step + shift) % size, (rank - step - 1 + shift) % size


def ring_schedule(size):
    """The ring allreduce's 2(p-1) steps: ``[(phase, step, [(source, dest, chunk), ...]), ...]``."""
    return [(phase, step, [(r, (r + 1) % size, _ring_chunks(phase, step, r, size)[0]) for r in range(size)])
            for phase in ("reduce-scatter", "allgather") for step in range(size - 1)]


def simulate_ring(values):
    """Run the ring allreduce's schedule on a list of p equal-length arrays, one per simulated rank, in one process.

    Returns ``(states, contributions)``: for each step (and the start), every rank's buffer, and a (p, p) array of
    how many ranks' data is summed into each (rank, chunk). At the end every rank holds the sum, and every count
    is p. Used to draw the algorithm; the real thing is :meth:`Communicator.allreduce`.
    """
    p = len(values)
    buffers = [np.array(v, dtype=np.float64).reshape(-1) for v in values]
    if len({b.size for b in buffers}) != 1:
        raise ValueError(f"values must have equal sizes, got {[b.size for b in buffers]}")
    bounds = _chunk_bounds(buffers[0].size, p)
    chunk = [slice(bounds[i], bounds[i + 1]) for i in range(p)]
    counts = np.ones((p, p), dtype=np.int64)
    states, contributions = [[b.copy() for b in buffers]], [counts.copy()]
    for phase, _, transfers in ring_schedule(p):
        sent = [(dst, c, buffers[src][chunk[c]].copy(), counts[src, c]) for src, dst, c in transfers]
        for dst, c, data, count in sent:  # all ranks send at once, then all receive
            if phase == "reduce-scatter":
                buffers[dst][chunk[c]] += data
                counts[dst, c] += count
            else:
                buffers[dst][chunk[c]] = data
                counts[dst, c] = count
        states.append([b.copy() for b in buffers])
        contributions.append(counts.copy())
    return states, contributions


class _SharedWindow:
    """Two slots of ``block_bytes`` per rank in an MPI-3 shared-memory window, and the allreduce that uses them."""

    def __init__(self, comm, block_bytes=None):
        from mpi4py import MPI

        self.comm = comm
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        same_node = node.Get_size() == comm.Get_size()
        node.Free()
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
                free = _shm_free_bytes()
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
            bounds = _chunk_bounds(n, p)
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


def _shm_free_bytes():
    """Free bytes of /dev/shm (where MPI's shared-memory windows live on Linux), or None where it is not found."""
    try:
        stat = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def _simulated_nodes(size):
    """The node count ``WORKSHOP_SIMULATE_NODES`` asks for (None when unset), validated against ``size`` ranks."""
    value = os.environ.get(SIMULATE_NODES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= size:
        raise ValueError(f"{SIMULATE_NODES_ENV}={value!r} must be a number of nodes from 1 to the {size} ranks")
    return int(value)


def _hierarchical_switch():
    """``HOROVOD_HIERARCHICAL_ALLREDUCE``: True (1: always), False (0: never), None (unset: when ranks span nodes)."""
    value = os.environ.get(HIERARCHICAL_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{HIERARCHICAL_ENV}={value!r} must be 1 (always hierarchical) or 0 (never)")
    return value == "1"


class NodeGroups:
    """Which ranks of ``comm`` share a node: ``local`` (my node's ranks) and ``cross`` (my local rank on every node).

    Nodes are found with ``MPI.COMM_TYPE_SHARED``, or faked by ``WORKSHOP_SIMULATE_NODES=k`` (k contiguous
    blocks of ranks; then ``simulated`` is True and shared memory is not used across them). Creating it is
    collective. ``uniform`` says whether every node has the same number of ranks, which the hierarchical
    allreduce's ring among same-local-rank peers needs.
    """

    def __init__(self, comm):
        from mpi4py import MPI

        size, rank = comm.Get_size(), comm.Get_rank()
        nodes = _simulated_nodes(size)
        self.simulated = nodes is not None
        if self.simulated:
            self.local = comm.Split(rank * nodes // size, key=rank)
        else:
            self.local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.cross = comm.Split(self.local_rank, key=rank)
        self.sizes = sizes = comm.allgather(self.local_size)  # the ranks of each rank's node
        self.uniform = len(set(sizes)) == 1
        self.nodes = round(sum(1 / k for k in sizes))  # the ranks of a node of k ranks count 1/k each
        self.spans_nodes = self.local_size < size
        self.switch = _hierarchical_switch()
        if self.switch and not self.uniform:
            raise ValueError(f"{HIERARCHICAL_ENV}=1, but the nodes hold different numbers of ranks ({sizes}); "
                             "the hierarchical allreduce needs the same number on every node")

    @property
    def hierarchical(self):
        """True when "auto" takes the hierarchical algorithm for bandwidth-bound messages."""
        if self.switch is not None:
            return self.switch
        return self.spans_nodes and self.uniform

    def free(self):
        self.local.Free()
        self.cross.Free()


class CollectiveTimeout(TimeoutError):
    """A collective did not complete in time: a peer crashed, is stuck, or never called it."""


class Communicator:
    """Collectives over an MPI communicator (``MPI.COMM_WORLD`` by default).

    Parameters
    ----------
    comm : mpi4py communicator, optional
    small_bytes : int
        Messages below this use recursive doubling, larger ones the ring.
    segment_bytes : int
        Segment size of the ring's pipelining, used with a timeout (or more than 2 ranks and larger chunks):
        each segment is reduced as it arrives. Without a timeout on 2 ranks each step is one message.
    timeout : float, optional
        Default timeout in seconds for every collective (None waits forever). Collectives with a timeout
        use the message-based algorithms (a barrier on shared memory cannot time out).
    shared_memory : bool
        Use the shared-memory algorithm when all ranks share a node (default; ``WORKSHOP_COMM_SHM=0`` turns
        it off; so does ``WORKSHOP_SIMULATE_NODES``). Creating a Communicator is collective: every rank must
        create it (it also finds which ranks share a node, :class:`NodeGroups`).
    shm_block_bytes : int, optional
        Block size per rank of the shared-memory algorithm (two barriers per block). Default ``SHM_BLOCK_BYTES``
        (cache-sized), or, with more ranks than cores, ``SHM_OVERSUBSCRIBED_BLOCK_BYTES`` within a quarter of
        /dev/shm's free space: there every barrier waits for descheduled ranks, so fewer blocks win.
    shm_min_bytes, shm_max_bytes : int
        "auto" takes the shared-memory algorithm for messages of at least ``shm_min_bytes`` and less than
        ``shm_max_bytes``. Below, one recursive-doubling exchange is quicker than two barriers; above, the
        ring, whose one copy per byte (MPI's large-message transport) beats the window's copy in and out
        (measured with benchmarks/allreduce_bench.py), except when there are more ranks than cores: then shared
        memory wins at every size, and the default (None) means no upper limit in that case, ``SHM_MAX_BYTES``
        otherwise.
    """

    last_algorithm = None  # the algorithm the last allreduce ran (the timeline shows it)

    def __init__(self, comm=None, small_bytes=SMALL_BYTES, segment_bytes=SEGMENT_BYTES, timeout=None,
                 shared_memory=True, shm_block_bytes=None, shm_min_bytes=SHM_MIN_BYTES,
                 shm_max_bytes=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        placement.check_launcher_world()  # srun/mpirun started N tasks but MPI sees 1: stop, say why
        placement.place(self.comm)  # each rank's share of the node's cores, decided once per process
        self.small_bytes, self.segment_bytes, self.timeout = small_bytes, segment_bytes, timeout
        self.shm_min_bytes, self.shm_max_bytes = shm_min_bytes, shm_max_bytes
        self._window = None
        self.nodes = NodeGroups(self.comm) if self.size > 1 else None  # collective; faked by WORKSHOP_SIMULATE_NODES
        if shared_memory and self.size > 1 and os.environ.get("WORKSHOP_COMM_SHM", "1") != "0" \
                and not self.nodes.simulated:
            self._window = _SharedWindow(self.comm, shm_block_bytes)
            if not self._window.ok:
                self._window = None
        # more ranks than cores on this node (known from the shared-memory window's set-up)
        self.oversubscribed = self._window is not None and self._window.oversubscribed
        if shm_max_bytes is None:
            self.shm_max_bytes = float("inf") if self.oversubscribed else SHM_MAX_BYTES
        # the cross-rank check's messages: a header, then (small allreduces) the data; no message is longer
        self._check_send = np.zeros(_HEADER_BYTES + FOLD_BYTES, dtype=np.uint8)
        self._check_recv = np.zeros(_HEADER_BYTES + FOLD_BYTES, dtype=np.uint8)
        self._send_header = self._check_send[:_HEADER_BYTES].view(np.int64)
        self._recv_header = self._check_recv[:_HEADER_BYTES].view(np.int64)
        self._check_status = MPI.Status()
        self._headers, self._check_plans, self._header_sent = {}, {}, None
        self._scratch_bytes = None  # the ring's scratch buffer (in-place calls), kept for the next call
        self._fast = {}  # (shape, dtype, op, algorithm) -> the plan of a small checked allreduce (see _fold_plan)

    @property
    def shared_memory(self):
        """True when allreduce can take the shared-memory algorithm (all ranks on one node)."""
        return self._window is not None

    def free(self):
        """Release the shared-memory window (collective). The communicator still works, without it."""
        if self._window is not None:
            self._window.free()
            self._window = None

    # -- safety ---------------------------------------------------------------------------------
    def _agree(self, name, count, dtype, op, algorithm=None, shape=None, deadline=None, payload=None, reduce=None,
               error=None, source=None, on_wait=None):
        """Every rank learns whether all ranks called ``name`` with the same shape, dtype, op and algorithm.

        The check is recursive doubling over small messages, each starting with a header of (x, -x) pairs of
        the call's fields merged under max: after log2 p exchanges every rank holds the maximum and the
        minimum of every field, and if they differ anywhere every rank raises the same error (never a hang,
        never garbage). Every rank sends the same pattern of messages whatever it was called with, and
        receives into a buffer larger than any message, so a mismatch can neither hang nor truncate.
        ``payload`` (a flat array of at most ``FOLD_BYTES``) travels behind the header and is reduced with
        ``reduce`` on the way while the headers agree (starting from ``source``'s values, default the payload's
        own): a small allreduce and its check are one exchange,
        as NCCL and Horovod's response cache avoid a separate negotiation. With a ``deadline`` the exchange
        is non-blocking and raises :class:`CollectiveTimeout` when it passes. A rank that found an ``error``
        in its own arguments sends it flagged, and every rank raises it. ``on_wait`` (without a deadline) is
        called again and again while the exchange waits for a peer (hvd's stall inspector). Returns True when
        the payload holds the reduction.
        """
        key = (name, (int(count),) if shape is None else shape, dtype, op, algorithm)
        header = self._headers.get(key)
        if header is None:
            if len(self._headers) > 256:
                self._headers.clear()
            header = self._headers[key] = _header(*key)
        if error is not None:
            fields = header[0].copy()
            fields[_HEADER_FIELDS - 1], fields[-1] = 1, -1
            header = (fields, fields.tobytes(), False)
        valid = header[2]
        if not valid or payload is None or payload.nbytes > FOLD_BYTES:
            payload = None
        agreed = self.size == 1 or self._check_exchange(header, payload, reduce, deadline, name,
                                                        payload if source is None else source, on_wait)
        if agreed and valid:
            return payload is not None
        self._disagree(name, count, dtype, op, algorithm, key[1], error)

    def _disagree(self, name, count, dtype, op, algorithm, shape, error=None):
        """After a check that failed on every rank: gather every rank's call and raise the same ValueError on all."""
        calls = self.comm.allgather((int(count), str(dtype), op, algorithm, shape, name, error))
        errors = [(r, c[6]) for r, c in enumerate(calls) if c[6]]
        if errors:
            raise ValueError(f"{name}: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
        calls = [c[:6] for c in calls]
        names = len({c[5] for c in calls}) > 1
        listing = "; ".join(f"rank {r}: " + (f"{c} of " if names else "") + f"{n} x {d} of shape {s}, op={o}"
                            + (f", algorithm={a}" if a else "") for r, (n, d, o, a, s, c) in enumerate(calls))
        problems = []
        if names:
            problems.append("collectives differ")
        if len({c[0] for c in calls}) > 1:
            problems.append("sizes differ")
        elif len({c[4] for c in calls}) > 1:
            problems.append("shapes differ")
        if len({c[1] for c in calls}) > 1:
            problems.append("dtypes differ")
        if len({c[2] for c in calls}) > 1 and not names:
            problems.append("ops differ")
        if len({c[3] for c in calls}) > 1 and len({c[0] for c in calls}) == 1 and not names:
            problems.append("algorithms differ")
        if any(np.dtype(c[1]) not in DTYPES for c in calls):
            problems.append(f"dtypes must be one of {[d.name for d in DTYPES]}")
        if any(c[2] not in OPS for c in calls):
            problems.append(f"op must be one of {OPS}")
        raise ValueError(f"{name}: {', '.join(problems)} across ranks ({listing})")

    def _check_exchange(self, header, payload, reduce, deadline, name, source, on_wait=None):
        """The messages of :meth:`_agree` (recursive doubling, ranks beyond a power of two folded in first).

        Returns whether every header this rank saw equalled its own (then ``payload``, if any, holds the
        reduction of every rank's ``source``).
        """
        p, r = self.size, self.rank
        fields, header_bytes, _ = header
        n = 0 if payload is None else payload.nbytes
        plan = self._check_plans.get((n, None if payload is None else payload.dtype.char))
        if plan is None:
            plan = self._check_plan(payload, n)
        message, send_payload, recv_payload = plan
        if self._header_sent is not header_bytes:  # repeated calls leave the header in place
            self._send_header[:] = fields
            self._header_sent = header_bytes
        if payload is not None:
            np.copyto(send_payload, source)
        length = _HEADER_BYTES + n
        agreed, current = True, source  # current: this rank's values so far (source, then payload)
        pof2 = 1 << (p.bit_length() - 1)
        rem = p - pof2
        if r < 2 * rem and r % 2 == 0:  # fold into the odd neighbour, then wait for its result
            self._check_transfer(message, r + 1, None, _TAG_FOLD_IN, deadline, name, on_wait)
            count = self._check_transfer(None, None, r + 1, _TAG_FOLD_OUT, deadline, name, on_wait)
            agreed = count == length and self._check_recv[:_HEADER_BYTES].tobytes() == header_bytes
            if agreed and payload is not None:
                np.copyto(payload, recv_payload)
            return agreed
        if r < 2 * rem:
            count = self._check_transfer(None, None, r - 1, _TAG_FOLD_IN, deadline, name, on_wait)
            agreed = self._check_merge(agreed, count, length, header_bytes, current, payload, recv_payload, reduce,
                                       True)
            current = payload
        new_rank = r // 2 if r < 2 * rem else r - rem
        mask = 1
        while mask < pof2:
            partner_new = new_rank ^ mask
            partner = partner_new * 2 + 1 if partner_new < rem else partner_new + rem
            if agreed and payload is not None and (mask > 1 or r < 2 * rem):
                np.copyto(send_payload, payload)  # send what is reduced so far
            count = self._check_transfer(message, partner, partner, _TAG_CHECK, deadline, name, on_wait)
            agreed = self._check_merge(agreed, count, length, header_bytes, current, payload, recv_payload, reduce,
                                       partner < r)
            current = payload
            mask <<= 1
        if r < 2 * rem:
            if agreed and payload is not None:
                np.copyto(send_payload, payload)
            self._check_transfer(message, r - 1, None, _TAG_FOLD_OUT, deadline, name, on_wait)
        return agreed

    def _check_merge(self, agreed, count, length, header_bytes, current, payload, recv_payload, reduce, lower):
        """After receiving ``count`` bytes: payload = received op current while every header agrees, else merge
        the headers."""
        if agreed and count == length and self._check_recv[:_HEADER_BYTES].tobytes() == header_bytes:
            if payload is not None and lower:  # lower rank's values op higher rank's, on both sides
                reduce(recv_payload, current, out=payload)
            elif payload is not None:
                reduce(current, recv_payload, out=payload)
            return True
        # from now on only the headers matter: merge them (max of the (x, -x) pairs)
        np.maximum(self._send_header, self._recv_header, out=self._send_header)
        self._header_sent = None
        if self._send_header.tobytes() == header_bytes:  # (cannot happen) keep "merged differs from mine"
            self._send_header[0] = 1 << 40
        return False

    def _check_plan(self, payload, n):
        """(the message to send, its payload as ``payload``'s dtype, the received payload likewise), cached."""
        message = self._check_send[: _HEADER_BYTES + n]
        plan = (message, None, None) if payload is None else (
            message, self._check_send[_HEADER_BYTES : _HEADER_BYTES + n].view(payload.dtype),
            self._check_recv[_HEADER_BYTES : _HEADER_BYTES + n].view(payload.dtype))
        if len(self._check_plans) > 256:
            self._check_plans.clear()
        self._check_plans[(n, None if payload is None else payload.dtype.char)] = plan
        return plan

    def _recv_header_bytes(self):
        return self._check_recv[:_HEADER_BYTES].tobytes()

    def _check_transfer(self, message, dest, source, tag, deadline, name, on_wait=None):
        """Send ``message`` to ``dest`` and/or receive from ``source`` into the check's buffer; the bytes received."""
        recv, status = self._check_recv, self._check_status
        if deadline is None and on_wait is None:
            if dest is not None and source is not None:
                self.comm.Sendrecv(message, dest, tag, recv, source, tag, status)
            elif dest is not None:
                self.comm.Send(message, dest, tag)
                return 0
            else:
                self.comm.Recv(recv, source, tag, status)
            return status.Get_count(self.MPI.BYTE)
        requests = ([self.comm.Irecv(recv, source=source, tag=tag)] if source is not None else []) + (
            [self.comm.Isend(message, dest=dest, tag=tag)] if dest is not None else [])
        statuses = [self.MPI.Status() for _ in requests]
        if deadline is None:
            self._watch(requests, statuses, on_wait)
        else:
            self._wait(requests, deadline, f"{name}'s cross-rank check", statuses=statuses)
        return statuses[0].Get_count(self.MPI.BYTE) if source is not None else 0

    def _wait(self, requests, deadline, what, cancel=True, statuses=None):
        """Wait for MPI requests (filling ``statuses``), or raise CollectiveTimeout when the deadline passes.

        Point-to-point requests are cancelled then; ``cancel=False`` for a non-blocking collective's (MPI
        forbids cancelling those).
        """
        if deadline is None:
            self.MPI.Request.Waitall(requests, statuses)
            return
        while not self.MPI.Request.Testall(requests, statuses):
            if time.monotonic() > deadline:
                for request in requests if cancel else ():
                    try:
                        request.Cancel()
                    except Exception:  # noqa: BLE001 - best effort; the job is in trouble anyway
                        pass
                raise CollectiveTimeout(f"{what} on rank {self.rank} did not complete in time: a peer may have "
                                        "crashed, be stuck, or not have called it")
            time.sleep(0)

    def _watch(self, requests, statuses, on_wait):
        """Wait for MPI requests, calling ``on_wait()`` between tests once a brief spin has not completed them."""
        spins, patience = 0, 0 if self.oversubscribed else 1000
        while not self.MPI.Request.Testall(requests, statuses):
            spins += 1
            # spin about a millisecond first (a sleep, even of 0 s, gives the core away), unless there are more
            # ranks than cores: then the peer we wait for may need this very core, so yield it at once
            if spins > patience:
                if spins % 32 == 0:  # the inspector itself sends and tests messages: not at every turn
                    on_wait()
                os.sched_yield() if spins < patience + 2000 else time.sleep(0.001)  # then stop stealing the cores

    def _exchange(self, send, dest, recv, source, deadline, what):
        if deadline is None:  # one blocking call: the lowest latency (small messages are latency-bound)
            self.comm.Sendrecv(send, dest, 7, recv, source, 7)
            return
        requests = [self.comm.Irecv(recv, source=source, tag=7), self.comm.Isend(send, dest=dest, tag=7)]
        self._wait(requests, deadline, what)

    # -- allreduce ------------------------------------------------------------------------------
    def allreduce(self, array, op="average", out=None, algorithm="auto", timeout=None, check=True, on_wait=None):
        """Reduce ``array`` over all ranks; every rank gets the result.

        Parameters
        ----------
        array : numpy array of float16/32/64 or int32/64, any shape, same size on every rank
        op : {"sum", "average", "min", "max"}
            ``"average"`` divides the sum by the number of ranks (integer division for integers).
        out : array, optional
            Where to write (may be ``array`` itself: in place). Default: a new array.
        algorithm : {"auto", "ring", "recursive_doubling", "shared_memory", "hierarchical"}
            ``"auto"``: shared memory when the ranks share a node and the message is mid-sized (see
            ``shm_min_bytes``), else recursive doubling below ``small_bytes`` and above it the ring, or,
            when the ranks span nodes, the hierarchical allreduce. ``HOROVOD_HIERARCHICAL_ALLREDUCE=1``
            makes "auto" take the hierarchical one for every message, ``=0`` never.
        timeout : float, optional
            Seconds; overrides the communicator's default.
        check : bool
            Verify that every rank passed the same shape, dtype, op and algorithm, and raise on every rank
            if not (also when one rank's own arguments are wrong). The check is a recursive doubling of
            small messages within the timeout; below ``FOLD_BYTES`` a recursive-doubling allreduce
            travels inside those messages, so the check costs no extra round trip.
        on_wait : callable, optional
            Called (with no argument) again and again while the check waits for a peer, without a timeout:
            ``hvd``'s stall inspector, which warns and aborts. Once the check has passed every rank is in the call.
        """
        x = np.asarray(array)
        if check and timeout is None and self.timeout is None:  # a call like one before: its plan, validated then
            fast = self._fast.get((x.shape, x.dtype, op, algorithm))
            if fast is not None and (out is None or out is x or (
                    out.shape == x.shape and out.dtype == x.dtype and out.flags.c_contiguous
                    and ((out.base is None and x.base is None) or not np.may_share_memory(out, x)))):
                return fast(x, out, on_wait)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        requested = algorithm
        if algorithm == "auto" and self.size > 1 and x.size and self.nodes.switch:  # HOROVOD_HIERARCHICAL_ALLREDUCE=1
            algorithm = "hierarchical"
        error = None  # a local error is raised after the check, so that every rank raises (never a hang)
        if algorithm not in ALGORITHMS:
            error = f"algorithm={algorithm!r} must be one of {ALGORITHMS}"
        elif algorithm == "hierarchical" and self.size > 1 and not self.nodes.uniform:
            error = ("algorithm='hierarchical' needs the same number of ranks on every node; the nodes hold "
                     f"{self.nodes.sizes} ranks")
        elif algorithm == "shared_memory" and self.size > 1 and (self._window is None or deadline is not None):
            error = "algorithm='shared_memory' needs all ranks on one node and no timeout"
        elif out is not None and out is not x and (out.shape != x.shape or out.dtype != x.dtype):
            error = f"out has shape {out.shape} and dtype {out.dtype}; expected {x.shape}, {x.dtype}"
        elif out is not None and not out.flags.c_contiguous:
            error = "allreduce works on C-contiguous arrays; pass np.ascontiguousarray(array)"
        elif out is not None and out is not x and np.may_share_memory(out, x):
            error = "out overlaps array; pass out=array itself for an in-place allreduce, or a separate array"
        if error is not None:
            if check:
                self._agree("allreduce", x.size, x.dtype, op, algorithm, x.shape, deadline, error=error,
                            on_wait=on_wait)
            raise ValueError(error)
        shm = self._window is not None and deadline is None and x.size > 0 and (
            algorithm == "shared_memory" or (algorithm == "auto" and self.shm_min_bytes <= x.nbytes < self.shm_max_bytes))
        # Whichever algorithm each rank chose, the check's messages come first and follow one pattern (the
        # shared-memory algorithm sends them as its first synchronisation), so a mismatch always surfaces.
        if not shm and self.size > 1 and x.size and algorithm in ("auto", "shared_memory"):
            algorithm = self.message_algorithm(x)
        if not check and (x.dtype not in DTYPES or op not in OPS):
            raise ValueError(f"allreduce: dtype {x.dtype} / op {op!r} not supported")
        # a small recursive-doubling allreduce travels inside its check's messages, straight from x
        fold = check and algorithm == "recursive_doubling" and self.size > 1 and x.nbytes <= FOLD_BYTES
        # shared memory and the ring read x as they go, so the result needs no copy of x first
        reads_x = shm or fold or (algorithm == "ring" and self.size > 1)
        if out is None:
            out = np.empty(x.shape, dtype=x.dtype) if reads_x else np.array(x, copy=True, order="C")
        elif out is not x and not reads_x:
            np.copyto(out, x)
        flat = out.reshape(-1)
        self.last_algorithm = "shared_memory" if shm else algorithm if self.size > 1 and flat.size else None
        reduce = _REDUCE.get(op)
        # the average's division is done once per element, by the rank that completes it (shared memory, ring)
        finish = self._divide if op == "average" and self.size > 1 else None
        done = False
        if check and not shm:
            done = self._agree("allreduce", x.size, x.dtype, op, algorithm, x.shape, deadline,
                               payload=flat if fold else None, reduce=reduce, source=x.reshape(-1) if fold else None,
                               on_wait=on_wait)
        if shm:  # reads x straight into the window: no copy into out first
            self._window.allreduce(x.reshape(-1), flat, reduce, (lambda: self._agree(
                "allreduce", x.size, x.dtype, op, "shared_memory", x.shape, on_wait=on_wait)) if check else None,
                finish)
            finish = None
        elif self.size > 1 and flat.size and not done:
            if algorithm == "ring":
                self._ring(x.reshape(-1), flat, reduce, deadline, finish)
                finish = None
            elif algorithm == "hierarchical":
                self._hierarchical(flat, reduce, deadline, finish)
                finish = None
            else:
                self._recursive_doubling(flat, reduce, deadline)
        if finish is not None:
            finish(flat)
        if fold and deadline is None:  # the next call of this shape, dtype, op and algorithm skips the above
            if len(self._fast) > 256:
                self._fast.clear()
            self._fast[(x.shape, x.dtype, op, requested)] = self._fold_plan(x.shape, x.dtype, op, algorithm)
        return out

    def _fold_plan(self, shape, dtype, op, algorithm):
        """A small allreduce of ``shape`` and ``dtype`` inside its check's messages, with everything decided once.

        The check itself still runs every time (one exchange per step, the header in front of the data), so a
        rank that calls differently still makes every rank raise; only the local decisions (validation, which
        algorithm, the header, the buffers) are kept from the first call.
        """
        key = ("allreduce", shape, dtype, op, algorithm)
        header = self._headers.get(key) or _header(*key)
        reduce, finish, count = _REDUCE[op], self._divide if op == "average" else None, math.prod(shape)
        fields, header_bytes, _ = header
        length = _HEADER_BYTES + count * dtype.itemsize
        message, send_payload, recv_payload = self._check_plan(np.empty(0, dtype=dtype), count * dtype.itemsize)
        peer = 1 - self.rank
        recv, status, comm, byte = self._check_recv, self._check_status, self.comm, self.MPI.BYTE

        def run(x, out, on_wait):
            if out is None:
                out = np.empty(shape, dtype=dtype)
            flat, src = out.reshape(-1), x.reshape(-1)
            if self.size == 2 and on_wait is None:  # _check_exchange's one exchange, its decisions taken
                if self._header_sent is not header_bytes:
                    self._send_header[:] = fields
                    self._header_sent = header_bytes
                np.copyto(send_payload, src)
                comm.Sendrecv(message, peer, _TAG_CHECK, recv, peer, _TAG_CHECK, status)
                agreed = status.Get_count(byte) == length and recv[:_HEADER_BYTES].tobytes() == header_bytes
                if agreed:  # lower rank's values op higher rank's, on both sides
                    reduce(recv_payload, src, out=flat) if peer < self.rank else reduce(src, recv_payload, out=flat)
            else:
                agreed = self._check_exchange(header, flat, reduce, None, "allreduce", src, on_wait)
            if not agreed:
                self._disagree("allreduce", count, dtype, op, algorithm, shape)
            if finish is not None:
                finish(flat)
            self.last_algorithm = "recursive_doubling"
            return out

        return run

    def _divide(self, values):
        """The average's last step, in place: the sum divided by the number of ranks (integers: floor division)."""
        if values.dtype.kind in "iu":
            np.floor_divide(values, self.size, out=values)
        else:
            np.divide(values, self.size, out=values)

    def message_algorithm(self, array):
        """The message-based algorithm "auto" takes for ``array`` off shared memory: latency- or bandwidth-bound."""
        if array.nbytes < self.small_bytes or array.size < self.size:
            return "recursive_doubling"
        return "hierarchical" if self.nodes is not None and self.nodes.hierarchical else "ring"

    def _scratch(self, dtype, n):
        """A scratch array of ``n`` elements of ``dtype``, reused from call to call (fresh pages fault: reuse them)."""
        nbytes = n * dtype.itemsize
        if self._scratch_bytes is None or self._scratch_bytes.nbytes < nbytes:
            self._scratch_bytes = np.empty(max(nbytes, 64), dtype=np.uint8)
        return self._scratch_bytes[:nbytes].view(dtype)

    def _ring(self, src, dst, reduce, deadline, finish=None):
        """dst = the reduction of every rank's src: reduce-scatter then allgather round the ring.

        Chunk k ends reduced on rank (k - 1) mod p, then goes to every rank. ``src`` is only read (it is sent at
        the first step and reduced into each chunk as it arrives), so no copy of it is made first; ``dst`` may
        be ``src`` itself (then the incoming chunks land in a reused scratch buffer). ``finish`` (the average's
        division) is applied to the one chunk this rank completes, before the allgather sends it on.
        """
        p, r = self.size, self.rank
        right, left = (r + 1) % p, (r - 1) % p
        bounds = _chunk_bounds(dst.size, p)
        sources = [src[bounds[i] : bounds[i + 1]] for i in range(p)]
        chunks = [dst[bounds[i] : bounds[i + 1]] for i in range(p)]
        in_place = np.may_share_memory(src, dst)
        scratch = self._scratch(dst.dtype, bounds[1] - bounds[0] + 1) if in_place else None
        segment = max(1, self.segment_bytes // dst.itemsize)
        # reduce-scatter: at each step a partial sum arrives from the left, gets this rank's own values added,
        # and is sent on at the next step; after p-1 steps rank r holds the full reduction of chunk (r + 1) mod p
        for step in range(p - 1):
            sent, got = _ring_chunks("reduce-scatter", step, r, p)
            send, mine, acc = (sources[sent] if step == 0 else chunks[sent]), sources[got], chunks[got]
            incoming = scratch[: len(acc)] if in_place else acc
            if deadline is None and (len(send) <= segment and len(acc) <= segment or p == 2):
                # one message: MPI's large-message transport copies it once; pipelining in segments costs more
                # handshakes than it overlaps (measured with benchmarks/allreduce_bench.py)
                self.comm.Sendrecv(send, right, 9, incoming, left, 9)
                reduce(incoming, mine, out=acc)
                continue
            # segments: each one is reduced as it arrives while the others are in flight (and a timeout is honoured)
            starts = range(0, len(acc), segment)
            recvs = [self.comm.Irecv(incoming[i : i + segment], source=left, tag=100 + k) for k, i in enumerate(starts)]
            sends = [self.comm.Isend(send[i : i + segment], dest=right, tag=100 + k)
                     for k, i in enumerate(range(0, len(send), segment))]
            pending = list(range(len(recvs)))
            while pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveTimeout(f"ring allreduce on rank {r} did not complete in time")
                index = self.MPI.Request.Waitany([recvs[k] for k in pending]) if deadline is None else \
                    self._test_any([recvs[k] for k in pending])
                if index is None:
                    time.sleep(0)
                    continue
                i = pending.pop(index) * segment
                reduce(incoming[i : i + segment], mine[i : i + segment], out=acc[i : i + segment])
            self._wait(sends, deadline, "ring allreduce")
        if finish is not None:
            finish(chunks[(r + 1) % p])
        # allgather: pass the reduced chunks around so that every rank has all of them
        for step in range(p - 1):
            send, recv = (chunks[i] for i in _ring_chunks("allgather", step, r, p))
            self._exchange(send, right, recv, left, deadline, "ring allgather")

    def _ring_phase(self, comm, buf, reduce, phase, deadline):
        """One phase of the ring over ``comm``'s ranks, on ``buf`` in place: "reduce-scatter" (with ``reduce``)
        leaves chunk (r + 1) mod p of local rank r fully reduced; "allgather" then gives every rank every chunk."""
        p, r = comm.Get_size(), comm.Get_rank()
        if p == 1:
            return
        right, left = (r + 1) % p, (r - 1) % p
        bounds = _chunk_bounds(buf.size, p)
        chunks = [buf[bounds[i] : bounds[i + 1]] for i in range(p)]
        tmp = self._scratch(buf.dtype, max(len(c) for c in chunks))
        what = f"hierarchical allreduce ({phase})"
        for step in range(p - 1):
            send, recv = (chunks[i] for i in _ring_chunks(phase, step, r, p))
            incoming = tmp[: len(recv)] if phase == "reduce-scatter" else recv
            if deadline is None:
                comm.Sendrecv(send, right, 8, incoming, left, 8)
            else:
                self._wait([comm.Irecv(incoming, source=left, tag=8), comm.Isend(send, dest=right, tag=8)],
                           deadline, what)
            if phase == "reduce-scatter":
                reduce(recv, incoming, out=recv)

    def _hierarchical(self, buf, reduce, deadline, finish=None):
        """Reduce-scatter inside the node, a ring of my chunk among my same-local-rank peers, allgather in the node.

        Only the middle step crosses nodes, and each rank sends 2(n-1)/n of a 1/L chunk over it (n nodes of
        L ranks), so the network carries 1/L of what the flat ring sends through each node's link.
        """
        local, cross = self.nodes.local, self.nodes.cross
        self._ring_phase(local, buf, reduce, "reduce-scatter", deadline)
        size, rank = local.Get_size(), local.Get_rank()
        bounds = _chunk_bounds(buf.size, size)
        owned = (rank + 1) % size  # the chunk the reduce-scatter left complete on this rank
        mine = buf[bounds[owned] : bounds[owned + 1]]
        if mine.size:
            self._ring_phase(cross, mine, reduce, "reduce-scatter", deadline)
            cross_bounds = _chunk_bounds(mine.size, cross.Get_size())
            owned_cross = (cross.Get_rank() + 1) % cross.Get_size()
            if finish is not None:  # the average's division, once per element, by the rank that completes it
                finish(mine[cross_bounds[owned_cross] : cross_bounds[owned_cross + 1]])
            self._ring_phase(cross, mine, None, "allgather", deadline)
        self._ring_phase(local, buf, None, "allgather", deadline)

    def _test_any(self, requests):
        index, done = self.MPI.Request.Testany(requests)
        return index if done and index != self.MPI.UNDEFINED else None

    def _recursive_doubling(self, buf, reduce, deadline):
        """log2(p) pairwise exchanges of the whole buffer; ranks beyond a power of two fold in first (MPICH's way).

        Both partners of an exchange compute ``lower rank's value op higher rank's value``, so every rank
        ends with bit-identical results.
        """
        p, r = self.size, self.rank
        pof2 = 1 << (p.bit_length() - 1)
        rem = p - pof2
        tmp = np.empty_like(buf)
        what = "recursive-doubling allreduce"
        if r < 2 * rem:
            if r % 2 == 0:  # fold into the odd neighbour, then wait for the result
                self._wait([self.comm.Isend(buf, dest=r + 1, tag=11)], deadline, what)
                new_rank = -1
            else:
                self._wait([self.comm.Irecv(tmp, source=r - 1, tag=11)], deadline, what)
                reduce(tmp, buf, out=buf)  # (r - 1) op r
                new_rank = r // 2
        else:
            new_rank = r - rem
        if new_rank >= 0:
            mask = 1
            while mask < pof2:
                partner_new = new_rank ^ mask
                partner = partner_new * 2 + 1 if partner_new < rem else partner_new + rem
                self._exchange(buf, partner, tmp, partner, deadline, what)
                if partner < r:
                    reduce(tmp, buf, out=buf)
                else:
                    reduce(buf, tmp, out=buf)
                mask <<= 1
        if r < 2 * rem:
            if r % 2 == 0:
                self._wait([self.comm.Irecv(buf, source=r + 1, tag=12)], deadline, what)
            else:
                self._wait([self.comm.Isend(buf, dest=r - 1, tag=12)], deadline, what)

    # -- other collectives ----------------------------------------------------------------------
    def broadcast(self, array, root=0):
        """``array`` on every rank becomes root's (in place; MPI's Bcast). Shapes and dtypes must agree."""
        x = np.asarray(array)
        self._agree("broadcast", x.size, x.dtype, "sum", shape=x.shape)
        if not 0 <= root < self.size:
            raise ValueError(f"root={root} must be a rank in [0, {self.size})")
        self.comm.Bcast(x, root=root)
        return x

    def allgather(self, array):
        """Concatenate every rank's array along the first axis (their first dimensions may differ: allgatherv)."""
        x = np.ascontiguousarray(array)
        shapes = self.comm.allgather((x.shape, str(x.dtype)))
        if len({(s[1:], d) for s, d in shapes}) > 1:
            listing = "; ".join(f"rank {r}: {s} {d}" for r, (s, d) in enumerate(shapes))
            raise ValueError(f"allgather: trailing dimensions or dtypes differ across ranks ({listing})")
        counts = np.array([int(np.prod(s)) for s, _ in shapes], dtype=np.int64)
        out = np.empty(int(counts.sum()), dtype=x.dtype)
        self.comm.Allgatherv(x.reshape(-1), [out, counts])
        return out.reshape((sum(s[0] for s, _ in shapes) if x.ndim else len(shapes), *x.shape[1:]))

    def fused_allreduce(self, arrays, op="average", threshold_bytes=FUSION_THRESHOLD, compression=None,
                        on_wait=None):
        """Allreduce many small arrays packed into few buffers (tensor fusion); returns new arrays.

        Arrays of one dtype are packed in order into buffers of at most ``threshold_bytes`` (an array larger
        than that gets a buffer of its own). ``compression="fp16"`` sends float32/float64 as float16.
        ``on_wait`` is the first buffer's allreduce's (see :meth:`allreduce`): once it has passed its check,
        every rank is in the call.
        """
        if compression not in (None, "fp16"):
            raise ValueError(f"compression={compression!r} must be None or 'fp16'")
        arrays = [np.asarray(a) for a in arrays]
        results = [None] * len(arrays)
        groups = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype, []).append(i)
        for dtype in sorted(groups, key=str):  # the same order on every rank
            batch, size = [], 0
            for i in groups[dtype] + [None]:
                if i is not None and (not batch or size + arrays[i].nbytes <= threshold_bytes):
                    batch.append(i)
                    size += arrays[i].nbytes
                    continue
                if batch:
                    self._fused_batch(arrays, batch, results, op, compression, on_wait)
                    on_wait = None
                batch, size = ([i], arrays[i].nbytes) if i is not None else ([], 0)
        return results

    def _fused_batch(self, arrays, batch, results, op, compression, on_wait=None):
        dtype = arrays[batch[0]].dtype
        wire = np.dtype(np.float16) if compression == "fp16" and dtype in (np.float32, np.float64) else dtype
        if len(batch) == 1 and wire == dtype:  # one array: reduced straight into its result, no fusion buffer
            results[batch[0]] = self.allreduce(np.ascontiguousarray(arrays[batch[0]]), op=op, on_wait=on_wait)
            return
        buffer = np.concatenate([arrays[i].reshape(-1) for i in batch]).astype(wire, copy=False)
        self.allreduce(buffer, op=op, out=buffer, on_wait=on_wait)
        offset = 0
        for i in batch:  # the results are disjoint views of the new buffer (a copy only to undo compression)
            n = arrays[i].size
            results[i] = buffer[offset : offset + n].astype(dtype, copy=False).reshape(arrays[i].shape)
            offset += n

    def parameter_server_allreduce(self, array, op="average"):
        """The parameter-server pattern, for comparison: every worker sends to rank 0, which reduces and sends back.

        Rank 0's links carry (p-1) full buffers each way: its time grows with p, the ring's does not.
        """
        x = np.ascontiguousarray(array)
        self._agree("parameter_server_allreduce", x.size, x.dtype, op, shape=x.shape)
        out = x.copy()
        flat = out.reshape(-1)
        if self.rank == 0:
            tmp = np.empty_like(flat)
            for source in range(1, self.size):
                self.comm.Recv(tmp, source=source, tag=21)
                _REDUCE[op](flat, tmp, out=flat)
            if op == "average":
                self._divide(flat)
            for dest in range(1, self.size):
                self.comm.Send(flat, dest=dest, tag=22)
        else:
            self.comm.Send(flat, dest=0, tag=21)
            self.comm.Recv(flat, source=0, tag=22)
        return out


# ----------------------------------------------------------------------------------------------
# Keeping a job from hanging: the guard that hvd.init() and d4p.daalinit() hold

ENDED = -1  # a rank's note when it has ended (left Python); any other note is the number of a collective it reached
_NOTE_TAG = 31
_SYS_EXIT = sys.exit
_guard: JobGuard | None = None


class JobGuard:
    """Process-wide guard of an MPI job: no rank is left waiting for a peer that has failed or ended.

    While a client holds it (:func:`guard_job`; ``hvd.init()`` and ``d4p.daalinit()`` do): an uncaught
    exception, or ``sys.exit`` with a failure status, on any rank prints that rank's message and aborts the
    whole job (``MPI_Abort``); a rank that ends normally waits at exit until every rank has ended, and aborts
    the job if they have not within ``WORKSHOP_HVD_EXIT_TIMEOUT`` seconds (default 300), since they may be
    waiting for it. (A rank killed by a signal ends the job through ``mpiexec`` itself.)

    Ranks also send each other small notes on a communicator of their own: the number of the collective
    a rank has reached (:meth:`arrive`), and ``ENDED`` when it leaves. :meth:`poll` reads them, so a rank
    waiting for a collective knows which peers have not arrived and which have already ended: that is
    ``hvd``'s stall inspector.
    """

    def __init__(self, world):
        self.world = world
        self.comm = world.Dup()  # its notes never match a message or collective of the program
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.reached = np.zeros(self.size, dtype=np.int64)  # the last note of every rank
        self.highest = np.zeros(self.size, dtype=np.int64)  # the highest collective every rank has reached (its
        # note ENDED does not undo that: a peer may complete a collective and end before this rank sees it complete)
        self.users = set()
        self.previous_excepthook = self.previous_exit = None
        self.exit_status = None
        self._inbox = np.zeros((self.size, 1), dtype=np.int64)
        self._recvs = {peer: self._listen(peer) for peer in range(self.size) if peer != self.rank}
        self._sends = []
        self._ended = False
        atexit.register(self._at_exit)

    # -- notes ----------------------------------------------------------------------------------
    def _listen(self, peer):
        return self.comm.Irecv(self._inbox[peer], source=peer, tag=_NOTE_TAG)

    def _note(self, value):
        for peer in self._recvs:
            buf = np.array([value], dtype=np.int64)
            self._sends.append((buf, self.comm.Isend(buf, dest=peer, tag=_NOTE_TAG)))
        self.reached[self.rank] = value
        self.highest[self.rank] = max(self.highest[self.rank], value)

    def arrive(self, collective):
        """Tell every peer that this rank has reached collective number ``collective`` (1, 2, ...)."""
        self._note(collective)

    def poll(self):
        """Read the notes that have arrived; returns ``reached``, each rank's last note (``ENDED`` once it has ended)."""
        for peer in list(self._recvs):
            while self._recvs[peer].Test():  # notes from one peer arrive in order (MPI's non-overtaking rule)
                note = self.reached[peer] = self._inbox[peer, 0]
                self.highest[peer] = max(self.highest[peer], note)
                self._recvs[peer] = self._listen(peer)
        if self._sends:
            self._sends = [(buf, request) for buf, request in self._sends if not request.Test()]
        return self.reached

    def say(self, lines):
        """Write ``lines`` to stderr, each tagged with this rank."""
        sys.stderr.write("".join(f"[rank {self.rank}] {line}\n" for line in lines))
        sys.stderr.flush()

    def abort(self, lines, status=1):
        """Print ``lines`` (tagged with the rank) and end the whole job with ``MPI_Abort``."""
        self.say(lines)
        sys.stdout.flush()
        # mpiexec's I/O forwarder reads our pipes asynchronously, and MPI_Abort tears the job down at once:
        # give it a moment so that the message reaches the user
        time.sleep(0.5)
        self.world.Abort(status)

    # -- the hooks ------------------------------------------------------------------------------
    def hold(self, user):
        """Install the hooks (on the first hold) on behalf of ``user`` (a name)."""
        if not self.users:
            self.previous_excepthook, self.previous_exit = sys.excepthook, sys.exit
            sys.excepthook = self._abort_on_uncaught_exception
            sys.exit = self._exit_recording_status
        self.users.add(user)

    def release(self, user):
        """``user`` lets go; when nobody holds the guard, the hooks are restored (notes still flow)."""
        self.users.discard(user)
        if self.users:
            return
        if sys.excepthook == self._abort_on_uncaught_exception:
            sys.excepthook = self.previous_excepthook
        if sys.exit == self._exit_recording_status:
            sys.exit = self.previous_exit

    def _abort_on_uncaught_exception(self, exc_type, exc, tb):
        """sys.excepthook while held: print the traceback tagged with the rank, then abort every rank."""
        if self.size == 1:
            (self.previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        self.abort(text.rstrip().splitlines() + [
            f"uncaught {exc_type.__name__} on rank {self.rank} of {self.size}: aborting the whole job "
            "(MPI_Abort) so that no rank waits for ever"])

    def _exit_recording_status(self, status=None):
        """sys.exit while held: remembers the status, so that the exit handler knows a failure from a normal end."""
        self.exit_status = status
        (self.previous_exit or _SYS_EXIT)(status)

    def _at_exit(self):
        """Tell the peers this rank has ended; while held, first abort on a failure status, then wait for them."""
        if self._ended:
            return
        self._ended = True
        r, n, status = self.rank, self.size, self.exit_status
        held = bool(self.users) and n > 1
        if held and status not in (None, 0):
            self.abort([f"sys.exit({status!r}) on rank {r} of {n}: aborting the whole job (MPI_Abort) so that no "
                        "rank waits for ever"], status if isinstance(status, int) else 1)
        self._note(ENDED)
        if held:
            timeout = float(os.environ.get("WORKSHOP_HVD_EXIT_TIMEOUT", "300"))
            deadline = time.monotonic() + timeout
            while (self.poll() != ENDED).any():
                if time.monotonic() > deadline:
                    self.abort([f"rank {r} of {n} has ended, but not every rank has ended within {timeout:g} s; they "
                                "may be waiting for this rank in a collective: aborting the whole job (MPI_Abort). "
                                "Set WORKSHOP_HVD_EXIT_TIMEOUT to wait longer."])
                time.sleep(0.002)
        deadline = time.monotonic() + 1.0  # the last notes are tiny (sent eagerly): they leave at once
        while self._sends and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)
        for request in self._recvs.values():  # MPI_Finalize wants no pending receive
            request.Cancel()
            request.Wait()


def guard_job(user, comm=None):
    """Hold the process-wide :class:`JobGuard` for ``user``, creating it on ``comm`` (default ``MPI.COMM_WORLD``).

    Creating it is collective (every rank calls this at the same point, as ``hvd.init()``); later calls return
    the same guard, on the communicator of the first call.
    """
    global _guard
    if _guard is None:
        from mpi4py import MPI

        _guard = JobGuard(comm if comm is not None else MPI.COMM_WORLD)
    _guard.hold(user)
    return _guard


def release_job(user):
    """``user`` no longer holds the guard (see :meth:`JobGuard.release`)."""
    if _guard is not None:
        _guard.release(user)
