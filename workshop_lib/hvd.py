"""Horovod's TensorFlow-1 API (``horovod.tensorflow``) on :mod:`workshop_lib.comm` and :mod:`workshop_lib.tf`.

Scripts written for Horovod run unchanged with::

    import workshop_lib.tf as tf
    import workshop_lib.hvd as hvd

The one idea of data-parallel training: every rank (process) holds a full copy
of the model and computes gradients on its own slice of each batch; the
gradients are averaged over the ranks with an allreduce before every update, so
all copies take the same step and stay identical. What stays the user's code,
as in Horovod's samples: scaling the learning rate by ``hvd.size()`` (the
effective batch is ``size`` times larger) and dividing the number of steps by it.

Under ``mpiexec -n N`` there are N ranks; started without mpiexec, ``size()``
is 1 and everything still works. After :func:`init`, no rank is left waiting in
a collective for a peer that is gone: an uncaught exception, or ``sys.exit``
with a failure status, on any rank prints that rank's message and aborts the
whole job (``MPI_Abort``); a rank that ends normally waits at exit until every
rank has ended, and aborts the job if they have not within
``WORKSHOP_HVD_EXIT_TIMEOUT`` seconds (default 300), since they may be waiting
for it. (A rank killed by a signal ends the job through ``mpiexec`` itself.)
These hooks are :func:`workshop_lib.job.guard_job`'s, shared with ``d4p.daalinit()``.

Horovod's stall inspector, with Horovod's variables: every collective first waits
until every rank has entered it (each rank sends its peers a note with the
number of the collective it reached). A rank that waits longer than
``HOROVOD_STALL_CHECK_TIME_SECONDS`` (default 60) prints a warning naming the
ranks that have not arrived and the tensor, again every as many seconds; after
``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (Horovod's default is never, 0; ours
300, since a class cannot wait for ever) it aborts the job. A peer that has
already ended is noticed at once and the job aborted, within seconds.
``HOROVOD_STALL_CHECK_DISABLE=1`` (or true/yes/on, any case) turns the inspector off; ``0``/false/no/off keep
it on. The inspector itself lives in :mod:`workshop_lib.job`, as Horovod's in ``stall_inspector.cc``. A value
that cannot be parsed, or that differs between ranks, is the same clear error on every rank at ``init()``.

Collective ops in a graph run in the same order on every rank (the session
chains them), as Horovod's coordinator guarantees.
"""

from __future__ import annotations

import os
import time
import weakref

import numpy as np

from . import job, placement, tf, timeline
from .comm import FUSION_THRESHOLD, VARIABLES, Communicator, check_environment
from .compression import Compression, Compressor, FP16Compressor, NoneCompressor  # noqa: F401 - hvd's names
from .compression import check_compression as _check_compression
from .tf.core import Tensor, Variable, convert_to_tensor, get_default_graph, make_op

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank",
    "mpi_enabled", "mpi_built", "mpi_threads_supported", "Average", "Sum", "Min", "Max", "Compression",
    "allreduce", "allgather", "broadcast", "broadcast_global_variables", "BroadcastGlobalVariablesHook",
    "DistributedOptimizer",
]

# reduction ops, with Horovod's names
Average, Sum, Min, Max = "average", "sum", "min", "max"


class _State:
    def __init__(self, comm, guard):
        nodes = comm.nodes  # placement's node groups: the ones the algorithms use, WORKSHOP_SIMULATE_NODES included
        self.comm = comm
        self.local_rank, self.local_size = (nodes.local_rank, nodes.local_size) if nodes else (0, 1)
        self.cross_rank, self.cross_size = (nodes.cross_rank, nodes.cross_size) if nodes else (0, 1)
        self.guard = guard  # workshop_lib.job's JobGuard: the abort hooks, and the stall inspector
        self.stall = guard.stall  # (check, shutdown) seconds, or None when disabled
        self.timeline = None  # a timeline.Timeline when HOROVOD_TIMELINE is set


_state: _State | None = None


