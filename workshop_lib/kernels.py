"""The float32 building blocks of a CNN, each a forward/backward pair, as oneDNN's primitives are.

Mirrors oneDNN (MKL-DNN): GEMM, convolution (direct, or im2col + GEMM),
pooling, activations, bias, batch norm, softmax with cross-entropy, dropout,
and the reorders between the plain layouts NCHW / NHWC and the blocked layout
nChw16c that lets the innermost loop run over 16 channels at once (one AVX-512
register of float32). The one idea: the same mathematics runs at very different
speeds depending on the algorithm and the memory layout it walks.

Shape letters: N batch, H W height width, C input channels, K output channels
(filters), R S filter height width, OH OW output height width. Weights are
HWIO, (R, S, C, K), whatever the data layout, as TensorFlow's are.

Style: ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) -> grads``,
gradients named with a ``d`` prefix. The kernels accept float32 (the labs) and
float64 (the gradient checks). Reference versions (``algorithm="direct"``,
``gemm_reference``) stay beside the fast ones: they are the specification.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from . import _validate as check
from . import jit_conv, runtime


__all__ = [
    "gemm_reference", "gemm_forward", "gemm_backward",
    "conv2d_forward", "conv2d_backward", "conv2d_output_size", "ConvCache", "conv2d_cache", "hw_pair",
    "maxpool_forward", "maxpool_backward", "maxpool_relu_backward", "avgpool_forward", "avgpool_backward",
    "relu_forward", "relu_backward", "relu_bias_backward", "tanh_forward", "tanh_backward", "elu_forward", "elu_backward",
    "bias_add_forward", "bias_add_backward",
    "batchnorm_forward", "batchnorm_backward",
    "softmax", "log_softmax", "softmax_xent_forward", "softmax_xent_backward",
    "dropout_forward", "dropout_backward",
    "nchw_to_nhwc", "nhwc_to_nchw", "to_blocked", "from_blocked", "weights_to_blocked",
    "conv2d_blocked_forward", "BLOCK", "im2col_nhwc", "adam_update", "adam_step_size",
    "truncated_standard_normal", "keep_freed_memory",
]

BLOCK = 16  # channels per block in nChw16c: one 512-bit register of float32

keep_freed_memory = runtime.keep_freed_memory  # the allocator setting is the runtime's


def hw_pair(value, name):
    """(height, width) from an int, [h], [h, w] or TensorFlow's [1, h, w, 1] (NHWC) / [1, 1, h, w] (NCHW).

    Strides, pooling windows and kernel sizes are all written these ways; ``name`` goes into the error.
    """
    return check.positive_pair(value, name)


def _check_format(data_format):
    if data_format not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format={data_format!r} must be 'NHWC' or 'NCHW'")


def _check_image(x, name, data_format, dtypes):
    """A 4-D batch of images in ``data_format``, with at least one row, column and channel."""
    layout = "(N, H, W, C)" if data_format == "NHWC" else "(N, C, H, W)"
    x = check.array(x, name, 4, dtypes, f"{layout} for data_format={data_format!r}")
    for axis, letter in zip((1, 2, 3), data_format[1:]):
        if x.shape[axis] < 1:
            raise ValueError(f"{name}.shape[{axis}]={x.shape[axis]} ({letter}) must be at least 1")
    return x


def output_hw(h, w, r, s, stride, pads):
    """(OH, OW) for resolved pads ((top, bottom), (left, right)): may be < 1, see :func:`check_output`."""
    (pt, pb), (pl, pr) = pads
    return (h + pt + pb - r) // stride[0] + 1, (w + pl + pr - s) // stride[1] + 1


def check_output(out_h, out_w, window, padding, stride, h, w):
    """An empty output is an error: no path may return an empty array (TF raises the same)."""
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{window} with padding={padding!r} and stride={stride} does not fit the {h}x{w} input: "
                         f"the output would be {max(out_h, 0)}x{max(out_w, 0)}; use padding='SAME' or a window "
                         f"of at most {h}x{w}")


# ----------------------------------------------------------------------------------------------
# GEMM


@numba.njit(parallel=True, cache=True)
def _gemm_reference(a, b, c):  # IN a (M, K), b (K, N); OUT c (M, N): the textbook triple loop, i-k-j order
    m_size, k_size = a.shape
    n_size = b.shape[1]
    for i in numba.prange(m_size):
        for j in range(n_size):
            c[i, j] = 0.0
        for k in range(k_size):
            aik = a[i, k]
            for j in range(n_size):
                c[i, j] += aik * b[k, j]


def _check_gemm(a, b, a_name="a", b_name="b"):
    a = check.array(a, a_name, 2, check.REALS, "(M, K)")
    b = check.array(b, b_name, 2, check.REALS, "(K, N)")
    check.equal(f"{a_name}.shape[1]", a.shape[1], f"{b_name}.shape[0]", b.shape[0], "the inner dimensions")
    return a, b


def gemm_reference(a, b):
    """C = A @ B with plain numba loops (the reference kernel; BLAS is the optimised one).

    ``a`` (M, K) and ``b`` (K, N) are 2-D arrays of integers or float32/float64; raises ``ValueError``
    if the inner dimensions differ.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    a, b = _check_gemm(a, b)
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    _gemm_reference(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    return c


def gemm_forward(a, b, trans_a=False, trans_b=False, algorithm="blas"):
    """C = op(A) @ op(B), op = transpose where asked. ``algorithm``: "blas" (numpy's BLAS) or "reference"."""
    check.option(algorithm, "algorithm", ("blas", "reference"))
    a = check.array(a, "a", 2, check.REALS)
    b = check.array(b, "b", 2, check.REALS)
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    _check_gemm(opa, opb, "op(a)", "op(b)")
    c = runtime.matmul(opa, opb) if algorithm == "blas" else gemm_reference(opa, opb)
    return c, (a, b, trans_a, trans_b)


def gemm_backward(dc, cache):
    """(da, db) for C = op(A) @ op(B); ``dc`` has C's shape (M, N)."""
    a, b, trans_a, trans_b = cache
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    dc = check.array(dc, "dc", 2, check.REALS)
    check.shape(dc, "dc", (opa.shape[0], opb.shape[1]), "the shape of the forward output C")
    d_opa, d_opb = runtime.matmul(dc, opb.T), runtime.matmul(opa.T, dc)
    return (d_opa.T if trans_a else d_opa), (d_opb.T if trans_b else d_opb)


# ----------------------------------------------------------------------------------------------
# Convolution

def conv_padding(padding, h, w, r, s, stride):
    """((top, bottom), (left, right)) for "SAME", "VALID", an int, or explicit pairs."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0), (0, 0)
        if padding.upper() == "SAME":
            out_h, out_w = -(-h // stride[0]), -(-w // stride[1])
            ph = max((out_h - 1) * stride[0] + r - h, 0)
            pw = max((out_w - 1) * stride[1] + s - w, 0)
            return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)
        raise ValueError(f"padding={padding!r} must be 'SAME', 'VALID', an int or ((top, bottom), (left, right))")
    rule = "must be 'SAME', 'VALID', a non-negative int or ((top, bottom), (left, right)) of them"
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, (bool, np.bool_)):
        if padding < 0:
            raise ValueError(f"padding={padding} {rule}")
        return (int(padding), int(padding)), (int(padding), int(padding))
    return check.pad_pairs(padding, "padding", rule)


@numba.njit(parallel=True, cache=True)
def _im2col_nhwc(x, r_size, s_size, stride_h, stride_w, pad_top, pad_left, out_h, out_w, pad_value, cols):
    """IN x (N, H, W, C); OUT cols (N*OH*OW, R*S*C): each row is one receptive field, (r, s, c) order."""
    n_size, h_size, w_size, c_size = x.shape
    for row in numba.prange(n_size * out_h):
        n = row // out_h
        oh = row % out_h
        for ow in range(out_w):
            base = (n * out_h + oh) * out_w + ow
            col = 0
            for r in range(r_size):
                ih = oh * stride_h + r - pad_top
                for s in range(s_size):
                    iw = ow * stride_w + s - pad_left
                    inside = 0 <= ih < h_size and 0 <= iw < w_size
                    if c_size >= 8:  # C contiguous values: one vectorised copy
                        if inside:
                            cols[base, col : col + c_size] = x[n, ih, iw, :]
                        else:
                            cols[base, col : col + c_size] = pad_value
                    else:  # a few channels (the first layer): a scalar loop beats a slice's overhead
                        for c in range(c_size):
                            cols[base, col + c] = x[n, ih, iw, c] if inside else pad_value
                    col += c_size


def im2col_nhwc(x, ksize, stride=(1, 1), padding="VALID", pad_value=0):
    """Receptive fields of an NHWC tensor as rows: returns (cols (N*OH*OW, R*S*C), (OH, OW)).

    ``x`` is (N, H, W, C) of integers (the int8 path's u8 activations) or floats; ``ksize`` and ``stride``
    are ints or (h, w) pairs; padded cells hold ``pad_value``, which must be representable in ``x.dtype``.
    """
    x = _check_image(x, "x", "NHWC", check.REALS)
    (r, s), stride = hw_pair(ksize, "ksize"), hw_pair(stride, "stride")
    n_size, h, w, c = x.shape
    (pt, pb), (pl, pr) = conv_padding(padding, h, w, r, s, stride)
    out_h, out_w = output_hw(h, w, r, s, stride, ((pt, pb), (pl, pr)))
    check_output(out_h, out_w, f"ksize={(r, s)}", padding, stride, h, w)
    cols = np.empty((n_size * out_h * out_w, r * s * c), dtype=x.dtype)
    _im2col_nhwc(np.ascontiguousarray(x), r, s, stride[0], stride[1], pt, pl, out_h, out_w,
                 _pad_value(pad_value, x.dtype), cols)
    return cols, (out_h, out_w)


def _pad_value(value, dtype):
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return dtype.type(check.integer(value, "pad_value", int(info.min), int(info.max)))
    return dtype.type(check.real(value, "pad_value"))


def conv2d_output_size(h, w, r, s, stride, padding):
    """(OH, OW) of an R x S window sliding over an H x W input; raises ``ValueError`` if it would be empty."""
    h, w = check.integer(h, "h", 1), check.integer(w, "w", 1)
    r, s = check.integer(r, "r", 1), check.integer(s, "s", 1)
    stride = hw_pair(stride, "stride")
    out_h, out_w = output_hw(h, w, r, s, stride, conv_padding(padding, h, w, r, s, stride))
    check_output(out_h, out_w, f"a {r}x{s} window", padding, stride, h, w)
    return out_h, out_w


@numba.njit(parallel=True, cache=True)
def _conv2d_direct_nhwc(x, w, sh, sw, pt, pl, out):  # IN x (N,H,W,C), w (R,S,C,K); OUT out (N,OH,OW,K)
    n_size, h_size, w_size, c_size = x.shape
    r_size, s_size, _, k_size = w.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for row in numba.prange(n_size * out_h):
        n, oh = row // out_h, row % out_h
        for ow in range(out_w):
            acc = np.zeros(k_size, dtype=out.dtype)
            for r in range(r_size):
                ih = oh * sh + r - pt
                if ih < 0 or ih >= h_size:
                    continue
                for s in range(s_size):
                    iw = ow * sw + s - pl
                    if iw < 0 or iw >= w_size:
                        continue
                    for c in range(c_size):
                        xv = x[n, ih, iw, c]
                        for k in range(k_size):  # innermost over K: contiguous in w and out
                            acc[k] += xv * w[r, s, c, k]
            out[n, oh, ow, :] = acc


@numba.njit(parallel=True, cache=True)
def _conv2d_direct_nchw(x, w, sh, sw, pt, pl, out):  # IN x (N,C,H,W), w (R,S,C,K); OUT out (N,K,OH,OW)
    n_size, c_size, h_size, w_size = x.shape
    r_size, s_size, _, k_size = w.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for job in numba.prange(n_size * k_size):
        n, k = job // k_size, job % k_size
        plane = np.zeros((out_h, out_w), dtype=out.dtype)
        for c in range(c_size):
            for r in range(r_size):
                for s in range(s_size):
                    wv = w[r, s, c, k]
                    for oh in range(out_h):
                        ih = oh * sh + r - pt
                        if ih < 0 or ih >= h_size:
                            continue
                        for ow in range(out_w):  # innermost over W: contiguous in x and out
                            iw = ow * sw + s - pl
                            if 0 <= iw < w_size:
                                plane[oh, ow] += wv * x[n, c, ih, iw]
        out[n, k] = plane


@numba.njit(parallel=True, cache=True)
def col2im_nhwc(dcols, r_size, s_size, sh, sw, pt, pl, out_h, out_w, dx):  # OUT dx (N,H,W,C), zeroed
    """The adjoint of im2col, as a gather: each input pixel sums the column entries that read it.

    One thread owns each input row (n, ih), so no two threads touch the same dx element, and the
    rows spread over threads evenly (the old scatter split work by image only).
    """
    n_size, h_size, w_size, c_size = dx.shape
    for job in numba.prange(n_size * h_size):
        n = job // h_size
        ih = job % h_size
        for iw in range(w_size):
            for r in range(r_size):
                th = ih + pt - r  # oh * sh == th
                if th < 0 or th % sh != 0 or th // sh >= out_h:
                    continue
                oh = th // sh
                for s in range(s_size):
                    tw = iw + pl - s
                    if tw < 0 or tw % sw != 0 or tw // sw >= out_w:
                        continue
                    row = (n * out_h + oh) * out_w + tw // sw
                    col = (r * s_size + s) * c_size
                    for c in range(c_size):
                        dx[n, ih, iw, c] += dcols[row, col + c]


class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs from the forward pass: its inputs, geometry and workspace."""

    x: np.ndarray  # the input, in data_format
    w: np.ndarray  # the weights, HWIO
    stride: tuple  # (sh, sw)
    pads: tuple  # ((top, bottom), (left, right))
    data_format: str
    cols: np.ndarray | None = None  # im2col's receptive fields (N*OH*OW, R*S*C), when the forward pass made them


def conv2d_cache(x, w, stride=1, padding="SAME", data_format="NHWC", cols=None):
    """The :class:`ConvCache` of ``conv2d_forward(x, w, stride, padding, data_format)``, rebuilt from its inputs.

    A graph op's gradient has the forward's inputs (and its workspace ``cols``) but not its cache object.
    """
    _check_format(data_format)
    stride = hw_pair(stride, "stride")
    h, wd = x.shape[1:3] if data_format == "NHWC" else x.shape[2:4]
    return ConvCache(x, w, stride, conv_padding(padding, h, wd, w.shape[0], w.shape[1], stride), data_format, cols)


def _jit_fits(x, w, stride, data_format):
    """Whether the register-blocked kernels of :mod:`jit_conv` run this convolution (else im2col does)."""
    return (stride == (1, 1) and data_format == "NHWC" and x.dtype == np.float32 and w.dtype == np.float32
            and jit_conv.simd_lanes() is not None)


def conv2d_forward(x, w, stride=1, padding="SAME", data_format="NHWC", algorithm="im2col", bias=None, relu=False):
    """2-D convolution (cross-correlation, as in every DL framework), optionally followed by bias and ReLU.

    Parameters
    ----------
    x : (N, H, W, C) for NHWC or (N, C, H, W) for NCHW
    w : (R, S, C, K), HWIO
    stride : int or (sh, sw)
    padding : "SAME", "VALID", int, or ((top, bottom), (left, right))
    algorithm : "im2col" (receptive fields as rows, then one GEMM), "direct" (loops), or "jit" (the
        register-blocked SIMD kernels of :mod:`workshop_lib.jit_conv` where they apply: stride 1, NHWC,
        float32, an AVX-512F or AVX2 + FMA CPU; im2col otherwise)
    bias : (K,) or None, added to every output pixel (in the jit kernel's epilogue, else in place afterwards)
    relu : bool, max(0, .) after the bias (likewise)

    Returns
    -------
    out : (N, OH, OW, K) or (N, K, OH, OW)
    cache : ConvCache, for :func:`conv2d_backward` (``cache.cols`` is im2col's workspace, None for "direct"
        and for the jit kernels)
    Raises
    ------
    ValueError
        On a shape, stride or padding that does not fit, or an empty output (every algorithm alike).
    TypeError
        If ``x`` or ``w`` is not float32/float64.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    _check_format(data_format)
    check.option(algorithm, "algorithm", ("im2col", "direct", "jit"))
    x = _check_image(x, "x", data_format, check.FLOATS)
    w = check.array(w, "w", 4, check.FLOATS, "(R, S, C, K), HWIO")
    if min(w.shape) < 1:
        raise ValueError(f"w.shape={w.shape} (R, S, C, K) must have every dimension at least 1")
    stride = hw_pair(stride, "stride")
    x_nhwc = x if data_format == "NHWC" else x.transpose(0, 2, 3, 1)
    n_size, h, wd, c = x_nhwc.shape
    r, s, c_w, k = w.shape
    check.equal("w.shape[2]", c_w, f"x.shape[{3 if data_format == 'NHWC' else 1}]", c, "the input channels")
    (pt, pb), (pl, pr) = conv_padding(padding, h, wd, r, s, stride)
    out_h, out_w = output_hw(h, wd, r, s, stride, ((pt, pb), (pl, pr)))
    check_output(out_h, out_w, f"the {r}x{s} kernel w", padding, stride, h, wd)
    if bias is not None:
        bias = check.array(bias, "bias", 1, check.REALS, f"({k},)")
        check.shape(bias, "bias", (k,), "one value per output channel")
    cache = ConvCache(x, w, stride, ((pt, pb), (pl, pr)), data_format, None)
    if algorithm == "jit" and _jit_fits(x, w, stride, data_format):
        out = jit_conv.conv2d_nhwc_f32(x, w, ((pt, pb), (pl, pr)), None if bias is None else bias.astype(np.float32),
                                       relu)
        return out, cache
    if algorithm in ("im2col", "jit"):
        cols, _ = im2col_nhwc(np.ascontiguousarray(x_nhwc), (r, s), stride, ((pt, pb), (pl, pr)))
        cache = cache._replace(cols=cols)
        out = runtime.matmul(cols, w.reshape(-1, k)).reshape(n_size, out_h, out_w, k)
        if data_format == "NCHW":
            out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    else:
        if data_format == "NHWC":
            out = np.empty((n_size, out_h, out_w, k), dtype=np.result_type(x, w))
            _conv2d_direct_nhwc(np.ascontiguousarray(x), np.ascontiguousarray(w), stride[0], stride[1], pt, pl, out)
        else:
            out = np.empty((n_size, k, out_h, out_w), dtype=np.result_type(x, w))
            _conv2d_direct_nchw(np.ascontiguousarray(x), np.ascontiguousarray(w), stride[0], stride[1], pt, pl, out)
    if bias is not None:
        out += bias if data_format == "NHWC" else bias.reshape(-1, 1, 1)  # in place: no extra tensor
    if relu:
        np.maximum(out, 0, out=out)
    return out, cache


def _direct_wgrad_fits(gemm, stride, x, dout):
    """Whether dw goes to :func:`jit_conv.conv2d_backward_filter_nhwc` (no columns) rather than im2col + GEMM."""
    if gemm != "blas" or stride != (1, 1) or x.dtype != np.float32 or dout.dtype != np.float32:
        return False
    from .jit_conv import simd_lanes

    return simd_lanes() is not None


def conv2d_backward(dout, cache, need_dx=True, gemm="blas", need_dw=True, algorithm="im2col"):
    """(dx, dw) of :func:`conv2d_forward`; every algorithm shares this GEMM-based backward pass, except dx below.

    The receptive fields (im2col's columns) are reused from the forward pass when it kept them;
    ``need_dx=False`` skips dx (the first layer's input needs no gradient) and returns None for it,
    ``need_dw=False`` likewise for dw;
    ``gemm="reference"`` does the two products with the reference GEMM instead of BLAS.
    ``algorithm="jit"`` (with ``gemm="blas"``) computes dx as a direct convolution of the padded ``dout``
    with the flipped, transposed filter, by :mod:`jit_conv`'s kernels, where the forward's geometry fits
    them (stride 1, NHWC, float32); otherwise, and with ``"im2col"`` or ``"direct"``, dx is a GEMM + col2im.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    check.option(gemm, "gemm", ("blas", "reference"))
    check.option(algorithm, "algorithm", ("im2col", "direct", "jit"))
    matmul = runtime.matmul if gemm == "blas" else gemm_reference
    x, w, stride, pads, data_format, cols = cache
    x_nhwc = x if data_format == "NHWC" else x.transpose(0, 2, 3, 1)
    n_size, h, wd, c = x_nhwc.shape
    r, s, _, k = w.shape
    out_h, out_w = output_hw(h, wd, r, s, stride, pads)
    dout = check.array(dout, "dout", 4, check.FLOATS)
    check.shape(dout, "dout", _to_layout((n_size, out_h, out_w, k), data_format),
                f"the shape of the forward output in {data_format}")
    dout_nhwc = dout if data_format == "NHWC" else dout.transpose(0, 2, 3, 1)
    d2 = np.ascontiguousarray(dout_nhwc).reshape(-1, k)
    dw = None
    if need_dw:
        if _direct_wgrad_fits(gemm, stride, x, dout):
            from .jit_conv import conv2d_backward_filter_nhwc

            dw = conv2d_backward_filter_nhwc(x_nhwc, d2.reshape(n_size, out_h, out_w, k), r, s, pads)
        else:
            if cols is None:
                cols, _ = im2col_nhwc(np.ascontiguousarray(x_nhwc), (r, s), stride, pads)
            dw = matmul(cols.T, d2).reshape(w.shape)
    if not need_dx:
        return None, dw
    if algorithm == "jit" and gemm == "blas" and dout.dtype == np.float32 and _jit_fits(x, w, stride, data_format):
        return jit_conv.conv2d_backward_data_nhwc_f32(dout, w, (h, wd), pads), dw
    # dx: the columns' gradient (one GEMM), folded back onto the pixels (col2im), a few images at a time so
    # that each block of columns is still in cache when col2im reads it
    wt = np.ascontiguousarray(w.reshape(-1, k).T)
    dx = np.zeros((n_size, h, wd, c), dtype=np.result_type(d2, wt))
    rows = out_h * out_w
    group = max(1, min(n_size, (2 << 20) // max(1, rows * wt.shape[1] * dx.itemsize)))
    for i in range(0, n_size, group):
        dcols = matmul(d2[i * rows : (i + group) * rows], wt)
        col2im_nhwc(dcols, r, s, stride[0], stride[1], pads[0][0], pads[1][0], out_h, out_w, dx[i : i + group])
    if data_format == "NCHW":
        dx = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Pooling (NHWC kernels; NCHW through a transposed view)


@numba.njit(parallel=True, cache=True)
def _maxpool_nhwc(x, kh, kw, sh, sw, pt, pl, out, argmax):  # OUT out (N,OH,OW,C), argmax: flat index into x
    n_size, h_size, w_size, c_size = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for row in numba.prange(n_size * out_h):
        n, oh = row // out_h, row % out_h
        for ow in range(out_w):
            first = True
            for r in range(kh):
                ih = oh * sh + r - pt
                if ih < 0 or ih >= h_size:
                    continue
                for s in range(kw):
                    iw = ow * sw + s - pl
                    if iw < 0 or iw >= w_size:
                        continue
                    where = ((n * h_size + ih) * w_size + iw) * c_size
                    for c in range(c_size):  # innermost over channels: contiguous, vectorises
                        v = x[n, ih, iw, c]
                        if first or v > out[n, oh, ow, c]:
                            out[n, oh, ow, c] = v
                            argmax[n, oh, ow, c] = where + c
                    first = False


@numba.njit(parallel=True, cache=True)
def _maxpool_2x2_nhwc(x, out, argmax):  # OUT out (N,OH,OW,C), argmax: the 2x2 stride-2 VALID window, unrolled
    n_size, h_size, w_size, c_size = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for row in numba.prange(n_size * out_h):
        n, oh = row // out_h, row % out_h
        ih = 2 * oh
        for ow in range(out_w):
            iw = 2 * ow
            top = ((n * h_size + ih) * w_size + iw) * c_size
            below = top + w_size * c_size
            for c in range(c_size):  # the same order and strict > as _maxpool_nhwc: the first maximum wins
                best, where = x[n, ih, iw, c], top + c
                v = x[n, ih, iw + 1, c]
                if v > best:
                    best, where = v, top + c_size + c
                v = x[n, ih + 1, iw, c]
                if v > best:
                    best, where = v, below + c
                v = x[n, ih + 1, iw + 1, c]
                if v > best:
                    best, where = v, below + c_size + c
                out[n, oh, ow, c] = best
                argmax[n, oh, ow, c] = where


@numba.njit(parallel=True, cache=True)
def _maxpool_backward_nhwc(dout, argmax, dx_flat):  # OUT dx_flat (N*H*W*C,), zeroed: a scatter, no division
    n_size, out_h, out_w, c_size = dout.shape
    for n in numba.prange(n_size):
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(c_size):
                    dx_flat[argmax[n, oh, ow, c]] += dout[n, oh, ow, c]


@numba.njit(parallel=True, cache=True)
def _avgpool_nhwc(x, kh, kw, sh, sw, pt, pl, out, counts):  # padded cells are not counted, as in TF
    n_size, h_size, w_size, c_size = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for row in numba.prange(n_size * out_h):
        n, oh = row // out_h, row % out_h
        for ow in range(out_w):
            count = 0
            acc = np.zeros(c_size, dtype=out.dtype)
            for r in range(kh):
                ih = oh * sh + r - pt
                if 0 <= ih < h_size:
                    for s in range(kw):
                        iw = ow * sw + s - pl
                        if 0 <= iw < w_size:
                            count += 1
                            for c in range(c_size):
                                acc[c] += x[n, ih, iw, c]
            out[n, oh, ow, :] = acc / count
            counts[oh, ow] = count


@numba.njit(parallel=True, cache=True)
def _avgpool_backward_nhwc(dout, kh, kw, sh, sw, pt, pl, counts, dx):
    n_size, out_h, out_w, c_size = dout.shape
    h_size, w_size = dx.shape[1], dx.shape[2]
    for n in numba.prange(n_size):
        for oh in range(out_h):
            for ow in range(out_w):
                for r in range(kh):
                    ih = oh * sh + r - pt
                    if 0 <= ih < h_size:
                        for s in range(kw):
                            iw = ow * sw + s - pl
                            if 0 <= iw < w_size:
                                for c in range(c_size):
                                    dx[n, ih, iw, c] += dout[n, oh, ow, c] / counts[oh, ow]


def _pool_setup(x, ksize, stride, padding, data_format, dtypes):
    _check_format(data_format)
    x = _check_image(x, "x", data_format, dtypes)
    ksize, stride = hw_pair(ksize, "ksize"), hw_pair(stride, "stride")
    x_nhwc = np.ascontiguousarray(x if data_format == "NHWC" else x.transpose(0, 2, 3, 1))
    n_size, h, w, c = x_nhwc.shape
    (pt, pb), (pl, pr) = conv_padding(padding, h, w, ksize[0], ksize[1], stride)
    if max(pt, pb) >= ksize[0] or max(pl, pr) >= ksize[1]:
        raise ValueError(f"padding={padding!r} must be smaller than ksize={ksize} on every side: a window lying "
                         "entirely in the padding has nothing to pool")
    out_h, out_w = output_hw(h, w, ksize[0], ksize[1], stride, ((pt, pb), (pl, pr)))
    check_output(out_h, out_w, f"ksize={ksize}", padding, stride, h, w)
    return x, x_nhwc, ksize, stride, (pt, pl), (n_size, out_h, out_w, c)


def _to_layout(shape_nhwc, data_format):
    n_size, h, w, c = shape_nhwc
    return shape_nhwc if data_format == "NHWC" else (n_size, c, h, w)


def _to_format(y, data_format):
    return y if data_format == "NHWC" else np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def _from_format(y, data_format):
    return np.ascontiguousarray(y if data_format == "NHWC" else y.transpose(0, 2, 3, 1))


def _check_pool_grad(dout, out_shape_nhwc, data_format, dtypes):
    dout = check.array(dout, "dout", 4, dtypes)
    check.shape(dout, "dout", _to_layout(out_shape_nhwc, data_format),
                f"the shape of the forward output in {data_format}")
    return dout


def maxpool_forward(x, ksize=2, stride=2, padding="VALID", data_format="NHWC"):
    """Max pooling of ``x`` (integers or floats) over ``ksize`` windows; returns (out, cache).

    ``ksize`` and ``stride`` are ints or (h, w) pairs (or TF's [1, h, w, 1]), each >= 1; explicit padding
    must be smaller than the window. Raises ``ValueError`` if the output would be empty.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    x, x_nhwc, ksize, stride, (pt, pl), shape = _pool_setup(x, ksize, stride, padding, data_format, check.REALS)
    out = np.empty(shape, dtype=x.dtype)
    # the winners' flat indices into x: int32 where they fit, half the memory traffic of int64 to write and read
    argmax = np.empty(shape, dtype=np.int32 if x_nhwc.size < 2**31 else np.int64)
    if ksize == (2, 2) and stride == (2, 2) and (pt, pl) == (0, 0):  # the CNN's pooling
        _maxpool_2x2_nhwc(x_nhwc, out, argmax)
    else:
        _maxpool_nhwc(x_nhwc, ksize[0], ksize[1], stride[0], stride[1], pt, pl, out, argmax)
    disjoint = stride[0] >= ksize[0] and stride[1] >= ksize[1]  # no input cell lies in two windows
    return _to_format(out, data_format), (x_nhwc.shape, argmax, data_format, disjoint)


def maxpool_backward(dout, cache):
    """dx of :func:`maxpool_forward`: each output's gradient goes to the input that was the maximum."""
    shape, argmax, data_format, _ = cache
    dout = _check_pool_grad(dout, argmax.shape, data_format, check.REALS)
    dx = np.zeros(shape, dtype=dout.dtype)
    _maxpool_backward_nhwc(_from_format(dout, data_format), argmax, dx.reshape(-1))
    return _to_format(dx, data_format)


@numba.njit(parallel=True, cache=True)
def _maxpool_relu_backward_nhwc(dout, argmax, pooled, one, zero, windows_overlap, dx, db_rows):
    # IN dout, argmax, pooled (N,OH,OW,C); OUT dx (N,H,W,C), every cell written; db_rows (N,C): each image's
    # bias gradient. pooled is the maximum of the ReLU's outputs in each window, i.e. the winner's own value,
    # so pooled > 0 exactly where ReluGrad lets the winner's gradient through. The mask is a select, not a
    # branch: half the windows pass, at random, and a mispredicted branch costs more than the product.
    n_size, out_h, out_w, c_size = dout.shape
    plane = dx.shape[1] * dx.shape[2] * c_size
    dx_flat = dx.reshape(-1)
    for n in numba.prange(n_size):
        dx_flat[n * plane : (n + 1) * plane] = 0  # one image at a time: zeroed, then scattered into, in cache
        acc = np.zeros(c_size, dtype=np.float64)
        for oh in range(out_h):
            for ow in range(out_w):
                for c in range(c_size):
                    g = dout[n, oh, ow, c] * (one if pooled[n, oh, ow, c] > 0 else zero)
                    if windows_overlap:  # a cell may win several windows: add (as _maxpool_backward_nhwc)
                        dx_flat[argmax[n, oh, ow, c]] += g
                    else:  # each cell wins at most once: a store keeps -0.0 as the unfused product does
                        dx_flat[argmax[n, oh, ow, c]] = g
                    acc[c] += g
        db_rows[n, :] = acc


def maxpool_relu_backward(dout, cache, pooled, need_db=True):
    """(dx, db) of ``maxpool(relu(z + b))`` with respect to z, in one pass: MaxPoolGrad, ReluGrad, BiasAddGrad.

    The pooled gradient is scattered to each window's winner and masked by the ReLU in the same pass, and
    the bias gradient (the sum of dx over every axis but the channels') is summed from the same values, in
    float64, while they are in registers. ``cache`` is :func:`maxpool_forward`'s cache of the pooling of the
    ReLU's output, ``pooled`` its output; dx equals ``relu_backward(maxpool_backward(dout, cache), y)`` bit
    for bit for windows that do not overlap (with overlapping windows, a masked cell may hold +0.0 where the unfused
    product holds -0.0). ``db`` is None unless ``need_db``.
    """
    shape, argmax, data_format, disjoint = cache
    dout = _check_pool_grad(dout, argmax.shape, data_format, check.REALS)
    pooled = check.array(pooled, "pooled", 4, check.REALS)
    check.shape(pooled, "pooled", dout.shape, "the shape of dout (the pooling's output)")
    dx = np.empty(shape, dtype=dout.dtype)
    db_rows = np.empty((shape[0], shape[3]), dtype=np.float64)
    one, zero = dx.dtype.type(1), dx.dtype.type(0)
    _maxpool_relu_backward_nhwc(_from_format(dout, data_format), argmax, _from_format(pooled, data_format), one, zero,
                                not disjoint, dx, db_rows)
    db = db_rows.sum(axis=0).astype(dout.dtype) if need_db else None
    return _to_format(dx, data_format), db


def avgpool_forward(x, ksize=2, stride=2, padding="VALID", data_format="NHWC"):
    """Average pooling of float ``x``; padded cells are not counted (TF's rule).

    Arguments as :func:`maxpool_forward`.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    x, x_nhwc, ksize, stride, (pt, pl), shape = _pool_setup(x, ksize, stride, padding, data_format, check.FLOATS)
    out = np.empty(shape, dtype=x.dtype)
    counts = np.empty(shape[1:3], dtype=np.int64)
    _avgpool_nhwc(x_nhwc, ksize[0], ksize[1], stride[0], stride[1], pt, pl, out, counts)
    return _to_format(out, data_format), (x_nhwc.shape, ksize, stride, (pt, pl), counts, data_format)


def avgpool_backward(dout, cache):
    """dx of :func:`avgpool_forward`: each output's gradient spread evenly over the cells it averaged."""
    shape, ksize, stride, (pt, pl), counts, data_format = cache
    dout = _check_pool_grad(dout, (shape[0], *counts.shape, shape[3]), data_format, check.FLOATS)
    dx = np.zeros(shape, dtype=dout.dtype)
    _avgpool_backward_nhwc(_from_format(dout, data_format), ksize[0], ksize[1], stride[0], stride[1], pt, pl,
                           counts, dx)
    return _to_format(dx, data_format)


# ----------------------------------------------------------------------------------------------
# Element-wise: activations and bias


def _check_elementwise_grad(dout, like):
    """An element-wise backward pass takes dout of the forward output's shape (never a broadcast)."""
    dout = check.array(dout, "dout", dtypes=check.REALS)
    check.shape(dout, "dout", np.shape(like), "the shape of the forward input")
    return dout


def relu_forward(x):
    """max(x, 0); the cache is the output, which is all the gradient needs (so a graph can fuse the op)."""
    y = np.maximum(check.array(x, "x", dtypes=check.REALS), 0)
    return y, y


@numba.njit(parallel=True, cache=True)
def _relu_backward_flat(dout, y, one, zero, dx):  # IN dout, y; OUT dx (flat, same length)
    for i in numba.prange(dx.shape[0]):
        dx[i] = dout[i] * (one if y[i] > 0 else zero)  # the product, as numpy's dout * (y > 0): -0.0 and NaN alike


@numba.njit(parallel=True, cache=True)
def _relu_bias_backward_rows(dout, y, rows_per_chunk, one, zero, dx, db_chunks):
    # IN dout, y (rows, C); OUT dx (rows, C), db_chunks (chunks, C): each chunk of rows' bias gradient, in float64
    rows, c_size = dout.shape
    for chunk in numba.prange(db_chunks.shape[0]):
        db_chunks[chunk, :] = 0
        for r in range(chunk * rows_per_chunk, min(rows, (chunk + 1) * rows_per_chunk)):
            for c in range(c_size):
                g = dout[r, c] * (one if y[r, c] > 0 else zero)
                dx[r, c] = g
                db_chunks[chunk, c] += g


def _same_float_arrays(dout, y):
    dout = _check_elementwise_grad(dout, y)
    y = np.asarray(y)
    if dout.dtype != y.dtype or dout.dtype not in check.FLOATS:
        return None
    return np.ascontiguousarray(dout), np.ascontiguousarray(y)


def relu_backward(dout, cache):
    """dx of :func:`relu_forward`: ``dout * (y > 0)`` (y > 0 exactly where x > 0), one parallel pass for floats."""
    arrays = _same_float_arrays(dout, cache)
    if arrays is None:
        return dout * (cache > 0)
    dx = np.empty(arrays[0].shape, dtype=arrays[0].dtype)
    one, zero = dx.dtype.type(1), dx.dtype.type(0)
    _relu_backward_flat(arrays[0].reshape(-1), arrays[1].reshape(-1), one, zero, dx.reshape(-1))
    return dx


def relu_bias_backward(dout, cache):
    """(dx, db) of ``relu(x + b)`` with channels last, in one pass: ReluGrad and BiasAddGrad together.

    ``cache`` is the ReLU's output y (:func:`relu_forward`'s cache); dx equals ``relu_backward(dout, y)``
    bit for bit and db is its sum over every axis but the last, accumulated in float64 (in chunks of rows
    that depend on the shape only, so the result does not depend on the number of threads).
    """
    arrays = _same_float_arrays(dout, cache)
    if arrays is None or arrays[0].ndim < 2:
        raise TypeError(f"dout and y must be float32 or float64 arrays of one dtype with a batch and channels; "
                        f"got {np.asarray(dout).dtype} and {np.asarray(cache).dtype}, shape {np.shape(dout)}")
    g, y = (a.reshape(-1, a.shape[-1]) for a in arrays)
    rows_per_chunk = max(16, -(-g.shape[0] // 64))  # at most 64 chunks, of 16 rows or more
    chunks = -(-g.shape[0] // rows_per_chunk)
    dx, db_chunks = np.empty(arrays[0].shape, dtype=g.dtype), np.empty((chunks, g.shape[1]), dtype=np.float64)
    _relu_bias_backward_rows(g, y, rows_per_chunk, g.dtype.type(1), g.dtype.type(0), dx.reshape(g.shape), db_chunks)
    return dx, db_chunks.sum(axis=0).astype(g.dtype)


def tanh_forward(x):
    y = np.tanh(check.array(x, "x", dtypes=check.REALS))
    return y, y


def tanh_backward(dout, cache):
    return _check_elementwise_grad(dout, cache) * (1 - cache * cache)


def elu_forward(x, alpha=1.0):
    """x for x > 0, alpha * (exp(x) - 1) else; the cache holds the output, which the gradient needs (alpha > 0)."""
    x = check.array(x, "x", dtypes=check.REALS)
    alpha = check.real(alpha, "alpha")
    y = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    return y, (y, alpha)


def elu_backward(dout, cache):
    y, alpha = cache
    return _check_elementwise_grad(dout, y) * np.where(y > 0, 1, y + alpha)  # for x <= 0, alpha * exp(x) is y + alpha


def _channel_axis(ndim, data_format):
    return 1 if (data_format == "NCHW" and ndim == 4) else ndim - 1


def channel_axis(ndim, data_format):
    """The channel axis of ``ndim``-dimensional data in ``data_format`` (axis 1 of 4-D NCHW, else the last).

    Parameters
    ----------
    ndim : int
        The data's number of dimensions.
    data_format : {"NHWC", "NCHW"}

    Returns
    -------
    int
    """
    return _channel_axis(ndim, data_format)


def bias_add_forward(x, b, data_format="NHWC"):
    """x + b along the channel axis (the last one, or axis 1 of 4-D NCHW data); b is (C,)."""
    _check_format(data_format)
    x = check.array(x, "x", dtypes=check.REALS)
    b = check.array(b, "b", 1, check.REALS, "(C,)")
    if x.ndim < 2:
        raise ValueError(f"x.shape={x.shape} must have at least 2 dimensions (a batch and channels)")
    axis = _channel_axis(x.ndim, data_format)
    check.shape(b, "b", (x.shape[axis],), f"the channels of x (x.shape[{axis}])")
    shape = [1] * x.ndim
    shape[axis] = -1
    return x + b.reshape(shape), (axis, x.ndim)


def bias_add_backward(dout, cache):
    """(dx, db) of :func:`bias_add_forward`: dx is dout, db its sum over every axis but the channels'."""
    axis, ndim = cache
    dout = check.array(dout, "dout", ndim, check.REALS)
    if axis == ndim - 1 and dout.flags.c_contiguous and dout.dtype in (np.float32, np.float64):
        rows = dout.reshape(-1, dout.shape[-1])  # channels last: a ones-vector GEMV, which BLAS runs at full speed
        return dout, np.ones(rows.shape[0], dtype=dout.dtype) @ rows
    return dout, dout.sum(axis=tuple(i for i in range(ndim) if i != axis))


# ----------------------------------------------------------------------------------------------
# Batch normalisation


def batchnorm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.99, eps=1e-3,
                      data_format="NHWC"):
    """Batch norm over every axis but the channels'. In training, batch statistics are used and the
    running ones updated in place (``running = momentum * running + (1 - momentum) * batch``, Keras' convention);
    in inference, the running statistics are used. ``gamma``, ``beta`` and the running statistics are (C,);
    in training the running ones must be float arrays (they are updated in place)."""
    _check_format(data_format)
    x = check.array(x, "x", dtypes=check.FLOATS)
    if x.ndim < 2:
        raise ValueError(f"x.shape={x.shape} must have at least 2 dimensions (a batch and channels)")
    axis = _channel_axis(x.ndim, data_format)
    channels = (x.shape[axis],)
    for name, value in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)):
        check.shape(check.array(value, name, dtypes=check.REALS), name, channels,
                    f"the channels of x (x.shape[{axis}])")
    momentum = check.real(momentum, "momentum", 0, 1)
    eps = check.real(eps, "eps", 0, low_open=True)
    if training:
        for name, value in (("running_mean", running_mean), ("running_var", running_var)):
            check.in_place(value, name)
            check.array(value, name, dtypes=check.FLOATS)
        if x.size == 0:
            raise ValueError(f"x.shape={x.shape}: batch norm in training needs at least one value per channel")
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        count = x.size // x.shape[axis]
        running_mean *= momentum
        running_mean += (1 - momentum) * mean
        running_var *= momentum
        running_var += (1 - momentum) * var * count / max(count - 1, 1)
    else:
        mean, var = running_mean, running_var
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    out = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return out.astype(x.dtype, copy=False), (x_hat, gamma, inv_std, axes, shape, training)


def batchnorm_backward(dout, cache):
    """(dx, dgamma, dbeta) of :func:`batchnorm_forward`; ``dout`` has x's shape."""
    x_hat, gamma, inv_std, axes, shape, training = cache
    dout = check.array(dout, "dout", dtypes=check.FLOATS)
    check.shape(dout, "dout", x_hat.shape, "the shape of the forward input")
    dgamma = (dout * x_hat).sum(axis=axes)
    dbeta = dout.sum(axis=axes)
    dx_hat = dout * gamma.reshape(shape)
    if not training:
        return dx_hat * inv_std.reshape(shape), dgamma, dbeta
    m = dout.size // dgamma.size
    dx = (inv_std.reshape(shape) / m) * (
        m * dx_hat - dx_hat.sum(axis=axes, keepdims=True) - x_hat * (dx_hat * x_hat).sum(axis=axes, keepdims=True)
    )
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------
# Softmax, cross-entropy, dropout


def softmax(logits, axis=-1):
    """Numerically stable: subtract the row maximum before exponentiating."""
    logits = check.array(logits, "logits", dtypes=check.REALS)
    axis = check.integer(axis, "axis", -logits.ndim, logits.ndim - 1) if logits.ndim else axis
    if logits.ndim == 0 or logits.shape[axis] == 0:
        raise ValueError(f"logits.shape={logits.shape} must have at least one class along axis={axis}")
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(logits, axis=-1):
    """log(softmax(logits)), computed stably: the row maximum is subtracted, and no probability is rounded to 0."""
    z = logits - logits.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax_xent_forward(logits, labels, reduction="mean"):
    """Sparse cross-entropy of (N, classes) logits against integer labels (N,); N must be at least 1.

    ``reduction="mean"`` returns the mean over the batch (a scalar), ``"none"`` the per-example losses (N,),
    as ``tf.nn.sparse_softmax_cross_entropy_with_logits`` does. The cache serves :func:`softmax_xent_backward`.
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    check.option(reduction, "reduction", ("mean", "none"))
    logits = check.array(logits, "logits", 2, check.FLOATS, "(N, classes)")
    labels = check.array(labels, "labels", 1, check.INTEGERS, "(N,)")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits.shape={logits.shape} must have at least one example and one class "
                         "(the loss of an empty batch is undefined)")
    check.shape(labels, "labels", logits.shape[:1], "one label per row of logits")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got [{labels.min()}, {labels.max()}]")
    log_probs = log_softmax(logits, axis=1)
    losses = -log_probs[np.arange(logits.shape[0]), labels]
    loss = losses.mean() if reduction == "mean" else losses
    return loss.astype(logits.dtype), (np.exp(log_probs), labels, reduction)


def softmax_xent_backward(dloss, cache):
    """dlogits: ``dloss`` is a scalar for ``reduction="mean"``, one value per example (N,) for ``"none"``."""
    probs, labels, reduction = cache
    n = probs.shape[0]
    dloss = check.array(dloss, "dloss", dtypes=check.REALS)
    check.shape(dloss, "dloss", () if reduction == "mean" else (n,), f"the shape of the {reduction!r} loss")
    dlogits = probs.copy()
    dlogits[np.arange(n), labels] -= 1
    return dlogits * (dloss / n) if reduction == "mean" else dlogits * dloss[:, None]


def truncated_standard_normal(rng, shape):
    """Standard normal values, those beyond two standard deviations redrawn (TensorFlow's truncated normal)."""
    x = rng.standard_normal(shape)
    while np.any(bad := np.abs(x) > 2):
        x[bad] = rng.standard_normal(int(bad.sum()))
    return x


@numba.njit(parallel=True, cache=True)
def _dropout_flat(x, uniform, threshold, scale, zero, out, mask):  # IN x, uniform; OUT out, mask (flat)
    for i in numba.prange(x.shape[0]):
        kept = scale if uniform[i] < threshold else zero
        mask[i] = kept
        out[i] = x[i] * kept


def dropout_forward(x, keep_prob, training=True, rng=None):
    """Inverted dropout: keep each element with probability ``keep_prob`` and scale it by 1/keep_prob."""
    keep_prob = check.real(keep_prob, "keep_prob", 0, 1, low_open=True)
    x = check.array(x, "x", dtypes=check.FLOATS)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng is a {type(rng).__name__}; it must be a numpy.random.Generator (np.random.default_rng)")
    if not training or keep_prob == 1:
        return x, None
    rng = rng if rng is not None else np.random.default_rng()
    uniform = rng.random(x.shape, dtype=np.float32)  # the generator's stream, drawn as always: same masks
    x = np.ascontiguousarray(x)
    out, mask = np.empty_like(x), np.empty_like(x)
    # the threshold in float32, as numpy compares float32 values with a Python float (u < keep_prob)
    scale = x.dtype.type(1) / x.dtype.type(keep_prob)
    _dropout_flat(x.reshape(-1), uniform.reshape(-1), np.float32(keep_prob), scale, x.dtype.type(0),
                  out.reshape(-1), mask.reshape(-1))
    return out, mask


def dropout_backward(dout, cache):
    if cache is None:
        return dout
    return _check_elementwise_grad(dout, cache) * cache


# ----------------------------------------------------------------------------------------------
# Optimizer step


@numba.njit(parallel=True, cache=True)
def _adam_update(w, g, m, v, lr_t, beta1, beta2, eps, one_minus_beta1, one_minus_beta2):
    # IN g; IN/OUT w, m, v (flat, same length). Every scalar comes in w's dtype, so float32 variables are
    # updated in float32 arithmetic, as TensorFlow's ApplyAdam does: a constant such as (1 - beta1) written
    # here would be a float64, and would turn the whole update into float64 divisions and square roots.
    for i in numba.prange(w.shape[0]):
        mi = beta1 * m[i] + one_minus_beta1 * g[i]
        vi = beta2 * v[i] + one_minus_beta2 * g[i] * g[i]
        m[i], v[i] = mi, vi
        w[i] -= lr_t * mi / (np.sqrt(vi) + eps)


@numba.njit(cache=True)
def _adam_update_serial(w, g, m, v, lr_t, beta1, beta2, eps, one_minus_beta1, one_minus_beta2):
    for i in range(w.shape[0]):  # the same arithmetic on one thread
        mi = beta1 * m[i] + one_minus_beta1 * g[i]
        vi = beta2 * v[i] + one_minus_beta2 * g[i] * g[i]
        m[i], v[i] = mi, vi
        w[i] -= lr_t * mi / (np.sqrt(vi) + eps)


# Below this many elements a parallel loop costs more than it saves: waking numba's sleeping workers takes
# 10-40 us, an Adam step of 10,000 float32 values on one thread about 20 us (measured on the AMD EPYC).
_SERIAL_BELOW = 16384


def adam_step_size(lr, beta1_power, beta2_power):
    """Adam's bias-corrected step ``lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, as TensorFlow's ApplyAdam takes it."""
    return lr * np.sqrt(1 - beta2_power) / (1 - beta1_power)


def adam_update(w, g, m, v, lr_t, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step in place, in one pass over memory: m, v <- moments; w -= lr_t * m / (sqrt(v) + eps).

    The arithmetic is in w's dtype (float32 for the labs' variables), as TensorFlow's ApplyAdam computes.

    ``lr_t`` already includes the bias corrections (:func:`adam_step_size`), as TensorFlow's ApplyAdam takes it.
    ``w``, ``m`` and ``v`` are updated in place: writeable C-contiguous float32/float64 arrays of one shape and
    dtype; ``g`` has their shape.
    """
    check.in_place(w, "w")
    check.array(w, "w", dtypes=check.FLOATS)
    check.in_place(m, "m", w, "w")
    check.in_place(v, "v", w, "w")
    g = check.array(g, "g", dtypes=check.REALS)
    check.same_shape(g, "g", w, "w")
    lr_t = check.real(lr_t, "lr_t")
    beta1, beta2 = check.real(beta1, "beta1", 0, 1, high_open=True), check.real(beta2, "beta2", 0, 1, high_open=True)
    eps = check.real(eps, "eps", 0, low_open=True)
    kernel = _adam_update_serial if w.size < _SERIAL_BELOW else _adam_update
    real = w.dtype.type
    kernel(w.reshape(-1), np.ascontiguousarray(g, dtype=w.dtype).reshape(-1), m.reshape(-1), v.reshape(-1),
           real(lr_t), real(beta1), real(beta2), real(eps), real(1) - real(beta1), real(1) - real(beta2))


# ----------------------------------------------------------------------------------------------
# Layouts: NCHW, NHWC and blocked nChw16c


def nchw_to_nhwc(x):
    return np.ascontiguousarray(check.array(x, "x", 4, layout="(N, C, H, W)").transpose(0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.ascontiguousarray(check.array(x, "x", 4, layout="(N, H, W, C)").transpose(0, 3, 1, 2))


def to_blocked(x, data_format="NCHW", block=BLOCK):
    """Reorder to nChw16c: (N, ceil(C/16), H, W, 16), channels zero-padded to the block."""
    _check_format(data_format)
    x = check.array(x, "x", 4, layout=f"in data_format={data_format!r}")
    block = check.integer(block, "block", 1)
    x_nchw = x if data_format == "NCHW" else x.transpose(0, 3, 1, 2)
    n_size, c, h, w = x_nchw.shape
    cb = -(-c // block)
    out = np.zeros((n_size, cb * block, h, w), dtype=x.dtype)
    out[:, :c] = x_nchw
    return np.ascontiguousarray(out.reshape(n_size, cb, block, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(xb, channels, data_format="NCHW"):
    """Back from nChw16c to NCHW or NHWC, dropping the padded channels."""
    _check_format(data_format)
    xb = check.array(xb, "xb", 5, layout="(N, Cb, H, W, block): nChw16c from to_blocked")
    n_size, cb, h, w, block = xb.shape
    check.integer(channels, "channels", 1, cb * block)
    x_nchw = xb.transpose(0, 1, 4, 2, 3).reshape(n_size, cb * block, h, w)[:, :channels]
    return np.ascontiguousarray(x_nchw if data_format == "NCHW" else x_nchw.transpose(0, 2, 3, 1))


def weights_to_blocked(w, block=BLOCK):
    """HWIO (R, S, C, K) -> OIhw16i16o (ceil(K/16), ceil(C/16), R, S, 16 in, 16 out), zero-padded."""
    w = check.array(w, "w", 4, layout="(R, S, C, K), HWIO")
    block = check.integer(block, "block", 1)
    r, s, c, k = w.shape
    cb, kb = -(-c // block), -(-k // block)
    padded = np.zeros((r, s, cb * block, kb * block), dtype=w.dtype)
    padded[:, :, :c, :k] = w
    return np.ascontiguousarray(padded.reshape(r, s, cb, block, kb, block).transpose(4, 2, 0, 1, 3, 5))


@numba.njit(parallel=True, cache=True)
def _conv2d_blocked(xb, wb, bias, sh, sw, pt, pl, relu, out):
    """IN xb (N, Cb, H, W, 16), wb (Kb, Cb, R, S, 16, 16), bias (Kb*16,); OUT out (N, Kb, OH, OW, 16).

    The innermost loop runs over 16 output channels: one vector register.
    """
    n_size, cb_size, h_size, w_size, blk = xb.shape
    kb_size, _, r_size, s_size, _, _ = wb.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for job in numba.prange(n_size * kb_size * out_h):
        n = job // (kb_size * out_h)
        kb = (job // out_h) % kb_size
        oh = job % out_h
        acc = np.empty((out_w, blk), dtype=out.dtype)
        for ow in range(out_w):
            for o in range(blk):
                acc[ow, o] = bias[kb * blk + o]
        for cb in range(cb_size):
            for r in range(r_size):
                ih = oh * sh + r - pt
                if ih < 0 or ih >= h_size:
                    continue
                for s in range(s_size):
                    for ow in range(out_w):
                        iw = ow * sw + s - pl
                        if iw < 0 or iw >= w_size:
                            continue
                        for i in range(blk):
                            xv = xb[n, cb, ih, iw, i]
                            for o in range(blk):
                                acc[ow, o] += xv * wb[kb, cb, r, s, i, o]
        for ow in range(out_w):
            for o in range(blk):
                v = acc[ow, o]
                out[n, kb, oh, ow, o] = max(v, 0.0) if relu else v


def conv2d_blocked_forward(xb, wb, stride=1, padding="SAME", bias=None, relu=False, ksize=None):
    """Convolution in the blocked layout, with optional fused bias and ReLU; returns nChw16c.

    ``xb`` from :func:`to_blocked`, ``wb`` from :func:`weights_to_blocked`;
    ``bias`` has the padded K (or fewer: it is zero-extended); ``ksize``, if given, must be the (R, S) of ``wb``.
    """
    xb = check.array(xb, "xb", 5, check.FLOATS, "(N, Cb, H, W, block): nChw16c from to_blocked")
    wb = check.array(wb, "wb", 6, check.FLOATS, "(Kb, Cb, R, S, block, block) from weights_to_blocked")
    stride = hw_pair(stride, "stride")
    n_size, cb, h, w, blk = xb.shape
    kb, cb_w, r, s, blk_in, blk_out = wb.shape
    check.equal("wb.shape[1]", cb_w, "xb.shape[1]", cb, "the input channel blocks")
    check.equal("wb.shape[4:]", (blk_in, blk_out), "(xb.shape[4], xb.shape[4])", (blk, blk), "the block size")
    if min(h, w, r, s, blk) < 1:
        raise ValueError(f"xb.shape={xb.shape} and wb.shape={wb.shape} must have H, W, R, S and the block >= 1")
    if ksize is not None:
        check.equal("ksize", hw_pair(ksize, "ksize"), "wb.shape[2:4]", (r, s), "the kernel size the weights hold")
    (pt, pb), (pl, pr) = conv_padding(padding, h, w, r, s, stride)
    out_h, out_w = output_hw(h, w, r, s, stride, ((pt, pb), (pl, pr)))
    check_output(out_h, out_w, f"the {r}x{s} kernel wb", padding, stride, h, w)
    full_bias = np.zeros(kb * blk, dtype=xb.dtype)
    if bias is not None:
        bias = check.array(bias, "bias", 1, check.REALS, "(K,)")
        if len(bias) > kb * blk:
            raise ValueError(f"bias.shape={bias.shape} must have at most {kb * blk} values (the padded K of wb)")
        full_bias[: len(bias)] = bias
    out = np.empty((n_size, kb, out_h, out_w, blk), dtype=np.result_type(xb, wb))
    _conv2d_blocked(xb, wb, full_bias, stride[0], stride[1], pt, pl, bool(relu), out)
    return out
