"""workshop_lib.jit_conv: the register-blocked convolution kernels against float64 numpy references.

Both register widths run here (16 lanes where the CPU has AVX-512F, and 8 lanes, the AVX2 kernel, which an
AVX-512 CPU runs too); backward-data is checked against central differences, against the adjoint identity
and against the im2col + col2im path of workshop_lib.kernels.
"""

import numpy as np
import pytest
from test_kernels import numerical_grad

from workshop_lib import jit_conv
from workshop_lib import kernels as K

RNG = np.random.default_rng(4321)
LANES = [lanes for lanes in (16, 8) if jit_conv.simd_lanes() is not None and lanes <= jit_conv.simd_lanes()]
needs_simd = pytest.mark.skipif(not LANES, reason="this CPU has neither AVX-512F nor AVX2 + FMA")


def conv_reference(x, w, pads):
    """Stride-1 NHWC convolution in float64: pad, then one einsum per filter tap."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    r_size, s_size, _, k = w.shape
    oh, ow = xp.shape[1] - r_size + 1, xp.shape[2] - s_size + 1
    out = np.zeros((x.shape[0], oh, ow, k))
    for r in range(r_size):
        for s in range(s_size):
            out += np.einsum("nhwc,ck->nhwk", xp[:, r : r + oh, s : s + ow], w[r, s].astype(np.float64))
    return out


def conv_backward_data_reference(dout, w, input_hw, pads):
    """dx of :func:`conv_reference` in float64: each output pixel's gradient scattered back over its window."""
    (pt, pb), (pl, pr) = pads
    n, oh, ow, _ = dout.shape
    r_size, s_size, c, _ = w.shape
    dxp = np.zeros((n, input_hw[0] + pt + pb, input_hw[1] + pl + pr, c))
    for r in range(r_size):
        for s in range(s_size):
            dxp[:, r : r + oh, s : s + ow] += np.einsum("nhwk,ck->nhwc", dout.astype(np.float64),
                                                        w[r, s].astype(np.float64))
    return dxp[:, pt : pt + input_hw[0], pl : pl + input_hw[1]]


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def same(r, s):
    return ((r - 1) // 2, r // 2), ((s - 1) // 2, s // 2)


VALID = ((0, 0), (0, 0))
CASES = [  # N, H, W, C, K, R, S, pads
    (2, 14, 14, 32, 64, 5, 5, same(5, 5)),  # the labs' conv2
    (2, 15, 13, 1, 32, 5, 5, same(5, 5)),  # conv1's C=1, odd sizes
    (1, 7, 9, 3, 10, 3, 3, same(3, 3)),  # K not a multiple of the lanes
    (3, 5, 6, 3, 16, 3, 3, VALID),
    (1, 1, 1, 32, 16, 1, 1, VALID),  # one pixel
    (2, 4, 11, 32, 32, 1, 1, ((1, 0), (0, 2))),  # 1x1 with explicit, uneven pads
    (1, 9, 15, 1, 64, 5, 5, ((0, 3), (4, 1))),
    (1, 2, 3, 3, 10, 5, 5, ((2, 2), (2, 2))),  # the filter is larger than the input
]


@needs_simd
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_float64_reference(case, lanes):
    n, h, w, c, k, r, s, pads = case
    x, wt = f32(n, h, w, c), f32(r, s, c, k)
    out = jit_conv.conv2d_nhwc_f32(x, wt, pads, lanes=lanes)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, conv_reference(x, wt, pads), rtol=1e-4, atol=1e-4)


@needs_simd
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]])
def test_bias_and_relu_epilogue_match_the_reference(case, lanes):
    n, h, w, c, k, r, s, pads = case
    x, wt, b = f32(n, h, w, c), f32(r, s, c, k), f32(k)
    ref = conv_reference(x, wt, pads) + b
    np.testing.assert_allclose(jit_conv.conv2d_nhwc_f32(x, wt, pads, b, lanes=lanes), ref, rtol=1e-4, atol=1e-4)
    relu = jit_conv.conv2d_nhwc_f32(x, wt, pads, b, relu=True, lanes=lanes)
    np.testing.assert_allclose(relu, np.maximum(ref, 0), rtol=1e-4, atol=1e-4)
    assert (relu == 0).mean() > 0.2  # the ReLU did clip: the case exercises it
    no_bias_relu = jit_conv.conv2d_nhwc_f32(x, wt, pads, relu=True, lanes=lanes)
    np.testing.assert_allclose(no_bias_relu, np.maximum(ref - b, 0), rtol=1e-4, atol=1e-4)
    x[0, 0, 0, 0] = np.nan  # a NaN passes through the ReLU, as through np.maximum(., 0)
    poisoned = jit_conv.conv2d_nhwc_f32(x, wt, pads, b, relu=True, lanes=lanes)
    np.testing.assert_array_equal(np.isnan(poisoned), np.isnan(conv_reference(x, wt, pads)))


