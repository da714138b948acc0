"""Direct convolution with register-blocked SIMD micro-kernels (fp32), the way oneDNN's jit kernels work.

No im2col: each micro-kernel keeps a tile of outputs in vector registers and streams the input and the
weights past it (numba ``@intrinsic`` builds the LLVM vector code, as :mod:`workshop_lib.int8` does for
``vpdpbusd``). :mod:`workshop_lib.kernels` calls these where the shape and the CPU fit and keeps its
reference and im2col paths beside them.

Shape letters: N batch, H W input height width, C input channels, K output channels, R S filter height
width, OH OW output height width; NHWC activations, HWIO weights, stride 1.

The one idea: a tile of P output pixels x NV vectors of output channels stays in P*NV registers for the
whole R*S*C reduction; each step broadcasts P input values, loads NV weight vectors and issues P*NV FMAs,
so the arithmetic runs from registers and each FMA needs well under one load.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# ----------------------------------------------------------------------------------------------
# Forward and backward-data


@functools.lru_cache(maxsize=None)
def simd_lanes():
    """float32 lanes of this CPU's FMA vectors: 16 (AVX-512F), 8 (AVX2 + FMA), or None (no such kernel here).

    None too when numba compiles for another CPU than this one (``NUMBA_CPU_NAME``, as the ``stock``
    variant sets it): the kernels would then be emulated, not run on the vector unit.
    """
    from numba.core import config

    from .sysinfo import cpu_features

    if config.CPU_NAME not in (None, "host"):
        return None
    features = cpu_features()
    if features.get("avx512f"):
        return 16
    if features.get("avx2") and features.get("fma"):
        return 8
    return None


def _tile_shape(n_vectors, out_w, lanes):
    """(P pixels, NV vectors) per tile for K = n_vectors * lanes (rounded up) and rows of out_w pixels.

    The P*NV accumulators, NV weight vectors and one broadcast input fill the vector registers (32 with
    AVX-512, 16 with AVX2). NV pads K the least (ties: 2 vectors, measured fastest: P = 14 reaches the
    FMA unit's peak on the Zen 5 these labs were measured on, about 110 GFLOP/s per core). P splits the row into equal tiles of at most P_max, so
    the last tile, which overlaps the one before it, recomputes as few pixels as possible.
    """
    p_max = {16: {2: 14, 1: 14}, 8: {2: 6, 1: 10}}[lanes]
    nv = min(p_max, key=lambda v: (-(-n_vectors // v) * v, v != 2))
    tiles = -(-out_w // p_max[nv])
    return -(-out_w // tiles), nv


def _broadcast(builder, value, vec):
    undef = ir.Constant(vec, None)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


@functools.lru_cache(maxsize=None)
def _conv_tile_intrinsic(pixels: int, nv: int, lanes: int):
    """An intrinsic computing one output tile of ``pixels`` pixels along W x ``nv`` vectors of ``lanes`` channels.

    tile(x, wp, bias, out, a0, a_col, n_seg, seg_len, seg_stride, o0, o_col, panel, relu)

    Pixel p reads x's bytes from x + a0 + p*a_col: n_seg runs (one per filter row r) seg_stride bytes
    apart, each of seg_len float32 (the S*C values of that filter row, contiguous in NHWC), against
    weight panel ``panel`` of wp (panels, n_seg*seg_len, nv*lanes). The epilogue adds bias[panel*nv*lanes:],
    applies max(0, .) if relu != 0 and stores pixel p's nv vectors at out + o0 + p*o_col.
    """
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, lanes)
    row_bytes = nv * lanes * 4

    @intrinsic
    def tile(typingctx, x, wp, bias, out, a0, a_col, n_seg, seg_len, seg_stride, o0, o_col, panel, relu):
        sig = types.void(x, wp, bias, out, a0, a_col, n_seg, seg_len, seg_stride, o0, o_col, panel, relu)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:4], args[:4])]
            x_base, w_base, bias_base, out_base = (builder.ptrtoint(a.data, i64) for a in arrays)
            a0, a_col, n_seg, seg_len, seg_stride, o0, o_col, panel, relu = args[4:]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{lanes}f32")
            const = lambda v: ir.Constant(i64, v)  # noqa: E731
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * lanes)) for _ in range(nv)]
                    for _ in range(pixels)]
            pix = [builder.add(builder.add(x_base, a0), builder.mul(const(p), a_col)) for p in range(pixels)]
            w_panel = builder.add(w_base, builder.mul(panel, builder.mul(builder.mul(n_seg, seg_len),
                                                                         const(row_bytes))))
            with cgutils.for_range(builder, n_seg) as seg_loop:
                seg = seg_loop.index
                seg_off = builder.mul(seg, seg_stride)
                w_seg = builder.add(w_panel, builder.mul(builder.mul(seg, seg_len), const(row_bytes)))
                with cgutils.for_range(builder, seg_len) as loop:
                    j = loop.index
                    w_row = builder.add(w_seg, builder.mul(j, const(row_bytes)))
                    w_vecs = [builder.load(builder.inttoptr(builder.add(w_row, const(v * lanes * 4)),
                                                            vec.as_pointer()), align=4) for v in range(nv)]
                    a_off = builder.add(seg_off, builder.mul(j, const(4)))
                    for p in range(pixels):
                        a_val = builder.load(builder.inttoptr(builder.add(pix[p], a_off), f32.as_pointer()), align=4)
                        a_vec = _broadcast(builder, a_val, vec)
                        for v in range(nv):
                            builder.store(builder.call(fma, [a_vec, w_vecs[v], builder.load(accs[p][v])]),
                                          accs[p][v])
            zero = ir.Constant(vec, [0.0] * lanes)
            do_relu = builder.icmp_signed("!=", relu, ir.Constant(relu.type, 0))
            chan0 = builder.mul(panel, const(nv * lanes))
            out_tile = builder.add(out_base, o0)
            for v in range(nv):
                chan_bytes = builder.mul(builder.add(chan0, const(v * lanes)), const(4))
                bias_v = builder.load(builder.inttoptr(builder.add(bias_base, chan_bytes), vec.as_pointer()), align=4)
                for p in range(pixels):
                    value = builder.fadd(builder.load(accs[p][v]), bias_v)
                    # value < 0 (ordered) -> 0: a NaN passes through, as in np.maximum(value, 0)
                    positive = builder.select(builder.fcmp_ordered("<", value, zero), zero, value)
                    value = builder.select(do_relu, positive, value)
                    dst = builder.add(out_tile, builder.add(builder.mul(const(p), o_col), const(v * lanes * 4)))
                    builder.store(value, builder.inttoptr(dst, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@functools.lru_cache(maxsize=None)
def _conv_driver(pixels: int, nv: int, lanes: int):
    """The threaded loop over (image, output row) around one tile shape; rows hold at least ``pixels`` pixels."""
    tile = _conv_tile_intrinsic(pixels, nv, lanes)
    panel_bytes = nv * lanes * 4

    @numba.njit(parallel=True, cache=False)
    def run(xp, wp, bias, out, relu):
        # IN xp (N, OH + R - 1, OW + S - 1, C) padded, wp (panels, R*S*C, nv*lanes), bias (Kp,);
        # OUT out (N, OH, OW, Kp = panels*nv*lanes), every element written
        n_size, out_h, out_w = out.shape[0], out.shape[1], out.shape[2]
        r_size = xp.shape[1] - out_h + 1
        seg_len = wp.shape[1] // r_size
        x_img, x_row, x_col = xp.strides[0], xp.strides[1], xp.strides[2]
        o_img, o_row, o_col = out.strides[0], out.strides[1], out.strides[2]
        for job in numba.prange(n_size * out_h):
            n, oh = job // out_h, job % out_h
            for panel in range(wp.shape[0]):  # the panel's weights stay in cache across the row
                for ow0 in range(0, out_w, pixels):
                    ow = min(ow0, out_w - pixels)  # the last tile overlaps the one before it
                    tile(xp, wp, bias, out, np.int64(n * x_img + oh * x_row + ow * x_col), np.int64(x_col),
                         np.int64(r_size), np.int64(seg_len), np.int64(x_row),
                         np.int64(n * o_img + oh * o_row + ow * o_col + panel * panel_bytes), np.int64(o_col),
                         np.int64(panel), np.int64(relu))

    return run


def _pad_nhwc(x, top, bottom, left, right):
    """x (N, H, W, C) with zero rows/columns added (or, for a negative pad, removed) on each side: a new array."""
    n_size, h, w, c = x.shape
    out = np.zeros((n_size, h + top + bottom, w + left + right, c), dtype=x.dtype)
    src = x[:, max(0, -top) : h - max(0, -bottom), max(0, -left) : w - max(0, -right)]
    out[:, max(0, top) : max(0, top) + src.shape[1], max(0, left) : max(0, left) + src.shape[2]] = src
    return out


def _pack_filter(w2, out_w, lanes):
    """w2 (R*S*C, K) -> (panels, R*S*C, nv*lanes) with K zero-padded; returns (wp, nv, pixels, Kp)."""
    rsc, k = w2.shape
    pixels, nv = _tile_shape(-(-k // lanes), out_w, lanes)
    cols = nv * lanes
    kp = -(-k // cols) * cols
    padded = np.zeros((rsc, kp), dtype=np.float32)
    padded[:, :k] = w2
    return np.ascontiguousarray(padded.reshape(rsc, kp // cols, cols).transpose(1, 0, 2)), nv, pixels, kp


def _direct_conv(xp, w, bias, relu, lanes):
    """The driver call on an already padded xp (N, OH+R-1, OW+S-1, C) float32 and w (R, S, C, K): (N, OH, OW, K)."""
    r, s, c, k = w.shape
    n_size, hp, wp_, _ = xp.shape
    out_h, out_w = hp - r + 1, wp_ - s + 1
    packed, nv, pixels, kp = _pack_filter(w.reshape(r * s * c, k), out_w, lanes)
    full_bias = np.zeros(kp, dtype=np.float32)
    if bias is not None:
        full_bias[:k] = bias
    out = np.empty((n_size, out_h, out_w, kp), dtype=np.float32)
    _conv_driver(pixels, nv, lanes)(xp, packed, full_bias, out, 1 if relu else 0)
    return out if kp == k else np.ascontiguousarray(out[..., :k])


def conv2d_nhwc_f32(x, w, pads, bias=None, relu=False, lanes=None):
    """Stride-1 convolution NHWC x HWIO -> NHWC in float32 by the register-blocked kernel; bias and ReLU fused.

    Parameters
    ----------
    x : (N, H, W, C) float32
    w : (R, S, C, K) float32, HWIO
    pads : ((top, bottom), (left, right)), non-negative
    bias : (K,) float32 or None, added in the epilogue
    relu : bool, max(0, .) in the epilogue (after the bias)
    lanes : 16 or 8, or None for :func:`simd_lanes` (8 on an AVX-512 CPU runs the AVX2 kernel)

    Returns
    -------
    out : (N, OH, OW, K) float32, OH = H + top + bottom - R + 1 (likewise OW)

    Raises
    ------
    RuntimeError
        If this CPU has neither AVX-512F nor AVX2 + FMA (callers use im2col then).
    """
    lanes = _check_lanes(lanes)
    x = _check_f32(x, "x", "(N, H, W, C)")
    w = _check_f32(w, "w", "(R, S, C, K), HWIO")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"x.shape[3]={x.shape[3]} must equal w.shape[2]={w.shape[2]} (the input channels)")
    (pt, pb), (pl, pr) = _check_pads(pads)
    if x.shape[1] + pt + pb < w.shape[0] or x.shape[2] + pl + pr < w.shape[1]:
        raise ValueError(f"the {w.shape[0]}x{w.shape[1]} filter does not fit the padded input "
                         f"({x.shape[1]}+{pt}+{pb}) x ({x.shape[2]}+{pl}+{pr})")
    if bias is not None:
        bias = _check_f32(bias, "bias", f"({w.shape[3]},)", ndim=1)
        if bias.shape != (w.shape[3],):
            raise ValueError(f"bias.shape={bias.shape} must be ({w.shape[3]},), one value per output channel")
    return _direct_conv(_pad_nhwc(x, pt, pb, pl, pr), w, bias, relu, lanes)


def conv2d_backward_data_nhwc_f32(dout, w, input_hw, pads, lanes=None):
    """dx of :func:`conv2d_nhwc_f32`: the same kernel on dout padded by (R-1-top, S-1-left, ...), with the
    filter flipped in R and S and its C and K swapped (w'[r, s, k, c] = w[R-1-r, S-1-s, c, k]).

    Parameters
    ----------
    dout : (N, OH, OW, K) float32, the gradient of the forward output
    w : (R, S, C, K) float32, the forward's filter
    input_hw : (H, W) of the forward's input
    pads : the forward's ((top, bottom), (left, right))
    lanes : as for :func:`conv2d_nhwc_f32`

    Returns
    -------
    dx : (N, H, W, C) float32
    """
    lanes = _check_lanes(lanes)
    dout = _check_f32(dout, "dout", "(N, OH, OW, K)")
    w = _check_f32(w, "w", "(R, S, C, K), HWIO")
    (pt, pb), (pl, pr) = _check_pads(pads)
    r, s, _, k = w.shape
    h, wd = (int(v) for v in input_hw)
    expected = (h + pt + pb - r + 1, wd + pl + pr - s + 1, k)
    if dout.shape[1:] != expected:
        raise ValueError(f"dout.shape={dout.shape} must be (N, {expected[0]}, {expected[1]}, {k}): the forward "
                         f"output of a {r}x{s} filter on {h}x{wd} padded by {pads}")
    flipped = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
    return _direct_conv(_pad_nhwc(dout, r - 1 - pt, r - 1 - pb, s - 1 - pl, s - 1 - pr), flipped, None, False, lanes)


def _check_lanes(lanes):
    if lanes is None:
        lanes = simd_lanes()
        if lanes is None:
            raise RuntimeError("this CPU has neither AVX-512F nor AVX2 + FMA (or numba targets another CPU): "
                               "use the im2col convolution")
        return lanes
    if lanes not in (8, 16):
        raise ValueError(f"lanes={lanes!r} must be 16 (AVX-512F), 8 (AVX2 + FMA) or None (this CPU's)")
    return lanes


def _check_f32(a, name, layout, ndim=4):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
        raise TypeError(f"{name} must be a {ndim}-D float32 array {layout}; got "
                        f"{type(a).__name__} {getattr(a, 'dtype', '')} shape={getattr(a, 'shape', None)}")
    if 0 in a.shape:
        raise ValueError(f"{name}.shape={a.shape} must have no empty axis")
    return np.ascontiguousarray(a)


def _check_pads(pads):
    try:
        (pt, pb), (pl, pr) = pads
        values = [int(p) for p in (pt, pb, pl, pr)]
    except (TypeError, ValueError):
        raise ValueError(f"pads={pads!r} must be ((top, bottom), (left, right)) of non-negative ints") from None
    if min(values) < 0:
        raise ValueError(f"pads={pads!r} must be ((top, bottom), (left, right)) of non-negative ints")
    return (values[0], values[1]), (values[2], values[3])


# ----------------------------------------------------------------------------------------------
# Backward-weights
