"""A sharded optimizer (ZeRO stage 1): ``hvd.DistributedOptimizer(opt, sharded=True)``.

The one idea: plain data parallelism keeps a full copy of the optimizer's state on every rank (Adam: two moments,
``m`` and ``v``, each as large as the model), though every rank computes the same update. Here each of the p ranks
keeps and updates only its 1/p slice:

1. the gradients of all variables, laid end to end in one flat buffer, are **reduce-scattered** (the first half
   of the ring allreduce, :class:`workshop_lib.comm.Communicator`'s own ring): rank r ends with the average of
   chunk (r + 1) mod p only;
2. rank r applies Adam to that chunk of the weights, with its chunk of ``m`` and ``v`` (the same fused kernel and
   the same arithmetic as :class:`workshop_lib.tf.train.AdamOptimizer`, element for element);
3. the updated weights are **allgathered** (the ring's second half), so every rank has the whole new model.

The same bytes cross the wire as in the allreduce (a reduce-scatter plus an allgather, of the same buffer size);
the optimizer's state per rank drops from ``2 n`` to ``2 n / p`` floats.

The moments are not graph variables (their shape depends on the number of ranks): a plain ``tf.train.Saver`` run
on rank 0 alone saves the weights and the global step only. The collective ``hvd.elastic`` commit saves them,
gathered in full at rank 0 under the names unsharded Adam gives its slots (``Adam/<var>/Adam_m``,
``Adam/beta1_power``), so a checkpoint restores into a sharded or an unsharded run, with any number of ranks;
:meth:`ShardedOptimizer.gather_state` and :meth:`ShardedOptimizer.scatter_state` do the same by hand.
"""

from __future__ import annotations

import weakref

import numpy as np

from . import kernels
from .comm import ring

__all__ = ["ShardedOptimizer", "sharded_optimizers", "COLLECTION"]

COLLECTION = "horovod_sharded_optimizers"  # the graph collection that lists a graph's sharded optimizers


def sharded_optimizers(graph=None):
    """The :class:`ShardedOptimizer` objects whose update ops are in ``graph`` (default: the default graph)."""
    from .tf.core import get_default_graph

    return list((graph or get_default_graph()).get_collection(COLLECTION))


def _chunks(n, p):
    return ring.chunk_bounds(n, p)  # the ring's own chunking: the chunk a rank owns after the reduce-scatter


