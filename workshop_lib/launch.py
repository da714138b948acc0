"""Launch lines for MPI jobs: the right ``mpiexec`` or ``srun`` command for the MPI at hand.

Mirrors what HPC centres' user guides (CSC, ENCCS, Horovod's ``horovodrun``) tell people to type. The one
idea: a launch line decides how many threads each rank runs and where, and each launcher must be told in its
own words. Thread counts go through the launcher's own flag (MPICH and Intel MPI: ``-genv NAME VALUE``;
Open MPI, which forwards nothing by default: ``-x NAME=VALUE``; Slurm: ``--export=ALL,NAME=VALUE``), so
no rank starts one thread per core: N ranks x all cores, the oversubscription that made a 2-rank training
run 10x slower. ``srun`` must also be told the PMI the ranks' MPI speaks (``--mpi=pmi2``), or each task is
a world of one. The thread count is derived once, ``cores per node // ranks per node`` (inside a Slurm
allocation, from the allocation), handed to every runtime (OpenMP, numba, OpenBLAS, MKL), and each rank
is bound to that many cores, within the CPU mask the launch inherited.

Shapes of the job: ``n`` ranks on ``nodes`` nodes, ``ranks_per_node = n // nodes`` on each,
``threads = cpus_per_node // ranks_per_node`` per rank.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["FLAVOURS", "SCHEDULERS", "THREAD_VARIABLES", "flavour_from_version", "detect_flavour", "find_mpiexec",
           "read_hostfile", "job_layout", "threads_per_rank", "thread_environment", "loopback_environment",
           "srun_mpi", "launch_command", "batch_script", "format_command", "shm_needed", "shm_problem",
           "ElasticError", "ElasticDriver", "parse_discovery"]

FLAVOURS = ("mpich", "openmpi", "intel")
SCHEDULERS = ("mpiexec", "slurm")
# every thread pool a rank of the labs may start: numba's, OpenMP's (numba's layer), numpy's BLAS
THREAD_VARIABLES = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# the PMI srun speaks to the ranks: MPICH's and Intel MPI's libraries speak PMI-1/2, and Slurm's usual
# MpiDefault=none gives them none, so each task would be a world of one
SRUN_MPI_DEFAULT = "pmi2"
# /dev/shm a rank of one node takes: MPICH 5.0's shared-memory transport (measured: 10.3 MB for 2 ranks, 20.6 for
# 4, 82.3 for 16; 12 ranks in Docker's 64 MB fail with SIGBUS, whatever the message size) plus the library's
# shared window (two 1 MB blocks per rank, workshop_lib.comm)
MPICH_SHM_BYTES_PER_RANK = 5_200_000
WINDOW_SHM_BYTES_PER_RANK = 2 << 20


def flavour_from_version(text):
    """``"mpich"``, ``"openmpi"`` or ``"intel"`` from the output of ``mpiexec --version``, or None.

    Intel MPI's launcher is a Hydra like MPICH's, so it is recognised first by its own name.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (the output of `mpiexec --version`), got {type(text).__name__}")
    if re.search(r"Intel\(R\) MPI|Intel MPI", text):
        return "intel"
    if re.search(r"Open MPI|OpenRTE|Open RTE|PRRTE", text):
        return "openmpi"
    if re.search(r"HYDRA|MPICH", text, re.I):
        return "mpich"
    return None


def detect_flavour(mpiexec=None, timeout=20):
    """The flavour of ``mpiexec`` (default: the one next to this Python, see :func:`sysinfo.mpiexec_path`).

    Raises
    ------
    RuntimeError
        When there is no mpiexec, or its ``--version`` names none of :data:`FLAVOURS`: then pass
        ``mpi=`` (``workshop launch --mpi``) yourself.
    """
    from .sysinfo import mpiexec_path

    exe = mpiexec or mpiexec_path()
    if exe is None:
        raise RuntimeError("no mpiexec found next to this Python or on PATH; name the MPI with --mpi "
                           f"{'|'.join(FLAVOURS)} or install one (`pip install mpich`)")
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"`{exe} --version` failed ({exc}); name the MPI with --mpi {'|'.join(FLAVOURS)}") from None
    flavour = flavour_from_version(proc.stdout + proc.stderr)
    if flavour is None:
        first = (proc.stdout + proc.stderr).strip().splitlines()[:1]
        raise RuntimeError(f"cannot tell which MPI `{exe}` is ({first}); name it with --mpi {'|'.join(FLAVOURS)}")
    return flavour


