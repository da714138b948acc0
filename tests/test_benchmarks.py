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
    for expected in ("Lloyd per iteration", "k-means++ (1 trial)", "Distributed Lloyd, k = 4"):
        assert expected in proc.stdout
    import json

    figures = json.loads(out.read_text())
    assert figures["pixels"] == 20000 and set(figures["ranks"]) == {"1", "2"}
