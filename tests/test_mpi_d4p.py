"""Distributed K-Means under mpiexec -n 1, 2, 3 equals the serial computation."""

import numpy as np
import pytest

from workshop_lib import d4p

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

K = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(42)
    centers = rng.uniform(0, 1, (K, 3))
    X = centers[rng.integers(K, size=2999)] + rng.normal(scale=0.08, size=(2999, 3))  # 2999: ranks get unequal rows
    path = tmp_path_factory.mktemp("d4p") / "data.npz"
    np.savez(path, X=X)
    return X, path


@pytest.fixture(scope="module")
def serial(dataset):
    X, _ = dataset
    out = {}
    for method in d4p.INIT_METHODS:
        for trials in (1, 3) if method == "plusPlusDense" else (1,):
            out[f"init_{method}_{trials}"] = d4p.kmeans_init(
                K, method=method, nTrials=trials, engine=d4p.engines_mt19937(seed=11)
            ).compute(X).centroids
    out["fit"] = d4p.kmeans(K, 30).compute(X, out["init_plusPlusDense_1"])
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_distributed_kmeans_equals_serial(mpirun, dataset, serial, tmp_path, n):
    _, data = dataset
    out = tmp_path / "out.npz"
    mpirun(n, ["tests/mpi_scripts/kmeans_spmd.py", data, out, "--k", K])
    got = np.load(out)
    for key in serial:
        if key.startswith("init_"):
            np.testing.assert_array_equal(got[key], serial[key], err_msg=f"{key} differs on {n} ranks")
    fit = serial["fit"]
    assert bool(got["same_on_all_ranks"])
    np.testing.assert_allclose(got["centroids"], fit.centroids, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got["labels"], fit.assignments[:, 0])
    np.testing.assert_array_equal(got["labels_assign_only"], fit.assignments[:, 0])
    np.testing.assert_allclose(got["objective"], fit.objectiveFunction, rtol=1e-12)
    assert got["iterations"][0, 0] == fit.nIterations[0, 0]


@pytest.mark.parametrize("n, flag", [(2, "--nan-on-rank"), (3, "--nan-on-rank"), (3, "--bad-centroids-on-rank")])
def test_bad_input_on_one_rank_raises_on_every_rank(mpirun, dataset, tmp_path, n, flag):
    _, data = dataset
    proc = mpirun(n, ["tests/mpi_scripts/kmeans_spmd.py", data, tmp_path / "o.npz", "--k", K, flag, n - 1], timeout=120)
    lines = [line for line in proc.stdout.splitlines() if "raised ValueError" in line]
    assert sorted(int(line.split()[1]) for line in lines) == list(range(n)), proc.stdout
    expected = "NaN or Inf" if flag == "--nan-on-rank" else r"centroids.shape"
    assert all(f"rank {n - 1}: " in line and expected in line for line in lines), lines


@pytest.mark.parametrize("n, param, values", [
    (2, "nClusters", "nClusters (rank 0: 6, rank 1: 7)"),
    (3, "nClusters", "nClusters (rank 0: 6, rank 1: 7, rank 2: 8)"),
    (3, "method", "method (rank 0: 'defaultDense', rank 1: 'randomDense', rank 2: 'plusPlusDense')"),
    (2, "seed", "engine seed (rank 0: 777, rank 1: 778)"),
    (2, "fptype", "fptype (rank 0: 'double', rank 1: 'float')"),
    (2, "fptype_lloyd", "fptype (rank 0: 'double', rank 1: 'float')"),
    (2, "maxIterations", "maxIterations (rank 0: 5, rank 1: 6)"),
    (2, "algorithm", "algorithm (rank 0: 'kmeans', rank 1: 'kmeans_init')"),
])
def test_ranks_that_disagree_on_a_parameter_raise_on_every_rank_naming_it(mpirun, dataset, tmp_path, n, param, values):
    _, data = dataset
    proc = mpirun(n, ["tests/mpi_scripts/kmeans_spmd.py", data, tmp_path / "o.npz", "--k", K, "--disagree", param],
                  timeout=60)
    lines = [line for line in proc.stdout.splitlines() if "raised ValueError" in line]
    assert sorted(int(line.split()[1]) for line in lines) == list(range(n)), proc.stdout
    assert all("the ranks passed different parameters" in line and values in line for line in lines), lines


