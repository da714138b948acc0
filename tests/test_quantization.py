"""workshop_lib.quantization: parameters, rounding, saturation and calibration."""

import numpy as np
import pytest

from workshop_lib import quantization as Q

RNG = np.random.default_rng(3)


def test_symmetric_int8_maps_the_largest_magnitude_to_127():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0])
    qp = Q.choose_qparams(x.min(), x.max(), np.int8, symmetric=True)
    assert qp.scale == pytest.approx(2.0 / 127) and qp.zero_point == 0
    np.testing.assert_array_equal(Q.quantize(x, qp), [-127, -64, 0, 32, 64])  # -63.5 -> -64, 31.75 -> 32


def test_asymmetric_uint8_represents_zero_exactly():
    qp = Q.choose_qparams(0.3, 2.8, np.uint8, symmetric=False)  # range stretched to include 0
    assert Q.quantize(np.array([0.0]), qp)[0] == qp.zero_point == 0
    qp = Q.choose_qparams(-1.0, 3.0, np.uint8, symmetric=False)
    assert Q.dequantize(Q.quantize(np.array([0.0]), qp), qp)[0] == 0.0
    assert Q.quantize(np.array([-1.0, 3.0]), qp).tolist() == [0, 255]


def test_rounding_is_half_to_even_and_out_of_range_saturates():
    qp = Q.QuantParams(np.float64(1.0), np.int32(0), np.dtype(np.int8))
    np.testing.assert_array_equal(Q.quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5]), qp), [0, 2, 2, 0, -2])
    np.testing.assert_array_equal(Q.quantize(np.array([300.0, -300.0, 127.4, -128.6]), qp), [127, -128, 127, -128])


def test_round_trip_error_is_at_most_half_a_step():
    x = RNG.standard_normal(10_000)
    qp = Q.choose_qparams(x.min(), x.max(), np.int8)
    err = np.abs(Q.dequantize(Q.quantize(x, qp), qp) - x)
    assert err.max() <= qp.scale / 2 + 1e-9


def test_per_channel_equals_per_tensor_on_each_channel():
    w = RNG.standard_normal((30, 4)) * np.array([0.01, 0.1, 1.0, 10.0])
    qp = Q.choose_qparams(w.min(0), w.max(0), np.int8, symmetric=True, axis=1)
    q = Q.quantize(w, qp)
    for c in range(4):
        single = Q.choose_qparams(w[:, c].min(), w[:, c].max(), np.int8, symmetric=True)
        np.testing.assert_array_equal(q[:, c], Q.quantize(w[:, c], single))
    assert np.abs(q).max(0).tolist() == [127] * 4  # each channel uses its full range
    np.testing.assert_allclose(Q.dequantize(q, qp), w, atol=np.abs(w).max(0).max() / 127)


def test_requantize_fuses_bias_relu_and_output_scale():
    acc = np.array([[-1000, 0, 1000, 10**6]], dtype=np.int32)
    bias = np.array([100, 0, -100, 0], dtype=np.int32)
    out = Q.QuantParams(np.float64(0.05), np.int32(0), np.dtype(np.uint8))
    got = Q.requantize(acc, 0.001, out, bias, relu=True)
    ref = np.clip(np.maximum(np.rint((acc + bias) * 0.001 / 0.05), 0), 0, 255)
    np.testing.assert_array_equal(got, ref.astype(np.uint8))
    assert got.tolist() == [[0, 0, 18, 255]]


def test_calibrators_minmax_percentile_entropy():
    x = np.abs(RNG.standard_normal(200_000)).astype(np.float32)
    x[0] = 100.0  # one outlier
    lo, hi = Q.Calibrator("minmax").update(x).range()
    assert (lo, hi) == (float(x.min()), 100.0)
    _, hi_p = Q.Calibrator("percentile", percentile=99.9).update(x).range()
    assert 3.0 < hi_p < 3.6  # the 99.9th percentile of |N(0,1)| is about 3.29
    _, hi_e = Q.Calibrator("entropy").update(x).range()
    assert 2.0 < hi_e < 20.0  # clips the outlier, keeps the bulk
    calibrator = Q.Calibrator("minmax").update(x[:100]).update(x[100:])
    assert calibrator.range() == (lo, hi)


def test_entropy_threshold_keeps_everything_when_nothing_is_rare():
    hist = np.ones(2048)
    assert Q.entropy_threshold(hist, 1.0) > 2000  # a uniform distribution is best left unclipped


