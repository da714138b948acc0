"""The operations. Each public function builds one op: its forward (``compute``) and, beside it, its
gradient (``grad``), which builds the ops of the backward pass. The numerics are workshop_lib.kernels'.

``compute(ctx, *inputs)`` returns a tuple of outputs; ``ctx`` is the running session's
:class:`~workshop_lib.tf.session.RunContext`: the kernels chosen, ``read_variable`` / ``write_variable``,
and the op's random generator ``rng_for(op)``.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from .core import (
    InvalidArgumentError,
    TensorShape,
    Tensor,
    Variable,
    as_dtype,
    bool_,
    convert_to_tensor,
    float32,
    int64,
    make_op,
)

# ----------------------------------------------------------------------------------------------
# helpers


def _shape_list(t):
    return None if t.shape.dims is None else t.shape.as_list()


def _broadcast_shape(a, b):
    sa, sb = _shape_list(a), _shape_list(b)
    if sa is None or sb is None:
        return None
    out = []
    for da, db in zip([1] * (len(sb) - len(sa)) + sa, [1] * (len(sa) - len(sb)) + sb):
        if da == 1:
            out.append(db)
        elif db == 1 or db == da or db is None:
            out.append(da)
        elif da is None:
            out.append(db)
        else:
            raise ValueError(f"shapes {a.shape} and {b.shape} of {a.name} and {b.name} cannot be broadcast")
    return out


def _sum_to_shape(g, shape):
    """Sum a broadcast gradient back down to ``shape`` (numpy's broadcasting rules, reversed)."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, d in enumerate(shape):
        if d == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def _unbroadcast(grad, like, name="BroadcastGradient"):
    """An op reducing ``grad`` to the run-time shape of ``like`` (a no-op when shapes already match statically)."""
    if _shape_list(grad) is not None and _shape_list(grad) == _shape_list(like) and None not in _shape_list(like):
        return grad
    return make_op(name, [grad, like], lambda ctx, g, x: (_sum_to_shape(g, np.shape(x)),), [grad.dtype],
                   [like.shape]).outputs[0]


def _binary(op_type, fn, grad, x, y, name):
    x = convert_to_tensor(x)
    y = convert_to_tensor(y, dtype=x.dtype if not isinstance(y, Tensor) else None)
    if x.dtype != y.dtype:
        raise TypeError(f"{op_type}: {x.name} is {x.dtype.name} but {y.name} is {y.dtype.name}; use tf.cast")
    return make_op(op_type, [x, y], lambda ctx, a, b: (fn(a, b),), [x.dtype], [_broadcast_shape(x, y)],
                   grad=grad, name=name).outputs[0]


# ----------------------------------------------------------------------------------------------
# sources: constants, placeholders, random tensors


def constant(value, dtype=None, shape=None, name="Const"):
    """A constant tensor; ``shape`` broadcasts a scalar (or checks the value's size)."""
    dtype = as_dtype(dtype)
    arr = np.asarray(value, dtype=dtype.as_numpy_dtype if dtype else None)
    if dtype is None:
        if arr.dtype == np.float64 and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)  # Python floats become float32, as in TensorFlow
        elif arr.dtype == np.int64 and not isinstance(value, np.ndarray):
            arr = arr.astype(np.int32)
    if shape is not None:
        shape = tuple(shape)
        arr = np.broadcast_to(arr, shape).copy() if arr.size == 1 else arr.reshape(shape)
    frozen = arr.copy()
    frozen.setflags(write=False)
    return make_op("Const", [], lambda ctx: (frozen,), [as_dtype(arr.dtype)], [arr.shape], name=name,
                   attrs={"value": frozen}).outputs[0]


def placeholder(dtype, shape=None, name=None):
    """A tensor that must be fed: ``sess.run(..., feed_dict={p: value})``."""

    def unfed(ctx):  # a fed placeholder never runs: its value comes from the feed
        out = op.outputs[0]
        raise InvalidArgumentError(f"You must feed a value for placeholder tensor '{op.name}' with dtype "
                                   f"{out.dtype.name}" + (f" and shape {out.shape}" if out.shape.dims is not None else ""))

    op = make_op("Placeholder", [], unfed, [as_dtype(dtype)], [shape], name=name or "Placeholder")
    return op.outputs[0]


