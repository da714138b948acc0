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

from . import _validate, runtime

# ----------------------------------------------------------------------------------------------
# Forward and backward-data


@functools.lru_cache(maxsize=None)
def simd_lanes():
    """float32 lanes of the FMA vectors numba compiles for here: 16 (AVX-512F), 8 (AVX2 + FMA), or None.

    Chosen from :func:`workshop_lib.sysinfo.target_features`: where numba compiles for another CPU than this
    one (``NUMBA_CPU_NAME``, as the ``stock`` variant sets it), what that target and ``NUMBA_CPU_FEATURES``
    grant counts, so a vector the target lacks is never emitted.
    """
    from .sysinfo import target_has

    if target_has("avx512f"):
        return 16
    return 8 if target_has("avx2", "fma") else None


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
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
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
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    lanes = _check_lanes(lanes)
    dout = _check_f32(dout, "dout", "(N, OH, OW, K)")
    w = _check_f32(w, "w", "(R, S, C, K), HWIO")
    (pt, pb), (pl, pr) = _check_pads(pads)
    r, s, _, k = w.shape
    h, wd = _validate.positive_pair(input_hw, "input_hw")
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
    return _validate.pad_pairs(pads, "pads", "must be ((top, bottom), (left, right)) of non-negative ints")


# ----------------------------------------------------------------------------------------------
# Backward-weights
#
# dw[r, s, c, k] = sum over (n, oh, ow) of xpad[n, oh + r, ow + s, c] * dy[n, oh, ow, k]: for each tap (r, s)
# a GEMM (C x P) @ (P x K) over the P = N*OH*OW pixels, which im2col + GEMM runs on materialised columns.
# Here a micro-tile keeps rows x nv*lanes of dw in vector registers and streams the pixels past it: per
# pixel it loads nv vectors of dy once and, for each of its rows, broadcasts one input scalar and issues
# nv FMAs. A row is one (r, s, c) of dw. With many input channels a tile's rows are consecutive channels
# of one tap ("channel" tiles: each tap walks only the pixels whose receptive field is inside the image,
# so no padded copy and no multiplications by padding zeros); with few (conv1 has C = 1) they are all S
# taps x C channels of one or more kernel rows ("tap" tiles, over a zero-padded copy of x). Each thread
# sums its share of the batch (with fewer images than threads: of the tiles) into its own copy of dw, a
# few images at a time so that their x and dy stay in its L2 while every tile passes over them; the
# copies are added at the end. One thread's images make a GEMM of 800 x 4900 x 64 at conv2, which keeps
# both cores busy where splitting 25 taps (or dw's 800 x 64) over 2 threads would not.


# lanes -> (accumulator registers a tile may use, most dy vectors per tile): AVX-512 has 32 zmm registers
# (24 accumulators, 4 dy vectors, the broadcast rides on the FMA), AVX2 16 ymm (12 + 2 + 1 broadcast)
_WGRAD_BUDGET = {16: (24, 4), 8: (12, 2)}
_WGRAD_CHUNK_BYTES = 384 * 1024  # x + dy of the images one thread holds in its L2 at a time