def test_nan_or_inf_in_calibration_data_raises():
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.Calibrator().update(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.Calibrator().update(np.array([np.inf]))
    with pytest.raises(ValueError, match="no calibration data"):
        Q.Calibrator().range()


def test_constant_tensor_is_handled():
    qp = Q.Calibrator("entropy").update(np.zeros(100)).qparams(np.uint8)
    assert qp.scale == 1.0 and Q.quantize(np.zeros(3), qp).tolist() == [0, 0, 0]
    qp = Q.Calibrator().update(np.full(10, 2.5)).qparams(np.uint8)
    assert Q.dequantize(Q.quantize(np.array([2.5]), qp), qp)[0] == pytest.approx(2.5)


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype=float32 must be one of"):
        Q.qrange(np.float32)


def test_requantize_refuses_accumulators_outside_s32_instead_of_wrapping():
    """2**32 + 5 came out as 5, and a float NaN as 0 (then the zero point)."""
    out = Q.QuantParams(np.float64(1.0), np.int32(0), np.dtype(np.int32))
    with pytest.raises(ValueError, match=r"acc\[1\]=4294967301 lies outside the s32 range"):
        Q.requantize(np.array([0, 2**32 + 5]), 1.0, out)
    with pytest.raises(ValueError, match=r"acc\[0, 1\]=-2147483649 lies outside the s32 range"):
        Q.requantize(np.array([[0, -(2**31) - 1]]), 1.0, out)
    with pytest.raises(ValueError, match=r"acc\[0\]=18446744073709551615 lies outside"):
        Q.requantize(np.array([2**64 - 1], dtype=np.uint64), 1.0, out)
    with pytest.raises(ValueError, match=r"acc\[0\]=nan is not finite"):
        Q.requantize(np.array([np.nan]), 1.0, out)
    with pytest.raises(ValueError, match=r"acc\[1\]=inf is not finite"):
        Q.requantize(np.array([1.0, np.inf]), 1.0, out)
    with pytest.raises(ValueError, match=r"acc\[0\]=2.5 must be a whole number"):
        Q.requantize(np.array([2.5]), 1.0, out)
    with pytest.raises(ValueError, match=r"bias\[0\]=3000000000 lies outside the s32 range"):
        Q.requantize(np.array([1]), 1.0, out, bias=np.array([3 * 10**9]))
    with pytest.raises(ValueError, match="in_scale=0.0 must be positive"):
        Q.requantize(np.array([1]), 0.0, out)
    with pytest.raises(ValueError, match=r"must each be a scalar or \(4,\), one per channel"):
        Q.requantize(np.zeros((2, 4), np.int32), np.ones(3), out)
    with pytest.raises(TypeError, match="out is a dict; it must be QuantParams"):
        Q.requantize(np.array([1]), 1.0, {"scale": 1.0})


def test_requantize_is_exact_at_the_edges_of_s32_in_any_integer_dtype():
    out = Q.QuantParams(np.float64(1.0), np.int32(0), np.dtype(np.int32))
    edges = [-(2**31), -1, 0, 1, 2**31 - 1]
    for dtype in (np.int64, np.float64):
        assert Q.requantize(np.array(edges, dtype=dtype), 1.0, out).tolist() == edges


@pytest.mark.parametrize("make, rule", [
    (lambda: Q.QuantParams(np.float64(0.0), np.int32(0), np.dtype(np.int8)), "scale=0.0 must be positive"),
    (lambda: Q.QuantParams(np.float64(-0.1), np.int32(0), np.dtype(np.int8)), r"scale=-0.1 must be positive"),
    (lambda: Q.QuantParams(np.float64(np.inf), np.int32(0), np.dtype(np.int8)), "scale.*is not finite"),
    (lambda: Q.QuantParams(np.array([0.1, np.nan]), np.zeros(2, np.int32), np.dtype(np.int8), axis=0),
     r"scale\[1\]=nan is not finite"),
    (lambda: Q.QuantParams(np.float64(0.1), np.int32(200), np.dtype(np.int8)),
     r"zero_point=200 must lie in the int8 range \[-128, 127\]"),
    (lambda: Q.QuantParams(np.float64(0.1), np.int32(-1), np.dtype(np.uint8)), r"zero_point=-1 must lie in the uint8"),
    (lambda: Q.QuantParams(np.float64(0.1), 0.5, np.dtype(np.uint8)), "zero_point=0.5 must be a whole number"),
    (lambda: Q.QuantParams(np.float64(0.1), np.int32(0), np.dtype(np.float32)), "dtype=float32 must be one of"),
    (lambda: Q.QuantParams(np.ones((2, 2)), np.int32(0), np.dtype(np.int8), axis=0), "must be 1-D"),
    (lambda: Q.choose_qparams(5, -5), "min_val=5 must be <= max_val=-5"),
    (lambda: Q.choose_qparams(np.array([0.0, 3.0]), np.array([1.0, 2.0])),
     r"min_val\[1\]=3.0 must be <= max_val\[1\]=2.0"),
    (lambda: Q.choose_qparams(np.zeros(2), np.ones(3)), r"min_val.shape=\(2,\) and max_val.shape=\(3,\) must match"),
    (lambda: Q.choose_qparams(0.0, np.nan), "NaN or Inf"),
])
def test_invalid_quantization_parameters_are_refused(make, rule):
    with pytest.raises(ValueError, match=rule):
        make()


def test_quantize_and_dequantize_check_their_inputs():
    per_channel = Q.choose_qparams(-np.ones(3), np.ones(3), np.int8, axis=1)
    with pytest.raises(ValueError, match=r"x.shape=\(4, 5\) must have 3 channels along axis=1"):
        Q.quantize(np.zeros((4, 5)), per_channel)
    with pytest.raises(TypeError, match="q.dtype=float64 must be"):
        Q.dequantize(np.zeros((4, 3)), per_channel)
    with pytest.raises(TypeError, match="qp is a tuple; it must be QuantParams"):
        Q.quantize(np.zeros(3), (0.1, 0))
    with pytest.raises(ValueError, match="calibration data of shape .* is empty"):
        Q.Calibrator().update(np.zeros(0))
    with pytest.raises(ValueError, match="bins=0 must be >= 1"):
        Q.Calibrator("entropy", bins=0)
    with pytest.raises(ValueError, match=r"hist\[1\]=-1.0 must be a count"):
        Q.entropy_threshold(np.array([1.0, -1.0]), 0.1)