def _random(op_type, sampler, shape, dtype, seed, name):
    dtype = as_dtype(dtype)

    def compute(ctx):
        return (sampler(ctx.rng_for(op), tuple(shape)).astype(dtype.as_numpy_dtype),)

    op = make_op(op_type, [], compute, [dtype], [list(shape)], name=name, attrs={"seed": seed}, stateful=True)
    return op.outputs[0]


def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=float32, seed=None, name="truncated_normal"):
    """Normal values redrawn until within two standard deviations, as TensorFlow's."""

    return _random("TruncatedNormal", lambda rng, s: mean + stddev * kernels.truncated_standard_normal(rng, s),
                   shape, dtype, seed, name)


def random_normal(shape, mean=0.0, stddev=1.0, dtype=float32, seed=None, name="random_normal"):
    return _random("RandomStandardNormal", lambda rng, s: mean + stddev * rng.standard_normal(s), shape, dtype, seed,
                   name)


def random_uniform(shape, minval=0.0, maxval=1.0, dtype=float32, seed=None, name="random_uniform"):
    return _random("RandomUniform", lambda rng, s: rng.uniform(minval, maxval, s), shape, dtype, seed, name)


def zeros(shape, dtype=float32, name="zeros"):
    return constant(0, dtype=dtype, shape=shape, name=name)


def ones(shape, dtype=float32, name="ones"):
    return constant(1, dtype=dtype, shape=shape, name=name)


# ----------------------------------------------------------------------------------------------
# state


def _variable_of(ref):
    if isinstance(ref, Variable):
        return ref
    raise TypeError(f"{ref!r} is not a tf.Variable")


def assign(ref, value, name=None):
    """Set a variable to ``value``; the op's output is the new value."""
    var = _variable_of(ref)
    value = convert_to_tensor(value, dtype=var.dtype)

    def compute(ctx, v):
        ctx.write_variable(var, v)
        return (ctx.read_variable(var),)

    return make_op("Assign", [value], compute, [var.dtype], [value.shape], name=name or "Assign",
                   attrs={"variable": var}, stateful=True).outputs[0]


def assign_add(ref, delta, name=None):
    var = _variable_of(ref)
    delta = convert_to_tensor(delta, dtype=var.dtype)

    def compute(ctx, d):
        ctx.write_variable(var, ctx.read_variable(var) + d)
        return (ctx.read_variable(var),)

    return make_op("AssignAdd", [delta], compute, [var.dtype], [var.shape], name=name or "AssignAdd",
                   attrs={"variable": var}, stateful=True).outputs[0]


def assign_sub(ref, delta, name=None):
    return assign_add(ref, negative(delta), name=name or "AssignSub")


def no_op(name="NoOp"):
    return make_op("NoOp", [], lambda ctx: (), [], [], name=name)


def group(*inputs, name="group_deps"):
    """An op that runs all of ``inputs`` (its control inputs)."""
    flat = []
    for item in inputs:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    op = no_op(name)
    op.control_inputs.extend(t.op if isinstance(t, Tensor) else t for t in flat if t is not None)
    return op


def identity(x, name="Identity"):
    x = convert_to_tensor(x)
    return make_op("Identity", [x], lambda ctx, v: (v,), [x.dtype], [x.shape], name=name,
                   grad=lambda op, g: [g]).outputs[0]


# ----------------------------------------------------------------------------------------------
# arithmetic (with broadcasting)


def add(x, y, name=None):
    return _binary("Add", np.add, lambda op, g: [_unbroadcast(g, op.inputs[0]), _unbroadcast(g, op.inputs[1])],
                   x, y, name or "Add")


def subtract(x, y, name=None):
    return _binary("Sub", np.subtract,
                   lambda op, g: [_unbroadcast(g, op.inputs[0]), _unbroadcast(negative(g), op.inputs[1])],
                   x, y, name or "Sub")


def multiply(x, y, name=None):
    return _binary("Mul", np.multiply,
                   lambda op, g: [_unbroadcast(multiply(g, op.inputs[1]), op.inputs[0]),
                                  _unbroadcast(multiply(g, op.inputs[0]), op.inputs[1])],
                   x, y, name or "Mul")


def divide(x, y, name=None):
    def grad(op, g):
        a, b = op.inputs
        return [_unbroadcast(divide(g, b), a),
                _unbroadcast(negative(divide(multiply(g, a), multiply(b, b))), b)]

    return _binary("RealDiv", np.divide, grad, x, y, name or "RealDiv")


