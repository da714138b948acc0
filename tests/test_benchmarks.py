"""Benchmarks stay runnable: each script runs at a tiny size and prints its figures (no timing is asserted)."""

import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


def test_kmeans_bench_runs_at_a_tiny_size(root, tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/kmeans_bench.py", "--pixels", "20000", "--ks", "4", "--iterations", "2",
         "--repeats", "1", "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    for expected in ("Lloyd per iteration", "k-means++ (1 trial)", "Distributed Lloyd, k = 4",
                     "2 x 1 / 1 x 1 = ", "Plain mpiexec, no thread variable set", "Lloyd iteration: ",
                     "k-means++ (3 steps): "):
        assert expected in proc.stdout
    import json

    figures = json.loads(out.read_text())
    assert figures["pixels"] == 20000
    assert {how: set(runs) for how, runs in figures["ranks"].items()} == {"pinned": {"1", "2"}, "plain": {"1", "2"}}


def test_int8_bench_runs_in_quick_mode(root, tmp_path):
    import json

    out = tmp_path / "int8.json"
    proc = subprocess.run([sys.executable, "benchmarks/int8_bench.py", "--quick", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "int8 / fp32" in proc.stdout and "images/s" in proc.stdout
    assert "ours int8 64x3136x1024: " in proc.stdout and "% of the measured int8 peak" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["cnn"]["int8_accuracy"] > 0.97 and len(figures["gemm"]) == 3


def test_cnn_bench_prints_tf_cnn_benchmarks_lines(root, tmp_path):
    import json

    out = tmp_path / "cnn.json"
    proc = subprocess.run([sys.executable, "benchmarks/cnn_bench.py", "--num-batches", "2", "--num-warmup", "1",
                           "--no-torch", "--no-tensorflow", "--background-load", "1", "--json", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "background load: 1 busy process(es)" in proc.stdout and "(under 1 busy process(es)" in proc.stdout
    assert "images/sec:" in proc.stdout and "(jitter = " in proc.stdout and "Executive summary" in proc.stdout
    for name in ("stock", "reference", "optimized"):
        assert f"== workshop_lib.tf, {name}\n" in proc.stdout
    assert re.search(r"^optimized / stock = \d+\.\d\dx \(target >= 5x\)$", proc.stdout, re.MULTILINE)
    assert re.search(r"^optimized / reference = \d+\.\d\dx$", proc.stdout, re.MULTILINE)
    assert "optimized / PyTorch = " not in proc.stdout and "optimized / TensorFlow = " not in proc.stdout
    assert set(json.loads(out.read_text())["images_per_second"]) == {"stock", "reference", "optimized"}
    assert re.search(r"^optimized \(train\): .* = \d+\.\d% of the measured fp32 peak", proc.stdout, re.MULTILINE)


def test_cnn_bench_ratio_lines_name_both_sides_and_skip_what_was_not_measured(root):
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import cnn_bench
    finally:
        sys.path.remove(str(root / "benchmarks"))
    lines = cnn_bench.ratio_lines({"stock": 100.0, "reference": 150.0, "optimized": 600.0, "tensorflow": 800.0},
                                  "train")
    assert lines == ["optimized / stock = 6.00x (target >= 5x)", "optimized / reference = 4.00x",
                     "reference / stock = 1.50x (the compiler used your ISA)", "optimized / TensorFlow = 0.75x"]


def test_cnn_bench_interleaved_rounds_print_each_rounds_ratio_and_their_median(root):
    proc = subprocess.run([sys.executable, "benchmarks/cnn_bench.py", "--num-batches", "2", "--num-warmup", "1",
                           "--batch-size", "8", "--rounds", "2", "--variants", "reference", "optimized", "--no-torch",
                           "--no-tensorflow"], cwd=root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "== workshop_lib.tf, optimized, 2 rounds\n" in proc.stdout
    line = re.search(r"^optimized / reference, median of 2 interleaved rounds = (\d+\.\d\d)x \(rounds: "
                     r"(\d+\.\d\d) (\d+\.\d\d)\)$", proc.stdout, re.MULTILINE)
    assert line, proc.stdout
    median, first, second = (float(v) for v in line.groups())
    assert abs(median - (first + second) / 2) <= 0.01  # the median of two rounds is their mean
    bad = subprocess.run([sys.executable, "benchmarks/cnn_bench.py", "--rounds", "0"], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds=0 must be at least 1" in bad.stderr


def test_cnn_bench_round_ratios_pair_each_rounds_sides(root):
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import cnn_bench
    finally:
        sys.path.remove(str(root / "benchmarks"))
    lines = cnn_bench.round_ratio_lines({"optimized": [300.0, 100.0, 200.0], "pytorch": [100.0, 100.0, 100.0]},
                                        "train")
    assert lines == ["optimized / PyTorch, median of 3 interleaved rounds = 2.00x (target >= 1.3x) "
                     "(rounds: 3.00 1.00 2.00)"]


def test_stock_is_measured_in_a_subprocess_with_the_reference_numerics():
    """stock and reference run the same reference code (two ISAs): the same losses, to float32 rounding."""
    from workshop_lib import bench
    from workshop_lib.data import load_mnist

    (images, labels), _ = load_mnist()
    common = dict(num_batches=2, num_warmup=1, batch_size=20, images=images[:200], labels=labels[:200])
    stock_speeds, stock_losses = bench.measure_cnn("stock", **common)
    _, reference_losses = bench.measure_cnn("reference", **common)
    assert len(stock_speeds) == 2 and all(s > 0 for s in stock_speeds)
    np.testing.assert_allclose(stock_losses, reference_losses, rtol=1e-4)
    with pytest.raises(ValueError, match="mode='training' must be 'train' or 'inference'"):
        bench.measure_cnn("stock", mode="training")


def test_conv_bench_prints_each_convolution_and_the_ratios(root):
    proc = subprocess.run([sys.executable, "benchmarks/conv_bench.py", "--batch-size", "2", "--repetitions", "1"],
                          cwd=root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    if "no jit_conv kernels" not in proc.stdout:
        assert proc.stdout.count("GFLOP/s") == 9 and "conv2 backward-data: jit / GEMM alone = " in proc.stdout
        assert proc.stdout.count("% of the measured fp32 peak") == 9


def test_allreduce_bench_runs_at_a_tiny_size(root):
    proc = subprocess.run([sys.executable, "benchmarks/allreduce_bench.py", "--ranks", "2", "--max-bytes", "16384",
                           "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr
    assert "memory copy bandwidth" in proc.stdout and "at 4 KB ours takes" in proc.stdout
    assert "ours at 16,384 B (each rank moves 2(p-1)/p of it): " in proc.stdout and "of the memory roof" in proc.stdout


def test_horovod_bench_runs_at_a_tiny_size(root, tmp_path):
    import json

    out = tmp_path / "hvd.json"
    proc = subprocess.run([sys.executable, "benchmarks/horovod_bench.py", "--steps", "8", "--batch-size", "10",
                           "--repeats", "1", "--slides-steps", "4", "--overhead-steps", "4", "--json", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks x 1 thread / 1 rank x 1 thread = " in proc.stdout
    assert "2x1 training: " in proc.stdout and "% of the measured fp32 peak" in proc.stdout
    assert "2 ranks nothing set / 2 ranks pinned by hand = " in proc.stdout
    assert "2 ranks nothing set / 1 rank nothing set     = " in proc.stdout
    assert re.search(r"^tensorflow_mnist.py 1 rank / cnn_bench engine = \d+\.\d\dx \(target >= 0.9\)$", proc.stdout,
                     re.MULTILINE)
    figures = json.loads(out.read_text())
    assert set(figures["slides"]["images_per_second"]) == {"1 rank, nothing set", "2 ranks, nothing set",
                                                           "2 ranks, pinned by hand"}
    assert len(figures["overhead"]["script"]) == len(figures["overhead"]["engine"]) == 1
    assert figures["overhead"]["script"][0] > 0 and figures["overhead"]["engine"][0] > 0
    assert set(figures["runs"]) == {"1x1", "1x2", "2x1"} and figures["runs"]["2x1"]["steps_per_rank"] == 4


def test_runtime_bench_prints_interleaved_over_alone_for_each_family(root):
    proc = subprocess.run([sys.executable, "benchmarks/runtime_bench.py", "--quick", "--repeats", "1"], cwd=root,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    for family in ("int8 GEMM 512^3", "fp32 conv (jit)", "d4p Lloyd (1 iteration)"):
        assert re.search(rf"^{re.escape(family)}.*\s\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d$", proc.stdout, re.M), family
    assert re.search(r"^worst interleaved/alone speed: \d+\.\d\d \(target >= 0.90; load ", proc.stdout, re.M)
