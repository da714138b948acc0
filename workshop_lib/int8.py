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
from . import runtime
from .kernels import im2col_nhwc

__all__ = [
    "SEMANTICS",
    "vnni_isa",
    "describe_isa",
    "fused_isa",
    "saturate_s16",
    "maddubs_pair",
    "gemm_u8s8s32",
    "gemm_s16s16s32",
    "pack_weights",
    "PackedWeights",
    "conv2d_u8s8s32",
    "FusedWeights",
    "pack_fused_weights",
    "conv2d_u8s8u8_fused",
    "gemm_u8s8u8_fused",
    "gemm_u8s8f32_fused",
]

SEMANTICS = ("vnni", "avx512bw")
PATHS = ("auto", "fast", "portable", "reference", "amx")  # "amx": tdpbusd tiles (workshop_lib.amx), u8 x s8 only


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


# aarch64's peers of vpdpbusd: usdot (i8mm: u8 x s8, VNNI's arithmetic) and sdot (dotprod: s8 x s8, used with a
# sign fix), each on 128-bit vectors: 4 s32 lanes, 16 bytes
_ARM_DOT = {"usdot", "sdot"}


def _dot_call(builder, instruction, lanes, acc, a_vec, b_vec):
    """``acc + dot(a, b)`` per 32-bit lane: one vpdpbusd / vpdpwssd (x86) or usdot / sdot (aarch64) call."""
    vec = ir.VectorType(ir.IntType(32), lanes)
    if instruction in _ARM_DOT:
        bytes_ = ir.VectorType(ir.IntType(8), lanes * 4)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, bytes_, bytes_]),
                                            f"llvm.aarch64.neon.{instruction}.v{lanes}i32.v{lanes * 4}i8")
        return builder.call(fn, [acc, builder.bitcast(a_vec, bytes_), builder.bitcast(b_vec, bytes_)])
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                        f"llvm.x86.avx512.{instruction}.{lanes * 32}")
    return builder.call(fn, [acc, a_vec, b_vec])


@functools.lru_cache(maxsize=None)
def _tile_intrinsic(instruction: str, lanes: int):
    """An intrinsic computing C[r0:r0+MR, c0:c0+NV*lanes] += A32[r0:, g0:g1] . Bp[panel, g0:g1].

    A32 holds A with each 4-byte group of K (4 u8, or 2 s16) read as one int32;
    Bp holds B packed so that one group of K for NV*lanes columns is contiguous.
    The accumulators live in allocas that LLVM promotes to vector registers.
    """
    vec = ir.VectorType(ir.IntType(32), lanes)
    i64 = ir.IntType(64)

    @intrinsic
    def tile(typingctx, c, a32, bp, row0, col0, g0, g1):
        sig = types.void(c, a32, bp, row0, col0, g0, g1)

        def codegen(context, builder, signature, args):
            c_arr = context.make_array(signature.args[0])(context, builder, args[0])
            a_arr = context.make_array(signature.args[1])(context, builder, args[1])
            b_arr = context.make_array(signature.args[2])(context, builder, args[2])
            row0, col0, g0, g1 = args[3:]
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
                        builder.store(_dot_call(builder, instruction, lanes, builder.load(accs[r][v]), a_vec,
                                                b_vecs[v]), accs[r][v])
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
        n_tiles = a32.shape[0] // _MR
        n_threads = numba.get_num_threads()
        # each thread owns a share of the row tiles and sweeps one block of K at a time over all of them, so
        # that block's slice of B (_KC groups x all panels) is read from memory once per thread and then from
        # L2, not once per row tile (a long K, as 64 x 3136 x 1024, re-streamed B for every tile)
        for th in numba.prange(n_threads):
            t0, t1 = th * n_tiles // n_threads, (th + 1) * n_tiles // n_threads
            for g0 in range(0, n_groups, _KC):
                g1 = min(n_groups, g0 + _KC)
                for mt in range(t0, t1):
                    for p in range(n_panels):
                        tile(c, a32, bp, np.int64(mt * _MR), np.int64(p * cols), np.int64(g0), np.int64(g1))

    return gemm