def add_n(inputs, name="AddN"):
    inputs = [convert_to_tensor(t) for t in inputs]
    if len(inputs) == 1:
        return inputs[0]
    return make_op("AddN", inputs, lambda ctx, *vs: (sum(vs[1:], vs[0].copy()),), [inputs[0].dtype],
                   [inputs[0].shape], grad=lambda op, g: [g] * len(op.inputs), name=name).outputs[0]


def negative(x, name="Neg"):
    x = convert_to_tensor(x)
    return make_op("Neg", [x], lambda ctx, v: (-v,), [x.dtype], [x.shape], grad=lambda op, g: [negative(g)],
                   name=name).outputs[0]


def square(x, name="Square"):
    x = convert_to_tensor(x)
    return make_op("Square", [x], lambda ctx, v: (v * v,), [x.dtype], [x.shape],
                   grad=lambda op, g: [multiply(g, multiply(op.inputs[0], constant(2.0, dtype=x.dtype)))],
                   name=name).outputs[0]


def sqrt(x, name="Sqrt"):
    x = convert_to_tensor(x)
    return make_op("Sqrt", [x], lambda ctx, v: (np.sqrt(v),), [x.dtype], [x.shape],
                   grad=lambda op, g: [divide(g, multiply(op.outputs[0], constant(2.0, dtype=x.dtype)))],
                   name=name).outputs[0]


def log(x, name="Log"):
    x = convert_to_tensor(x)
    return make_op("Log", [x], lambda ctx, v: (np.log(v),), [x.dtype], [x.shape],
                   grad=lambda op, g: [divide(g, op.inputs[0])], name=name).outputs[0]


def exp(x, name="Exp"):
    x = convert_to_tensor(x)
    return make_op("Exp", [x], lambda ctx, v: (np.exp(v),), [x.dtype], [x.shape],
                   grad=lambda op, g: [multiply(g, op.outputs[0])], name=name).outputs[0]


def matmul(a, b, transpose_a=False, transpose_b=False, name=None):
    """Matrix product; the kernel is BLAS with optimized kernels, numba's triple loop with reference ones."""
    a, b = convert_to_tensor(a), convert_to_tensor(b)
    sa, sb = _shape_list(a), _shape_list(b)
    m = None if sa is None else sa[1 if transpose_a else 0]
    n = None if sb is None else sb[0 if transpose_b else 1]
    if sa is not None and sb is not None:
        ka, kb = sa[0 if transpose_a else 1], sb[1 if transpose_b else 0]
        if ka is not None and kb is not None and ka != kb:
            raise ValueError(f"matmul: {a.name} {a.shape} and {b.name} {b.shape} do not multiply ({ka} != {kb})")

    def compute(ctx, x, y):
        return (kernels.gemm_forward(x, y, transpose_a, transpose_b, algorithm=ctx.gemm_algorithm)[0],)

    def grad(op, g):
        x, y = op.inputs
        if not transpose_a and not transpose_b:
            return [matmul(g, y, transpose_b=True), matmul(x, g, transpose_a=True)]
        if transpose_a and not transpose_b:
            return [matmul(y, g, transpose_b=True), matmul(x, g)]
        if not transpose_a and transpose_b:
            return [matmul(g, y), matmul(g, x, transpose_a=True)]
        return [matmul(y, g, transpose_a=True, transpose_b=True), matmul(g, x, transpose_a=True, transpose_b=True)]

    return make_op("MatMul", [a, b], compute, [a.dtype], [[m, n]], grad=grad, name=name or "MatMul",
                   attrs={"transpose_a": transpose_a, "transpose_b": transpose_b}).outputs[0]


def reshape(tensor, shape, name=None):
    x = convert_to_tensor(tensor)
    shape = [int(d) for d in (shape.as_list() if isinstance(shape, TensorShape) else shape)]

    def compute(ctx, v):
        try:
            return (v.reshape(shape),)
        except ValueError:
            raise ValueError(f"reshape {x.name}: cannot reshape a value of shape {v.shape} into {shape}") from None

    def grad(op, g):
        return [make_op("ReshapeGrad", [g, op.inputs[0]], lambda ctx, gv, xv: (gv.reshape(np.shape(xv)),),
                        [g.dtype], [op.inputs[0].shape]).outputs[0]]

    static = [None if d == -1 else d for d in shape]
    known = _shape_list(x)
    if known is not None and None not in known and shape.count(-1) == 1:
        rest = int(np.prod([d for d in shape if d != -1]))
        static[shape.index(-1)] = int(np.prod(known)) // rest if rest else None
    return make_op("Reshape", [x], compute, [x.dtype], [static], grad=grad, name=name or "Reshape",
                   attrs={"shape": shape}).outputs[0]


