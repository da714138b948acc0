"""workshop_lib.comm: fixed inputs give the results recorded before comm.py became the comm/ package (issue 24).

``tests/mpi_scripts/comm_recorded.py`` runs allreduce (every algorithm, dtype and op, the cached fast path, in
place, under a timeout), fused_allreduce (with and without fp16), the parameter server, broadcast and allgather
on seeded inputs and prints a digest of every group's result bytes. The digests were recorded at e59b681 (one
comm.py), so a refactor that changes a single bit of a collective's result fails here. "auto" picks its
algorithm by the number of cores (more ranks than cores: shared memory at every size); the groups that use it
are compared only where the ranks are as over- or under-subscribed as where they were recorded (2 CPUs).
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

SCRIPT = "tests/mpi_scripts/comm_recorded.py"
RECORDED_CPUS = 2
RECORDED = {
    '2': {
        'allgather': 'be746b5681b02b34',
        'allreduce/auto': '9c750c3b77055238',
        'allreduce/hierarchical': '9c750c3b77055238',
        'allreduce/recursive_doubling': '9c750c3b77055238',
        'allreduce/ring': '9c750c3b77055238',
        'allreduce/shared_memory': '9c750c3b77055238',
        'allreduce_timeout/auto': '100db5f53869d007',
        'allreduce_timeout/hierarchical': '100db5f53869d007',
        'allreduce_timeout/recursive_doubling': '100db5f53869d007',
        'allreduce_timeout/ring': '100db5f53869d007',
        'broadcast': 'd3e9888d2dfb878c',
        'fused_allreduce': 'd78e34144a8ab8fd',
        'fused_allreduce_fp16': 'baca3cfbae07026f',
        'parameter_server': '68a9338a984a3017',
    },
    '4': {
        'allgather': '42fc5d1043fe2d63',
        'allreduce/auto': 'ed510debad574251',
        'allreduce/hierarchical': 'cf5ff643663f1013',
        'allreduce/recursive_doubling': '91d1615ea2b1e911',
        'allreduce/ring': 'cf5ff643663f1013',
        'allreduce/shared_memory': '025332eed9f8a063',
        'allreduce_timeout/auto': '1bbb938a8451b5f2',
        'allreduce_timeout/hierarchical': '72d6f1f13971a209',
        'allreduce_timeout/recursive_doubling': 'd96023158c470b19',
        'allreduce_timeout/ring': '72d6f1f13971a209',
        'broadcast': 'bd39d7f70c60af01',
        'fused_allreduce': 'b0deee2af274c17c',
        'fused_allreduce_fp16': '7aa640d98e01f56f',
        'parameter_server': '722c1cbb3095aa1f',
    },
    '4x2nodes': {
        'allgather': '42fc5d1043fe2d63',
        'allreduce/auto': '91d1615ea2b1e911',
        'allreduce/hierarchical': '91d1615ea2b1e911',
        'allreduce/recursive_doubling': '91d1615ea2b1e911',
        'allreduce/ring': 'cf5ff643663f1013',
        'allreduce_timeout/auto': 'd96023158c470b19',
        'allreduce_timeout/hierarchical': 'd96023158c470b19',
        'allreduce_timeout/recursive_doubling': 'd96023158c470b19',
        'allreduce_timeout/ring': '72d6f1f13971a209',
        'broadcast': 'bd39d7f70c60af01',
        'fused_allreduce': '3016c4157a8185df',
        'fused_allreduce_fp16': '87d5eb68002bbc7e',
        'parameter_server': '722c1cbb3095aa1f',
    },
}


def _env(**variables):
    env = {k: v for k, v in os.environ.items() if k not in ("WORKSHOP_SIMULATE_NODES", "HOROVOD_HIERARCHICAL_ALLREDUCE")}
    return {**env, **variables}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_collectives_give_the_recorded_results_bit_for_bit(mpirun, case):
    n = int(case[0])
    env = _env(WORKSHOP_SIMULATE_NODES="2") if case.endswith("nodes") else _env()
    proc = mpirun(n, [SCRIPT], timeout=240, env=env)
    lines = [line[len("rank 0: "):] for line in proc.stdout.splitlines() if line.startswith("rank 0: ")]
    assert not [line for line in lines if "differ" in line], proc.stdout
    got = dict(line.split() for line in lines)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    same_subscription = (n > cpus) == (n > RECORDED_CPUS)
    want = {group: digest for group, digest in RECORDED[case].items()
            if same_subscription or not (group.endswith("/auto") or group.startswith("fused"))}
    assert set(got) == set(RECORDED[case]), sorted(got)
    assert {g: got[g] for g in want} == want
