"""workshop_lib.int8: every path bit for bit equal to exact integer arithmetic (Python ints / int64)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workshop_lib import int8

RNG = np.random.default_rng(7)
HAS_VNNI = int8.vnni_isa() is not None
PATHS = ["reference", "portable"] + (["fast"] if HAS_VNNI else [])


def wrap32(x):
    """Two's-complement wrap of exact integers to int32, as a 32-bit accumulator does."""
    return ((np.asarray(x, dtype=object) + 2**31) % 2**32 - 2**31).astype(np.int64).astype(np.int32)


def vnni_spec(a, b):
    return wrap32(a.astype(object) @ b.astype(object))


def avx512bw_spec(a, b):
    """Pairs of u8 x s8 products summed with s16 saturation, then added in s32 (Python ints: no overflow)."""
    k = a.shape[1]
    kp = k + (-k % 2)
    ap = np.zeros((a.shape[0], kp), dtype=object)
    bp = np.zeros((kp, b.shape[1]), dtype=object)
    ap[:, :k], bp[:k] = a.astype(object), b.astype(object)
    total = np.zeros((a.shape[0], b.shape[1]), dtype=object)
    for t in range(0, kp, 2):
        pair = np.outer(ap[:, t], bp[t]) + np.outer(ap[:, t + 1], bp[t + 1])
        total += np.clip(pair.astype(np.int64), -32768, 32767).astype(object)
    return wrap32(total)


