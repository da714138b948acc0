"""``tf.layers`` and ``tf.get_variable``: the layer functions TF1-era samples use, creating their own variables."""

from __future__ import annotations

import numpy as np

from .. import kernels
from . import nn
from .core import Tensor, Variable, convert_to_tensor, float32, get_default_graph, get_variable_scope, variable_scope
from .ops import _shape_list, cast, constant, random_normal, random_uniform, reshape, subtract, truncated_normal

__all__ = ["get_variable", "glorot_uniform_initializer", "zeros_initializer", "ones_initializer",
           "constant_initializer", "truncated_normal_initializer", "random_normal_initializer",
           "conv2d", "dense", "max_pooling2d", "average_pooling2d", "dropout", "flatten"]


# initializers: callables (shape, dtype) -> initial value (a tensor, so random ones use the session's seeds)

def zeros_initializer(dtype=float32):
    return lambda shape, dtype=dtype: constant(0, dtype=dtype, shape=shape)


def ones_initializer(dtype=float32):
    return lambda shape, dtype=dtype: constant(1, dtype=dtype, shape=shape)


def constant_initializer(value=0, dtype=float32):
    return lambda shape, dtype=dtype: constant(value, dtype=dtype, shape=shape)


def truncated_normal_initializer(mean=0.0, stddev=1.0, seed=None, dtype=float32):
    return lambda shape, dtype=dtype: truncated_normal(shape, mean, stddev, dtype, seed)


def random_normal_initializer(mean=0.0, stddev=1.0, seed=None, dtype=float32):
    return lambda shape, dtype=dtype: random_normal(shape, mean, stddev, dtype, seed)


def glorot_uniform_initializer(seed=None, dtype=float32):
    """Uniform in +-sqrt(6 / (fan_in + fan_out)), TensorFlow's default for layers' kernels."""

    def init(shape, dtype=dtype):
        if len(shape) < 2:  # TensorFlow's fans for scalars and vectors
            fan_in = fan_out = shape[0] if shape else 1
        else:
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
        return random_uniform(shape, -limit, limit, dtype, seed)

    return init


def _store():
    graph = get_default_graph()
    store = graph.get_collection("_variable_store")
    if not store:
        graph.add_to_collection("_variable_store", {})
        store = graph.get_collection("_variable_store")
    return store[0]


def get_variable(name, shape=None, dtype=float32, initializer=None, trainable=True, collections=None):
    """The variable ``scope/name``: created on first use, returned again under ``variable_scope(..., reuse=True)``."""
    scope = get_variable_scope()
    full = f"{scope.name}/{name}" if scope.name else name
    store = _store()
    if full in store:
        if scope.reuse:
            return store[full]
        raise ValueError(f"Variable {full} already exists; use variable_scope(..., reuse=True) to share it")
    if scope.reuse is True:
        raise ValueError(f"Variable {full} does not exist, and variable_scope(reuse=True) forbids creating it")
    if initializer is None:
        initializer = glorot_uniform_initializer() if dtype.is_floating else zeros_initializer()
    if shape is None:
        raise ValueError(f"get_variable({name!r}) needs a shape")
    shape = [int(d) for d in shape]
    init = initializer(shape, dtype) if callable(initializer) else np.asarray(initializer, dtype=dtype.as_numpy_dtype)
    var = Variable(init, trainable=trainable, name=name, dtype=dtype, collections=collections)
    store[full] = var
    return var


def _activate(x, activation):
    return activation(x) if activation is not None else x


def _default_name(kind):
    """conv2d, conv2d_1, ...: layers count their own names, apart from op names."""
    graph = get_default_graph()
    counts = graph.get_collection("_layer_name_counts")
    if not counts:
        graph.add_to_collection("_layer_name_counts", {})
        counts = graph.get_collection("_layer_name_counts")
    n = counts[0].get(kind, 0)
    counts[0][kind] = n + 1
    return kind if n == 0 else f"{kind}_{n}"


