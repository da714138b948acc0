"""Two real MPI nodes on one machine: network namespaces joined by a veth pair, hydra's ssh launcher replaced by an
agent that enters the namespace (an ssh stand-in), ``workshop launch --hostfile`` with 2 ranks per node.

This is the proof that the node-aware code works across a real network (``WORKSHOP_SIMULATE_NODES`` stays the
laptop's way): the hierarchical allreduce against ``MPI_Allreduce`` over TCP, ``hvd.local_rank()`` per node, the
timeline of all 4 ranks, and the bytes that crossed the veth pair. Root on Linux with MPICH's hydra, or skipped
with the reason. About 30 s.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import real_cluster
from workshop_lib import launch, timeline

pytestmark = [pytest.mark.two_nodes, pytest.mark.mpi, pytest.mark.timeout(300)]


def _why_not():
    reason = real_cluster.why_not(("ip", "unshare", "nsenter"))
    if reason:
        return reason
    try:
        flavour = launch.detect_flavour()
    except RuntimeError as exc:
        return str(exc)
    return None if flavour == "mpich" else f"the launcher agent is written for MPICH's hydra; this mpiexec is {flavour}"


def test_hierarchical_allreduce_local_ranks_and_timeline_across_two_namespace_nodes(tmp_path, root):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    with real_cluster.two_nodes(tmp_path) as (nsrsh, hostfile):
        trace = tmp_path / "timeline.json"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WORKSHOP_SIMULATE", "UCX_", "FI_"))},
               "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(nsrsh),
               # UCX sees one kernel and would use shared memory between the "nodes": make it use the network
               "UCX_TLS": "tcp,self", "HOROVOD_TIMELINE": str(trace), "PYTHONPATH": str(root)}
        before = real_cluster.veth_bytes()
        launch_line = [sys.executable, "-m", "workshop_lib.cli", "launch", "tests/mpi_scripts/two_node_probe.py",
                       "-n", "4", "--hostfile", str(hostfile), "--cpus-per-node", "2", "--verbose"]
        proc = subprocess.run(["ip", "netns", "exec", real_cluster.NAMESPACES[0], "unshare", "--uts", "sh", "-c",
                               'hostname node1 && exec "$@"', "sh", *launch_line],
                              capture_output=True, text=True, timeout=240, env=env, cwd=root)
        crossed = real_cluster.veth_bytes() - before
    assert proc.returncode == 0, proc.stdout + proc.stderr
    command = proc.stdout.splitlines()[0]
    assert "-hosts node1:2,node2:2" in command and "-ppn 2" in command, command  # hydra's own host syntax
    rows = re.findall(r"rank (\d)/4 host=(\w+) local=(\d)/2 nodes=2 simulated=False algorithm=(\w+) match_MPI=(\w+) "
                      r"threads=1 cores=(\S+)", proc.stdout)
    assert [(r, host, local) for r, host, local, *_ in rows] == [
        ("0", "node1", "0"), ("1", "node1", "1"), ("2", "node2", "0"), ("3", "node2", "1")], proc.stdout
    assert all(algorithm == "hierarchical" and match == "True" for *_, algorithm, match, _ in rows), rows
    assert {cores for *_, cores in rows if True} <= {"0", "1"}, rows  # one core each, bound by hydra on each node
    assert crossed > 4_000_000, f"only {crossed} bytes crossed the veth pair: the ranks did not use the network"
    events = timeline.load(trace)
    totals = timeline.phase_totals(events)
    assert sorted(totals) == [0, 1, 2, 3] and all(t["allreduce"] > 0 and t["compute"] > 0 for t in totals.values())
