"""Graph passes: rewrites of a run's plan, each a function plan -> plan, as TensorFlow's Grappler runs them.

A plan is the list of entries a Session executes, in order: graph Operations, and the entries these passes
put in their place. Every entry has ``inputs``, ``outputs``, ``control_inputs``, ``type``, ``name``,
``attrs`` and ``compute(ctx, *input_values) -> outputs``, so the executor runs them all alike.

- :func:`fuse` (``GraphOptions(fusion=True)``): Conv2D/MatMul -> BiasAdd (-> Relu) becomes one
  primitive that adds the bias and applies the ReLU in place on the GEMM's output (oneDNN's post-ops):
  one pass over memory instead of three.
- :func:`fuse_gradients` (``GraphOptions(fusion=True)``): the backward of that, MaxPoolGrad -> ReluGrad
  (-> BiasAddGrad) and ReluGrad -> BiasAddGrad, becomes one pass that scatters the pooled gradient, masks
  it with the ReLU and sums the bias gradient (:func:`fused_gradient_count` counts these entries).
- :func:`propagate_layout` (``GraphOptions(layout="blocked")``): convolutions with 16 or more input
  channels, and the pooling and ReLU after them, run in nChw16c (16 channels = one AVX-512 register of
  float32); values stay blocked from op to op, and a :class:`Reorder` entry converts them only where a
  plain-layout op reads them or the caller fetches them. :func:`reorder_counts` counts those entries.
- :func:`mixed_precision` (``GraphOptions(precision="bf16")``, and TensorFlow 1's two switches): convolutions
  and matmuls on bf16 operands with fp32 accumulation, everything else fp32; a :class:`Cast` entry where a
  value enters bf16 (:func:`cast_counts` counts them).

The one idea: because the graph is defined before it runs, the engine can rewrite it first.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .. import kernels
from .trace import describe, op_fields

__all__ = ["FusedOp", "fuse", "FusedGradOp", "fuse_gradients", "fused_gradient_count", "Reorder", "BlockedOp",
           "BlockedValue", "propagate_layout", "reorder_counts", "BF16_OPS", "Cast", "CastValue", "Bf16Op",
           "mixed_precision", "cast_counts"]


# ----------------------------------------------------------------------------------------------
# fusion


class FusedOp:
    """A plan entry that replaces conv/matmul -> BiasAdd (-> Relu): computes the last tensor in one pass."""

    def __init__(self, ops):
        self.ops = ops
        self.main, self.bias_op = ops[0], ops[1]
        self.relu = len(ops) == 3
        self.type = "_Fused" + self.main.type + ("BiasAddRelu" if self.relu else "BiasAdd")
        self.name = self.main.name + "/fused"
        self.attrs = self.main.attrs
        self.inputs = list(self.main.inputs) + [self.bias_op.inputs[1]]
        # a fused convolution still provides the convolution's workspace (im2col columns) to its gradient
        self.outputs = [ops[-1].outputs[0]] + (self.main.outputs[1:] if self.main.type == "Conv2D" else [])
        self.control_inputs = [c for op in ops for c in op.control_inputs]

    def compute(self, ctx, x, w, b):
        a = self.attrs
        if self.main.type == "Conv2D":  # bias and ReLU in the kernel's epilogue (jit) or in place on its output
            y, cache = kernels.conv2d_forward(x, w, a["strides"], a["padding"], a["data_format"], ctx.conv_algorithm,
                                              bias=b, relu=self.relu)
            return y, cache.cols  # cols: the workspace the gradient reuses (None where the kernel made none)
        y = kernels.gemm_forward(x, w, a["transpose_a"], a["transpose_b"], ctx.gemm_algorithm)[0]
        y += b  # bias added to the GEMM's output in place: no extra tensor
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


def _consumers(plan):
    consumers = {}
    for entry in plan:
        for t in entry.inputs:
            consumers.setdefault(t, []).append(entry)
    return consumers


def fuse(plan, fetched=()):
    """Replace Conv2D/MatMul -> BiasAdd (-> Relu) chains whose intermediate results nothing else uses.

    ``fetched`` are the tensors the caller asked for: they must stay computed, so no chain hides them.
    A fused entry takes the place of its last op; its inputs come from earlier entries, so the order stays valid.
    """
    consumers, fetched = _consumers(plan), set(fetched)
    fused, replacement = set(), {}
    for op in plan:
        if op in fused or op.type not in ("Conv2D", "MatMul"):
            continue
        t = op.outputs[0]
        users = consumers.get(t, [])
        if len(users) != 1 or not _is_bias_add(users[0], t) or t in fetched:
            continue
        chain = [op, users[0]]
        bt = users[0].outputs[0]
        busers = consumers.get(bt, [])
        if len(busers) == 1 and busers[0].type == "Relu" and bt not in fetched:
            chain.append(busers[0])
        fused.update(chain)
        replacement[chain[-1]] = FusedOp(chain)
    return [replacement.get(op, op) for op in plan if op in replacement or op not in fused]


# ----------------------------------------------------------------------------------------------
# fusion of the backward pass


class FusedGradOp:
    """A plan entry replacing MaxPoolGrad -> ReluGrad (-> BiasAddGrad), or ReluGrad -> BiasAddGrad.

    It computes the ReLU's input gradient (which the convolution's or matmul's gradients read next) and the
    bias gradient in one pass over memory, on :func:`kernels.maxpool_relu_backward` or
    :func:`kernels.relu_bias_backward`.
    """

    def __init__(self, ops, pool=None):
        self.ops, self.pool = ops, pool
        self.relu_grad = next(op for op in ops if op.type == "ReluGrad")
        self.bias_grad = ops[-1] if ops[-1].type in _BIAS_GRADS else None
        self.type = "_Fused" + "".join(op.type for op in ops)
        self.name = ops[0].name + "/fused"
        self.attrs = pool.attrs if pool is not None else {}
        if pool is not None:  # the pooled gradient, the pooling's argmax, and its output (the winners' values)
            self.inputs = [ops[0].inputs[0], ops[0].inputs[1], pool.outputs[0]]
        else:  # the gradient and the ReLU's output
            self.inputs = list(self.relu_grad.inputs)
        self.outputs = [self.relu_grad.outputs[0]] + ([self.bias_grad.outputs[0]] if self.bias_grad else [])
        self.control_inputs = [c for op in ops for c in op.control_inputs]

    def compute(self, ctx, *args):
        if self.pool is not None:
            dx, db = kernels.maxpool_relu_backward(*args, need_db=self.bias_grad is not None)
        else:
            dx, db = kernels.relu_bias_backward(*args)
        return (dx, db) if self.bias_grad is not None else (dx,)

    def trace_fields(self, args, result):
        return op_fields(self.type, "numba", self.attrs.get("data_format", "-"), args, result)


def _sole_consumer(tensor, consumers, fetched, op_type):
    """The one entry reading ``tensor``, if it has type ``op_type`` and ``tensor`` is not fetched; else None."""
    users = consumers.get(tensor, [])
    if len(users) != 1 or users[0].type != op_type or tensor in fetched or users[0].control_inputs:
        return None
    return users[0]


_BIAS_GRADS = ("BiasAddGrad", "BroadcastGradient")  # of tf.nn.bias_add, and of ``conv2d(x, W) + b``


def _bias_grad_of(relu_grad, consumers, data_format):
    """The bias gradient reading ``relu_grad``'s output (a convolution's or matmul's), if any.

    Its channel axis must be the fused kernel's: that of ``data_format``, or the last one ("channels_last").
    A bias added with ``+`` has the Add's BroadcastGradient, summing to a 1-D bias over the last axis.
    """
    g = relu_grad.outputs[0]
    dims = g.shape.dims or ()
    for user in consumers.get(g, []):
        if user.type not in _BIAS_GRADS or user.control_inputs or user.inputs[0] is not g:
            continue
        if user.type == "BroadcastGradient":
            bias = user.inputs[1].shape.dims
            if (data_format in ("NHWC", "channels_last") and bias is not None and len(bias) == 1
                    and bias[0] is not None and len(dims) >= 2 and dims[-1] == bias[0]):
                return user
            continue
        fmt = user.attrs.get("data_format")
        if fmt == data_format or (data_format == "channels_last" and (fmt == "NHWC" or len(dims) == 2)):
            return user
    return None


def fuse_gradients(plan, fetched=()):
    """Replace MaxPoolGrad -> ReluGrad (-> BiasAddGrad) and ReluGrad -> BiasAddGrad with :class:`FusedGradOp`.

    These are the gradients of ``max_pool(relu(conv + b))`` and ``relu(matmul + b)``: three passes over the
    largest tensors of the backward pass become one. The pooled gradient's tensor must have no other reader
    and not be fetched; the ReLU's input gradient stays an output (the convolution's gradients read it). The
    fused entry takes the place of the chain's first op: its inputs come from earlier entries.
    """
    consumers, fetched = _consumers(plan), set(fetched)
    fused, replacement = set(), {}
    for op in plan:
        if op in fused:
            continue
        if op.type == "MaxPoolGrad" and op.inputs[1].op.type == "MaxPool":
            pool = op.inputs[1].op
            relu_grad = _sole_consumer(op.outputs[0], consumers, fetched, "ReluGrad")
            # the pooling must read the ReLU's output, so that its maxima are the winners' values
            if relu_grad is None or relu_grad.inputs != [op.outputs[0], pool.inputs[0]]:
                continue
            bias_grad = _bias_grad_of(relu_grad, consumers, pool.attrs["data_format"])
            chain = [op, relu_grad] + ([bias_grad] if bias_grad else [])
            replacement[op] = FusedGradOp(chain, pool)
        elif op.type == "ReluGrad":
            bias_grad = _bias_grad_of(op, consumers, "channels_last")
            if bias_grad is None:
                continue
            chain = [op, bias_grad]
            replacement[op] = FusedGradOp(chain)
        else:
            continue
        fused.update(chain)
    return [replacement.get(op, op) for op in plan if op in replacement or op not in fused]


def fused_gradient_count(plan):
    """How many :class:`FusedGradOp` entries one run of ``plan`` executes."""
    return sum(isinstance(entry, FusedGradOp) for entry in plan)


# ----------------------------------------------------------------------------------------------
# layout propagation


class BlockedValue:
    """Stands in a plan for a value held in nChw16c (or OIhw16i16o for weights): the key of its array."""

    def __init__(self, tensor, channels, data_format):
        self.tensor, self.channels, self.data_format = tensor, channels, data_format
        self.name = tensor.name + "/nChw16c"

    def __repr__(self):
        return f"<BlockedValue of {self.tensor.name}, {self.channels} channels>"


class Reorder:
    """A plan entry that converts one value between a plain layout and a blocked one (counted in Session.stats)."""

    type = "Reorder"

    def __init__(self, source, target, direction):
        self.inputs, self.outputs, self.control_inputs, self.attrs = [source], [target], [], {}
        self.direction = direction  # "to_blocked", "to_plain" or "weights"
        blocked = target if direction != "to_plain" else source
        fmt = blocked.data_format.lower()
        self.kind = {"to_blocked": f"{fmt}->nChw16c", "to_plain": f"nChw16c->{fmt}",
                     "weights": "hwio->OIhw16i16o"}[direction]
        self.stat = "weight_reorders" if direction == "weights" else "reorders"
        self.name = f"{getattr(source, 'name', '?')}/reorder"
        self._blocked = blocked

    def compute(self, ctx, value):
        if self.direction == "to_blocked":
            return (kernels.to_blocked(value, self._blocked.data_format),)
        if self.direction == "to_plain":
            return (kernels.from_blocked(value, self._blocked.channels, self._blocked.data_format),)
        return (kernels.weights_to_blocked(value),)

    def trace_fields(self, args, result):
        return ["reorder", self.kind, describe(result[0])]


class BlockedOp:
    """A plan entry running a convolution (fused or not), a pooling or a ReLU on nChw16c values."""

    def __init__(self, entry, role, inputs, output):
        self.entry, self.role = entry, role
        self.main = entry.main if isinstance(entry, FusedOp) else entry
        self.type, self.name, self.attrs = entry.type, entry.name, self.main.attrs
        self.inputs, self.control_inputs = inputs, entry.control_inputs
        self.outputs = [output] + list(entry.outputs[1:])  # the workspace outputs nobody reads stay None

    def compute(self, ctx, x, *rest):
        a = self.attrs
        if self.role == "conv":
            wb = rest[0]
            fused = isinstance(self.entry, FusedOp)
            out = kernels.conv2d_blocked_forward(x, wb, a["strides"], a["padding"], rest[1] if fused else None,
                                                 fused and self.entry.relu)
            return (out, None)
        if self.role == "pool":
            n, cb, h, w, blk = x.shape
            forward = kernels.maxpool_forward if self.main.type == "MaxPool" else kernels.avgpool_forward
            pooled = forward(x.reshape(n * cb, h, w, blk), a["ksize"], a["strides"], a["padding"], "NHWC")[0]
            return (pooled.reshape(n, cb, *pooled.shape[1:]), None)
        return (np.maximum(x, 0),)  # ReLU keeps the padded channels at 0

    def trace_fields(self, args, result):
        return op_fields(self.type, "blocked", "nChw16c", args, result)


def _channels(tensor, axis):
    dims = tensor.shape.dims
    return None if dims is None or len(dims) != 4 else dims[axis]


def _blocked_role(entry, consumed, blocked):
    """How ``entry`` runs under layout propagation: "conv", "pool", "relu", or None (plain layout)."""
    main = entry.main if isinstance(entry, FusedOp) else entry
    if main.type == "Conv2D":
        if main.outputs[1] in consumed:  # a gradient needs the im2col workspace: stay plain
            return None
        c, k = _channels(main.inputs[1], 2), _channels(main.inputs[1], 3)  # the filter is (R, S, C, K)
        return "conv" if c is not None and k is not None and c >= kernels.BLOCK else None
    if main.type in ("MaxPool", "AvgPool") and main.inputs[0] in blocked and main.outputs[1] not in consumed:
        return "pool"
    if main.type == "Relu" and main.inputs[0] in blocked:
        return "relu"
    return None


def propagate_layout(plan, fetched=()):
    """Run what can run in nChw16c blocked, with a :class:`Reorder` only at the boundaries of the blocked region.

    It applies where no gradient needs the ops' workspaces (im2col columns, pooling argmax), i.e. to inference.
    """
    consumed = {t for entry in plan for t in entry.inputs}
    blocked = {}  # a tensor -> the BlockedValue its array is held in
    out = []
    for entry in plan:
        role = _blocked_role(entry, consumed, blocked)
        if role is None:
            out.append(entry)
            continue
        x, y = entry.inputs[0], entry.outputs[0]
        if role == "conv":
            w, fmt = entry.inputs[1], entry.attrs["data_format"]
            if x not in blocked:  # arrives in the plain layout: reorder it in
                blocked[x] = BlockedValue(x, _channels(w, 2), fmt)
                out.append(Reorder(x, blocked[x], "to_blocked"))
            wb = BlockedValue(w, _channels(w, 2), fmt)
            out.append(Reorder(w, wb, "weights"))  # the weights change from step to step: every run, as oneDNN's
            inputs, channels = [blocked[x], wb, *entry.inputs[2:]], _channels(w, 3)
        else:
            inputs, channels = [blocked[x]], blocked[x].channels
        blocked[y] = BlockedValue(y, channels, blocked[x].data_format)
        out.append(BlockedOp(entry, role, inputs, blocked[y]))
    # a blocked result goes back to the plain layout (once) where a plain-layout entry reads it, or it is fetched
    read_plain = {t for entry in out for t in entry.inputs} | set(fetched)
    result = []
    for entry in out:
        result.append(entry)
        if isinstance(entry, BlockedOp) and entry.outputs[0].tensor in read_plain:
            result.append(Reorder(entry.outputs[0], entry.outputs[0].tensor, "to_plain"))
    return result


def reorder_counts(plan):
    """How many reorders one run of ``plan`` does: ``{"reorders": activations, "weight_reorders": weights}``."""
    counts = Counter(entry.stat for entry in plan if isinstance(entry, Reorder))
    return {"reorders": counts["reorders"], "weight_reorders": counts["weight_reorders"]}


# ----------------------------------------------------------------------------------------------
# mixed precision (bf16)

# TensorFlow's auto-mixed-precision lists, in spirit: these run on bf16 operands (fp32 accumulation); every
# other op (softmax and cross-entropy, reductions, bias and ReLU gradients, pooling, dropout, the optimizer's
# update) stays fp32, and the variables stay fp32 master copies
BF16_OPS = ("Conv2D", "MatMul", "Conv2DBackpropInput", "Conv2DBackpropFilter")


class CastValue:
    """Stands in a plan for a tensor's value rounded to bf16 (uint16 bits): the key of its array."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.name = tensor.name + "/bf16"

    def __repr__(self):
        return f"<CastValue of {self.tensor.name}>"