def vnni_isa():
    """The VNNI flavour numba compiles for here: ``"avx512_vnni"`` (16 lanes), ``"avx_vnni"`` (8 lanes), on aarch64
    ``"i8mm"`` (``usdot``) or ``"dotprod"`` (``sdot`` with a sign fix), 4 lanes each, or None.

    Chosen from :func:`workshop_lib.sysinfo.target_features` (the compile target, ``NUMBA_CPU_NAME`` and
    ``NUMBA_CPU_FEATURES`` honoured, checked against the OS), never from /proc/cpuinfo alone: an intrinsic
    the target lacks aborts the interpreter inside LLVM.
    """
    from .sysinfo import target_has

    if target_has("avx512_vnni", "avx512f"):
        return "avx512_vnni"
    if target_has("avx_vnni"):
        return "avx_vnni"
    if target_has("i8mm"):
        return "i8mm"  # aarch64 usdot: VNNI's arithmetic on 4 lanes
    if target_has("dotprod"):
        return "dotprod"  # aarch64 sdot with the sign fix
    return None


def fused_isa():
    """The VNNI flavour the fused layers compile for (x86 only: ``"avx512_vnni"``, ``"avx_vnni"``), or None."""
    isa = vnni_isa()
    return isa if isa in _X86_ISAS else None


def _no_vnni_reason():
    from .sysinfo import compile_target

    target = compile_target()
    return (f"numba compiles for {target['cpu_name']!r} ({target['cpu_source']}; features: "
            f"{target['features_source']}), which has neither avx512_vnni nor avx_vnni")


_ISA_LANES = {"avx512_vnni": 16, "avx_vnni": 8, "i8mm": 4, "dotprod": 4}
_X86_ISAS = ("avx512_vnni", "avx_vnni")
_U8S8_INSTRUCTION = {"avx512_vnni": "vpdpbusd", "avx_vnni": "vpdpbusd", "i8mm": "usdot", "dotprod": "sdot"}


def _lanes(isa):
    return _ISA_LANES[check.option(isa, "isa", tuple(_ISA_LANES))]


def describe_isa(isa):
    """How the int8 kernels run on ``isa`` (a :func:`vnni_isa` answer), in words: instruction, ISA and lanes.

    Parameters
    ----------
    isa : str or None
        ``"avx512_vnni"``, ``"avx_vnni"``, ``"i8mm"``, ``"dotprod"``, or None (the portable path).

    Returns
    -------
    str or None
        E.g. ``"vpdpbusd (avx512_vnni, 16 lanes)"``; None for the portable path.
    """
    if isa is None:
        return None
    return f"{_U8S8_INSTRUCTION[isa]} ({isa}, {_lanes(isa)} lanes)"


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
            raise ValueError(f"lanes={lanes!r} must be 16 (avx512_vnni), 8 (avx_vnni) or 4 (aarch64 i8mm, dotprod)")
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
        raise RuntimeError(f"no VNNI to pack for: {_no_vnni_reason()}; use path='portable'")
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
        isa = vnni_isa()
        if not (x.lanes == _ISA_LANES.get(isa) or (isa == "avx512_vnni" and x.lanes == 8)):
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


def pad_k(x, axis, multiple):
    extra = -x.shape[axis] % multiple
    if not extra:
        return np.ascontiguousarray(x)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, extra)
    return np.pad(x, pad)


