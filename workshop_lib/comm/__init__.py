"""Collectives for data-parallel training, on mpi4py: ring allreduce and its relatives.

Mirrors the ring of Baidu's allreduce, Horovod and NCCL. The one idea: in a
ring every rank sends and receives 2(p-1)/p of the buffer, whatever the
number of ranks p, so the time of an allreduce stops growing with p; small
messages instead are latency-bound, and recursive doubling (log2 p exchanges)
wins there, as MPI libraries and NCCL switch algorithms by size.

This package is one file per algorithm, behind one face, :class:`Communicator`
(this file: which algorithm a call takes, broadcast, allgather, tensor fusion
and the parameter server):

- ``ring.py``: the ring (reduce-scatter + allgather round the ranks), its
  schedule and a one-process simulation (lab 03), and the hierarchical ring of
  rings across nodes (``HOROVOD_HIERARCHICAL_ALLREDUCE``).
- ``doubling.py``: recursive doubling, for small messages.
- ``shm.py``: ranks on one node reduce through an MPI-3 shared-memory window
  in cache-sized blocks, as MPICH's and NCCL's intra-node collectives do.
- ``agree.py``: by default every collective first checks that all ranks called
  it alike (shape, dtype, op, algorithm); a mismatch raises the same ValueError
  on every rank instead of a hang or garbage, and a small allreduce travels
  inside the check's own messages.

Every byte moves through MPI (``Sendrecv``, ``Isend``/``Irecv``, ``Bcast``,
``Allgatherv``) on numpy buffers; nothing is pickled but small metadata.
mpi4py is imported when a Communicator is created, never at import. Which
ranks share a node comes from :func:`workshop_lib.placement.node_groups` (built
once per communicator; ``WORKSHOP_SIMULATE_NODES=k`` fakes k nodes, so that the
hierarchical algorithm runs, and is tested, on one machine). Keeping the job
from hanging is :mod:`workshop_lib.job`'s: a Communicator holds its guard, so an
uncaught error (a :class:`CollectiveTimeout` included) on one rank ends the job.
"""

from __future__ import annotations

import time

import numpy as np

from .. import job, placement
from ..job import ENDED, CollectiveTimeout, JobGuard, guard_job, release_job  # noqa: F401 - their home was here
from ..placement import HIERARCHICAL_ENV, SIMULATE_NODES_ENV, NodeGroups, node_groups
from . import doubling, ring, shm
from .agree import ALGORITHMS, DTYPES, FOLD_BYTES, OPS, REDUCE, CrossRankCheck
from .ring import chunk_bounds, ring_schedule, simulate_ring  # noqa: F401 - lab 03's names
from .shm import SHM_BLOCK_BYTES, SHM_OVERSUBSCRIBED_BLOCK_BYTES  # noqa: F401

__all__ = ["OPS", "DTYPES", "ALGORITHMS", "SMALL_BYTES", "SHM_MIN_BYTES", "SHM_MAX_BYTES", "FUSION_THRESHOLD",
           "Communicator", "CollectiveTimeout", "NodeGroups", "ring_schedule", "simulate_ring", "chunk_bounds",
           "JobGuard", "guard_job", "release_job", "VARIABLES", "check_environment"]

SMALL_BYTES = 32 * 1024  # below this, recursive doubling (latency); above, the ring (bandwidth)
SEGMENT_BYTES = 1 << 20  # the ring moves large chunks in segments, reducing one while the next arrives
FUSION_THRESHOLD = 64 * 1024 * 1024  # like HOROVOD_FUSION_THRESHOLD
SHM_MIN_BYTES = 8 * 1024  # from this size ...
SHM_MAX_BYTES = 4 * 1024 * 1024  # ... to this one, ranks that share a node use the shared-memory algorithm
SHM_ENV = "WORKSHOP_COMM_SHM"


VARIABLES = (SIMULATE_NODES_ENV, HIERARCHICAL_ENV, SHM_ENV)  # the communicator's variables, equal on every rank


def check_environment(env, size):
    """The communicator's variables in ``env``, parsed for ``size`` ranks (ValueError naming a bad one).

    Parameters
    ----------
    env : mapping
        The variables, as ``job.read_environment`` passes them.
    size : int
        The ranks of the communicator.
    """
    placement.simulated_nodes(size, env)
    placement.hierarchical_switch(env)
    job.env_bool(SHM_ENV, True, env)