SHAPES = [(1, 1, 1), (1, 3, 5), (7, 13, 70), (6, 64, 64), (13, 130, 129), (64, 300, 200)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_vnni_matches_exact_integer_reference(path, shape):
    m, k, n = shape
    a = RNG.integers(0, 256, (m, k), dtype=np.uint8)
    b = RNG.integers(-128, 128, (k, n), dtype=np.int8)
    np.testing.assert_array_equal(int8.gemm_u8s8s32(a, b, path=path), vnni_spec(a, b))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fill_a, fill_b", [(255, 127), (255, -128), (0, -128), (128, -1)])
def test_vnni_extreme_values_wrap_like_the_hardware(path, fill_a, fill_b):
    k = 70_001  # 255 * -128 * 70001 overflows int32: the accumulator wraps around
    a = np.full((2, k), fill_a, dtype=np.uint8)
    b = np.full((k, 3), fill_b, dtype=np.int8)
    got = int8.gemm_u8s8s32(a, b, path=path)
    np.testing.assert_array_equal(got, vnni_spec(a, b))


@pytest.mark.parametrize("shape", SHAPES[:5])
def test_avx512bw_matches_saturating_specification(shape):
    m, k, n = shape
    a = RNG.integers(0, 256, (m, k), dtype=np.uint8)
    b = RNG.integers(-128, 128, (k, n), dtype=np.int8)
    np.testing.assert_array_equal(int8.gemm_u8s8s32(a, b, semantics="avx512bw"), avx512bw_spec(a, b))


def test_saturation_changes_the_answer_only_on_the_avx512bw_path():
    a = np.array([[255, 255, 255, 255]], dtype=np.uint8)
    b = np.array([[127], [127], [-128], [-128]], dtype=np.int8)
    assert int8.gemm_u8s8s32(a, b, semantics="vnni")[0, 0] == 255 * 127 * 2 - 255 * 128 * 2 == -510
    # pairs: 64770 -> 32767 and -65280 -> -32768, so the answer is -1
    assert int8.gemm_u8s8s32(a, b, semantics="avx512bw")[0, 0] == -1
    assert int8.maddubs_pair(255, 127, 255, 127) == 32767
    assert int8.maddubs_pair(255, -128, 255, -128) == -32768
    assert int8.maddubs_pair(100, 100, 27, 10) == 10270


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_all_paths_agree_on_arbitrary_shapes(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    expected = vnni_spec(a, b)
    for path in PATHS:
        np.testing.assert_array_equal(int8.gemm_u8s8s32(a, b, path=path), expected)
    np.testing.assert_array_equal(int8.gemm_u8s8s32(a, b, semantics="avx512bw"), avx512bw_spec(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_s16_gemm_matches_wrapping_vpdpwssd(path):
    a = RNG.integers(-32768, 32768, (9, 37), dtype=np.int16)
    b = RNG.integers(-32768, 32768, (37, 70), dtype=np.int16)
    np.testing.assert_array_equal(int8.gemm_s16s16s32(a, b, path=path), vnni_spec(a, b))
    a = np.full((1, 4), -32768, dtype=np.int16)
    b = np.full((4, 1), -32768, dtype=np.int16)  # each pair sums to 2^31: wraps to -2^31
    np.testing.assert_array_equal(int8.gemm_s16s16s32(a, b, path=path), vnni_spec(a, b))


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no VNNI")
def test_fast_path_really_issues_vpdpbusd():
    gemm = int8._fast_gemm("vpdpbusd", 16 if int8.vnni_isa() == "avx512_vnni" else 8)
    a = np.ones((6, 8), np.uint8)
    int8.gemm_u8s8s32(a, np.ones((8, 64), np.int8), path="fast")
    assert "vpdpbusd" in gemm.inspect_asm(gemm.signatures[0])


@pytest.mark.skipif(int8.vnni_isa() != "avx512_vnni", reason="needs AVX512-VNNI to run the 256-bit kernel too")
def test_256_bit_kernel_of_avx_vnni_machines_is_exact():
    a = RNG.integers(0, 256, (13, 45), dtype=np.uint8)
    b = RNG.integers(-128, 128, (45, 50), dtype=np.int8)
    got = int8._run_fast(a, int8.PackedWeights(b, 8), "vpdpbusd")
    np.testing.assert_array_equal(got, vnni_spec(a, b))


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no VNNI")
def test_packed_weights_are_reusable():
    b = RNG.integers(-128, 128, (100, 30), dtype=np.int8)
    packed = int8.pack_weights(b)
    for m in (1, 7, 64):
        a = RNG.integers(0, 256, (m, 100), dtype=np.uint8)
        np.testing.assert_array_equal(int8.gemm_u8s8s32(a, packed), vnni_spec(a, b))


def test_int8_conv_matches_integer_reference():
    x = RNG.integers(0, 256, (2, 7, 6, 3), dtype=np.uint8)
    w = RNG.integers(-128, 128, (3, 3, 3, 5), dtype=np.int8)
    got = int8.conv2d_u8s8s32(x, w, stride=1, padding="SAME", pad_value=10)
    xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=10)
    ref = np.zeros((2, 7, 6, 5), dtype=np.int64)
    for r in range(3):
        for s in range(3):
            ref += np.einsum("nhwc,ck->nhwk", xp[:, r : r + 7, s : s + 6], w[r, s].astype(np.int64))
    np.testing.assert_array_equal(got, ref.astype(np.int32))


def test_bad_inputs_raise_clearly():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(TypeError, match="a.dtype=float32 must be uint8"):
        int8.gemm_u8s8s32(a.astype(np.float32), np.zeros((3, 2), np.int8))
    with pytest.raises(TypeError, match="b.dtype=uint8 must be int8"):
        int8.gemm_u8s8s32(a, np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match=r"a.shape\[1\]=3 must equal b.shape\[0\]=4"):
        int8.gemm_u8s8s32(a, np.zeros((4, 2), np.int8))
    with pytest.raises(ValueError, match="semantics='avx2'"):
        int8.gemm_u8s8s32(a, np.zeros((3, 2), np.int8), semantics="avx2")
    with pytest.raises(ValueError, match="a.shape=.* must be 2-D"):
        int8.gemm_u8s8s32(np.zeros(3, np.uint8), np.zeros((3, 2), np.int8))


@pytest.mark.skipif(not HAS_VNNI, reason="packing is for the fast VNNI kernel")
def test_weights_packed_from_int16_are_refused_by_the_u8s8_gemm_and_vice_versa():
    """gemm_u8s8s32 used to multiply int16-packed weights (groups of 2) as if they were int8 (groups of 4)."""
    a8 = RNG.integers(0, 256, (3, 8), dtype=np.uint8)
    packed16 = int8.pack_weights(RNG.integers(-300, 300, (8, 5), dtype=np.int16))
    with pytest.raises(TypeError, match="b holds weights packed from int16, which must be int8"):
        int8.gemm_u8s8s32(a8, packed16)
    packed8 = int8.pack_weights(RNG.integers(-128, 128, (8, 5), dtype=np.int8))
    with pytest.raises(TypeError, match="b holds weights packed from int8, which must be int16"):
        int8.gemm_s16s16s32(np.zeros((3, 8), np.int16), packed8)
    with pytest.raises(ValueError, match="packed weights are for the fast VNNI path only"):
        int8.gemm_s16s16s32(np.zeros((3, 8), np.int16), int8.pack_weights(np.zeros((8, 5), np.int16)), path="portable")
    packed8.data = packed8.data[:, :, :8]  # a hand-edited object no longer matches its lanes
    with pytest.raises(ValueError, match="is not a PackedWeights made by pack_weights"):
        int8.gemm_u8s8s32(a8, packed8)
    with pytest.raises(ValueError, match="isa='avx3' must be one of 'avx512_vnni', 'avx_vnni'"):
        int8.pack_weights(np.zeros((8, 5), np.int8), isa="avx3")
    with pytest.raises(TypeError, match="b is already a PackedWeights"):
        int8.PackedWeights(packed16, 16)
    with pytest.raises(TypeError, match="w is a PackedWeights without its kernel size"):
        int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.uint8), int8.pack_weights(np.zeros((18, 3), np.int8)))
    with pytest.raises(TypeError, match=r"w\[0\] holds weights packed from int16"):
        int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.uint8), (int8.pack_weights(np.zeros((18, 3), np.int16)), (3, 3)))


