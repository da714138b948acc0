"""Quantization: mapping float32 tensors to int8/uint8 and back, and calibration.

Mirrors oneDNN's int8 inference and ``torch.ao.quantization``: a real value x is
stored as an integer q with ``x ~= scale * (q - zero_point)``; weights are
symmetric and per output channel (zero point 0), activations after a ReLU are
unsigned (u8) with zero point 0; products accumulate in s32 (``workshop_lib.int8``)
and are *requantized* to u8 for the next layer. The one idea: precision is
spent where the values are, so choosing the range (calibration) decides the
accuracy: min-max keeps outliers, a percentile clips them, entropy (KL
divergence, as TensorRT and oneDNN calibrate) picks the clip that loses the
least information.

Rounding is half to even (``np.rint``); values outside the integer range saturate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from . import _validate as check
from . import runtime

__all__ = [
    "QuantParams", "qrange", "choose_qparams", "quantize", "dequantize", "requantize",
    "Calibrator", "entropy_threshold",
]

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
           np.dtype(np.int32): (-(2**31), 2**31 - 1)}


def qrange(dtype):
    """(qmin, qmax) of an integer dtype.

    Parameters
    ----------
    dtype : numpy dtype
        int8, uint8, int16 or int32.

    Returns
    -------
    tuple of int
    """
    dtype = np.dtype(dtype)
    if dtype not in _RANGES:
        raise ValueError(f"dtype={dtype} must be one of int8, uint8, int16, int32")
    return _RANGES[dtype]


@dataclass(frozen=True)
class QuantParams:
    """How a tensor is quantized: ``x ~= scale * (q - zero_point)``.

    ``scale`` and ``zero_point`` are scalars (per tensor) or 1-D arrays along
    ``axis`` (per channel); ``dtype`` is the integer type of q.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype
    axis: int | None = None

    def __post_init__(self):
        """Refuse parameters that would quantize to garbage: the scale > 0 and finite, the zero point an
        integer of ``dtype``'s range, per-channel values 1-D."""
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        qmin, qmax = qrange(self.dtype)
        scale = check.finite(check.array(self.scale, "scale", dtypes=check.REALS), "scale")
        _first_bad(scale, scale <= 0, "scale", "must be positive (a step of the quantization grid)")
        zero_point = check.finite(check.array(self.zero_point, "zero_point", dtypes=check.REALS), "zero_point")
        _first_bad(zero_point, zero_point != np.rint(zero_point), "zero_point", "must be a whole number")
        _first_bad(zero_point, (zero_point < qmin) | (zero_point > qmax), "zero_point",
                   f"must lie in the {self.dtype} range [{qmin}, {qmax}]")
        if self.axis is not None:
            check.integer(self.axis, "axis")
            if scale.ndim != 1 or zero_point.ndim not in (0, 1) or zero_point.size not in (1, scale.size):
                raise ValueError(f"per-channel (axis={self.axis}) scale.shape={scale.shape} must be 1-D and "
                                 f"zero_point.shape={zero_point.shape} a scalar or the same shape")
        elif np.broadcast_shapes(scale.shape, zero_point.shape) != np.broadcast_shapes(scale.shape):
            raise ValueError(f"zero_point.shape={zero_point.shape} must broadcast to scale.shape={scale.shape}")

    def _shape_for(self, x):
        if self.axis is None:
            return self.scale, self.zero_point
        if not -x.ndim <= self.axis < x.ndim or x.shape[self.axis] != np.size(self.scale):
            raise ValueError(f"x.shape={x.shape} must have {np.size(self.scale)} channels along axis={self.axis}, "
                             "one per scale of these per-channel parameters")
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


def _first_bad(x, bad, name, rule):
    """Raise naming the first element of ``x`` where ``bad`` holds."""
    bad = np.broadcast_to(bad, np.shape(x))
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), bad.shape)
        label = f"{name}[{', '.join(map(str, where))}]" if np.ndim(x) else name
        raise ValueError(f"{label}={np.asarray(x)[where]} {rule}")


def _check_finite(x, name):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"{name}.dtype={x.dtype} must be numeric")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")
    return x


def _check_qparams(qp, name):
    if not isinstance(qp, QuantParams):
        raise TypeError(f"{name} is a {type(qp).__name__}; it must be QuantParams (from choose_qparams)")
    return qp


