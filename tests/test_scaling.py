"""workshop_lib.scaling: the alpha-beta model, checked against step counts of the real schedules and a fit."""

import math

import numpy as np
import pytest

from workshop_lib import scaling
from workshop_lib.comm import chunk_bounds as _chunk_bounds, ring_schedule

LINK = scaling.Link(alpha=5e-6, beta=1 / 10e9, gamma=1 / 20e9)


@pytest.mark.parametrize("p", [2, 3, 4, 7, 16])
def test_the_ring_model_is_the_sum_of_its_schedules_steps(p):
    """Each step of ring_schedule sends one chunk per rank: alpha + chunk bytes x beta (+ reducing it)."""
    nbytes = 4 * 1_000_003
    bounds = _chunk_bounds(nbytes, p)
    largest = max(b - a for a, b in zip(bounds, bounds[1:]))
    total = 0.0
    for phase, _, transfers in ring_schedule(p):  # ranks move in lockstep: each step costs its largest chunk
        total += LINK.alpha + largest * LINK.beta + (largest * LINK.gamma if phase == "reduce-scatter" else 0)
    assert math.isclose(scaling.ring_time(nbytes, p, LINK), total, rel_tol=1e-5)


def test_two_ranks_ring_is_one_exchange_each_way_and_parameter_server_twice_the_buffer():
    n = 8e6
    assert math.isclose(scaling.ring_time(n, 2, LINK), 2 * LINK.alpha + n * LINK.beta + n / 2 * LINK.gamma)
    assert math.isclose(scaling.parameter_server_time(n, 2, LINK), 2 * (LINK.alpha + n * LINK.beta) + n * LINK.gamma)
    assert math.isclose(scaling.recursive_doubling_time(n, 4, LINK), 2 * (LINK.alpha + n * LINK.beta + n * LINK.gamma))
    assert scaling.ring_time(n, 1, LINK) == scaling.recursive_doubling_time(n, 1, LINK) == 0.0


def test_the_ring_bandwidth_term_is_bounded_latency_takes_over_at_thousands_of_ranks_and_the_parameter_server_saturates():
    n = scaling.cnn_gradient_bytes()
    big, small = scaling.predict(n, LINK), scaling.predict(1024, LINK)
    ranks = np.array(scaling.DEFAULT_RANKS)
    bandwidth_part = big["ring"] - 2 * (ranks - 1) * LINK.alpha
    assert np.all(bandwidth_part < 2 * n * LINK.beta + n * LINK.gamma)  # never more than 2n beta, whatever p
    assert np.all(np.diff(big["parameter_server"]) > 0) and big["parameter_server"][-1] > 100 * big["ring"][-1]
    assert np.all(small["recursive_doubling"] < small["ring"])  # small messages: latency-bound, log2 p wins
    # the CNN's gradient: bandwidth-bound, the ring wins ... until its 2(p-1) latencies dominate (5 us x 8190)
    assert np.all((big["ring"] < big["recursive_doubling"]) == (ranks <= 1024))
    assert list(big) == ["ring", "recursive_doubling", "parameter_server"]


def test_hierarchical_reduces_to_the_ring_at_either_extreme_and_sends_less_over_a_slow_network():
    n, fast, slow = 16e6, scaling.Link(1e-6, 1 / 50e9), scaling.Link(5e-6, 1 / 5e9)
    assert math.isclose(scaling.hierarchical_time(n, 8, 1, fast, slow), scaling.ring_time(n, 8, slow))
    assert math.isclose(scaling.hierarchical_time(n, 8, 8, fast, slow), scaling.ring_time(n, 8, fast))
    assert scaling.hierarchical_time(n, 64, 8, fast, slow) < scaling.ring_time(n, 64, slow)
    table = scaling.predict(n, slow, ranks=(8, 12, 16), ranks_per_node=8, intra=fast)
    assert np.isnan(table["hierarchical"][1]) and not np.isnan(table["hierarchical"][[0, 2]]).any()


def test_fit_recovers_alpha_and_beta_from_exact_and_from_noisy_times():
    sizes = np.array([8, 1024, 16384, 262144, 4 << 20])
    truth = scaling.Link(3e-6, 1 / 12e9)
    fitted = scaling.fit_link(sizes, truth.alpha + sizes * truth.beta)
    assert math.isclose(fitted.alpha, truth.alpha, rel_tol=1e-9) and math.isclose(fitted.beta, truth.beta, rel_tol=1e-9)
    noise = np.random.default_rng(0).uniform(1.0, 1.05, sizes.size)  # timing noise only ever adds time
    noisy = scaling.fit_link(sizes, (truth.alpha + sizes * truth.beta) * noise)
    assert 0.9 < noisy.alpha / truth.alpha < 1.1 and 0.9 < noisy.beta / truth.beta < 1.1
    flat = scaling.fit_link([1, 2], [1e-6, 1e-6])  # flat times: all latency
    assert math.isclose(flat.alpha, 1e-6) and flat.beta < 1e-20


