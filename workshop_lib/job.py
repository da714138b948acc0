"""A job never hangs: the guard that ends the job when a rank fails, Horovod's stall inspector, and how a rank waits.

Mirrors Horovod's ``stall_inspector.cc`` (one unit: the notes, the warnings, the shutdown) and what mpi4py's
``python -m mpi4py`` does for an uncaught exception (``MPI_Abort``). The one idea: a rank that can no longer take
part must say so, because its peers cannot tell "slow" from "gone" by waiting; so every rank tells its peers
which collective (or phase) it has reached and when it has ended, and a rank that waits reads those notes.

- :class:`JobGuard` (held by ``hvd.init()``, ``d4p.daalinit()`` and every ``comm.Communicator``): an uncaught
  exception or a failing ``sys.exit`` on any rank prints that rank's message, the phase it was in and what the
  others last reached, and aborts the whole job (``MPI_Abort``); a rank that ends normally waits at exit until
  every rank has ended (``WORKSHOP_HVD_EXIT_TIMEOUT``, default 300 s).
- The stall inspector (:meth:`JobGuard.wait_for_peers`): a rank entering a collective waits until every rank has
  entered it; a peer that has ended, or that entered another phase (``strict``), aborts the job at once; after
  ``HOROVOD_STALL_CHECK_TIME_SECONDS`` a warning names the missing ranks, and after
  ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` the job is aborted. ``HOROVOD_STALL_CHECK_DISABLE`` turns it off.
- :func:`wait`: the one wait policy of every waiting loop of the distributed wing: spin briefly (a sleep, even of
  0 s, gives the core away and costs a time slice), then ``sched_yield``, then 1 ms sleeps, with the inspector
  called every ``INSPECT_EVERY``-th turn.
- :func:`read_environment`: the job's environment variables are read on every rank and compared, so a value
  that one rank cannot parse, or that differs between ranks, is the same clear error on every rank.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import traceback

import numpy as np

__all__ = ["ENDED", "CollectiveTimeout", "JobGuard", "guard_job", "release_job", "current_guard", "wait", "env_bool", "env_seconds",
           "read_environment", "stall_settings", "SPIN_TURNS", "YIELD_TURNS", "INSPECT_EVERY"]

ENDED = -1  # a rank's note when it has ended (left Python); any other note is the number of a collective it reached
SPIN_TURNS = 1000  # turns of pure spinning (about a millisecond) before a waiting rank gives its core away
YIELD_TURNS = 2000  # then turns of sched_yield, before 1 ms sleeps stop stealing the cores altogether
INSPECT_EVERY = 32  # the inspector itself sends and tests messages: not at every turn
_NOTE_TAG = 31
_NOTE_WORDS = 8  # a note: the number of the phase, then its name in 56 bytes of UTF-8
_SYS_EXIT = sys.exit
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_guard: JobGuard | None = None


class CollectiveTimeout(TimeoutError):
    """A collective did not complete in time: a peer crashed, is stuck, or never called it."""


# ----------------------------------------------------------------------------------------------
# Waiting


def wait(done, inspect=None, spin=True, deadline=None):
    """Call ``done()`` until it returns True; the one wait policy of the distributed wing.

    Parameters
    ----------
    done : callable
        Returns True when the wait is over (e.g. ``lambda: MPI.Request.Testall(requests)``).
    inspect : callable, optional
        Called every ``INSPECT_EVERY``-th turn once spinning is over (the stall inspector; it may abort the job).
    spin : bool
        Spin ``SPIN_TURNS`` turns first (lowest latency). False where ranks outnumber cores: then the peer we
        wait for may need this very core, so it is yielded at once.
    deadline : float, optional
        A ``time.monotonic()`` time: stop waiting then.

    Returns
    -------
    bool
        True when ``done()`` returned True, False when the deadline passed first.
    """
    turns, patience = 0, SPIN_TURNS if spin else 0
    while not done():
        turns += 1
        if turns <= patience:
            continue
        if deadline is not None and time.monotonic() > deadline:
            return False
        if inspect is not None and turns % INSPECT_EVERY == 0:
            inspect()
        if turns < patience + YIELD_TURNS:
            os.sched_yield()
        else:
            time.sleep(0.001)
    return True


# ----------------------------------------------------------------------------------------------
# The environment, read with its owners' semantics and compared across ranks


def env_bool(name, default=False, env=None):
    """A boolean variable as Horovod's users write it: ``1/0/true/false/yes/no/on/off`` in any case.

    Parameters
    ----------
    name : str
        The variable.
    default : bool
        Its value when unset or empty.
    env : mapping, optional
        Where to read it (default ``os.environ``).

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        For any other value, naming the variable, the value and the accepted ones.
    """
    value = (os.environ if env is None else env).get(name, "").strip()
    if not value:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} must be a boolean: one of 1/0, true/false, yes/no, on/off (any case)")


def env_seconds(name, default, env=None):
    """A number of seconds >= 0 from variable ``name`` (``default`` when unset or empty).

    Parameters
    ----------
    name : str
        The variable.
    default : float
        Its value when unset or empty.
    env : mapping, optional
        Where to read it (default ``os.environ``).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        When the value is not a finite number >= 0.
    """
    value = (os.environ if env is None else env).get(name, "").strip()
    if not value:
        return float(default)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{name}={value!r} must be a number of seconds >= 0")
    return seconds


def stall_settings(env=None):
    """(warn after, abort after) in seconds from Horovod's variables (0: never), or None if the inspector is off.

    Parameters
    ----------
    env : mapping, optional
        Where to read the variables (default ``os.environ``).

    Returns
    -------
    tuple of float, or None
    """
    if env_bool("HOROVOD_STALL_CHECK_DISABLE", False, env):
        return None
    return (env_seconds("HOROVOD_STALL_CHECK_TIME_SECONDS", 60, env),
            env_seconds("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 300, env))


JOB_VARIABLES = ("HOROVOD_STALL_CHECK_DISABLE", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                 "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "WORKSHOP_HVD_EXIT_TIMEOUT")


def _exit_timeout(env=None):
    return env_seconds("WORKSHOP_HVD_EXIT_TIMEOUT", 300, env)


def read_environment(comm, variables=(), parse=None):
    """Read the job's variables on every rank of ``comm`` and check them together (collective).

    Parameters
    ----------
    comm : mpi4py communicator
    variables : sequence of str
        Variables that must be equal on every rank, besides the job's own (``JOB_VARIABLES``).
    parse : callable, optional
        ``parse(env)`` validates the values (a dict of the variables that are set) and raises ValueError with
        a clear message for a bad one; the job's own are always parsed.

    Returns
    -------
    dict
        The variables that are set, the same on every rank.

    Raises
    ------
    ValueError
        On every rank alike, when the variables differ between ranks (naming each rank's value) or a value
        cannot be parsed (naming the rank(s) where it cannot): never an error on one rank while the others wait.
    """
    names = tuple(dict.fromkeys(JOB_VARIABLES + tuple(variables)))
    env = {k: os.environ[k] for k in names if k in os.environ}
    error = None
    try:
        stall_settings(env)
        _exit_timeout(env)
        if parse is not None:
            parse(env)
    except ValueError as exc:
        error = str(exc)
    everyone = comm.allgather((env, error)) if comm.Get_size() > 1 else [(env, error)]
    errors = {}
    for r, (_, e) in enumerate(everyone):
        if e is not None:
            errors.setdefault(e, []).append(r)
    if errors:
        raise ValueError("; ".join(f"{e} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                                   for e, rs in errors.items()))
    for name in names:
        values = [e.get(name) for e, _ in everyone]
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {r}: " + ("unset" if v is None else repr(v)) for r, v in enumerate(values))
            raise ValueError(f"{name} differs across ranks ({listing}); every rank of a job must see the same value "
                             "(set it for the whole job: mpiexec -env / -genv, or export it before mpiexec)")
    return env


# ----------------------------------------------------------------------------------------------
# The guard and its notes


class JobGuard:
    """Process-wide guard of an MPI job: no rank is left waiting for a peer that has failed or ended.

    While a client holds it (:func:`guard_job`; ``hvd.init()``, ``d4p.daalinit()`` and ``comm.Communicator``
    do): an uncaught exception, or ``sys.exit`` with a failure status, on any rank prints that rank's message
    and aborts the whole job (``MPI_Abort``); a rank that ends normally waits at exit until every rank has
    ended, and aborts the job if they have not within ``WORKSHOP_HVD_EXIT_TIMEOUT`` seconds (default 300),
    since they may be waiting for it. (A rank killed by a signal ends the job through ``mpiexec`` itself.)

    Ranks send each other small notes on a communicator of their own: the number and name of the collective
    or phase a rank has entered (:meth:`enter`), and ``ENDED`` when it leaves. :meth:`poll` reads them, so a
    rank waiting for a collective knows which peers have not arrived, where they are, and which have ended:
    that is the stall inspector (:meth:`wait_for_peers`).

    Parameters
    ----------
    world : mpi4py communicator
        The job's ranks (duplicated: the notes never match a message of the program).
    """

    def __init__(self, world):
        self.world = world
        self.comm = world.Dup()  # its notes never match a message or collective of the program
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.reached = np.zeros(self.size, dtype=np.int64)  # the last note of every rank
        self.highest = np.zeros(self.size, dtype=np.int64)  # the highest collective every rank has reached (its
        # note ENDED does not undo that: a peer may complete a collective and end before this rank sees it complete)
        self.names = [b""] * self.size  # the name of every rank's last phase, as its note's bytes (see name_of)
        self.seen = [{} for _ in range(self.size)]  # every peer's phases by number, while this rank may need them
        self.number, self.phase = 0, "start-up"  # this rank's last phase
        self.users = set()
        self.previous_excepthook = self.previous_exit = None
        self.exit_status = None
        self.stall = None  # the stall inspector's (check, shutdown) seconds, once guard_job has read them
        self.environment = {}  # the job's variables, read and compared across ranks by guard_job
        self.at_end = []  # called at exit once every rank has ended normally (hvd's timeline merge)
        self._inbox = np.zeros((self.size, _NOTE_WORDS), dtype=np.int64)
        self._templates = {}  # a phase's name -> its note, encoded
        self._recvs = {peer: self._listen(peer) for peer in range(self.size) if peer != self.rank}
        self._sends = []
        self._ended = False
        atexit.register(self._at_exit)

    # -- notes ----------------------------------------------------------------------------------
    def _listen(self, peer):
        return self.comm.Irecv(self._inbox[peer], source=peer, tag=_NOTE_TAG)

    def _note(self, value, name):
        template = self._templates.get(name)
        if template is None:  # a name's bytes are encoded once (a step's collectives repeat their names)
            if len(self._templates) > 1024:
                self._templates.clear()
            template = self._templates[name] = np.zeros(_NOTE_WORDS, dtype=np.int64)
            text = name.encode("utf-8", "replace")[: 8 * (_NOTE_WORDS - 1)]
            template[1:].view(np.uint8)[: len(text)] = np.frombuffer(text, dtype=np.uint8)
        note = template.copy()
        note[0] = value
        for peer in self._recvs:
            self._sends.append((note, self.comm.Isend(note, dest=peer, tag=_NOTE_TAG)))
        self.reached[self.rank] = value
        self.highest[self.rank] = max(self.highest[self.rank], value)
        self.names[self.rank] = template[1:].tobytes()

    def enter(self, name):
        """Tell every peer that this rank has entered the next collective or phase, ``name``; returns its number.

        Parameters
        ----------
        name : str
            What the peers' messages will call it (a tensor, ``"d4p kmeans.compute"``, ``"hvd.init"``).

        Returns
        -------
        int
            The number of the collective (1, 2, ...), the same on every rank that runs the same program.
        """
        self.number += 1
        self.phase = name
        if self.number % 256 == 0:  # forget the peers' phases this rank has passed
            self.seen = [{k: v for k, v in seen.items() if k >= self.number} for seen in self.seen]
        self._note(self.number, name)
        return self.number

    def arrive(self, collective):
        """Tell every peer that this rank has reached collective number ``collective`` (kept for old callers).

        Parameters
        ----------
        collective : int
        """
        self.number = collective
        self._note(collective, self.phase)

    def poll(self):
        """Read the notes that have arrived.

        Returns
        -------
        numpy.ndarray
            ``reached``: each rank's last note (``ENDED`` once it has ended).
        """
        for peer in list(self._recvs):
            while self._recvs[peer].Test():  # notes from one peer arrive in order (MPI's non-overtaking rule)
                note = self.reached[peer] = self._inbox[peer, 0]
                if note != ENDED:  # names stay bytes until a message needs them (this runs at every collective)
                    name = self.names[peer] = self._inbox[peer, 1:].tobytes()
                    if note >= self.number:
                        self.seen[peer][int(note)] = name
                self.highest[peer] = max(self.highest[peer], note)
                self._recvs[peer] = self._listen(peer)
        if self._sends:
            self._sends = [(buf, request) for buf, request in self._sends if not request.Test()]
        return self.reached

    def others(self):
        """Where every other rank is, from its last note: ``"rank 1: in #3 'allreduce'; rank 2: ended"``.

        Returns
        -------
        str
        """
        self.poll()
        parts = []
        for p in range(self.size):
            if p == self.rank:
                continue
            if self.reached[p] == ENDED:
                parts.append(f"rank {p}: ended")
            elif self.reached[p] == 0:
                parts.append(f"rank {p}: has entered no collective yet")
            else:
                parts.append(f"rank {p}: last entered #{self.reached[p]} {self.name_of(p)!r}")
        return "; ".join(parts)

    def name_of(self, rank):
        """The name of ``rank``'s last collective or phase, from its note.

        Parameters
        ----------
        rank : int

        Returns
        -------
        str
        """
        return self.names[rank].rstrip(b"\0").decode("utf-8", "replace")

    def where(self):
        """This rank's last collective or phase, for messages: ``"#3 'grads'"`` or ``"'hvd.init()'"``.

        Returns
        -------
        str
        """
        return f"#{self.number} {self.phase!r}" if self.number else repr(self.phase)

    def say(self, lines):
        """Write ``lines`` to stderr, each tagged with this rank.

        Parameters
        ----------
        lines : list of str
        """
        sys.stderr.write("".join(f"[rank {self.rank}] {line}\n" for line in lines))
        sys.stderr.flush()

    def abort(self, lines, status=1):
        """Print ``lines`` (tagged with the rank) and end the whole job with ``MPI_Abort``.

        Parameters
        ----------
        lines : list of str
        status : int
            The job's exit status.
        """
        self.say(lines)
        sys.stdout.flush()
        # mpiexec's I/O forwarder reads our pipes asynchronously, and MPI_Abort tears the job down at once:
        # give it a moment so that the message reaches the user
        time.sleep(0.5)
        self.world.Abort(status)

    # -- the stall inspector (Horovod's horovod/common/stall_inspector.cc, with its variables) ------
    def wait_for_peers(self, name, in_check=False, strict=False, spin=True):
        """Enter collective ``name``: tell every peer, and wait until every rank has entered it.

        While waiting: a peer that has ended aborts the job at once (it will never come), and so does, with
        ``strict``, a peer that entered a collective of another name under the same number; after
        ``HOROVOD_STALL_CHECK_TIME_SECONDS`` (and again every as many seconds) a warning names the ranks that
        have not arrived and the tensor; after ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` the job is aborted.

        Parameters
        ----------
        name : str
            The collective (Horovod: the tensor's name).
        in_check : bool
            Do not wait here: the caller's collective waits for every rank in its own cross-rank check, and
            calls the returned inspector while it does (``comm``'s ``on_wait``), which saves one round of
            messages per call.
        strict : bool
            Every rank must enter a collective of the same name under this number (d4p's phases).
        spin : bool
            See :func:`wait`.

        Returns
        -------
        callable or None
            With ``in_check``, the inspector (a call returning True once every rank has entered), or None
            when every peer has already arrived; otherwise None, once every rank has entered.
        """
        number = self.enter(name)
        if self.size == 1:
            return None
        self.poll()
        if not strict and min(self.highest.tolist()) >= number:  # the common case: every peer is here already
            return None
        inspect = self._inspector(name, number, strict)
        if inspect():  # the common case: every peer is here already
            return None
        if in_check:
            return inspect
        wait(inspect, spin=spin)
        return None

    def _inspector(self, name, number, strict):
        check, shutdown = self.stall if self.stall is not None else (0.0, 0.0)
        start, next_warning = time.monotonic(), [check]

        def inspect():
            reached = self.poll()
            r, n = self.rank, self.size
            if strict:
                for p in range(n):
                    other = self.seen[p].get(number)
                    if p != r and other is not None and other != self.names[r]:
                        other = other.rstrip(b"\0").decode("utf-8", "replace")
                        self.abort([f"rank {r} entered #{number} {name!r} while rank {p} entered #{number} "
                                    f"{other!r}: the ranks run different collectives (e.g. distributed=True on some "
                                    "ranks and False on others), which would wait for ever; aborting the whole job "
                                    f"(MPI_Abort). Where the others are: {self.others()}"])
            if min(self.highest.tolist()) >= number:  # a peer may have been here, done it and ended since
                for p in range(n):  # what this rank no longer needs to remember
                    if self.seen[p]:
                        self.seen[p] = {k: v for k, v in self.seen[p].items() if k > number}
                return True
            missing = [int(p) for p in np.flatnonzero(self.highest < number)]
            ended = [p for p in missing if reached[p] == ENDED]
            if ended:
                self.abort([f"rank(s) {ended} of {n} ended while rank {r} waits for them in collective #{number} "
                            f"{name!r}: they will never join it, so the whole job is aborted (MPI_Abort). "
                            f"Where the others are: {self.others()}"])
            waited = time.monotonic() - start
            if not ((shutdown and waited >= shutdown) or (check and waited >= next_warning[0])):
                return False
            listing = "; ".join(f"{p}: [{name}] (" + (f"it last reached collective #{reached[p]} {self.name_of(p)!r})"
                                                       if reached[p] else "it has reached no collective yet)")
                                for p in missing)
            if shutdown and waited >= shutdown:
                self.abort([f"collective #{number} {name!r} has waited {waited:.1f} s for ranks {missing}, longer "
                            f"than HOROVOD_STALL_SHUTDOWN_TIME_SECONDS={shutdown:g}: aborting the whole job "
                            "(MPI_Abort).", f"Missing ranks: {listing}"])
            self.say([f"One or more tensors were submitted to be reduced, gathered or broadcasted by a subset of "
                      f"ranks and are waiting for the remainder of ranks for more than {check:g} seconds. This may "
                      "indicate that different ranks are trying to submit different tensors or that only a subset "
                      "of ranks is submitting tensors, which will cause deadlock.",
                      f"Missing ranks: {listing}"])
            next_warning[0] += check
            return False

        return inspect

    # -- the hooks ------------------------------------------------------------------------------
    def hold(self, user):
        """Install the hooks (on the first hold) on behalf of ``user``.

        Parameters
        ----------
        user : str
            A name (``"hvd"``, ``"d4p"``, ``"comm"``).
        """
        if not self.users:
            self.previous_excepthook, self.previous_exit = sys.excepthook, sys.exit
            sys.excepthook = self._abort_on_uncaught_exception
            sys.exit = self._exit_recording_status
        self.users.add(user)

    def release(self, user):
        """``user`` lets go; when nobody holds the guard, the hooks are restored (notes still flow).

        Parameters
        ----------
        user : str
        """
        self.users.discard(user)
        if self.users:
            return
        if sys.excepthook == self._abort_on_uncaught_exception:
            sys.excepthook = self.previous_excepthook
        if sys.exit == self._exit_recording_status:
            sys.exit = self.previous_exit

    def _abort_on_uncaught_exception(self, exc_type, exc, tb):
        """sys.excepthook while held: print the traceback tagged with the rank, then abort every rank."""
        if self.size == 1:
            (self.previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        self.abort(text.rstrip().splitlines() + [
            f"uncaught {exc_type.__name__} on rank {self.rank} of {self.size}: aborting the whole job (MPI_Abort) so "
            f"that no rank waits for ever. It was in or after {self.where()}; where the others are: {self.others()}"])

    def _exit_recording_status(self, status=None):
        """sys.exit while held: remembers the status, so that the exit handler knows a failure from a normal end."""
        self.exit_status = status
        (self.previous_exit or _SYS_EXIT)(status)

    def _at_exit(self):
        """Tell the peers this rank has ended; while held, first abort on a failure status, then wait for them."""
        if self._ended:
            return
        self._ended = True
        r, n, status = self.rank, self.size, self.exit_status
        held = bool(self.users) and n > 1
        if held and status not in (None, 0):
            self.abort([f"sys.exit({status!r}) on rank {r} of {n}: aborting the whole job (MPI_Abort) so that no "
                        f"rank waits for ever. It was in or after {self.where()}; where the others are: "
                        f"{self.others()}"], status if isinstance(status, int) else 1)
        self._note(ENDED, "ended")
        if held:
            try:
                timeout = _exit_timeout()  # checked on every rank when the guard was taken
            except ValueError:  # changed since: the documented default
                timeout = 300.0
            if not wait(lambda: not (self.poll() != ENDED).any(), spin=False, deadline=time.monotonic() + timeout):
                self.abort([f"rank {r} of {n} has ended, but not every rank has ended within {timeout:g} s; they "
                            "may be waiting for this rank in a collective: aborting the whole job (MPI_Abort). "
                            f"Set WORKSHOP_HVD_EXIT_TIMEOUT to wait longer. Where the others are: {self.others()}"])
        for end in list(self.at_end):
            end()
        # the last notes are tiny (sent eagerly): they leave at once
        wait(lambda: self.poll() is not None and not self._sends, spin=False, deadline=time.monotonic() + 1.0)
        for request in self._recvs.values():  # MPI_Finalize wants no pending receive
            request.Cancel()
            request.Wait()


def guard_job(user, comm=None, variables=(), parse=None):
    """Hold the process-wide :class:`JobGuard` for ``user``, creating it on ``comm`` (default ``MPI.COMM_WORLD``),
    then read the job's environment on every rank (:func:`read_environment`).

    Collective: every rank calls this at the same point (as ``hvd.init()``); later calls return the same guard,
    on the communicator of the first call. Holders take it before anything else that can fail on one rank, so
    that such a failure ends the job; a bad or differing variable is then the same error on every rank.

    Parameters
    ----------
    user : str
        Who holds it (``"hvd"``, ``"d4p"``, ``"comm"``).
    comm : mpi4py communicator, optional
    variables, parse
        The holder's own variables and their check (see :func:`read_environment`).

    Returns
    -------
    JobGuard
        With ``stall`` (the inspector's settings) and ``environment`` (the variables read) set.
    """
    global _guard
    if _guard is None:
        from mpi4py import MPI

        _guard = JobGuard(comm if comm is not None else MPI.COMM_WORLD)
    _guard.hold(user)
    if _guard.number == 0:
        _guard.phase = {"hvd": "hvd.init()", "d4p": "d4p.daalinit()", "comm": "Communicator()"}.get(user, user)
    _guard.environment = read_environment(comm if comm is not None else _guard.world, variables, parse)
    _guard.stall = stall_settings(_guard.environment)
    return _guard


def release_job(user):
    """``user`` no longer holds the guard (see :meth:`JobGuard.release`).

    Parameters
    ----------
    user : str
    """
    if _guard is not None:
        _guard.release(user)


def current_guard():
    """The process's :class:`JobGuard`, or None before any holder created it.

    Returns
    -------
    JobGuard or None
    """
    return _guard
