"""The ring allreduce (Baidu's, Horovod's, NCCL's) and the ring of rings across nodes.

In a ring every rank sends and receives 2(p-1)/p of the buffer, whatever the number of ranks p, so the time of an
allreduce stops growing with p. A buffer of n elements is split into p contiguous chunks whose sizes differ by at
most one (:func:`chunk_bounds`). Reduce-scatter: at each of p-1 steps a partial sum arrives from the left, gets
this rank's own values added, and goes on to the right; then rank r holds the full reduction of chunk (r + 1) mod p.
Allgather: the reduced chunks travel once more round the ring. :func:`ring_schedule` lists the steps and
:func:`simulate_ring` runs them in one process (lab 03 draws it); :func:`ring_allreduce` is the real thing, on
MPI messages. Across nodes, :func:`hierarchical_allreduce` (``HOROVOD_HIERARCHICAL_ALLREDUCE``) runs a ring inside
each node, a ring among the ranks with the same local rank on every node, and a ring inside each node again.

The functions take ``c``, the :class:`workshop_lib.comm.Communicator` (its ``comm``, ``wait``, ``exchange``,
``scratch``, ``test_any`` and ``segment_bytes``).
"""

from __future__ import annotations


import numpy as np

from .. import job

__all__ = ["chunk_bounds", "ring_chunks", "ring_schedule", "simulate_ring", "ring_allreduce", "ring_phase",
           "hierarchical_allreduce"]


def chunk_bounds(n, p):
    """The p + 1 boundaries of p contiguous chunks of n elements (sizes differ by at most one), as ints.

    Parameters
    ----------
    n : int
        Elements of the buffer.
    p : int
        Chunks (ranks).

    Returns
    -------
    list of int
        ``p + 1`` boundaries: chunk i is ``[bounds[i], bounds[i + 1])``.
    """
    return [int(b) for b in np.linspace(0, n, p + 1).astype(np.int64)]


def ring_chunks(phase, step, rank, size):
    """(chunk sent to the right, chunk received from the left) by ``rank`` at ``step`` of ``phase``.

    Reduce-scatter: after p-1 steps rank r holds the full reduction of chunk (r + 1) mod p. Allgather: those
    reduced chunks travel once round the ring. The communicator's ring and :func:`simulate_ring` both use this.

    Parameters
    ----------
    phase : {"reduce-scatter", "allgather"}
    step : int
        0 .. size - 2.
    rank, size : int

    Returns
    -------
    tuple of int
        (the chunk this rank sends, the chunk it receives).
    """
    shift = 0 if phase == "reduce-scatter" else 1
    return (rank - step + shift) % size, (rank - step - 1 + shift) % size


def ring_schedule(size):
    """The ring allreduce's 2(p-1) steps: ``[(phase, step, [(source, dest, chunk), ...]), ...]``.

    Parameters
    ----------
    size : int
        Ranks in the ring.

    Returns
    -------
    list
        One ``(phase, step, transfers)`` per step, each transfer ``(source, dest, chunk)``.
    """
    return [(phase, step, [(r, (r + 1) % size, ring_chunks(phase, step, r, size)[0]) for r in range(size)])
            for phase in ("reduce-scatter", "allgather") for step in range(size - 1)]


def simulate_ring(values):
    """Run the ring allreduce's schedule on a list of p equal-length arrays, one per simulated rank, in one process.

    Returns ``(states, contributions)``: for each step (and the start), every rank's buffer, and a (p, p) array of
    how many ranks' data is summed into each (rank, chunk). At the end every rank holds the sum, and every count
    is p. Used to draw the algorithm; the real thing is :meth:`Communicator.allreduce`.

    Parameters
    ----------
    values : list of array_like
        One equal-length array per simulated rank.

    Returns
    -------
    states : list
        For the start and each step, every rank's buffer (float64 copies).
    contributions : list of numpy.ndarray
        For the start and each step, the (p, p) counts of ranks summed into each (rank, chunk).
    """
    p = len(values)
    buffers = [np.array(v, dtype=np.float64).reshape(-1) for v in values]
    if len({b.size for b in buffers}) != 1:
        raise ValueError(f"values must have equal sizes, got {[b.size for b in buffers]}")
    bounds = chunk_bounds(buffers[0].size, p)
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