def init(comm=None):
    """Start Horovod: MPI is initialised, ranks are counted, and a crash on any rank will abort the job.

    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``). Calling it again does nothing.
    The environment variable ``HOROVOD_FUSION_THRESHOLD`` (bytes) sets the tensor-fusion buffer size;
    ``HOROVOD_TIMELINE=/path/timeline.json`` records a per-rank timeline (see :mod:`workshop_lib.timeline`).
    ``HOROVOD_STALL_CHECK_TIME_SECONDS``, ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` and
    ``HOROVOD_STALL_CHECK_DISABLE`` set the stall inspector (see the module's docstring).

    Parameters
    ----------
    comm : mpi4py communicator, optional
        The job's ranks (default ``MPI.COMM_WORLD``).

    Raises
    ------
    ValueError
        On every rank alike, when one of the job's variables cannot be parsed or differs between ranks.
    """
    global _state
    if _state is not None:
        return
    placement.check_launcher_world()  # srun/mpirun started N tasks but MPI sees 1: stop, say why
    from mpi4py import MPI

    world = MPI.COMM_WORLD if comm is None else comm
    # first the job guard: from here on a failure on one rank ends the job; the variables are checked on every rank
    guard = job.guard_job("hvd", world, VARIABLES + ("HOROVOD_FUSION_THRESHOLD",),
                          lambda env: (check_environment(env, world.Get_size()), _fusion_threshold(env)))
    placement.place(comm)  # Horovod: pin each process to its share of the node's cores and threads
    _state = _State(Communicator(comm), guard)
    path = os.environ.get(timeline.ENV, "").strip()
    if path:  # every rank has the same environment (mpiexec passes it on), so the Dup is collective
        timeline.check_path(path, _state.comm.comm)  # collective: a path any rank cannot write fails on every rank
        _state.timeline = timeline.Timeline(path, _state.comm.rank, _state.comm.size, _state.comm.comm.Dup())
        # run by the guard's exit hook after its wait: once every rank has ended normally
        guard.at_end.append(_close_timeline)


def shutdown():
    """Forget the communicator and restore the hooks (MPI itself is finalised at exit by mpi4py)."""
    global _state
    if _state is None:
        return
    job.release_job("hvd")
    _close_timeline()
    if _close_timeline in _state.guard.at_end:
        _state.guard.at_end.remove(_close_timeline)
    _state = None


def is_initialized():
    return _state is not None


def _require():
    if _state is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _state


def size():
    """Number of ranks (processes) in the job."""
    return _require().comm.size


def rank():
    """This process's rank, 0 .. size() - 1. Rank 0 is the one that writes checkpoints and logs."""
    return _require().comm.rank


def local_size():
    """Number of ranks on this machine."""
    return _require().local_size


def local_rank():
    """This process's rank among the ranks of this machine (what one pins a GPU or a set of cores to)."""
    return _require().local_rank


def cross_size():
    """Number of machines (ranks sharing this local rank)."""
    return _require().cross_size


def cross_rank():
    return _require().cross_rank


def mpi_enabled():
    return True


def mpi_built():
    return True


def mpi_threads_supported():
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


# ----------------------------------------------------------------------------------------------
# the stall inspector: workshop_lib.job's (Horovod's horovod/common/stall_inspector.cc, with its variables)


def _stall_settings():
    """(warn after, abort after) in seconds from Horovod's variables (0: never), or None if the inspector is off."""
    return job.stall_settings()


def _wait_for_peers(state, name, in_check=False):
    """Enter collective ``name``: :meth:`workshop_lib.job.JobGuard.wait_for_peers` (the stall inspector), when on.

    ``in_check=True`` (an allreduce, whose cross-rank check waits for every rank): returns the inspector for the
    allreduce to call while its check waits (its ``on_wait``), or None when every peer has already arrived.
    """
    if state.stall is None or state.comm.size == 1:
        return None
    return state.guard.wait_for_peers(name, in_check=in_check, spin=not state.comm.oversubscribed)


def _close_timeline():
    """Write the timeline (HOROVOD_TIMELINE): every rank its part, rank 0 the merge once all have written.

    At exit it runs after the exit hooks: a failed job has been aborted by then, and otherwise every rank
    has ended normally, so the wait for the parts is short.
    """
    state = _state
    if state is not None and state.timeline is not None:
        state.timeline.close(wait_seconds=60.0)