def _run_fast(a, b_packed, instruction):
    m_size, k_size = a.shape
    per_group = 4 // a.dtype.itemsize
    a = pad_k(a, 1, per_group)
    mp = -(-m_size // _MR) * _MR
    if mp != m_size or a.shape[1] != b_packed.data.shape[1] * per_group:
        padded = np.zeros((mp, b_packed.data.shape[1] * per_group), dtype=a.dtype)
        padded[:m_size, : a.shape[1]] = a
        a = padded
    if instruction == "sdot":  # s8 x s8 only: (a - 128) . b + 128 * sum(b) = a . b, exactly, modulo 2**32
        a = a ^ np.uint8(0x80)
    a32 = np.ascontiguousarray(a).view(np.int32)
    c = np.zeros((mp, b_packed.data.shape[0] * b_packed.data.shape[2]), dtype=np.int32)
    _fast_gemm(instruction, b_packed.lanes)(a32, b_packed.data, c)
    if instruction == "sdot":
        c += _sign_fix(b_packed)
    return c[:m_size, : b_packed.shape[1]]


def _sign_fix(b_packed):
    """128 * (column sums of B), as wrapping s32: what sdot's offset activations leave out."""
    p, g, cols = b_packed.data.shape
    sums = b_packed.data.view(np.int8).reshape(p, g, cols, 4).sum(axis=(1, 3), dtype=np.int64).reshape(-1)
    return ((sums * 128) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _resolve_path(path, amx_ok=False):
    if path not in PATHS:
        raise ValueError(f"path={path!r} must be one of {PATHS}")
    if path == "amx" and not amx_ok:
        raise ValueError("path='amx' is for u8 x s8 (tdpbusd) with b an int8 matrix (not PackedWeights): "
                         "gemm_u8s8s32 and conv2d_u8s8s32")
    if amx_ok and path == "amx":  # raises, with the reason, where the tiles are unusable
        return "amx", None
    # "auto" does not pick AMX yet: the tile path is tested against its numpy model and compiled for
    # sapphirerapids, but it has not run on an AMX CPU; until it has, auto stays on VNNI (path="amx" asks for it)
    isa = vnni_isa()
    if path == "auto":
        return ("fast", isa) if isa else ("portable", None)
    if path == "fast" and isa is None:
        raise RuntimeError(f"path='fast' needs avx512_vnni or avx_vnni: {_no_vnni_reason()}; use 'portable'")
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
    path : {"auto", "fast", "portable", "reference", "amx"}
        Which kernel computes ``"vnni"``: the real VNNI instruction (``"fast"``,
        the default where the CPU has it), plain numba loops, or the reference.
        ``"amx"``: AMX tiles (``tdpbusd``, :mod:`workshop_lib.amx`) where the CPU has AMX-INT8 and Linux grants
        the tile state, ``RuntimeError`` elsewhere; ``"auto"`` does not pick it yet (not run on AMX hardware).
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
        _gemm_u8s8s32_avx512bw_reference(pad_k(a, 1, 4), pad_k(b, 0, 4), c)
        return c
    path, isa = _resolve_path(path, amx_ok=not isinstance(b, PackedWeights))
    if path == "amx":
        from .amx import gemm_u8s8s32_amx

        return gemm_u8s8s32_amx(np.ascontiguousarray(a), np.ascontiguousarray(b))
    runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
    if path == "fast":
        packed = b if isinstance(b, PackedWeights) else PackedWeights(b, _lanes(isa))
        return _run_fast(a, packed, _U8S8_INSTRUCTION[isa])
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    if path == "portable":
        _gemm_int_portable(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    else:
        _gemm_u8s8s32_vnni_reference(pad_k(a, 1, 4), pad_k(b, 0, 4), c)
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
    if path == "fast" and isa not in _X86_ISAS:  # vpdpwssd has no aarch64 peer
        if isinstance(b, PackedWeights):
            raise RuntimeError(f"s16 x s16 has no fast path on {isa}: pass the int16 matrix instead")
        path = "portable"
    runtime.yield_blas()
    if path == "fast":
        packed = b if isinstance(b, PackedWeights) else PackedWeights(b, _lanes(isa))
        return _run_fast(a, packed, "vpdpwssd")
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    if path == "portable":
        _gemm_int_portable(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
    else:
        _gemm_s16s16s32_reference(pad_k(a, 1, 2), pad_k(b, 0, 2), c)
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


# ----------------------------------------------------------------------------------------------
# Fused int8 layers: u8 in, u8 out. Each output tile is accumulated over the whole of K in s32
# registers, then max-pooled, biased, requantized, clamped (the fused ReLU) and stored as u8 in the
# same pass, so the s32 accumulators never reach memory (oneDNN's "output stage", fused).
#
# The output stage is the one of :func:`workshop_lib.quantization.requantize`, bit for bit:
#   v = rint((acc + bias) * multiplier) + zero_point, clamped to [max(zero_point, 0) if relu else 0, 255].
# Max-pooling runs on the s32 accumulators before the output stage: the stage is monotonic
# (multiplier > 0), so max then requantize equals requantize then max, at a quarter of the work.


def _panel_vectors(n_size, lanes):
    """Vectors of output channels per weight panel: up to 4 (24 or 16 accumulators stay in registers)."""
    return max(1, min(4, -(-n_size // lanes)))


def _pack_panels(b, cols):
    """(K, N) s8 -> int32 (P, G, cols): for each panel of ``cols`` columns, group g of K (4 bytes) per column."""
    k_size, n_size = b.shape
    kp, np_ = -(-k_size // 4) * 4, -(-n_size // cols) * cols
    padded = np.zeros((kp, np_), dtype=np.int8)
    padded[:k_size, :n_size] = b
    blocked = padded.reshape(kp // 4, 4, np_ // cols, cols).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocked).view(np.int32).reshape(np_ // cols, kp // 4, cols)


class FusedWeights:
    """s8 weights of one layer packed once for the fused kernels, with the layer's geometry.

    ``kind`` is ``"fc"`` for a (K, N) matrix or ``"conv"`` for HWIO (R, S, C, K). A convolution
    whose C is not a multiple of 4 (conv1 of MNIST: C = 1) is stored as an (R, 1, C', K)
    convolution, C' = S*C rounded up to 4 (``expand``): in NHWC each of the R rows of a
    receptive field is one contiguous run of S*C bytes, which the kernel reads as C' bytes
    (the bytes past the last tap meet zero weights), so no im2col copy is needed.
    """

    def __init__(self, w, lanes):
        w = np.asarray(w)
        if w.ndim == 2:
            self.kind, self.ksize, self.in_channels, self.expand = "fc", None, w.shape[0], False
            b = w
        else:
            r, s, c, _ = w.shape
            self.kind, self.ksize, self.in_channels = "conv", (r, s), c
            self.expand = c % 4 != 0
            if self.expand:
                wide = np.zeros((r, 1, -(-s * c // 4) * 4, w.shape[3]), dtype=np.int8)
                wide[:, 0, : s * c] = w.reshape(r, s * c, w.shape[3])
                w = wide
            b = w.reshape(-1, w.shape[-1])
        self.out_channels = b.shape[1]
        self.nv, self.lanes = _panel_vectors(self.out_channels, lanes), lanes
        self.data = _pack_panels(b, self.nv * lanes)
        self.padded_channels = self.data.shape[0] * self.data.shape[2]
        # the kernel's view of the layer: n_seg runs of groups_per_seg 4-byte groups
        self.segments = 1 if self.kind == "fc" else w.shape[0]
        self.groups_per_segment = self.data.shape[1] // self.segments


def pack_fused_weights(w, isa=None) -> FusedWeights:
    """Pack int8 weights, (K, N) for an FC layer or HWIO (R, S, C, K) for a convolution, for the fused kernels.

    Parameters
    ----------
    w : int8 array, 2-D (K, N) or 4-D (R, S, C, K)
    isa : {"avx512_vnni", "avx_vnni"}, optional
        The VNNI flavour to pack for (16 or 8 lanes); this CPU's by default.

    Returns
    -------
    FusedWeights
    """
    if isa is not None and isa not in ("avx512_vnni", "avx_vnni"):
        raise ValueError(f"isa={isa!r} must be 'avx512_vnni' or 'avx_vnni'")
    have = fused_isa()
    if isa is None and have is None:
        raise RuntimeError(f"the fused kernels need avx512_vnni or avx_vnni: {_no_vnni_reason()}; use path='portable'")
    if isa is not None and isa != have and not (isa == "avx_vnni" and have == "avx512_vnni"):
        raise RuntimeError(f"isa={isa!r} cannot be compiled here: numba's target offers {have or 'no VNNI'}")
    isa = isa or have
    w = np.asarray(w)
    if w.dtype != np.int8 or w.ndim not in (2, 4):
        raise TypeError(f"w must be int8, (K, N) or HWIO (R, S, C, K); got dtype={w.dtype}, shape={w.shape}")
    if 0 in w.shape:
        raise ValueError(f"w.shape={w.shape} must have no empty axis")
    return FusedWeights(w, _lanes(isa))


def _splat(builder, value, vec):
    undef = ir.Constant(vec, None)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


@functools.lru_cache(maxsize=None)
def _fused_tile_intrinsic(rows: int, cols_per_row: int, nv: int, lanes: int, pool: int, out_kind: str):
    """An intrinsic for one output tile of rows x cols_per_row pixels (or matrix rows) x nv*lanes channels.

    tile(x, bp, bias, mult, out, a0, a_row, a_col, o0, o_row, o_col, panel, col0, n_seg, seg_stride,
         groups, zero_point, lo, hi)

    Pixel (i, j) of the tile reads its receptive field at byte x + a0 + i*a_row + j*a_col: n_seg runs
    (one per kernel row) seg_stride bytes apart, each of ``groups`` 4-byte groups, against weight
    panel ``panel`` of bp (P, G, nv*lanes). Output (i, j) goes to byte out + o0 + i*o_row + j*o_col;
    with pool == 2, the tile is 2 rows and output j is the max of pixels (0|1, 2j|2j+1). ``out_kind``
    "u8" stores the requantized u8 values; "f32" stores (acc + bias) * mult as float32.
    """
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    vec = ir.VectorType(i32, lanes)
    dvec = ir.VectorType(ir.DoubleType(), lanes)
    n_pix = rows * cols_per_row

    @intrinsic
    def tile(typingctx, x, bp, bias, mult, out, a0, a_row, a_col, o0, o_row, o_col, panel, col0, n_seg,
             seg_stride, groups, zero_point, lo, hi):
        sig = types.void(x, bp, bias, mult, out, a0, a_row, a_col, o0, o_row, o_col, panel, col0, n_seg,
                         seg_stride, groups, zero_point, lo, hi)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:5], args[:5])]
            x_base, b_base, bias_base, mult_base, out_base = (builder.ptrtoint(a.data, i64) for a in arrays)
            a0, a_row, a_col, o0, o_row, o_col, panel, col0, n_seg, seg_stride, groups = args[5:16]
            zero_point, lo, hi = args[16:]
            b_strides = cgutils.unpack_tuple(builder, arrays[1].strides, 3)
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.x86.avx512.vpdpbusd.{lanes * 32}")
            const = lambda v: ir.Constant(i64, v)  # noqa: E731
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, [0] * lanes)) for _ in range(nv)]
                    for _ in range(n_pix)]
            pix = [builder.add(builder.add(x_base, a0), builder.add(builder.mul(const(i), a_row),
                                                                     builder.mul(const(j), a_col)))
                   for i in range(rows) for j in range(cols_per_row)]
            b_panel = builder.add(b_base, builder.mul(panel, b_strides[0]))
            with cgutils.for_range(builder, n_seg) as seg_loop:
                seg = seg_loop.index
                seg_off = builder.mul(seg, seg_stride)
                g_first = builder.mul(seg, groups)
                with cgutils.for_range(builder, groups) as loop:
                    g = loop.index
                    b_row = builder.add(b_panel, builder.mul(builder.add(g_first, g), b_strides[1]))
                    b_vecs = [builder.load(builder.inttoptr(builder.add(b_row, const(v * lanes * 4)),
                                                            vec.as_pointer()), align=4) for v in range(nv)]
                    a_off = builder.add(seg_off, builder.mul(g, const(4)))
                    for p in range(n_pix):
                        a_val = builder.load(builder.inttoptr(builder.add(pix[p], a_off), i32.as_pointer()), align=1)
                        a_vec = _splat(builder, a_val, vec)
                        for v in range(nv):
                            builder.store(builder.call(dot, [builder.load(accs[p][v]), a_vec, b_vecs[v]]),
                                          accs[p][v])
            if pool == 2:
                outputs = []
                for j in range(cols_per_row // 2):
                    members = [i * cols_per_row + 2 * j + dj for i in range(2) for dj in range(2)]
                    outputs.append((0, j, members))
            else:
                outputs = [(i, j, [i * cols_per_row + j]) for i in range(rows) for j in range(cols_per_row)]
            itemsize = 1 if out_kind == "u8" else 4
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(dvec, [dvec]),
                                                  f"llvm.rint.v{lanes}f64")
            splat_d = lambda value: _splat(builder, value, dvec)  # noqa: E731
            zp_v, lo_v, hi_v = splat_d(zero_point), splat_d(lo), splat_d(hi)
            for v in range(nv):
                chan = builder.add(col0, const(v * lanes))
                bias_v = builder.load(builder.inttoptr(builder.add(bias_base, builder.mul(chan, const(8))),
                                                       dvec.as_pointer()), align=8)
                mult_v = builder.load(builder.inttoptr(builder.add(mult_base, builder.mul(chan, const(8))),
                                                       dvec.as_pointer()), align=8)
                for i, j, members in outputs:
                    acc = builder.load(accs[members[0]][v])
                    for m in members[1:]:
                        other = builder.load(accs[m][v])
                        acc = builder.select(builder.icmp_signed(">", other, acc), other, acc)
                    value = builder.fmul(builder.fadd(builder.sitofp(acc, dvec), bias_v), mult_v)
                    dst = builder.add(builder.add(out_base, o0), builder.add(
                        builder.mul(const(i), o_row), builder.mul(const(j), o_col)))
                    dst = builder.add(dst, const(v * lanes * itemsize))
                    if out_kind == "u8":
                        value = builder.fadd(builder.call(rint, [value]), zp_v)
                        value = builder.select(builder.fcmp_ordered("<", value, lo_v), lo_v, value)
                        value = builder.select(builder.fcmp_ordered(">", value, hi_v), hi_v, value)
                        small = builder.trunc(builder.fptosi(value, vec), ir.VectorType(i8, lanes))
                        builder.store(small, builder.inttoptr(dst, small.type.as_pointer()), align=1)
                    else:
                        single = builder.fptrunc(value, ir.VectorType(ir.FloatType(), lanes))
                        builder.store(single, builder.inttoptr(dst, single.type.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_A_BLOCK_BYTES = 256 * 1024  # rows of A per block in the fused GEMM: a quarter of a 1 MB L2


def _fc_rows(nv):
    """Matrix rows per FC tile: as many as the 32 vector registers allow beside nv weight vectors."""
    return min(8, 27 // nv)


def _conv_tile_width(nv):
    """Pixels per tile row (the tile is 2 rows, so that a 2x2 max-pool closes inside it)."""
    return 2 if nv == 4 else 4


@functools.lru_cache(maxsize=None)
def _fused_gemm_driver(nv: int, lanes: int, out_kind: str):
    rows = _fc_rows(nv)
    tile = _fused_tile_intrinsic(rows, 1, nv, lanes, 1, out_kind)
    cols = nv * lanes
    itemsize = 1 if out_kind == "u8" else 4

    @numba.njit(cache=False)
    def block(a, bp, bias, mult, out, p0, p1, t0, t1, zero_point, lo, hi):  # panels [p0, p1) x row tiles [t0, t1)
        m_size, n_groups = a.shape[0], bp.shape[1]
        a_row, o_row = a.strides[0], out.strides[0]
        # rows in blocks that stay in L2 while this thread's weight panels pass over them
        block_tiles = max(1, _A_BLOCK_BYTES // (rows * a.shape[1]))
        for b0 in range(t0, t1, block_tiles):
            for p in range(p0, p1):
                for t in range(b0, min(t1, b0 + block_tiles)):
                    r0 = min(t * rows, m_size - rows)  # the last tile overlaps the one before it
                    tile(a, bp, bias, mult, out, np.int64(r0 * a_row), np.int64(a_row), np.int64(0),
                         np.int64(r0 * o_row + p * cols * itemsize), np.int64(o_row), np.int64(0), np.int64(p),
                         np.int64(p * cols), np.int64(1), np.int64(0), np.int64(n_groups), zero_point, lo, hi)

    @numba.njit(parallel=True, cache=False)
    def run(a, bp, bias, mult, out, zero_point, lo, hi):  # IN a (M >= rows, 4G) u8; OUT out (M, P*cols)
        n_panels = bp.shape[0]
        n_tiles = (a.shape[0] + rows - 1) // rows
        n_threads = numba.get_num_threads()
        # each thread takes a share of the weight panels (or, with fewer panels than threads, of the rows)
        by_panels = n_panels >= n_threads
        for th in numba.prange(n_threads):
            if by_panels:
                block(a, bp, bias, mult, out, th * n_panels // n_threads, (th + 1) * n_panels // n_threads,
                      0, n_tiles, zero_point, lo, hi)
            else:
                block(a, bp, bias, mult, out, 0, n_panels, th * n_tiles // n_threads,
                      (th + 1) * n_tiles // n_threads, zero_point, lo, hi)

    return run


@numba.njit(cache=True)
def _fill_border(out, out_pad, value):  # OUT out (H + 2*pad, W + 2*pad, K): the border only
    if out_pad == 0:
        return
    h_size, w_size = out.shape[0], out.shape[1]
    for h in range(h_size):
        for w in range(w_size):
            if h < out_pad or h >= h_size - out_pad or w < out_pad or w >= w_size - out_pad:
                out[h, w, :] = value


@functools.lru_cache(maxsize=None)
def _fused_conv_driver(nv: int, lanes: int, pool: int):
    tw = _conv_tile_width(nv)
    tile = _fused_tile_intrinsic(2, tw, nv, lanes, pool, "u8")
    cols = nv * lanes

    @numba.njit(cache=False)
    def image(src, bp, bias, mult, out, n_seg, groups, out_h, out_w, out_pad, zero_point, lo, hi):
        # IN src (out_h + R - 1, W', C) u8, padded; OUT out (H'', W'', K) u8: one image
        _fill_border(out, out_pad, np.uint8(zero_point))
        s_row, s_col = src.strides[0], src.strides[1]
        o_row, o_col = out.strides[0], out.strides[1]
        for oh0 in range(0, out_h, 2):
            oh = min(oh0, out_h - 2)
            for ow0 in range(0, out_w, tw):
                ow = min(ow0, out_w - tw)  # the last tile overlaps the one before it
                if pool == 2:
                    o0 = (oh // 2 + out_pad) * o_row + (ow // 2 + out_pad) * o_col
                else:
                    o0 = (oh + out_pad) * o_row + (ow + out_pad) * o_col
                for p in range(bp.shape[0]):
                    tile(src, bp, bias, mult, out, np.int64(oh * s_row + ow * s_col), np.int64(s_row),
                         np.int64(s_col), np.int64(o0 + p * cols), np.int64(o_row), np.int64(o_col), np.int64(p),
                         np.int64(p * cols), np.int64(n_seg), np.int64(s_row), np.int64(groups), zero_point, lo, hi)

    @numba.njit(parallel=True, cache=False)
    def run(x, bp, bias, mult, out, r_size, groups, out_h, out_w, out_pad, zero_point, lo, hi):
        # IN x (N, out_h + R - 1, W', C) u8, padded; OUT out (N, H'', W'', K) u8
        for n in numba.prange(x.shape[0]):
            image(x[n], bp, bias, mult, out[n], r_size, groups, out_h, out_w, out_pad, zero_point, lo, hi)

    return run


def _fused_output_stage(packed, bias, multiplier, zero_point, relu):
    """bias and multiplier as float64 vectors over the padded channels; the clamp bounds of the u8 output."""
    k, kp = packed.out_channels, packed.padded_channels
    bias = np.asarray(bias)
    if not np.issubdtype(bias.dtype, np.integer) or bias.shape not in ((), (k,)):
        raise TypeError(f"bias must be integers (s32, at the accumulator's scale) of shape () or ({k},); "
                        f"got dtype={bias.dtype}, shape={bias.shape}")
    if bias.size and (bias.min() < -(2**31) or bias.max() > 2**31 - 1):
        raise ValueError(f"bias must fit in int32; got values in [{bias.min()}, {bias.max()}]")
    multiplier = np.asarray(multiplier, dtype=np.float64)
    if multiplier.shape not in ((), (k,)) or not (np.isfinite(multiplier).all() and (multiplier > 0).all()):
        got = f"shape {multiplier.shape}"
        if multiplier.size:
            got += f", values in [{multiplier.min()}, {multiplier.max()}]"
        raise ValueError(f"multiplier must be finite and > 0, of shape () or ({k},); got {got}")
    if not (isinstance(zero_point, (int, np.integer)) and 0 <= zero_point <= 255):
        raise ValueError(f"zero_point={zero_point!r} must be an integer in [0, 255] (a u8 zero point)")
    bias_f64, mult_f64 = np.zeros(kp), np.ones(kp)
    bias_f64[:k], mult_f64[:k] = bias, multiplier
    lo = float(max(zero_point, 0)) if relu else 0.0
    return bias_f64, mult_f64, float(zero_point), lo, 255.0


def _check_fused(packed, kind):
    if not isinstance(packed, FusedWeights) or packed.kind != kind:
        what = "an HWIO convolution" if kind == "conv" else "a (K, N) matrix"
        raise TypeError(f"w must be FusedWeights of {what} from pack_fused_weights; got {type(packed).__name__}"
                        + (f" of kind {packed.kind!r}" if isinstance(packed, FusedWeights) else ""))


def _check_u8(x, name, ndim, layout):
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != ndim:
        raise TypeError(f"{name} must be uint8 {layout}; got dtype={x.dtype}, shape={x.shape}")
    return x


def conv2d_u8s8u8_fused(x, w, bias, multiplier, zero_point=0, relu=True, pool=1, padding="SAME", pad_value=0,
                        out_pad=0):
    """One int8 convolution layer in one pass: conv (stride 1) + bias + ReLU + requantize (+ 2x2 max-pool) -> u8.

    Each tile of outputs is accumulated in s32 registers with ``vpdpbusd``; the output stage
    (:func:`workshop_lib.quantization.requantize`'s, bit for bit) and the pooling run on those
    registers, and only u8 reaches memory.

    Parameters
    ----------
    x : uint8 array (N, H, W, C), NHWC
    w : FusedWeights
        HWIO weights from :func:`pack_fused_weights`.
    bias : integer array (K,) or scalar
        Bias in s32 at the accumulator's scale.
    multiplier : float array (K,) or scalar, > 0
        Accumulator scale / output scale.
    zero_point : int in [0, 255]
        The output's zero point; also the value of the border written with ``out_pad``.
    relu : bool
        Clamp at the zero point (a fused ReLU).
    pool : {1, 2}
        2: a 2x2 max-pool with stride 2 follows (output height and width must be even).
    padding : {"SAME", "VALID"}
    pad_value : int
        What padded input pixels hold: the input's zero point.
    out_pad : int
        Width of a border of ``zero_point`` around the output, so that the next layer can read it
        with ``padding="VALID"`` without a copy.

    Returns
    -------
    uint8 array (N, H' + 2*out_pad, W' + 2*out_pad, K), H' = H / pool (SAME) or (H - R + 1) / pool (VALID).
    """
    _check_fused(w, "conv")
    x = _check_u8(x, "x", 4, "NHWC (N, H, W, C)")
    if x.shape[3] != w.in_channels:
        raise ValueError(f"x.shape[3]={x.shape[3]} (input channels) must equal the weights' C={w.in_channels}")
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding={padding!r} must be 'SAME' or 'VALID'")
    if pool not in (1, 2):
        raise ValueError(f"pool={pool!r} must be 1 (none) or 2 (a 2x2 max-pool with stride 2)")
    if not (isinstance(out_pad, (int, np.integer)) and out_pad >= 0):
        raise ValueError(f"out_pad={out_pad!r} must be an integer >= 0")
    if not (isinstance(pad_value, (int, np.integer)) and 0 <= pad_value <= 255):
        raise ValueError(f"pad_value={pad_value!r} must be an integer in [0, 255]")
    bias_f64, mult_f64, zp, lo, hi = _fused_output_stage(w, bias, multiplier, zero_point, relu)
    (r, s), (n_size, h, wd, _) = w.ksize, x.shape
    pt, pl = ((r - 1) // 2, (s - 1) // 2) if padding == "SAME" else (0, 0)
    out_h, out_w = (h, wd) if padding == "SAME" else (h - r + 1, wd - s + 1)
    tw = _conv_tile_width(w.nv)
    if out_h < 2 or out_w < tw:
        raise ValueError(f"the fused kernel needs an output of at least 2 x {tw} pixels; got {out_h} x {out_w}")
    if pool == 2 and (out_h % 2 or out_w % 2):
        raise ValueError(f"pool=2 needs an even output height and width; got {out_h} x {out_w}")
    # an expanded convolution reads C' bytes from each pixel on: a few beyond the last tap (times zero weights)
    extra = -(-w.groups_per_segment * 4 // w.in_channels) - s if w.expand else 0
    pads = ((pt, r - 1 - pt), (pl, s - 1 - pl + extra)) if padding == "SAME" else ((0, 0), (0, extra))
    if any(p for pair in pads for p in pair):
        x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
    x = np.ascontiguousarray(x)
    runtime.yield_blas()
    out = np.empty((n_size, out_h // pool + 2 * out_pad, out_w // pool + 2 * out_pad, w.padded_channels), np.uint8)
    _fused_conv_driver(w.nv, w.lanes, pool)(x, w.data, bias_f64, mult_f64, out, r, w.groups_per_segment, out_h,
                                            out_w, out_pad, zp, lo, hi)
    return out if w.padded_channels == w.out_channels else out[..., : w.out_channels]


def _fused_gemm(a, w, bias_f64, mult_f64, out_dtype, zp, lo, hi, out_kind):
    m_size = a.shape[0]
    rows = _fc_rows(w.nv)
    k_padded = w.data.shape[1] * 4
    if m_size < rows or a.shape[1] != k_padded or not a.flags.c_contiguous:
        padded = np.zeros((max(m_size, rows), k_padded), dtype=np.uint8)
        padded[:m_size, : a.shape[1]] = a
        a = padded
    out = np.empty((a.shape[0], w.padded_channels), dtype=out_dtype)
    runtime.yield_blas()
    _fused_gemm_driver(w.nv, w.lanes, out_kind)(a, w.data, bias_f64, mult_f64, out, zp, lo, hi)
    return out[:m_size, : w.out_channels]


def _check_fc_input(a, w):
    _check_fused(w, "fc")
    a = _check_u8(a, "a", 2, "(M, K)")
    if a.shape[1] != w.in_channels:
        raise ValueError(f"a.shape[1]={a.shape[1]} must equal the weights' K={w.in_channels}")
    return a


def gemm_u8s8u8_fused(a, w, bias, multiplier, zero_point=0, relu=True):
    """An int8 FC layer in one pass: u8 (M, K) x packed s8 (K, N) + bias, requantized (+ ReLU) to u8 (M, N).

    The arguments mean what they mean in :func:`conv2d_u8s8u8_fused`; the result equals
    ``requantize(gemm_u8s8s32(a, w), ...)`` bit for bit.
    """
    a = _check_fc_input(a, w)
    bias_f64, mult_f64, zp, lo, hi = _fused_output_stage(w, bias, multiplier, zero_point, relu)
    return _fused_gemm(a, w, bias_f64, mult_f64, np.uint8, zp, lo, hi, "u8")


def gemm_u8s8f32_fused(a, w, bias, scale):
    """The last layer: u8 (M, K) x packed s8 (K, N) -> float32 ``(acc + bias) * scale`` (the logits).

    ``scale`` is the accumulator's scale (input scale x weight scale, scalar or per column).
    """
    a = _check_fc_input(a, w)
    bias_f64, scale_f64, _, _, _ = _fused_output_stage(w, bias, scale, 0, False)
    return _fused_gemm(a, w, bias_f64, scale_f64, np.float32, 0.0, 0.0, 0.0, "f32")
