"""The graph: dtypes, Graph, Operation, Tensor, scopes, Variable.

Define-then-run, as TensorFlow 1: building a graph computes nothing; every
op records its inputs, a ``compute`` function (forward) and, right beside it,
a ``grad`` function that *builds* the gradient ops. A Session runs the graph.
"""

from __future__ import annotations

import contextlib
import re
import threading

import numpy as np

# ----------------------------------------------------------------------------------------------
# dtypes


class DType:
    def __init__(self, name, np_dtype):
        self.name, self.as_numpy_dtype = name, np_dtype
        self.base_dtype = self

    @property
    def is_floating(self):
        return np.issubdtype(self.as_numpy_dtype, np.floating)

    @property
    def is_integer(self):
        return np.issubdtype(self.as_numpy_dtype, np.integer)

    def __repr__(self):
        return f"tf.{self.name}"

    def __eq__(self, other):
        return isinstance(other, DType) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


float16 = DType("float16", np.float16)
float32 = DType("float32", np.float32)
float64 = DType("float64", np.float64)
int32 = DType("int32", np.int32)
int64 = DType("int64", np.int64)
uint8 = DType("uint8", np.uint8)
int8 = DType("int8", np.int8)
bool_ = DType("bool", np.bool_)
_DTYPES = {d.name: d for d in (float16, float32, float64, int32, int64, uint8, int8, bool_)}


