"""Direct convolution with register-blocked SIMD micro-kernels (fp32), the way oneDNN's jit kernels work.

No im2col: each micro-kernel keeps a tile of outputs in vector registers and streams the input and the
weights past it (numba ``@intrinsic`` builds the LLVM vector code, as :mod:`workshop_lib.int8` does for
``vpdpbusd``). :mod:`workshop_lib.kernels` calls these where the shape and the CPU fit and keeps its
reference and im2col paths beside them.
"""

# ----------------------------------------------------------------------------------------------
# Forward and backward-data


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

import functools as _functools
import os as _os

import numba as _numba
import numpy as _np
from llvmlite import ir as _ir
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

from . import _validate

# lanes -> (accumulator registers a tile may use, most dy vectors per tile): AVX-512 has 32 zmm registers
# (24 accumulators, 4 dy vectors, the broadcast rides on the FMA), AVX2 16 ymm (12 + 2 + 1 broadcast)
_WGRAD_BUDGET = {16: (24, 4), 8: (12, 2)}
_WGRAD_CHUNK_BYTES = 384 * 1024  # x + dy of the images one thread holds in its L2 at a time


@_functools.lru_cache(maxsize=None)
def _wgrad_simd_lanes():
    """16 (AVX-512F), 8 (AVX2 + FMA) or None: the widest float32 FMA vectors numba compiles for here.

    A process that pins numba to another target (``NUMBA_CPU_NAME``, as the ``stock`` variant does) gets
    only what ``NUMBA_CPU_FEATURES`` grants, so a vector the target lacks is never emitted.
    """
    name = _os.environ.get("NUMBA_CPU_NAME", "host")
    if name != "host":
        granted = set(_os.environ.get("NUMBA_CPU_FEATURES", "").split(","))
        if "+avx512f" in granted:
            return 16
        return 8 if {"+avx2", "+fma"} <= granted else None
    from .sysinfo import cpu_features

    features = cpu_features()
    if features.get("avx512f"):
        return 16
    return 8 if features.get("avx2") and features.get("fma") else None


