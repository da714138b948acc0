"""``tf.Session`` and ``tf.ConfigProto``: running a graph, and the CPU optimizations the learner can switch.

A run (1) works out which ops the fetches need, (2) rewrites that plan with the
graph optimizations that are on (fusion of conv/matmul + bias + ReLU), and (3)
executes it, op after op, or several independent ops at once when
``inter_op_parallelism_threads > 1``. ``intra_op_parallelism_threads`` sets
numba's threads inside each op. With ``WORKSHOP_VERBOSE=1`` every primitive
prints a line, like MKLDNN_VERBOSE: kind, kernel, layout, shapes, milliseconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numba
import numpy as np

from .. import kernels
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
    """

    def __init__(self, kernels="optimized", fusion=True):
        if kernels not in ("optimized", "reference"):
            raise ValueError(f"kernels={kernels!r} must be 'optimized' or 'reference'")
        self.kernels, self.fusion = kernels, bool(fusion)

    def __repr__(self):
        return f"GraphOptions(kernels={self.kernels!r}, fusion={self.fusion})"


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
        self.outputs = [ops[-1].outputs[0]]
        self.control_inputs = [c for op in ops for c in op.control_inputs]

    def compute(self, ctx, x, w, b):
        if self.main.type == "Conv2D":
            a = self.main.attrs
            if ctx.conv_algorithm == "direct":
                y = kernels.conv2d_forward(x, w, a["strides"], a["padding"], a["data_format"], ctx.conv_algorithm)[0]
                y += b
            else:
                n, h, wd, _ = x.shape
                r, s, _, k = w.shape
                pads = kernels._conv_padding(a["padding"], h, wd, r, s, a["strides"])
                cols, (oh, ow) = kernels.im2col_nhwc(np.ascontiguousarray(x), (r, s), a["strides"], pads)
                y = cols @ w.reshape(-1, k)
                y += b  # bias added in the GEMM's output, no extra tensor
                y = y.reshape(n, oh, ow, k)
        else:
            a = self.main.attrs
            y = kernels.gemm_forward(x, w, a["transpose_a"], a["transpose_b"], ctx.gemm_algorithm)[0]
            y += b
        if self.relu:
            np.maximum(y, 0, out=y)
        return (y,)


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
# the run context given to ops


class _RunContext:
    def __init__(self, session):
        self.session = session
        opts = session.config.graph_options
        self.gemm_algorithm = "blas" if opts.kernels == "optimized" else "reference"
        self.conv_algorithm = "im2col" if opts.kernels == "optimized" else "direct"

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
        self.stats = {"runs": 0, "ops_executed": 0}

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
        values = self._execute(targets, feeds)
        out = [None if isinstance(t, Operation) else values[t] for t in targets]
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
               self.config.graph_options.fusion)
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

    def _run_op(self, op, values, ctx, verbose):
        if op.type == "Placeholder":
            raise InvalidArgumentError(
                f"You must feed a value for placeholder tensor '{op.name}' with dtype {op.outputs[0].dtype.name}"
                + (f" and shape {op.outputs[0].shape}" if op.outputs[0].shape.dims is not None else ""))
        if op.type == "VariableV2":
            return (self._variable_value(op.attrs["variable"]),)
        args = [values[t] for t in op.inputs]
        t0 = time.perf_counter() if verbose else 0.0
        result = op.compute(ctx, *args)
        if verbose:
            ms = 1e3 * (time.perf_counter() - t0)
            kernel = ctx.conv_algorithm if "Conv" in op.type else ctx.gemm_algorithm if "MatMul" in op.type else "numpy"
            layout = getattr(op, "attrs", {}).get("data_format", "NHWC") if hasattr(op, "attrs") else \
                op.main.attrs.get("data_format", "-")
            shapes = ",".join(_describe(a) for a in args)
            print(f"workshop_verbose,exec,{op.type},{kernel},{layout},src:{shapes},dst:{_describe(result[0]) if result else '-'}"
                  f",{ms:.3f}", file=sys.stderr)
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
                self._execute_parallel(plan, values, ctx, verbose, intra)
            else:
                for op in plan:
                    for t, v in zip(op.outputs, self._run_op(op, values, ctx, verbose)):
                        values[t] = v
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
