"""``tf.Session`` and ``tf.ConfigProto``: running a graph, and the CPU optimizations the learner can switch.

A run (1) plans: works out which ops the fetches need, in an order where each op comes after its inputs;
(2) rewrites that plan with the graph passes that are on (:mod:`.passes`: fusion, layout propagation);
(3) executes it, entry after entry, or several independent ones at once when
``inter_op_parallelism_threads > 1``; ``intra_op_parallelism_threads`` sets numba's and the BLAS's threads inside each op
(:mod:`workshop_lib.placement`).
The session holds the variables' values; ops reach them, and their random state, through a
:class:`RunContext`. ``WORKSHOP_VERBOSE=1`` prints a line per primitive (:mod:`.trace`).
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numba
import numpy as np

from .. import kernels, runtime
from . import passes
from .core import (
    FailedPreconditionError,
    InvalidArgumentError,
    Operation,
    Tensor,
    Variable,
    _default_session_stack,
    feed_array,
    get_default_graph,
    topological_order,
)
from .options import GraphOptions, RewriterConfig, compute_precision
from .trace import Trace

__all__ = ["ConfigProto", "GraphOptions", "RewriterConfig", "Session", "InteractiveSession", "RunContext"]


class ConfigProto:
    """Session configuration, with TensorFlow 1's field names."""

    def __init__(self, inter_op_parallelism_threads=0, intra_op_parallelism_threads=0, graph_options=None,
                 allow_soft_placement=True, log_device_placement=False, device_count=None):
        for name, value in (("inter_op_parallelism_threads", inter_op_parallelism_threads),
                            ("intra_op_parallelism_threads", intra_op_parallelism_threads)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int (0 means the default)")
        limit = numba.config.NUMBA_NUM_THREADS
        if intra_op_parallelism_threads > limit:
            raise ValueError(f"intra_op_parallelism_threads={intra_op_parallelism_threads} exceeds "
                             f"NUMBA_NUM_THREADS={limit}; set NUMBA_NUM_THREADS before starting Python")
        self.inter_op_parallelism_threads = inter_op_parallelism_threads
        self.intra_op_parallelism_threads = intra_op_parallelism_threads
        self.graph_options = graph_options or GraphOptions()
        self.allow_soft_placement, self.log_device_placement = allow_soft_placement, log_device_placement
        self.gpu_options = GPUOptions()


class GPUOptions:
    """Accepted so that GPU-era scripts run unchanged (``config.gpu_options.visible_device_list = ...``).

    This engine runs on the CPU only; the fields are stored and have no effect.
    """

    def __init__(self, allow_growth=False, visible_device_list="", per_process_gpu_memory_fraction=0.0):
        self.allow_growth, self.visible_device_list = allow_growth, visible_device_list
        self.per_process_gpu_memory_fraction = per_process_gpu_memory_fraction


# ----------------------------------------------------------------------------------------------
# the run context given to ops


class RunContext:
    """What an op sees while a Session runs it: the kernels chosen, the session's variables, its random state.

    An op's ``compute(ctx, *inputs)``, an optimizer's update, a hook and ``hvd``'s collectives use only this:

    - ``read_variable(var)``: the variable's value (the session's own array: an update such as Adam's may
      change it in place, as TensorFlow's ApplyAdam does);
    - ``write_variable(var, value)``: a new value, checked against the variable's dtype and shape;
    - ``rng_for(op)``: the op's random generator, seeded from the graph's and the op's seeds;
    - ``gemm_algorithm``, ``conv_algorithm``, ``layout``: the kernels ``GraphOptions`` chose;
    - ``session``: the Session, as a key for per-session state (``hvd``'s gradient accumulation).
    """

    def __init__(self, session):
        self.session = session
        opts = session.config.graph_options
        self.gemm_algorithm = "blas" if opts.kernels == "optimized" else "reference"
        self.conv_algorithm = "jit" if opts.kernels == "optimized" else "direct"
        self.layout = opts.layout if opts.kernels == "optimized" else "native"

    def read_variable(self, var):
        return self.session.read_variable(var)

    def write_variable(self, var, value):
        self.session.write_variable(var, value)

    def rng_for(self, op):
        session = self.session
        with session._lock:
            if op not in session._rngs:
                graph_seed, op_seed = session.graph.seed, op.attrs.get("seed")
                if graph_seed is None and op_seed is None:
                    session._rngs[op] = np.random.default_rng()
                else:
                    session._rngs[op] = np.random.default_rng(
                        [graph_seed or 0, op_seed if op_seed is not None else session.graph.op_index(op)])
            return session._rngs[op]


class Session:
    """Runs a graph. ``with tf.Session(config=...) as sess: sess.run(fetches, feed_dict)``.

    Variables' values live here; a new session starts with none initialised.
    """

    def __init__(self, target="", graph=None, config=None):
        self.graph = graph or get_default_graph()
        self.config = config or ConfigProto()
        self._variables = {}
        self._rngs = {}
        self._closed = False
        self._plans = {}
        self._liveness = {}  # (plan, fetches) -> the values each entry reads last (see _last_reads)
        self._lock = threading.RLock()
        self.stats = {"runs": 0, "ops_executed": 0, "reorders": 0, "weight_reorders": 0, "fused_gradients": 0,
                      "casts": 0, "weight_casts": 0}
        kernels.keep_freed_memory()  # reuse big temporaries from step to step, as TF's own allocator does

    # context management ---------------------------------------------------------------------
    def __enter__(self):
        _default_session_stack.append(self)
        return self

    def __exit__(self, *exc):
        if _default_session_stack and _default_session_stack[-1] is self:
            _default_session_stack.pop()
        self.close()

    def as_default(self):
        session = self

        class _Default:
            def __enter__(self):
                _default_session_stack.append(session)
                return session

            def __exit__(self, *exc):
                _default_session_stack.pop()

        return _Default()

    def close(self):
        self._closed = True

    @property
    def closed(self):
        return self._closed

    # variables --------------------------------------------------------------------------------
    def write_variable(self, var, value):
        """Set ``var``'s value in this session (a copy of ``value``, checked against its dtype and shape)."""
        value = np.asarray(value)
        want = var.dtype.as_numpy_dtype
        if not np.can_cast(value.dtype, want, casting="same_kind"):
            raise InvalidArgumentError(f"cannot assign a {value.dtype} value to {var.name} of dtype {var.dtype.name}")
        if not var.shape.is_compatible_with(value.shape):
            raise InvalidArgumentError(f"cannot assign a value of shape {value.shape} to {var.name} of shape {var.shape}")
        with self._lock:
            self._variables[var] = np.array(value, dtype=want)

    def read_variable(self, var):
        """``var``'s value in this session: the session's own array (an update op may change it in place)."""
        try:
            return self._variables[var]
        except KeyError:
            raise FailedPreconditionError(
                f"Attempting to use uninitialized value {var.name_prefix}: run tf.global_variables_initializer() "
                "(or the variable's initializer) first") from None

    # running ----------------------------------------------------------------------------------
    def run(self, fetches, feed_dict=None, options=None, run_metadata=None):
        """Evaluate ``fetches`` (a tensor, an op, a name, or nested lists/tuples/dicts of them)."""
        if self._closed:
            raise RuntimeError("Attempted to use a closed Session.")
        flat, rebuild = _flatten(fetches)
        targets = [self._element(f) for f in flat]
        feeds = self._feeds(feed_dict or {})
        with runtime.op_threads(self.config.intra_op_parallelism_threads):  # numba's and the BLAS's threads
            values = self._execute(targets, feeds, Trace())  # WORKSHOP_VERBOSE is read here, once per run
        stored = {id(v) for v in self._variables.values()}
        # a variable's array is updated in place by later runs: hand the caller a copy, as TensorFlow does
        out = [None if isinstance(t, Operation) else (values[t].copy() if id(values[t]) in stored else values[t])
               for t in targets]
        return rebuild(out)

    def _element(self, fetch):
        if fetch is None:
            raise TypeError("fetch argument None is not a tensor or an operation")
        element = self.graph.as_graph_element(fetch) if not isinstance(fetch, (Tensor, Operation)) else fetch
        if isinstance(element, Variable):
            element = element.value()
        if element.graph is not self.graph:
            raise ValueError(f"{element.name} is not an element of this session's graph; run it in a session "
                             "created for its graph (tf.Session(graph=...))")
        return element

    def _feeds(self, feed_dict):
        feeds = {}
        for key, value in feed_dict.items():
            tensor = self._element(key)
            if isinstance(tensor, Operation):
                raise TypeError(f"cannot feed an operation ({tensor.name}); feed its output tensor")
            arr = feed_array(tensor, value)
            if not tensor.shape.is_compatible_with(arr.shape):
                raise InvalidArgumentError(f"cannot feed a value of shape {arr.shape} to {tensor.name}, "
                                           f"which has shape {tensor.shape}")
            feeds[tensor] = arr
        return feeds

    def _plan(self, targets, feeds):
        """The entries to execute, each after its inputs, rewritten by the graph passes that are on."""
        opts = self.config.graph_options
        layout = opts.layout if opts.kernels == "optimized" else "native"
        precision = compute_precision(opts)
        key = (tuple(id(t) for t in targets), frozenset(id(t) for t in feeds), self.graph.version, opts.fusion, layout,
               precision)
        if key in self._plans:
            return self._plans[key]
        roots = [t if isinstance(t, Operation) else t.op for t in targets if not (isinstance(t, Tensor) and t in feeds)]
        plan = topological_order(reversed(roots), lambda op: [t.op for t in op.inputs if t not in feeds]
                                 + list(op.control_inputs))
        fetched = {t for t in targets if isinstance(t, Tensor)}
        if opts.fusion:
            plan = passes.fuse_gradients(passes.fuse(plan, fetched), fetched)
        if precision == "bf16":
            plan = passes.mixed_precision(plan, fetched)
        if layout == "blocked":
            plan = passes.propagate_layout(plan, fetched)
        self._plans[key] = plan, {**passes.reorder_counts(plan), **passes.cast_counts(plan)}, \
            passes.fused_gradient_count(plan)
        return self._plans[key]

    def _last_reads(self, plan, targets):
        """For each entry of ``plan``, the values no later entry reads and nobody fetched: freed after it runs.

        A step's large temporaries (im2col columns, activations' gradients) then go back to the allocator as
        soon as they are dead, and the next ones reuse that memory while it is still in cache.
        """
        key = (id(plan), tuple(id(t) for t in targets))
        if key not in self._liveness:
            keep, seen, reads = {t for t in targets if isinstance(t, Tensor)}, set(), []
            for entry in reversed(plan):
                dead = [t for t in entry.inputs if t not in seen and t not in keep]
                seen.update(entry.inputs)
                dead += [t for t in entry.outputs if t not in seen and t not in keep]  # outputs nobody reads
                reads.append(dead)
            self._liveness[key] = reads[::-1]
        return self._liveness[key]

    def _run_entry(self, entry, values, ctx, trace):
        args = [values[t] for t in entry.inputs]
        t0 = trace.start()
        result = entry.compute(ctx, *args)
        trace.record(entry, ctx, args, result, t0)
        return result

    def _execute(self, targets, feeds, trace):
        plan, reorders, fused_gradients = self._plan(targets, feeds)
        ctx = RunContext(self)
        values = dict(feeds)
        intra = self.config.intra_op_parallelism_threads
        previous = numba.get_num_threads()
        intra = intra if intra != previous else 0  # op_threads set it already: no second call per run
        if intra:
            runtime.set_numba_threads(intra)
        try:
            if self.config.inter_op_parallelism_threads > 1 and len(plan) > 2:
                self._execute_parallel(plan, values, ctx, trace, intra or numba.get_num_threads())
            elif trace.on:
                for entry in plan:
                    values.update(zip(entry.outputs, self._run_entry(entry, values, ctx, trace)))
            else:  # the same loop without the trace's two calls per entry, freeing each value after its last reader
                for entry, last_read in zip(plan, self._last_reads(plan, targets)):
                    values.update(zip(entry.outputs, entry.compute(ctx, *[values[t] for t in entry.inputs])))
                    for t in last_read:
                        values.pop(t, None)
        finally:
            if intra:
                runtime.set_numba_threads(previous)
        self.stats["runs"] += 1
        for stat, count in reorders.items():
            self.stats[stat] += count
        self.stats["ops_executed"] += len(plan) - sum(reorders.values())
        self.stats["fused_gradients"] += fused_gradients
        return values

    def _execute_parallel(self, plan, values, ctx, trace, intra):
        """Run ops whose inputs are ready concurrently on ``inter_op_parallelism_threads`` threads."""
        produced_by, in_plan = {t: op for op in plan for t in op.outputs}, set(plan)
        deps = {op: {produced_by[t] for t in op.inputs if t in produced_by} |
                {c for c in op.control_inputs if c in in_plan} for op in plan}
        # collectives (hvd's allreduce, broadcast, ...) must run in the same order on every rank, or two ranks
        # wait in different collectives for ever: chain them in plan order, which is the same on every rank
        collectives = [op for op in plan if op.attrs.get("collective")]
        for before, after in zip(collectives, collectives[1:]):
            deps[after].add(before)
        waiting = {op: set(d) for op, d in deps.items()}
        users = {}
        for op, d in deps.items():
            for dep in d:
                users.setdefault(dep, []).append(op)

        def job(op):
            if intra:
                runtime.set_numba_threads(intra)
            return op, self._run_entry(op, values, ctx, trace)

        with ThreadPoolExecutor(self.config.inter_op_parallelism_threads) as pool:
            running = {pool.submit(job, op) for op, d in waiting.items() if not d}
            started = {op for op, d in waiting.items() if not d}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    op, result = future.result()
                    values.update(zip(op.outputs, result))
                    for user in users.get(op, []):
                        waiting[user].discard(op)
                        if not waiting[user] and user not in started:
                            started.add(user)
                            running.add(pool.submit(job, user))


class InteractiveSession(Session):
    """A Session that makes itself the default on creation, for notebooks."""

    def __init__(self, target="", graph=None, config=None):
        super().__init__(target, graph, config)
        _default_session_stack.append(self)

    def close(self):
        if self in _default_session_stack:
            _default_session_stack.remove(self)
        super().close()


def _flatten(fetches):
    """Flatten nested fetches; return (flat list, function rebuilding the structure from flat values)."""
    if isinstance(fetches, dict):
        keys = list(fetches)
        parts = [_flatten(fetches[k]) for k in keys]
        flat = [x for p, _ in parts for x in p]

        def rebuild(values):
            out, i = {}, 0
            for k, (p, r) in zip(keys, parts):
                out[k] = r(values[i : i + len(p)])
                i += len(p)
            return type(fetches)(out) if type(fetches) is not dict else out

        return flat, rebuild
    if isinstance(fetches, (list, tuple)):
        parts = [_flatten(f) for f in fetches]
        flat = [x for p, _ in parts for x in p]

        def rebuild(values):
            out, i = [], 0
            for p, r in parts:
                out.append(r(values[i : i + len(p)]))
                i += len(p)
            if hasattr(fetches, "_fields"):  # namedtuple
                return type(fetches)(*out)
            return type(fetches)(out)

        return flat, rebuild
    return [fetches], lambda values: values[0]
