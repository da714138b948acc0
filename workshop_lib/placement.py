"""Placement: which cores this rank runs on, and how many threads numba and the BLAS use there.

Mirrors Horovod's second step, "pin each process to its resources" (one GPU per
process there, a share of the cores here), and what ``mpiexec --bind-to core``
or Slurm's ``--cpus-per-task`` do. The one idea: the ranks on one node share its
cores, so each rank gets ``len(os.sched_getaffinity(0)) // local_size`` of them
(at least 1) for numba's threads and for the BLAS's, and, when nothing has bound
the ranks yet, its own disjoint set of cores. N ranks then never run more
threads than there are cores; one process started without mpiexec keeps them all.

What the user set wins: ``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS`` (numba and the
BLAS), ``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS``/``BLIS_NUM_THREADS`` (the
BLAS), a binding made by mpiexec, Slurm or ``taskset`` (the ranks' affinities
differ, or are narrower than the ranks), and inside ``Session.run``,
``ConfigProto(intra_op_parallelism_threads=N)`` (:func:`op_threads`).

:func:`place` decides once per process, from ``hvd.init()``, ``d4p.daalinit()``
or a ``comm.Communicator``; :func:`plan` is the same decision as a pure function
(``workshop check --ranks N`` prints it); ``WORKSHOP_VERBOSE=1`` prints each
rank's placement once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from . import runtime

__all__ = ["Placement", "THREAD_VARIABLES", "without_thread_settings", "usable_cpus", "plan", "place", "current", "blas_threads", "op_threads", "matmul",
           "format_cpus", "format_plan", "slurm_allocation", "launcher_tasks", "check_launcher_world",
           "NodeGroups", "node_groups", "simulated_nodes", "hierarchical_switch"]

# the variables a user sets to choose thread counts; numba reads NUMBA_NUM_THREADS itself, the BLAS
# libraries read theirs (and OMP_NUM_THREADS) when they load, so a set variable means "leave it alone"
NUMBA_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS")
# every variable by which a user chooses threads or their spinning: a run "with nothing set" has none of them
THREAD_VARIABLES = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
_BINDINGS = {"workshop": "bound by workshop_lib", "inherited": "affinity as started"}


@dataclass(frozen=True)
class Placement:
    """Where one rank runs: its cores and its numba and BLAS thread counts.

    ``binding`` is "workshop" when :func:`place` bound the rank to ``cores``, "inherited" when the
    affinity it started with was kept. ``notes`` say which of the user's settings decided what.
    ``blas_threads`` is None in a plan when the user's variable leaves the BLAS at its own count.
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    cores: tuple
    numba_threads: int
    blas_threads: int | None
    binding: str
    notes: tuple = field(default=())

    def describe(self) -> str:
        """One line: rank, cores, numba threads, BLAS threads, and why."""
        blas = "the user's" if self.blas_threads is None else self.blas_threads
        text = (f"rank {self.rank}/{self.size} (local {self.local_rank}/{self.local_size}): "
                f"cores {format_cpus(self.cores)} ({_BINDINGS[self.binding]}), numba threads {self.numba_threads}, "
                f"BLAS threads {blas}")
        return text + "".join(f"; {note}" for note in self.notes)


def without_thread_settings(env=None) -> dict:
    """A copy of ``env`` (default ``os.environ``) without :data:`THREAD_VARIABLES`: what a new user runs with."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in THREAD_VARIABLES}


def usable_cpus() -> tuple:
    """The CPUs this process may run on (``os.sched_getaffinity(0)``: cgroups, Slurm, taskset), sorted."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity API, every CPU
        return tuple(range(os.cpu_count() or 1))