@pytest.mark.parametrize("call, error, rule", [
    (lambda: int8.gemm_s16s16s32(np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int16)), TypeError,
     "a.dtype=int8 must be int16"),
    (lambda: int8.gemm_u8s8s32(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8), "avx512bw", path="gpu"),
     ValueError, "path='gpu' must be one of"),
    (lambda: int8.gemm_u8s8s32("abc", np.zeros((3, 2), np.int8)), TypeError, "a='abc' must be a 2-D uint8 array"),
    (lambda: int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.int8), np.zeros((3, 3, 2, 1), np.int8)), TypeError,
     "x.dtype=int8 must be uint8"),
    (lambda: int8.conv2d_u8s8s32(np.zeros((4, 4, 2), np.uint8), np.zeros((3, 3, 2, 1), np.int8)), ValueError,
     r"x.shape=\(4, 4, 2\) must be 4-D NHWC"),
    (lambda: int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.uint8), np.zeros((3, 3, 2, 1), np.int8), stride=0),
     ValueError, "stride=0 must be a positive integer"),
    (lambda: int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.uint8), np.zeros((3, 3, 2, 1), np.int8), pad_value=256),
     ValueError, r"pad_value=256 must be in \[0, 255\]"),
    (lambda: int8.conv2d_u8s8s32(np.zeros((1, 4, 4, 2), np.uint8), np.zeros((5, 5, 2, 1), np.int8), padding="VALID"),
     ValueError, "does not fit the 4x4 input"),
    (lambda: int8.maddubs_pair(256, 1, 0, 0), ValueError, r"a0=256 must be in \[0, 255\]"),
    (lambda: int8.maddubs_pair(1, 128, 0, 0), ValueError, r"b0=128 must be in \[-128, 127\]"),
    (lambda: int8.saturate_s16(np.array([np.nan])), ValueError, "is not finite"),
    (lambda: int8.saturate_s16(0.5), ValueError, "must hold whole numbers"),
])
def test_bad_inputs_name_the_argument_the_value_and_the_rule(call, error, rule):
    with pytest.raises(error, match=rule):
        call()


