"""Integer GEMM and convolution with the exact arithmetic of Intel DL Boost (VNNI) and of the AVX512-BW path before it.

Mirrors the instructions ``vpdpbusd`` (u8 x s8, four products summed into s32),
``vpdpwssd`` (s16 x s16, two products into s32), and the pre-VNNI sequence
``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``. The one idea: VNNI does in one
instruction what took three, *and* it removes a trap: ``vpmaddubsw`` adds each
pair of u8 x s8 products in a **signed 16-bit register that saturates**, so
255*127 + 255*127 = 64770 comes out as 32767. VNNI adds in 32 bits.

Shapes: A is (M, K) activations, B is (K, N) weights, C = A @ B is (M, N);
convolutions are NHWC (activations) and HWIO (R x S x C x K weights).

Three paths compute ``semantics="vnni"``: a reference kernel that spells out
the arithmetic (the specification), a portable numba kernel, and a fast kernel
that issues the real ``vpdpbusd`` through a numba intrinsic where the CPU has
AVX512-VNNI or AVX-VNNI. 32-bit accumulation wraps around on overflow as the
hardware does; wrap-around addition is associative, so all paths are bit-identical.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _validate as check
from .kernels import im2col_nhwc

__all__ = [
    "SEMANTICS",
    "vnni_isa",
    "saturate_s16",
    "maddubs_pair",
    "gemm_u8s8s32",
    "gemm_s16s16s32",
    "pack_weights",
    "PackedWeights",
    "conv2d_u8s8s32",
]

SEMANTICS = ("vnni", "avx512bw")
PATHS = ("auto", "fast", "portable", "reference")


# ----------------------------------------------------------------------------------------------
# The arithmetic, element by element (what the lab shows by hand)


def saturate_s16(value):
    """Clamp integers to the signed 16-bit range [-32768, 32767], as vpmaddubsw does; returns int64.

    ``value`` is an integer, an integer array, or a float array of whole numbers; the clamp is exact for any
    of them (Python integers beyond 64 bits included). NaN, infinity and fractions raise ``ValueError``.
    """
    x = np.asarray(value)
    if x.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x.flat):
        return np.asarray(np.clip(x, -32768, 32767)).astype(np.int64)[()]  # Python ints of any size, exactly
    if x.dtype.kind == "f":
        check.finite(x, "value")
        if (x != np.rint(x)).any():
            raise ValueError(f"value={value!r} must hold whole numbers (the products and sums of integers)")
    elif x.dtype.kind not in "iu":
        raise TypeError(f"value.dtype={x.dtype} must be an integer type")
    return np.clip(x, -32768, 32767).astype(np.int64)


def maddubs_pair(a0, b0, a1, b1):
    """One lane of vpmaddubsw: u8 a0*s8 b0 + u8 a1*s8 b1 with signed 16-bit saturation."""
    a0, a1 = check.integer(a0, "a0", 0, 255), check.integer(a1, "a1", 0, 255)
    b0, b1 = check.integer(b0, "b0", -128, 127), check.integer(b1, "b1", -128, 127)
    return int(saturate_s16(a0 * b0 + a1 * b1))


# ----------------------------------------------------------------------------------------------
# Reference kernels: the specification. s32 arithmetic wraps (np.int32(x) truncates to 32 bits).


@numba.njit(cache=True)
def _gemm_u8s8s32_vnni_reference(a, b, c):  # IN a (M, Kp) u8, b (Kp, N) s8, Kp % 4 == 0; OUT c (M, N) s32
    m_size, k_size = a.shape
    n_size = b.shape[1]
    for i in range(m_size):
        for j in range(n_size):
            acc = np.int32(0)
            for k in range(0, k_size, 4):  # vpdpbusd: four u8 x s8 products, summed, added to s32
                group = np.int32(0)
                for t in range(4):
                    group += np.int32(a[i, k + t]) * np.int32(b[k + t, j])
                acc = np.int32(np.int64(acc) + np.int64(group))
            c[i, j] = acc


@numba.njit(cache=True)
def _gemm_u8s8s32_avx512bw_reference(a, b, c):  # IN a (M, Kp) u8, b (Kp, N) s8, Kp % 4 == 0; OUT c (M, N) s32
    m_size, k_size = a.shape
    n_size = b.shape[1]
    for i in range(m_size):
        for j in range(n_size):
            acc = np.int32(0)
            for k in range(0, k_size, 4):
                # vpmaddubsw: each adjacent pair of u8 x s8 products summed with signed 16-bit saturation
                lo = np.int32(a[i, k]) * np.int32(b[k, j]) + np.int32(a[i, k + 1]) * np.int32(b[k + 1, j])
                hi = np.int32(a[i, k + 2]) * np.int32(b[k + 2, j]) + np.int32(a[i, k + 3]) * np.int32(b[k + 3, j])
                lo = min(max(lo, -32768), 32767)
                hi = min(max(hi, -32768), 32767)
                # vpmaddwd with ones: the two s16 sums added into s32 (exact); vpaddd: wrap-around s32 add
                acc = np.int32(np.int64(acc) + np.int64(lo + hi))
            c[i, j] = acc


@numba.njit(cache=True)
def _gemm_s16s16s32_reference(a, b, c):  # IN a (M, Kp) s16, b (Kp, N) s16, Kp % 2 == 0; OUT c (M, N) s32
    m_size, k_size = a.shape
    n_size = b.shape[1]
    for i in range(m_size):
        for j in range(n_size):
            acc = np.int32(0)
            for k in range(0, k_size, 2):  # vpdpwssd: two s16 x s16 products added to s32, wrapping
                pair = np.int64(a[i, k]) * np.int64(b[k, j]) + np.int64(a[i, k + 1]) * np.int64(b[k + 1, j])
                acc = np.int32(np.int64(acc) + pair)
            c[i, j] = acc


# ----------------------------------------------------------------------------------------------
# Portable kernel: plain loops in the order that vectorises over N; s32 wraps (modular, so any order is exact).


@numba.njit(parallel=True, cache=True)
def _gemm_int_portable(a, b, c):  # IN a (M, K), b (K, N) integer; OUT c (M, N) s32, overwritten
    m_size, k_size = a.shape
    n_size = b.shape[1]
    for i in numba.prange(m_size):
        row = np.zeros(n_size, dtype=np.int32)
        for k in range(k_size):
            aik = np.int32(a[i, k])
            for j in range(n_size):
                row[j] += aik * np.int32(b[k, j])
        c[i, :] = row


# ----------------------------------------------------------------------------------------------
# Fast kernel: a register-blocked micro-tile that issues vpdpbusd (or vpdpwssd) directly.

_MR = 6  # rows of A per micro-tile
_NV = 4  # vectors of B per micro-tile: _MR * _NV accumulator registers
_KC = 256  # 4-byte groups of K per cache block


@functools.lru_cache(maxsize=None)
def _tile_intrinsic(instruction: str, lanes: int):
    """An intrinsic computing C[r0:r0+MR, c0:c0+NV*lanes] += A32[r0:, g0:g1] . Bp[panel, g0:g1].

    A32 holds A with each 4-byte group of K (4 u8, or 2 s16) read as one int32;
    Bp holds B packed so that one group of K for NV*lanes columns is contiguous.
    The accumulators live in allocas that LLVM promotes to vector registers.
    """
    vec = ir.VectorType(ir.IntType(32), lanes)
    name = f"llvm.x86.avx512.{instruction}.{lanes * 32}"
    i64 = ir.IntType(64)

    @intrinsic
    def tile(typingctx, c, a32, bp, row0, col0, g0, g1):
        sig = types.void(c, a32, bp, row0, col0, g0, g1)

        def codegen(context, builder, signature, args):
            c_arr = context.make_array(signature.args[0])(context, builder, args[0])
            a_arr = context.make_array(signature.args[1])(context, builder, args[1])
            b_arr = context.make_array(signature.args[2])(context, builder, args[2])
            row0, col0, g0, g1 = args[3:]
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), name)
            c_strides = cgutils.unpack_tuple(builder, c_arr.strides, 2)
            a_strides = cgutils.unpack_tuple(builder, a_arr.strides, 2)
            b_strides = cgutils.unpack_tuple(builder, b_arr.strides, 3)
            c_base = builder.ptrtoint(c_arr.data, i64)
            a_base = builder.ptrtoint(a_arr.data, i64)
            b_base = builder.ptrtoint(b_arr.data, i64)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, [0] * lanes)) for _ in range(_NV)]
                    for _ in range(_MR)]
            panel = builder.sdiv(col0, ir.Constant(i64, _NV * lanes))
            b_panel = builder.add(b_base, builder.mul(panel, b_strides[0]))
            a_rows = [builder.add(a_base, builder.mul(builder.add(row0, ir.Constant(i64, r)), a_strides[0]))
                      for r in range(_MR)]
            with cgutils.for_range(builder, builder.sub(g1, g0)) as loop:
                g = builder.add(g0, loop.index)
                b_row = builder.add(b_panel, builder.mul(g, b_strides[1]))
                b_vecs = [builder.load(builder.inttoptr(builder.add(b_row, ir.Constant(i64, v * lanes * 4)),
                                                        vec.as_pointer()), align=4) for v in range(_NV)]
                a_off = builder.mul(g, a_strides[1])
                for r in range(_MR):
                    a_val = builder.load(builder.inttoptr(builder.add(a_rows[r], a_off), ir.IntType(32).as_pointer()),
                                         align=4)
                    a_vec = builder.insert_element(ir.Constant(vec, None), a_val, ir.Constant(ir.IntType(32), 0))
                    a_vec = builder.shuffle_vector(a_vec, ir.Constant(vec, None), ir.Constant(vec, [0] * lanes))
                    for v in range(_NV):
                        builder.store(builder.call(dot, [builder.load(accs[r][v]), a_vec, b_vecs[v]]), accs[r][v])
            for r in range(_MR):
                c_row = builder.add(c_base, builder.mul(builder.add(row0, ir.Constant(i64, r)), c_strides[0]))
                for v in range(_NV):
                    col = builder.add(col0, ir.Constant(i64, v * lanes))
                    ptr = builder.inttoptr(builder.add(c_row, builder.mul(col, c_strides[1])), vec.as_pointer())
                    builder.store(builder.add(builder.load(ptr, align=4), builder.load(accs[r][v])), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@functools.lru_cache(maxsize=None)
def _fast_gemm(instruction: str, lanes: int):
    """The blocked, threaded driver around one micro-tile intrinsic (compiled on first use only)."""
    tile = _tile_intrinsic(instruction, lanes)
    cols = _NV * lanes

    @numba.njit(parallel=True, cache=False)
    def gemm(a32, bp, c):  # IN a32 (Mp, G) int32 groups, bp (P, G, cols) packed; OUT c (Mp, P*cols) s32, zeroed
        n_groups = a32.shape[1]
        n_panels = bp.shape[0]
        for mt in numba.prange(a32.shape[0] // _MR):
            for g0 in range(0, n_groups, _KC):
                g1 = min(n_groups, g0 + _KC)
                for p in range(n_panels):
                    tile(c, a32, bp, np.int64(mt * _MR), np.int64(p * cols), np.int64(g0), np.int64(g1))

    return gemm


@functools.lru_cache(maxsize=None)
def vnni_isa():
    """The VNNI flavour this CPU offers: ``"avx512_vnni"`` (16 lanes), ``"avx_vnni"`` (8 lanes) or None."""
    from .sysinfo import cpu_features

    features = cpu_features()
    if features.get("avx512_vnni") and features.get("avx512f"):
        return "avx512_vnni"
    if features.get("avx_vnni"):
        return "avx_vnni"
    return None


_ISA_LANES = {"avx512_vnni": 16, "avx_vnni": 8}


def _lanes(isa):
    return _ISA_LANES[check.option(isa, "isa", tuple(_ISA_LANES))]


class PackedWeights:
    """B (K, N) packed once for the fast kernel: groups of K (4 s8 or 2 s16) contiguous for each panel of columns.

    Pack weights once and reuse them for every batch, as inference libraries do. The object carries the
    dtype it was packed from (``int8`` for :func:`gemm_u8s8s32`, ``int16`` for :func:`gemm_s16s16s32`:
    the two pack K in groups of different sizes) and its register width ``lanes``; each GEMM checks both.
    """

    def __init__(self, b, lanes):
        if isinstance(b, PackedWeights):
            raise TypeError("b is already a PackedWeights; pack the int8 or int16 matrix itself")
        b = _check_matrix(b, "b", (np.int8, np.int16))
        if lanes not in _ISA_LANES.values():
            raise ValueError(f"lanes={lanes!r} must be 16 (avx512_vnni) or 8 (avx_vnni)")
        k_size, n_size = b.shape
        per_group = 4 // b.dtype.itemsize  # 4 s8 or 2 s16 fill one 32-bit lane
        cols = _NV * lanes
        kp, np_ = -(-k_size // per_group) * per_group, -(-n_size // cols) * cols
        padded = np.zeros((kp, np_), dtype=b.dtype)
        padded[:k_size, :n_size] = b
        # (G, per_group, P, cols) -> (P, G, cols, per_group): one group of a column is one int32 lane
        blocked = padded.reshape(kp // per_group, per_group, np_ // cols, cols).transpose(2, 0, 3, 1)
        self.data = np.ascontiguousarray(blocked).view(np.int32).reshape(np_ // cols, kp // per_group, cols)
        self.shape, self.dtype, self.lanes = (k_size, n_size), b.dtype, lanes


def pack_weights(b, isa=None) -> PackedWeights:
    """Pack an int8 or int16 weight matrix (K, N) for the fast kernel of this CPU."""
    isa = isa or vnni_isa()
    if isa is None:
        raise RuntimeError("this CPU has no VNNI (avx512_vnni or avx_vnni): use path='portable'")
    b = _check_matrix(b, "b", (np.int8, np.int16))
    return PackedWeights(b, _lanes(isa))


# ----------------------------------------------------------------------------------------------
# Public functions: validate once, then call a kernel that trusts its inputs.


def _check_matrix(x, name, dtypes):
    """A 2-D integer matrix of one of ``dtypes``, or :class:`PackedWeights` packed from one of them."""
    wanted = " or ".join(np.dtype(d).name for d in dtypes)
    if isinstance(x, PackedWeights):
        if x.dtype not in [np.dtype(d) for d in dtypes]:
            raise TypeError(f"{name} holds weights packed from {x.dtype}, which must be {wanted}: pack the "
                            f"{wanted} matrix with pack_weights")
        lanes = x.data.shape[2] // _NV if x.data.ndim == 3 else None
        if x.lanes != lanes or x.data.dtype != np.int32 or not x.data.flags.c_contiguous:
            raise ValueError(f"{name} is not a PackedWeights made by pack_weights (its data is "
                             f"{x.data.dtype} {x.data.shape}); pack the matrix again")
        if _ISA_LANES.get(vnni_isa()) is None or (x.lanes == 16 and vnni_isa() != "avx512_vnni"):
            raise RuntimeError(f"{name} was packed for {x.lanes}-lane VNNI, which this CPU lacks "
                               f"({vnni_isa() or 'no VNNI'}); pass the {wanted} matrix instead")
        return x
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}={x!r} must be a 2-D {wanted} array")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}.shape={x.shape} must be 2-D")
    if x.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name}.dtype={x.dtype} must be {wanted}; quantize it first (workshop_lib.quantization)")
    return x


def _pad_k(x, axis, multiple):
    extra = -x.shape[axis] % multiple
    if not extra:
        return np.ascontiguousarray(x)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, extra)
    return np.pad(x, pad)


def _run_fast(a, b_packed, instruction):
    m_size, k_size = a.shape
    per_group = 4 // a.dtype.itemsize
    a = _pad_k(a, 1, per_group)
    mp = -(-m_size // _MR) * _MR
    if mp != m_size or a.shape[1] != b_packed.data.shape[1] * per_group:
        padded = np.zeros((mp, b_packed.data.shape[1] * per_group), dtype=a.dtype)
        padded[:m_size, : a.shape[1]] = a
        a = padded
    a32 = np.ascontiguousarray(a).view(np.int32)
    c = np.zeros((mp, b_packed.data.shape[0] * b_packed.data.shape[2]), dtype=np.int32)
    _fast_gemm(instruction, b_packed.lanes)(a32, b_packed.data, c)
    return c[:m_size, : b_packed.shape[1]]


def _resolve_path(path):
    if path not in PATHS:
        raise ValueError(f"path={path!r} must be one of {PATHS}")
    isa = vnni_isa()
    if path == "auto":
        return ("fast", isa) if isa else ("portable", None)
    if path == "fast" and isa is None:
        raise RuntimeError("path='fast' needs avx512_vnni or avx_vnni, which this CPU lacks; use 'portable'")
    return path, isa


def gemm_u8s8s32(a, b, semantics="vnni", path="auto"):
    """C = A @ B for u8 activations and s8 weights, accumulated in s32 exactly as the hardware does.

    Parameters
    ----------
    a : uint8 array (M, K)
    b : int8 array (K, N), or :class:`PackedWeights` from :func:`pack_weights`
    semantics : {"vnni", "avx512bw"}
        ``"vnni"``: vpdpbusd's arithmetic, groups of four products summed into a
        32-bit accumulator that wraps on overflow. ``"avx512bw"``: the pre-VNNI
        sequence, in which each adjacent pair of products is summed with signed
        16-bit saturation first. K is zero-padded to a multiple of 4 (zeros change neither).
    path : {"auto", "fast", "portable", "reference"}
        Which kernel computes ``"vnni"``: the real VNNI instruction (``"fast"``,
        the default where the CPU has it), plain numba loops, or the reference.
        All give identical bits. ``"avx512bw"`` always uses its reference kernel.

    Returns
    -------
    int32 array (M, N)

    Examples
    --------
    >>> a = np.array([[255, 255]], dtype=np.uint8); b = np.array([[127], [127]], dtype=np.int8)
    >>> gemm_u8s8s32(a, b, semantics="vnni")[0, 0], gemm_u8s8s32(a, b, semantics="avx512bw")[0, 0]
    (64770, 32767)
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r} must be one of {SEMANTICS}")
    check.option(path, "path", PATHS)
    a = _check_matrix(a, "a", (np.uint8,))
    b = _check_matrix(b, "b", (np.int8,))
    k_b = b.shape[0]
    if a.shape[1] != k_b:
        raise ValueError(f"a.shape[1]={a.shape[1]} must equal b.shape[0]={k_b}")
    if isinstance(b, PackedWeights) and (semantics != "vnni" or path in ("portable", "reference")):
        raise ValueError("packed weights are for the fast VNNI path only; pass the int8 matrix instead")
    if semantics == "avx512bw":
        c = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
        _gemm_u8s8s32_avx512bw_reference(_pad_k(a, 1, 4), _pad_k(b, 0, 4), c)
        return c
    path, isa = _resolve_path(path)
    if path == "fast":
        packed = b if isinstance(b, PackedWeights) else PackedWeights(b, _lanes(isa))
        return _run_fast(a, packed, "vpdpbusd")
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    if path == "portable":
        _gemm_int_portable(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    else:
        _gemm_u8s8s32_vnni_reference(_pad_k(a, 1, 4), _pad_k(b, 0, 4), c)
    return c


def gemm_s16s16s32(a, b, path="auto"):
    """C = A @ B for s16 x s16 with vpdpwssd's arithmetic: pairs of products added to a wrapping s32 accumulator."""
    a = _check_matrix(a, "a", (np.int16,))
    b = _check_matrix(b, "b", (np.int16,))
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a.shape[1]={a.shape[1]} must equal b.shape[0]={b.shape[0]}")
    if isinstance(b, PackedWeights) and path in ("portable", "reference"):
        raise ValueError("packed weights are for the fast VNNI path only; pass the int16 matrix instead")
    path, isa = _resolve_path(path)
    if path == "fast":
        packed = b if isinstance(b, PackedWeights) else PackedWeights(b, _lanes(isa))
        return _run_fast(a, packed, "vpdpwssd")
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    if path == "portable":
        _gemm_int_portable(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    else:
        _gemm_s16s16s32_reference(_pad_k(a, 1, 2), _pad_k(b, 0, 2), c)
    return c


# ----------------------------------------------------------------------------------------------
# Convolution through the GEMM


def conv2d_u8s8s32(x, w, stride=(1, 1), padding="SAME", pad_value=0, path="auto"):
    """int8 convolution: u8 activations NHWC (N, H, W, C) and s8 weights HWIO (R, S, C, K) -> s32 NHWC.

    ``pad_value`` is what padded pixels hold: the activations' zero point (0 after a ReLU).
    ``w`` may also be a :class:`PackedWeights` of ``w.reshape(R*S*C, K)`` with ``ksize`` implied by ``x``;
    pass ``(packed, (R, S))`` in that case.

    Raises ``TypeError`` for other dtypes, ``ValueError`` for mismatched shapes, a stride or padding that
    does not fit, or a ``pad_value`` outside [0, 255].
    """
    x = check.array(x, "x", 4, (np.uint8,), "NHWC (N, H, W, C)")
    if isinstance(w, tuple):
        if len(w) != 2 or not isinstance(w[0], PackedWeights):
            raise TypeError("w as a tuple must be (PackedWeights, (R, S)): weights packed with pack_weights "
                            "and the kernel size")
        packed, ksize = _check_matrix(w[0], "w[0]", (np.int8,)), check.positive_pair(w[1], "ksize")
        k_out = packed.shape[1]
        if packed.shape[0] != ksize[0] * ksize[1] * x.shape[3]:
            raise ValueError(f"packed weights have K={packed.shape[0]}, expected R*S*C={ksize[0] * ksize[1] * x.shape[3]}")
        b = packed
    else:
        if isinstance(w, PackedWeights):
            raise TypeError("w is a PackedWeights without its kernel size: pass (packed, (R, S))")
        w = check.array(w, "w", 4, (np.int8,), "HWIO (R, S, C, K)")
        if w.shape[2] != x.shape[3]:
            raise ValueError(f"w.shape[2]={w.shape[2]} (input channels) must equal x.shape[3]={x.shape[3]}")
        ksize, k_out = w.shape[:2], w.shape[3]
        b = w.reshape(-1, k_out)
    check.option(path, "path", PATHS)
    cols, (out_h, out_w) = im2col_nhwc(x, ksize, stride, padding, pad_value)
    return gemm_u8s8s32(cols, b, "vnni", path).reshape(x.shape[0], out_h, out_w, k_out)