class ShardedOptimizer:
    """ZeRO-1 around a :class:`workshop_lib.tf.train.AdamOptimizer` (use ``hvd.DistributedOptimizer(opt,
    sharded=True)``).

    Parameters
    ----------
    optimizer : AdamOptimizer
        The optimizer whose update is sharded (its learning rate, betas and epsilon are used).
    name : str, optional
    op : hvd.Average or hvd.Sum
        How the gradients are combined.

    ``compression``, ``backward_passes_per_step`` other than 1 and the other DistributedOptimizer arguments are
    refused with the argument named.
    """

    def __init__(self, optimizer, name=None, use_locking=False, device_dense="", device_sparse="",
                 compression=None, sparse_as_dense=False, backward_passes_per_step=1, op=None,
                 gradient_predivide_factor=1.0, average_aggregated_gradients=False, num_groups=0, groups=None):
        from . import hvd
        from .tf.train import AdamOptimizer

        if not isinstance(optimizer, AdamOptimizer):
            raise TypeError(f"DistributedOptimizer(sharded=True): optimizer must be a tf.train.AdamOptimizer (the "
                            f"optimizer whose m and v are sharded), got {type(optimizer).__name__}")
        for arg, value, default in (("backward_passes_per_step", backward_passes_per_step, 1),
                                    ("gradient_predivide_factor", gradient_predivide_factor, 1.0),
                                    ("groups", groups, None), ("num_groups", num_groups, 0)):
            if value != default:
                raise NotImplementedError(f"DistributedOptimizer(sharded=True): {arg}={value!r} is not implemented; "
                                          f"leave it at {default!r}")
        if compression not in (None, hvd.Compression.none):
            raise NotImplementedError("DistributedOptimizer(sharded=True): compression is not implemented; leave it "
                                      "at hvd.Compression.none")
        op = hvd.Average if op is None else op
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError(f"DistributedOptimizer(sharded=True): op={op!r} must be hvd.Average or hvd.Sum")
        self._optimizer = optimizer
        self._name = name or f"DistributedSharded{type(optimizer).__name__}"
        self._op = op
        self._vars = None  # the variables, in the flat buffer's order
        self._names = None  # {"m": [...], "v": [...], "powers": [...]}: unsharded Adam's names of the state
        self._state = weakref.WeakKeyDictionary()  # session -> {"m", "v", "b1p", "b2p"}: this rank's slice

    # -- building the graph -------------------------------------------------------------------------
    def compute_gradients(self, *args, **kwargs):
        """This rank's gradients (they are reduce-scattered inside the update, not here)."""
        return self._optimizer.compute_gradients(*args, **kwargs)

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        """One op: reduce-scatter the gradients, update this rank's slice with its moments, allgather the weights."""
        from . import hvd
        from .tf.core import control_dependencies, convert_to_tensor, get_default_graph, make_op
        from .tf.ops import assign_add

        state = hvd._require()
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not pairs:
            raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in grads_and_vars]}")
        if self._vars is not None:
            raise ValueError("DistributedOptimizer(sharded=True): apply_gradients was already called on this "
                             "optimizer; build one per training op")
        bad = [v.name for _, v in pairs if v.dtype.as_numpy_dtype != np.float32]
        if bad:
            raise TypeError(f"DistributedOptimizer(sharded=True): variables {bad} are not float32")
        graph = get_default_graph()
        adam = self._optimizer
        with graph.name_scope(name or adam._name) as scope:
            self._vars = [v for _, v in pairs]
            self._names = {"m": [f"{scope}{v.name_prefix}/{adam._name}_m" for v in self._vars],
                           "v": [f"{scope}{v.name_prefix}/{adam._name}_v" for v in self._vars],
                           "powers": [f"{scope}beta1_power", f"{scope}beta2_power"]}
            sizes = [int(np.prod(v.shape.as_list())) for v in self._vars]
            offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._offsets = [int(o) for o in offsets]
            grads = [convert_to_tensor(g) for g, _ in pairs]
            inputs = grads + adam._lr_input()
            named = {}

            def update(ctx, *values):
                hvd._wait_for_peers(state, named["op"].name)
                self._step(ctx, state, values[: len(grads)], values[len(grads):])
                return ()

            with control_dependencies([g.op for g in grads]):
                named["op"] = make_op("HorovodShardedAdam", inputs, update, [], [], name="HorovodShardedAdam",
                                      attrs={"collective": True}, stateful=True)
        graph.add_to_collection(COLLECTION, self)
        if global_step is None:
            return named["op"]
        with control_dependencies([named["op"]]):
            return assign_add(global_step, np.int64(1), name="update_global_step").op

    def minimize(self, loss, global_step=None, var_list=None, name=None):
        return self.apply_gradients(self.compute_gradients(loss, var_list), global_step=global_step, name=name)

    def __getattr__(self, name):
        if name == "_optimizer":
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    # -- the step -------------------------------------------------------------------------------------
    def _slice(self, size, rank):
        """(start, stop) of the flat buffer that ``rank`` of ``size`` owns: the ring's chunk (rank + 1) mod size."""
        bounds = _chunks(self._offsets[-1], size)
        k = (rank + 1) % size
        return bounds[k], bounds[k + 1]

    def _session_state(self, session, comm):
        got = self._state.get(session)
        if got is None:
            start, stop = self._slice(comm.size, comm.rank)
            adam = self._optimizer
            got = {"m": np.zeros(stop - start, np.float32), "v": np.zeros(stop - start, np.float32),
                   "b1p": np.float32(adam._beta1), "b2p": np.float32(adam._beta2)}
            self._state[session] = got
        return got

    def _step(self, ctx, state, grads, lr):
        comm, adam = state.comm, self._optimizer
        p = comm.size
        n = self._offsets[-1]
        shard = self._session_state(ctx.session, comm)
        start, stop = self._slice(p, comm.rank)
        if "buffers" not in shard:  # reused step to step (fresh pages fault), not optimizer state: one flat buffer
            shard["buffers"] = (np.empty(n, np.float32), np.empty(stop - start, np.float32))  # and my gradient
        buf, grad = shard["buffers"]
        for g, a, b in zip(grads, self._offsets, self._offsets[1:]):
            buf[a:b] = np.asarray(g, dtype=np.float32).reshape(-1)
        if p > 1:  # the ring's first half: this rank ends with the sum of its chunk
            ring.ring_phase(comm, comm.comm, buf, np.add, "reduce-scatter", None)
        if self._op == "average" and p > 1:
            np.divide(buf[start:stop], p, out=grad)
        else:
            grad[:] = buf[start:stop]
        weights = buf  # the same buffer now carries the weights: the gradient outside my chunk is spent
        for var, a, b in zip(self._vars, self._offsets, self._offsets[1:]):
            weights[a:b] = ctx.read_variable(var).reshape(-1)
        lr_t = kernels.adam_step_size(adam._lr_value(lr), float(shard["b1p"]), float(shard["b2p"]))
        kernels.adam_update(weights[start:stop], grad, shard["m"], shard["v"], lr_t, adam._beta1,
                            adam._beta2, adam._epsilon)
        shard["b1p"] = np.float32(shard["b1p"] * adam._beta1)
        shard["b2p"] = np.float32(shard["b2p"] * adam._beta2)
        if p > 1:  # the ring's second half: every rank gets every updated chunk
            ring.ring_phase(comm, comm.comm, weights, None, "allgather", None)
        for var, a, b in zip(self._vars, self._offsets, self._offsets[1:]):  # in place, as ApplyAdam updates
            np.copyto(ctx.read_variable(var), weights[a:b].reshape(var.shape.as_list()))

    # -- state: bytes, in memory, gathered, scattered --------------------------------------------------
    def state_names(self):
        """Unsharded Adam's names of the state this optimizer holds in slices (the checkpoint's keys)."""
        if self._names is None:
            return []
        return self._names["m"] + self._names["v"] + self._names["powers"]

    def state_bytes(self, session):
        """Bytes of optimizer state this rank holds for ``session``: its slices of m and v, and the two powers.

        Parameters
        ----------
        session : Session
            The session whose state is counted.

        Returns
        -------
        int
            The ``nbytes`` of the arrays themselves.
        """
        from . import hvd

        shard = self._session_state(session, hvd._require().comm)
        return int(shard["m"].nbytes + shard["v"].nbytes + shard["b1p"].nbytes + shard["b2p"].nbytes)

    def shard_state(self, session):
        """A copy of this rank's slice of the state (the in-memory commit of ``hvd.elastic``)."""
        from . import hvd

        if self._vars is None:
            return None
        shard = self._session_state(session, hvd._require().comm)
        return {k: np.array(shard[k], copy=True) for k in ("m", "v", "b1p", "b2p")}

    def load_shard_state(self, session, shard):
        """Put back a slice saved by :meth:`shard_state` on this rank (same number of ranks)."""
        if shard is not None:
            self._state[session] = {k: np.array(v, copy=True) for k, v in shard.items()}

    def gather_state(self, session, root=0):
        """Collective: the full state at ``root`` as ``{name: array}`` under unsharded Adam's names; None elsewhere.

        Parameters
        ----------
        session : Session
        root : int
            The rank that receives the state.

        Returns
        -------
        dict or None
            ``{"<scope>/<var>/Adam_m": array, ..., "<scope>/beta1_power": float32, ...}`` at ``root``.
        """
        from . import hvd

        comm = hvd._require().comm
        if self._vars is None:
            return None
        shard = self._session_state(session, comm)
        pieces = comm.comm.gather((shard["m"], shard["v"]), root=root) if comm.size > 1 else [(shard["m"], shard["v"])]
        if comm.rank != root:
            return None
        n = self._offsets[-1]
        full = {"m": np.empty(n, np.float32), "v": np.empty(n, np.float32)}
        for r, (m, v) in enumerate(pieces):
            a, b = self._slice(comm.size, r)
            full["m"][a:b], full["v"][a:b] = m, v
        out = {}
        for i, var in enumerate(self._vars):
            a, b = self._offsets[i], self._offsets[i + 1]
            shape = var.shape.as_list()
            out[self._names["m"][i]] = full["m"][a:b].reshape(shape).copy()
            out[self._names["v"][i]] = full["v"][a:b].reshape(shape).copy()
        out[self._names["powers"][0]] = np.float32(shard["b1p"])
        out[self._names["powers"][1]] = np.float32(shard["b2p"])
        return out

    def scatter_state(self, session, values, root=0):
        """Collective: ``root``'s full state is cut into this job's slices; every rank keeps its own.

        Parameters
        ----------
        session : Session
        values : dict or None
            At ``root``: ``{name: array}`` as :meth:`gather_state` returns (from any number of ranks, sharded or not)
            or as an unsharded Adam's slot variables hold it; ignored elsewhere.
        root : int
        """
        from . import hvd

        comm = hvd._require().comm
        if self._vars is None:
            return
        parts = None
        if comm.rank == root:
            missing = [name for name in self.state_names() if name not in values]
            if missing:
                raise KeyError(f"scatter_state: no value for {missing[:3]}")
            flat = {k: np.concatenate([np.asarray(values[name], np.float32).reshape(-1) for name in self._names[k]])
                    for k in ("m", "v")}
            powers = tuple(np.float32(values[name]) for name in self._names["powers"])
            parts = []
            for r in range(comm.size):
                a, b = self._slice(comm.size, r)
                parts.append((flat["m"][a:b].copy(), flat["v"][a:b].copy(), powers))
        m, v, (b1p, b2p) = comm.comm.scatter(parts, root=root) if comm.size > 1 else parts[0]
        self._state[session] = {"m": m, "v": v, "b1p": np.float32(b1p), "b2p": np.float32(b2p)}
