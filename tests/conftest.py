"""Shared fixtures: the repository root, and a runner for scripts under mpiexec."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from workshop_lib import sysinfo

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    """A localhost TCP port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mpirun():
    """``mpirun(n, args, timeout=...)``: run ``mpiexec -n n python *args`` from the repository root."""
    if sysinfo.mpiexec_path() is None:
        pytest.skip("no mpiexec: install the mpich wheel (pip install mpich)")

    def run(n, args, timeout=120, check=True, threads_per_rank=1, cwd=ROOT, env=None):
        return sysinfo.run_mpi(n, args, timeout=timeout, check=check, threads_per_rank=threads_per_rank, cwd=cwd, env=env)

    return run


@pytest.fixture
def fresh_graph():
    """An empty default graph for a test of workshop_lib.tf (and quiet tf.logging), emptied again after it."""
    import workshop_lib.tf as tf

    tf.reset_default_graph()
    tf.logging.set_verbosity(tf.logging.WARN)
    yield
    tf.reset_default_graph()