def choose_qparams(min_val, max_val, dtype=np.int8, symmetric=True, axis=None) -> QuantParams:
    """Scale and zero point covering [min_val, max_val] (scalars, or arrays for per-channel).

    Symmetric: zero point 0 and ``scale = max(|min|, |max|) / qmax`` (int8 uses
    [-127, 127] so that +x and -x are both representable); for uint8 the range
    is [0, max]. Asymmetric: the range is stretched to include 0 (so that 0 is
    exact, which zero padding needs) and mapped onto [qmin, qmax]. A range of
    zero (a constant-zero tensor) gets scale 1, so it quantizes exactly to the zero point.
    Raises ``ValueError`` if a bound is not finite or ``min_val`` exceeds ``max_val``.

    Parameters
    ----------
    min_val, max_val : float or array_like
        The range to cover (arrays: one per channel along ``axis``).
    dtype : numpy dtype
        int8, uint8, int16 or int32.
    symmetric : bool
        Zero point 0 (else the range is mapped onto the dtype's full range).
    axis : int, optional
        The channel axis of per-channel parameters.

    Returns
    -------
    QuantParams
    """
    qmin, qmax = qrange(dtype)
    min_val = _check_finite(check.array(min_val, "min_val", dtypes=check.REALS), "min_val")
    max_val = _check_finite(check.array(max_val, "max_val", dtypes=check.REALS), "max_val")
    try:
        shape = np.broadcast_shapes(min_val.shape, max_val.shape)
    except ValueError:
        raise ValueError(f"min_val.shape={min_val.shape} and max_val.shape={max_val.shape} must match") from None
    inverted = np.broadcast_to(min_val > max_val, shape)
    if inverted.any():
        where = np.unravel_index(int(np.flatnonzero(inverted.ravel())[0]), shape)
        index = f"[{', '.join(map(str, where))}]" if shape else ""
        raise ValueError(f"min_val{index}={np.broadcast_to(min_val, shape)[where]} must be <= "
                         f"max_val{index}={np.broadcast_to(max_val, shape)[where]}")
    lo = np.minimum(min_val.astype(np.float64), 0.0)
    hi = np.maximum(max_val.astype(np.float64), 0.0)
    if symmetric:
        if np.dtype(dtype) == np.uint8:
            scale = hi / qmax
        else:
            scale = np.maximum(-lo, hi) / qmax
        zero_point = np.zeros_like(scale, dtype=np.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qmin - lo / safe), qmin, qmax).astype(np.int32)
    scale = np.where(scale > 0, scale, 1.0)
    return QuantParams(np.asarray(scale, dtype=np.float64), np.asarray(zero_point, dtype=np.int32),
                       np.dtype(dtype), axis)


def quantize(x, qp: QuantParams):
    """q = saturate(rint(x / scale) + zero_point), rounding half to even.

    Parameters
    ----------
    x : array_like
        Finite real values.
    qp : QuantParams
        Scale(s) and zero point(s), per tensor or per channel.

    Returns
    -------
    numpy.ndarray
        Integers of ``qp``'s dtype.
    """
    qp = _check_qparams(qp, "qp")
    x = _check_finite(x, "x")
    scale, zp = qp._shape_for(x)
    qmin, qmax = qrange(qp.dtype)
    return np.clip(np.rint(x / scale) + zp, qmin, qmax).astype(qp.dtype)


def dequantize(q, qp: QuantParams):
    """x ~= scale * (q - zero_point), as float32; ``q`` holds integers (from :func:`quantize`).

    Parameters
    ----------
    q : array_like
        Integers.
    qp : QuantParams
        Scale(s) and zero point(s), per tensor or per channel.

    Returns
    -------
    numpy.ndarray
        float32.
    """
    qp = _check_qparams(qp, "qp")
    q = check.array(q, "q", dtypes=check.INTEGERS)
    scale, zp = qp._shape_for(q)
    return ((q.astype(np.float64) - zp) * scale).astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _requantize_rows(acc, bias, multiplier, zero_point, qmin, qmax, relu, out):
    """IN acc (M, K) s32, bias (K,) s64, multiplier (K,) f64; OUT out (M, K): one fused pass."""
    m_size, k_size = acc.shape
    for i in numba.prange(m_size):
        for k in range(k_size):
            v = np.rint((np.int64(acc[i, k]) + bias[k]) * multiplier[k]) + zero_point
            if relu and v < zero_point:
                v = zero_point
            out[i, k] = min(max(v, qmin), qmax)


