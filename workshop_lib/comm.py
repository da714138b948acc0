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

Shapes: a buffer of n elements is split into p contiguous chunks whose sizes
differ by at most one (:func:`_chunk_bounds`), so any n works, 0 and n < p included.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import placement

__all__ = ["OPS", "DTYPES", "ALGORITHMS", "SMALL_BYTES", "SHM_MIN_BYTES", "SHM_MAX_BYTES", "FUSION_THRESHOLD",
           "Communicator", "CollectiveTimeout", "ring_schedule", "simulate_ring"]

OPS = ("sum", "average", "min", "max")
DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int32, np.int64))
_DTYPE_CODES = {d: i for i, d in enumerate(DTYPES)}
SMALL_BYTES = 32 * 1024  # below this, recursive doubling (latency); above, the ring (bandwidth)
SEGMENT_BYTES = 1 << 20  # the ring moves large chunks in segments, reducing one while the next arrives
FUSION_THRESHOLD = 64 * 1024 * 1024  # like HOROVOD_FUSION_THRESHOLD
SHM_BLOCK_BYTES = 1 << 20  # the shared-memory algorithm works in blocks of this size per rank
SHM_MIN_BYTES = 8 * 1024  # from this size ...
SHM_MAX_BYTES = 8 * 1024 * 1024  # ... to this one, ranks that share a node use the shared-memory algorithm

