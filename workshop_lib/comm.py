"""Collectives for data-parallel training, on mpi4py: ring allreduce and its relatives.

Mirrors the ring of Baidu's allreduce, Horovod and NCCL. The one idea: in a
ring every rank sends and receives 2(p-1)/p of the buffer, whatever the
number of ranks p, so the time of an allreduce stops growing with p; small
messages instead are latency-bound, and recursive doubling (log2 p exchanges)
wins there, as MPI libraries and NCCL switch algorithms by size.

Every byte moves through MPI (``Sendrecv``, ``Isend``/``Irecv``, ``Bcast``,
``Allgatherv``) on numpy buffers; nothing is pickled but small metadata.
mpi4py is imported when a Communicator is created, never at import.

Shapes: a buffer of n elements is split into p contiguous chunks for the ring
(``np.array_split`` boundaries), so any n works, 0 and n < p included.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["OPS", "DTYPES", "SMALL_BYTES", "FUSION_THRESHOLD", "Communicator", "CollectiveTimeout", "ring_schedule",
           "simulate_ring"]

OPS = ("sum", "average", "min", "max")
DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int32, np.int64))
SMALL_BYTES = 32 * 1024  # below this, recursive doubling (latency); above, the ring (bandwidth)
SEGMENT_BYTES = 1 << 20  # the ring moves large chunks in segments, reducing one while the next arrives
FUSION_THRESHOLD = 64 * 1024 * 1024  # like HOROVOD_FUSION_THRESHOLD

_REDUCE = {"sum": np.add, "average": np.add, "min": np.minimum, "max": np.maximum}


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
    bounds = np.linspace(0, buffers[0].size, p + 1).astype(np.int64)
    chunk = [slice(bounds[i], bounds[i + 1]) for i in range(p)]
    counts = np.ones((p, p), dtype=np.int64)
    states, contributions = [[b.copy() for b in buffers]], [counts.copy()]
    for phase, _, transfers in ring_schedule(p):
        sent = [(src, dst, c, buffers[src][chunk[c]].copy(), counts[src, c]) for src, dst, c in transfers]
        for src, dst, c, data, count in sent:  # all ranks send at once, then all receive
            if phase == "reduce-scatter":
                buffers[dst][chunk[c]] += data
                counts[dst, c] += count
            else:
                buffers[dst][chunk[c]] = data
                counts[dst, c] = count
        states.append([b.copy() for b in buffers])
        contributions.append(counts.copy())
    return states, contributions


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
        Default timeout in seconds for every collective (None waits forever).
    """

    def __init__(self, comm=None, small_bytes=SMALL_BYTES, segment_bytes=SEGMENT_BYTES, timeout=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.small_bytes, self.segment_bytes, self.timeout = small_bytes, segment_bytes, timeout

    # -- safety ---------------------------------------------------------------------------------
    def _agree(self, name, count, dtype, op):
        """Every rank learns whether all ranks called ``name`` with the same count, dtype and op.

        One tiny Allreduce of (x, -x) pairs under MAX gives both the maximum and the minimum of every
        field: if they differ anywhere, every rank raises the same error (never a hang, never garbage).
        """
        dtype_code = DTYPES.index(dtype) if dtype in DTYPES else -1
        meta = np.array([count, dtype_code, OPS.index(op) if op in OPS else -1], dtype=np.int64)
        both = np.concatenate([meta, -meta])
        out = np.empty_like(both)
        self.comm.Allreduce(both, out, op=self.MPI.MAX)
        if np.array_equal(out[:3], -out[3:]) and dtype_code >= 0 and meta[2] >= 0:
            return
        calls = self.comm.allgather((int(count), str(dtype), op))
        listing = "; ".join(f"rank {r}: {n} x {d}, op={o}" for r, (n, d, o) in enumerate(calls))
        problems = []
        if len({c[0] for c in calls}) > 1:
            problems.append("sizes differ")
        if len({c[1] for c in calls}) > 1:
            problems.append("dtypes differ")
        if len({c[2] for c in calls}) > 1:
            problems.append("ops differ")
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
        algorithm : {"auto", "ring", "recursive_doubling"}
        timeout : float, optional
            Seconds; overrides the communicator's default.
        check : bool
            Verify first that every rank passed the same size, dtype and op (one tiny allreduce).
        """
        x = np.asarray(array)
        if check:
            self._agree("allreduce", x.size, x.dtype, op)
        elif x.dtype not in DTYPES or op not in OPS:
            raise ValueError(f"allreduce: dtype {x.dtype} / op {op!r} not supported")
        if algorithm not in ("auto", "ring", "recursive_doubling"):
            raise ValueError(f"algorithm={algorithm!r} must be 'auto', 'ring' or 'recursive_doubling'")
        if out is None:
            out = np.array(x, copy=True, order="C")
        elif out is not x:
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; expected {x.shape}, {x.dtype}")
            np.copyto(out, x)
        if not out.flags.c_contiguous:
            raise ValueError("allreduce works on C-contiguous arrays; pass np.ascontiguousarray(array)")
        flat = out.reshape(-1)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.size > 1 and flat.size:
            if algorithm == "auto":
                algorithm = "ring" if flat.nbytes >= self.small_bytes and flat.size >= self.size else \
                    "recursive_doubling"
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

    def _ring(self, buf, reduce, deadline):
        """Reduce-scatter then allgather around the ring; chunk k ends reduced on rank (k - 1) mod p ... then everywhere."""
        p, r = self.size, self.rank
        right, left = (r + 1) % p, (r - 1) % p
        bounds = np.linspace(0, buf.size, p + 1).astype(np.int64)  # the np.array_split boundaries
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