def requantize(acc, in_scale, out: QuantParams, bias=None, relu=False):
    """s32 accumulators -> the next layer's integers: ``rint((acc + bias) * in_scale / out.scale) + zp``.

    ``in_scale`` is the accumulator's scale (input scale x weight scale, a
    scalar or one per output channel along the last axis); ``bias`` is already
    in s32 at that scale; ``relu`` clamps at the zero point (a fused ReLU).
    One fused pass (numba) over the accumulators, as oneDNN's output stage.

    ``acc`` and ``bias`` hold s32 values: any integer dtype (or floats holding whole numbers) whose values lie in
    [-2**31, 2**31 - 1]; anything else (NaN, infinity, a fraction, an int64 beyond s32) raises ``ValueError``
    naming the first offending element, rather than wrapping. ``out`` is per-tensor (a scalar zero point).

    Parameters
    ----------
    acc : array_like
        int32 accumulators.
    in_scale : float or array_like
        The accumulators' scale (one per output channel along the last axis, or a scalar).
    out : QuantParams
        The next layer's parameters.
    bias : array_like, optional
        int32, already at ``in_scale``.
    relu : bool
        Clamp at the zero point.

    Returns
    -------
    numpy.ndarray
        Integers of ``out``'s dtype.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    out = _check_qparams(out, "out")
    if np.ndim(out.zero_point) != 0:
        raise ValueError(f"out.zero_point.shape={np.shape(out.zero_point)} must be a scalar: requantize writes "
                         "one per-tensor output")
    acc = _as_s32(acc, "acc")
    channels = acc.shape[-1] if acc.ndim else 1
    rows = acc.reshape(-1, channels)
    in_scale = check.finite(check.array(in_scale, "in_scale", dtypes=check.REALS), "in_scale")
    _first_bad(in_scale, in_scale <= 0, "in_scale", "must be positive")
    bias = np.zeros(channels, np.int32) if bias is None else _as_s32(bias, "bias")
    try:
        multiplier = np.broadcast_to(in_scale.astype(np.float64) / out.scale, (channels,)).copy()
        bias64 = np.broadcast_to(bias.astype(np.int64), (channels,)).copy()
    except ValueError:
        raise ValueError(f"in_scale.shape={in_scale.shape}, out.scale.shape={np.shape(out.scale)} and "
                         f"bias.shape={np.shape(bias)} must each be a scalar or ({channels},), one per channel "
                         f"(the last axis of acc.shape={acc.shape})") from None
    qmin, qmax = qrange(out.dtype)
    result = np.empty(rows.shape, dtype=out.dtype)
    _requantize_rows(rows, bias64, multiplier, float(out.zero_point), float(qmin), float(qmax), bool(relu), result)
    return result.reshape(acc.shape)


_S32 = qrange(np.int32)


def _as_s32(x, name):
    """x as a C-contiguous int32 array, exactly, or a ValueError naming the first value that is not an s32."""
    x = check.array(x, name, dtypes=check.REALS)
    if x.dtype.kind == "f":
        check.finite(x, name)
        _first_bad(x, x != np.rint(x), name, "must be a whole number (an s32 accumulator)")
    if not np.can_cast(x.dtype, np.int32):  # compared in x's own dtype, so exactly
        _first_bad(x, (x < _S32[0]) | (x > _S32[1]), name,
                   f"lies outside the s32 range [{_S32[0]}, {_S32[1]}] of the accumulators")
    return np.ascontiguousarray(x, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# Calibration


def _smooth(p, eps=1e-4):
    """Give empty bins a tiny mass taken from the others, so KL(P || Q) stays finite (as MXNet and TensorRT do)."""
    zeros = p == 0
    n_zeros, n_nonzeros = int(zeros.sum()), int(p.size - zeros.sum())
    if n_nonzeros == 0:
        return None
    return p + eps * zeros - (eps * n_zeros / n_nonzeros) * ~zeros


def entropy_threshold(hist, bin_width, levels=128):
    """TensorRT's entropy calibration: the clip threshold minimising KL(P || Q).

    ``hist`` is a histogram of |x| from 0 with bins of ``bin_width``. For each
    candidate threshold (a bin edge i >= levels), P is the histogram cut at i
    with the clipped tail added to its last bin, Q is the cut histogram merged
    into ``levels`` quantization levels and spread back evenly over P's
    non-empty bins; the threshold with the smallest KL divergence wins.

    Parameters
    ----------
    hist : array_like
        Counts of |x| in bins from 0.
    bin_width : float
    levels : int
        Quantization levels of the positive half (128 for int8).

    Returns
    -------
    float
        The clip threshold.
    """
    hist = check.finite(check.array(hist, "hist", 1, check.REALS), "hist")
    _first_bad(hist, hist < 0, "hist", "must be a count (>= 0)")
    hist = hist.astype(np.float64)
    bin_width = check.real(bin_width, "bin_width", 0, low_open=True)
    levels = check.integer(levels, "levels", 1)
    n_bins = len(hist)
    if n_bins <= levels:
        return n_bins * bin_width
    best_i, best_kl = n_bins, np.inf
    for i in range(levels, n_bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p != 0
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        sizes = np.diff(np.append(starts, i))
        group_mass = np.add.reduceat(hist[:i], starts)
        group_count = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(group_mass, group_count, out=np.zeros(levels), where=group_count > 0)
        q = np.repeat(per_bin, sizes) * nonzero
        if p.sum() == 0 or q.sum() == 0:
            continue
        p_s, q_s = _smooth(p), _smooth(q)  # on counts, so the tiny eps never makes a bin negative
        if p_s is None or q_s is None:
            continue
        p_s, q_s = p_s / p_s.sum(), q_s / q_s.sum()
        kl = float(np.sum(p_s * np.log(p_s / q_s)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * bin_width


class Calibrator:
    """Collects a tensor's values over a calibration set and chooses its range.

    ``method``: ``"minmax"`` (the observed range), ``"percentile"`` (clip at the
    ``percentile`` of |x|), or ``"entropy"`` (KL-divergence threshold over a
    ``bins``-bin histogram). Values are kept in memory: meant for calibration
    sets of hundreds of images, as in the labs.

    Parameters
    ----------
    method : {"minmax", "percentile", "entropy"}
    percentile : float
        For "percentile", in (0, 100].
    bins : int
        Histogram bins for "entropy".
    """

    METHODS = ("minmax", "percentile", "entropy")

    def __init__(self, method="minmax", percentile=99.99, bins=2048):
        if method not in self.METHODS:
            raise ValueError(f"method={method!r} must be one of {self.METHODS}")
        percentile = check.real(percentile, "percentile", 0, 100, low_open=True)
        bins = check.integer(bins, "bins", 1)
        self.method, self.percentile, self.bins = method, percentile, bins
        self._chunks = []

    def update(self, x):
        """Add a batch of the tensor's values.

        Parameters
        ----------
        x : array_like
            Finite values, not empty.
        """
        x = _check_finite(x, "calibration data")
        if x.size == 0:
            raise ValueError(f"calibration data of shape {x.shape} is empty")
        self._chunks.append(np.asarray(x, dtype=np.float32).ravel())
        return self

    def range(self):
        """(min, max) to quantize with."""
        if not self._chunks:
            raise ValueError("no calibration data: call update(x) first")
        values = np.concatenate(self._chunks)
        lo, hi = float(values.min()), float(values.max())
        if self.method == "minmax" or hi == lo:
            return lo, hi
        magnitude = np.abs(values)
        if self.method == "percentile":
            threshold = float(np.percentile(magnitude, self.percentile))
        else:
            amax = float(magnitude.max())
            hist, _ = np.histogram(magnitude, bins=self.bins, range=(0.0, amax))
            levels = 256 if lo >= 0 else 128  # u8 after a ReLU has twice the levels of s8
            threshold = entropy_threshold(hist, amax / self.bins, levels=levels)
        return max(lo, -threshold), min(hi, threshold)

    def qparams(self, dtype=np.uint8, symmetric=True):
        """The quantization parameters of the chosen range (:func:`choose_qparams`).

        Parameters
        ----------
        dtype : numpy dtype
            int8, uint8, int16 or int32.
        symmetric : bool

        Returns
        -------
        QuantParams
        """
        lo, hi = self.range()
        return choose_qparams(lo, hi, dtype, symmetric)