def _reduce(op_type, fn, x, axis, keepdims, name, grad):
    x = convert_to_tensor(x)
    axes = None if axis is None else tuple(np.atleast_1d(axis).tolist())
    known = _shape_list(x)
    static = None
    if known is not None:
        if axes is None:
            static = [1] * len(known) if keepdims else []
        else:
            norm = {a % len(known) for a in axes}
            static = [1 if i in norm else d for i, d in enumerate(known)] if keepdims else \
                [d for i, d in enumerate(known) if i not in norm]
    return make_op(op_type, [x], lambda ctx, v: (np.asarray(fn(v, axis=axes, keepdims=keepdims), dtype=v.dtype),),
                   [x.dtype], [static], grad=grad, name=name, attrs={"axis": axes, "keepdims": keepdims}).outputs[0]


def _reduce_grad(scale_by_count):
    def grad(op, g):
        axes, keepdims = op.attrs["axis"], op.attrs["keepdims"]

        def compute(ctx, gv, xv):
            if scale_by_count and xv.size == 0:
                raise InvalidArgumentError(f"{op.name}: the gradient of a mean over an empty input (shape "
                                           f"{xv.shape}); feed a batch of at least one example")
            if np.ndim(gv) == 0:  # a loss's mean or sum: fill, without broadcasting and copying (same values)
                return (np.full(np.shape(xv), gv * (1 / xv.size) if scale_by_count else gv, dtype=xv.dtype),)
            if not keepdims:
                gv = np.expand_dims(gv, tuple(range(xv.ndim)) if axes is None else tuple(a % xv.ndim for a in axes))
            out = np.broadcast_to(gv, xv.shape)
            if scale_by_count:
                out = out * (gv.size / xv.size)
            return (np.array(out, dtype=xv.dtype),)

        return [make_op("ReduceGrad", [g, op.inputs[0]], compute, [op.inputs[0].dtype],
                        [op.inputs[0].shape]).outputs[0]]

    return grad


def reduce_sum(input_tensor, axis=None, keepdims=False, name=None):
    return _reduce("Sum", np.sum, input_tensor, axis, keepdims, name or "Sum", _reduce_grad(False))


def reduce_mean(input_tensor, axis=None, keepdims=False, name=None):
    return _reduce("Mean", np.mean, input_tensor, axis, keepdims, name or "Mean", _reduce_grad(True))


def reduce_max(input_tensor, axis=None, keepdims=False, name=None):
    return _reduce("Max", np.max, input_tensor, axis, keepdims, name or "Max", None)


def argmax(input, axis=None, name=None, output_type=int64):  # noqa: A002 - TensorFlow's argument name
    x = convert_to_tensor(input)
    axis = 0 if axis is None else int(axis)
    known = _shape_list(x)
    static = None if known is None else [d for i, d in enumerate(known) if i != axis % len(known)]
    out_type = as_dtype(output_type)
    return make_op("ArgMax", [x], lambda ctx, v: (np.argmax(v, axis=axis).astype(out_type.as_numpy_dtype),),
                   [out_type], [static], name=name or "ArgMax").outputs[0]


def equal(x, y, name=None):
    x = convert_to_tensor(x)
    y = convert_to_tensor(y, dtype=x.dtype if not isinstance(y, Tensor) else None)
    return make_op("Equal", [x, y], lambda ctx, a, b: (np.equal(a, b),), [bool_], [_broadcast_shape(x, y)],
                   name=name or "Equal").outputs[0]


def cast(x, dtype, name=None):
    x = convert_to_tensor(x)
    dtype = as_dtype(dtype)

    def grad(op, g):
        return [cast(g, op.inputs[0].dtype)] if op.inputs[0].dtype.is_floating and dtype.is_floating else [None]

    return make_op("Cast", [x], lambda ctx, v: (v.astype(dtype.as_numpy_dtype),), [dtype], [x.shape], grad=grad,
                   name=name or "Cast").outputs[0]


