import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from workshop_lib import figures, int8


def _bw_reference(a, b):
    """AVX512-BW's lane in int64 numpy: pairs clipped to s16, then added."""
    p = np.asarray(a, dtype=np.int64) * np.asarray(b, dtype=np.int64)
    return int(np.clip(p[0] + p[1], -32768, 32767) + np.clip(p[2] + p[3], -32768, 32767))


def test_lane_values_match_an_int64_reference_and_the_int8_gemm():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 256, 4)
        b = rng.integers(-128, 128, 4)
        v = figures.int8_lane_values(a, b)
        assert v["vnni_s32"] == int(a.astype(np.int64) @ b.astype(np.int64))
        assert v["avx512bw_s32"] == _bw_reference(a, b)
        a8, b8 = a.astype(np.uint8)[None, :], b.astype(np.int8)[:, None]
        assert v["vnni_s32"] == int(int8.gemm_u8s8s32(a8, b8, semantics="vnni")[0, 0])
        assert v["avx512bw_s32"] == int(int8.gemm_u8s8s32(a8, b8, semantics="avx512bw")[0, 0])


def test_lane_values_flag_the_saturated_pair():
    v = figures.int8_lane_values([255, 255, 10, 20], [127, 127, -3, 4])
    assert v["products"] == [32385, 32385, -30, 80]
    assert v["pairs_s16"] == [32767, 50] and v["saturated"] == [True, False]
    assert v["avx512bw_s32"] == 32817 and v["vnni_s32"] == 64820


@pytest.mark.parametrize("a, b, message", [([1, 2, 3], [1, 2, 3, 4], "4 bytes"), ([256, 0, 0, 0], [0] * 4, r"\[0, 255\]"),
                                           ([0] * 4, [0, 0, 0, 128], r"\[-128, 127\]"), ([0.5, 0, 0, 0], [0] * 4, "0.5")])
def test_lane_values_reject_bad_bytes(a, b, message):
    with pytest.raises(ValueError, match=message):
        figures.int8_lane_values(a, b)


def test_layout_orders_hold_every_element_once_in_the_documented_order():
    c, h, w = 20, 2, 3
    pixels = h * w
    everything = {(ch, p) for ch in range(c) for p in range(pixels)}
    nchw = figures.layout_order("NCHW", c, h, w)
    nhwc = figures.layout_order("NHWC", c, h, w)
    blocked = figures.layout_order("nChw16c", c, h, w)
    assert nchw[:pixels] == [(0, p) for p in range(pixels)]
    assert nhwc[:c] == [(ch, 0) for ch in range(c)]
    assert blocked[:16] == [(ch, 0) for ch in range(16)] and blocked[16:32] == [(ch, 1) for ch in range(16)]
    # the second block starts after all pixels of the first: channels 16..19, then 12 padded lanes, per pixel
    assert blocked[16 * pixels : 16 * pixels + 16] == [(ch, 0) for ch in range(16, 20)] + [(-1, -1)] * 12
    for order in (nchw, nhwc):
        assert len(order) == c * pixels and set(order) == everything
    assert len(blocked) == 32 * pixels and set(blocked) - {(-1, -1)} == everything
    assert blocked.count((-1, -1)) == 12 * pixels


def test_layout_order_rejects_unknown_layouts_and_sizes():
    with pytest.raises(ValueError, match="layout='CHWN'"):
        figures.layout_order("CHWN")
    with pytest.raises(ValueError, match="channels=0"):
        figures.layout_order("NCHW", channels=0)


def test_figures_draw_the_computed_values():
    fig = figures.int8_lanes([255, 255, 10, 20], [127, 127, -3, 4])
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "acc += 32817" in texts and any("64820 (exact)" in t for t in texts) and any("(saturated)" in t for t in texts)
    fig = figures.memory_order(channels=32, height=2, width=2, addresses=40)
    assert [ax.get_ylabel() for ax in fig.axes] == ["NCHW", "NHWC", "nChw16c"]
    assert all(len(ax.patches) == 40 for ax in fig.axes)