def _wgrad_tile_code(builder, args, lanes, tap_bytes, mr, ms, mc, nv, masked):
    """Emit one tile variant at the builder's position (see :func:`_wgrad_tile_intrinsic` for ``args``)."""
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vec = ir.VectorType(f32, lanes)
    x_base, dy_base, dw_base, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix = args[:11]
    n_img, n_rows, n_cols, dw0, dw_r, dw_s, dw_c, k_left = args[11:]
    rows = [(a, b, c) for a in range(mr) for b in range(ms) for c in range(mc)]
    const = lambda v: ir.Constant(i64, v)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                          f"llvm.fma.v{lanes}f32")
    if masked:  # the last dy vector holds k_left < lanes channels: lanes past them read as zeros, never past dy
        mask_load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec.as_pointer(), i32, ir.VectorType(ir.IntType(1), lanes),
                                                   vec]), f"llvm.masked.load.v{lanes}f32.p0")
        lane_ids = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
        mask = builder.icmp_signed("<", lane_ids, _broadcast(builder, k_left, ir.VectorType(i64, lanes)))
    zero = ir.Constant(vec, [0.0] * lanes)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in rows]
    for row in accs:  # alloca_once_value initialises in the entry block: zero again for this variant
        for acc in row:
            builder.store(zero, acc)
    row_offsets = [builder.add(builder.mul(const(a), x_row), const(b * tap_bytes + 4 * c)) for a, b, c in rows]
    with cgutils.for_range(builder, n_img) as img_loop:
        x_i = builder.add(builder.add(x_base, x0), builder.mul(img_loop.index, x_img))
        dy_i = builder.add(builder.add(dy_base, dy0), builder.mul(img_loop.index, dy_img))
        with cgutils.for_range(builder, n_rows) as row_loop:
            x_j = builder.add(x_i, builder.mul(row_loop.index, x_row))
            dy_j = builder.add(dy_i, builder.mul(row_loop.index, dy_row))
            with cgutils.for_range(builder, n_cols) as col_loop:
                x_l = builder.add(x_j, builder.mul(col_loop.index, x_pix))
                dy_l = builder.add(dy_j, builder.mul(col_loop.index, dy_pix))
                dys = []
                for v in range(nv):
                    ptr = builder.inttoptr(builder.add(dy_l, const(4 * lanes * v)), vec.as_pointer())
                    if masked and v == nv - 1:
                        dys.append(builder.call(mask_load, [ptr, ir.Constant(i32, 4), mask, zero]))
                    else:
                        dys.append(builder.load(ptr, align=4))
                for row, offset in enumerate(row_offsets):
                    xv = builder.load(builder.inttoptr(builder.add(x_l, offset), f32.as_pointer()), align=4)
                    xv = _broadcast(builder, xv, vec)
                    for v in range(nv):
                        builder.store(builder.call(fma, [xv, dys[v], builder.load(accs[row][v])]), accs[row][v])
    dw_tile = builder.add(dw_base, dw0)
    for row, (a, b, c) in enumerate(rows):
        dw_row = builder.add(dw_tile, builder.add(builder.add(builder.mul(const(a), dw_r), builder.mul(const(b), dw_s)),
                                                  builder.mul(const(c), dw_c)))
        for v in range(nv):
            ptr = builder.inttoptr(builder.add(dw_row, const(4 * lanes * v)), vec.as_pointer())
            builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(accs[row][v])), ptr, align=4)


@functools.lru_cache(maxsize=None)
def _wgrad_tile_intrinsic(variants: tuple, lanes: int, tap_bytes: int):
    """An intrinsic adding one tile of dw, summed over a stream of pixels; ``variant`` picks its shape.

    tile(variant, x, dy, dw, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix, n_img, n_rows, n_cols,
         dw0, dw_r, dw_s, dw_c, k_left)

    ``variants[variant]`` is (mr, ms, mc, nv, masked): the tile's rows are mr x ms x mc, its columns nv
    vectors of ``lanes`` output channels. Pixel (i, j, l) of the stream (image, row, column) reads dy at
    byte dy + dy0 + i*dy_img + j*dy_row + l*dy_pix (nv vectors; with ``masked``, the last one only its
    first k_left lanes) and, for tile row (a, b, c), x at byte x + x0 + i*x_img + j*x_row + l*x_pix +
    a*x_row + b*tap_bytes + 4*c; tile row (a, b, c) is added to dw at byte dw + dw0 + a*dw_r + b*dw_s +
    c*dw_c. All offsets are in bytes.
    """
    i64 = ir.IntType(64)

    @intrinsic
    def tile(typingctx, variant, x, dy, dw, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix, n_img, n_rows,
             n_cols, dw0, dw_r, dw_s, dw_c, k_left):
        sig = types.void(variant, x, dy, dw, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix, n_img, n_rows,
                          n_cols, dw0, dw_r, dw_s, dw_c, k_left)

        def codegen(context, builder, signature, args):
            bases = [builder.ptrtoint(context.make_array(t)(context, builder, v).data, i64)
                     for t, v in zip(signature.args[1:4], args[1:4])]
            done = builder.append_basic_block("wgrad.done")
            cases = [builder.append_basic_block(f"wgrad.variant{i}") for i in range(len(variants))]
            switch = builder.switch(args[0], done)
            for i, block in enumerate(cases):
                switch.add_case(ir.Constant(args[0].type, i), block)
            for block, shape in zip(cases, variants):
                builder.position_at_end(block)
                _wgrad_tile_code(builder, bases + list(args[4:]), lanes, tap_bytes, *shape)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@functools.lru_cache(maxsize=None)