@needs_simd
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", CASES)
def test_backward_data_matches_float64_reference_and_adjoint(case, lanes):
    n, h, w, c, k, r, s, pads = case
    x, wt = f32(n, h, w, c), f32(r, s, c, k)
    ref = conv_reference(x, wt, pads)
    dout = f32(*ref.shape)
    dx = jit_conv.conv2d_backward_data_nhwc_f32(dout, wt, (h, w), pads, lanes=lanes)
    assert dx.shape == x.shape and dx.dtype == np.float32
    np.testing.assert_allclose(dx, conv_backward_data_reference(dout, wt, (h, w), pads), rtol=1e-4, atol=1e-4)
    # <conv(x), dout> = <x, dx>: the kernel is the adjoint of the forward convolution
    np.testing.assert_allclose(np.vdot(x.astype(np.float64), dx), np.vdot(ref, dout.astype(np.float64)),
                               rtol=1e-4)


@needs_simd
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", [(1, 4, 5, 3, 10, 3, 3, same(3, 3)), (1, 3, 4, 2, 16, 5, 5, ((1, 3), (4, 0)))])
def test_backward_data_matches_central_differences_of_the_forward_kernel(case, lanes):
    n, h, w, c, k, r, s, pads = case
    x, wt = f32(n, h, w, c), f32(r, s, c, k)
    dout = f32(*conv_reference(x, wt, pads).shape)
    dx = jit_conv.conv2d_backward_data_nhwc_f32(dout, wt, (h, w), pads, lanes=lanes)

    def loss():
        return np.vdot(jit_conv.conv2d_nhwc_f32(x, wt, pads, lanes=lanes).astype(np.float64), dout)

    # the loss is linear in x, so a large step has no truncation error, and float32 rounding stays small
    np.testing.assert_allclose(dx, numerical_grad(loss, x, eps=0.5), rtol=1e-4, atol=1e-4)


@needs_simd
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 3))])
def test_kernels_jit_algorithm_matches_im2col_forward_and_backward(padding):
    x, wt, b = f32(3, 9, 14, 32), f32(5, 5, 32, 64), f32(64)
    out, cache = K.conv2d_forward(x, wt, 1, padding, algorithm="jit", bias=b, relu=True)
    ref, ref_cache = K.conv2d_forward(x, wt, 1, padding, algorithm="im2col", bias=b, relu=True)
    assert cache.cols is None and ref_cache.cols is not None  # no columns on the jit path
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    dout = f32(*out.shape)
    dx, dw = K.conv2d_backward(dout, cache, algorithm="jit")
    dx_ref, dw_ref = K.conv2d_backward(dout, ref_cache, algorithm="im2col")
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("x_dtype, stride, data_format", [(np.float64, 1, "NHWC"), (np.float32, 2, "NHWC"),
                                                           (np.float32, 1, "NCHW")])
