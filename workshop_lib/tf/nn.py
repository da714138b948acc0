"""``tf.nn``: convolution, pooling, activations, dropout, softmax and cross-entropy, on workshop_lib.kernels.

Each op runs a kernels forward/backward pair: ``compute`` calls ``*_forward`` and the gradient op calls
``*_backward`` on what the forward kept (its cache, as a second output, or its output), so the pairs that
tests/test_kernels.py checks are the code the graph runs.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from .core import Tensor, as_dtype, convert_to_tensor, int64, make_op
from .ops import _shape_list, multiply

__all__ = ["conv2d", "max_pool", "avg_pool", "relu", "tanh", "elu", "sigmoid", "bias_add", "dropout", "softmax",
           "sparse_softmax_cross_entropy_with_logits", "l2_loss"]


def _spatial(shape, data_format):
    return (shape[1], shape[2]) if data_format == "NHWC" else (shape[2], shape[3])


def _pool_out_shape(x, ksize, strides, padding, data_format, channels):
    shape = _shape_list(x)
    if shape is None or None in _spatial(shape, data_format):
        out_hw = [None, None]
    else:
        h, w = _spatial(shape, data_format)
        out_hw = list(kernels.conv2d_output_size(h, w, ksize[0], ksize[1], strides, padding))
    n = None if shape is None else shape[0]
    return [n, *out_hw, channels] if data_format == "NHWC" else [n, channels, *out_hw]


def conv2d(input, filter=None, strides=(1, 1, 1, 1), padding="SAME", data_format="NHWC", name=None,  # noqa: A002
           filters=None, use_cudnn_on_gpu=True, dilations=None):
    """2-D convolution; ``filter`` is HWIO (R, S, C, K). Kernels: im2col + BLAS (optimized) or direct loops.

    ``use_cudnn_on_gpu`` changes nothing on a CPU and is accepted; ``dilations`` other than 1 raise
    NotImplementedError (this engine has no dilated convolution).
    """
    if dilations is not None and kernels.hw_pair(dilations, "dilations") != (1, 1):
        raise NotImplementedError(f"dilations={dilations!r}: dilated convolutions are not implemented; "
                                  "pass dilations=None or [1, 1, 1, 1]")
    x, w = convert_to_tensor(input), convert_to_tensor(filter if filter is not None else filters)
    strides = kernels.hw_pair(strides, "strides")
    if data_format not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format={data_format!r} must be 'NHWC' or 'NCHW'")
    wshape = _shape_list(w)
    if wshape is None or len(wshape) != 4:
        raise ValueError(f"filter {w.name} must be 4-D (R, S, C, K), got shape {w.shape}")
    xshape = _shape_list(x)
    if xshape is not None:
        channels = xshape[3] if data_format == "NHWC" else xshape[1]
        if channels is not None and wshape[2] is not None and channels != wshape[2]:
            raise ValueError(f"conv2d: input {x.name} has {channels} channels but filter {w.name} expects {wshape[2]}")

    def compute(ctx, xv, wv):
        out, cache = kernels.conv2d_forward(xv, wv, strides, padding, data_format, algorithm=ctx.conv_algorithm)
        return out, cache.cols  # second output: the im2col columns (a workspace, as MKL-DNN's), or None

    def grad(op, g, _unused_workspace_grad=None):
        xin, win, workspace = op.inputs[0], op.inputs[1], op.outputs[1]

        def cache(xv, wv, cols):
            return kernels.conv2d_cache(xv, wv, strides, padding, data_format, cols)

        dx = make_op("Conv2DBackpropInput", [g, xin, win], lambda ctx, gv, xv, wv: (kernels.conv2d_backward(
            gv, cache(xv, wv, None), need_dw=False, gemm=ctx.gemm_algorithm,
            algorithm=ctx.conv_algorithm)[0],), [xin.dtype], [xin.shape],
            attrs={"data_format": data_format, "strides": strides, "padding": padding}).outputs[0]
        dw = make_op("Conv2DBackpropFilter", [g, xin, win, workspace], lambda ctx, gv, xv, wv, cols: (
            kernels.conv2d_backward(gv, cache(xv, wv, cols), need_dx=False, gemm=ctx.gemm_algorithm)[1],),
            [win.dtype], [win.shape], attrs={"data_format": data_format, "strides": strides,
                                             "padding": padding}).outputs[0]
        return [dx, dw]

    out_shape = _pool_out_shape(x, wshape[:2], strides, padding, data_format, wshape[3])
    return make_op("Conv2D", [x, w], compute, [x.dtype, x.dtype], [out_shape, None], grad=grad,
                   name=name or "Conv2D",
                   attrs={"strides": strides, "padding": padding, "data_format": data_format}).outputs[0]


def _pool(op_type, forward, backward, value, ksize, strides, padding, data_format, name):
    x = convert_to_tensor(value)
    ksize, strides = kernels.hw_pair(ksize, "ksize"), kernels.hw_pair(strides, "strides")
    shape = _shape_list(x)
    channels = None if shape is None else (shape[3] if data_format == "NHWC" else shape[1])

    def compute(ctx, v):
        out, cache = forward(v, ksize, strides, padding, data_format)
        return out, cache  # the second output holds what the gradient needs (argmax or counts)

    def grad(op, g, _unused=None):
        return [make_op(op_type + "Grad", [g, op.outputs[1]], lambda ctx, gv, cache: (backward(gv, cache),),
                        [x.dtype], [x.shape]).outputs[0]]

    op = make_op(op_type, [x], compute, [x.dtype, as_dtype(np.int64)],
                 [_pool_out_shape(x, ksize, strides, padding, data_format, channels), None], grad=grad,
                 name=name or op_type, attrs={"ksize": ksize, "strides": strides, "padding": padding,
                                              "data_format": data_format})
    return op.outputs[0]


def max_pool(value, ksize, strides, padding, data_format="NHWC", name=None):
    return _pool("MaxPool", kernels.maxpool_forward, kernels.maxpool_backward, value, ksize, strides, padding,
                 data_format, name)


def avg_pool(value, ksize, strides, padding, data_format="NHWC", name=None):
    return _pool("AvgPool", kernels.avgpool_forward, kernels.avgpool_backward, value, ksize, strides, padding,
                 data_format, name)


def _activation(op_type, forward, backward, cache_from_output, features, name):
    """An element-wise activation on a kernels pair whose cache is made from the output alone, so the gradient
    needs only the op's output (and conv + bias + activation can fuse)."""
    x = convert_to_tensor(features)

    def grad(op, g):
        return [make_op(op_type + "Grad", [g, op.outputs[0]], lambda ctx, gv, yv: (backward(gv, cache_from_output(yv)),),
                        [x.dtype], [x.shape]).outputs[0]]

    return make_op(op_type, [x], lambda ctx, v: (forward(v)[0],), [x.dtype], [x.shape], grad=grad,
                   name=name or op_type).outputs[0]


