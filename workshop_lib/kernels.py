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

import ctypes
import os
import sys

import numba
import numpy as np

from . import placement


__all__ = [
    "gemm_reference", "gemm_forward", "gemm_backward",
    "conv2d_forward", "conv2d_backward", "conv2d_output_size",
    "maxpool_forward", "maxpool_backward", "avgpool_forward", "avgpool_backward",
    "relu_forward", "relu_backward", "tanh_forward", "tanh_backward", "elu_forward", "elu_backward",
    "bias_add_forward", "bias_add_backward",
    "batchnorm_forward", "batchnorm_backward",
    "softmax", "softmax_xent_forward", "softmax_xent_backward",
    "dropout_forward", "dropout_backward",
    "nchw_to_nhwc", "nhwc_to_nchw", "to_blocked", "from_blocked", "weights_to_blocked",
    "conv2d_blocked_forward", "BLOCK", "im2col_nhwc", "adam_update", "keep_freed_memory",
]

BLOCK = 16  # channels per block in nChw16c: one 512-bit register of float32

_ALLOCATOR_TUNED = False


def keep_freed_memory():
    """Ask glibc's malloc to keep freed buffers of up to 32 MB for reuse instead of unmapping them.

    A training step allocates the same large temporaries every time (im2col's columns are 31 MB at batch
    50). By default glibc gives such buffers back to the OS and maps fresh pages for the next step, and
    every first touch of a page is a page fault plus zeroing by the kernel: about a tenth of a step here.
    TensorFlow avoids this with its own allocator (BFC); this is the one-call equivalent. It applies to
    the whole process, on Linux with glibc only; ``WORKSHOP_MALLOC=0`` turns it off. Returns whether it
    was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("WORKSHOP_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MB is the largest mmap threshold glibc accepts on 64-bit; freed memory is trimmed above 1 GB only
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED


def _pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(t) for t in v)
    if len(v) == 4:  # TF style [1, sh, sw, 1]
        v = (v[1], v[2])
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name}={v!r} must be a positive int or a pair of them")
    return v


def _check_format(data_format):
    if data_format not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format={data_format!r} must be 'NHWC' or 'NCHW'")


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


def gemm_reference(a, b):
    """C = A @ B with plain numba loops (the reference kernel; BLAS is the optimised one)."""
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    _gemm_reference(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    return c


def gemm_forward(a, b, trans_a=False, trans_b=False, algorithm="blas"):
    """C = op(A) @ op(B), op = transpose where asked. ``algorithm``: "blas" (numpy's BLAS) or "reference"."""
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    if opa.shape[1] != opb.shape[0]:
        raise ValueError(f"op(a).shape={opa.shape} and op(b).shape={opb.shape} do not multiply")
    if algorithm == "blas":
        c = placement.matmul(opa, opb)
    elif algorithm == "reference":
        c = gemm_reference(opa, opb)
    else:
        raise ValueError(f"algorithm={algorithm!r} must be 'blas' or 'reference'")
    return c, (a, b, trans_a, trans_b)


def gemm_backward(dc, cache):
    """(da, db) for C = op(A) @ op(B)."""
    a, b, trans_a, trans_b = cache
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    d_opa, d_opb = placement.matmul(dc, opb.T), placement.matmul(opa.T, dc)
    return (d_opa.T if trans_a else d_opa), (d_opb.T if trans_b else d_opb)


# ----------------------------------------------------------------------------------------------
# Convolution

def _conv_padding(padding, h, w, r, s, stride):
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
    if isinstance(padding, (int, np.integer)):
        return (int(padding), int(padding)), (int(padding), int(padding))
    (pt, pb), (pl, pr) = padding
    return (int(pt), int(pb)), (int(pl), int(pr))


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
    """Receptive fields of an NHWC tensor as rows: returns (cols (N*OH*OW, R*S*C), (OH, OW))."""
    n_size, h, w, c = x.shape
    r, s = ksize
    (pt, pb), (pl, pr) = _conv_padding(padding, h, w, r, s, stride)
    out_h = (h + pt + pb - r) // stride[0] + 1
    out_w = (w + pl + pr - s) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"kernel {r}x{s} with padding {padding!r} does not fit the {h}x{w} input")
    cols = np.empty((n_size * out_h * out_w, r * s * c), dtype=x.dtype)
    _im2col_nhwc(x, r, s, stride[0], stride[1], pt, pl, out_h, out_w, x.dtype.type(pad_value), cols)
    return cols, (out_h, out_w)




