"""workshop_lib.bf16: the numpy model of vcvtne2ps2bf16/vdpbf16ps against the instructions and against float64;
every GEMM path bit for bit equal to the model."""

import numpy as np
import pytest
from test_jit_conv import conv_reference  # float64 NHWC convolution, one einsum per tap

from workshop_lib import bf16

RNG = np.random.default_rng(25)
HAS_BF16 = bf16.bf16_isa() is not None
PATHS = ["emulated"] + (["fast"] if HAS_BF16 else [])
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="numba's compile target has no AVX512_BF16")


def f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def random_bf16(shape, exponents=(1, 255)):
    """bf16 bits with random sign, mantissa and an exponent field in [lo, hi): tiny, huge and special ones."""
    e = RNG.integers(*exponents, size=shape)
    return ((RNG.integers(0, 2, shape) << 15) | (e << 7) | RNG.integers(0, 128, shape)).astype(np.uint16)


def same_bits(x, y):
    """Bitwise equal, any NaN equal to any NaN (the instruction's NaN payloads are not modelled)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


# ----------------------------------------------------------------------------------------------
# conversion


def nearest_bf16_float64(x):
    """Round-to-nearest-even to 8 significant bits, by float64 arithmetic (an independent model, finite normals)."""
    mant, exp = np.frexp(x.astype(np.float64))  # x = mant * 2**exp, 0.5 <= |mant| < 1
    return (np.rint(mant * 256.0) / 256.0 * np.exp2(exp.astype(np.float64)))


def test_to_bf16_rounds_to_nearest_even_like_float64_rounding():
    x = (RNG.standard_normal(20000) * np.exp2(RNG.integers(-100, 100, 20000))).astype(np.float32)
    assert np.array_equal(bf16.from_bf16(bf16.to_bf16(x)).astype(np.float64), nearest_bf16_float64(x))


def test_to_bf16_special_values():
    cases = {  # float32 bits -> bf16 bits
        0x3F800000: 0x3F80,  # 1.0
        0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, to even (down)
        0x3F818000: 0x3F82,  # 1 + 3*2^-8: a tie, to even (up)
        0x3F808001: 0x3F81,  # just above the tie
        0x7F7FFFFF: 0x7F80,  # the largest float32 rounds past the largest bf16: infinity
        0x00400000: 0x0000,  # a denormal: zero
        0x80400000: 0x8000,  # a negative denormal: -0
        0x007FFFFF: 0x0000,  # the largest denormal would round to the smallest normal; it is read as zero
        0x7F800001: 0x7FC0,  # a signalling NaN becomes quiet
        0xFFA00000: 0xFFE0,
        0x7FC00000: 0x7FC0,
    }
    src = f32(list(cases))
    assert [int(v) for v in bf16.to_bf16(src)] == list(cases.values())
    assert [int(v) for v in bf16.convert_bf16(src[None])[0]] == list(cases.values())


@needs_bf16
def test_vcvtne2ps2bf16_matches_the_model():
    bits = RNG.integers(0, 2**32, size=(512, 32), dtype=np.uint64).astype(np.uint32)
    bits[::7, ::3] &= 0x807FFFFF  # denormals and zeros
    bits[::5, 1::4] |= 0x7F800000  # infinities and NaNs
    src = bits.view(np.float32)
    hw, _ = bf16.instructions(src, np.zeros((512, 16), np.float32), np.zeros((512, 32), np.uint16),
                              np.zeros((512, 32), np.uint16))
    assert np.array_equal(hw, bf16.to_bf16(src))


# ----------------------------------------------------------------------------------------------
# vdpbf16ps


@needs_bf16
@pytest.mark.parametrize("exponents", [(100, 160), (1, 255), (250, 256), (0, 70), (0, 3)])
def test_vdpbf16ps_matches_the_model(exponents):
    """Normal values, the whole range (overflow to inf and inf - inf), specials, and denormal products/inputs."""
    rows = 600
    a, b = random_bf16((rows, 32), exponents), random_bf16((rows, 32), exponents)
    acc = bf16.from_bf16(random_bf16((rows, 16), exponents))
    _, hw = bf16.instructions(np.zeros((rows, 32), np.float32), acc, a, b)
    assert same_bits(hw, bf16.dpbf16ps(acc, a, b))


def test_dpbf16ps_model_odd_pair_first_and_rounding():
    one, tiny = np.uint16(0x3F80), np.uint16(0x3380)  # 1.0 and 2^-24
    acc = np.zeros((1, 1), np.float32)
    # (a0*b0, a1*b1) = (2^-24, 1): 1 first, then 1 + 2^-24 rounds back to 1 (a tie, to even)
    assert bf16.dpbf16ps(acc, np.array([[tiny, one]]), np.array([[one, one]]))[0, 0] == 1.0
    # (1, 2^-24): 2^-24 first, then 1 + 2^-24 -> still 1.0; with acc = 2^-24 - the tie breaks the other way
    acc = np.full((1, 1), 2.0**-24, np.float32)
    got = bf16.dpbf16ps(acc, np.array([[one, tiny]]), np.array([[one, one]]))[0, 0]
    assert got == np.float32(1 + 2.0**-23)  # 2^-24 + 2^-24 = 2^-23 exactly, then + 1
    # an exact product beyond float32's range does not overflow until it is added
    big = np.uint16(0x7F00)  # 2^127
    acc = np.zeros((1, 1), np.float32)
    assert bf16.dpbf16ps(acc, np.array([[one, big]]), np.array([[one, big]]))[0, 0] == np.inf


# ----------------------------------------------------------------------------------------------
# GEMM


SHAPES = [(1, 1, 1), (1, 3, 5), (7, 13, 70), (6, 64, 64), (13, 129, 130), (100, 300, 65)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_paths_bit_identical_to_the_reference(path, shape):
    m, k, n = shape
    a = (RNG.standard_normal((m, k)) * np.exp2(RNG.integers(-30, 30, (m, k)))).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    assert same_bits(bf16.gemm_bf16(a, b, path), bf16.gemm_reference(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_gemm_specials_and_denormals_bit_identical(path):
    a, b = random_bf16((13, 40), (0, 255)), random_bf16((40, 70), (0, 255))
    a[0, :6] = [0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x8001, 0x0000]  # inf, -inf, NaN, denormals, zero
    assert same_bits(bf16.gemm_bf16(a, b, path), bf16.gemm_reference(a, b))
    packed = bf16.pack_bf16(b)
    assert same_bits(bf16.gemm_bf16(a, packed, path), bf16.gemm_reference(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_gemm_within_the_documented_bound_of_float64(path):
    m, k, n = 20, 500, 70
    a = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    c = bf16.gemm_bf16(a, b, path).astype(np.float64)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.all(np.abs(c - exact) <= (2 * 2.0**-8 + 2.0**-16 + k * 2.0**-24) * scale)
    # against float64 products of the bf16-rounded operands, only the float32 accumulation remains
    ab, bb = (bf16.round_bf16(x).astype(np.float64) for x in (a, b))
    assert np.all(np.abs(c - ab @ bb) <= k * 2.0**-24 * (np.abs(ab) @ np.abs(bb)))
    assert np.abs(c - exact).max() > 1e-4  # bf16's 8 bits are visible: this is not an fp32 product


@needs_bf16
def test_gemm_f32_is_an_fp32_gemm():
    a, b = RNG.standard_normal((50, 300)).astype(np.float32), RNG.standard_normal((300, 70)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = 300 * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    assert np.all(np.abs(bf16.gemm_f32(a, b) - exact) <= bound)


# ----------------------------------------------------------------------------------------------
# path choice and errors


def test_path_follows_numba_compile_target(monkeypatch):
    monkeypatch.setattr(bf16, "compile_target_features", lambda: {"avx2", "fma"})
    bf16.bf16_isa.cache_clear()
    try:
        assert bf16.bf16_path("auto") == "emulated"
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            bf16.bf16_path("fast")
    finally:
        bf16.bf16_isa.cache_clear()


def test_compile_target_features_honours_numba_cpu_name(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "skylake-avx512")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+fma,-avx512bf16")
    assert bf16.compile_target_features() == {"avx512f", "fma"}


def test_amx_path_refuses_clearly_without_amx():
    from workshop_lib import amx

    usable, reason = amx.amx_bf16_status()
    if usable:
        pytest.skip("this CPU has AMX-BF16")
    with pytest.raises(RuntimeError, match="path='amx' needs AMX-BF16"):
        bf16.gemm_bf16(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), path="amx")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="a.dtype=float64 must be float32"):
        bf16.gemm_bf16(np.ones((2, 2)), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"a.shape\[1\]=3 must equal b.shape\[0\]=2"):
        bf16.gemm_bf16(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="path='gpu'"):
        bf16.gemm_bf16(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), path="gpu")


# ----------------------------------------------------------------------------------------------
# convolution


@pytest.mark.parametrize("path", PATHS)
def test_conv_forward_backward_match_bf16_rounded_float64(path):
    x = RNG.standard_normal((2, 9, 8, 5)).astype(np.float32)
    w = RNG.standard_normal((3, 3, 5, 7)).astype(np.float32)
    bias = RNG.standard_normal(7).astype(np.float32)
    pads = ((1, 1), (1, 1))
    xr, wr = bf16.round_bf16(x), bf16.round_bf16(w)
    y = bf16.conv2d_bf16(x, w, 1, "SAME", bias=bias, relu=True, path=path)
    expected = np.maximum(conv_reference(xr, wr, pads) + bias, 0)
    k = 3 * 3 * 5
    scale = conv_reference(np.abs(xr), np.abs(wr), pads)
    assert np.all(np.abs(y - expected) <= k * 2.0**-24 * scale + 2.0**-24 * np.abs(expected))
    # bit for bit: the forward is the reference GEMM of the columns
    from workshop_lib import kernels
    cols, _ = kernels.im2col_nhwc(bf16.to_bf16(x), (3, 3), 1, pads)
    ref = bf16.gemm_reference(cols, bf16.to_bf16(w).reshape(-1, 7)).reshape(y.shape)
    assert same_bits(y, np.maximum(ref + bias, 0))
    # gradients: d(sum(conv * g))/dx and /dw by float64 on the bf16-rounded operands
    g = RNG.standard_normal((2, 9, 8, 7)).astype(np.float32)
    dx, dw = bf16.conv2d_backward_bf16(g, x, w, 1, "SAME", path=path)
    gr = bf16.round_bf16(g).astype(np.float64)
    dw_exp = np.zeros(w.shape)
    xp = np.pad(xr.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(3):
        for j in range(3):
            dw_exp[i, j] = np.einsum("nhwc,nhwk->ck", xp[:, i : i + 9, j : j + 8], gr)
    assert np.allclose(dw, dw_exp, rtol=1e-5, atol=1e-4)
    dx_exp = np.zeros((2, 11, 10, 5))
    for i in range(3):
        for j in range(3):
            dx_exp[:, i : i + 9, j : j + 8] += gr @ wr[i, j].astype(np.float64).T
    assert np.allclose(dx, dx_exp[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-4)


def test_workshop_check_names_the_bf16_path(capsys):
    from workshop_lib import cli

    cli.main(["check", "--no-mpi"])
    out = capsys.readouterr().out
    assert f"bf16 kernels: {bf16.bf16_path('auto')} (" in out