def _fused_allreduce(state, values, op, threshold_bytes=FUSION_THRESHOLD, compression=None, step=False, name=None):
    """``comm.fused_allreduce``; with HOROVOD_TIMELINE also the wait, allreduce (and, in a step, compute) spans.

    ``name`` is the tensor the stall inspector names while it waits for every rank first; None when the caller
    has already waited (an eager call or a collective op).
    """
    line = state.timeline
    if line is None:
        on_wait = _wait_for_peers(state, name, in_check=True) if name is not None else None
        return state.comm.fused_allreduce(values, op=op, threshold_bytes=threshold_bytes, compression=compression,
                                          on_wait=on_wait)
    start = time.time_ns() / 1000.0
    if step and line.last_update_end is not None:
        line.add("compute", line.last_update_end, start)
    with line.span("wait"):  # the stall inspector's wait for every rank, or a barrier when it is off
        if name is None or state.stall is None:
            state.comm.comm.Barrier()
        else:
            _wait_for_peers(state, name)
    t0 = time.time_ns() / 1000.0
    out = state.comm.fused_allreduce(values, op=op, threshold_bytes=threshold_bytes, compression=compression)
    wire = sum(np.asarray(v).size * (2 if compression == "fp16" and np.asarray(v).dtype.kind == "f"
                                     else np.asarray(v).itemsize) for v in values)
    line.add("allreduce", t0, time.time_ns() / 1000.0, bytes=int(wire), tensors=len(values),
             algorithm=state.comm.last_algorithm, op=op)
    return out


def _resolve_op(average, op):
    if average is not None and op is not None:
        raise ValueError("pass either average= (deprecated) or op=, not both")
    if op is None:
        op = Sum if average is False else Average
    if op not in (Average, Sum, Min, Max):
        raise ValueError(f"op={op!r} must be hvd.Average, hvd.Sum, hvd.Min or hvd.Max")
    return op


def _fusion_threshold(env=None):
    value = (os.environ if env is None else env).get("HOROVOD_FUSION_THRESHOLD")
    if value is None:
        return FUSION_THRESHOLD
    try:
        threshold = int(value)
    except ValueError:
        raise ValueError(f"HOROVOD_FUSION_THRESHOLD={value!r} must be a number of bytes") from None
    return max(threshold, 1)


def _is_graph_value(x):
    return isinstance(x, (Tensor, Variable))


def _collective(op_type, inputs, compute, dtypes, shapes, grad=None, name=None):
    """A stateful graph op marked as a collective (the session runs collectives in the same order on every rank)."""
    named = {}

    def run(ctx, *values):
        _wait_for_peers(_require(), named["op"].name)
        return compute(*values)

    named["op"] = make_op(op_type, inputs, run, dtypes, shapes, grad=grad, name=name, attrs={"collective": True},
                          stateful=True)
    return named["op"]


# ----------------------------------------------------------------------------------------------
# collectives, on numpy arrays (eagerly) or on graph tensors (as ops)


def allreduce(tensor, average=None, device_dense="", device_sparse="", compression=Compression.none, op=None,
              name=None, prescale_factor=1.0, postscale_factor=1.0):
    """Reduce ``tensor`` over all ranks (default: the average), every rank gets the result.

    ``tensor`` is a graph tensor (returns a tensor) or a numpy array (returns an array at once).
    The gradient of an allreduce is the same allreduce of the gradient.

    Parameters
    ----------
    tensor : tf.Tensor or array_like
        A graph tensor (the result is a tensor) or an array (the result comes at once).
    average : bool, optional
        Horovod's older switch (True: Average, False: Sum); ``op`` wins when both are given.
    device_dense, device_sparse : str
        Accepted, changing nothing (no GPUs here).
    compression : Compression.none or Compression.fp16
    op : {Average, Sum, Min, Max}
    name : str, optional
        The op's name, and what the stall inspector names.
    prescale_factor, postscale_factor : float
        Multiply the input before and the result after the reduction.

    Returns
    -------
    tf.Tensor or numpy.ndarray
    """
    state = _require()
    op = _resolve_op(average, op)
    compression = _check_compression(compression)

    def reduce(value, on_wait=None):
        value = np.asarray(value)
        if prescale_factor != 1.0:
            value = value * np.asarray(prescale_factor, dtype=value.dtype)
        if state.timeline is None and compression.wire is None:  # one array: straight into its result, no fusion
            out = state.comm.allreduce(value, op=op, on_wait=on_wait)
        else:
            out = _fused_allreduce(state, [value], op, compression=compression.wire)[0]  # fp16 on the wire if asked
        if postscale_factor != 1.0:
            out = out * np.asarray(postscale_factor, dtype=out.dtype)
        return np.asarray(out, dtype=value.dtype)

    if not _is_graph_value(tensor):
        if state.timeline is None and compression.wire is None:  # the allreduce's own check waits for the peers
            return reduce(tensor, _wait_for_peers(state, name or "HorovodAllreduce", in_check=True))
        _wait_for_peers(state, name or "HorovodAllreduce")
        return reduce(tensor)
    t = convert_to_tensor(tensor)

    def grad(operation, g):
        return [allreduce(g, op=op if op in (Average, Sum) else Sum, compression=compression)]

    return _collective("HorovodAllreduce", [t], lambda v: (reduce(v),), [t.dtype], [t.shape], grad=grad,
                       name=name or "HorovodAllreduce").outputs[0]