def find_mpiexec(mpi):
    """The ``mpiexec`` of flavour ``mpi``: the one next to this Python if it is one, else the first on PATH.

    ``mpiexec`` and ``mpirun`` of every PATH folder are asked their ``--version``, so ``--mpi openmpi`` finds
    a site's Open MPI even where the mpich wheel's launcher sits next to Python.

    Raises
    ------
    RuntimeError
        When no launcher of that flavour is found, naming the ones that were and what they are.
    """
    if mpi not in FLAVOURS:
        raise ValueError(f"mpi={mpi!r} must be one of {FLAVOURS}")
    import shutil

    from .sysinfo import mpiexec_path

    candidates = [mpiexec_path()]
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidates += [shutil.which(name, path=folder) for name in ("mpiexec", "mpirun") if folder]
    seen = {}
    for exe in candidates:
        if exe is None or os.path.realpath(exe) in seen:
            continue
        try:
            found = detect_flavour(exe)
        except RuntimeError:
            found = None
        seen[os.path.realpath(exe)] = (exe, found)
        if found == mpi:
            return exe
    tried = "; ".join(f"{exe} is {found or 'unknown'}" for exe, found in seen.values()) or "none on PATH"
    raise RuntimeError(f"no {mpi} mpiexec found ({tried}); load that MPI (module load ...) or pass --mpiexec PATH")


