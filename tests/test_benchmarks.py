"""Benchmarks stay runnable: each script runs at a tiny size and prints its figures (no timing is asserted)."""

import subprocess
import sys

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
                     "2 x 1 / 1 x 1 = ", "Plain mpiexec, no thread variable set"):
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
    figures = json.loads(out.read_text())
    assert figures["cnn"]["int8_accuracy"] > 0.97 and len(figures["gemm"]) == 3


def test_cnn_bench_prints_tf_cnn_benchmarks_lines(root, tmp_path):
    import json

    out = tmp_path / "cnn.json"
    proc = subprocess.run([sys.executable, "benchmarks/cnn_bench.py", "--num-batches", "2", "--num-warmup", "1",
                           "--no-torch", "--background-load", "1", "--json", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "background load: 1 busy process(es)" in proc.stdout and "(under 1 busy process(es)" in proc.stdout
    assert "images/sec:" in proc.stdout and "(jitter = " in proc.stdout and "Executive summary" in proc.stdout
    assert "optimized / default = " in proc.stdout
    assert set(json.loads(out.read_text())["images_per_second"]) == {"default", "optimized"}


def test_conv_bench_prints_each_convolution_and_the_ratios(root):
    proc = subprocess.run([sys.executable, "benchmarks/conv_bench.py", "--batch-size", "2", "--repetitions", "1"],
                          cwd=root, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    if "no jit_conv kernels" not in proc.stdout:
        assert proc.stdout.count("GFLOP/s") == 9 and "conv2 backward-data: jit / GEMM alone = " in proc.stdout


def test_allreduce_bench_runs_at_a_tiny_size(root):
    proc = subprocess.run([sys.executable, "benchmarks/allreduce_bench.py", "--ranks", "2", "--max-bytes", "16384",
                           "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr
    assert "memory copy bandwidth" in proc.stdout and "at 4 KB ours takes" in proc.stdout


def test_horovod_bench_runs_at_a_tiny_size(root, tmp_path):
    import json

    out = tmp_path / "hvd.json"
    proc = subprocess.run([sys.executable, "benchmarks/horovod_bench.py", "--steps", "8", "--batch-size", "10",
                           "--repeats", "1", "--slides-steps", "4", "--json", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks x 1 thread / 1 rank x 1 thread = " in proc.stdout
    assert "2 ranks nothing set / 2 ranks pinned by hand = " in proc.stdout
    assert "2 ranks nothing set / 1 rank nothing set     = " in proc.stdout
    figures = json.loads(out.read_text())
    assert set(figures["slides"]["images_per_second"]) == {"1 rank, nothing set", "2 ranks, nothing set",
                                                           "2 ranks, pinned by hand"}
    assert set(figures["runs"]) == {"1x1", "1x2", "2x1"} and figures["runs"]["2x1"]["steps_per_rank"] == 4
