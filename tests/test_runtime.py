import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from workshop_lib import runtime

ROOT = Path(__file__).resolve().parents[1]


def _tasks():
    return len(os.listdir("/proc/self/task"))


needs_openblas_pthreads = pytest.mark.skipif(
    not Path("/proc/self/task").exists() or not runtime._openblas_parkers() or (runtime.blas_threads() or 1) < 2,
    reason="numpy's BLAS here is not a multi-threaded OpenBLAS built with pthreads (nothing to park)")


def test_kernels_and_the_layers_below_mpi_import_neither_placement_nor_mpi():
    code = ("import sys; import workshop_lib.kernels, workshop_lib.int8, workshop_lib.jit_conv, "
            "workshop_lib.quantization, workshop_lib.runtime; "
            "print(sorted(m for m in ('workshop_lib.placement', 'mpi4py') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_set_numba_threads_validates_and_returns_the_previous_count():
    before = numba.get_num_threads()
    assert runtime.set_numba_threads(1) == before
    try:
        assert numba.get_num_threads() == 1
    finally:
        runtime.set_numba_threads(before)
    for bad in (0, -1, 1.5, "2", True, numba.config.NUMBA_NUM_THREADS + 1):
        with pytest.raises(ValueError, match=r"n=.* must be an integer between 1 and NUMBA_NUM_THREADS="):
            runtime.set_numba_threads(bad)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        runtime.set_blas_threads(0)


@needs_openblas_pthreads
def test_yield_blas_parks_openblas_workers_and_the_next_gemm_starts_them_with_the_users_count():
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    ref = a.astype(np.float64) @ a
    np.testing.assert_allclose(a @ a, ref, rtol=1e-4, atol=1e-3)
    started = _tasks()
    runtime.yield_blas()
    assert _tasks() < started  # the workers ended
    np.testing.assert_allclose(a @ a, ref, rtol=1e-4, atol=1e-3)
    assert _tasks() == started and runtime.blas_threads() >= 2  # started again, at the same count
    with threadpool_limits(1):  # the user's limit wins: parking never changes a count
        runtime.yield_blas()
        np.testing.assert_allclose(a @ a, ref, rtol=1e-4, atol=1e-3)
        assert runtime.blas_threads() == 1
    assert runtime.blas_threads() >= 2


@pytest.fixture
def parks(monkeypatch):
    """Count the calls that would park the BLAS's workers (in place of OpenBLAS's own)."""
    calls = []
    monkeypatch.setattr(runtime, "_parkers", [lambda: calls.append(1) or 0])
    return calls


def test_yield_blas_does_nothing_inside_a_step_from_another_thread_or_when_turned_off(parks):
    runtime.yield_blas()
    assert len(parks) == 1
    with runtime.op_threads(0):
        runtime.yield_blas()
    worker = threading.Thread(target=runtime.yield_blas)
    worker.start()
    worker.join()
    before = runtime.set_blas_yield(False)
    try:
        runtime.yield_blas()
    finally:
        runtime.set_blas_yield(before)
    assert len(parks) == 1


def test_every_kernel_family_entry_point_yields_the_blas(parks):
    from workshop_lib import d4p, int8, jit_conv, kernels, quantization

    x8, w8 = np.ones((8, 8), np.uint8), np.ones((8, 8), np.int8)
    calls = [
        lambda: int8.gemm_u8s8s32(x8, w8),
        lambda: kernels.conv2d_forward(np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)),
        lambda: kernels.gemm_reference(np.ones((4, 4)), np.ones((4, 4))),
        lambda: quantization.requantize(np.ones((2, 3), np.int32), 0.5,
                                        quantization.QuantParams(1.0, 0, np.dtype(np.uint8))),
        lambda: d4p.kmeans(2, maxIterations=1).compute(np.arange(8.0).reshape(4, 2), np.zeros((2, 2))),
    ]
    if jit_conv.simd_lanes():
        calls.append(lambda: jit_conv.conv2d_nhwc_f32(np.ones((1, 4, 4, 1), np.float32),
                                                      np.ones((1, 1, 1, 1), np.float32), ((0, 0), (0, 0))))
    for i, call in enumerate(calls):
        call()
        assert len(parks) == i + 1, i
