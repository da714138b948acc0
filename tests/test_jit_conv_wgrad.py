"""workshop_lib.jit_conv's weight gradient (backward-weights) against float64 numpy and central differences."""

import numpy as np
from numba.core import config
import pytest

from workshop_lib import jit_conv as J
from workshop_lib import kernels as K

RNG = np.random.default_rng(2026)

CASES = [  # N, H, W, C, K, R, S, padding
    (2, 14, 14, 32, 64, 5, 5, "SAME"),  # conv2 of the labs' CNN, two images
    (3, 15, 11, 1, 32, 5, 5, "SAME"),  # conv1's shape: one input channel, tiles over the taps
    (1, 1, 1, 3, 10, 3, 3, "SAME"),  # one pixel: every tap but the centre sees only padding
    (2, 7, 9, 3, 16, 3, 3, "VALID"),
    (4, 5, 6, 32, 10, 1, 1, "VALID"),  # 1x1 filter, K not a multiple of 8 or 16
    (1, 6, 13, 32, 32, 3, 3, ((2, 0), (1, 3))),  # explicit, lopsided pads
    (2, 4, 3, 1, 64, 5, 5, ((3, 3), (4, 4))),  # pads wider than the filter's reach
    (3, 9, 8, 3, 40, 5, 5, "SAME"),  # odd C, several panels of K, the last one partly masked
    (2, 10, 10, 13, 33, 3, 3, "SAME"),  # a remainder of channels and of output channels
]


def lanes_or_skip(lanes):
    have = J.simd_lanes()
    if have is None or (lanes == 16 and have != 16):
        pytest.skip(f"this CPU has no {lanes}-lane float32 FMA kernels (simd_lanes() = {have})")
    return lanes


def pads_of(h, w, r, s, padding):
    return K.conv2d_cache(np.zeros((1, h, w, 1)), np.zeros((r, s, 1, 1)), 1, padding).pads


def dw_reference(x, dy, r, s, pads):
    """float64: pad x, then one einsum per tap (r, s) over images and output pixels."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = dy.shape[1:3]
    dw = np.zeros((r, s, x.shape[3], dy.shape[3]))
    for i in range(r):
        for j in range(s):
            dw[i, j] = np.einsum("nhwc,nhwk->ck", xp[:, i : i + oh, j : j + ow, :], dy.astype(np.float64))
    return dw


def conv_reference(x, w, pads):
    """float64 NHWC stride-1 convolution, one einsum per tap."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    r, s = w.shape[:2]
    oh, ow = xp.shape[1] - r + 1, xp.shape[2] - s + 1
    return sum(np.einsum("nhwc,ck->nhwk", xp[:, i : i + oh, j : j + ow, :], w[i, j].astype(np.float64))
               for i in range(r) for j in range(s))


def random_case(n, h, w, c, k, r, s, padding):
    pads = pads_of(h, w, r, s, padding)
    oh, ow = h + sum(pads[0]) - r + 1, w + sum(pads[1]) - s + 1
    x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
    dy = RNG.standard_normal((n, oh, ow, k)).astype(np.float32)
    return x, dy, pads


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-k{c[4]}-{c[5]}x{c[6]}-{c[7]}" for c in CASES])
def test_backward_filter_matches_float64_einsum_reference(case, lanes):
    lanes_or_skip(lanes)
    n, h, w, c, k, r, s, padding = case
    x, dy, pads = random_case(*case)
    dw = J.conv2d_backward_filter_nhwc(x, dy, r, s, pads, _lanes=lanes)
    expected = dw_reference(x, dy, r, s, pads)
    assert dw.shape == (r, s, c, k) and dw.dtype == np.float32 and dw.flags.c_contiguous
    # float32 sums of up to N*OH*OW products of unit normals: error ~ eps32 * sqrt(terms) * |term|
    np.testing.assert_allclose(dw, expected, rtol=0, atol=2e-5 * np.sqrt(x.shape[0] * dy.shape[1] * dy.shape[2]))


@pytest.mark.parametrize("lanes", [16, 8])
def test_every_thread_count_and_split_gives_the_same_sums(lanes):
    import numba

    lanes_or_skip(lanes)
    before = numba.get_num_threads()
    for n in (1, 5):  # fewer images than threads: the tiles are split; more: the images are
        x, dy, pads = random_case(n, 9, 9, 32, 64, 5, 5, "SAME")
        expected = dw_reference(x, dy, 5, 5, pads)
        try:
            for threads in sorted({1, before}):
                numba.set_num_threads(threads)
                dw = J.conv2d_backward_filter_nhwc(x, dy, 5, 5, pads, _lanes=lanes)
                np.testing.assert_allclose(dw, expected, rtol=0, atol=1e-4)
        finally:
            numba.set_num_threads(before)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 2), (1, 0))])
