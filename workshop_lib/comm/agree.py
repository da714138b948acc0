"""The cross-rank check: every rank learns whether all ranks called a collective alike, in one exchange.

Each rank's call (collective, count, dtype, op, algorithm, shape, an error flag) is a header of int64 (x, -x)
pairs; recursive doubling merges the headers under max, so after log2 p exchanges every rank holds the maximum and
the minimum of every field: if they differ anywhere, every rank raises the same ValueError (never a hang, never
garbage). A small allreduce travels behind the header in the same messages (its data reduced on the way while the
headers agree), as NCCL and Horovod's response cache avoid a separate negotiation; and a call like an earlier one
runs a plan with its decisions taken (:meth:`CrossRankCheck._fold_plan`, the 2-rank step written out once).

:class:`CrossRankCheck` is mixed into :class:`workshop_lib.comm.Communicator`, whose ``comm``, ``rank``, ``size``,
``wait`` and ``divide`` it uses.
"""

from __future__ import annotations

import math

import numpy as np

from .. import job

OPS = ("sum", "average", "min", "max")
DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int32, np.int64))
ALGORITHMS = ("auto", "ring", "recursive_doubling", "shared_memory", "hierarchical")
REDUCE = {"sum": np.add, "average": np.add, "min": np.minimum, "max": np.maximum}
FOLD_BYTES = 64 * 1024  # an allreduce by recursive doubling up to this size travels inside its check's messages
_DTYPE_CODES = {d: i for i, d in enumerate(DTYPES)}
_COLLECTIVES = ("allreduce", "broadcast", "parameter_server_allreduce")
_HEADER_FIELDS = 8  # the check compares collective, count, dtype, op, algorithm, ndim, a code of the shape, an error
_HEADER_BYTES = 2 * _HEADER_FIELDS * 8  # (x, -x) pairs of int64
_TAG_CHECK, _TAG_FOLD_IN, _TAG_FOLD_OUT = 41, 42, 43


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


class CrossRankCheck:
    """The check's buffers and messages (a mixin of ``Communicator``; see the module's docstring)."""

    def _init_check(self):
        """The check's messages: a header, then (small allreduces) the data; no message is longer."""
        self._check_send = np.zeros(_HEADER_BYTES + FOLD_BYTES, dtype=np.uint8)
        self._check_recv = np.zeros(_HEADER_BYTES + FOLD_BYTES, dtype=np.uint8)
        self._send_header = self._check_send[:_HEADER_BYTES].view(np.int64)
        self._recv_header = self._check_recv[:_HEADER_BYTES].view(np.int64)
        self._check_status = self.MPI.Status()
        self._headers, self._check_plans, self._header_sent = {}, {}, None
        self._fast = {}  # (shape, dtype, op, algorithm) -> the plan of a small checked allreduce (see _fold_plan)

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
            self.wait(requests, deadline, f"{name}'s cross-rank check", statuses=statuses)
        return statuses[0].Get_count(self.MPI.BYTE) if source is not None else 0

    def _watch(self, requests, statuses, on_wait):
        """Wait for MPI requests, calling ``on_wait()`` (the job's stall inspector) as :func:`job.wait` does."""
        job.wait(lambda: self.MPI.Request.Testall(requests, statuses), on_wait, spin=not self.oversubscribed)

    def _fold_plan(self, shape, dtype, op, algorithm):
        """A small allreduce of ``shape`` and ``dtype`` inside its check's messages, with everything decided once.

        The check itself still runs every time (one exchange per step, the header in front of the data), so a
        rank that calls differently still makes every rank raise; only the local decisions (validation, which
        algorithm, the header, the buffers) are kept from the first call.
        """
        key = ("allreduce", shape, dtype, op, algorithm)
        header = self._headers.get(key) or _header(*key)
        reduce, finish, count = REDUCE[op], self.divide if op == "average" else None, math.prod(shape)
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