def relu(features, name=None):
    return _activation("Relu", kernels.relu_forward, kernels.relu_backward, lambda y: y, features, name)


def tanh(x, name=None):
    return _activation("Tanh", kernels.tanh_forward, kernels.tanh_backward, lambda y: y, x, name)


def elu(features, name=None):
    return _activation("Elu", kernels.elu_forward, kernels.elu_backward, lambda y: (y, 1.0), features, name)


def sigmoid(x, name=None):
    return _activation("Sigmoid", lambda v: ((1 / (1 + np.exp(-v))).astype(v.dtype),), lambda g, y: g * y * (1 - y),
                       lambda y: y, x, name)


def bias_add(value, bias, data_format="NHWC", name=None):
    x, b = convert_to_tensor(value), convert_to_tensor(bias)

    def grad(op, g):
        db = make_op("BiasAddGrad", [g], lambda ctx, gv: (kernels.bias_add_backward(
            gv, (kernels.channel_axis(gv.ndim, data_format), gv.ndim))[1],), [b.dtype], [b.shape],
            attrs={"data_format": data_format}).outputs[0]
        return [g, db]

    return make_op("BiasAdd", [x, b], lambda ctx, xv, bv: (kernels.bias_add_forward(xv, bv, data_format)[0],),
                   [x.dtype], [x.shape], grad=grad, name=name or "BiasAdd",
                   attrs={"data_format": data_format}).outputs[0]


def _reject_unimplemented_dropout_options(noise_shape, seed):
    for arg, value in (("noise_shape", noise_shape), ("seed", seed)):
        if value is not None:
            raise NotImplementedError(f"dropout: {arg}={value!r} is not implemented; pass {arg}=None (the mask "
                                      "is then drawn per element from the graph-level seed)")


def dropout(x, keep_prob=None, noise_shape=None, seed=None, name=None, rate=None):
    """Inverted dropout: keep with probability ``keep_prob`` (or ``1 - rate``), scale by its inverse.

    ``keep_prob`` may be a tensor (a placeholder fed 0.5 in training and 1.0 in evaluation, as the seed does).
    The mask comes from the graph's seed (``tf.set_random_seed``); ``noise_shape`` and ``seed`` are not
    implemented and raise NotImplementedError unless None.
    """
    _reject_unimplemented_dropout_options(noise_shape, seed)
    if (keep_prob is None) == (rate is None):
        raise ValueError("pass exactly one of keep_prob and rate")
    x = convert_to_tensor(x)
    keep = convert_to_tensor(keep_prob if keep_prob is not None else 1.0 - rate, dtype=x.dtype) \
        if not isinstance(keep_prob, Tensor) else keep_prob
    op_ref = []

    def compute(ctx, v, k):
        k = float(k)
        if not 0 < k <= 1:
            raise ValueError(f"dropout {op_ref[0].name}: keep_prob={k} must be in (0, 1]")
        out, mask = kernels.dropout_forward(v, k, training=k < 1, rng=ctx.rng_for(op_ref[0]))
        return out, (np.ones_like(v) if mask is None else mask)

    def grad(op, g, _unused=None):
        return [multiply(g, op.outputs[1]), None]

    op = make_op("Dropout", [x, keep], compute, [x.dtype, x.dtype], [x.shape, x.shape], grad=grad,
                 name=name or "dropout", stateful=True)
    op_ref.append(op)
    return op.outputs[0]