def allgather(tensor, name=None):
    """Concatenate every rank's ``tensor`` along the first axis (first dimensions may differ between ranks).

    Parameters
    ----------
    tensor : tf.Tensor or array_like
        A graph tensor (the result is a tensor) or an array (the result comes at once).
    name : str, optional

    Returns
    -------
    tf.Tensor or numpy.ndarray
        Every rank's rows, in rank order.
    """
    state = _require()
    if not _is_graph_value(tensor):
        _wait_for_peers(state, name or "HorovodAllgather")
        return state.comm.allgather(np.asarray(tensor))
    t = convert_to_tensor(tensor)
    shape = t.shape.as_list() if t.shape.ndims is not None else None
    out_shape = None if shape is None else [None, *shape[1:]]

    def grad(operation, g):
        # every rank's slice of the summed gradient: this rank's rows of allreduce(g, Sum)
        def own_rows(gv, xv):
            total = state.comm.allreduce(np.ascontiguousarray(gv), op=Sum)
            rows = state.comm.comm.allgather(int(np.shape(xv)[0]) if np.ndim(xv) else 1)
            start = sum(rows[: state.comm.rank])
            return (total[start : start + rows[state.comm.rank]].reshape(np.shape(xv)),)

        return [_collective("HorovodAllgatherGrad", [g, operation.inputs[0]], own_rows, [g.dtype],
                            [operation.inputs[0].shape]).outputs[0]]

    return _collective("HorovodAllgather", [t], lambda v: (state.comm.allgather(np.asarray(v)),), [t.dtype],
                       [out_shape], grad=grad, name=name or "HorovodAllgather").outputs[0]


def broadcast(tensor, root_rank, name=None):
    """Every rank gets ``root_rank``'s value of ``tensor``.

    Parameters
    ----------
    tensor : tf.Tensor or array_like
        A graph tensor (the result is a tensor) or an array (the result comes at once).
    root_rank : int
    name : str, optional

    Returns
    -------
    tf.Tensor or numpy.ndarray
        ``root_rank``'s value, on every rank.
    """
    state = _require()
    _check_root(root_rank, state)
    if not _is_graph_value(tensor):
        _wait_for_peers(state, name or "HorovodBroadcast")
        return state.comm.broadcast(np.array(tensor, copy=True), root=root_rank)
    t = convert_to_tensor(tensor)

    def grad(operation, g):
        def to_root(gv):
            total = state.comm.allreduce(np.ascontiguousarray(gv), op=Sum)
            return (total if state.comm.rank == root_rank else np.zeros_like(total),)

        return [_collective("HorovodBroadcastGrad", [g], to_root, [g.dtype], [g.shape]).outputs[0]]

    return _collective("HorovodBroadcast", [t],
                       lambda v: (state.comm.broadcast(np.array(v, copy=True), root=root_rank),),
                       [t.dtype], [t.shape], grad=grad, name=name or "HorovodBroadcast").outputs[0]


def _check_root(root_rank, state):
    if not isinstance(root_rank, (int, np.integer)) or not 0 <= root_rank < state.comm.size:
        raise ValueError(f"root_rank={root_rank!r} must be a rank in [0, {state.comm.size})")


def broadcast_global_variables(root_rank):
    """An op that sets every global variable, on every rank, to its value on ``root_rank``.

    Run it once after the variables are initialised (or restored on the root), so that all ranks start
    from the same weights; :class:`BroadcastGlobalVariablesHook` does that for a MonitoredTrainingSession.

    Parameters
    ----------
    root_rank : int

    Returns
    -------
    tf.Operation
        Run it once after the variables are initialised.
    """
    return broadcast_variables(tf.global_variables(), root_rank)