def as_dtype(value):
    """A DType from a DType, a numpy dtype or a name."""
    if value is None or isinstance(value, DType):
        return value
    name = np.dtype(value).name
    if name not in _DTYPES:
        raise TypeError(f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------
# errors, with TensorFlow's names


class OpError(Exception):
    """Base of the errors raised while running a graph."""


class InvalidArgumentError(OpError, ValueError):
    pass


class FailedPreconditionError(OpError, RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# shapes


class TensorShape:
    """A static shape: a list of dimensions, each an int or None (unknown); or fully unknown (dims None)."""

    def __init__(self, dims):
        if isinstance(dims, TensorShape):
            dims = dims.dims
        self.dims = None if dims is None else [None if d is None else int(d) for d in dims]

    @property
    def ndims(self):
        return None if self.dims is None else len(self.dims)

    def as_list(self):
        if self.dims is None:
            raise ValueError("as_list() is not defined on an unknown TensorShape")
        return list(self.dims)

    def is_compatible_with(self, shape):
        if self.dims is None:
            return True
        shape = tuple(shape)
        return len(shape) == len(self.dims) and all(d is None or d == s for d, s in zip(self.dims, shape))

    def __iter__(self):
        return iter(self.dims or [])

    def __len__(self):
        return len(self.as_list())

    def __getitem__(self, i):
        return self.as_list()[i]

    def __eq__(self, other):
        other = other if isinstance(other, TensorShape) else TensorShape(other)
        return self.dims == other.dims

    def __repr__(self):
        if self.dims is None:
            return "<unknown>"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ("," if len(self.dims) == 1 else "") + ")"


# ----------------------------------------------------------------------------------------------
# Graph, Operation, Tensor


class Graph:
    """A graph of operations. ``with g.as_default():`` makes it the one new ops go into."""

    def __init__(self):
        self._ops = []
        self._names = {}
        self._name_stack = []
        self._collections = {}
        self._lock = threading.RLock()
        self.seed = None
        self._version = 0

    @property
    def version(self):
        """Counts the ops added so far: a plan made for one version is valid as long as it does not change."""
        return self._version

    def op_index(self, op):
        """The position of ``op`` in creation order (what a random op's default seed is made from)."""
        return self._ops.index(op)

    # names ---------------------------------------------------------------------------------
    def unique_name(self, name):
        base = "/".join([*self._name_stack, name]) if self._name_stack else name
        with self._lock:
            count = self._names.get(base, 0)
            self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    @contextlib.contextmanager
    def name_scope(self, name):
        if name is None or name == "":
            yield "/".join(self._name_stack)
            return
        if name.endswith("/"):  # an absolute scope from a previous name_scope
            scope, pushed = name.rstrip("/"), name.rstrip("/").split("/")
            old = self._name_stack
            self._name_stack = pushed
            try:
                yield scope + "/"
            finally:
                self._name_stack = old
            return
        full = self.unique_name(name)  # the current scope plus name, made unique
        old = self._name_stack
        self._name_stack = full.split("/")
        try:
            yield full + "/"
        finally:
            self._name_stack = old

    # ops -----------------------------------------------------------------------------------
    def _add_op(self, op):
        if getattr(self, "_finalized", False):
            raise RuntimeError(f"Graph is finalized and cannot be modified (adding {op.type} '{op.name}')")
        with self._lock:
            self._ops.append(op)
            self._version += 1

    def get_operations(self):
        return list(self._ops)

    def get_operation_by_name(self, name):
        for op in self._ops:
            if op.name == name:
                return op
        raise KeyError(f"the graph has no operation named {name!r}")

    def get_tensor_by_name(self, name):
        if ":" not in name:
            raise ValueError(f"tensor names look like 'op_name:0'; got {name!r}")
        op_name, index = name.rsplit(":", 1)
        op = self.get_operation_by_name(op_name)
        if not index.isdigit() or int(index) >= len(op.outputs):
            raise ValueError(f"tensor name {name!r}: {op_name!r} has {len(op.outputs)} output(s), so the index after "
                             f"':' must be 0 to {len(op.outputs) - 1}; got {index!r}")
        return op.outputs[int(index)]

    def as_graph_element(self, obj):
        if isinstance(obj, (Tensor, Operation)):
            return obj
        if isinstance(obj, Variable):
            return obj.value()
        if isinstance(obj, str):
            return self.get_tensor_by_name(obj) if ":" in obj else self.get_operation_by_name(obj)
        raise TypeError(f"{obj!r} is not a tensor, an operation or a name of one")

    # collections ---------------------------------------------------------------------------
    def add_to_collection(self, name, value):
        self._collections.setdefault(name, []).append(value)

    def get_collection(self, name, scope=None):
        items = self._collections.get(name, [])
        if scope is None:
            return list(items)
        pattern = re.compile(scope)
        return [v for v in items if pattern.match(getattr(v, "name", ""))]

    @contextlib.contextmanager
    def as_default(self):
        _default_stack.append(self)
        try:
            yield self
        finally:
            _default_stack.pop()

    def finalize(self):
        self._finalized = True


class Operation:
    """A node: ``type``, ``inputs`` (Tensors), ``outputs`` (Tensors), ``compute``, ``grad`` and attributes."""

    def __init__(self, graph, op_type, name, inputs, compute, n_outputs, dtypes, shapes, grad=None, attrs=None,
                 control_inputs=(), stateful=False):
        self.graph, self.type, self.name = graph, op_type, name
        self.inputs = list(inputs)
        self.compute, self.grad = compute, grad
        self.attrs = dict(attrs or {})
        self.control_inputs = list(control_inputs) + list(_control_dependencies_stack[-1] if _control_dependencies_stack else [])
        self.stateful = stateful
        self.outputs = [Tensor(self, i, dtypes[i], shapes[i]) for i in range(n_outputs)]
        graph._add_op(self)

    def get_attr(self, name):
        return self.attrs[name]

    def run(self, feed_dict=None, session=None):
        (session or get_default_session()).run(self, feed_dict)

    def __repr__(self):
        return f"<tf.Operation '{self.name}' type={self.type}>"


class Tensor:
    """An output of an operation: ``name`` is ``op_name:index``; ``shape`` is static (None where unknown)."""

    def __init__(self, op, value_index, dtype, shape):
        self.op, self.value_index, self.dtype = op, value_index, dtype
        self._shape = TensorShape(shape) if shape is not None else TensorShape(None)

    @property
    def name(self):
        return f"{self.op.name}:{self.value_index}"

    @property
    def graph(self):
        return self.op.graph

    @property
    def shape(self):
        return self._shape

    def get_shape(self):
        return self._shape

    def set_shape(self, shape):
        self._shape = TensorShape(shape)

    def eval(self, feed_dict=None, session=None):
        return (session or get_default_session()).run(self, feed_dict)

    def consumers(self):
        return [op for op in self.graph._ops if any(t is self for t in op.inputs)]

    def __repr__(self):
        return f"<tf.Tensor '{self.name}' shape={self._shape} dtype={self.dtype.name}>"

    __hash__ = object.__hash__

    # operators are attached by ops.py (they build graph ops)


# ----------------------------------------------------------------------------------------------
# default graph, scopes, control dependencies

_default_graph = Graph()
_default_stack = []
_default_session_stack = []
_control_dependencies_stack = []


def get_default_graph() -> Graph:
    return _default_stack[-1] if _default_stack else _default_graph


def reset_default_graph():
    global _default_graph
    if _default_stack:
        raise AssertionError("reset_default_graph() inside a `with graph.as_default():` block")
    _default_graph = Graph()


def get_default_session():
    if not _default_session_stack:
        raise ValueError("no default session: pass session=..., or use `with tf.Session() as sess:`")
    return _default_session_stack[-1]


def name_scope(name, default_name=None, values=None):
    return get_default_graph().name_scope(name if name is not None else default_name)


@contextlib.contextmanager
def control_dependencies(control_inputs):
    ops = [t.op if isinstance(t, Tensor) else t for t in (control_inputs or [])]
    _control_dependencies_stack.append(list(_control_dependencies_stack[-1] if _control_dependencies_stack else []) + ops)
    try:
        yield
    finally:
        _control_dependencies_stack.pop()


class _VariableScope:
    def __init__(self, name, reuse):
        self.name, self.reuse = name, reuse


_variable_scopes = []


@contextlib.contextmanager
def variable_scope(name_or_scope, default_name=None, reuse=None, values=None):
    """Prefix variable names (and op names) with a scope; ``reuse=True`` lets get_variable return existing ones."""
    name = name_or_scope.name if isinstance(name_or_scope, _VariableScope) else (name_or_scope or default_name)
    outer = _variable_scopes[-1] if _variable_scopes else None
    full = f"{outer.name}/{name}" if outer and outer.name else name
    inherited = reuse if reuse is not None else (outer.reuse if outer else False)
    scope = _VariableScope(full, inherited)
    _variable_scopes.append(scope)
    try:
        with get_default_graph().name_scope(name):
            yield scope
    finally:
        _variable_scopes.pop()


def get_variable_scope():
    return _variable_scopes[-1] if _variable_scopes else _VariableScope("", False)


def _check_graph(tensors, graph):
    for t in tensors:
        if isinstance(t, Tensor) and t.graph is not graph:
            raise ValueError(f"tensor {t.name} belongs to another graph than the one this op is built in; "
                             "build every op of a computation inside the same `with graph.as_default():`")


def convert_to_tensor(value, dtype=None, name=None):
    """A Tensor from a Tensor, a Variable, or a Python/numpy value (which becomes a constant)."""
    if isinstance(value, Tensor):
        if dtype is not None and as_dtype(dtype) != value.dtype:
            raise TypeError(f"tensor {value.name} has dtype {value.dtype.name}, expected {as_dtype(dtype).name}")
        return value
    if isinstance(value, Variable):
        return value.value()
    from .ops import constant

    return constant(value, dtype=dtype, name=name or "Const")


def topological_order(roots, dependencies):
    """``roots`` and every op they depend on, each after its dependencies (an iterative depth-first search).

    ``dependencies(op)`` lists the ops ``op`` needs; roots are explored one after the other, in their order.
    The Session plans a run with it, ``tf.gradients`` orders the ops between xs and ys.
    """
    order, seen = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            op, done = stack.pop()
            if done:
                order.append(op)
                continue
            if op in seen:
                continue
            seen.add(op)
            stack.append((op, True))
            stack.extend((d, False) for d in dependencies(op) if d not in seen)
    return order


def feed_array(tensor, value):
    """``value`` as an array of ``tensor``'s dtype, the way ``Session.run`` feeds it; a lossy feed raises.

    As in TensorFlow, a feed may change dtype only when every value survives: integers
    into a narrower integer type only when they are in its range (int64 2**40 + 7 into an
    int32 placeholder raises; a cast would wrap it to 7), integers into floats only when
    exactly representable, floats into a narrower float only when no finite value
    overflows (float64 into float32 rounds, as TensorFlow does). Floats into integers,
    and strings or objects, raise.

    Parameters
    ----------
    tensor : Tensor
        The fed tensor (a placeholder's output, usually).
    value : array_like
        What the caller feeds.

    Returns
    -------
    numpy.ndarray
        ``value`` with ``tensor``'s dtype (the array itself when it already has it).

    Raises
    ------
    InvalidArgumentError
        Naming the tensor, the dtype fed, the offending value and the dtype expected.
    """
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # a ragged list: numpy's "inhomogeneous shape"
        raise InvalidArgumentError(f"cannot feed {tensor.name} a ragged value (rows of different lengths): {exc}; "
                                   f"expected an array of shape {tensor.shape}") from None
    want = np.dtype(tensor.dtype.as_numpy_dtype)
    if arr.dtype == want:
        return arr
    problem = _lossy_feed(arr, want)
    if problem is not None:
        article = "an" if arr.dtype.name[:1] in ("i", "o") else "a"  # an int64, an object; a uint8, a float64
        raise InvalidArgumentError(f"cannot feed {article} {arr.dtype} value to {tensor.name} of dtype "
                                   f"{tensor.dtype.name}{problem}")
    return arr.astype(want)


def _lossy_feed(arr, want):
    """None if ``arr`` converts to ``want`` without changing a value, else what would be lost (``: ...``)."""
    kind = arr.dtype.kind
    if kind not in "biuf":
        return "; feed a numeric array"
    if kind == "f" and want.kind in "biu":
        return f"; convert it first (np.rint(x).astype(np.{want.name})) or declare a float placeholder"
    if arr.size == 0:
        return None
    if want.kind in "biu":  # integers (or bools) into an integer type, or into bool as the range [0, 1]
        low, high = (0, 1) if want.kind == "b" else (int(np.iinfo(want).min), int(np.iinfo(want).max))
        lowest, highest = int(arr.min()), int(arr.max())  # Python ints: uint64 and int64 compare exactly
        if lowest >= low and highest <= high:
            return None
        return (f": {lowest if lowest < low else highest} lies outside {want.name}'s range [{low}, {high}]; "
                f"feed {want.name} values or declare a wider dtype")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = arr.astype(want)
        if kind == "f":
            lost = arr[np.isfinite(arr) & ~np.isfinite(converted)]
            why = f"overflows {want.name} (largest {np.finfo(want).max})"
        else:
            lost = arr[converted.astype(arr.dtype) != arr]
            why = f"is not exactly representable in {want.name}; feed a float array or declare a wider dtype"
    return None if lost.size == 0 else f": {lost.flat[0]} {why}"


def make_op(op_type, inputs, compute, dtypes, shapes, grad=None, name=None, attrs=None, stateful=False):
    """Create an operation in the default graph and return it."""
    graph = get_default_graph()
    _check_graph(inputs, graph)
    return Operation(graph, op_type, graph.unique_name(name or op_type), inputs, compute, len(dtypes), dtypes, shapes,
                     grad=grad, attrs=attrs, stateful=stateful)


# ----------------------------------------------------------------------------------------------
# Variables: their values live in a Session; the graph holds a read op and an initializer.

GLOBAL_VARIABLES = "variables"
TRAINABLE_VARIABLES = "trainable_variables"
GLOBAL_STEP = "global_step"


class Variable:
    """A mutable tensor whose value lives in a Session.

    ``Variable(initial_value)`` takes an array or a tensor (e.g.
    ``tf.truncated_normal([5, 5, 1, 32], stddev=0.1)``); ``initializer``
    assigns it; ``assign(value)`` builds an op that sets a new value;
    ``load(value, session)`` sets it directly.
    """

    def __init__(self, initial_value, trainable=True, name=None, dtype=None, collections=None):
        graph = get_default_graph()
        self.graph = graph
        with graph.name_scope(name or "Variable") as scope:
            self.name_prefix = scope.rstrip("/")
            init = convert_to_tensor(initial_value, dtype=dtype, name="initial_value")
            self._initial = init
            self.dtype = init.dtype
            self.trainable = trainable
            var = self
            self._read = make_op("VariableV2", [], lambda ctx: (ctx.read_variable(var),), [init.dtype], [init.shape],
                                 name=None,
                                 attrs={"variable": var}, stateful=True).outputs[0]
            self._read.op.name = self.name_prefix  # a variable's op is named like the variable
            from .ops import assign

            self.initializer = assign(self, init, name="Assign").op
        self.name = self._read.name
        for collection in collections or ([GLOBAL_VARIABLES] + ([TRAINABLE_VARIABLES] if trainable else [])):
            graph.add_to_collection(collection, self)

    @property
    def op(self):
        return self._read.op

    @property
    def shape(self):
        return self._initial.shape

    def get_shape(self):
        return self.shape

    def value(self):
        return self._read

    def read_value(self):
        return self._read

    def assign(self, value, name=None):
        from .ops import assign

        return assign(self, value, name=name)

    def assign_add(self, delta, name=None):
        from .ops import assign_add

        return assign_add(self, delta, name=name)

    def load(self, value, session=None):
        """Set the variable's value in ``session`` (the default session) at once, without running an op."""
        (session or get_default_session()).write_variable(self, value)

    def eval(self, session=None):
        return (session or get_default_session()).run(self._read)

    def __repr__(self):
        return f"<tf.Variable '{self.name}' shape={self.shape} dtype={self.dtype.name}>"

    __hash__ = object.__hash__