def test_saturate_s16_is_exact_for_huge_integers_and_whole_floats():
    """np.asarray(1e30, dtype=int64) used to wrap to -2**63 before the clamp."""
    assert int8.saturate_s16(np.array([1e30, -1e30, 3.0])).tolist() == [32767, -32768, 3]
    assert int8.saturate_s16(2**70) == 32767 and int8.saturate_s16(-(2**70)) == -32768
    assert int8.saturate_s16(np.array([2**64 - 1], dtype=np.uint64)).tolist() == [32767]


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_views_give_the_same_bits_on_every_path(path):
    """The kernels read raw strides (the fast one 32-bit groups of K): views are made contiguous first."""
    a = RNG.integers(0, 256, (40, 18), dtype=np.uint8)
    b = RNG.integers(-128, 128, (40, 26), dtype=np.int8)
    a_view, b_view = a[::2, ::2].T, b[::2, 1::2]  # (9, 20) and (20, 13), neither contiguous
    expected = vnni_spec(a_view, b_view)
    np.testing.assert_array_equal(int8.gemm_u8s8s32(a_view, b_view, path=path), expected)
    x = RNG.integers(0, 256, (2, 6, 10, 3), dtype=np.uint8)[:, :, ::2]
    w = RNG.integers(-128, 128, (3, 3, 3, 8), dtype=np.int8)[..., ::2]
    got = int8.conv2d_u8s8s32(x, w, 1, "VALID", path=path)
    ref = int8.conv2d_u8s8s32(np.ascontiguousarray(x), np.ascontiguousarray(w), 1, "VALID", path="reference")
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------------------------
# Fused layers: bit for bit the composition of the primitives (s32 conv/GEMM, requantize, max-pool)

needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="the fused kernels issue vpdpbusd; this CPU has no VNNI")


def requantize_spec(acc, multiplier, bias, zero_point, relu):
    from workshop_lib.quantization import QuantParams, requantize

    out = QuantParams(np.float64(1.0), np.int32(zero_point), np.dtype(np.uint8))  # so in_scale is the multiplier
    return requantize(acc, multiplier, out, bias, relu)


def fused_conv_spec(x, w, bias, multiplier, zero_point, relu, pool, padding, pad_value):
    from workshop_lib import kernels

    acc = int8.conv2d_u8s8s32(x, w, 1, padding, pad_value, path="reference")
    out = requantize_spec(acc, multiplier, bias, zero_point, relu)
    return kernels.maxpool_forward(out, 2, 2)[0] if pool == 2 else out


def random_layer(rng, shape_w, scale=(1e-5, 1e-3)):
    w = rng.integers(-128, 128, shape_w, dtype=np.int8)
    k = shape_w[-1]
    return w, rng.integers(-60_000, 60_000, k), rng.uniform(*scale, k)


CONV_CASES = [  # (N, H, W, C), (R, S, K), pool, padding: MNIST's two layers, C = 1 and 3 (expanded), no pool, VALID
    ((3, 28, 28, 1), (5, 5, 32), 2, "SAME"), ((2, 14, 14, 32), (5, 5, 64), 2, "SAME"),
    ((2, 9, 11, 8), (3, 3, 48), 1, "SAME"), ((2, 10, 12, 3), (3, 3, 20), 2, "VALID"),
    ((1, 7, 9, 16), (3, 2, 64), 1, "VALID"), ((2, 6, 6, 4), (1, 1, 10), 1, "SAME"),
]


@needs_vnni
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("x_shape, w_shape, pool, padding", CONV_CASES)
def test_fused_conv_is_bit_identical_to_the_primitives(x_shape, w_shape, pool, padding, relu):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = rng.integers(0, 256, x_shape, dtype=np.uint8)
    r, s, k = w_shape
    w, bias, multiplier = random_layer(rng, (r, s, x_shape[3], k))
    zero_point = int(rng.integers(0, 30))
    got = int8.conv2d_u8s8u8_fused(x, int8.pack_fused_weights(w), bias, multiplier, zero_point, relu, pool, padding,
                                   pad_value=7)
    expected = fused_conv_spec(x, w, bias, multiplier, zero_point, relu, pool, padding, 7)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 20  # the outputs are spread over the range, not all clamped