def broadcast_variables(variables, root_rank):
    """An op that sets each of ``variables`` to its value on ``root_rank`` (in the list's order, on every rank).

    Parameters
    ----------
    variables : list of tf.Variable
    root_rank : int

    Returns
    -------
    tf.Operation
    """
    state = _require()
    _check_root(root_rank, state)
    variables = list(variables)
    names = [v.name for v in variables]

    def compute(ctx):
        _wait_for_peers(state, "broadcast_global_variables")
        listing = state.comm.comm.allgather(names)
        if any(other != names for other in listing):
            mine = set(names)
            diffs = [f"rank {r}: {sorted(set(o) ^ mine)[:5]}" for r, o in enumerate(listing) if o != names]
            raise ValueError("broadcast_global_variables: the ranks have different variables (the graphs differ); "
                             f"differences: {'; '.join(diffs)}")
        for var in variables:
            value = np.array(ctx.read_variable(var), copy=True)
            ctx.write_variable(var, state.comm.broadcast(value, root=root_rank))
        return ()

    return make_op("HorovodBroadcastVariables", [], compute, [], [], name="broadcast_global_variables",
                   attrs={"collective": True}, stateful=True)


class BroadcastGlobalVariablesHook(tf.train.SessionRunHook):
    """Broadcasts the global variables from ``root_rank`` once the session is created (and restored).

    Parameters
    ----------
    root_rank : int
        The rank whose initial values every rank takes.
    device : str
        Accepted, changing nothing.
    """

    def __init__(self, root_rank, device=""):
        self.root_rank = root_rank
        self.bcast_op = None

    def begin(self):
        if self.bcast_op is None or self.bcast_op.graph is not get_default_graph():
            self.bcast_op = broadcast_global_variables(self.root_rank)

    def after_create_session(self, session, coord):
        """Run the broadcast once the session exists (its variables initialised).

        Parameters
        ----------
        session : tf.Session
        coord : object
            Unused (TensorFlow's coordinator).
        """
        session.run(self.bcast_op)


# ----------------------------------------------------------------------------------------------
# the optimizer wrapper