def _wgrad_driver(variants: tuple, lanes: int, tap_bytes: int):
    """The threaded loop over images, tiles and panels of output channels around one tile intrinsic."""
    tile = _wgrad_tile_intrinsic(variants, lanes, tap_bytes)

    @numba.njit(parallel=True, cache=False)
    def run(x, dy, part, blocks, variant_of, panel, pt, pl, chunk, split_images, k_size):
        # IN x (N, H, W, C) f32, dy (N, OH, OW, K) f32, blocks (B, 6) int64: r0, s0, c0, kind, r count, s count,
        # variant_of (2, 2): the variant of a (kind, last panel?) tile; OUT part (T, R, S, C, Kp) f32, zeroed:
        # thread th's share of dw in part[th]
        n_size, h_size, w_size = x.shape[0], x.shape[1], x.shape[2]
        oh_size, ow_size = dy.shape[1], dy.shape[2]
        x_img, x_row, x_pix = x.strides[0], x.strides[1], x.strides[2]
        dy_img, dy_row, dy_pix = dy.strides[0], dy.strides[1], dy.strides[2]
        dw_th, dw_r, dw_s, dw_c = part.strides[0], part.strides[1], part.strides[2], part.strides[3]
        n_threads, n_blocks = part.shape[0], blocks.shape[0]
        n_panels = (k_size + panel - 1) // panel
        k_left = k_size - (k_size - 1) // lanes * lanes  # valid lanes of the last vector
        for th in numba.prange(n_threads):
            if split_images:
                i0, i1, b0, b1 = th * n_size // n_threads, (th + 1) * n_size // n_threads, 0, n_blocks
            else:
                i0, i1, b0, b1 = 0, n_size, th * n_blocks // n_threads, (th + 1) * n_blocks // n_threads
            for first in range(i0, i1, chunk):
                n_img = min(i1, first + chunk) - first
                for b in range(b0, b1):
                    r0, s0, c0, kind, r_count, s_count = (blocks[b, 0], blocks[b, 1], blocks[b, 2], blocks[b, 3],
                                                          blocks[b, 4], blocks[b, 5])
                    # the output pixels whose receptive field holds rows r0.. and columns s0.. of the tile
                    oh_lo, oh_hi = max(0, pt - r0), min(oh_size, h_size + pt - r0 - r_count + 1)
                    ow_lo, ow_hi = max(0, pl - s0), min(ow_size, w_size + pl - s0 - s_count + 1)
                    if oh_hi <= oh_lo or ow_hi <= ow_lo:
                        continue
                    x0 = first * x_img + (oh_lo + r0 - pt) * x_row + (ow_lo + s0 - pl) * x_pix + c0 * 4
                    for p in range(n_panels):
                        k0 = p * panel
                        tile(variant_of[kind, 1 if p == n_panels - 1 else 0], x, dy, part, x0, x_img, x_row, x_pix,
                             first * dy_img + oh_lo * dy_row + ow_lo * dy_pix + k0 * 4, dy_img, dy_row, dy_pix,
                             n_img, oh_hi - oh_lo, ow_hi - ow_lo,
                             th * dw_th + r0 * dw_r + s0 * dw_s + c0 * dw_c + k0 * 4, dw_r, dw_s, dw_c, k_left)

    return run