@needs_vnni
@pytest.mark.parametrize("fill_x, fill_w", [(255, 127), (255, -128), (0, 5), (128, -1)])
def test_fused_conv_saturates_like_requantize(fill_x, fill_w):
    rng = np.random.default_rng(fill_x + 128 * abs(fill_w))
    x = np.full((2, 6, 8, 32), fill_x, dtype=np.uint8)
    x[0, 1:4, 2:5] = rng.integers(0, 256, (3, 3, 32))  # some pixels away from the extremes
    w = np.full((3, 3, 32, 32), fill_w, dtype=np.int8)
    bias = np.linspace(-(2**31), 2**31 - 1, 32).astype(np.int64)  # the s32 extremes included
    multiplier = np.geomspace(1e-9, 10.0, 32)  # from all-but-zero to saturating at 255
    for relu, zero_point in ((True, 0), (True, 200), (False, 3)):
        got = int8.conv2d_u8s8u8_fused(x, int8.pack_fused_weights(w), bias, multiplier, zero_point, relu, 2)
        expected = fused_conv_spec(x, w, bias, multiplier, zero_point, relu, 2, "SAME", 0)
        np.testing.assert_array_equal(got, expected)
        assert expected.max() == 255 and expected.min() == (zero_point if relu else 0)


@needs_vnni
def test_fused_conv_writes_the_next_layers_padding():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    w, bias, multiplier = random_layer(rng, (5, 5, 1, 32))
    packed = int8.pack_fused_weights(w)
    bordered = int8.conv2d_u8s8u8_fused(x, packed, bias, multiplier, 9, True, 2, out_pad=2)
    plain = int8.conv2d_u8s8u8_fused(x, packed, bias, multiplier, 9, True, 2)
    assert bordered.shape == (2, 18, 18, 32)
    np.testing.assert_array_equal(bordered[:, 2:-2, 2:-2], plain)
    np.testing.assert_array_equal(np.pad(plain, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=9), bordered)
    # the next layer reads the border with VALID padding: the same as SAME padding with the zero point
    w2, bias2, multiplier2 = random_layer(rng, (5, 5, 32, 64))
    packed2 = int8.pack_fused_weights(w2)
    np.testing.assert_array_equal(
        int8.conv2d_u8s8u8_fused(bordered, packed2, bias2, multiplier2, 0, True, 2, padding="VALID"),
        int8.conv2d_u8s8u8_fused(plain, packed2, bias2, multiplier2, 0, True, 2, padding="SAME", pad_value=9))


@needs_vnni
@pytest.mark.parametrize("shape", [(1, 3, 5), (7, 13, 70), (13, 130, 129), (64, 300, 16), (33, 1024, 10)])
def test_fused_gemms_are_bit_identical_to_the_primitives(shape):
    m, k, n = shape
    rng = np.random.default_rng(m * k * n)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b, bias, multiplier = random_layer(rng, (k, n), (1e-4, 1e-2))
    packed = int8.pack_fused_weights(b)
    acc = int8.gemm_u8s8s32(a, b, path="reference")
    for relu, zero_point in ((True, 0), (False, 128)):
        np.testing.assert_array_equal(int8.gemm_u8s8u8_fused(a, packed, bias, multiplier, zero_point, relu),
                                      requantize_spec(acc, multiplier, bias, zero_point, relu))
    logits = int8.gemm_u8s8f32_fused(a, packed, bias, multiplier)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, ((acc.astype(np.int64) + bias) * multiplier).astype(np.float32))


@needs_vnni
def test_fused_gemm_requantizes_the_wrapped_accumulator():
    k = 70_001  # 255 * -128 * 70001 overflows int32: requantize sees the wrapped s32, as the hardware gives it
    a = np.full((9, k), 255, dtype=np.uint8)
    b = np.full((k, 16), -128, dtype=np.int8)
    acc = vnni_spec(a, b)
    assert acc[0, 0] == 255 * -128 * k + 2**32
    multiplier = np.full(16, 1e-7)
    got = int8.gemm_u8s8u8_fused(a, int8.pack_fused_weights(b), np.zeros(16, np.int64), multiplier, 0, True)
    np.testing.assert_array_equal(got, requantize_spec(acc, multiplier, None, 0, True))