class Cast:
    """A plan entry rounding one fp32 value to bf16 (nearest even) where a bf16 op reads it (counted in Session.stats).

    ``stat`` is ``"weight_casts"`` for a variable (the fp32 master weights, cast every step) and ``"casts"``
    for activations and gradients.
    """

    type = "Cast"

    def __init__(self, tensor):
        from .. import bf16

        self.convert_bf16 = bf16.convert_bf16
        self.inputs, self.outputs, self.control_inputs, self.attrs = [tensor], [CastValue(tensor)], [], {}
        self.name = tensor.name + "/cast_bf16"
        self.stat = "weight_casts" if tensor.op.type in ("VariableV2", "Variable") else "casts"

    def compute(self, ctx, value):
        return (self.convert_bf16(np.ascontiguousarray(value, dtype=np.float32)),)

    def trace_fields(self, args, result):
        return ["cast", "fp32->bf16", describe(result[0])]


class Bf16Op:
    """A plan entry running a convolution or matmul (fused or not, or a gradient of one) on bf16 operands.

    Its float inputs are :class:`CastValue` (bf16 bits); it accumulates in fp32 and returns fp32, with the
    bias and ReLU of a fused entry applied to the fp32 accumulators, so its consumers are fp32 ops as before.
    """

    def __init__(self, entry, inputs, forward_attrs=None):
        from .. import bf16

        self._bf16 = bf16
        self.entry = entry
        self.main = entry.main if isinstance(entry, FusedOp) else entry
        self.type = "_Bf16" + entry.type.lstrip("_")
        self.name, self.attrs = entry.name, dict(forward_attrs or {}, **self.main.attrs)
        self.inputs, self.outputs, self.control_inputs = inputs, entry.outputs, entry.control_inputs

    def compute(self, ctx, *args):
        b, a, kind = self._bf16, self.attrs, self.main.type
        if kind == "MatMul":
            x, y = args[0], args[1]
            x = x.T if a["transpose_a"] else x
            y = y.T if a["transpose_b"] else y
            out = b.gemm_bf16(x, y)  # transposed views: the packing reads them in place
            if isinstance(self.entry, FusedOp):
                out += args[2]
                if self.entry.relu:
                    np.maximum(out, 0, out=out)
            return (out,)
        if kind == "Conv2D":
            fused = isinstance(self.entry, FusedOp)
            return b.conv2d_bf16(args[0], args[1], a["strides"], a["padding"], bias=args[2] if fused else None,
                                 relu=fused and self.entry.relu, return_cols=True)  # the workspace: bf16 columns
        g, x, w = args[:3]
        cols = args[3] if len(args) > 3 and isinstance(args[3], np.ndarray) and args[3].dtype == np.uint16 else None
        dx, dw = b.conv2d_backward_bf16(g, x, w, a["strides"], a["padding"], need_dx=kind == "Conv2DBackpropInput",
                                        need_dw=kind == "Conv2DBackpropFilter", cols=cols)
        return (dx if kind == "Conv2DBackpropInput" else dw,)

    def trace_fields(self, args, result):
        return op_fields(self.type, "bf16", self.attrs.get("data_format", "-"), args, result)


