"""Property-based tests (Hypothesis) of the public validation: kernels, int8, quantization, d4p, the report schema.

One property per function, in place of hand-listed edge cases: for any input Hypothesis draws (good, bad, or
odd), the function either returns what an independent reference computes (float64 numpy, exact int64
arithmetic) or raises ValueError/TypeError naming the argument. Any other exception (numpy's, numba's, a
KeyError, a RecursionError) is a failure. The examples are few, so the file runs in seconds.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workshop_lib import board, d4p, int8, kernels, quantization

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(allow_nan=True, allow_infinity=True),
                st.integers(-3, 6), st.lists(st.integers(-2, 4), max_size=3))


def _names_one_of(exc, names):
    message = str(exc)
    assert any(name in message for name in names), message


def _conv_reference(x, w, stride, pads):
    """float64 cross-correlation, NHWC x, HWIO w, explicit ((top, bottom), (left, right)) zero padding."""
    (pt, pb), (pl, pr) = pads
    x = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    r, s = w.shape[:2]
    oh, ow = (x.shape[1] - r) // stride + 1, (x.shape[2] - s) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + r, j * stride:j * stride + s, :]
            out[:, i, j, :] = np.tensordot(patch, w.astype(np.float64), axes=([1, 2, 3], [0, 1, 2]))
    return out


@FAST
@given(h=st.integers(1, 6), r=st.integers(1, 4), stride=st.one_of(st.integers(-1, 3), ODD),
       padding=st.one_of(st.integers(-2, 3), st.sampled_from(["SAME", "VALID", "same", "FULL"]), ODD))
def test_conv2d_forward_matches_float64_or_names_its_argument(h, r, stride, padding):
    rng = np.random.default_rng(h * 7 + r)
    x = rng.standard_normal((1, h, h, 2)).astype(np.float32)
    w = rng.standard_normal((r, r, 2, 3)).astype(np.float32)
    try:
        out, _ = kernels.conv2d_forward(x, w, stride=stride, padding=padding)
    except (ValueError, TypeError) as exc:
        _names_one_of(exc, ["stride", "padding", "window", "output"])
        return
    s = stride if isinstance(stride, int) else stride[0]
    if isinstance(padding, int):
        pads = ((padding, padding), (padding, padding))
    elif padding == "VALID":
        pads = ((0, 0), (0, 0))
    else:  # SAME, as TensorFlow: output ceil(h / s), the extra row at the bottom
        total = max((math.ceil(h / s) - 1) * s + r - h, 0)
        pads = ((total // 2, total - total // 2),) * 2
    np.testing.assert_allclose(out, _conv_reference(x, w, s, pads), rtol=1e-4, atol=1e-4)


@FAST
@given(m=st.integers(1, 5), k=st.integers(1, 9), n=st.integers(1, 5),
       a_dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.float32]),
       b_dtype=st.sampled_from([np.int8, np.uint8, np.int32]), seed=st.integers(0, 2**16))
def test_int8_gemm_is_exact_or_names_the_operand(m, k, n, a_dtype, b_dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, (m, k)).astype(a_dtype)
    b = rng.integers(-100, 100, (k, n)).astype(b_dtype)
    try:
        c = int8.gemm_u8s8s32(a, b, semantics="vnni")
    except (ValueError, TypeError) as exc:
        _names_one_of(exc, ["a.", "b.", "a=", "b="])
        assert not (a_dtype is np.uint8 and b_dtype is np.int8)
        return
    assert a_dtype is np.uint8 and b_dtype is np.int8
    np.testing.assert_array_equal(c, a.astype(np.int64) @ b.astype(np.int64))


@FAST
@given(lo=st.floats(allow_nan=True, allow_infinity=True), hi=st.floats(allow_nan=True, allow_infinity=True),
       symmetric=st.booleans(), dtype=st.sampled_from([np.int8, np.uint8]))
def test_choose_qparams_covers_its_range_or_names_the_bound(lo, hi, symmetric, dtype):
    try:
        qp = quantization.choose_qparams(lo, hi, dtype=dtype, symmetric=symmetric)
    except (ValueError, TypeError) as exc:
        _names_one_of(exc, ["min_val", "max_val"])
        assert not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) or "range" in str(exc)
        return
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    scale = float(qp.scale)
    assert scale > 0 and math.isfinite(scale)
    if (dtype is np.uint8 and symmetric) or max(abs(lo), abs(hi)) > 1e37:
        return  # [0, max] only: negatives saturate by design; near float32's limit dequantize's float32 overflows
    # every value of the range comes back within half a step (zero exactly)
    values = np.array([lo, hi, 0.0, (lo + hi) / 2])
    values = values[np.isfinite(values)]
    back = quantization.dequantize(quantization.quantize(values, qp), qp).astype(np.float64)
    assert np.all(np.abs(back - values) <= scale / 2 + 1e-6 * np.abs(values) + 1e-30)
    assert quantization.dequantize(quantization.quantize(np.zeros(1), qp), qp)[0] == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_clusters=st.one_of(st.integers(-1, 5), ODD), max_iter=st.one_of(st.integers(-1, 4), ODD),
       threshold=st.one_of(st.floats(0, 1), ODD), factor=st.one_of(st.floats(0.1, 2), ODD),
       fptype=st.sampled_from(["double", "half", 5]), method=st.sampled_from(["randomDense", "x"]))
def test_d4p_kmeans_runs_or_names_the_parameter(n_clusters, max_iter, threshold, factor, fptype, method):
    data = np.random.default_rng(0).random((30, 2))
    try:
        init = d4p.kmeans_init(n_clusters, method=method, oversamplingFactor=factor, fptype=fptype).compute(data)
        result = d4p.kmeans(n_clusters, max_iter, accuracyThreshold=threshold, fptype=fptype).compute(
            data, init.centroids)
    except (ValueError, TypeError) as exc:
        _names_one_of(exc, ["nClusters", "maxIterations", "accuracyThreshold", "oversamplingFactor", "fptype",
                            "method"])
        return
    assert result.centroids.shape == (n_clusters, 2) and np.isfinite(result.centroids).all()
    # each returned label is its point's nearest centroid (float64 reference)
    if max_iter == 0:
        return
    centroids = result.centroids.astype(np.float64)
    distances = ((data[:, None, :] - centroids[None]) ** 2).sum(-1)
    labels = np.asarray(result.assignments).ravel()
    np.testing.assert_allclose(distances[np.arange(len(data)), labels], distances.min(1), rtol=1e-5, atol=1e-6)


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=12)


def _report(figures):
    return {"schema": board.SCHEMA, "learner": "ada", "cpu": "cpu", "features": {"avx2": True},
            "cores": {"physical": 2, "logical": 4}, "figures": figures}


@FAST
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400), ODD, JSON),
       how=st.one_of(st.text(max_size=8), ODD), unit=st.one_of(st.none(), st.text(max_size=40), ODD))
def test_report_schema_accepts_exactly_the_drawable_figures(value, how, unit):
    report = _report({"int8_gemm_speedup": {"value": value, "how": how, "unit": unit}})
    drawable = (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308
                and math.isfinite(float(value)) and isinstance(how, str) and how.strip() != ""
                and (unit is None or (isinstance(unit, str) and len(unit) <= 32)))
    try:
        assert board.validate_report(report, "r.json") is report
    except ValueError as exc:
        assert str(exc).startswith("r.json: figure 'int8_gemm_speedup' ") and "expected" in str(exc), str(exc)
        assert not drawable
        return
    assert drawable
    board.board_table([report])  # and the board can use it


@FAST
@given(document=JSON)
def test_report_schema_refuses_any_other_json_with_a_valueerror(document):
    with pytest.raises(ValueError, match="^r.json: "):
        board.validate_report(document, "r.json")


@pytest.mark.parametrize("depth", [7, 50, 10_000])
def test_report_schema_refuses_deep_nesting_without_recursion(depth):
    document = _report({})
    node = document["features"]
    for _ in range(depth):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ValueError, match="nested deeper than"):
        board.validate_report(json.loads(json.dumps(document)) if depth < 500 else document, "r.json")