class DistributedOptimizer:
    """Wrap a :mod:`workshop_lib.tf` optimizer so that gradients are allreduced across ranks.

    ``compute_gradients`` computes this rank's gradients, then reduces all of them in one fused collective
    (tensor fusion, up to ``HOROVOD_FUSION_THRESHOLD`` bytes per buffer); ``apply_gradients`` is the wrapped
    optimizer's. With ``backward_passes_per_step=k`` gradients are summed locally over k passes (averaged
    if ``average_aggregated_gradients``) and reduced and applied on every k-th pass only; the global step
    still advances on every pass, as in Horovod.

    ``sharded=True`` returns a :class:`workshop_lib.sharded.ShardedOptimizer` (ZeRO-1: gradients reduce-scattered,
    each rank updating its 1/size slice with its slice of Adam's moments, the weights allgathered).

    ``device_dense``, ``device_sparse``, ``sparse_as_dense`` and ``use_locking`` change nothing here (no GPUs,
    no sparse gradients) and are accepted; ``gradient_predivide_factor`` other than 1.0 and ``groups`` /
    ``num_groups`` raise NotImplementedError.

    Parameters
    ----------
    optimizer : tf.train.Optimizer
        The optimizer to wrap.
    name : str, optional
    use_locking, device_dense, device_sparse, sparse_as_dense
        Accepted, changing nothing.
    compression : Compression.none or Compression.fp16
    backward_passes_per_step : int
        Reduce and apply every this many passes (gradients summed locally between).
    op : {Average, Sum}
    gradient_predivide_factor : float
        Only 1.0.
    average_aggregated_gradients : bool
        Average, not sum, the locally aggregated gradients.
    num_groups, groups
        Only the defaults.
    """

    def __new__(cls, optimizer, *args, sharded=False, **kwargs):
        if sharded:  # ZeRO-1: each rank keeps and updates 1/size of Adam's state (workshop_lib.sharded)
            from .sharded import ShardedOptimizer

            return ShardedOptimizer(optimizer, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, optimizer, name=None, use_locking=False, device_dense="", device_sparse="",
                 compression=Compression.none, sparse_as_dense=False, backward_passes_per_step=1, op=Average,
                 gradient_predivide_factor=1.0, average_aggregated_gradients=False, num_groups=0, groups=None,
                 sharded=False):
        if not hasattr(optimizer, "compute_gradients") or not hasattr(optimizer, "apply_gradients"):
            raise TypeError(f"optimizer must be a workshop_lib.tf optimizer, got {type(optimizer).__name__}")
        for arg, value, default in (("gradient_predivide_factor", gradient_predivide_factor, 1.0),
                                    ("groups", groups, None), ("num_groups", num_groups, 0)):
            if value != default:
                raise NotImplementedError(f"DistributedOptimizer: {arg}={value!r} is not implemented; leave it "
                                          f"at {default!r}")
        if not isinstance(backward_passes_per_step, (int, np.integer)) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step={backward_passes_per_step!r} must be an int >= 1")
        self._optimizer = optimizer
        self._name = name or f"Distributed{type(optimizer).__name__}"
        self._compression = _check_compression(compression)
        self._op = _resolve_op(None, op)
        self._passes = int(backward_passes_per_step)
        self._average_aggregated = bool(average_aggregated_gradients)
        self._ready = None

    def __getattr__(self, name):  # get_slot, variables, ... are the wrapped optimizer's
        if name == "_optimizer":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def compute_gradients(self, *args, **kwargs):
        """The wrapped optimizer's gradients, allreduced (one fused op over all of them).

        Parameters
        ----------
        *args, **kwargs
            The wrapped optimizer's ``compute_gradients`` arguments (``loss``, ``var_list``).

        Returns
        -------
        list of (tf.Tensor, tf.Variable)
            The allreduced gradients and their variables.
        """
        state = _require()
        pairs = self._optimizer.compute_gradients(*args, **kwargs)
        present = [(i, g) for i, (g, _) in enumerate(pairs) if g is not None]
        if (state.comm.size == 1 and self._passes == 1) or not present:
            return pairs
        grads = [convert_to_tensor(g) for _, g in present]
        comm, op, passes, wire = state.comm, self._op, self._passes, self._compression.wire
        threshold, average_aggregated = _fusion_threshold(), self._average_aggregated
        sums, counter = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()  # per session

        def reduce(ctx, *values):
            key = ctx.session
            values = [np.asarray(v) for v in values]
            if passes > 1:
                acc = sums.get(key)
                acc = [v.copy() for v in values] if acc is None else [a + v for a, v in zip(acc, values)]
                counter[key] = counter.get(key, 0) + 1
                if counter[key] < passes:
                    sums[key] = acc
                    return (*[np.zeros_like(v) for v in values], np.bool_(False))
                sums.pop(key, None)
                counter[key] = 0
                values = [a / passes if average_aggregated else a for a in acc]
            if comm.size > 1:
                values = _fused_allreduce(state, values, op, threshold, wire, step=True, name=fused_name)
            return (*values, np.bool_(True))

        with get_default_graph().name_scope(f"{self._name}_Allreduce"):
            fused = make_op("HorovodFusedAllreduce", grads, reduce, [g.dtype for g in grads] + [tf.bool],
                            [g.shape for g in grads] + [[]], name="HorovodFusedAllreduce",
                            attrs={"collective": True}, stateful=True)
        fused_name = fused.name
        reduced = list(pairs)
        for (i, _), t in zip(present, fused.outputs):
            reduced[i] = (t, pairs[i][1])
        self._ready = fused.outputs[-1] if passes > 1 else None
        return reduced

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        """The wrapped optimizer's apply_gradients, gated to every k-th pass with backward_passes_per_step=k.

        The gate is the fused allreduce's last output (True on the passes that reduced), given to the wrapped
        optimizer's ``apply_gradients(..., gate=...)``.

        Parameters
        ----------
        grads_and_vars : list of (tf.Tensor, tf.Variable)
        global_step : tf.Variable, optional
        name : str, optional

        Returns
        -------
        tf.Operation
        """
        update = self._optimizer.apply_gradients(grads_and_vars, global_step=global_step, name=name, gate=self._ready)
        line = _state.timeline if _state is not None else None
        if line is not None:  # HOROVOD_TIMELINE: an op after the update closes the step's update span
            def update_end(ctx):
                line.mark_update_end()
                return ()

            with tf.control_dependencies([update]):
                update = make_op("HorovodTimelineUpdateEnd", [], update_end, [], [], name="HorovodTimelineUpdateEnd",
                                 stateful=True)
        return update

    def minimize(self, loss, global_step=None, var_list=None, name=None):
        """``compute_gradients`` (allreduced) then ``apply_gradients``, as the wrapped optimizer's ``minimize``.

        Parameters
        ----------
        loss : tf.Tensor
        global_step : tf.Variable, optional
        var_list : list of tf.Variable, optional
        name : str, optional

        Returns
        -------
        tf.Operation
        """
        return self.apply_gradients(self.compute_gradients(loss, var_list), global_step=global_step, name=name)


from . import elastic  # noqa: E402  hvd.elastic: Horovod's elastic API (workshop_lib.elastic imports hvd lazily)