def test_conv_weight_gradient_matches_central_differences(padding):
    lanes_or_skip(8)
    x = RNG.standard_normal((2, 5, 6, 3)).astype(np.float32)
    w = RNG.standard_normal((3, 3, 3, 10)).astype(np.float32)
    out, cache = K.conv2d_forward(x, w, 1, padding)
    g = RNG.standard_normal(out.shape)  # loss = sum(conv(x, w) * g)
    assert K._direct_wgrad_fits("blas", cache.stride, x, out)  # the path under test, not im2col
    _, dw = K.conv2d_backward(g.astype(np.float32), cache, need_dx=False)
    w64, eps = w.astype(np.float64), 1e-3
    numeric = np.zeros_like(w64)
    for idx in np.ndindex(w.shape):
        old = w64[idx]
        w64[idx] = old + eps
        up = np.sum(conv_reference(x, w64, cache.pads) * g)
        w64[idx] = old - eps
        down = np.sum(conv_reference(x, w64, cache.pads) * g)
        w64[idx] = old
        numeric[idx] = (up - down) / (2 * eps)
    np.testing.assert_allclose(dw, numeric, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_conv2d_backward_dw_matches_im2col_gemm_without_the_forward_columns(data_format):
    lanes_or_skip(8)
    x = RNG.standard_normal((3, 8, 7, 5)).astype(np.float32)
    w = RNG.standard_normal((5, 5, 5, 12)).astype(np.float32)
    if data_format == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    out, cache = K.conv2d_forward(x, w, 1, "SAME", data_format, algorithm="direct")
    assert cache.cols is None
    dout = RNG.standard_normal(out.shape).astype(np.float32)
    dx, dw = K.conv2d_backward(dout, cache)
    dx_ref, dw_ref = K.conv2d_backward(dout, cache, gemm="reference")  # im2col + the reference GEMM
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)


def test_a_numba_target_without_fma_vectors_falls_back_to_im2col(monkeypatch):
    x = RNG.standard_normal((2, 6, 6, 3)).astype(np.float32)
    w = RNG.standard_normal((3, 3, 3, 4)).astype(np.float32)
    out, cache = K.conv2d_forward(x, w, 1, "SAME")
    dout = RNG.standard_normal(out.shape).astype(np.float32)
    try:
        for features, lanes in (("", None), ("+avx,+avx2,+fma", 8), ("+avx2,+fma,+avx512f", 16)):
            monkeypatch.setattr(config, "CPU_NAME", "sandybridge")
            monkeypatch.setattr(config, "CPU_FEATURES", features)
            J.simd_lanes.cache_clear()
            assert J.simd_lanes() == lanes
        monkeypatch.setattr(config, "CPU_FEATURES", "")
        J.simd_lanes.cache_clear()
        assert not K._direct_wgrad_fits("blas", (1, 1), x, out)
        with pytest.raises(RuntimeError, match="AVX-512F or AVX2"):
            J.conv2d_backward_filter_nhwc(x, dout, 3, 3, cache.pads)
        _, dw = K.conv2d_backward(dout, cache, need_dx=False)
    finally:
        monkeypatch.undo()
        J.simd_lanes.cache_clear()
    np.testing.assert_allclose(dw, dw_reference(x, dout, 3, 3, cache.pads), rtol=0, atol=1e-4)


def test_only_stride_1_float32_with_blas_takes_the_direct_kernel():
    x32, x64 = np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4, 4, 2))
    fits = J.simd_lanes() is not None
    assert K._direct_wgrad_fits("blas", (1, 1), x32, x32) == fits
    assert not K._direct_wgrad_fits("reference", (1, 1), x32, x32)
    assert not K._direct_wgrad_fits("blas", (2, 1), x32, x32)
    assert not K._direct_wgrad_fits("blas", (1, 1), x64, x32)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x.astype(np.float64), dy, 3, 3, ((1, 1), (1, 1))), TypeError,
     r"x.dtype=float64 must be float32"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy[..., 0], 3, 3, ((1, 1), (1, 1))), ValueError,
     r"dy.shape=\(2, 5, 6\) must be 4-D"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy[:, 1:], 3, 3, ((1, 1), (1, 1))), ValueError,
     r"dy.shape=\(2, 4, 6, 4\) must be \(N, OH, OW, K\) = \(2, 5, 6, K >= 1\)"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy, 3, 3, "SAME"), ValueError, r"pads='SAME' must be"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy, 3, 3, ((1, -1), (1, 1))), ValueError, r"non-negative"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy, 0, 3, ((1, 1), (1, 1))), ValueError, r"r"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy, 9, 3, ((1, 1), (1, 1))), ValueError,
     r"must hold at least one 9x3 window"),
    (lambda x, dy: J.conv2d_backward_filter_nhwc(x, dy, 3, 3, ((1, 1), (1, 1)), _lanes=4), ValueError,
     r"_lanes=4 must be None, 16 or 8"),
])
def test_bad_arguments_are_refused_with_their_values(call, error, match):
    x = np.zeros((2, 5, 6, 3), np.float32)
    dy = np.zeros((2, 5, 6, 4), np.float32)
    with pytest.raises(error, match=match):
        call(x, dy)