@functools.lru_cache(maxsize=None)
def _wgrad_plan(r_size: int, s_size: int, c_size: int, k_size: int, lanes: int):
    """How to tile dw (R, S, C, K): (tap tiles?, variants, variant_of (2, 2), channels per panel, blocks (B, 6)).

    A block is a tile's rows: (r0, s0, c0, kind, r count, s count), kind 0 a full tile, 1 the remainder.
    """
    budget, nv_max = _WGRAD_BUDGET[lanes]
    n_vectors = -(-k_size // lanes)
    taps = c_size < budget // nv_max and s_size * c_size <= budget
    if taps:  # all S taps x C channels of mr kernel rows
        nv = min(n_vectors, nv_max, budget // (s_size * c_size))
        mr = max(1, min(r_size, budget // (s_size * c_size * nv)))
        main, rem = (mr, s_size, c_size), (r_size % mr or mr, s_size, c_size)
        blocks = [(r0, 0, 0, int(r0 + mr > r_size), min(mr, r_size - r0), s_size) for r0 in range(0, r_size, mr)]
    else:  # mc consecutive channels of one tap
        nv = min(n_vectors, nv_max)
        mc = min(c_size, budget // nv)
        main, rem = (1, 1, mc), (1, 1, c_size % mc or mc)
        blocks = [(r0, s0, c0, int(c0 + mc > c_size), 1, 1)
                  for r0 in range(r_size) for s0 in range(s_size) for c0 in range(0, c_size, mc)]
    nv_last = n_vectors - (-(-n_vectors // nv) - 1) * nv
    last = (nv_last, k_size % lanes != 0)
    panels = (last if n_vectors <= nv else (nv, False), last)  # (any panel but the last, the last)
    shapes = [(*shape, *panel) for shape in (main, rem) for panel in panels]
    variants = tuple(dict.fromkeys(shapes))
    variant_of = np.array([variants.index(shape) for shape in shapes], dtype=np.int64).reshape(2, 2)
    return taps, variants, variant_of, nv * lanes, np.array(blocks, dtype=np.int64)


def conv2d_backward_filter_nhwc(x, dy, r, s, pads=((0, 0), (0, 0)), *, _lanes=None):
    """The weight gradient of a stride-1 NHWC float32 convolution, without materialising im2col's columns.

    ``dw[r, s, c, k] = sum over (n, oh, ow) of xpad[n, oh + r, ow + s, c] * dy[n, oh, ow, k]``, where xpad
    is x with ``pads`` zeros around its rows and columns: the gradient of ``conv2d_forward(x, w, 1, pads)``
    with respect to w (HWIO) given dy, the gradient of its output.

    Parameters
    ----------
    x : (N, H, W, C) float32
        The forward pass's input.
    dy : (N, OH, OW, K) float32
        The gradient of the forward pass's output, OH = H + top + bottom - r + 1 (OW likewise).
    r, s : int
        The filter's height and width.
    pads : ((top, bottom), (left, right))
        Zero padding of the forward pass, resolved ("SAME" and "VALID" are spelled out by the caller).
    _lanes : None, 16 or 8
        Private: force the vector width (tests cover the 8-lane AVX2 kernels on an AVX-512 machine).

    Returns
    -------
    dw : (r, s, C, K) float32

    Raises
    ------
    TypeError
        If x or dy is not float32.
    ValueError
        If a shape or the padding does not fit the others.
    RuntimeError
        If this CPU has neither AVX-512F nor AVX2 + FMA (see :func:`simd_lanes`); use im2col + GEMM.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 5, 5, 3), np.float32); dy = np.ones((2, 5, 5, 8), np.float32)
    >>> float(conv2d_backward_filter_nhwc(x, dy, 3, 3, ((1, 1), (1, 1)))[1, 1, 0, 0])  # every pixel, 2 images
    50.0
    """
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    x = _validate.array(x, "x", 4, (np.float32,), "(N, H, W, C)")
    dy = _validate.array(dy, "dy", 4, (np.float32,), "(N, OH, OW, K)")
    r, s = _validate.integer(r, "r", minimum=1), _validate.integer(s, "s", minimum=1)
    (pt, pb), (pl, pr) = _check_pads(pads)
    n_size, h_size, w_size, c_size = x.shape
    out_h, out_w = h_size + pt + pb - r + 1, w_size + pl + pr - s + 1
    if min(x.shape) < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"x.shape={x.shape} with pads={pads!r} must hold at least one {r}x{s} window and one "
                         "pixel and channel")
    if dy.shape[:3] != (n_size, out_h, out_w) or dy.shape[3] < 1:
        raise ValueError(f"dy.shape={dy.shape} must be (N, OH, OW, K) = ({n_size}, {out_h}, {out_w}, K >= 1) "
                         f"for x.shape={x.shape}, a {r}x{s} filter and pads={pads!r}")
    lanes = simd_lanes() if _lanes is None else _lanes
    if lanes not in _WGRAD_BUDGET:
        if _lanes is not None:
            raise ValueError(f"_lanes={_lanes!r} must be None, 16 or 8")
        raise RuntimeError("conv2d_backward_filter_nhwc needs AVX-512F or AVX2 + FMA, which this CPU (or numba's "
                           "target) lacks; use im2col + GEMM (kernels.conv2d_backward)")
    k_size = dy.shape[3]
    taps, variants, variant_of, panel, blocks = _wgrad_plan(r, s, c_size, k_size, lanes)
    x = np.ascontiguousarray(x)
    if taps and (pt or pb or pl or pr):
        padded = np.zeros((n_size, h_size + pt + pb, w_size + pl + pr, c_size), dtype=np.float32)
        padded[:, pt : pt + h_size, pl : pl + w_size, :] = x
        x, pt, pl = padded, 0, 0
    image_bytes = x[0].nbytes + dy[0].nbytes
    chunk = max(1, _WGRAD_CHUNK_BYTES // image_bytes)
    threads = numba.get_num_threads()
    split_images = n_size >= threads
    threads = threads if split_images else max(1, min(threads, len(blocks)))
    k_padded = -(-k_size // lanes) * lanes
    part = np.zeros((threads, r, s, c_size, k_padded), dtype=np.float32)
    run = _wgrad_driver(variants, lanes, 4 * c_size)
    run(x, np.ascontiguousarray(dy), part, blocks, variant_of, panel, pt, pl, chunk, split_images, k_size)
    dw = part[0] if threads == 1 else part.sum(axis=0)
    return dw if k_padded == k_size else np.ascontiguousarray(dw[..., :k_size])
