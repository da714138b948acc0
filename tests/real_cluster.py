"""Real cluster components for the tests: a one-host Slurm (munge, slurmctld, slurmd) and two network-namespace nodes.

Not a test module: ``test_slurm.py`` and ``test_two_nodes.py`` use it. Everything it creates lives under a
folder the caller gives (configuration, state, logs, keys) or is named ``wsdl-*`` (namespaces, veth), and
everything is stopped and removed on exit. Root and Linux only; :func:`why_not` says why it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "salloc", "srun", "sinfo")


def why_not(programs=()):
    """The reason these components cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (network namespaces, Slurm's daemons)"
    if os.geteuid() != 0:
        return "needs root (daemons, network namespaces); CI on the course's Debian machine runs as root"
    missing = [p for p in programs if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if missing:
        return (f"{', '.join(missing)} not installed: `make cluster-tools` (called by `make test`) installs "
                "slurm-wlm and munge on Debian/Ubuntu as root")
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line():
    """This host's hardware as slurmd sees it (``slurmd -C``), as a NodeName line for 'localhost'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    words = dict(w.split("=", 1) for w in out.splitlines()[0].split() if "=" in w)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(f"{k}={words[k]}" for k in keep if k in words)


def _wait(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not happen within {timeout} s")


@contextlib.contextmanager
def slurm(folder):
    """A one-node Slurm for this host, as most sites ship it (``MpiDefault=none``); yields the client environment.

    Its own munge key and socket, its own ports, configuration and state under ``folder``; the daemons are
    stopped (and their jobs cancelled) on exit.
    """
    folder = Path(folder)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    munge_socket = folder / "munge" / "munge.socket"
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=workshop",
        "SlurmctldHost=localhost(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}",
        "MpiDefault=none",  # Slurm's default, and most sites': srun offers the ranks no PMI unless asked
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "ReturnToService=2",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        _node_line() + " State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[name]  # a test run inside an allocation must not hand its job's settings to these jobs
    key = folder / "munge" / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    started = []
    try:
        subprocess.run(["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                        f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--log-file={folder / 'munge' / 'munged.log'}",
                        f"--seed-file={folder / 'munge' / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        started.append(folder / "munge" / "munged.pid")
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, capture_output=True, timeout=60, env=env)
        started.append(folder / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, capture_output=True, timeout=60,
                       env=env)
        started.append(folder / "slurmd.pid")
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
              .stdout.strip() == "idle", "the node becoming idle in sinfo")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=env, capture_output=True, timeout=30)
        for pid_file in reversed(started):
            _stop(pid_file)


def _stop(pid_file, timeout=20):
    """Stop the daemon whose pid ``pid_file`` holds (one we started), SIGTERM then SIGKILL."""
    _wait(pid_file.exists, f"{pid_file} being written", timeout=10)
    pid = int(pid_file.read_text().split()[0])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        try:
            _wait(lambda: not Path(f"/proc/{pid}").exists(), f"process {pid} ending", timeout)
        except RuntimeError:
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------
# Two nodes on one machine: network namespaces joined by a veth pair

NAMESPACES = ("wsdl-node1", "wsdl-node2")
ADDRESSES = ("10.213.7.1", "10.213.7.2")
HOSTS = ("node1", "node2")

# an "ssh" for hydra's -launcher-exec: `nsrsh [ssh options] HOST COMMAND...` runs COMMAND in HOST's namespace,
# under HOST's hostname (a UTS namespace) and with the empty environment an ssh login gives
NSRSH = r"""#!/bin/bash
while [ $# -gt 0 ]; do case "$1" in -o|-p|-l|-i|-F) shift 2;; -*) shift;; *) break;; esac; done
host=$1; shift
case "$host" in {cases} *) echo "nsrsh: unknown host $host" >&2; exit 255;; esac
exec ip netns exec "$ns" unshare --uts /bin/sh -c \
  'hostname "$0"; exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root /bin/sh -c "$*"' "$host" "$@"
"""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@contextlib.contextmanager
def two_nodes(folder):
    """Two "nodes" (network namespaces node1 and node2, a veth pair between them); yields ``(nsrsh, hostfile)``.

    ``nsrsh`` is the launcher agent (an ssh stand-in) written under ``folder``; ``hostfile`` lists
    ``node1:2`` and ``node2:2``. Namespaces, the veth pair and /etc/netns/<name> are removed on exit.
    """
    folder = Path(folder)
    for ns in NAMESPACES:  # left over from an interrupted run
        _ip("netns", "delete", ns, check=False)
    try:
        for ns in NAMESPACES:
            _ip("netns", "add", ns)
        _ip("link", "add", "wsdl-v1", "type", "veth", "peer", "name", "wsdl-v2")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(ADDRESSES, HOSTS))
        for i, (ns, address) in enumerate(zip(NAMESPACES, ADDRESSES), 1):
            _ip("link", "set", f"wsdl-v{i}", "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", f"wsdl-v{i}")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", f"wsdl-v{i}", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
        nsrsh = folder / "nsrsh"
        nsrsh.write_text(NSRSH.format(cases=" ".join(f"{h}) ns={ns};;" for h, ns in zip(HOSTS, NAMESPACES))))
        nsrsh.chmod(0o755)
        hostfile = folder / "hosts"
        hostfile.write_text("".join(f"{h}:2\n" for h in HOSTS))
        yield nsrsh, hostfile
    finally:
        for ns in NAMESPACES:
            _ip("netns", "delete", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def veth_bytes(namespace="wsdl-node1", device="wsdl-v1"):
    """Bytes sent plus received on a node's veth end: proof that traffic crossed the "network"."""
    out = subprocess.run(["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/{device}/statistics/tx_bytes",
                          f"/sys/class/net/{device}/statistics/rx_bytes"], capture_output=True, text=True, check=True)
    return sum(int(v) for v in out.stdout.split())