def _bf16_inputs(entry):
    """Which inputs of ``entry`` it reads as bf16 (positions), or None if it stays fp32."""
    main = entry.main if isinstance(entry, FusedOp) else entry
    if main.type not in BF16_OPS or main.attrs.get("data_format", "NHWC") != "NHWC":
        return None
    if main.type.startswith("Conv2DBackprop") and "strides" not in main.attrs:
        return None  # a gradient built without its forward's geometry
    if any(t.dtype.name != "float32" for t in main.inputs[:2]):
        return None
    return (0, 1, 2) if main.type.startswith("Conv2DBackprop") else (0, 1)


def mixed_precision(plan, fetched=()):
    """bf16 compute, fp32 everything else: TensorFlow's oneDNN bfloat16 auto-mixed-precision, on this engine.

    Convolutions (forward, backward-data, backward-weights) and matmuls (forward and both gradients, fused
    with their bias and ReLU or not) read their operands as bf16 and accumulate in fp32
    (:mod:`workshop_lib.bf16`). Softmax, cross-entropy, reductions, pooling, ReLU and bias gradients and the
    optimizer run in fp32 on fp32 values; the variables are fp32 master weights, cast to bf16 where a bf16
    op reads them. A :class:`Cast` entry rounds a value once, just before its first bf16 reader, and every
    bf16 reader shares it (a layer's input serves its forward and its weight gradient; a gradient serves both
    of a convolution's gradients). No loss scaling: bf16 has fp32's exponent range.
    """
    casts, out = {}, []
    for entry in plan:
        positions = _bf16_inputs(entry)
        if positions is None:
            out.append(entry)
            continue
        inputs = list(entry.inputs)
        for i in positions:
            t = inputs[i]
            if t not in casts:
                casts[t] = Cast(t)
                out.append(casts[t])
            inputs[i] = casts[t].outputs[0]
        out.append(Bf16Op(entry, inputs))
    return out


def cast_counts(plan):
    """How many casts to bf16 one run of ``plan`` does: ``{"casts": activations and gradients, "weight_casts": ...}``."""
    counts = Counter(entry.stat for entry in plan if isinstance(entry, Cast))
    return {"casts": counts["casts"], "weight_casts": counts["weight_casts"]}