@pytest.mark.parametrize("call, words", [
    (lambda: scaling.fit_link([8, 8], [1e-6, 2e-6]), "two distinct sizes"),
    (lambda: scaling.fit_link([8, 16], [1e-6]), "must pair up"),
    (lambda: scaling.fit_link([8, 16], [1e-6, -1.0]), "positive and finite"),
    (lambda: scaling.Link(-1.0, 1e-9), "alpha=-1.0"),
    (lambda: scaling.ring_time(10, 0, LINK), "ranks=0"),
    (lambda: scaling.hierarchical_time(10, 6, 4, LINK, LINK), "ranks_per_node=4 must be a positive divisor"),
])
def test_bad_input_is_an_error_naming_it(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_the_cnn_gradient_is_its_parameters_in_float32():
    assert scaling.cnn_gradient_bytes() == 4 * (5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 3136 * 1024 + 1024
                                                + 1024 * 10 + 10)


@pytest.mark.mpi
def test_measure_link_under_mpiexec_gives_times_that_fit(mpirun):
    code = ("from workshop_lib import scaling; s, t = scaling.measure_link(sizes=(8, 65536, 1 << 20), repeats=3); "
            "l = scaling.fit_link(s, t); from mpi4py import MPI; "
            "MPI.COMM_WORLD.Get_rank() == 0 and print('fit', len(t), all(x > 0 for x in t), l.alpha >= 0, l.beta > 0)")
    proc = mpirun(2, ["-c", code], timeout=120)
    assert "fit 3 True True True" in proc.stdout, proc.stdout


@pytest.mark.mpi
def test_scaling_bench_prints_model_next_to_measurement(root):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "scaling_bench.py"), "--ranks", "2",
                           "--nbytes", "262144", "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "model / measured" in proc.stdout and "4096" in proc.stdout and "parameter_server" in proc.stdout


@pytest.mark.mpi
def test_lab_link_timing_script_runs_its_launch_line_and_its_times_fit(mpirun, root):
    """Lab 03 runs solutions/scripts/link_timing.py (as its docstring says) and fits its times."""
    import json

    script = root / "solutions" / "scripts" / "link_timing.py"
    assert "mpiexec -n 2 python link_timing.py" in script.read_text()
    # 8 B and 1 MB: sizes far enough apart that a loaded machine's noise cannot invert their times
    proc = mpirun(2, ["link_timing.py", "--sizes", "8", "1048576", "--repeats", "2"], cwd=script.parent)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks"] == 2 and result["bytes"] == [8, 1048576] and len(result["seconds"]) == 2
    link = scaling.fit_link(result["bytes"], result["seconds"])
    assert link.beta > 0 and link.alpha >= 0


def test_oversubscription_scales_the_per_byte_costs_by_ranks_per_core_and_keeps_latency():
    link = scaling.oversubscribed(LINK, 4, 2)
    assert link.alpha == LINK.alpha and math.isclose(link.beta, 2 * LINK.beta) and math.isclose(link.gamma, 2 * LINK.gamma)
    assert scaling.oversubscribed(LINK, 2, 4) == LINK  # fewer ranks than cores: unchanged
    with pytest.raises(ValueError, match="cores=0"):
        scaling.oversubscribed(LINK, 2, 0)


def test_measured_gamma_is_the_time_of_numpy_add_per_byte():
    import time

    gamma = scaling.measure_gamma(1 << 20, repeats=3)
    a, b = np.ones(1 << 18, dtype=np.float32), np.ones(1 << 18, dtype=np.float32)
    t0 = time.perf_counter()
    np.add(a, b, out=a)
    one = time.perf_counter() - t0
    assert 0 < gamma * a.nbytes <= one * 1.5 + 1e-4  # the best of three is no slower than one more add
    with pytest.raises(ValueError, match="nbytes=2"):
        scaling.measure_gamma(2)


@pytest.mark.mpi
def test_allreduce_bench_prints_the_fitted_models_prediction_next_to_the_measured_ring(root):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "allreduce_bench.py"), "--ranks", "2", "4",
                           "--max-bytes", "65536", "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    for n in (2, 4):
        assert f"{n} ranks on " in proc.stdout and "model link fitted in this run: alpha " in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().split()[:1] == ["65536"]]
    assert len(rows) == 2 and all(float(row[5]) > 0 and math.isclose(float(row[6]), float(row[5]) / float(row[4]),
                                                                      rel_tol=0.05, abs_tol=0.01) for row in rows)


@pytest.mark.parametrize("script, argv, message", [
    ("allreduce_timing.py", ["--sizes", "-4"], "argument --sizes: expected positive integers, got -4"),
    ("link_timing.py", ["--sizes", "8", "0"], "argument --sizes: expected positive integers, got 8 0"),
    ("link_timing.py", ["--repeats", "0"], "argument --repeats: expected positive integers, got 0"),
])
def test_the_timing_scripts_name_a_bad_size_before_any_mpi(root, script, argv, message):
    """Before: numpy's "negative dimensions are not allowed" from inside the timing."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, *argv], cwd=root / "labs" / "scripts", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
