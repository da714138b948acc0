"""bfloat16 with the exact arithmetic of DL Boost's second generation (AVX512_BF16: Cooper Lake, Zen 4).

bf16 is float32 with the low 16 bits of the mantissa cut off: the same 8-bit exponent (the same range,
1e-38 to 3e38, so no loss scaling is needed), 8 significant bits instead of 24. Two instructions:

- ``vcvtne2ps2bf16``: 2 x 16 float32 -> 32 bf16, rounding to nearest even; a NaN stays a NaN (made quiet:
  bit 6 of the bf16 set, the low payload bits dropped); a denormal input becomes a zero of its sign.
- ``vdpbf16ps acc, a, b``: for each of the 16 float32 lanes j,
  ``acc[j] = acc[j] + a[2j+1]*b[2j+1]``, then ``acc[j] = acc[j] + a[2j]*b[2j]``: the odd pair first, each
  product exact (two 8-bit significands), each addition rounded once to float32 (nearest even), denormal
  inputs read as zero and denormal results flushed to a zero of their sign (MXCSR is not read). Twice the
  multiply-adds of an fp32 FMA per instruction.

:func:`to_bf16`, :func:`dpbf16ps` and :func:`gemm_reference` spell this out in numpy (the specification;
it was checked bit for bit against the instruction on an AMD EPYC Zen 4, including infinities, NaNs and
denormals). :func:`gemm_bf16` computes C = A @ B three ways with identical bits: ``"fast"`` issues
``vdpbf16ps`` from a register-blocked micro-kernel (numba ``@intrinsic``, as :mod:`workshop_lib.int8`
does for ``vpdpbusd``), ``"emulated"`` runs the same arithmetic in plain numba where numba's target lacks
AVX512_BF16, ``"reference"`` is the numpy loop. :func:`gemm_f32` is the fp32 kernel of the same shape
(FMA instead of ``vdpbf16ps``): the like-for-like baseline of the bf16 speed-up.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import _validate as check

__all__ = ["PATHS", "TYPE_TABLE", "to_bf16", "from_bf16", "round_bf16", "dpbf16ps", "gemm_reference",
           "compile_target_features", "bf16_isa", "instructions", "bf16_path", "describe_path", "PackedBF16", "pack_bf16", "gemm_bf16",
           "gemm_f32", "conv2d_bf16", "conv2d_backward_bf16"]

PATHS = ("auto", "fast", "emulated", "reference", "amx")

_TINY = np.float32(2.0**-126)  # the smallest normal float32: anything smaller in magnitude is a denormal

# The slides' table of deep learning's number types: (bits, exponent bits, significand bits incl. the
# implicit one, smallest positive normal, largest finite, machine epsilon); int8 is an integer
TYPE_TABLE = {
    "fp32": (32, 8, 24, float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max), 2.0**-23),
    "bf16": (16, 8, 8, 2.0**-126, float((2 - 2.0**-7) * 2.0**127), 2.0**-7),
    "fp16": (16, 5, 11, float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max), 2.0**-10),
    "int8": (8, 0, 8, 1.0, 127.0, 1.0),
}


# ----------------------------------------------------------------------------------------------
# The arithmetic, in numpy (the specification)


def to_bf16(x):
    """float32 -> bf16 bits (uint16), as ``vcvtne2ps2bf16`` converts: round to nearest, ties to even.

    A NaN stays a NaN, made quiet (``bits >> 16 | 0x0040``); a denormal becomes a zero of its sign (the
    instruction treats denormal inputs as zero); a value that rounds past the largest bf16 becomes infinity.

    Parameters
    ----------
    x : array_like of float32 (float64 is first rounded to float32)

    Returns
    -------
    uint16 array of x's shape: the upper half of the rounded float32's bits
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32) if x.ndim else x.reshape(1).view(np.uint32)
    bits = np.where(np.abs(x.reshape(bits.shape)) < _TINY, bits & np.uint32(0x80000000), bits)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x.reshape(bits.shape))
    out = np.where(nan, ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return out.reshape(x.shape)


def from_bf16(bits):
    """bf16 bits (uint16) -> float32, exactly (the bits become the float32's upper half)."""
    bits = check.array(bits, "bits", dtypes=(np.uint16,))
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_bf16(x):
    """float32 rounded to the nearest bf16 (as float32): ``from_bf16(to_bf16(x))``."""
    return from_bf16(to_bf16(x))


def daz(x):
    """Denormals read as zero (of their sign), as vdpbf16ps reads its inputs."""
    return np.where(np.abs(x) < _TINY, np.copysign(np.zeros_like(x), x), x)


def add_product(acc, p):
    """acc (float32) + p (an exact float64 product), rounded once to float32; a denormal result flushed to +-0.

    float64 holds acc + p exactly while their exponents differ by less than 30; beyond that the smaller
    term lies below float32's rounding point and float64's own rounding cannot create a float32 tie, so
    rounding float64 -> float32 is the single rounding of the exact sum.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        exact = acc.astype(np.float64) + p
        rounded = exact.astype(np.float32)
    return np.where(np.abs(rounded) < _TINY, np.copysign(np.float32(0), exact).astype(np.float32), rounded)


def dpbf16ps(acc, a, b):
    """One ``vdpbf16ps``: ``acc[j] += a[2j+1]*b[2j+1]``, then ``acc[j] += a[2j]*b[2j]``, per float32 lane.

    Parameters
    ----------
    acc : float32 array (..., L)
        The accumulators (L = 16 for a zmm register; any L here).
    a, b : uint16 arrays (..., 2L)
        bf16 bits: lane j's pair is elements 2j and 2j+1.

    Returns
    -------
    float32 array (..., L): each product exact, each addition rounded to nearest even, denormal inputs
    read as zero and denormal results flushed to a zero of their sign.
    """
    acc = check.array(acc, "acc", dtypes=(np.float32,))
    a, b = check.array(a, "a", dtypes=(np.uint16,)), check.array(b, "b", dtypes=(np.uint16,))
    if a.shape != b.shape or a.shape[:-1] != acc.shape[:-1] or a.shape[-1] != 2 * acc.shape[-1]:
        raise ValueError(f"a.shape={a.shape} and b.shape={b.shape} must both be acc.shape={acc.shape} with the "
                         "last axis doubled (two bf16 per float32 lane)")
    with np.errstate(invalid="ignore"):
        products = daz(from_bf16(a)).astype(np.float64) * daz(from_bf16(b)).astype(np.float64)
    out = add_product(daz(acc), products[..., 1::2])
    return add_product(out, products[..., 0::2])


def gemm_reference(a, b, first="odd"):
    """C = A @ B with vdpbf16ps's arithmetic, K walked in pairs from the start, one accumulator per element.

    ``a`` (M, K) and ``b`` (K, N) are float32 (rounded with :func:`to_bf16` first) or uint16 bf16 bits; K is
    padded with a zero to an even length. Every element of C is the chain of roundings one lane of the
    fast kernel performs, so the fast and emulated paths must agree with this bit for bit. ``first``:
    which product of a pair is added first, ``"odd"`` (vdpbf16ps) or ``"even"`` (the order of the SDM's
    pseudo-code for AMX's tdpbf16ps, :mod:`workshop_lib.amx`).

    Returns
    -------
    float32 array (M, N)
    """
    a_bits, b_bits = _as_bits(a, "a"), _as_bits(b, "b")
    _check_inner(a_bits, b_bits)
    from .int8 import pad_k

    a_bits, b_bits = pad_k(a_bits, 1, 2), pad_k(b_bits, 0, 2)
    with np.errstate(invalid="ignore"):
        af, bf = daz(from_bf16(a_bits)).astype(np.float64), daz(from_bf16(b_bits)).astype(np.float64)
        acc = np.zeros((a_bits.shape[0], b_bits.shape[1]), dtype=np.float32)
        order = {"odd": (1, 0), "even": (0, 1)}[check.option(first, "first", ("odd", "even"))]
        for k in range(0, a_bits.shape[1], 2):
            for h in order:
                acc = add_product(acc, af[:, k + h, None] * bf[None, k + h, :])
    return acc


# ----------------------------------------------------------------------------------------------
# Which path: from the features numba compiles for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES honoured)


def compile_target_features():
    """The set of LLVM features numba compiles for in this process, e.g. ``{"avx512f", "avx512bf16", ...}``.

    The host's (``llvmlite``'s view) unless ``NUMBA_CPU_NAME`` names another CPU, in which case only what
    ``NUMBA_CPU_FEATURES`` grants counts: a kernel must never issue an instruction numba's target lacks.
    """
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):
        text = config.CPU_FEATURES or ""
    else:
        import llvmlite.binding as ll

        text = config.CPU_FEATURES if config.CPU_FEATURES is not None else ll.get_host_cpu_features().flatten()
    return {item[1:] for item in text.split(",") if item.startswith("+")}


@functools.lru_cache(maxsize=None)
def bf16_isa():
    """``"avx512_bf16"`` where numba's compile target has AVX512_BF16 (and AVX-512F), else None."""
    return "avx512_bf16" if {"avx512f", "avx512bf16"} <= compile_target_features() else None


def bf16_path(path="auto"):
    """The kernel ``path`` runs on here: ``"fast"``, ``"emulated"``, ``"reference"`` or ``"amx"``.

    ``"auto"`` is ``"fast"`` with AVX512_BF16, else ``"emulated"``. It does not pick ``"amx"`` yet: the tile
    path is tested against its numpy model and compiled for sapphirerapids, but it has not run on an AMX CPU,
    and the pair order of ``tdpbf16ps`` there is unconfirmed; ``path="amx"`` asks for it. ``"fast"`` without
    AVX512_BF16 and ``"amx"`` without AMX raise ``RuntimeError`` saying why.
    """
    check.option(path, "path", PATHS)
    if path == "amx":
        from .amx import amx_bf16_status

        usable, reason = amx_bf16_status()
        if not usable:
            raise RuntimeError(f"path='amx' needs AMX-BF16 tiles, which this process cannot use: {reason}; "
                               "use path='fast' (AVX512_BF16) or 'emulated'")
        return "amx"
    if path == "auto":
        return "fast" if bf16_isa() else "emulated"
    if path == "fast" and bf16_isa() is None:
        raise RuntimeError("path='fast' needs AVX512_BF16 (vdpbf16ps) in numba's compile target, which lacks it "
                           "(this CPU, or NUMBA_CPU_NAME/NUMBA_CPU_FEATURES); use path='emulated'")
    return path


def describe_path():
    """One line for ``workshop check``: which bf16 path ``"auto"`` runs here, and why."""
    from .amx import amx_bf16_status

    path = bf16_path("auto")
    usable, reason = amx_bf16_status()
    if path == "amx":
        return f"amx (tdpbf16ps tiles; {reason})"
    amx_note = f"; AMX: no ({reason})"
    if path == "fast":
        return "fast (vdpbf16ps: AVX512_BF16 in numba's compile target)" + amx_note
    return ("emulated (numba's compile target has no AVX512_BF16: the same roundings with fp32 arithmetic, "
            "bit-identical, slower)" + amx_note)


# ----------------------------------------------------------------------------------------------
# Conversions and packing


@numba.njit(parallel=True, cache=True)
def _to_bf16_flat(x, out):  # IN x (n,) uint32 bits of float32; OUT out (n,) uint16: to_bf16's rule
    for i in numba.prange(x.shape[0]):
        bits = x[i]
        magnitude = bits & np.uint32(0x7FFFFFFF)
        if magnitude > np.uint32(0x7F800000):  # NaN: quiet, truncated
            out[i] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
        else:
            if magnitude < np.uint32(0x00800000):  # denormal: a zero of its sign
                bits &= np.uint32(0x80000000)
            out[i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _as_bits(x, name):
    """uint16 bf16 bits as they are, float32 converted with to_bf16's rule (in parallel numba): a 2-D array."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}={x!r} must be a 2-D float32 array or uint16 bf16 bits")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}.shape={x.shape} must be 2-D")
    if x.dtype == np.uint16:
        return x
    if x.dtype != np.float32:
        raise TypeError(f"{name}.dtype={x.dtype} must be float32 (rounded to bf16 here) or uint16 (bf16 bits)")
    return convert_bf16(x)


def convert_bf16(x):
    """float32 array -> uint16 bf16 bits of its shape (to_bf16's rule, in parallel numba)."""
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint32)
    out = np.empty(flat.shape, dtype=np.uint16)
    _to_bf16_flat(flat, out)
    return out.reshape(x.shape)


def _check_inner(a, b):
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a.shape[1]={a.shape[1]} must equal b.shape[0]={b.shape[0]}")
    if 0 in a.shape or 0 in b.shape:
        raise ValueError(f"a.shape={a.shape} and b.shape={b.shape} must have no empty axis")


_MR = 6  # rows of A per micro-tile
_NV = 4  # vectors of C per micro-tile row: _MR * _NV = 24 accumulators of the 32 zmm registers
_LANES = 16  # float32 per zmm
_COLS = _NV * _LANES


class PackedBF16:
    """B (K, N) packed once for the fast bf16 kernel: for each panel of 64 columns, K in pairs.

    ``data`` is int32 (P, G, 64): element [p, g, j] holds the bf16 pair (B[2g, 64p+j], B[2g+1, 64p+j]) in its
    low and high half, which is how ``vdpbf16ps`` reads a lane. ``shape`` is B's (K, N).
    """

    def __init__(self, b):
        bits = _as_bits(b, "b")
        k_size, n_size = bits.shape
        groups, panels = (k_size + 1) // 2, -(-n_size // _COLS)
        data = np.empty((panels, groups, _COLS, 2), dtype=np.uint16)
        _pack_b_pairs(bits, data)  # any strides: B may be a transposed view
        self.data = data.view(np.int32).reshape(panels, groups, _COLS)
        self.shape = (k_size, n_size)


@numba.njit(parallel=True, cache=True)
def _pack_b_pairs(b, out):  # IN b (K, N) uint16, any strides; OUT out (P, G, 64, 2): pairs of K, zero-padded
    k_size, n_size = b.shape
    n_panels, n_groups, cols = out.shape[0], out.shape[1], out.shape[2]
    for job in numba.prange(n_panels * n_groups):
        p, g = job // n_groups, job % n_groups
        for h in range(2):
            k = 2 * g + h
            for j in range(cols):
                n = p * cols + j
                out[p, g, j, h] = b[k, n] if k < k_size and n < n_size else np.uint16(0)


@numba.njit(parallel=True, cache=True)
def _pack_a_pairs(a, out):  # IN a (M, K) uint16, any strides; OUT out (Mp, 2G): a zero-padded copy
    m_size, k_size = a.shape
    for i in numba.prange(out.shape[0]):
        for k in range(out.shape[1]):
            out[i, k] = a[i, k] if i < m_size and k < k_size else np.uint16(0)


def pack_bf16(b):
    """Pack weights B (K, N), float32 or bf16 bits, once for :func:`gemm_bf16` (pass the result as ``b``)."""
    return PackedBF16(b)


# ----------------------------------------------------------------------------------------------
# The fast kernels: a register-blocked micro-tile issuing vdpbf16ps (bf16) or an FMA (fp32)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR builder does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


BF16_VECTOR = ir.VectorType(_BFloat(), 32)  # <32 x bfloat>: one zmm of bf16


def _splat(builder, value, vec):
    undef = ir.Constant(vec, None)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


@functools.lru_cache(maxsize=None)
def _tile_intrinsic(kind: str):
    """An intrinsic computing C[row0:row0+6, panel's 64 columns] = A[row0:row0+6, :] . Bp[panel] over all of K.

    tile(c, a, bp, row0, panel): ``kind="bf16"``: a is int32 (Mp, G) (bf16 pairs), bp int32 (P, G, 64), each
    step broadcasts one pair of A per row and issues ``vdpbf16ps`` against 4 vectors of B. ``kind="f32"``:
    a is float32 (Mp, K), bp float32 (P, K, 64), each step an FMA. The 24 accumulators stay in registers
    for the whole of K (one accumulator per element, K in order: the reference's chain of roundings).
    """
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, _LANES)
    a_elem = ir.IntType(32) if kind == "bf16" else f32
    a_vec = ir.VectorType(a_elem, _LANES)

    @intrinsic
    def tile(typingctx, c, a, bp, row0, panel):
        sig = types.void(c, a, bp, row0, panel)

        def codegen(context, builder, signature, args):
            c_arr, a_arr, b_arr = (context.make_array(t)(context, builder, v)
                                   for t, v in zip(signature.args[:3], args[:3]))
            row0, panel = args[3:]
            if kind == "bf16":
                op = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                    vec, [vec, BF16_VECTOR, BF16_VECTOR]), "llvm.x86.avx512bf16.dpbf16ps.512")
            else:
                op = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                    "llvm.fma.v16f32")
            const = lambda v: ir.Constant(i64, v)  # noqa: E731
            c_strides = cgutils.unpack_tuple(builder, c_arr.strides, 2)
            a_strides = cgutils.unpack_tuple(builder, a_arr.strides, 2)
            b_strides = cgutils.unpack_tuple(builder, b_arr.strides, 3)
            n_steps = cgutils.unpack_tuple(builder, a_arr.shape, 2)[1]
            c_base, a_base, b_base = (builder.ptrtoint(x.data, i64) for x in (c_arr, a_arr, b_arr))
            zero = ir.Constant(vec, [0.0] * _LANES)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(_NV)] for _ in range(_MR)]
            b_panel = builder.add(b_base, builder.mul(panel, b_strides[0]))
            a_rows = [builder.add(a_base, builder.mul(builder.add(row0, const(r)), a_strides[0])) for r in range(_MR)]
            with cgutils.for_range(builder, n_steps) as loop:
                b_row = builder.add(b_panel, builder.mul(loop.index, b_strides[1]))
                b_vecs = [builder.load(builder.inttoptr(builder.add(b_row, const(v * 64)), a_vec.as_pointer()),
                                       align=4) for v in range(_NV)]
                if kind == "bf16":
                    b_vecs = [builder.bitcast(x, BF16_VECTOR) for x in b_vecs]
                a_off = builder.mul(loop.index, a_strides[1])
                for r in range(_MR):
                    value = builder.load(builder.inttoptr(builder.add(a_rows[r], a_off), a_elem.as_pointer()), align=4)
                    splat = _splat(builder, value, a_vec)
                    for v in range(_NV):
                        acc = builder.load(accs[r][v])
                        if kind == "bf16":
                            new = builder.call(op, [acc, builder.bitcast(splat, BF16_VECTOR), b_vecs[v]])
                        else:
                            new = builder.call(op, [splat, b_vecs[v], acc])
                        builder.store(new, accs[r][v])
            col0 = builder.mul(panel, const(_COLS))
            for r in range(_MR):
                c_row = builder.add(c_base, builder.mul(builder.add(row0, const(r)), c_strides[0]))
                for v in range(_NV):
                    col = builder.add(col0, const(v * _LANES))
                    ptr = builder.inttoptr(builder.add(c_row, builder.mul(col, c_strides[1])), vec.as_pointer())
                    builder.store(builder.load(accs[r][v]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@intrinsic
def _instructions(typingctx, src, bits, acc, a, b):
    """One vcvtne2ps2bf16 of src (32 float32) into bits (32 uint16), and one vdpbf16ps of acc (16) with a, b (32)."""
    sig = types.void(src, bits, acc, a, b)

    def codegen(context, builder, signature, args):
        src_p, bits_p, acc_p, a_p, b_p = (context.make_array(t)(context, builder, v).data
                                          for t, v in zip(signature.args, args))
        vec, i16x32 = ir.VectorType(ir.FloatType(), _LANES), ir.VectorType(ir.IntType(16), 32)
        cvt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(BF16_VECTOR, [vec, vec]),
                                             "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, BF16_VECTOR, BF16_VECTOR]),
                                             "llvm.x86.avx512bf16.dpbf16ps.512")
        halves = builder.bitcast(src_p, vec.as_pointer())
        low = builder.load(halves, align=4)
        high = builder.load(builder.gep(halves, [ir.Constant(ir.IntType(64), 1)]), align=4)
        converted = builder.call(cvt, [high, low])  # the second operand fills the low half
        builder.store(builder.bitcast(converted, i16x32), builder.bitcast(bits_p, i16x32.as_pointer()), align=2)
        operands = [builder.bitcast(builder.load(builder.bitcast(p, i16x32.as_pointer()), align=2), BF16_VECTOR)
                    for p in (a_p, b_p)]
        acc_v = builder.bitcast(acc_p, vec.as_pointer())
        builder.store(builder.call(dot, [builder.load(acc_v, align=4), *operands]), acc_v, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=False)
def _run_instructions(src, bits, acc, a, b):
    for i in range(src.shape[0]):
        _instructions(src[i], bits[i], acc[i], a[i], b[i])


def instructions(src, acc, a, b):
    """The two instructions themselves, on rows of registers (what the tests compare the numpy model with).

    Parameters
    ----------
    src : float32 (R, 32), converted by ``vcvtne2ps2bf16`` row by row
    acc : float32 (R, 16); a, b : uint16 (R, 32), one ``vdpbf16ps`` per row

    Returns
    -------
    (bits uint16 (R, 32), acc float32 (R, 16) after the instruction)

    Raises
    ------
    RuntimeError
        Where numba's compile target has no AVX512_BF16.
    """
    if bf16_isa() is None:
        raise RuntimeError("vcvtne2ps2bf16 and vdpbf16ps need AVX512_BF16, which numba's compile target lacks")
    src = np.ascontiguousarray(check.array(src, "src", 2, (np.float32,), "(R, 32)"))
    acc = np.array(check.array(acc, "acc", 2, (np.float32,), "(R, 16)"), order="C")
    a = np.ascontiguousarray(check.array(a, "a", 2, (np.uint16,), "(R, 32)"))
    b = np.ascontiguousarray(check.array(b, "b", 2, (np.uint16,), "(R, 32)"))
    rows = src.shape[0]
    if src.shape != (rows, 32) or acc.shape != (rows, 16) or a.shape != (rows, 32) or b.shape != (rows, 32):
        raise ValueError(f"src {src.shape}, acc {acc.shape}, a {a.shape}, b {b.shape} must be (R, 32), (R, 16), "
                         "(R, 32), (R, 32): one zmm register per row")
    bits = np.zeros((rows, 32), dtype=np.uint16)
    _run_instructions(src, bits, acc, a, b)
    return bits, acc


_ROW_BLOCK = 96  # rows of A per job: a job's A rows (96 x 2K bytes for bf16) stay in L2 across its panel


@functools.lru_cache(maxsize=None)
def _fast_gemm(kind: str):
    """The threaded driver around one micro-tile: jobs of (panel, block of rows), panel-major (B's panel is reused)."""
    tile = _tile_intrinsic(kind)

    @numba.njit(parallel=True, cache=False)
    def gemm(a, bp, c):  # IN a (Mp, steps), Mp % 6 == 0; bp (P, steps, 64); OUT c (Mp, P*64), every element
        n_tiles = a.shape[0] // _MR
        tiles_per_job = _ROW_BLOCK // _MR
        blocks = (n_tiles + tiles_per_job - 1) // tiles_per_job
        for job in numba.prange(bp.shape[0] * blocks):
            p, blk = job // blocks, job % blocks
            for t in range(blk * tiles_per_job, min(n_tiles, (blk + 1) * tiles_per_job)):
                tile(c, a, bp, np.int64(t * _MR), np.int64(p))

    return gemm


@numba.njit(parallel=True, cache=True)
def _gemm_emulated(a, bp, c):  # IN a f32 (Mp, Kp), bp f32 (P, Kp, 64): bf16 values, denormals zeroed; OUT c (Mp, P*64)
    tiny = np.float32(2.0**-126)
    n_panels, k_size, cols = bp.shape
    for job in numba.prange(a.shape[0] * n_panels):
        i, p = job // n_panels, job % n_panels
        acc = np.zeros(cols, dtype=np.float32)
        for k in range(0, k_size, 2):
            for kk in (k + 1, k):  # the odd element of the pair first, as vdpbf16ps
                aik = np.float64(a[i, kk])
                for j in range(cols):
                    # an fp32 FMA: the exact product (float64 holds it) added and rounded once, then flushed
                    exact = np.float64(acc[j]) + aik * np.float64(bp[p, kk, j])
                    value = np.float32(exact)
                    if abs(value) < tiny:
                        value = np.float32(0.0) if exact >= 0 else np.float32(-0.0)
                    acc[j] = value
        c[i, p * cols : (p + 1) * cols] = acc


def _emulated_operands(a32, packed):
    """The fast kernel's int32 pairs as float32 bf16 values (denormals read as zero): A (Mp, Kp), B (P, Kp, 64)."""
    def values(pairs):
        bits = np.ascontiguousarray(pairs).view(np.uint16)
        return daz(from_bf16(bits))

    a_f = values(a32)
    b_f = values(packed.data)  # (P, G, 64*2): lane j's pair at 2j, 2j+1
    n_panels, groups = packed.data.shape[:2]
    b_f = b_f.reshape(n_panels, groups, _COLS, 2).transpose(0, 1, 3, 2).reshape(n_panels, 2 * groups, _COLS)
    return a_f, np.ascontiguousarray(b_f)


def _a_rows(bits, groups):
    """A's bf16 bits padded to rows % 6 == 0 and K = 2*groups, viewed as int32 pairs (Mp, groups)."""
    m_size, k_size = bits.shape
    mp = -(-m_size // _MR) * _MR
    if mp == m_size and k_size == 2 * groups and bits.flags.c_contiguous:
        return bits.view(np.int32)
    padded = np.empty((mp, 2 * groups), dtype=np.uint16)
    _pack_a_pairs(bits, padded)  # any strides: A may be a transposed view
    return padded.view(np.int32)


def gemm_bf16(a, b, path="auto"):
    """C = A @ B with bf16 operands and fp32 accumulation: vdpbf16ps's arithmetic on every path.

    Parameters
    ----------
    a : (M, K) float32 (rounded to bf16 to nearest even here) or uint16 bf16 bits
    b : (K, N) float32 or uint16 bf16 bits, or :class:`PackedBF16` from :func:`pack_bf16`
    path : {"auto", "fast", "emulated", "reference", "amx"}
        ``"fast"``: ``vdpbf16ps`` (AVX512_BF16 in numba's target); ``"emulated"``: the same roundings in
        plain numba; ``"reference"``: :func:`gemm_reference`; ``"amx"``: ``tdpbf16ps`` tiles
        (:mod:`workshop_lib.amx`). ``"auto"``: see :func:`bf16_path`. All give identical bits.

    Returns
    -------
    float32 array (M, N)

    Notes
    -----
    Error bound, against float64 A @ B of the float32 inputs: each operand is rounded to bf16 with a
    relative error of at most 2^-8 and the K-term sum is accumulated in float32, so
    ``|C - C64| <= (2 * 2^-8 + 2^-16 + K * 2^-24) * sum_k |A[i, k] * B[k, j]|`` (first order); against
    float64 products of the bf16-rounded operands only the accumulation term ``K * 2^-24`` remains.
    """
    check.option(path, "path", PATHS)
    packed = b if isinstance(b, PackedBF16) else None
    a_bits = _as_bits(a, "a")
    k_b = packed.shape[0] if packed else np.shape(b)[0] if np.ndim(b) == 2 else None
    if packed is None:
        b_bits = _as_bits(b, "b")
        _check_inner(a_bits, b_bits)
    elif a_bits.shape[1] != k_b:
        raise ValueError(f"a.shape[1]={a_bits.shape[1]} must equal the packed b's K={k_b}")
    which = bf16_path(path)
    if which == "reference":
        if packed is not None:
            raise ValueError("path='reference' takes b as a matrix, not PackedBF16")
        return gemm_reference(a_bits, b_bits)
    if which == "amx":
        from .amx import gemm_bf16_amx

        return gemm_bf16_amx(a_bits, b_bits if packed is None else None, packed)
    packed = packed or PackedBF16(b_bits)
    m_size = a_bits.shape[0]
    a32 = _a_rows(a_bits, packed.data.shape[1])
    c = np.empty((a32.shape[0], packed.data.shape[0] * _COLS), dtype=np.float32)
    if which == "fast":
        _fast_gemm("bf16")(a32, packed.data, c)
    else:
        _gemm_emulated(*_emulated_operands(a32, packed), c)
    return c[:m_size, : packed.shape[1]]


def gemm_f32(a, b):
    """C = A @ B in float32 by the fast bf16 kernel's twin (FMA instead of vdpbf16ps): the like-for-like baseline.

    Parameters
    ----------
    a : (M, K) float32
    b : (K, N) float32

    Returns
    -------
    float32 array (M, N); each element a float32 FMA chain over K in order (error <= K * 2^-24 * sum |a b|)
    """
    a = check.array(a, "a", 2, (np.float32,), "(M, K)")
    b = check.array(b, "b", 2, (np.float32,), "(K, N)")
    _check_inner(a, b)
    if not {"avx512f", "fma"} <= compile_target_features():
        raise RuntimeError("gemm_f32's kernel needs AVX-512F in numba's compile target; use numpy's a @ b")
    m_size, n_size = a.shape[0], b.shape[1]
    mp, np_ = -(-m_size // _MR) * _MR, -(-n_size // _COLS) * _COLS
    ap = np.zeros((mp, a.shape[1]), np.float32)
    ap[:m_size] = a
    bp = np.zeros((a.shape[1], np_), np.float32)
    bp[:, :n_size] = b
    packed = np.ascontiguousarray(bp.reshape(a.shape[1], np_ // _COLS, _COLS).transpose(1, 0, 2))
    c = np.empty((mp, np_), dtype=np.float32)
    _fast_gemm("f32")(ap, packed, c)
    return c[:m_size, :n_size]


# ----------------------------------------------------------------------------------------------
# Convolution: bf16 operands, fp32 accumulation, fp32 epilogue


def _conv_geometry(x_shape, w_shape, stride, padding):
    from . import kernels

    stride = kernels.hw_pair(stride, "stride")
    n_size, h, wd, c = x_shape
    r, s, c_w, k = w_shape
    if c_w != c:
        raise ValueError(f"w.shape[2]={c_w} must equal x.shape[3]={c} (the input channels)")
    pads = kernels.conv_padding(padding, h, wd, r, s, stride)
    out_h, out_w = kernels.output_hw(h, wd, r, s, stride, pads)
    kernels.check_output(out_h, out_w, f"the {r}x{s} kernel w", padding, stride, h, wd)
    return stride, pads, out_h, out_w


def _nhwc(x, name, layout):
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}={x!r} must be a 4-D float32 array {layout}")
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype not in (np.float32, np.uint16):
        raise TypeError(f"{name} must be a 4-D float32 (or uint16 bf16 bits) array {layout}; got {x.dtype} "
                        f"shape={x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name}.shape={x.shape} must have no empty axis")
    return x if x.dtype == np.uint16 else convert_bf16(x)


def conv2d_bf16(x, w, stride=1, padding="SAME", bias=None, relu=False, path="auto", return_cols=False):
    """NHWC x HWIO convolution with bf16 operands and fp32 accumulation; fp32 bias and ReLU epilogue.

    The receptive fields of the bf16 input (im2col, 2 bytes an element) times the bf16 filter on
    :func:`gemm_bf16`: every output is one vdpbf16ps chain over (r, s, c) in order, then ``+ bias`` and
    ``max(0, .)`` in float32.

    Parameters
    ----------
    x : (N, H, W, C) float32 (rounded to bf16 here) or uint16 bf16 bits
    w : (R, S, C, K) float32 or bf16 bits, HWIO
    stride : int or (sh, sw)
    padding : "SAME", "VALID", int or ((top, bottom), (left, right))
    bias : (K,) float32 or None
    relu : bool
    path : as for :func:`gemm_bf16`
    return_cols : bool
        Also return the bf16 receptive fields (the workspace :func:`conv2d_backward_bf16` reuses).

    Returns
    -------
    out : (N, OH, OW, K) float32. Error bound against float64 of the float32 inputs: that of
    :func:`gemm_bf16` with K = R*S*C. With ``return_cols``: (out, cols (N*OH*OW, R*S*C) uint16).
    """
    from . import kernels

    xb, wb = _nhwc(x, "x", "(N, H, W, C)"), _nhwc(w, "w", "(R, S, C, K), HWIO")
    stride, pads, out_h, out_w = _conv_geometry(xb.shape, wb.shape, stride, padding)
    r, s, c, k = wb.shape
    if bias is not None:
        bias = check.array(bias, "bias", 1, (np.float32,), f"({k},)")
        check.shape(bias, "bias", (k,), "one value per output channel")
    cols, _ = kernels.im2col_nhwc(xb, (r, s), stride, pads)
    out = gemm_bf16(cols, wb.reshape(r * s * c, k), path).reshape(xb.shape[0], out_h, out_w, k)
    if bias is not None:
        out += bias
    if relu:
        np.maximum(out, 0, out=out)
    out = np.ascontiguousarray(out)
    return (out, cols) if return_cols else out


def conv2d_backward_bf16(dy, x, w, stride=1, padding="SAME", need_dx=True, need_dw=True, path="auto", cols=None):
    """(dx, dw) of :func:`conv2d_bf16` (before its bias and ReLU): both products on bf16 operands, fp32 sums.

    ``dw = cols(x)^T @ dy`` (backward-weights) and ``dx = col2im(dy @ w^T)`` (backward-data; the
    columns' gradient is fp32 and folded back onto the pixels in fp32).

    Parameters
    ----------
    dy : (N, OH, OW, K) float32, the gradient of the convolution's output
    x, w, stride, padding : the forward's
    need_dx, need_dw : bool; a skipped gradient is returned as None
    path : as for :func:`gemm_bf16`
    cols : the forward's receptive fields (``conv2d_bf16(..., return_cols=True)``), or None to rebuild them

    Returns
    -------
    (dx (N, H, W, C) float32 or None, dw (R, S, C, K) float32 or None)
    """
    from . import kernels

    xb, wb = _nhwc(x, "x", "(N, H, W, C)"), _nhwc(w, "w", "(R, S, C, K), HWIO")
    stride, pads, out_h, out_w = _conv_geometry(xb.shape, wb.shape, stride, padding)
    n_size, h, wd, c = xb.shape
    r, s, _, k = wb.shape
    dyb = _nhwc(dy, "dy", "(N, OH, OW, K)")
    check.shape(dyb, "dy", (n_size, out_h, out_w, k), "the shape of the forward output")
    d2 = dyb.reshape(-1, k)
    dw = dx = None
    if need_dw:
        if cols is None or cols.dtype != np.uint16 or cols.shape != (d2.shape[0], r * s * c):
            cols, _ = kernels.im2col_nhwc(xb, (r, s), stride, pads)
        # dw^T = dy^T @ cols: the columns are B, packed along their contiguous rows; dy^T is the small side
        dw = np.ascontiguousarray(gemm_bf16(d2.T, cols, path).T).reshape(r, s, c, k)
    if need_dx:
        dcols = gemm_bf16(d2, wb.reshape(-1, k).T, path)
        dx = np.zeros((n_size, h, wd, c), dtype=np.float32)
        kernels.col2im_nhwc(dcols, r, s, stride[0], stride[1], pads[0][0], pads[1][0], out_h, out_w, dx)
    return dx, dw