def conv2d_output_size(h, w, r, s, stride, padding):
    (pt, pb), (pl, pr) = _conv_padding(padding, h, w, r, s, stride)
    return (h + pt + pb - r) // stride[0] + 1, (w + pl + pr - s) // stride[1] + 1


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
def _col2im_nhwc(dcols, r_size, s_size, sh, sw, pt, pl, out_h, out_w, dx):  # OUT dx (N,H,W,C), zeroed
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


def conv2d_forward(x, w, stride=1, padding="SAME", data_format="NHWC", algorithm="im2col"):
    """2-D convolution (cross-correlation, as in every DL framework).

    Parameters
    ----------
    x : (N, H, W, C) for NHWC or (N, C, H, W) for NCHW
    w : (R, S, C, K), HWIO
    stride : int or (sh, sw)
    padding : "SAME", "VALID", int, or ((top, bottom), (left, right))
    algorithm : "im2col" (receptive fields as rows, then one GEMM) or "direct" (loops)
    """
    _check_format(data_format)
    stride = _pair(stride, "stride")
    x_nhwc = x if data_format == "NHWC" else x.transpose(0, 2, 3, 1)
    n_size, h, wd, c = x_nhwc.shape
    r, s, c_w, k = w.shape
    if c_w != c:
        raise ValueError(f"w.shape[2]={c_w} (input channels) must equal the input's {c} channels")
    (pt, pb), (pl, pr) = _conv_padding(padding, h, wd, r, s, stride)
    out_h, out_w = conv2d_output_size(h, wd, r, s, stride, padding)
    cols = None
    if algorithm == "im2col":
        cols, _ = im2col_nhwc(np.ascontiguousarray(x_nhwc), (r, s), stride, ((pt, pb), (pl, pr)))
        out = placement.matmul(cols, w.reshape(-1, k)).reshape(n_size, out_h, out_w, k)
        if data_format == "NCHW":
            out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    elif algorithm == "direct":
        if data_format == "NHWC":
            out = np.empty((n_size, out_h, out_w, k), dtype=np.result_type(x, w))
            _conv2d_direct_nhwc(np.ascontiguousarray(x), np.ascontiguousarray(w), stride[0], stride[1], pt, pl, out)
        else:
            out = np.empty((n_size, k, out_h, out_w), dtype=np.result_type(x, w))
            _conv2d_direct_nchw(np.ascontiguousarray(x), np.ascontiguousarray(w), stride[0], stride[1], pt, pl, out)
    else:
        raise ValueError(f"algorithm={algorithm!r} must be 'im2col' or 'direct'")
    return out, (x, w, stride, ((pt, pb), (pl, pr)), data_format, cols)


