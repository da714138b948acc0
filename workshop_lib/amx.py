"""AMX (Advanced Matrix Extensions, Sapphire Rapids and later): DL Boost's third generation, as tiles.

Eight tile registers tmm0..tmm7 of up to 16 rows x 64 bytes. ``ldtilecfg`` loads a 64-byte configuration
(palette 1: each tile's rows and bytes per row), ``tileloadd`` fills a tile from memory with a stride,
``tdpbusd``/``tdpbf16ps`` multiply two tiles into a third, ``tilestored`` writes a tile back and
``tilerelease`` frees the state. One ``tdpbusd`` is a (16 x 64) u8 tile times a (16 x 64) s8 tile read as
(64 x 16) in groups of 4: 16 x 16 x 64 = 16,384 multiply-adds, 16 x 16 vpdpbusd's worth. Linux hands a
process the tile state only after it asks: ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import _validate as check
from . import bf16
from .bf16 import compile_target_features

__all__ = ["amx_int8_status", "amx_bf16_status", "tdpbusd", "tdpbf16ps", "vnni_layout", "gemm_tile_model",
           "tile_config", "emit_block", "assembly", "gemm_u8s8s32_amx", "gemm_bf16_amx"]


@functools.lru_cache(maxsize=None)
def _status(feature):
    from .sysinfo import request_tile_permission

    missing = [f for f in ("amx-tile", feature) if f not in compile_target_features()]
    if missing:
        return False, (f"numba's compile target has no {' or '.join(missing)} (this CPU has no AMX, or "
                       "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES hide it)")
    refused = request_tile_permission()
    if refused:
        return False, refused
    return True, f"amx-tile and {feature}, and Linux granted this process the tile state"


def amx_int8_status():
    """``(usable, reason)`` for AMX-INT8 (``tdpbusd``) in this process; asks Linux for the tile state once."""
    return _status("amx-int8")


def amx_bf16_status():
    """``(usable, reason)`` for AMX-BF16 (``tdpbf16ps``) in this process; asks Linux for the tile state once."""
    return _status("amx-bf16")


# ----------------------------------------------------------------------------------------------
# The tile instructions, in numpy: what one tdpbusd / tdpbf16ps computes

TILE_ROWS, TILE_BYTES = 16, 64  # a tile register: up to 16 rows of up to 64 bytes (palette 1)


def tdpbusd(c, a, b):
    """One ``tdpbusd tmm_c, tmm_a, tmm_b``: C (M, N) s32 += A (M, 4K) u8 . B, B held as (K, 4N) s8.

    Row k of B holds, for each of the N columns, 4 consecutive s8 weights of that column (rows 4k..4k+3 of
    the plain (4K, N) matrix): the VNNI layout. ``C[m, n] += sum_t A[m, 4k+t] * B[k, 4n+t]`` for every k,
    each group of 4 products summed and added to the 32-bit accumulator, which wraps around on overflow
    (as ``vpdpbusd`` does: one tdpbusd on a 16 x 64 tile is 16 x 16 x 16 vpdpbusd lanes' worth).

    Parameters
    ----------
    c : int32 (M, N), M <= 16, N <= 16
    a : uint8 (M, 4K), 4K <= 64
    b : int8 (K, 4N)

    Returns
    -------
    int32 (M, N): the new C (the argument is not changed)
    """
    c = _tile(c, "c", np.int32, 4)
    a, b = _tile(a, "a", np.uint8, 1), _tile(b, "b", np.int8, 1)
    (m_size, n_size), k_size = c.shape, a.shape[1] // 4
    if a.shape != (m_size, 4 * k_size) or a.shape[1] % 4 or b.shape != (k_size, 4 * n_size):
        raise ValueError(f"c {c.shape}, a {a.shape}, b {b.shape} must be (M, N), (M, 4K), (K, 4N)")
    acc = c.astype(np.int64)
    groups_a = a.reshape(m_size, k_size, 4).astype(np.int64)
    groups_b = b.reshape(k_size, n_size, 4).astype(np.int64)
    for k in range(k_size):
        acc = acc + np.einsum("mt,nt->mn", groups_a[:, k], groups_b[k])  # 4 products summed, per (m, n)
        acc = (acc + 2**31) % 2**32 - 2**31  # the s32 accumulator wraps
    return acc.astype(np.int32)


def tdpbf16ps(c, a, b):
    """One ``tdpbf16ps tmm_c, tmm_a, tmm_b``: C (M, N) fp32 += A (M, 2K) bf16 . B, B held as (K, 2N) bf16.

    Row k of B holds, for each column n, the pair (B[2k, n], B[2k+1, n]) of the plain matrix. For each k in
    order, ``C[m, n]`` gets the even product added, then the odd one (the SDM pseudo-code's order; vdpbf16ps
    adds the odd one first), each product exact, each addition rounded to nearest even, denormals read as
    zero and flushed, as :func:`workshop_lib.bf16.dpbf16ps`.

    Parameters
    ----------
    c : float32 (M, N), M <= 16, N <= 16
    a : uint16 bf16 bits (M, 2K), 2K <= 32
    b : uint16 bf16 bits (K, 2N)

    Returns
    -------
    float32 (M, N)
    """
    c = _tile(c, "c", np.float32, 4)
    a, b = _tile(a, "a", np.uint16, 2), _tile(b, "b", np.uint16, 2)
    (m_size, n_size), k_size = c.shape, a.shape[1] // 2
    if a.shape != (m_size, 2 * k_size) or b.shape != (k_size, 2 * n_size):
        raise ValueError(f"c {c.shape}, a {a.shape}, b {b.shape} must be (M, N), (M, 2K), (K, 2N)")
    af = bf16.daz(bf16.from_bf16(a)).astype(np.float64)
    bf = bf16.daz(bf16.from_bf16(b)).astype(np.float64).reshape(k_size, n_size, 2)
    acc = c
    with np.errstate(invalid="ignore"):
        for k in range(k_size):
            for h in (0, 1):  # even, then odd
                acc = bf16.add_product(acc, af[:, 2 * k + h, None] * bf[None, k, :, h])
    return acc


def _tile(x, name, dtype, itemsize):
    x = np.asarray(x)
    if x.dtype != dtype or x.ndim != 2:
        raise TypeError(f"{name} must be a 2-D {np.dtype(dtype).name} tile; got {x.dtype} shape={x.shape}")
    if x.shape[0] > TILE_ROWS or x.shape[1] * x.itemsize > TILE_BYTES:
        raise ValueError(f"{name}.shape={x.shape} does not fit a tile ({TILE_ROWS} rows of {TILE_BYTES} bytes)")
    return x


# ----------------------------------------------------------------------------------------------
# The tiling of the AMX kernels, as a numpy model (the same loops, the same tiles)

BLOCK = 32  # C is computed in 32 x 32 blocks: tiles 0-3 hold its four 16 x 16 quarters
STEP = {"int8": 64, "bf16": 32}  # K per tile load: 64 u8 or 32 bf16 = one 64-byte row


def vnni_layout(b, kind):
    """The plain (K, N) B rearranged so that a tile row holds 4 (int8) or 2 (bf16) consecutive K per column.

    Returns (K / group, N * group), K zero-padded to a multiple of :data:`STEP`, N to :data:`BLOCK`.
    """
    group = 4 if kind == "int8" else 2
    k_size, n_size = b.shape
    kp, np_ = -(-k_size // STEP[kind]) * STEP[kind], -(-n_size // BLOCK) * BLOCK
    padded = np.zeros((kp, np_), dtype=b.dtype)
    padded[:k_size, :n_size] = b
    return np.ascontiguousarray(padded.reshape(kp // group, group, np_).transpose(0, 2, 1)).reshape(
        kp // group, np_ * group)


def _padded_a(a, kind):
    m_size, k_size = a.shape
    mp, kp = -(-m_size // BLOCK) * BLOCK, -(-k_size // STEP[kind]) * STEP[kind]
    padded = np.zeros((mp, kp), dtype=a.dtype)
    padded[:m_size, :k_size] = a
    return padded


def gemm_tile_model(a, b, kind):
    """C = A @ B computed tile by tile exactly as the AMX kernel does, with :func:`tdpbusd` / :func:`tdpbf16ps`.

    For each 32 x 32 block of C: tiles 0-3 start at zero; for each step of K (64 u8 or 32 bf16), tiles 4 and 5
    are loaded with the block's two 16-row slices of A, tiles 6 and 7 with its two 16-column slices of B (in
    :func:`vnni_layout`), and four tile multiplies update the quarters: C00 += A0 B0, C01 += A0 B1,
    C10 += A1 B0, C11 += A1 B1. Then the four tiles are stored.

    Parameters
    ----------
    a : uint8 (M, K) for ``kind="int8"``; uint16 bf16 bits for ``"bf16"``
    b : int8 (K, N); uint16 bf16 bits
    kind : {"int8", "bf16"}

    Returns
    -------
    int32 or float32 (M, N)
    """
    check.option(kind, "kind", ("int8", "bf16"))
    group, instruction = (4, tdpbusd) if kind == "int8" else (2, tdpbf16ps)
    ap, bv = _padded_a(a, kind), vnni_layout(b, kind)
    c = np.zeros((ap.shape[0], bv.shape[1] // group), dtype=np.int32 if kind == "int8" else np.float32)
    t = TILE_ROWS
    for m0 in range(0, ap.shape[0], BLOCK):
        for n0 in range(0, c.shape[1], BLOCK):
            tiles = [c[m0 + i * t : m0 + (i + 1) * t, n0 + j * t : n0 + (j + 1) * t] * 0 for i in (0, 1) for j in (0, 1)]
            for k0 in range(0, ap.shape[1], STEP[kind]):
                a_tiles = [ap[m0 + i * t : m0 + (i + 1) * t, k0 : k0 + STEP[kind]] for i in (0, 1)]
                rows = slice(k0 // group, (k0 + STEP[kind]) // group)
                b_tiles = [bv[rows, (n0 + j * t) * group : (n0 + (j + 1) * t) * group] for j in (0, 1)]
                tiles = [instruction(tiles[2 * i + j], a_tiles[i], b_tiles[j]) for i in (0, 1) for j in (0, 1)]
            for i in (0, 1):
                for j in (0, 1):
                    c[m0 + i * t : m0 + (i + 1) * t, n0 + j * t : n0 + (j + 1) * t] = tiles[2 * i + j]
    return c[: a.shape[0], : b.shape[1]]


# ----------------------------------------------------------------------------------------------
# The AMX kernels: LLVM's x86 tile intrinsics with constant tile numbers, from numba


def tile_config(kind):
    """The 64-byte ``ldtilecfg`` operand (palette 1): tiles 0-7 all 16 rows x 64 bytes.

    Byte 0: palette 1; byte 1: start row 0; bytes 16 + 2i: tile i's bytes per row (u16); byte 48 + i: its rows.
    """
    check.option(kind, "kind", ("int8", "bf16"))
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    for i in range(8):
        cfg[16 + 2 * i : 18 + 2 * i] = np.frombuffer(np.uint16(TILE_BYTES).tobytes(), dtype=np.uint8)
        cfg[48 + i] = TILE_ROWS
    return cfg


_I8, _I64 = ir.IntType(8), ir.IntType(64)


def _declare(module, name, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), args), f"llvm.x86.{name}")


def emit_block(builder, kind, cfg, a, b, c, lda, ldb, ldc, k_steps):
    """Emit one 32 x 32 block of C at the builder's position (the model's loop, as tile instructions).

    ``cfg`` is a pointer to :func:`tile_config`; ``a``, ``b``, ``c`` are i64 addresses of the block's first
    row of A, first row of B in :func:`vnni_layout` (at the block's column) and C; ``lda``/``ldb``/``ldc``
    their row strides in bytes; ``k_steps`` the number of K steps (i64).
    """
    module = builder.module
    ptr = ir.PointerType(_I8)
    ldtilecfg = _declare(module, "ldtilecfg", [ptr])
    tilezero = _declare(module, "tilezero", [_I8])
    tileload = _declare(module, "tileloadd64", [_I8, ptr, _I64])
    tilestore = _declare(module, "tilestored64", [_I8, ptr, _I64])
    tdp = _declare(module, "tdpbusd" if kind == "int8" else "tdpbf16ps", [_I8, _I8, _I8])
    release = _declare(module, "tilerelease", [])
    tile = lambda i: ir.Constant(_I8, i)  # noqa: E731 - tile numbers are immediates
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    address = lambda base, offset: builder.inttoptr(builder.add(base, offset), ptr)  # noqa: E731
    builder.call(ldtilecfg, [cfg])  # each thread loads its own configuration
    for i in range(4):
        builder.call(tilezero, [tile(i)])
    with cgutils.for_range(builder, k_steps) as loop:
        k_bytes = builder.mul(loop.index, const(TILE_BYTES))  # one step: 64 bytes of a row of A
        builder.call(tileload, [tile(4), address(a, k_bytes), lda])
        builder.call(tileload, [tile(5), address(a, builder.add(k_bytes, builder.mul(const(TILE_ROWS), lda))), lda])
        b_rows = builder.mul(builder.mul(loop.index, const(TILE_ROWS)), ldb)  # 16 rows of B per step
        builder.call(tileload, [tile(6), address(b, b_rows), ldb])
        builder.call(tileload, [tile(7), address(b, builder.add(b_rows, const(TILE_BYTES))), ldb])
        for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
            builder.call(tdp, [tile(2 * i + j), tile(4 + i), tile(6 + j)])
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        offset = builder.add(builder.mul(const(i * TILE_ROWS), ldc), const(j * TILE_BYTES))
        builder.call(tilestore, [tile(2 * i + j), address(c, offset), ldc])
    builder.call(release, [])


def assembly(kind, cpu="sapphirerapids"):
    """The machine code of one block (:func:`emit_block`) compiled by numba's LLVM for ``cpu``: AT&T assembly text.

    This is how a CPU without AMX checks that the kernel's IR is valid AMX code (``tdpbusd``, ``tileloadd``...).
    """
    import llvmlite.binding as ll

    check.option(kind, "kind", ("int8", "bf16"))
    module = ir.Module(name=f"amx_{kind}")
    ptr = ir.PointerType(_I8)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr] + [_I64] * 7), name=f"amx_block_{kind}")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    emit_block(builder, kind, *fn.args)
    builder.ret_void()
    parsed = ll.parse_assembly(str(module))
    parsed.verify()
    target = ll.Target.from_triple("x86_64-unknown-linux-gnu")
    machine = target.create_target_machine(cpu=cpu, features="+amx-tile,+amx-int8,+amx-bf16", opt=2)
    return machine.emit_assembly(parsed)


@functools.lru_cache(maxsize=None)
def _block_intrinsic(kind):
    @intrinsic
    def block(typingctx, cfg, a, b, c, a0, b0, c0, lda, ldb, ldc, k_steps):
        sig = types.void(cfg, a, b, c, a0, b0, c0, lda, ldb, ldc, k_steps)

        def codegen(context, builder, signature, args):
            cfg_p = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                                    ir.PointerType(_I8))
            bases = [builder.ptrtoint(context.make_array(t)(context, builder, v).data, _I64)
                     for t, v in zip(signature.args[1:4], args[1:4])]
            a0, b0, c0, lda, ldb, ldc, k_steps = args[4:]
            emit_block(builder, kind, cfg_p, builder.add(bases[0], a0), builder.add(bases[1], b0),
                       builder.add(bases[2], c0), lda, ldb, ldc, k_steps)
            return context.get_dummy_value()

        return sig, codegen

    return block


@functools.lru_cache(maxsize=None)
def _amx_gemm(kind):
    block = _block_intrinsic(kind)
    item = 4  # bytes of an s32 / fp32 result

    @numba.njit(parallel=True, cache=False)
    def gemm(cfg, a, bv, c):  # IN a (Mp, Kp) padded, bv vnni_layout(b); OUT c (Mp, Np), every element
        lda, ldb, ldc = a.strides[0], bv.strides[0], c.strides[0]
        k_steps = a.shape[1] * a.itemsize // 64
        n_blocks = c.shape[1] // 32
        for job in numba.prange((c.shape[0] // 32) * n_blocks):
            m0, n0 = (job // n_blocks) * 32, (job % n_blocks) * 32
            block(cfg, a, bv, c, np.int64(m0 * lda), np.int64(n0 * 64 // 16), np.int64(m0 * ldc + n0 * item),
                  np.int64(lda), np.int64(ldb), np.int64(ldc), np.int64(k_steps))

    return gemm


def _run_amx(a, b, kind):
    usable, reason = amx_int8_status() if kind == "int8" else amx_bf16_status()
    if not usable:
        name = "AMX-INT8" if kind == "int8" else "AMX-BF16"
        raise RuntimeError(f"path='amx' needs {name} tiles, which this process cannot use: {reason}")
    ap, bv = _padded_a(a, kind), vnni_layout(b, kind)
    group = 4 if kind == "int8" else 2
    c = np.empty((ap.shape[0], bv.shape[1] // group), dtype=np.int32 if kind == "int8" else np.float32)
    _amx_gemm(kind)(tile_config(kind), ap, bv, c)
    return c[: a.shape[0], : b.shape[1]]


def gemm_u8s8s32_amx(a, b):
    """u8 (M, K) x s8 (K, N) -> s32 on AMX tiles (``tdpbusd``); raises RuntimeError without AMX-INT8.

    Bit-identical to :func:`workshop_lib.int8.gemm_u8s8s32`'s VNNI reference (wrap-around included): the
    kernel is :func:`gemm_tile_model`'s loops issued as tile instructions.
    """
    return _run_amx(a, b, "int8")


def gemm_bf16_amx(a_bits, b_bits, packed=None):
    """bf16 bits (M, K) x (K, N) -> fp32 on AMX tiles (``tdpbf16ps``); raises RuntimeError without AMX-BF16.

    Equal to :func:`workshop_lib.bf16.gemm_reference` with ``first="even"`` where the silicon follows the
    SDM's pseudo-code (unverified here: no AMX machine was at hand when this was written).
    """
    if packed is not None:
        raise ValueError("the AMX path takes b as a matrix, not PackedBF16 (it packs B in tiles' VNNI layout)")
    return _run_amx(a_bits, b_bits, "bf16")