def _wgrad_splat(builder, value, vec):
    undef = _ir.Constant(vec, None)
    one = builder.insert_element(undef, value, _ir.Constant(_ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, _ir.Constant(_ir.VectorType(_ir.IntType(32), vec.count),
                                                           [0] * vec.count))


def _wgrad_tile_code(builder, args, lanes, tap_bytes, mr, ms, mc, nv, masked):
    """Emit one tile variant at the builder's position (see :func:`_wgrad_tile_intrinsic` for ``args``)."""
    f32, i32, i64 = _ir.FloatType(), _ir.IntType(32), _ir.IntType(64)
    vec = _ir.VectorType(f32, lanes)
    x_base, dy_base, dw_base, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix = args[:11]
    n_img, n_rows, n_cols, dw0, dw_r, dw_s, dw_c, k_left = args[11:]
    rows = [(a, b, c) for a in range(mr) for b in range(ms) for c in range(mc)]
    const = lambda v: _ir.Constant(i64, v)
    fma = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(vec, [vec, vec, vec]),
                                          f"llvm.fma.v{lanes}f32")
    if masked:  # the last dy vector holds k_left < lanes channels: lanes past them read as zeros, never past dy
        mask_load = _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(vec, [vec.as_pointer(), i32, _ir.VectorType(_ir.IntType(1), lanes),
                                                   vec]), f"llvm.masked.load.v{lanes}f32.p0")
        lane_ids = _ir.Constant(_ir.VectorType(i64, lanes), list(range(lanes)))
        mask = builder.icmp_signed("<", lane_ids, _wgrad_splat(builder, k_left, _ir.VectorType(i64, lanes)))
    zero = _ir.Constant(vec, [0.0] * lanes)
    accs = [[_cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in rows]
    for row in accs:  # alloca_once_value initialises in the entry block: zero again for this variant
        for acc in row:
            builder.store(zero, acc)
    row_offsets = [builder.add(builder.mul(const(a), x_row), const(b * tap_bytes + 4 * c)) for a, b, c in rows]
    with _cgutils.for_range(builder, n_img) as img_loop:
        x_i = builder.add(builder.add(x_base, x0), builder.mul(img_loop.index, x_img))
        dy_i = builder.add(builder.add(dy_base, dy0), builder.mul(img_loop.index, dy_img))
        with _cgutils.for_range(builder, n_rows) as row_loop:
            x_j = builder.add(x_i, builder.mul(row_loop.index, x_row))
            dy_j = builder.add(dy_i, builder.mul(row_loop.index, dy_row))
            with _cgutils.for_range(builder, n_cols) as col_loop:
                x_l = builder.add(x_j, builder.mul(col_loop.index, x_pix))
                dy_l = builder.add(dy_j, builder.mul(col_loop.index, dy_pix))
                dys = []
                for v in range(nv):
                    ptr = builder.inttoptr(builder.add(dy_l, const(4 * lanes * v)), vec.as_pointer())
                    if masked and v == nv - 1:
                        dys.append(builder.call(mask_load, [ptr, _ir.Constant(i32, 4), mask, zero]))
                    else:
                        dys.append(builder.load(ptr, align=4))
                for row, offset in enumerate(row_offsets):
                    xv = builder.load(builder.inttoptr(builder.add(x_l, offset), f32.as_pointer()), align=4)
                    xv = _wgrad_splat(builder, xv, vec)
                    for v in range(nv):
                        builder.store(builder.call(fma, [xv, dys[v], builder.load(accs[row][v])]), accs[row][v])
    dw_tile = builder.add(dw_base, dw0)
    for row, (a, b, c) in enumerate(rows):
        dw_row = builder.add(dw_tile, builder.add(builder.add(builder.mul(const(a), dw_r), builder.mul(const(b), dw_s)),
                                                  builder.mul(const(c), dw_c)))
        for v in range(nv):
            ptr = builder.inttoptr(builder.add(dw_row, const(4 * lanes * v)), vec.as_pointer())
            builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(accs[row][v])), ptr, align=4)


@_functools.lru_cache(maxsize=None)
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
    i64 = _ir.IntType(64)

    @_intrinsic
    def tile(typingctx, variant, x, dy, dw, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix, n_img, n_rows,
             n_cols, dw0, dw_r, dw_s, dw_c, k_left):
        sig = _types.void(variant, x, dy, dw, x0, x_img, x_row, x_pix, dy0, dy_img, dy_row, dy_pix, n_img, n_rows,
                          n_cols, dw0, dw_r, dw_s, dw_c, k_left)

        def codegen(context, builder, signature, args):
            bases = [builder.ptrtoint(context.make_array(t)(context, builder, v).data, i64)
                     for t, v in zip(signature.args[1:4], args[1:4])]
            done = builder.append_basic_block("wgrad.done")
            cases = [builder.append_basic_block(f"wgrad.variant{i}") for i in range(len(variants))]
            switch = builder.switch(args[0], done)
            for i, block in enumerate(cases):
                switch.add_case(_ir.Constant(args[0].type, i), block)
            for block, shape in zip(cases, variants):
                builder.position_at_end(block)
                _wgrad_tile_code(builder, bases + list(args[4:]), lanes, tap_bytes, *shape)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@_functools.lru_cache(maxsize=None)
def _wgrad_driver(variants: tuple, lanes: int, tap_bytes: int):
    """The threaded loop over images, tiles and panels of output channels around one tile intrinsic."""
    tile = _wgrad_tile_intrinsic(variants, lanes, tap_bytes)

    @_numba.njit(parallel=True, cache=False)
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
        for th in _numba.prange(n_threads):
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


@_functools.lru_cache(maxsize=None)
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
    variant_of = _np.array([variants.index(shape) for shape in shapes], dtype=_np.int64).reshape(2, 2)
    return taps, variants, variant_of, nv * lanes, _np.array(blocks, dtype=_np.int64)


