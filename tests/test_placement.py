"""Placement: each rank's share of the cores and threads, the user's settings winning, and a step's threads."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import workshop_lib.tf as tf
from workshop_lib import cli, placement
from workshop_lib.tf.core import make_op


def test_plan_gives_each_rank_of_a_node_its_own_cores():
    got = [placement.plan((0, 1, 2, 3), 2, r, env={}) for r in range(2)]
    assert [p.cores for p in got] == [(0, 1), (2, 3)]
    assert [(p.numba_threads, p.blas_threads, p.binding) for p in got] == [(2, 2, "workshop")] * 2


def test_plan_splits_an_odd_number_of_cpus_without_overlap():
    got = [placement.plan((4, 5, 6), 2, r, env={}) for r in range(2)]
    assert [p.cores for p in got] == [(4,), (5, 6)]
    assert [p.numba_threads for p in got] == [1, 2]


def test_one_process_keeps_every_cpu_and_is_not_bound():
    p = placement.plan((0, 1, 2, 3), 1, 0, env={})
    assert (p.cores, p.numba_threads, p.blas_threads, p.binding) == ((0, 1, 2, 3), 4, 4, "inherited")


def test_more_ranks_than_cpus_gives_one_thread_each_and_no_binding():
    got = [placement.plan((0, 1), 4, r, env={}) for r in range(4)]
    assert {(p.cores, p.numba_threads, p.blas_threads, p.binding) for p in got} == {((0, 1), 1, 1, "inherited")}


def test_a_binding_made_by_mpiexec_or_slurm_is_kept():
    p = placement.plan((2, 3, 4, 5), 2, 1, env={}, shared_affinity=False)
    assert (p.cores, p.numba_threads, p.binding) == ((2, 3, 4, 5), 4, "inherited")
    assert any("kept the binding" in note for note in p.notes)


def test_omp_num_threads_wins_for_numba_and_leaves_the_blas_alone():
    p = placement.plan((0, 1), 2, 0, env={"OMP_NUM_THREADS": "2"})
    assert (p.numba_threads, p.blas_threads) == (2, None)
    assert p.binding == "inherited"  # 2 threads each on one core would be worse than no binding
    assert "OMP_NUM_THREADS=2 set by the user" in p.notes


def test_one_thread_set_by_the_user_still_binds_each_rank():
    env = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    got = [placement.plan((0, 1), 2, r, env=env) for r in range(2)]
    assert [(p.cores, p.numba_threads, p.blas_threads, p.binding) for p in got] == \
        [((0,), 1, None, "workshop"), ((1,), 1, None, "workshop")]


def test_numba_num_threads_sets_numba_only_and_numba_limit_caps_it():
    p = placement.plan((0, 1, 2, 3), 1, 0, env={"NUMBA_NUM_THREADS": "3"})
    assert (p.numba_threads, p.blas_threads) == (3, 4)
    assert placement.plan((0, 1, 2, 3), 1, 0, env={}, numba_limit=2).numba_threads == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(cpus=()), "cpus=()"),
    (dict(cpus=(0, 1), local_size=0), "local_size=0"),
    (dict(cpus=(0, 1), local_size=2, local_rank=2), "local_rank=2"),
])
def test_plan_rejects_impossible_input_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        placement.plan(env={}, **kwargs)


def test_format_cpus_writes_ranges_as_taskset_does():
    assert placement.format_cpus((5, 0, 1, 2, 7, 8)) == "0-2,5,7-8"
    assert placement.format_cpus((3,)) == "3"


def test_workshop_check_ranks_shows_each_ranks_cores_and_threads(capsys, monkeypatch):
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1, 2, 3))
    for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", *placement.BLAS_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 4)
    assert cli.main(["check", "--no-mpi", "--ranks", "2"]) in (0, 1)  # 1 only if something else is missing
    out = capsys.readouterr().out
    assert "Placement of 2 rank(s) on this node (4 usable CPUs: 0-3)" in out
    assert "rank 0/2 (local 0/2): cores 0-1 (bound by workshop_lib), numba threads 2, BLAS threads 2" in out
    assert "rank 1/2 (local 1/2): cores 2-3 (bound by workshop_lib), numba threads 2, BLAS threads 2" in out


def test_workshop_check_rejects_zero_ranks():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["check", "--ranks", "0"])


def _threads_probe(x):
    """An op that reports the numba and BLAS thread counts of the thread that runs it."""
    def compute(ctx, value):
        return (np.array([numba.get_num_threads(), placement.blas_threads() or 0], np.int32),)

    return make_op("ThreadsProbe", [x], compute, [tf.int32], [(2,)]).outputs[0]


def test_intra_op_parallelism_threads_sets_numba_and_the_blas_inside_session_run():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 to tell 1 thread from the default")
    before = (numba.get_num_threads(), placement.blas_threads())
    with tf.Graph().as_default():
        probe = _threads_probe(tf.constant(1.0))
        with tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=1)) as sess:
            assert sess.run(probe).tolist() == [1, 1]
        with tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=2)) as sess:
            assert sess.run(probe).tolist() == [2, 1]  # the BLAS never starts its own threads inside a step
    assert (numba.get_num_threads(), placement.blas_threads()) == before


def test_inter_op_worker_threads_use_the_callers_thread_count():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2: a worker thread would start with 2")
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with tf.Graph().as_default():
            probes = [_threads_probe(tf.constant(float(i))) for i in range(4)]
            with tf.Session(config=tf.ConfigProto(inter_op_parallelism_threads=2)) as sess:
                assert [p.tolist()[0] for p in sess.run(probes)] == [1, 1, 1, 1]
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("shape_a, shape_b", [((300, 70), (70, 50)), ((8, 900), (900, 400)), ((3, 4), (4, 5))])
def test_matmul_split_over_a_steps_threads_equals_float64_numpy(shape_a, shape_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    with placement.op_threads(threads):
        inside = placement.matmul(a, b)
        transposed = placement.matmul(np.asfortranarray(b.T), np.asfortranarray(a.T))
    np.testing.assert_allclose(inside, ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(transposed, ref.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(placement.matmul(a, b), ref, rtol=1e-4, atol=1e-3)


def test_matmul_and_op_threads_reject_bad_input():
    with pytest.raises(ValueError, match=r"a.shape=\(2, 3\) and b.shape=\(4, 2\)"):
        placement.matmul(np.ones((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="threads=-1"):
        with placement.op_threads(-1):
            pass


def test_importing_the_package_sets_no_thread_variable(root):
    names = ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    code = f"import os, workshop_lib.tf, workshop_lib.hvd, workshop_lib.d4p; print([k for k in {names} if k in os.environ])"
    env = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