def format_cpus(cpus) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``, as ``taskset -c`` and lscpu write CPU lists."""
    cpus = sorted(cpus)
    runs, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            runs.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(runs) or "-"


def _user_count(env, names):
    """(name, value) of the first of ``names`` set in ``env`` to a positive integer (OMP's "4,2" counts 4)."""
    for name in names:
        text = env.get(name, "").split(",")[0].strip()
        if text.isdigit() and int(text) > 0:
            return name, int(text)
    return None, None


def plan(cpus, local_size=1, local_rank=0, env=None, numba_limit=None, shared_affinity=True, rank=None, size=None):
    """The placement of local rank ``local_rank`` of ``local_size`` ranks that share ``cpus``.

    Parameters
    ----------
    cpus : sequence of int
        The CPUs the rank may use (its affinity).
    local_size, local_rank : int
        Ranks on this node, and this one's index among them.
    env : mapping, optional
        The environment to read the user's thread variables from (default ``os.environ``).
    numba_limit : int, optional
        numba's pool size (``numba.config.NUMBA_NUM_THREADS``), the most threads numba can use.
    shared_affinity : bool
        True when every rank on the node has the same affinity, i.e. nothing bound them one by one.
    rank, size : int, optional
        The global rank and job size, for the description (default: the local ones).

    Returns
    -------
    Placement

    Raises
    ------
    ValueError
        If ``cpus`` is empty or ``local_rank`` is not in ``0 .. local_size - 1``.
    """
    cpus = tuple(sorted(int(c) for c in cpus))
    if not cpus:
        raise ValueError("cpus=() is empty: a rank needs at least one CPU")
    if not isinstance(local_size, int) or local_size < 1:
        raise ValueError(f"local_size={local_size!r} must be a positive int")
    if not isinstance(local_rank, int) or not 0 <= local_rank < local_size:
        raise ValueError(f"local_rank={local_rank!r} must be an int in 0 .. local_size - 1 = {local_size - 1}")
    env = os.environ if env is None else env
    notes = []
    # a binding somebody else made wins: the ranks' affinities differ, or there are fewer CPUs than ranks
    splittable = local_size > 1 and shared_affinity and len(cpus) >= local_size
    if splittable:
        cores = cpus[local_rank * len(cpus) // local_size:(local_rank + 1) * len(cpus) // local_size]
    else:
        cores = cpus
        if local_size > 1 and not shared_affinity:
            notes.append("kept the binding set by mpiexec, Slurm or taskset")
    if splittable or not shared_affinity:
        share = len(cores)  # its own cores, ours or the ones mpiexec/Slurm gave it
    else:
        share = max(1, len(cpus) // local_size)  # more ranks than CPUs: one thread each
    name, count = _user_count(env, NUMBA_VARIABLES)
    numba_threads = count if name else share
    if name:
        notes.append(f"{name}={count} set by the user")
    if numba_limit is not None:
        numba_threads = min(numba_threads, numba_limit)
    blas_name, blas_count = _user_count(env, BLAS_VARIABLES)
    blas = None if blas_name else share
    if blas_name and blas_name != name:
        notes.append(f"{blas_name}={blas_count} set by the user")
    # more threads than the rank's own cores (the user asked for them): leave them to the OS's scheduler
    bind = splittable and max(numba_threads, blas_count or 0) <= len(cores)
    if splittable and not bind:
        notes.append("not bound: the user's thread count exceeds this rank's share of the cores")
    return Placement(rank=local_rank if rank is None else rank, size=local_size if size is None else size,
                     local_rank=local_rank, local_size=local_size, cores=cores if bind else cpus,
                     numba_threads=numba_threads, blas_threads=blas, binding="workshop" if bind else "inherited",
                     notes=tuple(notes))


def format_plan(n_ranks, cpus=None, env=None) -> str:
    """What each of ``n_ranks`` ranks started on this node would get (``workshop check --ranks N``)."""
    import numba

    if not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks={n_ranks!r} must be a positive int")
    cpus = usable_cpus() if cpus is None else tuple(cpus)
    lines = [f"Placement of {n_ranks} rank(s) on this node ({len(cpus)} usable CPUs: {format_cpus(cpus)}):"]
    for r in range(n_ranks):
        p = plan(cpus, n_ranks, r, env, numba_limit=numba.config.NUMBA_NUM_THREADS)
        lines.append("  " + p.describe())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# What a scheduler or launcher gave the job


def _first_count(text):
    """The first count of a Slurm list such as ``SLURM_JOB_CPUS_PER_NODE="2(x3),1"`` -> 2, or None."""
    head = (text or "").split(",")[0].split("(")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else None


def slurm_allocation(env=None):
    """``{"nodes", "cpus_per_node", "cpus_per_task"}`` of the Slurm allocation this process runs in, or None.

    Read from what ``salloc``/``sbatch`` set (``SLURM_NNODES``, ``SLURM_JOB_CPUS_PER_NODE``,
    ``SLURM_CPUS_PER_TASK``), never from the machine running the command: an ``salloc`` shell usually
    runs on a login node whose CPUs are not the job's. A value Slurm did not set is None.

    Parameters
    ----------
    env : mapping, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    dict or None
        None outside an allocation (no ``SLURM_JOB_ID``).
    """
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    cpus = _first_count(env.get("SLURM_JOB_CPUS_PER_NODE")) or _first_count(env.get("SLURM_CPUS_ON_NODE"))
    return {"nodes": _first_count(env.get("SLURM_NNODES")), "cpus_per_node": cpus,
            "cpus_per_task": _first_count(env.get("SLURM_CPUS_PER_TASK"))}


# who started this process, and the variable that says how many tasks it started
_LAUNCHERS = (("PMI_SIZE", "mpiexec (MPICH/Intel MPI hydra) or srun --mpi=pmi2"),
              ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
              ("SLURM_STEP_NUM_TASKS", "srun"))


def launcher_tasks(env=None):
    """``(variable, tasks, launcher)`` of the launcher that started this process, or None when none did.

    ``PMI_SIZE`` (hydra, srun's pmi2), ``OMPI_COMM_WORLD_SIZE`` (Open MPI), else ``SLURM_STEP_NUM_TASKS``
    (or ``SLURM_NTASKS``) inside an ``srun`` step. A batch script's own shell is no step: ``SLURM_NTASKS``
    there counts the allocation's tasks, not this process's world.
    """
    env = os.environ if env is None else env
    for name, who in _LAUNCHERS:
        count = _first_count(env.get(name))
        if count is not None and (name != "SLURM_STEP_NUM_TASKS" or env.get("SLURM_STEP_ID")):
            return name, count, who
    if env.get("SLURM_STEP_ID") and _first_count(env.get("SLURM_NTASKS")):
        return "SLURM_NTASKS", _first_count(env.get("SLURM_NTASKS")), "srun"
    return None


def check_launcher_world(world_size=None, env=None):
    """Fail clearly when a launcher started several tasks but MPI sees a world of one.

    The symptom of a launcher and an MPI that do not speak the same PMI (``srun`` under Slurm's
    ``MpiDefault=none`` with MPICH, an Open MPI ``mpirun`` with an MPICH mpi4py, or the reverse): every
    task becomes ``rank 0 of 1``, runs the whole job alone, and usually exits 0. ``hvd.init()``,
    ``Communicator()`` and ``d4p.daalinit()`` call this, so such a job stops at once on every task.

    Parameters
    ----------
    world_size : int, optional
        ``MPI.COMM_WORLD``'s size (default: asked of mpi4py). A sub-communicator's size is not the world.
    env : mapping, optional
        The environment to read (default ``os.environ``).

    Raises
    ------
    RuntimeError
        Naming the variable, the task count, the world size and the fix.
    """
    found = launcher_tasks(env)
    if found is None or found[1] <= 1:
        return
    if world_size is None:
        from mpi4py import MPI

        world_size = MPI.COMM_WORLD.Get_size()
    if world_size != 1:
        return
    name, tasks, who = found
    if name.startswith("SLURM"):
        fix = ("srun does not speak the PMI of the MPI behind mpi4py (Slurm's MpiDefault=none): run "
               "`srun --mpi=pmi2 ...` (what `workshop launch --scheduler slurm` writes; WORKSHOP_SRUN_MPI picks "
               "another, see `srun --mpi=list`)")
    else:
        fix = ("mpi4py was built against another MPI than this launcher's: start it with the mpiexec of the MPI "
               "mpi4py uses (`workshop check` names it), or `srun --mpi=pmi2` under Slurm")
    raise RuntimeError(f"{name}={tasks}: {who} started {tasks} tasks, but MPI sees a world of 1 rank, so each task "
                       f"would run the whole job alone; {fix}")


# ----------------------------------------------------------------------------------------------
# Applying it

_current: Placement | None = None
# the runtime (numba's and the BLAS's threads, the step's sliced GEMM) lives in workshop_lib.runtime; the names
# below stay importable from here
blas_threads, _set_blas_threads = runtime.blas_threads, runtime.set_blas_threads
op_threads, matmul = runtime.op_threads, runtime.matmul


def _bind_every_thread(cores):
    """Bind the whole process: ``sched_setaffinity(0)`` moves only the calling thread, not the BLAS's threads."""
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for tid in tasks:
        with contextlib.suppress(OSError):  # a thread may end while we walk the list
            os.sched_setaffinity(tid, cores)
    os.sched_setaffinity(0, cores)


_numba_workers_sleep_when_idle = runtime.numba_workers_sleep_when_idle


def current() -> Placement | None:
    """This process's placement once :func:`place` ran, else None."""
    return _current


def place(comm=None) -> Placement:
    """Decide and apply this rank's placement, once per process (collective on ``comm`` the first time).

    The ranks of ``comm`` (default ``MPI.COMM_WORLD``) that share a node (``MPI.COMM_TYPE_SHARED``)
    split its CPUs: each is bound to its own cores when nothing bound them yet, and numba's and the
    BLAS's thread counts are set to its share unless the user set them (see :func:`plan`). Threads
    that exist already (the BLAS's) are bound too; numba's pool, started afterwards, inherits the
    binding. With ``WORKSHOP_VERBOSE=1`` each rank prints its placement to stderr.

    Returns
    -------
    Placement
        What the rank got, read back from the OS, numba and the BLAS.
    """
    global _current
    if _current is not None:
        return _current
    import numba
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    local = node_groups(comm).machine  # the ranks that really share this machine's cores
    cpus = usable_cpus()
    shared = all(c == cpus for c in local.allgather(cpus))
    wanted = plan(cpus, local.Get_size(), local.Get_rank(), numba_limit=numba.config.NUMBA_NUM_THREADS,
                  shared_affinity=shared, rank=comm.Get_rank(), size=comm.Get_size())
    if wanted.binding == "workshop" and hasattr(os, "sched_setaffinity"):
        _bind_every_thread(wanted.cores)  # before numba's pool starts, so that its threads inherit it
    runtime.set_numba_threads(wanted.numba_threads)
    if wanted.blas_threads is not None:
        _set_blas_threads(wanted.blas_threads)
    _current = Placement(rank=wanted.rank, size=wanted.size, local_rank=wanted.local_rank,
                         local_size=wanted.local_size, cores=usable_cpus(), numba_threads=numba.get_num_threads(),
                         blas_threads=blas_threads(), binding=wanted.binding, notes=wanted.notes)
    if os.environ.get("WORKSHOP_VERBOSE", "0") not in ("", "0"):
        # one write per line: print() writes the text and its newline apart, and two ranks' lines interleave
        sys.stderr.write(f"workshop_verbose,placement,{_current.describe()}\n")
        sys.stderr.flush()
    return _current


# ----------------------------------------------------------------------------------------------
# Node groups: which ranks share a node, worked out once per communicator (Horovod's MPICommunicators)

SIMULATE_NODES_ENV = "WORKSHOP_SIMULATE_NODES"
HIERARCHICAL_ENV = "HOROVOD_HIERARCHICAL_ALLREDUCE"
_node_groups = {}  # (communicator handle) -> NodeGroups


def simulated_nodes(size, env=None):
    """The node count ``WORKSHOP_SIMULATE_NODES`` asks for, validated against ``size`` ranks.

    Parameters
    ----------
    size : int
        The ranks of the communicator.
    env : mapping, optional
        Where to read the variable (default ``os.environ``).

    Returns
    -------
    int or None
        None when unset.
    """
    value = (os.environ if env is None else env).get(SIMULATE_NODES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= size:
        raise ValueError(f"{SIMULATE_NODES_ENV}={value!r} must be a number of nodes from 1 to the {size} ranks")
    return int(value)


def hierarchical_switch(env=None):
    """``HOROVOD_HIERARCHICAL_ALLREDUCE``: True (always), False (never), None (unset or "auto": when ranks span nodes).

    Parameters
    ----------
    env : mapping, optional
        Where to read the variable (default ``os.environ``). Booleans as Horovod's users write them
        (``1/0/true/false/yes/no/on/off``, any case).

    Returns
    -------
    bool or None
    """
    value = (os.environ if env is None else env).get(HIERARCHICAL_ENV, "").strip()
    if value.lower() in ("", "auto"):
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{HIERARCHICAL_ENV}={value!r} must be 1 (always hierarchical) or 0 (never), or a boolean "
                     "(true/false, yes/no, on/off)")


class NodeGroups:
    """Which ranks of ``comm`` share a node: ``local`` (my node's ranks) and ``cross`` (my local rank on every node).

    Nodes are found with ``MPI.COMM_TYPE_SHARED`` (``machine``: the ranks that really share this machine's
    memory, whatever is simulated), or faked by ``WORKSHOP_SIMULATE_NODES=k`` (k contiguous blocks of ranks;
    then ``simulated`` is True and shared memory is not used across them). Creating it is collective; use
    :func:`node_groups`, which builds it once per communicator. ``uniform`` says whether every node has the
    same number of ranks, which the hierarchical allreduce's ring among same-local-rank peers needs.

    Parameters
    ----------
    comm : mpi4py communicator
    """

    def __init__(self, comm):
        from mpi4py import MPI

        size, rank = comm.Get_size(), comm.Get_rank()
        nodes = simulated_nodes(size)
        self.simulated = nodes is not None
        self.machine = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        self.machine_size = self.machine.Get_size()
        self.local = comm.Split(rank * nodes // size, key=rank) if self.simulated else self.machine
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.cross = comm.Split(self.local_rank, key=rank)
        self.cross_rank, self.cross_size = self.cross.Get_rank(), self.cross.Get_size()
        self.sizes = sizes = comm.allgather(self.local_size)  # the ranks of each rank's node
        self.uniform = len(set(sizes)) == 1
        self.nodes = round(sum(1 / k for k in sizes))  # the ranks of a node of k ranks count 1/k each
        self.spans_nodes = self.local_size < size
        self.switch = hierarchical_switch()
        if self.switch and not self.uniform:
            raise ValueError(f"{HIERARCHICAL_ENV}=1, but the nodes hold different numbers of ranks ({sizes}); "
                             "the hierarchical allreduce needs the same number on every node")

    @property
    def hierarchical(self):
        """True when "auto" takes the hierarchical algorithm for bandwidth-bound messages."""
        if self.switch is not None:
            return self.switch
        return self.spans_nodes and self.uniform


def node_groups(comm):
    """The :class:`NodeGroups` of ``comm``, built on the first call for it (collective then), reused after.

    ``hvd.local_rank()``, the communicator's choice of algorithm, its shared-memory window and :func:`place`
    all read this one object, so they agree, simulated nodes included.

    Parameters
    ----------
    comm : mpi4py communicator

    Returns
    -------
    NodeGroups
    """
    key = comm.py2f()
    groups = _node_groups.get(key)
    if groups is None or groups.comm is not comm:
        groups = _node_groups[key] = NodeGroups(comm)
        groups.comm = comm
    return groups
