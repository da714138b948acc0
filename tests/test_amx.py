"""workshop_lib.amx: the numpy model of the tile instructions and of the kernels' tiling, bit for bit against
the VNNI and bf16 references; the AMX IR compiled for Sapphire Rapids; the path refusing without AMX."""

import numpy as np
import pytest

from workshop_lib import amx, bf16, int8

RNG = np.random.default_rng(18)
INT8_USABLE, INT8_REASON = amx.amx_int8_status()
BF16_USABLE, _ = amx.amx_bf16_status()


def test_one_tdpbusd_is_16x16_lanes_of_vpdpbusd_with_wraparound():
    a = RNG.integers(0, 256, (16, 64), dtype=np.uint8)
    b_plain = RNG.integers(-128, 128, (64, 16), dtype=np.int8)
    c = RNG.integers(-(2**31), 2**31, (16, 16), dtype=np.int64).astype(np.int32)
    c[0, 0] = 2**31 - 1  # wraps
    got = amx.tdpbusd(c, a, amx.vnni_layout(b_plain, "int8")[:, :64])
    exact = c.astype(object) + a.astype(object) @ b_plain.astype(object)
    assert np.array_equal(got, ((exact + 2**31) % 2**32 - 2**31).astype(np.int64).astype(np.int32))


def test_one_tdpbf16ps_is_the_pairwise_fma_chain_even_first():
    a = bf16.to_bf16(RNG.standard_normal((16, 32)).astype(np.float32))
    b_plain = bf16.to_bf16(RNG.standard_normal((32, 16)).astype(np.float32))
    got = amx.tdpbf16ps(np.zeros((16, 16), np.float32), a, amx.vnni_layout(b_plain, "bf16")[:, :32])
    assert np.array_equal(got.view(np.uint32), bf16.gemm_reference(a, b_plain, first="even").view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 70, 33), (32, 64, 32), (40, 130, 70)])
def test_tile_model_gemm_int8_equals_the_vnni_reference(shape):
    m, k, n = shape
    a = RNG.integers(0, 256, (m, k), dtype=np.uint8)
    b = RNG.integers(-128, 128, (k, n), dtype=np.int8)
    assert np.array_equal(amx.gemm_tile_model(a, b, "int8"), int8.gemm_u8s8s32(a, b, path="reference"))


def test_tile_model_int8_wraps_as_the_reference():
    a = np.full((2, 4 * 20000), 255, np.uint8)
    b = np.full((4 * 20000, 2), 127, np.int8)  # 20000 * 4 * 255 * 127 overflows s32
    assert np.array_equal(amx.gemm_tile_model(a, b, "int8"), int8.gemm_u8s8s32(a, b, path="reference"))


@pytest.mark.parametrize("shape", [(3, 5, 7), (33, 70, 40)])
def test_tile_model_gemm_bf16_equals_the_reference_chain(shape):
    m, k, n = shape
    a = bf16.to_bf16((RNG.standard_normal((m, k)) * np.exp2(RNG.integers(-20, 20, (m, k)))).astype(np.float32))
    b = bf16.to_bf16(RNG.standard_normal((k, n)).astype(np.float32))
    got = amx.gemm_tile_model(a, b, "bf16")
    assert np.array_equal(got.view(np.uint32), bf16.gemm_reference(a, b, first="even").view(np.uint32))


def test_tile_config_is_palette_1_with_16_rows_of_64_bytes():
    cfg = amx.tile_config("int8")
    assert cfg.shape == (64,) and cfg[0] == 1 and cfg[1] == 0
    assert list(cfg[16:32].view(np.uint16)) == [64] * 8 and list(cfg[48:56]) == [16] * 8


@pytest.mark.parametrize("kind, instruction", [("int8", "tdpbusd"), ("bf16", "tdpbf16ps")])
def test_kernel_ir_compiles_to_amx_machine_code(kind, instruction):
    asm = amx.assembly(kind)
    for mnemonic in ("ldtilecfg", "tilezero", "tileloadd", instruction, "tilestored", "tilerelease"):
        assert mnemonic in asm
    assert asm.count(instruction) >= 4  # the block's four quarters


@pytest.mark.skipif(INT8_USABLE, reason="this CPU has AMX-INT8")
def test_amx_path_refuses_clearly_without_amx():
    a, b = np.ones((2, 4), np.uint8), np.ones((4, 2), np.int8)
    with pytest.raises(RuntimeError, match="path='amx' needs AMX-INT8"):
        int8.gemm_u8s8s32(a, b, path="amx")
    assert np.array_equal(int8.gemm_u8s8s32(a, b), np.full((2, 2), 4))  # auto: VNNI or portable here
    with pytest.raises(ValueError, match="path='amx' is for u8 x s8"):
        int8.gemm_s16s16s32(np.ones((2, 2), np.int16), np.ones((2, 2), np.int16), path="amx")


@pytest.mark.skipif(not INT8_USABLE, reason=f"no AMX-INT8 here: {INT8_REASON}")
def test_amx_hardware_int8_gemm_and_conv_match_the_reference():
    a = RNG.integers(0, 256, (70, 300), dtype=np.uint8)
    b = RNG.integers(-128, 128, (300, 90), dtype=np.int8)
    assert np.array_equal(int8.gemm_u8s8s32(a, b, path="amx"), int8.gemm_u8s8s32(a, b, path="reference"))
    x = RNG.integers(0, 256, (2, 9, 9, 8), dtype=np.uint8)
    w = RNG.integers(-128, 128, (3, 3, 8, 16), dtype=np.int8)
    assert np.array_equal(int8.conv2d_u8s8s32(x, w, path="amx"), int8.conv2d_u8s8s32(x, w, path="reference"))


@pytest.mark.skipif(not BF16_USABLE, reason="no AMX-BF16 here")
def test_amx_hardware_bf16_gemm_matches_the_tile_model():
    a = bf16.to_bf16(RNG.standard_normal((70, 300)).astype(np.float32))
    b = bf16.to_bf16(RNG.standard_normal((300, 90)).astype(np.float32))
    got = bf16.gemm_bf16(a, b, path="amx")
    assert np.array_equal(got.view(np.uint32), amx.gemm_tile_model(a, b, "bf16").view(np.uint32))