def softmax(logits, axis=-1, name=None):
    x = convert_to_tensor(logits)

    def grad(op, g):
        y = op.outputs[0]
        return [make_op("SoftmaxGrad", [g, y], lambda ctx, gv, yv: (
            (gv - (gv * yv).sum(axis=axis, keepdims=True)) * yv,), [x.dtype], [x.shape]).outputs[0]]

    return make_op("Softmax", [x], lambda ctx, v: (kernels.softmax(v, axis=axis).astype(v.dtype),), [x.dtype],
                   [x.shape], grad=grad, name=name or "Softmax").outputs[0]


def sparse_softmax_cross_entropy_with_logits(_sentinel=None, labels=None, logits=None, name=None):
    """Per-example cross-entropy (N,) of logits (N, classes) against integer labels (N,), computed stably.

    As in TensorFlow the op has a second output for its gradient: here the cross-entropy kernel's cache.
    """
    if _sentinel is not None:
        raise ValueError("call sparse_softmax_cross_entropy_with_logits with named arguments labels=..., logits=...")
    x, y = convert_to_tensor(logits), convert_to_tensor(labels)
    if y.dtype not in (as_dtype(np.int32), int64):
        raise TypeError(f"labels {y.name} must be int32 or int64, got {y.dtype.name}")

    def compute(ctx, lv, yv):  # the second output is the kernel's cache (the softmax and the labels)
        return kernels.softmax_xent_forward(lv, yv, reduction="none")

    def grad(op, g, _unused=None):
        scaled = make_op("XentGrad", [g, op.outputs[1]], lambda ctx, gv, cache: (
            kernels.softmax_xent_backward(gv, cache),), [x.dtype], [x.shape]).outputs[0]
        return [scaled, None]

    shape = _shape_list(x)
    op = make_op("SparseSoftmaxCrossEntropyWithLogits", [x, y], compute, [x.dtype, x.dtype],
                 [None if shape is None else shape[:1], x.shape], grad=grad,
                 name=name or "SparseSoftmaxCrossEntropyWithLogits")
    return op.outputs[0]


def softmax_cross_entropy_with_logits(_sentinel=None, labels=None, logits=None, dim=-1, name=None, axis=None):
    """Per-example cross-entropy (N,) of logits (N, classes) against label distributions (N, classes).

    Gradients flow to the logits (and, as in ``_v2``, to the labels).
    """
    if _sentinel is not None:
        raise ValueError("call softmax_cross_entropy_with_logits with named arguments labels=..., logits=...")
    x = convert_to_tensor(logits)
    y = convert_to_tensor(labels)
    if y.dtype != x.dtype:
        raise TypeError(f"labels {y.name} are {y.dtype.name} but logits {x.name} are {x.dtype.name}; use tf.cast")
    if (axis if axis is not None else dim) not in (-1, 1):
        raise ValueError("softmax_cross_entropy_with_logits supports the class axis last (axis=-1) only")
    xs, ys = _shape_list(x), _shape_list(y)
    if xs is not None and ys is not None and (len(xs) != 2 or len(ys) != 2 or
                                              any(a is not None and b is not None and a != b for a, b in zip(xs, ys))):
        raise ValueError(f"labels {y.name} of shape {ys} and logits {x.name} of shape {xs} must both be (N, classes)")

    def compute(ctx, lv, yv):
        if lv.shape != yv.shape:
            raise ValueError(f"labels have shape {yv.shape} but logits have shape {lv.shape}")
        log_probs = kernels.log_softmax(lv, axis=1)
        loss = -(yv * log_probs).sum(axis=1)
        backprop = np.exp(log_probs) * yv.sum(axis=1, keepdims=True) - yv
        return loss.astype(lv.dtype), backprop.astype(lv.dtype), (-log_probs).astype(lv.dtype)

    def grad(op, g, _unused=None, _unused2=None):
        dx = make_op("XentGrad", [g, op.outputs[1]], lambda ctx, gv, bp: (gv[:, None] * bp,), [x.dtype],
                     [x.shape]).outputs[0]
        dy = make_op("XentLabelGrad", [g, op.outputs[2]], lambda ctx, gv, nlp: (gv[:, None] * nlp,), [y.dtype],
                     [y.shape]).outputs[0]
        return [dx, dy]

    op = make_op("SoftmaxCrossEntropyWithLogits", [x, y], compute, [x.dtype] * 3,
                 [None if xs is None else xs[:1], x.shape, x.shape], grad=grad,
                 name=name or "SoftmaxCrossEntropyWithLogits")
    return op.outputs[0]


softmax_cross_entropy_with_logits_v2 = softmax_cross_entropy_with_logits


def l2_loss(t, name=None):
    x = convert_to_tensor(t)
    return make_op("L2Loss", [x], lambda ctx, v: (np.asarray((v * v).sum() / 2, dtype=v.dtype),), [x.dtype], [[]],
                   grad=lambda op, g: [multiply(g, op.inputs[0])], name=name or "L2Loss").outputs[0]

