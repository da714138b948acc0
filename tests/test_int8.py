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