_REDUCE = {"sum": np.add, "average": np.add, "min": np.minimum, "max": np.maximum}
ALGORITHMS = ("auto", "ring", "recursive_doubling", "shared_memory")


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

    def __init__(self, comm, block_bytes):
        from mpi4py import MPI

        self.comm = comm
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        same_node = node.Get_size() == comm.Get_size()
        node.Free()
        self.ok = same_node
        if not same_node:  # every rank sees the same node sizes only if all share one node: decided together
            return
        self.block = int(block_bytes)
        # more ranks than cores (the union of their CPU affinities): ranks get descheduled, and the ring's
        # 2(p-1) neighbour-to-neighbour steps suffer most; then shared memory pays at every size
        cpus = comm.allgather(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else list(range(os.cpu_count() or 1)))
        self.oversubscribed = comm.Get_size() > len(set().union(*map(set, cpus)))
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

    def allreduce(self, src, dst, reduce, first_sync=None):
        """dst = reduction over ranks of src (flat arrays; may be the same array), block by block.

        ``first_sync`` (the cross-rank check, a collective) replaces the first barrier.
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
                mine[lo:hi] = out
            self._sync()
            for _, a, b, chunk in others:  # everyone's reduced chunk, read straight from their slots
                dst[start + a : start + b] = chunk


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
        Segment size of the ring's pipelining.
    timeout : float, optional
        Default timeout in seconds for every collective (None waits forever). Collectives with a timeout
        use the message-based algorithms (a barrier on shared memory cannot time out).
    shared_memory : bool
        Use the shared-memory algorithm when all ranks share a node (default; ``WORKSHOP_COMM_SHM=0`` turns
        it off). Creating a Communicator is then collective: every rank must create it.
    shm_min_bytes, shm_max_bytes : int
        "auto" takes the shared-memory algorithm for messages of at least ``shm_min_bytes`` and less than
        ``shm_max_bytes``. Below, one recursive-doubling exchange is quicker than two barriers; above, MPI's
        large-message transport makes the pipelined ring quicker (measured with benchmarks/allreduce_bench.py),
        except when there are more ranks than cores: then shared memory wins at every size, and the default
        (None) means no upper limit in that case, ``SHM_MAX_BYTES`` otherwise.
    """

    def __init__(self, comm=None, small_bytes=SMALL_BYTES, segment_bytes=SEGMENT_BYTES, timeout=None,
                 shared_memory=True, shm_block_bytes=SHM_BLOCK_BYTES, shm_min_bytes=SHM_MIN_BYTES,
                 shm_max_bytes=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        placement.place(self.comm)  # each rank's share of the node's cores, decided once per process
        self.small_bytes, self.segment_bytes, self.timeout = small_bytes, segment_bytes, timeout
        self.shm_min_bytes, self.shm_max_bytes = shm_min_bytes, shm_max_bytes
        self._meta = np.empty(8, dtype=np.int64)  # the cross-rank check's buffer
        self._window = None
        if shared_memory and self.size > 1 and os.environ.get("WORKSHOP_COMM_SHM", "1") != "0":
            self._window = _SharedWindow(self.comm, shm_block_bytes)
            if not self._window.ok:
                self._window = None
        if shm_max_bytes is None:
            oversubscribed = self._window is not None and self._window.oversubscribed
            self.shm_max_bytes = float("inf") if oversubscribed else SHM_MAX_BYTES

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
    def _agree(self, name, count, dtype, op, algorithm=None):
        """Every rank learns whether all ranks called ``name`` with the same count, dtype, op and algorithm.

        One tiny Allreduce of (x, -x) pairs under MAX gives both the maximum and the minimum of every
        field: if they differ anywhere, every rank raises the same error (never a hang, never garbage).
        """
        dtype_code = _DTYPE_CODES.get(dtype, -1)
        op_code = OPS.index(op) if op in OPS else -1
        algorithm_code = ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else 0
        meta = self._meta
        meta[0], meta[1], meta[2], meta[3] = count, dtype_code, op_code, algorithm_code
        np.negative(meta[:4], out=meta[4:])
        self.comm.Allreduce(self.MPI.IN_PLACE, meta, op=self.MPI.MAX)
        if (meta[:4] == -meta[4:]).all() and dtype_code >= 0 and op_code >= 0:
            return
        calls = self.comm.allgather((int(count), str(dtype), op, algorithm))
        listing = "; ".join(f"rank {r}: {n} x {d}, op={o}" + (f", algorithm={a}" if a else "")
                            for r, (n, d, o, a) in enumerate(calls))
        problems = []
        if len({c[0] for c in calls}) > 1:
            problems.append("sizes differ")
        if len({c[1] for c in calls}) > 1:
            problems.append("dtypes differ")
        if len({c[2] for c in calls}) > 1:
            problems.append("ops differ")
        if len({c[3] for c in calls}) > 1 and len({c[0] for c in calls}) == 1:
            problems.append("algorithms differ")
        if any(np.dtype(c[1]) not in DTYPES for c in calls):
            problems.append(f"dtypes must be one of {[d.name for d in DTYPES]}")
        if any(c[2] not in OPS for c in calls):
            problems.append(f"op must be one of {OPS}")
        raise ValueError(f"{name}: {', '.join(problems)} across ranks ({listing})")

    def _wait(self, requests, deadline, what):
        """Wait for MPI requests, or raise CollectiveTimeout when the deadline passes."""
        if deadline is None:
            self.MPI.Request.Waitall(requests)
            return
        while not self.MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                for request in requests:
                    try:
                        request.Cancel()
                    except Exception:  # noqa: BLE001 - best effort; the job is in trouble anyway
                        pass
                raise CollectiveTimeout(f"{what} on rank {self.rank} did not complete in time: a peer may have "
                                        "crashed, be stuck, or not have called it")
            time.sleep(0)

    def _exchange(self, send, dest, recv, source, deadline, what):
        if deadline is None:  # one blocking call: the lowest latency (small messages are latency-bound)
            self.comm.Sendrecv(send, dest, 7, recv, source, 7)
            return
        requests = [self.comm.Irecv(recv, source=source, tag=7), self.comm.Isend(send, dest=dest, tag=7)]
        self._wait(requests, deadline, what)

    # -- allreduce ------------------------------------------------------------------------------
    def allreduce(self, array, op="average", out=None, algorithm="auto", timeout=None, check=True):
        """Reduce ``array`` over all ranks; every rank gets the result.

        Parameters
        ----------
        array : numpy array of float16/32/64 or int32/64, any shape, same size on every rank
        op : {"sum", "average", "min", "max"}
            ``"average"`` divides the sum by the number of ranks (integer division for integers).
        out : array, optional
            Where to write (may be ``array`` itself: in place). Default: a new array.
        algorithm : {"auto", "ring", "recursive_doubling", "shared_memory"}
            ``"auto"``: shared memory when the ranks share a node and the message is mid-sized (see
            ``shm_min_bytes``), else recursive doubling below ``small_bytes`` and the ring above.
        timeout : float, optional
            Seconds; overrides the communicator's default.
        check : bool
            Verify first that every rank passed the same size, dtype and op (one tiny allreduce).
        """
        x = np.asarray(array)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} must be one of {ALGORITHMS}")
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if algorithm == "shared_memory" and self.size > 1 and (self._window is None or deadline is not None):
            raise ValueError("algorithm='shared_memory' needs all ranks on one node and no timeout")
        shm = self._window is not None and deadline is None and x.size > 0 and (
            algorithm == "shared_memory" or (algorithm == "auto" and self.shm_min_bytes <= x.nbytes < self.shm_max_bytes))
        # The shared-memory algorithm does the check in its first synchronisation: on every rank the first
        # collective call is then the same tiny Allreduce, whichever algorithm each rank chose.
        if not shm and self.size > 1 and x.size and algorithm in ("auto", "shared_memory"):
            algorithm = self.message_algorithm(x)
        if check and not shm:
            self._agree("allreduce", x.size, x.dtype, op, algorithm)
        elif not check and (x.dtype not in DTYPES or op not in OPS):
            raise ValueError(f"allreduce: dtype {x.dtype} / op {op!r} not supported")
        if out is None:
            out = np.empty(x.shape, dtype=x.dtype) if shm else np.array(x, copy=True, order="C")
        elif out is not x:
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; expected {x.shape}, {x.dtype}")
            if not shm:
                np.copyto(out, x)
        if not out.flags.c_contiguous:
            raise ValueError("allreduce works on C-contiguous arrays; pass np.ascontiguousarray(array)")
        flat = out.reshape(-1)
        if shm:  # reads x straight into the window: no copy into out first
            self._window.allreduce(x.reshape(-1), flat, _REDUCE.get(op), (lambda: self._agree(
                "allreduce", x.size, x.dtype, op, "shared_memory")) if check else None)
        elif self.size > 1 and flat.size:
            if algorithm == "ring":
                self._ring(flat, _REDUCE[op], deadline)
            else:
                self._recursive_doubling(flat, _REDUCE[op], deadline)
        if op == "average" and self.size > 1:
            if np.issubdtype(flat.dtype, np.integer):
                np.floor_divide(flat, self.size, out=flat)
            else:
                np.divide(flat, self.size, out=flat)
        return out

    def message_algorithm(self, array):
        """The message-based algorithm "auto" takes for ``array`` off shared memory: latency- or bandwidth-bound."""
        return "ring" if array.nbytes >= self.small_bytes and array.size >= self.size else "recursive_doubling"

    def _ring(self, buf, reduce, deadline):
        """Reduce-scatter then allgather around the ring; chunk k ends reduced on rank (k - 1) mod p ... then everywhere."""
        p, r = self.size, self.rank
        right, left = (r + 1) % p, (r - 1) % p
        bounds = _chunk_bounds(buf.size, p)
        chunks = [buf[bounds[i] : bounds[i + 1]] for i in range(p)]
        tmp = np.empty(max(len(c) for c in chunks), dtype=buf.dtype)
        segment = max(1, self.segment_bytes // buf.itemsize)
        # reduce-scatter: after p-1 steps, rank r holds the full reduction of chunk (r + 1) mod p
        for step in range(p - 1):
            send, recv = (chunks[i] for i in _ring_chunks("reduce-scatter", step, r, p))
            incoming = tmp[: len(recv)]
            if len(send) <= segment and len(recv) <= segment:
                self._exchange(send, right, incoming, left, deadline, "ring allreduce")
                reduce(recv, incoming, out=recv)
                continue
            # pipelined: post every segment, reduce each one as it arrives while the others are in flight
            sends = [self.comm.Isend(send[i : i + segment], dest=right, tag=100 + k)
                     for k, i in enumerate(range(0, len(send), segment))]
            recvs = [self.comm.Irecv(incoming[i : i + segment], source=left, tag=100 + k)
                     for k, i in enumerate(range(0, len(recv), segment))]
            pending = list(range(len(recvs)))
            while pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveTimeout(f"ring allreduce on rank {r} did not complete in time")
                index = self.MPI.Request.Waitany([recvs[k] for k in pending]) if deadline is None else \
                    self._test_any([recvs[k] for k in pending])
                if index is None:
                    continue
                k = pending.pop(index)
                i = k * segment
                reduce(recv[i : i + segment], incoming[i : i + segment], out=recv[i : i + segment])
            self._wait(sends, deadline, "ring allreduce")
        # allgather: pass the reduced chunks around so that every rank has all of them
        for step in range(p - 1):
            send, recv = (chunks[i] for i in _ring_chunks("allgather", step, r, p))
            self._exchange(send, right, recv, left, deadline, "ring allgather")

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
        self._agree("broadcast", x.size, x.dtype, "sum")
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

    def fused_allreduce(self, arrays, op="average", threshold_bytes=FUSION_THRESHOLD, compression=None):
        """Allreduce many small arrays packed into few buffers (tensor fusion); returns new arrays.

        Arrays of one dtype are packed in order into buffers of at most ``threshold_bytes`` (an array larger
        than that gets a buffer of its own). ``compression="fp16"`` sends float32/float64 as float16.
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
                    self._fused_batch(arrays, batch, results, op, compression)
                batch, size = ([i], arrays[i].nbytes) if i is not None else ([], 0)
        return results

    def _fused_batch(self, arrays, batch, results, op, compression):
        dtype = arrays[batch[0]].dtype
        wire = np.dtype(np.float16) if compression == "fp16" and dtype in (np.float32, np.float64) else dtype
        buffer = np.concatenate([arrays[i].reshape(-1) for i in batch]).astype(wire, copy=False)
        self.allreduce(buffer, op=op, out=buffer)
        offset = 0
        for i in batch:
            n = arrays[i].size
            results[i] = buffer[offset : offset + n].astype(dtype).reshape(arrays[i].shape)
            offset += n

    def parameter_server_allreduce(self, array, op="average"):
        """The parameter-server pattern, for comparison: every worker sends to rank 0, which reduces and sends back.

        Rank 0's links carry (p-1) full buffers each way: its time grows with p, the ring's does not.
        """
        x = np.ascontiguousarray(array)
        self._agree("parameter_server_allreduce", x.size, x.dtype, op)
        out = x.copy()
        flat = out.reshape(-1)
        if self.rank == 0:
            tmp = np.empty_like(flat)
            for source in range(1, self.size):
                self.comm.Recv(tmp, source=source, tag=21)
                _REDUCE[op](flat, tmp, out=flat)
            if op == "average":
                if np.issubdtype(flat.dtype, np.integer):
                    np.floor_divide(flat, self.size, out=flat)
                else:
                    np.divide(flat, self.size, out=flat)
            for dest in range(1, self.size):
                self.comm.Send(flat, dest=dest, tag=22)
        else:
            self.comm.Send(flat, dest=0, tag=21)
            self.comm.Recv(flat, source=0, tag=22)
        return out
