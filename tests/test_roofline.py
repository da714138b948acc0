import json
import math

import numpy as np
import pytest

from workshop_lib import roofline

FAST = 0.01  # seconds per roof: the tests check the method and the arithmetic, never a speed


@pytest.fixture(scope="module")
def peaks():
    return roofline.measure_compute_peaks(FAST)


def test_conv_counts_match_hand_counts_for_the_labs_conv2():
    # conv2 at batch 50: 50 x 14 x 14 outputs x 64 filters x (5 x 5 x 32) multiply-adds
    ops, moved = roofline.conv_counts(50, 14, 14, 32, 5, 5, 64, "forward")
    assert ops == 2 * 50 * 14 * 14 * 64 * 800 == 1_003_520_000
    assert moved == 4 * (50 * 14 * 14 * 32 + 5 * 5 * 32 * 64 + 50 * 14 * 14 * 64) == 3_968_000
    assert roofline.conv_counts(50, 14, 14, 32, 5, 5, 64, "backward_weights")[1] == moved  # x, dy read; dw written
    assert roofline.conv_counts(2, 4, 4, 1, 3, 3, 2, "backward_data", in_bytes=1, out_bytes=2) == (
        2 * 2 * 16 * 2 * 9, 2 * 16 * 2 + 9 * 2 + 2 * 2 * 16)


def test_gemm_and_kmeans_and_adam_counts_are_exact():
    assert roofline.gemm_counts(64, 3136, 1024, in_bytes=1, out_bytes=4) == (
        411_041_792, 64 * 3136 + 3136 * 1024 + 64 * 1024 * 4)
    assert roofline.lloyd_counts(1000, 3, 16) == (2 * 1000 * 16 * 3 + 3000, (3000 + 96) * 8)
    assert roofline.kmeanspp_step_counts(1000, 3) == (10_000, 24_000 + 16_000)
    assert roofline.adam_counts(10) == (120, 280)
    assert roofline.allreduce_counts(4096, 2) == 4096
    assert roofline.allreduce_counts(4096, 4) == 6144


def test_cnn_ops_per_image_match_the_recorded_hand_count():
    assert roofline.cnn_ops_per_image("inference") == 27_767_808  # FACTS: forward 27.77 MFLOP
    assert roofline.cnn_ops_per_image("train") == 27_767_808 + 54_281_216  # backward 54.28 MFLOP


def test_counts_name_a_bad_argument():
    with pytest.raises(ValueError, match="direction"):
        roofline.conv_counts(1, 2, 2, 1, 1, 1, 1, "sideways")
    with pytest.raises((ValueError, TypeError), match="m"):
        roofline.gemm_counts(0, 2, 2)


def _roofs(fp32=100.0, triad=10.0, copy=20.0):
    return {"compute": {"fp32": {"all_cores": fp32, "one_core": fp32 / 2}, "int8": {"missing": "not on this CPU"}},
            "memory": {"triad": {"all_cores": triad, "one_core": triad}, "copy": {"all_cores": copy, "one_core": copy}}}


def test_place_picks_the_roof_that_binds():
    roofs = _roofs()
    low = roofline.place(roofs, "stream-like", "fp32", ops=200, nbytes=100, seconds=10.0)  # 2 op/B -> 20 op/s roof
    assert low["bound"] == "memory" and low["attainable"] == 20.0 and low["fraction"] == pytest.approx(1.0)
    high = roofline.place(roofs, "gemm-like", "fp32", ops=5000, nbytes=100, seconds=100.0)  # 50 op/B: compute
    assert high["bound"] == "compute" and high["attainable"] == 100.0 and high["fraction"] == pytest.approx(0.5)
    mover = roofline.place(roofs, "allreduce", "memory", ops=None, nbytes=40, seconds=4.0)
    assert mover["fraction"] == pytest.approx(0.5) and mover["intensity"] is None
    with pytest.raises(ValueError, match="int8"):
        roofline.place(roofs, "x", "int8", 1, 1, 1.0)