def ring_allreduce(c, src, dst, reduce, deadline, finish=None):
    """dst = the reduction of every rank's src: reduce-scatter then allgather round the ring.

    Chunk k ends reduced on rank (k - 1) mod p, then goes to every rank. ``src`` is only read (it is sent at
    the first step and reduced into each chunk as it arrives), so no copy of it is made first; ``dst`` may
    be ``src`` itself (then the incoming chunks land in a reused scratch buffer). ``finish`` (the average's
    division) is applied to the one chunk this rank completes, before the allgather sends it on.

    Parameters
    ----------
    c : Communicator
        The communicator whose ``comm``, ``wait``, ``exchange`` and ``scratch`` the algorithm uses.
    src : numpy.ndarray
        This rank's flat values (only read).
    dst : numpy.ndarray
        Flat output, ``src``'s size and dtype (may be ``src`` itself).
    reduce : numpy ufunc
        ``np.add``, ``np.minimum`` or ``np.maximum``, called with ``out=``.
    deadline : float or None
        A ``time.monotonic()`` time, or None to wait for ever.
    finish : callable, optional
        Applied in place to the chunk this rank completes (the average's division).
    """
    p, r = c.size, c.rank
    right, left = (r + 1) % p, (r - 1) % p
    bounds = chunk_bounds(dst.size, p)
    sources = [src[bounds[i] : bounds[i + 1]] for i in range(p)]
    chunks = [dst[bounds[i] : bounds[i + 1]] for i in range(p)]
    in_place = np.may_share_memory(src, dst)
    scratch = c.scratch(dst.dtype, bounds[1] - bounds[0] + 1) if in_place else None
    segment = max(1, c.segment_bytes // dst.itemsize)
    # reduce-scatter: at each step a partial sum arrives from the left, gets this rank's own values added,
    # and is sent on at the next step; after p-1 steps rank r holds the full reduction of chunk (r + 1) mod p
    for step in range(p - 1):
        sent, got = ring_chunks("reduce-scatter", step, r, p)
        send, mine, acc = (sources[sent] if step == 0 else chunks[sent]), sources[got], chunks[got]
        incoming = scratch[: len(acc)] if in_place else acc
        if deadline is None and (len(send) <= segment and len(acc) <= segment or p == 2):
            # one message: MPI's large-message transport copies it once; pipelining in segments costs more
            # handshakes than it overlaps (measured with benchmarks/allreduce_bench.py)
            c.comm.Sendrecv(send, right, 9, incoming, left, 9)
            reduce(incoming, mine, out=acc)
            continue
        # segments: each one is reduced as it arrives while the others are in flight (and a timeout is honoured)
        starts = range(0, len(acc), segment)
        recvs = [c.comm.Irecv(incoming[i : i + segment], source=left, tag=100 + k) for k, i in enumerate(starts)]
        sends = [c.comm.Isend(send[i : i + segment], dest=right, tag=100 + k)
                 for k, i in enumerate(range(0, len(send), segment))]
        pending, arrived = list(range(len(recvs))), [None]

        def any_arrived():
            arrived[0] = c.test_any([recvs[k] for k in pending])
            return arrived[0] is not None

        while pending:
            if deadline is None:
                index = c.MPI.Request.Waitany([recvs[k] for k in pending])
            elif job.wait(any_arrived, spin=not c.oversubscribed, deadline=deadline):
                index = arrived[0]
            else:
                raise job.CollectiveTimeout(f"ring allreduce on rank {r} did not complete in time")
            i = pending.pop(index) * segment
            reduce(incoming[i : i + segment], mine[i : i + segment], out=acc[i : i + segment])
        c.wait(sends, deadline, "ring allreduce")
    if finish is not None:
        finish(chunks[(r + 1) % p])
    # allgather: pass the reduced chunks around so that every rank has all of them
    for step in range(p - 1):
        send, recv = (chunks[i] for i in ring_chunks("allgather", step, r, p))
        c.exchange(send, right, recv, left, deadline, "ring allgather")

def ring_phase(c, comm, buf, reduce, phase, deadline):
    """One phase of the ring over ``comm``'s ranks, on ``buf`` in place: "reduce-scatter" (with ``reduce``)
    leaves chunk (r + 1) mod p of local rank r fully reduced; "allgather" then gives every rank every chunk.

    Parameters
    ----------
    c : Communicator
        The communicator whose ``comm``, ``wait``, ``exchange`` and ``scratch`` the algorithm uses.
    comm : mpi4py communicator
        The ranks of this ring (a node's, or one rank per node).
    buf : numpy.ndarray
        Flat values, changed in place.
    reduce : numpy ufunc or None
        The reduction of "reduce-scatter" (None for "allgather").
    phase : {"reduce-scatter", "allgather"}
    deadline : float or None
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    right, left = (r + 1) % p, (r - 1) % p
    bounds = chunk_bounds(buf.size, p)
    chunks = [buf[bounds[i] : bounds[i + 1]] for i in range(p)]
    tmp = c.scratch(buf.dtype, max(len(c) for c in chunks))
    what = f"hierarchical allreduce ({phase})"
    for step in range(p - 1):
        send, recv = (chunks[i] for i in ring_chunks(phase, step, r, p))
        incoming = tmp[: len(recv)] if phase == "reduce-scatter" else recv
        if deadline is None:
            comm.Sendrecv(send, right, 8, incoming, left, 8)
        else:
            c.wait([comm.Irecv(incoming, source=left, tag=8), comm.Isend(send, dest=right, tag=8)],
                       deadline, what)
        if phase == "reduce-scatter":
            reduce(recv, incoming, out=recv)

def hierarchical_allreduce(c, buf, reduce, deadline, finish=None):
    """Reduce-scatter inside the node, a ring of my chunk among my same-local-rank peers, allgather in the node.

    Only the middle step crosses nodes, and each rank sends 2(n-1)/n of a 1/L chunk over it (n nodes of
    L ranks), so the network carries 1/L of what the flat ring sends through each node's link.

    Parameters
    ----------
    c : Communicator
        The communicator whose ``comm``, ``wait``, ``exchange`` and ``scratch`` the algorithm uses.
    buf : numpy.ndarray
        Flat values, reduced in place.
    reduce : numpy ufunc
    deadline : float or None
    finish : callable, optional
        Applied in place, once per element, by the rank that completes it (the average's division).
    """
    local, cross = c.nodes.local, c.nodes.cross
    ring_phase(c, local, buf, reduce, "reduce-scatter", deadline)
    size, rank = local.Get_size(), local.Get_rank()
    bounds = chunk_bounds(buf.size, size)
    owned = (rank + 1) % size  # the chunk the reduce-scatter left complete on this rank
    mine = buf[bounds[owned] : bounds[owned + 1]]
    if mine.size:
        ring_phase(c, cross, mine, reduce, "reduce-scatter", deadline)
        cross_bounds = chunk_bounds(mine.size, cross.Get_size())
        owned_cross = (cross.Get_rank() + 1) % cross.Get_size()
        if finish is not None:  # the average's division, once per element, by the rank that completes it
            finish(mine[cross_bounds[owned_cross] : cross_bounds[owned_cross + 1]])
        ring_phase(c, cross, mine, None, "allgather", deadline)
    ring_phase(c, local, buf, None, "allgather", deadline)