def conv2d(inputs, filters, kernel_size, strides=(1, 1), padding="valid", data_format="channels_last",
           activation=None, use_bias=True, kernel_initializer=None, bias_initializer=None, name=None, reuse=None,
           trainable=True):
    x = convert_to_tensor(inputs)
    fmt = "NHWC" if data_format == "channels_last" else "NCHW"
    shape = _shape_list(x)
    channels = None if shape is None else (shape[3] if fmt == "NHWC" else shape[1])
    if channels is None:
        raise ValueError(f"layers.conv2d: the channel dimension of {x.name} must be known, shape is {x.shape}")
    kh, kw = kernels.hw_pair(kernel_size, "kernel_size")
    with variable_scope(name or _default_name("conv2d"), reuse=reuse):
        kernel = get_variable("kernel", [kh, kw, channels, filters], initializer=kernel_initializer,
                              trainable=trainable)
        y = nn.conv2d(x, kernel, strides=kernels.hw_pair(strides, "strides"), padding=padding.upper(), data_format=fmt)
        if use_bias:
            bias = get_variable("bias", [filters], initializer=bias_initializer or zeros_initializer(),
                                trainable=trainable)
            y = nn.bias_add(y, bias, data_format=fmt)
        return _activate(y, activation)


def dense(inputs, units, activation=None, use_bias=True, kernel_initializer=None, bias_initializer=None, name=None,
          reuse=None, trainable=True):
    from .ops import matmul

    x = convert_to_tensor(inputs)
    shape = _shape_list(x)
    if shape is None or len(shape) != 2 or shape[1] is None:
        raise ValueError(f"layers.dense expects a 2-D input with a known last dimension; {x.name} has shape {x.shape}"
                         " (use tf.layers.flatten or tf.reshape first)")
    with variable_scope(name or _default_name("dense"), reuse=reuse):
        kernel = get_variable("kernel", [shape[1], units], initializer=kernel_initializer, trainable=trainable)
        y = matmul(x, kernel)
        if use_bias:
            y = nn.bias_add(y, get_variable("bias", [units], initializer=bias_initializer or zeros_initializer(),
                                            trainable=trainable))
        return _activate(y, activation)


def max_pooling2d(inputs, pool_size, strides, padding="valid", data_format="channels_last", name=None):
    fmt = "NHWC" if data_format == "channels_last" else "NCHW"
    return nn.max_pool(inputs, kernels.hw_pair(pool_size, "pool_size"), kernels.hw_pair(strides, "strides"), padding.upper(), fmt, name=name)


def average_pooling2d(inputs, pool_size, strides, padding="valid", data_format="channels_last", name=None):
    fmt = "NHWC" if data_format == "channels_last" else "NCHW"
    return nn.avg_pool(inputs, kernels.hw_pair(pool_size, "pool_size"), kernels.hw_pair(strides, "strides"), padding.upper(), fmt, name=name)


def dropout(inputs, rate=0.5, noise_shape=None, seed=None, training=False, name=None):
    """Dropout only while ``training`` (a Python bool, or a bool tensor fed at run time).

    ``noise_shape`` and ``seed`` are not implemented: as in :func:`workshop_lib.tf.nn.dropout`, they raise
    NotImplementedError unless None.
    """
    nn._reject_unimplemented_dropout_options(noise_shape, seed)
    if isinstance(training, (Tensor, Variable)):
        # keep probability 1 - rate when training is True, 1 when it is False
        keep = subtract(1.0, cast(training, float32) * constant(float(rate)))
        return nn.dropout(inputs, keep_prob=keep, name=name)
    if not training:
        return convert_to_tensor(inputs)
    return nn.dropout(inputs, rate=rate, name=name)


def flatten(inputs, name=None):
    x = convert_to_tensor(inputs)
    shape = _shape_list(x)
    if shape is None or None in shape[1:]:
        raise ValueError(f"layers.flatten needs known non-batch dimensions; {x.name} has shape {x.shape}")
    return reshape(x, [-1, int(np.prod(shape[1:]))], name=name or "flatten")