TRACE = ["workshop_verbose,exec,Reshape,numpy,-,src:64x784,dst:64x28x28x1,0.5",
         "workshop_verbose,exec,reorder,nhwc->nChw16c,64x2x14x14x16,0.25",
         "workshop_verbose,exec,_FusedConv2DBiasAddRelu,blocked,nChw16c,src:64x14x14x32,5x5x32x64,64,dst:64x4x14x14x16,2.0"]


def test_trace_events_follow_one_another():
    assert figures.trace_events(TRACE) == [("Reshape/numpy", 0.0, 0.5), ("reorder/nhwc->nChw16c", 0.5, 0.25),
                                           ("_FusedConv2DBiasAddRelu/blocked", 0.75, 2.0)]
    fig = figures.trace_timeline(TRACE)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [e[0] for e in figures.trace_events(TRACE)]


@pytest.mark.parametrize("line, message", [("hello,world", "not a workshop_verbose"),
                                           ("workshop_verbose,exec,Relu,numpy,-,fast", "milliseconds")])
def test_trace_events_name_the_bad_line(line, message):
    with pytest.raises(ValueError, match=f"line 2 .*{message}"):
        figures.trace_events([TRACE[0], line])


def test_compute_ops_lists_the_forward_path_inputs_first():
    from workshop_lib import models

    ops = figures.compute_ops(models.TrainingGraph(seed=0).logits)
    kinds = [kind for kind, _ in ops]
    assert kinds == ["Reshape", "Conv2D", "BiasAdd", "Relu", "MaxPool", "Conv2D", "BiasAdd", "Relu", "MaxPool",
                     "Reshape", "MatMul", "BiasAdd", "Relu", "Dropout", "MatMul", "BiasAdd"]
    assert ops[1] == ("Conv2D", "conv1/Conv2D")
    with pytest.raises(TypeError, match="graph tensor"):
        figures.compute_ops([1, 2])


def test_fusion_before_after_draws_both_columns():
    fig = figures.fusion_before_after([("Conv2D", "c"), ("BiasAdd", "b"), ("Relu", "r")], TRACE)
    left, right = fig.axes
    assert left.get_title() == "as written: 3 operations" and right.get_title() == "as run: 3 primitives, 1 fused"
    assert [t.get_text() for t in right.texts] == [e[0] for e in figures.trace_events(TRACE)]


def test_fusion_before_after_links_each_operation_to_the_primitive_it_became():
    before = [("Reshape", "r"), ("Conv2D", "c"), ("BiasAdd", "b"), ("Relu", "a"), ("MaxPool", "p")]
    ran = ["Reshape/numpy", "reorder/nhwc->nChw16c", "_FusedConv2DBiasAddRelu/jit", "MaxPool/numpy"]
    assert figures._fusion_links(before, ran) == [(0, 0), (1, 2), (2, 2), (3, 2), (4, 3)]
    trace = ["workshop_verbose,exec,VariableV2,numpy,-,src:,dst:10,0.004"] + TRACE
    fig = figures.fusion_before_after([("Reshape", "r"), ("Conv2D", "c"), ("BiasAdd", "b"), ("Relu", "a")], trace)
    assert fig.axes[1].get_title() == "as run: 3 primitives, 1 fused"  # the variable read is not a primitive drawn
    assert len(fig.artists) == 4


def test_roofline_values_bend_at_the_ridge_and_keep_every_kernel():
    result = {"cpu": "test", "memory": {"triad": {"all_cores": 10.0}},
              "compute": {"fp32": {"all_cores": 100.0}, "bf16": {"missing": "not on this CPU"}},
              "kernels": [{"name": "gemm", "intensity": 20.0, "rate": 50.0, "bound": "compute"},
                          {"name": "allreduce", "intensity": None, "rate": 5.0, "bound": "memory"}]}
    values = figures.roofline_values(result)
    xs, ys = values["roofs"]["fp32"]
    assert list(values["roofs"]) == ["fp32"]
    assert np.allclose(ys, np.minimum(100.0, 10.0 * xs)) and ys.max() == 100.0 and xs.min() < 10 < xs.max()
    assert values["kernels"] == [("gemm", 20.0, 50.0, "compute")]
    fig = figures.roofline_plot(result)
    assert fig.axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="report"):
        figures.roofline_values({})