def test_data_that_would_overflow_on_one_rank_raises_on_every_rank(mpirun, dataset, tmp_path):
    _, data = dataset
    proc = mpirun(2, ["tests/mpi_scripts/kmeans_spmd.py", data, tmp_path / "o.npz", "--k", K, "--huge-on-rank", "1"],
                  timeout=60)
    lines = [line for line in proc.stdout.splitlines() if "raised ValueError" in line]
    assert len(lines) == 2 and all("squared distances would overflow float64" in line for line in lines), proc.stdout


def test_a_rank_that_fails_outside_a_d4p_call_ends_the_job_quickly_with_its_message(mpirun, dataset, tmp_path):
    import time

    _, data = dataset
    for n in (2, 3):
        t0 = time.monotonic()
        proc = mpirun(n, ["tests/mpi_scripts/kmeans_spmd.py", data, tmp_path / "o.npz", "--raise-on-rank", n - 1],
                      timeout=60, check=False)
        assert proc.returncode != 0 and time.monotonic() - t0 < 30, proc.stderr
        assert f"[rank {n - 1}] MemoryError: rank {n - 1} ran out of memory on purpose" in proc.stderr, proc.stderr
        assert "aborting the whole job" in proc.stderr and "unreachable" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--out", "q.pgn"], "--out q.pgn: .pgn is not an image format PIL can write"),
    (["--out", "q.xbm"], "--out q.xbm: XBM cannot hold an RGB image"),
    (["--out", "/proc/q.png"], "--out='/proc/q.png': cannot write in the folder /proc"),  # passed as root before
    (["--out", "a_file/q.png"], "a_file is a file, not a folder"),
    (["--colors", "0"], "--colors 0 must be between 1 and 256"),
    (["--max-iter", "-1"], "--max-iter -1 must be >= 0"),
    (["--image", "README.md"], "--image README.md: not a readable image"),
])
def test_quantize_script_rejects_bad_arguments_on_every_rank_before_any_work(mpirun, tmp_path, args, message):
    import time

    base = ["labs/scripts/kmeans_quantize.py", "--image", "data/images/hubble_deep_field.jpg", "--out",
            str(tmp_path / "q.png")]
    if "a_file/q.png" in args:
        args = ["--out", str(tmp_path / "a_file" / "q.png")]
        (tmp_path / "a_file").write_text("not a folder")
    t0 = time.monotonic()
    proc = mpirun(2, base + args, timeout=60, check=False)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kmeans_quantize.py: error: ")]
    assert len(errors) == 2 and all(message in line for line in errors), proc.stderr  # one per rank
    assert "Lloyd iterations" not in proc.stdout and [p.name for p in tmp_path.iterdir()] in ([], ["a_file"])


def test_quantize_script_runs_as_documented_and_matches_one_rank(mpirun, root, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    script = "labs/scripts/kmeans_quantize.py"
    assert "mpiexec -n 2 python labs/scripts/kmeans_quantize.py --image data/images/hubble_deep_field.jpg" in (
        root / script
    ).read_text()
    two = tmp_path / "quantized.png"
    proc = mpirun(2, [script, "--image", "data/images/hubble_deep_field.jpg", "--colors", "16", "--out", two])
    assert "2 rank(s)" in proc.stdout and "Lloyd iterations" in proc.stdout
    one = tmp_path / "one.png"
    subprocess.run([sys.executable, script, "--image", "data/images/hubble_deep_field.jpg", "--colors", "16",
                    "--out", one], cwd=root, check=True, timeout=300, capture_output=True)
    a, b = np.asarray(Image.open(two)), np.asarray(Image.open(one))
    assert a.shape == b.shape == (872, 1000, 3)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) <= 16
    # same seed, same k-means++ centroids; Lloyd sums differ only in rounding between 1 and 2 ranks
    assert (a == b).all(axis=2).mean() > 0.999


@pytest.mark.parametrize("n", [2, 3])
def test_d4p_moves_numbers_through_buffers_and_never_pickles_them(mpirun, n):
    """d4p's communicator refuses every pickling call but the validating allgather of metadata (no arrays)."""
    proc = mpirun(n, ["tests/mpi_scripts/d4p_buffers.py"], timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank 0:")]
    assert len(lines) == 1 and lines[0].startswith("rank 0: buffers only ("), proc.stdout + proc.stderr
