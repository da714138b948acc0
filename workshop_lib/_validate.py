"""The checks that kernels, int8 and quantization make at their public boundary, in one wording.

Each helper raises ``ValueError`` (a wrong value or shape) or ``TypeError`` (a wrong type) whose
message names the argument, the value received and the rule, e.g.
``x.shape[1]=784 must equal w.shape[0]=3136``. The numba kernels behind the public functions
check nothing: they trust what passed through here.
"""

from __future__ import annotations

import numbers

import numpy as np

# dtypes the numba kernels are compiled for: floats for the float kernels, any of these for the
# integer-capable ones (pooling and im2col run on u8 activations in the int8 path)
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INTEGERS = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                       np.uint64))
REALS = INTEGERS + FLOATS


def _names(dtypes):
    if dtypes == FLOATS:
        return "float32 or float64"
    if dtypes == REALS:
        return "an integer or float32/float64 type"
    return " or ".join(np.dtype(d).name for d in dtypes)


def array(x, name, ndim=None, dtypes=None, layout=None) -> np.ndarray:
    """``np.asarray(x)``, after checking its number of dimensions and its dtype.

    ``ndim`` is an int or a tuple of allowed ints, ``dtypes`` a tuple of allowed dtypes
    (:data:`FLOATS`, :data:`REALS`, ...), ``layout`` a hint such as ``"(N, H, W, C)"`` for the message.
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}={x!r} must be an array")
    x = np.asarray(x)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            dims = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}.shape={x.shape} must be {dims}" + (f" {layout}" if layout else ""))
    if dtypes is not None and x.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name}.dtype={x.dtype} must be {_names(tuple(np.dtype(d) for d in dtypes))}")
    return x


def in_place(x, name, like=None, like_name="w"):
    """A writeable, C-contiguous ndarray (updated in place), of ``like``'s shape and dtype when given."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} is a {type(x).__name__}; it is updated in place, so it must be a numpy array")
    if not (x.flags.c_contiguous and x.flags.writeable):
        raise ValueError(f"{name} is updated in place, so it must be a writeable C-contiguous array "
                         f"(got c_contiguous={x.flags.c_contiguous}, writeable={x.flags.writeable})")
    if like is not None:
        same_shape(x, name, like, like_name)
        if x.dtype != like.dtype:
            raise TypeError(f"{name}.dtype={x.dtype} must equal {like_name}.dtype={like.dtype}")
    return x


def same_shape(x, name, other, other_name):
    if np.shape(x) != np.shape(other):
        raise ValueError(f"{name}.shape={np.shape(x)} must equal {other_name}.shape={np.shape(other)}")


def shape(x, name, expected, what):
    """``x.shape`` must be ``expected``; ``what`` says where ``expected`` comes from."""
    if tuple(np.shape(x)) != tuple(expected):
        raise ValueError(f"{name}.shape={np.shape(x)} must equal {tuple(expected)}, {what}")


def equal(name, value, other_name, other, why=""):
    """``name=value must equal other_name=other``, e.g. two dimensions that must match."""
    if value != other:
        raise ValueError(f"{name}={value} must equal {other_name}={other}" + (f" ({why})" if why else ""))


def option(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(repr(c) for c in choices)}")
    return value


def integer(value, name, minimum=None, maximum=None) -> int:
    """A Python or numpy integer (not a bool, not a float) within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}={value!r} must be an integer")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name}={value} must be {bounds}")
    return value


def real(value, name, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number within the given bounds (closed unless ``*_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
            value = value.item()
        else:
            raise TypeError(f"{name}={value!r} must be a real number")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}={value} must be in {left}{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}{right}")
    return value


def finite(x, name):
    """Raise if a float array holds NaN or infinity, naming the first such element."""
    x = np.asarray(x)
    if x.dtype.kind in "fc" and x.size and not np.isfinite(x).all():
        where = np.unravel_index(int(np.flatnonzero(~np.isfinite(x.ravel()))[0]), x.shape)
        raise ValueError(f"{name}[{', '.join(map(str, where))}]={x[where]} is not finite; expected finite values")
    return x


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def pad_pairs(value, name, rule) -> tuple:
    """((top, bottom), (left, right)) of non-negative ints, as given; else ValueError ``{name}={value!r} {rule}``."""
    try:
        (pt, pb), (pl, pr) = value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} {rule}") from None
    if not all(_is_int(p) and p >= 0 for p in (pt, pb, pl, pr)):
        raise ValueError(f"{name}={value!r} {rule}")
    return (int(pt), int(pb)), (int(pl), int(pr))


def positive_pair(value, name) -> tuple:
    """(h, w), each >= 1, from an int, ``[h]``, ``(h, w)`` or TensorFlow's ``[1, h, w, 1]`` (NHWC) and
    ``[1, 1, h, w]`` (NCHW): the ways a stride, a pooling window or a kernel size is written."""
    rule = "must be a positive integer or a pair (h, w) of them"
    if _is_int(value):
        items = (value, value)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"{name}={value!r} {rule}") from None
        if not items or not all(_is_int(v) for v in items):
            raise TypeError(f"{name}={value!r} {rule}")
        if len(items) == 1:
            items = items * 2
        elif len(items) == 4:
            if items[0] == 1 and items[3] == 1:
                items = items[1:3]
            elif items[0] == 1 and items[1] == 1:
                items = items[2:4]
            else:
                raise ValueError(f"{name}={value!r}: four values must be TensorFlow's [1, h, w, 1] (NHWC) or "
                                 f"[1, 1, h, w] (NCHW); TensorFlow supports no {name} over the batch or channel axis")
    if len(items) != 2 or min(items) < 1:
        raise ValueError(f"{name}={value!r} {rule}")
    return int(items[0]), int(items[1])