@needs_vnni
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(4, 10), st.integers(1, 9), st.integers(1, 40),
       st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_fused_conv_agrees_on_arbitrary_shapes(n, h, w, c, k, r, s, pool, seed):
    rng = np.random.default_rng(seed)
    h, w = h + h % 2 * (pool - 1), w + w % 2 * (pool - 1)  # pool=2 needs even sizes
    x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    wt, bias, multiplier = random_layer(rng, (r, s, c, k))
    got = int8.conv2d_u8s8u8_fused(x, int8.pack_fused_weights(wt), bias, multiplier, 1, True, pool, pad_value=2)
    np.testing.assert_array_equal(got, fused_conv_spec(x, wt, bias, multiplier, 1, True, pool, "SAME", 2))


@needs_vnni
def test_fused_kernels_really_issue_vpdpbusd():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 4, 4, 4), dtype=np.uint8)
    w, bias, multiplier = random_layer(rng, (3, 3, 4, 64))
    packed = int8.pack_fused_weights(w)
    int8.conv2d_u8s8u8_fused(x, packed, bias, multiplier)
    conv = int8._fused_conv_driver(packed.nv, packed.lanes, 1)
    assert "vpdpbusd" in conv.inspect_asm(conv.signatures[0])
    a = rng.integers(0, 256, (8, 36), dtype=np.uint8)
    int8.gemm_u8s8u8_fused(a, int8.pack_fused_weights(w.reshape(36, 64)), bias, multiplier)
    gemm = int8._fused_gemm_driver(packed.nv, packed.lanes, "u8")
    assert "vpdpbusd" in gemm.inspect_asm(gemm.signatures[0])


@needs_vnni
def test_fused_layers_reject_bad_inputs_by_name():
    conv = int8.pack_fused_weights(np.zeros((3, 3, 4, 16), np.int8))
    fc = int8.pack_fused_weights(np.zeros((12, 16), np.int8))
    x = np.zeros((1, 6, 6, 4), np.uint8)
    with pytest.raises(TypeError, match="w must be int8"):
        int8.pack_fused_weights(np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="x must be uint8 NHWC"):
        int8.conv2d_u8s8u8_fused(x.astype(np.int8), conv, 0, 1.0)
    with pytest.raises(TypeError, match="FusedWeights of an HWIO convolution"):
        int8.conv2d_u8s8u8_fused(x, fc, 0, 1.0)
    with pytest.raises(ValueError, match=r"x.shape\[3\]=3 \(input channels\) must equal the weights' C=4"):
        int8.conv2d_u8s8u8_fused(x[..., :3], conv, 0, 1.0)
    with pytest.raises(ValueError, match="pool=3 must be 1"):
        int8.conv2d_u8s8u8_fused(x, conv, 0, 1.0, pool=3)
    with pytest.raises(ValueError, match="pool=2 needs an even output height and width; got 5 x 6"):
        int8.conv2d_u8s8u8_fused(np.zeros((1, 5, 6, 4), np.uint8), conv, 0, 1.0, pool=2)
    with pytest.raises(ValueError, match="zero_point=300 must be an integer in"):
        int8.conv2d_u8s8u8_fused(x, conv, 0, 1.0, zero_point=300)
    with pytest.raises(ValueError, match="multiplier must be finite and > 0"):
        int8.conv2d_u8s8u8_fused(x, conv, 0, -1.0)
    with pytest.raises(TypeError, match="bias must be integers"):
        int8.gemm_u8s8u8_fused(np.zeros((2, 12), np.uint8), fc, np.zeros(16, np.float32), 1.0)
    with pytest.raises(ValueError, match=r"a.shape\[1\]=11 must equal the weights' K=12"):
        int8.gemm_u8s8f32_fused(np.zeros((2, 11), np.uint8), fc, 0, 1.0)