def read_hostfile(path):
    """``[(host, slots), ...]`` from a host file in Open MPI's (``node01 slots=4``) or MPICH's (``node01:4``) syntax.

    Blank lines and ``#`` comments are skipped; a host without a count has None slots.
    """
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"hostfile {path} is not a text file: expected one `host:N` or `host slots=N` per line") from None
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = (re.fullmatch(r"(\S+?)\s+(?:slots|max[-_]slots)\s*=\s*(\d+)(?:\s+.*)?", line)
                 or re.fullmatch(r"([^\s:]+):(\d+)", line) or re.fullmatch(r"(\S+)", line))
        if match is None:
            raise ValueError(f"{path}:{number}: {raw!r} is neither `host slots=N` (Open MPI) nor `host:N` (MPICH)")
        slots = int(match.group(2)) if match.lastindex and match.lastindex >= 2 else None
        hosts.append((match.group(1), slots))
    if not hosts:
        raise ValueError(f"hostfile {path} names no host")
    return hosts


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _local_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(ranks_per_node, cpus_per_node):
    """Threads each rank may use so that the ranks of a node fill its CPUs and no more: ``cpus // ranks``, >= 1."""
    _positive_int("ranks_per_node", ranks_per_node)
    _positive_int("cpus_per_node", cpus_per_node)
    return max(1, cpus_per_node // ranks_per_node)


def thread_environment(threads):
    """``{NAME: str(threads)}`` for every runtime's thread-count variable (:data:`THREAD_VARIABLES`)."""
    _positive_int("threads", threads)
    return {name: str(threads) for name in THREAD_VARIABLES}


def loopback_environment(env=None):
    """The variables that keep a one-node MPICH or Intel MPI job's ranks listening on loopback only.

    The ranks' network modules (UCX, libfabric's tcp and sockets providers) otherwise open a listening
    socket on every address of the machine for the job's lifetime, although ranks on one node talk through
    shared memory. A variable the user set is left alone. Hydra's own control port still listens on all
    addresses (MPICH 5.0 has no setting for it): docs/troubleshooting.md says so.
    """
    env = os.environ if env is None else env
    lo = "lo0" if sys.platform == "darwin" else "lo"
    wanted = {"UCX_NET_DEVICES": lo, "FI_TCP_IFACE": lo, "FI_SOCKETS_IFACE": lo}
    return {name: value for name, value in wanted.items() if name not in env}


def srun_mpi(env=None):
    """The ``srun --mpi=`` plugin: ``WORKSHOP_SRUN_MPI`` if set, else ``pmi2`` (what the MPICH wheel speaks)."""
    value = (os.environ if env is None else env).get("WORKSHOP_SRUN_MPI", "").strip() or SRUN_MPI_DEFAULT
    if not re.fullmatch(r"[A-Za-z0-9_]+", value):
        raise ValueError(f"WORKSHOP_SRUN_MPI={value!r} must be one of srun's MPI plugins (`srun --mpi=list`), "
                         "e.g. pmi2, pmix, none")
    return value


def _slurm_layout(n, nodes, cpus_per_node):
    """``nodes`` and ``cpus_per_node`` from the Slurm allocation this runs in, where not given."""
    from .placement import slurm_allocation

    alloc = slurm_allocation()
    if alloc is None:
        return nodes, cpus_per_node
    if nodes is None and alloc["nodes"]:
        nodes = min(alloc["nodes"], n)
    if cpus_per_node is None:
        cpus_per_node = alloc["cpus_per_node"]
    return nodes, cpus_per_node


def job_layout(n, nodes=None, hostfile=None, cpus_per_node=None):
    """``(nodes, ranks_per_node, cpus_per_node, threads_per_rank)`` of a job of ``n`` ranks, validated.

    ``nodes`` defaults to the hosts of ``hostfile``, else 1; ``cpus_per_node`` to ``SLURM_CPUS_ON_NODE``,
    else the CPUs this process may use (its affinity: a ``taskset`` or cgroup mask counts). Inside a Slurm
    allocation :func:`launch_command` fills both from the allocation first (see
    :func:`workshop_lib.placement.slurm_allocation`). Raises ValueError when ``n`` does not split evenly.
    """
    _positive_int("n", n)
    if hostfile is not None and nodes is None:
        nodes = len(read_hostfile(hostfile))
    nodes = 1 if nodes is None else _positive_int("nodes", nodes)
    if nodes > n:
        raise ValueError(f"nodes={nodes} is more than n={n} ranks: every node needs at least one rank")
    if n % nodes:
        raise ValueError(f"n={n} ranks do not split evenly over nodes={nodes}; use a multiple of {nodes}")
    per_node = n // nodes
    if cpus_per_node is None:
        slurm = os.environ.get("SLURM_CPUS_ON_NODE", "")
        cpus_per_node = int(slurm) if slurm.isdigit() else _local_cpus()
    _positive_int("cpus_per_node", cpus_per_node)
    return nodes, per_node, cpus_per_node, threads_per_rank(per_node, cpus_per_node)


def launch_command(script, n, nodes=None, hostfile=None, scheduler="mpiexec", mpi=None, args=(), cpus_per_node=None,
                   python=None, mpiexec=None, verbose=False):
    """The command line (a list) that runs ``python script *args`` on ``n`` ranks, threads exported and bound.

    Parameters
    ----------
    script : str or Path
        The Python script every rank runs.
    n : int
        Number of ranks.
    nodes : int, optional
        Number of nodes (default: the hosts of ``hostfile``, else ``SLURM_NNODES`` with ``scheduler="slurm"``,
        else 1). ``n`` must be a multiple of it.
    hostfile : str or Path, optional
        Host file (Open MPI's or MPICH's syntax, see :func:`read_hostfile`); its hosts are passed in the
        launcher's own syntax (``-hosts a:2,b:2`` for hydra, ``--host a:2,b:2`` for Open MPI).
    scheduler : {"mpiexec", "slurm"}
        ``"slurm"`` gives an ``srun --mpi=pmi2`` line (inside an allocation or a batch script), which needs no
        host file; ``WORKSHOP_SRUN_MPI`` names another PMI plugin.
    mpi : {"mpich", "openmpi", "intel"}, optional
        The MPI behind ``mpiexec``; default: asked of it (:func:`detect_flavour`). Named, the launcher of that
        flavour is looked for (:func:`find_mpiexec`). Unused by ``srun``.
    args : sequence of str
        The script's own arguments.
    cpus_per_node : int, optional
        CPUs of a node to share among its ranks; default: the Slurm allocation's (``SLURM_JOB_CPUS_PER_NODE``),
        else ``SLURM_CPUS_ON_NODE``, else the CPUs this process may use.
    python, mpiexec : str, optional
        The interpreter (default: this one) and the launcher (default: see ``mpi``).
    verbose : bool
        Show each rank's binding: the launcher's report (hydra ``HYDRA_TOPO_DEBUG``, Open MPI
        ``--report-bindings``, Intel ``I_MPI_DEBUG``, srun ``--cpu-bind=verbose``) and the library's placement
        (``WORKSHOP_VERBOSE=1``).

    Returns
    -------
    list of str

    Notes
    -----
    On one node, a CPU mask the launch inherited (``taskset``, a cgroup cpuset) is kept: the launcher is not
    asked to bind (hydra's ``-bind-to`` would bind to every core of the machine), and each rank's placement
    splits the inherited CPUs among the node's ranks. One-node MPICH and Intel MPI jobs also get
    :func:`loopback_environment`.

    Examples
    --------
    >>> launch_command("train.py", 4, nodes=2, mpi="openmpi", cpus_per_node=8, python="python", mpiexec="mpiexec")[:6]
    ['mpiexec', '-n', '4', '--map-by', 'ppr:2:node:PE=4', '--bind-to']
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} must be one of {SCHEDULERS}")
    if mpi is not None and mpi not in FLAVOURS:
        raise ValueError(f"mpi={mpi!r} must be one of {FLAVOURS}")
    if isinstance(args, str):
        raise TypeError(f"args={args!r} must be a sequence of arguments, not one string")
    if scheduler == "slurm" and hostfile is not None:
        raise ValueError("hostfile= is for mpiexec; srun runs on the nodes of the Slurm allocation")
    _positive_int("n", n)
    if scheduler == "slurm" or hostfile is None:
        nodes, cpus_per_node = _slurm_layout(n, nodes if scheduler == "slurm" or nodes else 1, cpus_per_node)
    nodes, per_node, _, threads = job_layout(n, nodes, hostfile, cpus_per_node)
    program = [python or sys.executable, str(script), *map(str, args)]
    env = thread_environment(threads)
    if verbose:
        env["WORKSHOP_VERBOSE"] = "1"
    if scheduler == "slurm":
        exports = ",".join(f"{k}={v}" for k, v in env.items())
        return ["srun", f"--mpi={srun_mpi()}", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks={n}",
                f"--ntasks-per-node={per_node}", f"--cpus-per-task={threads}",
                "--cpu-bind=verbose,cores" if verbose else "--cpu-bind=cores", f"--export=ALL,{exports}", *program]
    if mpiexec is None:
        from .sysinfo import mpiexec_path

        mpiexec = (find_mpiexec(mpi) if mpi is not None else mpiexec_path()) or "mpiexec"
    if mpi is None:
        mpi = detect_flavour(mpiexec)
    one_node = nodes == 1 and hostfile is None
    # a mask this launch inherited (taskset, cpuset) is kept: the ranks' placement splits it among them
    masked = one_node and _local_cpus() < (os.cpu_count() or 1)
    hosts = read_hostfile(hostfile) if hostfile is not None else None
    cmd = [mpiexec, "-n", str(n)]
    if mpi == "openmpi":
        # ppr: ranks per node; PE: cores per rank, which --bind-to core then binds each rank to
        cmd += (["--map-by", f"ppr:{per_node}:node", "--bind-to", "none"] if masked
                else ["--map-by", f"ppr:{per_node}:node:PE={threads}", "--bind-to", "core"])
        if hosts is not None:
            cmd += ["--host", ",".join(f"{host}:{per_node}" for host, _ in hosts)]
        if verbose:
            cmd += ["--report-bindings"]
        for name, value in env.items():
            cmd += ["-x", f"{name}={value}"]
        # Open MPI starts remote ranks with ssh's bare environment: a module-loaded MPI and the venv need these
        cmd += [a for name in ("PATH", "LD_LIBRARY_PATH") if name in os.environ for a in ("-x", name)]
        return cmd + program
    cmd += ["-ppn", str(per_node)]
    if hosts is not None:
        cmd += ["-hosts", ",".join(f"{host}:{per_node}" for host, _ in hosts)]
    if one_node:
        env.update(loopback_environment())
    if mpi == "intel" and verbose:
        env["I_MPI_DEBUG"] = "4"
    for name, value in env.items():
        cmd += ["-genv", name, value]
    if mpi == "intel":  # Intel MPI pins each rank to a domain of OMP_NUM_THREADS cores
        cmd += ["-genv", "I_MPI_PIN", "0"] if masked else ["-genv", "I_MPI_PIN", "1", "-genv", "I_MPI_PIN_DOMAIN", "omp"]
    elif not masked:  # MPICH's Hydra: each rank bound to `threads` cores
        cmd += ["-bind-to", f"core:{threads}" if threads > 1 else "core"]
    if verbose and mpi == "mpich":  # hydra reads it from its own environment, not from -genv
        cmd = ["env", "HYDRA_TOPO_DEBUG=1", *cmd]
    return cmd + program


def shm_needed(ranks):
    """Bytes of /dev/shm that ``ranks`` MPICH ranks on one node take: about 7 MB each (see the constants)."""
    _positive_int("ranks", ranks)
    return ranks * (MPICH_SHM_BYTES_PER_RANK + WINDOW_SHM_BYTES_PER_RANK)


def shm_problem(ranks, path="/dev/shm"):
    """A sentence when ``path`` has less free space than ``ranks`` ranks on this node need, else None.

    The rank count decides, not the message size: MPICH's transport takes a fixed share per rank.
    """
    needed = shm_needed(ranks)
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None  # no /dev/shm (macOS): MPICH uses other shared memory there
    free = st.f_bavail * st.f_frsize
    if free >= needed:
        return None
    return (f"{path} has {free / 2**20:.0f} MB free, but {ranks} MPI ranks on this node need about "
            f"{needed / 2**20:.0f} MB (about {needed / ranks / 2**20:.0f} MB each, whatever the message size): "
            f"run fewer ranks per node, or give the container more (`docker run --shm-size=1g`)")


def format_command(cmd):
    """A command list as one line a shell reads back the same (quoted where needed)."""
    return " ".join(shlex.quote(str(part)) for part in cmd)


def batch_script(script, nodes, ntasks_per_node, cpus_per_task, args=(), time="00:30:00", job_name=None,
                 python=None):
    """A Slurm batch script that runs ``script`` on ``nodes x ntasks_per_node`` ranks of ``cpus_per_task`` threads.

    The thread counts are derived from ``SLURM_CPUS_PER_TASK`` inside the job, so editing the ``#SBATCH``
    lines is enough; ``SRUN_CPUS_PER_TASK`` is exported because since Slurm 22.05 ``srun`` no longer
    inherits ``--cpus-per-task`` from ``sbatch``, and without it each rank would get one CPU. ``srun`` gets
    ``--mpi=pmi2`` (``WORKSHOP_SRUN_MPI`` overrides it), ``--kill-on-bad-exit=1`` and a binding it reports;
    arguments given to ``sbatch`` after the file name reach the script after its own (the last wins).

    Parameters
    ----------
    python : str, optional
        The interpreter the job runs; default: the course's ``.venv/bin/python`` in the folder the job was
        submitted from. ``WORKSHOP_PYTHON`` in the submitting shell overrides either.

    Returns
    -------
    str
        The script's text (``sbatch`` it from the course's root directory).
    """
    for name, value in (("nodes", nodes), ("ntasks_per_node", ntasks_per_node), ("cpus_per_task", cpus_per_task)):
        _positive_int(name, value)
    if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", str(time)):
        raise ValueError(f"time={time!r} must be Slurm's [days-]hours:minutes:seconds, e.g. '00:30:00'")
    name = job_name or Path(str(script)).stem
    n = nodes * ntasks_per_node
    exports = " ".join(f"{v}=$SLURM_CPUS_PER_TASK" for v in THREAD_VARIABLES)
    line = " ".join(shlex.quote(str(a)) for a in (script, *args))
    interpreter = shlex.quote(str(python)) if python else "$SLURM_SUBMIT_DIR/.venv/bin/python"
    return "\n".join([
        "#!/bin/bash",
        f"# {script} on {nodes} node(s) x {ntasks_per_node} rank(s), {cpus_per_task} thread(s) per rank.",
        "# Submit from the course's root directory:  sbatch cluster/" + f"{name}.sbatch",
        "# (arguments after the file name go to the script: sbatch cluster/" + f"{name}.sbatch --help)",
        f"# The same line by hand: workshop launch {script} -n {n} --nodes {nodes} --scheduler slurm"
        + (f" -- {' '.join(shlex.quote(str(a)) for a in args)}" if args else ""),
        "# Edit the #SBATCH lines for your site (account, partition, time); the rest follows from them.",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={ntasks_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        "#SBATCH --output=%x-%j.out",
        "##SBATCH --account=project_XXXX",
        "##SBATCH --partition=small",
        "",
        "set -euo pipefail",
        "# module load <the MPI your mpi4py was built against>   (a site MPI; the mpich wheel needs none)",
        "# the course's interpreter, named so the job does not depend on the submitting shell's PATH",
        f'PYTHON="${{WORKSHOP_PYTHON:-{interpreter}}}"',
        '[ -x "$PYTHON" ] || { echo "no Python at $PYTHON: run make setup in the course folder, or set WORKSHOP_PYTHON" >&2; exit 2; }',
        "",
        "# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on explicitly",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
        "# one thread per CPU Slurm gave the rank, for every thread pool in the process",
        f"export {exports}",
        "# srun and the library bind; OpenMP's own binding would pin every thread of a rank to its first core",
        "unset OMP_PROC_BIND OMP_PLACES",
        "",
        "# --mpi=pmi2: the PMI the MPICH and Intel MPI libraries speak (Slurm's MpiDefault=none gives them none, and",
        "# every task would be a world of one); --kill-on-bad-exit=1: a rank that dies ends the job",
        'srun --mpi="${WORKSHOP_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 --cpu-bind=verbose,cores --export=ALL '
        f'"$PYTHON" {line} "$@"',
        "",
    ])


# ----------------------------------------------------------------------------------------------
# the elastic driver (horovodrun --min-np / --max-np / --host-discovery-script)


class ElasticError(RuntimeError):
    """The elastic job cannot go on: fewer slots than ``min_np``, or more restarts than ``reset_limit``."""


_CAUSES = (  # what the job's stderr says about why it ended, first match wins (MPICH's and Open MPI's words)
    (r"uncaught (\w+) on rank (\d+)", "rank {1} raised {0}"),
    (r"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "a rank stalled past HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"),
    (r"rank\(s\) \[([\d, ]+)\] of \d+ ended while", "rank(s) {0} ended during a collective"),
    (r"sys\.exit\((.*?)\) on rank (\d+)", "rank {1} called sys.exit({0})"),
    (r"PID (\d+) RUNNING AT (\S+)\s*=\s*(?:EXIT CODE|KILLED BY SIGNAL): (\d+)", "pid {0} on {1} ended by signal {2}"),
    (r"Process name: \[\[\d+,\d+\],(\d+)\]\s*Exit code:\s*(\d+)", "rank {0} ended with exit code {1}"),
    (r"Killed \(signal (\d+)\)|signal (\d+) \(\w+\)", "a rank was killed by signal {0}"),
)


def parse_discovery(text):
    """``[(host, slots)]`` from a host discovery script's output: ``host:slots`` (or ``host``, 1 slot) per line.

    Parameters
    ----------
    text : str
        What the script printed (horovodrun's format; ``#`` comments and blank lines are skipped).

    Returns
    -------
    list of (str, int)
    """
    hosts = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([^\s:]+)(?::(\d+))?", line)
        if match is None:
            raise ValueError(f"host discovery output line {raw!r} is not `host:slots`")
        hosts.append((match.group(1), int(match.group(2) or 1)))
    return hosts


class ElasticDriver:
    """Runs an ``hvd.elastic`` script and relaunches it on the slots left when a rank dies (restart-based elasticity).

    Parameters
    ----------
    script : str or Path
        The training script (it wraps its loop in ``hvd.elastic.run``; see :mod:`workshop_lib.elastic`).
    n : int
        Ranks of the first launch (horovodrun's ``-np``).
    min_np : int
        Fewest ranks to go on with; below it the driver stops with :class:`ElasticError`.
    max_np : int, optional
        Most ranks (default ``n``); reached again when the discovery script reports more slots.
    host_discovery_script : str or Path, optional
        An executable printing ``host:slots`` lines (horovodrun's format), run before every launch and every
        ``discovery_interval`` seconds during one. Without it the hosts are fixed: every failure costs one slot.
    reset_limit : int
        Most relaunches (horovodrun's ``--reset-limit``).
    elastic_dir : str or Path, optional
        Where rank 0 writes the commits and everyone the event log (default: a new temporary folder). A folder
        holding commits is resumed from.
    scheduler, mpi, args, cpus_per_node
        As :func:`launch_command`, which builds every launch's line (``srun`` inside a Slurm allocation).

    Every launch and end is logged (stderr, and ``events.jsonl`` in ``elastic_dir``) with its cause; rank 0 logs the
    commit and the global step it resumed from.
    """

    def __init__(self, script, n, min_np, max_np=None, host_discovery_script=None, reset_limit=20, elastic_dir=None,
                 scheduler="mpiexec", mpi=None, args=(), cpus_per_node=None, discovery_interval=1.0, env=None):
        import tempfile

        _positive_int("n", n)
        _positive_int("min_np", min_np)
        max_np = n if max_np is None else _positive_int("max_np", max_np)
        if not min_np <= n <= max_np:
            raise ValueError(f"expected min_np <= n <= max_np, got min_np={min_np}, n={n}, max_np={max_np}")
        if isinstance(reset_limit, bool) or not isinstance(reset_limit, int) or reset_limit < 0:
            raise ValueError(f"reset_limit={reset_limit!r} must be an integer >= 0")
        if host_discovery_script is not None and not os.access(host_discovery_script, os.X_OK):
            raise ValueError(f"host_discovery_script={os.fspath(host_discovery_script)!r} is not an executable file")
        self.script, self.n, self.min_np, self.max_np = script, n, min_np, max_np
        self.discovery, self.reset_limit = host_discovery_script, reset_limit
        self.dir = Path(elastic_dir) if elastic_dir is not None else Path(tempfile.mkdtemp(prefix="workshop-elastic-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scheduler, self.mpi, self.args, self.cpus_per_node = scheduler, mpi, list(args), cpus_per_node
        self.interval, self.env = discovery_interval, dict(os.environ if env is None else env)
        self.launches = []  # (size, return code, cause) of every launch

    def say(self, text):
        sys.stderr.write(f"[elastic driver] {text}\n")
        sys.stderr.flush()

    def discover(self):
        """Slots the discovery script reports now (None without a script)."""
        if self.discovery is None:
            return None
        proc = subprocess.run([str(self.discovery)], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise ElasticError(f"host discovery script {self.discovery} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[:200]}")
        return sum(slots for _, slots in parse_discovery(proc.stdout))

    def command(self, size):
        """The launch line for ``size`` ranks."""
        return launch_command(self.script, size, scheduler=self.scheduler, mpi=self.mpi, args=self.args,
                              cpus_per_node=self.cpus_per_node)

    @staticmethod
    def _watch(pipe, out, lines):
        """Forward ``pipe`` to ``out`` line by line, keeping the first lines (the launcher's words on a failure)."""
        for line in pipe:
            out.write(line)
            out.flush()
            if len(lines) < 4000:
                lines.append(line)

    def _pids(self):
        """{pid: rank} of the running launch, from the pids its ranks left in the elastic folder."""
        folder = self.dir / "pids"
        found = {}
        for entry in folder.glob("rank-*") if folder.is_dir() else []:
            try:
                found[int(entry.read_text())] = int(entry.name.split("-", 1)[1])
            except (ValueError, OSError):
                continue
        return found

    @staticmethod
    def _alive(pid):
        """True while process ``pid`` runs (a zombie, dead but not yet reaped by the launcher, counts as ended)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True

    def cause(self, lines, status, first_dead=None):
        """Why a launch ended, from its output ``lines``, exit ``status`` and the rank seen to end first.

        The launcher's words name the process it noticed, which after a SIGKILL need not be the one killed (it
        kills the others with the same signal); the driver's own watch of the ranks' pids tells which ended first.

        Parameters
        ----------
        lines : list of str
            The launch's output (the launcher's own words on a failure included).
        status : int
            Its exit status.
        first_dead : (int, int), optional
            (rank, pid) of the rank the driver saw end first.

        Returns
        -------
        str
        """
        text = "".join(line for line in lines if not line.startswith("[elastic"))  # not our own log lines
        for pattern, template in _CAUSES:
            match = re.search(pattern, text)
            if not match:
                continue
            why = template.format(*[g for g in match.groups() if g is not None])
            pid = re.match(r"pid (\d+) on \S+ ended by signal (\d+)", why)
            if pid and first_dead is not None:
                return f"rank {first_dead[0]} (pid {first_dead[1]}) ended first, by signal {pid.group(2)}"
            ranks = {str(p): r for p, r in self._pids().items()}
            if pid and pid.group(1) in ranks:
                why = f"rank {ranks[pid.group(1)]} ({why})"
            return why
        if first_dead is not None:
            return f"rank {first_dead[0]} (pid {first_dead[1]}) ended first; the job ended with status {status}"
        return f"the job ended with status {status}"

    def run(self):
        """Launch, relaunch after failures, and return 0 once the script has finished.

        Raises
        ------
        ElasticError
            When fewer than ``min_np`` slots remain or the restarts exceed ``reset_limit``.
        """
        import threading
        import time

        from .elastic import ELASTIC_CAUSE, ELASTIC_DIR, ELASTIC_RESTART, HOSTS_UPDATED, INTERRUPTED, log_event

        lost, restart, cause = 0, 0, ""
        self.say(f"commits and events in {self.dir}")
        while True:
            found = self.discover()
            slots = (self.n - lost) if found is None else found
            size = min(self.max_np, slots)
            if size < self.min_np:
                log_event(self.dir, event="stopped", slots=slots, min_np=self.min_np)
                raise ElasticError(f"only {slots} slot(s) remain, fewer than --min-np {self.min_np}"
                                   f"{f' (last failure: {cause})' if cause else ''}; the last commit is in {self.dir}")
            for name in (HOSTS_UPDATED, INTERRUPTED):
                (self.dir / name).unlink(missing_ok=True)
            for entry in (self.dir / "pids").glob("rank-*") if (self.dir / "pids").is_dir() else []:
                entry.unlink()  # the last launch's pids
            env = dict(self.env, **{ELASTIC_DIR: str(self.dir), ELASTIC_RESTART: str(restart), ELASTIC_CAUSE: cause})
            cmd = self.command(size)
            self.say(f"launch {restart} on {size} rank(s): {format_command(cmd)}")
            log_event(self.dir, event="launch", restart=restart, size=size, cause=cause)
            lines = []
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
            readers = [threading.Thread(target=self._watch, args=(pipe, out, lines), daemon=True)
                       for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
            for reader in readers:
                reader.start()
            next_check = time.monotonic() + self.interval
            first_dead, watched, settled = None, {}, False
            while proc.poll() is None:
                time.sleep(0.02)
                if not settled:  # which rank ends first (the launcher then ends the others)
                    watched = watched if len(watched) == size else self._pids()
                    gone = [(rank, pid) for pid, rank in watched.items() if not self._alive(pid)]
                    if gone and len(watched) == size:
                        # two or more gone between two looks: which was first is unknown, and the launcher's own
                        # report (the pid it names) decides in cause()
                        first_dead, settled = (gone[0] if len(gone) == 1 else None), True
                if self.discovery is not None and size < self.max_np and time.monotonic() > next_check:
                    next_check = time.monotonic() + self.interval
                    more = self.discover()
                    if more > size and not (self.dir / HOSTS_UPDATED).exists():
                        (self.dir / HOSTS_UPDATED).write_text(f"{more}\n")
                        self.say(f"discovery reports {more} slot(s) (running on {size}): the job stops at its "
                                 "next commit and is relaunched on more")
            for reader in readers:
                reader.join(timeout=5)
            status = proc.returncode
            interrupted = (self.dir / INTERRUPTED).exists()
            if status == 0 and not interrupted:
                log_event(self.dir, event="finished", restart=restart, size=size)
                self.launches.append((size, 0, "finished"))
                self.say(f"finished after {restart} restart(s)")
                return 0
            cause = "hosts updated" if status == 0 else self.cause(lines, status, first_dead)
            log_event(self.dir, event="ended", restart=restart, size=size, status=status, cause=cause)
            self.launches.append((size, status, cause))
            if status != 0 and found is None:
                lost += 1  # fixed hosts: the failed rank's slot is gone
            restart += 1
            if restart > self.reset_limit:
                raise ElasticError(f"{restart - 1} restart(s) reached --reset-limit {self.reset_limit} "
                                   f"(last: {cause}); the last commit is in {self.dir}")
            self.say(f"launch {restart - 1} on {size} rank(s) ended ({cause}); relaunching from the last commit")