class Communicator(CrossRankCheck):
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
        # first the job guard, so that a failure on one rank from here on ends the job, and the job's variables,
        # read and compared on every rank (a bad or differing one is the same error everywhere, never a hang)
        self.guard = job.guard_job("comm", self.comm, VARIABLES, lambda env: check_environment(env, self.size)) \
            if self.size > 1 else None
        placement.place(self.comm)  # each rank's share of the node's cores, decided once per process
        self.small_bytes, self.segment_bytes, self.timeout = small_bytes, segment_bytes, timeout
        self.shm_min_bytes, self.shm_max_bytes = shm_min_bytes, shm_max_bytes
        self._window = None
        self.nodes = node_groups(self.comm) if self.size > 1 else None  # once per communicator (placement)
        if shared_memory and self.size > 1 and job.env_bool(SHM_ENV, True) and not self.nodes.simulated:
            self._window = shm.SharedWindow(self.comm, shm_block_bytes)
            if not self._window.ok:
                self._window = None
        # more ranks than cores on this node (known from the shared-memory window's set-up)
        self.oversubscribed = self._window is not None and self._window.oversubscribed
        if shm_max_bytes is None:
            self.shm_max_bytes = float("inf") if self.oversubscribed else SHM_MAX_BYTES
        self._init_check()  # the cross-rank check's buffers (agree.py)
        self._scratch_bytes = None  # the ring's scratch buffer (in-place calls), kept for the next call

    @property
    def shared_memory(self):
        """True when allreduce can take the shared-memory algorithm (all ranks on one node)."""
        return self._window is not None

    def free(self):
        """Release the shared-memory window (collective). The communicator still works, without it."""
        if self._window is not None:
            self._window.free()
            self._window = None

    def wait(self, requests, deadline, what, cancel=True, statuses=None):
        """Wait for MPI requests (filling ``statuses``), or raise CollectiveTimeout when the deadline passes.

        Point-to-point requests are cancelled then; ``cancel=False`` for a non-blocking collective's (MPI
        forbids cancelling those).

        Parameters
        ----------
        requests : list of mpi4py requests
        deadline : float or None
            A ``time.monotonic()`` time, or None to wait for ever.
        what : str
            Named by the timeout's message.
        cancel : bool
            Cancel point-to-point requests on a timeout.
        statuses : list of MPI.Status, optional
            Filled in.

        Raises
        ------
        CollectiveTimeout
            When the deadline passes first.
        """
        if deadline is None:
            self.MPI.Request.Waitall(requests, statuses)
            return
        if not job.wait(lambda: self.MPI.Request.Testall(requests, statuses), spin=not self.oversubscribed,
                        deadline=deadline):
            for request in requests if cancel else ():
                try:
                    request.Cancel()
                except Exception:  # noqa: BLE001 - best effort; the job is in trouble anyway
                    pass
            raise CollectiveTimeout(f"{what} on rank {self.rank} did not complete in time: a peer may have "
                                    "crashed, be stuck, or not have called it")

    def exchange(self, send, dest, recv, source, deadline, what):
        """Send ``send`` to ``dest`` while receiving ``recv`` from ``source`` (within the deadline, if any).

        Parameters
        ----------
        send : numpy.ndarray
        dest : int
        recv : numpy.ndarray
        source : int
        deadline : float or None
        what : str
            Named by the timeout's message.
        """
        if deadline is None:  # one blocking call: the lowest latency (small messages are latency-bound)
            self.comm.Sendrecv(send, dest, 7, recv, source, 7)
            return
        requests = [self.comm.Irecv(recv, source=source, tag=7), self.comm.Isend(send, dest=dest, tag=7)]
        self.wait(requests, deadline, what)

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
        if self.guard is not None:  # what the job's messages say this rank was doing
            self.guard.phase = "Communicator.allreduce"
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
        reduce = REDUCE.get(op)
        # the average's division is done once per element, by the rank that completes it (shared memory, ring)
        finish = self.divide if op == "average" and self.size > 1 else None
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
                ring.ring_allreduce(self, x.reshape(-1), flat, reduce, deadline, finish)
                finish = None
            elif algorithm == "hierarchical":
                ring.hierarchical_allreduce(self, flat, reduce, deadline, finish)
                finish = None
            else:
                doubling.recursive_doubling(self, flat, reduce, deadline)
        if finish is not None:
            finish(flat)
        if fold and deadline is None:  # the next call of this shape, dtype, op and algorithm skips the above
            if len(self._fast) > 256:
                self._fast.clear()
            self._fast[(x.shape, x.dtype, op, requested)] = self._fold_plan(x.shape, x.dtype, op, algorithm)
        return out

    def divide(self, values):
        """The average's last step, in place: the sum divided by the number of ranks (integers: floor division).

        Parameters
        ----------
        values : numpy.ndarray
            Divided in place.
        """
        if values.dtype.kind in "iu":
            np.floor_divide(values, self.size, out=values)
        else:
            np.divide(values, self.size, out=values)

    def message_algorithm(self, array):
        """The message-based algorithm "auto" takes for ``array`` off shared memory: latency- or bandwidth-bound.

        Parameters
        ----------
        array : numpy.ndarray

        Returns
        -------
        str
            "recursive_doubling", "ring" or "hierarchical".
        """
        if array.nbytes < self.small_bytes or array.size < self.size:
            return "recursive_doubling"
        return "hierarchical" if self.nodes is not None and self.nodes.hierarchical else "ring"

    def scratch(self, dtype, n):
        """A scratch array of ``n`` elements of ``dtype``, reused from call to call (fresh pages fault: reuse them).

        Parameters
        ----------
        dtype : numpy.dtype
        n : int

        Returns
        -------
        numpy.ndarray
            A view of the reused buffer (its contents are undefined).
        """
        nbytes = n * dtype.itemsize
        if self._scratch_bytes is None or self._scratch_bytes.nbytes < nbytes:
            self._scratch_bytes = np.empty(max(nbytes, 64), dtype=np.uint8)
        return self._scratch_bytes[:nbytes].view(dtype)

    def test_any(self, requests):
        """The index of a completed request among ``requests``, or None.

        Parameters
        ----------
        requests : list of mpi4py requests

        Returns
        -------
        int or None
        """
        index, done = self.MPI.Request.Testany(requests)
        return index if done and index != self.MPI.UNDEFINED else None

    # -- other collectives ----------------------------------------------------------------------
    def broadcast(self, array, root=0):
        """``array`` on every rank becomes root's (in place; MPI's Bcast). Shapes and dtypes must agree.

        Parameters
        ----------
        array : numpy.ndarray
            Overwritten in place with root's values on every other rank.
        root : int
            The rank whose values everyone gets.

        Returns
        -------
        numpy.ndarray
            ``array`` itself.

        Raises
        ------
        ValueError
            On every rank, when shapes or dtypes differ, or ``root`` is not a rank.
        """
        if self.guard is not None:  # what the job's messages say this rank was doing
            self.guard.phase = "Communicator.broadcast"
        x = np.asarray(array)
        self._agree("broadcast", x.size, x.dtype, "sum", shape=x.shape)
        if not 0 <= root < self.size:
            raise ValueError(f"root={root} must be a rank in [0, {self.size})")
        self.comm.Bcast(x, root=root)
        return x

    def allgather(self, array):
        """Concatenate every rank's array along the first axis (their first dimensions may differ: allgatherv).

        Parameters
        ----------
        array : array_like
            This rank's rows; trailing dimensions and dtype equal on every rank.

        Returns
        -------
        numpy.ndarray
            Every rank's rows, in rank order.

        Raises
        ------
        ValueError
            On every rank, when trailing dimensions or dtypes differ.
        """
        if self.guard is not None:  # what the job's messages say this rank was doing
            self.guard.phase = "Communicator.allgather"
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

        Parameters
        ----------
        arrays : list of array_like
        op : {"sum", "average", "min", "max"}
        threshold_bytes : int
            The largest fusion buffer.
        compression : {None, "fp16"}
        on_wait : callable, optional
            The job's stall inspector, called while the first buffer's check waits.

        Returns
        -------
        list of numpy.ndarray
            The reduced arrays, in order, each with its input's shape and dtype.
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

        Parameters
        ----------
        array : array_like
        op : {"sum", "average", "min", "max"}

        Returns
        -------
        numpy.ndarray
            The reduction, on every rank.
        """
        if self.guard is not None:  # what the job's messages say this rank was doing
            self.guard.phase = "Communicator.parameter_server_allreduce"
        x = np.ascontiguousarray(array)
        self._agree("parameter_server_allreduce", x.size, x.dtype, op, shape=x.shape)
        out = x.copy()
        flat = out.reshape(-1)
        if self.rank == 0:
            tmp = np.empty_like(flat)
            for source in range(1, self.size):
                self.comm.Recv(tmp, source=source, tag=21)
                REDUCE[op](flat, tmp, out=flat)
            if op == "average":
                self.divide(flat)
            for dest in range(1, self.size):
                self.comm.Send(flat, dest=dest, tag=22)
        else:
            self.comm.Send(flat, dest=0, tag=21)
            self.comm.Recv(flat, source=0, tag=22)
        return out