def one_hot(indices, depth, on_value=None, off_value=None, axis=None, dtype=None, name=None):
    """A one-hot encoding of integer ``indices`` (N,) as (N, depth); indices outside [0, depth) give all off."""
    idx = convert_to_tensor(indices)
    if not idx.dtype.is_integer:
        raise TypeError(f"one_hot: indices {idx.name} must be integers, got {idx.dtype.name}")
    if axis not in (None, -1):
        raise ValueError("one_hot supports axis=-1 only")
    if dtype is None:
        dtype = float32 if on_value is None or isinstance(on_value, float) else as_dtype(np.asarray(on_value).dtype)
    dtype = as_dtype(dtype)
    on = 1 if on_value is None else on_value
    off = 0 if off_value is None else off_value
    depth = int(depth)

    def compute(ctx, v):
        out = np.full((*np.shape(v), depth), off, dtype=dtype.as_numpy_dtype)
        valid = (v >= 0) & (v < depth)
        out[valid, np.asarray(v)[valid]] = on
        return (out,)

    shape = _shape_list(idx)
    return make_op("OneHot", [idx], compute, [dtype], [None if shape is None else [*shape, depth]],
                   name=name or "one_hot").outputs[0]


def py_func(func, inp, Tout, stateful=True, name=None):  # noqa: N803 - TensorFlow's argument name
    """Run a Python function on numpy values inside the graph (``tf.py_func``); no gradient."""
    inputs = [convert_to_tensor(t) for t in inp]
    single = not isinstance(Tout, (list, tuple))
    touts = [as_dtype(Tout)] if single else [as_dtype(t) for t in Tout]

    def compute(ctx, *values):
        result = func(*values)
        result = [result] if single else list(result)
        return tuple(np.asarray(r, dtype=t.as_numpy_dtype) for r, t in zip(result, touts))

    op = make_op("PyFunc", inputs, compute, touts, [None] * len(touts), name=name or "PyFunc", stateful=stateful)
    return op.outputs[0] if single else op.outputs


# ----------------------------------------------------------------------------------------------
# operators on tensors and variables


def _install_operators(cls, wrap=lambda t: t):
    cls.__add__ = lambda self, other: add(wrap(self), other)
    cls.__radd__ = lambda self, other: add(convert_to_tensor(other, dtype=wrap(self).dtype), wrap(self))
    cls.__sub__ = lambda self, other: subtract(wrap(self), other)
    cls.__rsub__ = lambda self, other: subtract(convert_to_tensor(other, dtype=wrap(self).dtype), wrap(self))
    cls.__mul__ = lambda self, other: multiply(wrap(self), other)
    cls.__rmul__ = lambda self, other: multiply(convert_to_tensor(other, dtype=wrap(self).dtype), wrap(self))
    cls.__truediv__ = lambda self, other: divide(wrap(self), other)
    cls.__rtruediv__ = lambda self, other: divide(convert_to_tensor(other, dtype=wrap(self).dtype), wrap(self))
    cls.__neg__ = lambda self: negative(wrap(self))
    cls.__matmul__ = lambda self, other: matmul(wrap(self), other)


_install_operators(Tensor)
_install_operators(Variable, wrap=lambda v: v.value())


def ones_like(tensor, dtype=None, name="ones_like"):
    t = convert_to_tensor(tensor)
    dtype = as_dtype(dtype) or t.dtype
    return make_op("OnesLike", [t], lambda ctx, v: (np.ones_like(v, dtype=dtype.as_numpy_dtype),), [dtype],
                   [t.shape], name=name).outputs[0]


def zeros_like(tensor, dtype=None, name="zeros_like"):
    t = convert_to_tensor(tensor)
    dtype = as_dtype(dtype) or t.dtype
    return make_op("ZerosLike", [t], lambda ctx, v: (np.zeros_like(v, dtype=dtype.as_numpy_dtype),), [dtype],
                   [t.shape], name=name).outputs[0]


def transpose(a, perm=None, name="transpose"):
    """Permute dimensions; the gradient applies the inverse permutation."""
    x = convert_to_tensor(a)
    known = _shape_list(x)
    if perm is None:
        perm = list(range(len(known)))[::-1] if known is not None else None
        if perm is None:
            raise ValueError(f"transpose of {x.name} needs perm when its rank is unknown")
    perm = [int(p) for p in perm]
    inverse = list(np.argsort(perm))
    static = None if known is None else [known[p] for p in perm]
    return make_op("Transpose", [x], lambda ctx, v: (np.ascontiguousarray(v.transpose(perm)),), [x.dtype], [static],
                   grad=lambda op, g: [transpose(g, inverse)], name=name, attrs={"perm": perm}).outputs[0]
