"""``tf.Session`` and ``tf.ConfigProto``: running a graph, and the CPU optimizations the learner can switch.

A run (1) works out which ops the fetches need, (2) rewrites that plan with the
graph optimizations that are on (fusion of conv/matmul + bias + ReLU), and (3)
executes it, op after op, or several independent ops at once when
``inter_op_parallelism_threads > 1``. ``intra_op_parallelism_threads`` sets
numba's and the BLAS's threads inside each op. With ``WORKSHOP_VERBOSE=1`` every
primitive prints a line, like MKLDNN_VERBOSE: kind, kernel, layout, shapes, milliseconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numba
import numpy as np

from .. import kernels, placement
from .core import (
    FailedPreconditionError,
    InvalidArgumentError,
    Operation,
    Tensor,
    Variable,
    _default_session_stack,
    get_default_graph,
)

__all__ = ["ConfigProto", "GraphOptions", "Session", "InteractiveSession"]


class GraphOptions:
    """The graph optimizations of this course.

    kernels : "optimized" (im2col + BLAS convolutions, BLAS matmul) or "reference" (direct loops)
    fusion : fuse Conv2D/MatMul + BiasAdd (+ Relu) into one primitive
    layout : "native" (every op in the graph's layout) or "blocked" (layout propagation: convolutions with
        16 or more input channels, and the pooling and ReLU after them, run in nChw16c; values stay blocked
        from op to op and are reordered only where a plain-layout op needs them; counted in Session.stats).
        It applies where no gradient needs the ops' workspaces, i.e. to inference.
    """

    def __init__(self, kernels="optimized", fusion=True, layout="native"):
        if kernels not in ("optimized", "reference"):
            raise ValueError(f"kernels={kernels!r} must be 'optimized' or 'reference'")
        if layout not in ("native", "blocked"):
            raise ValueError(f"layout={layout!r} must be 'native' or 'blocked'")
        self.kernels, self.fusion, self.layout = kernels, bool(fusion), layout

    def __repr__(self):
        return f"GraphOptions(kernels={self.kernels!r}, fusion={self.fusion}, layout={self.layout!r})"


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
# fused primitives


class _FusedOp:
    """A plan entry that replaces conv/matmul -> BiasAdd (-> Relu): computes the last tensor in one pass."""

    def __init__(self, ops):
        self.ops = ops
        self.main, self.bias_op = ops[0], ops[1]
        self.relu = len(ops) == 3
        self.type = "_Fused" + self.main.type + ("BiasAddRelu" if self.relu else "BiasAdd")
        self.name = self.main.name + "/fused"
        self.inputs = list(self.main.inputs) + [self.bias_op.inputs[1]]
        # a fused convolution still provides the convolution's workspace (im2col columns) to its gradient
        self.outputs = [ops[-1].outputs[0]] + (self.main.outputs[1:] if self.main.type == "Conv2D" else [])
        self.control_inputs = [c for op in ops for c in op.control_inputs]

    def compute(self, ctx, x, w, b):
        a = self.main.attrs
        if self.main.type == "Conv2D":
            y, cache = kernels.conv2d_forward(x, w, a["strides"], a["padding"], a["data_format"], ctx.conv_algorithm)
            cols = cache[5]  # im2col's columns (None for the direct kernel): the workspace the gradient reuses
            y += b if a["data_format"] == "NHWC" else b.reshape(-1, 1, 1)
        else:
            y = kernels.gemm_forward(x, w, a["transpose_a"], a["transpose_b"], ctx.gemm_algorithm)[0]
            y += b  # bias added to the GEMM's output in place: no extra tensor
        if self.relu:
            np.maximum(y, 0, out=y)
        return (y, cols) if self.main.type == "Conv2D" else (y,)


def _is_bias_add(op, main_output):
    """BiasAdd, or an Add of a 1-D bias over the last (channel) axis, as ``conv2d(x, W) + b`` is written."""
    if op.inputs[0] is not main_output:
        return False
    if op.type == "BiasAdd":
        return op.attrs["data_format"] == "NHWC" or main_output.op.type == "MatMul"
    if op.type != "Add":
        return False
    bias_shape, out_shape = op.inputs[1].shape.dims, main_output.shape.dims
    channels_last = main_output.op.type == "MatMul" or main_output.op.attrs.get("data_format") == "NHWC"
    return (channels_last and bias_shape is not None and len(bias_shape) == 1 and out_shape is not None
            and bias_shape[0] is not None and bias_shape[0] == out_shape[-1])


def _fuse(plan, needed_outputs):
    """Replace Conv2D/MatMul -> BiasAdd (-> Relu) chains whose intermediate results nothing else uses."""
    consumers = {}
    for op in plan:
        for t in op.inputs:
            consumers.setdefault(t, []).append(op)
    fused, out = set(), []
    replacement = {}
    for op in plan:
        if op in fused or op.type not in ("Conv2D", "MatMul"):
            continue
        t = op.outputs[0]
        users = consumers.get(t, [])
        if len(users) != 1 or not _is_bias_add(users[0], t) or t in needed_outputs:
            continue
        chain = [op, users[0]]
        bt = users[0].outputs[0]
        busers = consumers.get(bt, [])
        if len(busers) == 1 and busers[0].type == "Relu" and bt not in needed_outputs:
            chain.append(busers[0])
        fused.update(chain)
        replacement[chain[-1]] = _FusedOp(chain)
    for op in plan:
        if op in replacement:
            out.append(replacement[op])
        elif op not in fused:
            out.append(op)
    # a fused entry must run where its last op ran, but its inputs come from earlier ops: the order stays valid
    return out


# ----------------------------------------------------------------------------------------------
# layout propagation: values that stay in nChw16c between ops


class _Blocked:
    """A 4-D activation held in nChw16c; ``plain()`` reorders it back (once, counted)."""

    def __init__(self, data, channels, data_format, session):
        self.data, self.channels, self.data_format, self._session = data, channels, data_format, session
        self._plain = None

    def plain(self):
        if self._plain is None:
            t0 = time.perf_counter()
            self._plain = kernels.from_blocked(self.data, self.channels, self.data_format)
            self._session._count_reorder("nChw16c->" + self.data_format.lower(), self._plain, t0)
        return self._plain


def _blocked_role(op, consumed, in_values):
    """How ``op`` runs under layout propagation: "conv", "pool", "relu", or None (plain layout)."""
    main = op.main if isinstance(op, _FusedOp) else op
    if main.type == "Conv2D":
        if main.outputs[1] in consumed:  # a gradient needs the im2col workspace: stay plain
            return None
        x = in_values[0]
        channels = x.channels if isinstance(x, _Blocked) else x.shape[3 if main.attrs["data_format"] == "NHWC" else 1]
        return "conv" if channels >= kernels.BLOCK else None
    if main.type in ("MaxPool", "AvgPool") and isinstance(in_values[0], _Blocked) and main.outputs[1] not in consumed:
        return "pool"
    if main.type == "Relu" and isinstance(in_values[0], _Blocked):
        return "relu"
    return None


# ----------------------------------------------------------------------------------------------
# the run context given to ops


class _RunContext:
    def __init__(self, session):
        self.session = session
        opts = session.config.graph_options
        self.gemm_algorithm = "blas" if opts.kernels == "optimized" else "reference"
        self.conv_algorithm = "im2col" if opts.kernels == "optimized" else "direct"
        self.layout = opts.layout if opts.kernels == "optimized" else "native"

    def rng_for(self, op):
        return self.session._rng_for(op)


def _describe(value):
    shape = np.shape(value) if isinstance(value, np.ndarray) else ()
    return "x".join(str(d) for d in shape) or "scalar"


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
        self._lock = threading.RLock()
        self.stats = {"runs": 0, "ops_executed": 0, "reorders": 0, "weight_reorders": 0}
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

    def _count_reorder(self, kind, value, t0, weights=False):
        self.stats["weight_reorders" if weights else "reorders"] += 1
        if os.environ.get("WORKSHOP_VERBOSE", "0") not in ("", "0"):
            print(f"workshop_verbose,exec,reorder,{kind},{_describe(value)},{1e3 * (time.perf_counter() - t0):.3f}",
                  file=sys.stderr)

    # variables --------------------------------------------------------------------------------
    def _set_variable(self, var, value):
        value = np.asarray(value)
        want = var.dtype.as_numpy_dtype
        if not np.can_cast(value.dtype, want, casting="same_kind"):
            raise InvalidArgumentError(f"cannot assign a {value.dtype} value to {var.name} of dtype {var.dtype.name}")
        if not var.shape.is_compatible_with(value.shape):
            raise InvalidArgumentError(f"cannot assign a value of shape {value.shape} to {var.name} of shape {var.shape}")
        with self._lock:
            self._variables[var] = np.array(value, dtype=want)

    def _variable_value(self, var):
        try:
            return self._variables[var]
        except KeyError:
            raise FailedPreconditionError(
                f"Attempting to use uninitialized value {var.name_prefix}: run tf.global_variables_initializer() "
                "(or the variable's initializer) first") from None

    def _rng_for(self, op):
        with self._lock:
            if op not in self._rngs:
                graph_seed = self.graph.seed
                op_seed = op.attrs.get("seed")
                if graph_seed is None and op_seed is None:
                    self._rngs[op] = np.random.default_rng()
                else:
                    index = self.graph._ops.index(op)
                    self._rngs[op] = np.random.default_rng(
                        [graph_seed or 0, op_seed if op_seed is not None else index])
            return self._rngs[op]

    # running ----------------------------------------------------------------------------------
    def run(self, fetches, feed_dict=None, options=None, run_metadata=None):
        """Evaluate ``fetches`` (a tensor, an op, a name, or nested lists/tuples/dicts of them)."""
        if self._closed:
            raise RuntimeError("Attempted to use a closed Session.")
        flat, rebuild = _flatten(fetches)
        targets = [self._element(f) for f in flat]
        feeds = self._feeds(feed_dict or {})
        with placement.op_threads(self.config.intra_op_parallelism_threads):  # numba's and the BLAS's threads
            values = self._execute(targets, feeds)
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
            arr = np.asarray(value)
            want = tensor.dtype.as_numpy_dtype
            if arr.dtype != want:
                if arr.dtype.kind in "OUS" or (arr.dtype.kind == "f" and np.dtype(want).kind in "iub"):
                    raise InvalidArgumentError(f"cannot feed a {arr.dtype} value to {tensor.name} of dtype "
                                               f"{tensor.dtype.name}")
                arr = arr.astype(want)
            if not tensor.shape.is_compatible_with(arr.shape):
                raise InvalidArgumentError(f"cannot feed a value of shape {arr.shape} to {tensor.name}, "
                                           f"which has shape {tensor.shape}")
            feeds[tensor] = arr
        return feeds

    def _plan(self, targets, feeds):
        key = (tuple(id(t) for t in targets), frozenset(id(t) for t in feeds), self.graph._version,
               self.config.graph_options.fusion)  # kernels and layout do not change the plan
        if key in self._plans:
            return self._plans[key]
        needed_ops, order = set(), []
        stack = [(t if isinstance(t, Operation) else t.op, False) for t in targets if not (isinstance(t, Tensor)
                                                                                             and t in feeds)]
        while stack:
            op, done = stack.pop()
            if done:
                order.append(op)
                continue
            if op in needed_ops:
                continue
            needed_ops.add(op)
            stack.append((op, True))
            for t in op.inputs:
                if t not in feeds and t.op not in needed_ops:
                    stack.append((t.op, False))
            for c in op.control_inputs:
                if c not in needed_ops:
                    stack.append((c, False))
        if self.config.graph_options.fusion:
            order = _fuse(order, {t for t in targets if isinstance(t, Tensor)})
        self._plans[key] = order
        return order

    def _run_blocked(self, op, role, args, ctx):
        """Run ``op`` in nChw16c (inputs reordered in only if they arrive plain); returns its outputs."""
        main = op.main if isinstance(op, _FusedOp) else op
        fmt = main.attrs["data_format"]
        x = args[0]
        if role == "conv":
            if not isinstance(x, _Blocked):
                t0 = time.perf_counter()
                x = _Blocked(kernels.to_blocked(x, fmt), x.shape[3 if fmt == "NHWC" else 1], fmt, self)
                self._count_reorder(fmt.lower() + "->nChw16c", x.data, t0)
            t0 = time.perf_counter()
            wb = kernels.weights_to_blocked(args[1])
            self._count_reorder("hwio->OIhw16i16o", wb, t0, weights=True)
            bias = args[2] if isinstance(op, _FusedOp) else None
            relu = isinstance(op, _FusedOp) and op.relu
            out = kernels.conv2d_blocked_forward(x.data, wb, main.attrs["strides"], main.attrs["padding"], bias, relu)
            return (_Blocked(out, args[1].shape[3], fmt, self), None)
        if role == "pool":
            n, cb, h, w, blk = x.data.shape
            forward = kernels.maxpool_forward if main.type == "MaxPool" else kernels.avgpool_forward
            pooled = forward(x.data.reshape(n * cb, h, w, blk), main.attrs["ksize"], main.attrs["strides"],
                             main.attrs["padding"], "NHWC")[0]
            return (_Blocked(pooled.reshape(n, cb, *pooled.shape[1:]), x.channels, fmt, self), None)
        return (_Blocked(np.maximum(x.data, 0), x.channels, x.data_format, self),)  # relu keeps padding at 0

    def _run_op(self, op, values, ctx, verbose, consumed=None):
        if op.type == "Placeholder":
            raise InvalidArgumentError(
                f"You must feed a value for placeholder tensor '{op.name}' with dtype {op.outputs[0].dtype.name}"
                + (f" and shape {op.outputs[0].shape}" if op.outputs[0].shape.dims is not None else ""))
        if op.type == "VariableV2":
            return (self._variable_value(op.attrs["variable"]),)
        args = [values[t] for t in op.inputs]
        role = None
        if ctx.layout == "blocked" and consumed is not None and args:
            role = _blocked_role(op, consumed, args)
        t0 = time.perf_counter() if verbose else 0.0
        if role:
            result = self._run_blocked(op, role, args, ctx)
        else:
            args = [a.plain() if isinstance(a, _Blocked) else a for a in args]
            result = op.compute(ctx, *args)
        if verbose:
            ms = 1e3 * (time.perf_counter() - t0)
            kernel = "blocked" if role else ctx.conv_algorithm if "Conv" in op.type else \
                ctx.gemm_algorithm if "MatMul" in op.type else "numpy"
            attrs = op.main.attrs if isinstance(op, _FusedOp) else op.attrs
            layout = "nChw16c" if role else attrs.get("data_format", "-")
            shapes = ",".join(_describe(a.data if isinstance(a, _Blocked) else a) for a in args)
            out = result[0].data if result and isinstance(result[0], _Blocked) else (result[0] if result else None)
            print(f"workshop_verbose,exec,{op.type},{kernel},{layout},src:{shapes},dst:{_describe(out)},{ms:.3f}",
                  file=sys.stderr)
        return result

    def _execute(self, targets, feeds):
        plan = self._plan(targets, feeds)
        ctx = _RunContext(self)
        values = dict(feeds)
        verbose = os.environ.get("WORKSHOP_VERBOSE", "0") not in ("", "0")
        intra = self.config.intra_op_parallelism_threads
        previous = numba.get_num_threads()
        if intra:
            numba.set_num_threads(intra)
        try:
            if self.config.inter_op_parallelism_threads > 1 and len(plan) > 2:
                self._execute_parallel(plan, values, ctx, verbose, intra or numba.get_num_threads())
            else:
                consumed = {t for op in plan for t in op.inputs}
                for op in plan:
                    for t, v in zip(op.outputs, self._run_op(op, values, ctx, verbose, consumed)):
                        values[t] = v
                for t in targets:  # what is fetched leaves the session in the graph's own layout
                    if isinstance(t, Tensor) and isinstance(values.get(t), _Blocked):
                        values[t] = values[t].plain()
        finally:
            if intra:
                numba.set_num_threads(previous)
        self.stats["runs"] += 1
        self.stats["ops_executed"] += len(plan)
        return values

    def _execute_parallel(self, plan, values, ctx, verbose, intra):
        """Run ops whose inputs are ready concurrently on ``inter_op_parallelism_threads`` threads."""
        produced_by = {t: op for op in plan for t in op.outputs}
        deps = {op: {produced_by[t] for t in op.inputs if t in produced_by} |
                {c for c in op.control_inputs if c in set(plan)} for op in plan}
        # collectives (hvd's allreduce, broadcast, ...) must run in the same order on every rank, or two ranks
        # wait in different collectives for ever: chain them in plan order, which is the same on every rank
        collectives = [op for op in plan if getattr(op, "attrs", {}).get("collective")]
        for before, after in zip(collectives, collectives[1:]):
            deps[after].add(before)
        waiting = {op: set(d) for op, d in deps.items()}
        users = {}
        for op, d in deps.items():
            for dep in d:
                users.setdefault(dep, []).append(op)

        def job(op):
            if intra:
                numba.set_num_threads(intra)
            return op, self._run_op(op, values, ctx, verbose)

        with ThreadPoolExecutor(self.config.inter_op_parallelism_threads) as pool:
            running = {pool.submit(job, op) for op, d in waiting.items() if not d}
            started = {op for op, d in waiting.items() if not d}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    op, result = future.result()
                    for t, v in zip(op.outputs, result):
                        values[t] = v
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