def test_kernels_jit_algorithm_falls_back_to_im2col_where_the_kernel_does_not_apply(x_dtype, stride, data_format):
    x, wt, b = RNG.standard_normal((2, 7, 8, 3)).astype(x_dtype), f32(3, 3, 3, 5), f32(5)
    xin = x if data_format == "NHWC" else K.nhwc_to_nchw(x)
    out, cache = K.conv2d_forward(xin, wt, stride, "SAME", data_format, algorithm="jit", bias=b, relu=True)
    ref, _ = K.conv2d_forward(xin, wt, stride, "SAME", data_format, algorithm="direct", bias=b, relu=True)
    assert cache.cols is not None
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    dout = RNG.standard_normal(out.shape).astype(x_dtype)
    np.testing.assert_allclose(K.conv2d_backward(dout, cache, algorithm="jit")[0],
                               K.conv2d_backward(dout, cache, algorithm="im2col")[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lanes", [16, 8])
def test_tile_shapes_fit_the_rows_and_the_vector_registers(lanes):
    registers, broadcast = (32 if lanes == 16 else 16), 1
    for n_vectors in range(1, 9):
        for out_w in range(1, 60):
            pixels, nv = jit_conv._tile_shape(n_vectors, out_w, lanes)
            assert 1 <= pixels <= out_w, (n_vectors, out_w)
            assert pixels * nv + nv + broadcast <= registers, (n_vectors, out_w)
            tiles = -(-out_w // pixels)
            assert tiles * pixels - out_w < tiles, (n_vectors, out_w)  # the overlap recomputes < 1 pixel per tile


def test_no_kernel_when_numba_compiles_for_another_cpu(monkeypatch):
    from numba.core import config

    K.conv2d_forward(f32(1, 3, 3, 1), f32(1, 1, 1, 2), 1, "VALID", algorithm="im2col")  # loaded before the patch:
    # numba keys its on-disk cache by CPU name, so a first load under the fake name would file host code as stock's
    jit_conv.simd_lanes.cache_clear()
    monkeypatch.setattr(config, "CPU_NAME", "sandybridge")
    try:
        assert jit_conv.simd_lanes() is None
        with pytest.raises(RuntimeError, match="neither AVX-512F nor AVX2"):
            jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 1), f32(1, 1, 1, 1), VALID)
        _, cache = K.conv2d_forward(f32(1, 3, 3, 1), f32(1, 1, 1, 2), 1, "VALID", algorithm="jit")
        assert cache.cols is not None  # im2col ran instead
    finally:
        jit_conv.simd_lanes.cache_clear()


@pytest.mark.parametrize("call, error, match", [
    (lambda: jit_conv.conv2d_nhwc_f32(np.ones((1, 3, 3, 1)), f32(1, 1, 1, 1), VALID, lanes=8), TypeError,
     "x must be a 4-D float32 array"),
    (lambda: jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 2), f32(1, 1, 1, 1), VALID, lanes=8), ValueError,
     r"x.shape\[3\]=2 must equal w.shape\[2\]=1"),
    (lambda: jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 1), f32(1, 1, 1, 1), ((0, -1), (0, 0)), lanes=8), ValueError,
     "pads=.* non-negative"),
    (lambda: jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 1), f32(5, 5, 1, 1), VALID, lanes=8), ValueError,
     "does not fit the padded input"),
    (lambda: jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 1), f32(1, 1, 1, 4), VALID, f32(3), lanes=8), ValueError,
     r"bias.shape=\(3,\) must be \(4,\)"),
    (lambda: jit_conv.conv2d_nhwc_f32(f32(1, 3, 3, 1), f32(1, 1, 1, 1), VALID, lanes=4), ValueError,
     "lanes=4 must be 16"),
    (lambda: jit_conv.conv2d_backward_data_nhwc_f32(f32(1, 3, 3, 2), f32(3, 3, 1, 2), (3, 3), VALID, lanes=8),
     ValueError, r"dout.shape=\(1, 3, 3, 2\) must be \(N, 1, 1, 2\)"),
    (lambda: K.conv2d_forward(f32(1, 3, 3, 1), f32(1, 1, 1, 4), algorithm="jit", bias=f32(3)), ValueError,
     r"bias.shape=\(3,\) must equal \(4,\)"),
    (lambda: K.conv2d_backward(f32(1, 3, 3, 1), K.conv2d_cache(f32(1, 3, 3, 1), f32(1, 1, 1, 1)), algorithm="fft"),
     ValueError, "algorithm"),
])
def test_invalid_arguments_raise_errors_that_name_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("input_hw", [(0, -3), "ab", (2.5, 4)])
def test_backward_data_names_a_bad_input_hw_instead_of_blaming_dout(input_hw):
    """Before: (0, -3) was blamed on dout, asking for a shape (N, 0, -3, 4)."""
    with pytest.raises((ValueError, TypeError), match=r"input_hw=.* must be a positive integer or a pair"):
        jit_conv.conv2d_backward_data_nhwc_f32(np.zeros((1, 2, 2, 4), np.float32), np.zeros((3, 3, 2, 4), np.float32),
                                               input_hw=input_hw, pads=((0, 0), (0, 0)))