def _wgrad_pads(pads):
    rule = "must be ((top, bottom), (left, right)) of non-negative ints"
    try:
        (pt, pb), (pl, pr) = pads
    except (TypeError, ValueError):
        raise ValueError(f"pads={pads!r} {rule}") from None
    if not all(isinstance(p, (int, _np.integer)) and not isinstance(p, (bool, _np.bool_)) and p >= 0
               for p in (pt, pb, pl, pr)):
        raise ValueError(f"pads={pads!r} {rule}")
    return (int(pt), int(pb)), (int(pl), int(pr))


def wgrad_lanes():
    """float32 lanes of :func:`conv2d_backward_filter_nhwc` on this CPU: 16 (AVX-512F), 8 (AVX2 + FMA) or None."""
    return _wgrad_simd_lanes()


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
        If this CPU has neither AVX-512F nor AVX2 + FMA (see :func:`wgrad_lanes`); use im2col + GEMM.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 5, 5, 3), np.float32); dy = np.ones((2, 5, 5, 8), np.float32)
    >>> float(conv2d_backward_filter_nhwc(x, dy, 3, 3, ((1, 1), (1, 1)))[1, 1, 0, 0])  # every pixel, 2 images
    50.0
    """
    x = _validate.array(x, "x", 4, (_np.float32,), "(N, H, W, C)")
    dy = _validate.array(dy, "dy", 4, (_np.float32,), "(N, OH, OW, K)")
    r, s = _validate.integer(r, "r", minimum=1), _validate.integer(s, "s", minimum=1)
    (pt, pb), (pl, pr) = _wgrad_pads(pads)
    n_size, h_size, w_size, c_size = x.shape
    out_h, out_w = h_size + pt + pb - r + 1, w_size + pl + pr - s + 1
    if min(x.shape) < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"x.shape={x.shape} with pads={pads!r} must hold at least one {r}x{s} window and one "
                         "pixel and channel")
    if dy.shape[:3] != (n_size, out_h, out_w) or dy.shape[3] < 1:
        raise ValueError(f"dy.shape={dy.shape} must be (N, OH, OW, K) = ({n_size}, {out_h}, {out_w}, K >= 1) "
                         f"for x.shape={x.shape}, a {r}x{s} filter and pads={pads!r}")
    lanes = _wgrad_simd_lanes() if _lanes is None else _lanes
    if lanes not in _WGRAD_BUDGET:
        if _lanes is not None:
            raise ValueError(f"_lanes={_lanes!r} must be None, 16 or 8")
        raise RuntimeError("conv2d_backward_filter_nhwc needs AVX-512F or AVX2 + FMA, which this CPU (or numba's "
                           "target) lacks; use im2col + GEMM (kernels.conv2d_backward)")
    k_size = dy.shape[3]
    taps, variants, variant_of, panel, blocks = _wgrad_plan(r, s, c_size, k_size, lanes)
    x = _np.ascontiguousarray(x)
    if taps and (pt or pb or pl or pr):
        padded = _np.zeros((n_size, h_size + pt + pb, w_size + pl + pr, c_size), dtype=_np.float32)
        padded[:, pt : pt + h_size, pl : pl + w_size, :] = x
        x, pt, pl = padded, 0, 0
    image_bytes = x[0].nbytes + dy[0].nbytes
    chunk = max(1, _WGRAD_CHUNK_BYTES // image_bytes)
    threads = _numba.get_num_threads()
    split_images = n_size >= threads
    threads = threads if split_images else max(1, min(threads, len(blocks)))
    k_padded = -(-k_size // lanes) * lanes
    part = _np.zeros((threads, r, s, c_size, k_padded), dtype=_np.float32)
    run = _wgrad_driver(variants, lanes, 4 * c_size)
    run(x, _np.ascontiguousarray(dy), part, blocks, variant_of, panel, pt, pl, chunk, split_images, k_size)
    dw = part[0] if threads == 1 else part.sum(axis=0)
    return dw if k_padded == k_size else _np.ascontiguousarray(dw[..., :k_size])