def conv2d_backward(dout, cache, need_dx=True, gemm="blas", need_dw=True):
    """(dx, dw) of :func:`conv2d_forward`; both algorithms share this GEMM-based backward pass.

    The receptive fields (im2col's columns) are reused from the forward pass when it kept them;
    ``need_dx=False`` skips dx (the first layer's input needs no gradient) and returns None for it,
    ``need_dw=False`` likewise for dw;
    ``gemm="reference"`` does the two products with the reference GEMM instead of BLAS.
    """
    matmul = placement.matmul if gemm == "blas" else gemm_reference
    x, w, stride, pads, data_format = cache[:5]
    cols = cache[5] if len(cache) > 5 else None
    x_nhwc = x if data_format == "NHWC" else x.transpose(0, 2, 3, 1)
    dout_nhwc = dout if data_format == "NHWC" else dout.transpose(0, 2, 3, 1)
    n_size, h, wd, c = x_nhwc.shape
    r, s, _, k = w.shape
    out_h, out_w = dout_nhwc.shape[1:3]
    d2 = np.ascontiguousarray(dout_nhwc).reshape(-1, k)
    dw = None
    if need_dw:
        if cols is None:
            cols, _ = im2col_nhwc(np.ascontiguousarray(x_nhwc), (r, s), stride, pads)
        dw = matmul(cols.T, d2).reshape(w.shape)
    if not need_dx:
        return None, dw
    # dx: the columns' gradient (one GEMM), folded back onto the pixels (col2im), a few images at a time so
    # that each block of columns is still in cache when col2im reads it
    wt = np.ascontiguousarray(w.reshape(-1, k).T)
    dx = np.zeros((n_size, h, wd, c), dtype=np.result_type(d2, wt))
    rows = out_h * out_w
    group = max(1, min(n_size, (2 << 20) // max(1, rows * wt.shape[1] * dx.itemsize)))
    for i in range(0, n_size, group):
        dcols = matmul(d2[i * rows : (i + group) * rows], wt)
        _col2im_nhwc(dcols, r, s, stride[0], stride[1], pads[0][0], pads[1][0], out_h, out_w, dx[i : i + group])
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


def _pool_setup(x, ksize, stride, padding, data_format):
    _check_format(data_format)
    ksize, stride = _pair(ksize, "ksize"), _pair(stride, "stride")
    x_nhwc = np.ascontiguousarray(x if data_format == "NHWC" else x.transpose(0, 2, 3, 1))
    n_size, h, w, c = x_nhwc.shape
    (pt, pb), (pl, pr) = _conv_padding(padding, h, w, ksize[0], ksize[1], stride)
    out_h, out_w = conv2d_output_size(h, w, ksize[0], ksize[1], stride, padding)
    return x_nhwc, ksize, stride, (pt, pl), (n_size, out_h, out_w, c)


def _to_format(y, data_format):
    return y if data_format == "NHWC" else np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def _from_format(y, data_format):
    return np.ascontiguousarray(y if data_format == "NHWC" else y.transpose(0, 2, 3, 1))


def maxpool_forward(x, ksize=2, stride=2, padding="VALID", data_format="NHWC"):
    x_nhwc, ksize, stride, (pt, pl), shape = _pool_setup(x, ksize, stride, padding, data_format)
    out = np.empty(shape, dtype=x.dtype)
    argmax = np.empty(shape, dtype=np.int64)
    _maxpool_nhwc(x_nhwc, ksize[0], ksize[1], stride[0], stride[1], pt, pl, out, argmax)
    return _to_format(out, data_format), (x_nhwc.shape, argmax, data_format)


def maxpool_backward(dout, cache):
    shape, argmax, data_format = cache
    dx = np.zeros(shape, dtype=dout.dtype)
    _maxpool_backward_nhwc(_from_format(dout, data_format), argmax, dx.reshape(-1))
    return _to_format(dx, data_format)


def avgpool_forward(x, ksize=2, stride=2, padding="VALID", data_format="NHWC"):
    x_nhwc, ksize, stride, (pt, pl), shape = _pool_setup(x, ksize, stride, padding, data_format)
    out = np.empty(shape, dtype=x.dtype)
    counts = np.empty(shape[1:3], dtype=np.int64)
    _avgpool_nhwc(x_nhwc, ksize[0], ksize[1], stride[0], stride[1], pt, pl, out, counts)
    return _to_format(out, data_format), (x_nhwc.shape, ksize, stride, (pt, pl), counts, data_format)


def avgpool_backward(dout, cache):
    shape, ksize, stride, (pt, pl), counts, data_format = cache
    dx = np.zeros(shape, dtype=dout.dtype)
    _avgpool_backward_nhwc(_from_format(dout, data_format), ksize[0], ksize[1], stride[0], stride[1], pt, pl,
                           counts, dx)
    return _to_format(dx, data_format)


# ----------------------------------------------------------------------------------------------
# Element-wise: activations and bias


def relu_forward(x):
    return np.maximum(x, 0), x


def relu_backward(dout, cache):
    return dout * (cache > 0)


def tanh_forward(x):
    y = np.tanh(x)
    return y, y


def tanh_backward(dout, cache):
    return dout * (1 - cache * cache)


def elu_forward(x, alpha=1.0):
    y = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    return y, (x, y, alpha)


def elu_backward(dout, cache):
    x, y, alpha = cache
    return dout * np.where(x > 0, 1, y + alpha)


def _channel_axis(ndim, data_format):
    return 1 if (data_format == "NCHW" and ndim == 4) else ndim - 1


def bias_add_forward(x, b, data_format="NHWC"):
    axis = _channel_axis(x.ndim, data_format)
    if b.shape != (x.shape[axis],):
        raise ValueError(f"bias shape {b.shape} must be ({x.shape[axis]},), the channels of x")
    shape = [1] * x.ndim
    shape[axis] = -1
    return x + b.reshape(shape), (axis, x.ndim)


def bias_add_backward(dout, cache):
    axis, ndim = cache
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
    in inference, the running statistics are used."""
    axis = _channel_axis(x.ndim, data_format)
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
    """(dx, dgamma, dbeta)."""
    x_hat, gamma, inv_std, axes, shape, training = cache
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
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_xent_forward(logits, labels):
    """Mean sparse cross-entropy of (N, classes) logits against integer labels (N,)."""
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels.shape={labels.shape} must be ({logits.shape[0]},)")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got [{labels.min()}, {labels.max()}]")
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_probs[np.arange(n), labels].mean()
    return loss.astype(logits.dtype), (np.exp(log_probs), labels)


def softmax_xent_backward(dloss, cache):
    probs, labels = cache
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(n), labels] -= 1
    return dlogits * (dloss / n)


def dropout_forward(x, keep_prob, training=True, rng=None):
    """Inverted dropout: keep each element with probability ``keep_prob`` and scale it by 1/keep_prob."""
    if not 0 < keep_prob <= 1:
        raise ValueError(f"keep_prob={keep_prob} must be in (0, 1]")
    if not training or keep_prob == 1:
        return x, None
    rng = rng if rng is not None else np.random.default_rng()
    mask = (rng.random(x.shape, dtype=np.float32) < keep_prob).astype(x.dtype) / x.dtype.type(keep_prob)
    return x * mask, mask


def dropout_backward(dout, cache):
    return dout if cache is None else dout * cache


# ----------------------------------------------------------------------------------------------
# Optimizer step


@numba.njit(parallel=True, cache=True)
def _adam_update(w, g, m, v, lr_t, beta1, beta2, eps):  # IN g; IN/OUT w, m, v (flat, same length)
    for i in numba.prange(w.shape[0]):
        mi = beta1 * m[i] + (1 - beta1) * g[i]
        vi = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
        m[i], v[i] = mi, vi
        w[i] -= lr_t * mi / (np.sqrt(vi) + eps)


def adam_update(w, g, m, v, lr_t, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step in place, in one pass over memory: m, v <- moments; w -= lr_t * m / (sqrt(v) + eps).

    ``lr_t`` already includes the bias corrections, as TensorFlow's ApplyAdam takes it.
    """
    if not (w.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adam_update works in place on C-contiguous arrays")
    _adam_update(w.reshape(-1), np.ascontiguousarray(g, dtype=w.dtype).reshape(-1), m.reshape(-1), v.reshape(-1),
                 w.dtype.type(lr_t), w.dtype.type(beta1), w.dtype.type(beta2), w.dtype.type(eps))


# ----------------------------------------------------------------------------------------------
# Layouts: NCHW, NHWC and blocked nChw16c


def nchw_to_nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_blocked(x, data_format="NCHW", block=BLOCK):
    """Reorder to nChw16c: (N, ceil(C/16), H, W, 16), channels zero-padded to the block."""
    _check_format(data_format)
    x_nchw = x if data_format == "NCHW" else x.transpose(0, 3, 1, 2)
    n_size, c, h, w = x_nchw.shape
    cb = -(-c // block)
    out = np.zeros((n_size, cb * block, h, w), dtype=x.dtype)
    out[:, :c] = x_nchw
    return np.ascontiguousarray(out.reshape(n_size, cb, block, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(xb, channels, data_format="NCHW"):
    """Back from nChw16c to NCHW or NHWC, dropping the padded channels."""
    _check_format(data_format)
    n_size, cb, h, w, block = xb.shape
    x_nchw = xb.transpose(0, 1, 4, 2, 3).reshape(n_size, cb * block, h, w)[:, :channels]
    return np.ascontiguousarray(x_nchw if data_format == "NCHW" else x_nchw.transpose(0, 2, 3, 1))


def weights_to_blocked(w, block=BLOCK):
    """HWIO (R, S, C, K) -> OIhw16i16o (ceil(K/16), ceil(C/16), R, S, 16 in, 16 out), zero-padded."""
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
    ``bias`` has the padded K (or fewer: it is zero-extended).
    """
    stride = _pair(stride, "stride")
    n_size, cb, h, w, blk = xb.shape
    kb, cb_w, r, s, _, _ = wb.shape
    if cb_w != cb:
        raise ValueError(f"weights have {cb_w} input blocks, the input has {cb}")
    (pt, pb), (pl, pr) = _conv_padding(padding, h, w, r, s, stride)
    out_h, out_w = conv2d_output_size(h, w, r, s, stride, padding)
    full_bias = np.zeros(kb * blk, dtype=xb.dtype)
    if bias is not None:
        full_bias[: len(bias)] = bias
    out = np.empty((n_size, kb, out_h, out_w, blk), dtype=np.result_type(xb, wb))
    _conv2d_blocked(xb, wb, full_bias, stride[0], stride[1], pt, pl, bool(relu), out)
    return out