def test_peaks_are_positive_and_ordered_sanely(peaks):
    fp32 = peaks["fp32"]
    assert fp32["ops_per_instruction"] == 2 * fp32["vector_bits"] // 32
    for kind, row in peaks.items():
        if "missing" in row:
            assert "not" in row["missing"]
            continue
        assert row["one_core"] > 0 and row["all_cores"] > 0, kind
        nominal = roofline.nominal_peaks()
        if nominal.get(kind):  # a miscounted instruction would land far above what the ISA allows
            assert row["one_core"] < 4 * nominal[kind]["one_core"], kind
    if "one_core" in peaks["int8"]:  # 4x the products per instruction: faster than fp32 on any VNNI CPU
        assert peaks["int8"]["ops_per_instruction"] == 4 * fp32["ops_per_instruction"]
        assert peaks["int8"]["one_core"] > fp32["one_core"]


def test_a_cpu_without_avx512_degrades_to_avx2_and_says_what_is_missing(monkeypatch):
    features = {"avx2": True, "fma": True}
    monkeypatch.setattr(roofline, "compile_target", lambda: {"cpu": "haswell", "features": features})
    result = roofline.measure_compute_peaks(FAST, threads=1)
    assert result["fp32"]["vector_bits"] == 256 and result["fp32"]["one_core"] > 0
    for kind in ("int8", "int16", "bf16", "amx_int8"):
        assert result[kind]["missing"].startswith("not on this CPU"), kind
    assert roofline.vector_isa({}) == (None, None)
    monkeypatch.setattr(roofline, "compile_target", lambda: {"cpu": "generic", "features": {}})
    bare = roofline.measure_compute_peaks(FAST, threads=1)
    assert all("missing" in row for row in bare.values())


def test_compile_target_honours_numba_cpu_name(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "haswell")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    target = roofline.compile_target()
    assert target["cpu"] == "haswell"
    assert target["features"] == {"avx2": True, "fma": True, "avx512f": False}
    assert roofline.vector_isa(target["features"]) == ("avx2", 8)


def test_memory_bandwidths_are_positive():
    mem = roofline.measure_memory(nbytes=1 << 20, repeats=1, cache_sweeps=2)
    for name in ("copy", "triad"):
        assert mem[name]["one_core"] > 0 and mem[name]["all_cores"] > 0
    assert mem["array_bytes"] == 1 << 20


def test_report_is_json_with_every_kernel_placed():
    result = roofline.report(FAST, memory_bytes=1 << 20, cache_sweeps=2, batch=2, int8_batch=2)
    text = json.dumps(result)
    back = json.loads(text)
    assert set(back) >= {"cpu", "compile_target", "vector", "threads", "load", "compute", "nominal", "memory",
                         "kernels"}
    names = [row["name"] for row in back["kernels"]]
    assert "conv2 backward-weights" in names and "Adam update (fc1/w)" in names
    for row in back["kernels"]:
        assert row["bound"] in ("compute", "memory")
        assert row["rate"] == pytest.approx(row["ops"] / row["seconds"])
        assert math.isclose(row["fraction"], row["rate"] / row["attainable"])
    table = roofline.format_table(result)
    assert "% of roof" in table and "conv1 forward" in table
    result["kernels"][0]["fraction"] = 2.0  # a kernel above its roof: the table must say the roofs are suspect
    assert "WARNING: " in roofline.format_table(result) and "ran above their roof" in roofline.format_table(result)
    line = roofline.fraction_line("x", ops=1e9, seconds=1.0, roofs=result)
    assert "% of the measured fp32 peak" in line
    assert "% of the memory roof" in roofline.fraction_line("a", None, 1.0, result, roof="memory", nbytes=10)


def test_workshop_roofline_prints_json_with_kmeans_placed(monkeypatch, capsys):
    import functools

    from workshop_lib import cli

    small = functools.partial(roofline.report, memory_bytes=1 << 20, cache_sweeps=2, batch=2, int8_batch=2)
    monkeypatch.setattr(roofline, "report", small)
    assert cli.main(["roofline", "--json", "--no-mpi", "--duration", "0.01", "--points", "4000"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in result["kernels"]]
    assert "K-Means Lloyd pass (n=4000, k=16)" in names and "k-means++ (15 steps)" in names
    lloyd = result["kernels"][names.index("K-Means Lloyd pass (n=4000, k=16)")]
    assert lloyd["ops"] == roofline.lloyd_counts(4000, 3, 16)[0]
