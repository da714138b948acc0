"""Elastic training with Horovod's names (``horovod.tensorflow.elastic``): ``hvd.elastic``.

A script written for Horovod Elastic runs unchanged::

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for state.batch in range(state.batch, batches_per_epoch):
                session.run(train_op, feed_dict=next_batch())
                if state.batch % batches_per_commit == 0:
                    state.commit()
            state.batch = 0

    state = hvd.elastic.TensorFlowState(session=session, batch=0, epoch=0)
    state.register_reset_callbacks([on_state_reset])
    train(state)

and is started with ``workshop launch train.py -n 4 --min-np 2`` (horovodrun's flags).

The one idea: training goes on from the last **commit** when a rank is lost. An MPI job's world is fixed once
launched (there is no shrinking a communicator in standard MPI), so elasticity here is restart-based, as most sites
run it: when a rank dies the job ends within seconds (the job guard and the stall inspector, see
:mod:`workshop_lib.hvd`), the driver (:class:`workshop_lib.launch.ElasticDriver`) starts it again on the slots that
are left, and :func:`run` resumes it from the last commit instead of from step 0:

* ``state.commit()`` keeps an in-memory copy of the state (every rank) and, under the driver, a durable copy written
  by rank 0 through the atomic :class:`workshop_lib.tf.train.Saver` (``commit-<n>.npz`` in ``WORKSHOP_ELASTIC_DIR``;
  a sharded optimizer's moments are gathered there in full, see :mod:`workshop_lib.sharded`). It is collective.
* at the start of every launch, :func:`run` loads the newest durable commit at rank 0, calls the reset callbacks if
  this is a relaunch (the number of ranks may have changed: rescale the learning rate there), and ``state.sync()``
  broadcasts the state from rank 0, the lowest surviving rank (ranks are numbered afresh in every launch).

What is repeated after a failure: exactly the steps run after the last commit (the uncommitted tail). The global step
and the attributes (``epoch``, ``batch``) come back as they were committed, so with ``state.batch`` as the loop
counter no batch of an epoch is skipped, and only the batches of the tail are trained on twice (each rank draws them
again from its own stream; see the test program ``tests/mpi_scripts/horovod_elastic_tf.py``).

Without the driver (plain ``mpiexec`` or one process) commits stay in memory only; a
:class:`HorovodInternalError` on a one-rank job rolls back to the last commit and retries the function in-process,
as Horovod does; with more ranks it ends the job, which the driver then relaunches.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run", "State", "ObjectState", "TensorFlowState", "HorovodInternalError", "HostsUpdatedInterrupt",
           "ELASTIC_DIR", "ELASTIC_RESTART", "HOSTS_UPDATED", "INTERRUPTED", "EVENTS", "read_events"]

# set by the driver for every rank of a launch
ELASTIC_DIR = "WORKSHOP_ELASTIC_DIR"  # commits, the event log, the rank pids, the driver's notices
ELASTIC_RESTART = "WORKSHOP_ELASTIC_RESTART"  # 0 for the first launch, then 1, 2, ...
ELASTIC_CAUSE = "WORKSHOP_ELASTIC_CAUSE"  # why the driver relaunched (for the log line)
HOSTS_UPDATED = "hosts_updated"  # a file the driver writes in ELASTIC_DIR when discovery reports more slots
INTERRUPTED = "interrupted"  # a file rank 0 writes when the job ends for a HostsUpdatedInterrupt (relaunch, not done)
EVENTS = "events.jsonl"  # one JSON object a line: the driver's launches and ends, rank 0's resumes and commits
_PREFIX = "commit"
_ATTRIBUTES = "elastic/attributes.json"  # the plain attributes, as UTF-8 JSON bytes (no pickle in checkpoints)
_COMMIT = "elastic/commit"


class HorovodInternalError(RuntimeError):
    """A collective failed (a peer is gone): roll back to the last commit and go on (Horovod's name)."""


class HostsUpdatedInterrupt(RuntimeError):
    """The set of hosts changed: stop at the commit that raised it and go on with the new set (Horovod's name).

    ``skip_sync`` is True when hosts were only removed (the survivors' state is already the same).
    """

    def __init__(self, skip_sync=False):
        super().__init__(f"hosts updated (skip_sync={skip_sync})")
        self.skip_sync = skip_sync


def _hvd():
    from . import hvd

    return hvd


def _enter(name):
    """Enter a collective of the state's (its MPI calls) through the stall inspector, so that a hung peer ends the
    job instead of leaving the others in a raw MPI call for ever."""
    hvd = _hvd()
    wait = getattr(hvd, "_wait_for_peers", None)
    if hvd.is_initialized() and hvd.size() > 1 and wait is not None:
        wait(hvd._require(), name)


def _directory():
    path = os.environ.get(ELASTIC_DIR, "").strip()
    return Path(path) if path else None


def _restart_number():
    value = os.environ.get(ELASTIC_RESTART, "0")
    return int(value) if value.isdigit() else 0


def log_event(directory, **event):
    """Append ``event`` (with the wall time ``t``) as one JSON line to ``directory``/events.jsonl.

    Lines are short and written with one ``write`` in append mode, so the driver's and rank 0's lines never mix.

    Parameters
    ----------
    directory : str or Path
        The elastic folder (``WORKSHOP_ELASTIC_DIR``).
    **event
        JSON values: ``event=`` (launch, ended, finished, commit, resumed, ...) and its fields.
    """
    event = {"t": time.time(), **event}
    with open(Path(directory) / EVENTS, "a") as f:
        f.write(json.dumps(event) + "\n")


def read_events(directory):
    """The events :func:`log_event` wrote to ``directory``/events.jsonl so far, oldest first.

    Safe to call while a job runs: a line still being written (no newline yet) is left for the next call.

    Parameters
    ----------
    directory : str or Path
        The elastic folder.

    Returns
    -------
    list of dict
        Empty when nothing was logged yet.
    """
    path = Path(directory) / EVENTS
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _say(text):
    sys.stderr.write(f"[elastic] {text}\n")
    sys.stderr.flush()


class _Values:
    """A snapshot the :class:`~workshop_lib.tf.train.Saver` reads from and writes to like a session.

    Its "variables" are names; this lets the commit reuse the Saver's atomic write, index and retention for values
    that are not variables of one graph (a sharded optimizer's gathered moments, the attributes).
    """

    class Name:
        def __init__(self, name):
            self.name_prefix = name

    def __init__(self, values=None):
        self.values = dict(values or {})

    def keys(self):
        return {name: _Values.Name(name) for name in self.values}

    def read_variable(self, var):
        return self.values[var.name_prefix]

    def write_variable(self, var, value):
        self.values[var.name_prefix] = np.asarray(value)


class State:
    """Horovod's ``State``: ``commit()``, ``restore()``, ``sync()``, ``save()`` and reset callbacks.

    Subclasses define what is saved (:meth:`save`), put back (:meth:`restore`) and broadcast (:meth:`sync`).
    """

    def __init__(self):
        self._reset_callbacks = []
        self._commits = 0
        self._resumed = None  # (commit, step) when this launch resumed from a durable commit

    def register_reset_callbacks(self, callbacks):
        """Functions called (with no argument) after the job was reset: a relaunch on a new set of ranks.

        Parameters
        ----------
        callbacks : list of callable
        """
        if callable(callbacks):
            callbacks = [callbacks]
        for callback in callbacks:
            if not callable(callback):
                raise TypeError(f"register_reset_callbacks: {callback!r} is not callable")
        self._reset_callbacks.extend(callbacks)

    def on_reset(self):
        for callback in self._reset_callbacks:
            callback()

    def commit(self):
        """Save the state in memory (every rank) and durably at rank 0 under the driver; then check for new hosts.

        Collective: every rank calls it at the same step. Raises :class:`HostsUpdatedInterrupt` (on every rank,
        after the commit is complete) when the driver has found more slots.
        """
        _enter("hvd.elastic.commit")
        self._commits += 1
        self.save()
        directory = _directory()
        if directory is not None:
            values = self._durable_values()  # collective (a sharded optimizer gathers its moments at rank 0)
            if self._rank() == 0:
                self._write(directory, values)
        self.check_host_updates()

    def check_host_updates(self):
        """Raise :class:`HostsUpdatedInterrupt` on every rank if the driver has written its notice (rank 0 reads it)."""
        directory = _directory()
        if directory is None:
            return
        hvd = _hvd()
        notice = directory / HOSTS_UPDATED
        updated = notice.exists() if self._rank() == 0 else None
        if hvd.is_initialized() and hvd.size() > 1:
            updated = hvd._require().comm.comm.bcast(updated, root=0)
        if updated:
            if self._rank() == 0:
                notice.unlink(missing_ok=True)
            raise HostsUpdatedInterrupt(skip_sync=False)

    def _rank(self):
        hvd = _hvd()
        return hvd.rank() if hvd.is_initialized() else 0

    def _write(self, directory, values):
        from .tf.train import Saver

        directory.mkdir(parents=True, exist_ok=True)
        values = dict(values)
        values[_COMMIT] = np.int64(self._commits)
        snapshot = _Values(values)
        prefix = Saver(var_list=snapshot.keys(), max_to_keep=2).save(snapshot, str(directory / _PREFIX),
                                                                      global_step=self._commits)
        step = self._global_step_value()
        log_event(directory, event="commit", commit=self._commits, step=step, path=os.path.basename(prefix))

    def _load_latest(self, directory):
        """The newest durable commit's values (rank 0), or None when there is none."""
        from .tf.train import Saver, latest_checkpoint

        prefix = latest_checkpoint(str(directory))
        if prefix is None:
            return None
        with np.load(prefix + ".npz", allow_pickle=False) as f:
            names = list(f.files)
        snapshot = _Values()
        Saver(var_list=_Values({n: 0 for n in names}).keys()).restore(snapshot, prefix)
        return snapshot.values

    # what subclasses define
    def save(self):
        raise NotImplementedError

    def restore(self):
        raise NotImplementedError

    def sync(self):
        raise NotImplementedError

    def _durable_values(self):
        return {}

    def _load_durable(self, values):
        """Rank 0: take ``values`` (a durable commit) as the saved state, then restore it."""
        self._commits = int(values.get(_COMMIT, 0))

    def _global_step_value(self):
        return None


class ObjectState(State):
    """Plain Python attributes (``epoch``, ``batch``, ...) saved, restored and broadcast; Horovod's ``ObjectState``.

    Durable commits hold them as JSON, so they must be JSON values (numbers, strings, lists, dicts).

    Parameters
    ----------
    bcast_object : callable, optional
        ``bcast_object(obj) -> obj`` from rank 0 (default: MPI's broadcast of the JSON text).
    get_rank : callable, optional
        Accepted for Horovod's signature; the rank is ``hvd.rank()``.
    **kwargs
        The attributes and their initial values.
    """

    def __init__(self, bcast_object=None, get_rank=None, **kwargs):
        super().__init__()
        self._bcast_object = bcast_object
        self._saved_state = {}
        for name, value in kwargs.items():
            if name.startswith("_") or name in ("commit", "restore", "sync", "save", "session", "variables"):
                raise ValueError(f"ObjectState: attribute name {name!r} is reserved; choose another")
            _check_json(name, value)
            setattr(self, name, value)
        self._attributes = list(kwargs)
        self._save_attributes()

    def _save_attributes(self):
        for name in self._attributes:
            _check_json(name, getattr(self, name))
        self._saved_state = {name: copy.deepcopy(getattr(self, name)) for name in self._attributes}

    def _set_attributes(self):
        for name, value in self._saved_state.items():
            setattr(self, name, copy.deepcopy(value))

    def save(self):
        self._save_attributes()

    def restore(self):
        self._set_attributes()

    def sync(self):
        hvd = _hvd()
        if hvd.is_initialized() and hvd.size() > 1:
            _enter("hvd.elastic.sync")
            if self._bcast_object is not None:
                self._saved_state = self._bcast_object(self._saved_state)
            else:
                text = json.dumps(self._saved_state) if hvd.rank() == 0 else None
                self._saved_state = json.loads(hvd._require().comm.comm.bcast(text, root=0))
                self._commits = hvd._require().comm.comm.bcast(self._commits, root=0)
        self._set_attributes()

    def _durable_values(self):
        text = json.dumps(self._saved_state).encode()
        return {_ATTRIBUTES: np.frombuffer(text, dtype=np.uint8).copy()}

    def _load_durable(self, values):
        super()._load_durable(values)
        if _ATTRIBUTES in values:
            saved = json.loads(bytes(np.asarray(values[_ATTRIBUTES], dtype=np.uint8)).decode())
            self._saved_state.update({k: v for k, v in saved.items() if k in self._attributes})
        self._set_attributes()


def _check_json(name, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(f"elastic state attribute {name}={value!r}: expected a JSON value (number, string, list, "
                        f"dict), got {type(value).__name__}") from None


class TensorFlowState(ObjectState):
    """Variables of a :mod:`workshop_lib.tf` graph plus plain attributes; Horovod's ``TensorFlowState``.

    Parameters
    ----------
    variables : list of Variable, optional
        The variables to track (default: ``tf.global_variables()``).
    session : Session, optional
        The session holding their values (default: the default session).
    **kwargs
        Plain attributes (``epoch=0, batch=0``), as :class:`ObjectState`.

    A :func:`hvd.DistributedOptimizer(opt, sharded=True) <workshop_lib.hvd.DistributedOptimizer>` of the graph is
    tracked too: every rank keeps its own slice of the moments in memory, and a durable commit holds them gathered
    in full under Adam's names, so it restores into a sharded or unsharded run of any number of ranks.
    """

    def __init__(self, variables=None, session=None, **kwargs):
        from . import tf
        from .tf.core import get_default_session

        self.variables = list(variables) if variables is not None else tf.global_variables()
        self.session = session or get_default_session()
        if self.session is None:
            raise ValueError("TensorFlowState: pass session= (or create the state inside `with tf.Session() as "
                             "session:`), the session that holds the variables' values")
        for method in ("read_variable", "write_variable"):
            if not hasattr(self.session, method):
                raise TypeError(f"TensorFlowState: session={self.session!r} must be a tf.Session (it has no "
                                f"{method}); a MonitoredTrainingSession's variables cannot be set from outside")
        from .sharded import sharded_optimizers

        self._sharded = sharded_optimizers(self.variables[0].graph if self.variables else None)
        hvd = _hvd()
        self._bcast_op = (hvd.broadcast_variables(self.variables, root_rank=0)
                          if hvd.is_initialized() and hvd.size() > 1 else None)
        self._pending = {}  # rank 0 after loading a durable commit: the sharded optimizers' full moments
        self._save_model()
        super().__init__(**kwargs)

    def _save_model(self):
        self._values = [np.array(var.eval(self.session), copy=True) for var in self.variables]
        self._shards = [opt.shard_state(self.session) for opt in self._sharded]

    def _load_model(self):
        for var, value in zip(self.variables, self._values):
            var.load(value, self.session)
        for opt, shard in zip(self._sharded, self._shards):
            opt.load_shard_state(self.session, shard)

    def save(self):
        self._save_model()
        super().save()

    def restore(self):
        self._load_model()
        super().restore()

    def sync(self):
        if self._bcast_op is not None:
            self.session.run(self._bcast_op)
        hvd = _hvd()
        many = hvd.is_initialized() and hvd.size() > 1
        pending = hvd._require().comm.comm.bcast(bool(self._pending), root=0) if many else bool(self._pending)
        if pending:  # a durable commit was loaded at rank 0: every rank takes its slice of the full moments
            for opt in self._sharded:
                opt.scatter_state(self.session, self._pending if self._rank() == 0 else None)
            self._pending = {}
        self._save_model()
        super().sync()

    def _durable_values(self):
        values = {var.name_prefix: np.array(value, copy=True) for var, value in zip(self.variables, self._values)}
        for opt in self._sharded:
            full = opt.gather_state(self.session)  # collective: rank 0 gets the full moments, the others None
            if full is not None:
                values.update(full)
        values.update(super()._durable_values())
        return values

    def _load_durable(self, values):
        missing = [v.name_prefix for v in self.variables if v.name_prefix not in values]
        if missing:
            raise KeyError(f"the durable commit has no value for {missing[:5]} (of {len(missing)}); was it written by "
                           "another model?")
        for var in self.variables:
            var.load(values[var.name_prefix], self.session)
        self._pending = {}
        for opt in self._sharded:
            self._pending.update({name: values[name] for name in opt.state_names() if name in values})
            absent = [name for name in opt.state_names() if name not in values]
            if absent:
                raise KeyError(f"the durable commit has no optimizer state {absent[:3]}: it was written by a run "
                               "without Adam")
        super()._load_durable(values)

    def _global_step_value(self):
        for var, value in zip(self.variables, self._values):
            if var.name_prefix == "global_step":
                return int(value)
        return None


def _resume(state):
    """At the start of a launch under the driver: rank 0 loads the newest durable commit (if any)."""
    directory = _directory()
    if directory is None:
        return False
    hvd = _hvd()
    if state._rank() == 0:
        values = state._load_latest(directory)
        if values is not None:
            state._load_durable(values)
            state.save()
            state._resumed = state._commits
    if hvd.is_initialized():
        pid_dir = directory / "pids"
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank-{hvd.rank()}").write_text(f"{os.getpid()}\n")
    return True


def run(func):
    """Decorator: run ``func(state, ...)`` elastically (Horovod's ``hvd.elastic.run``).

    Before the first call the state is synchronised from rank 0 (after a relaunch by the driver: from the newest
    durable commit, and the reset callbacks run first). :class:`HostsUpdatedInterrupt` (raised by a commit when the
    driver found more slots) ends this launch normally so that the driver relaunches on the new set; a
    :class:`HorovodInternalError` rolls back to the last commit and retries in-process on a one-rank job without
    the driver, and otherwise ends the job (the driver relaunches it from the last durable commit).

    Parameters
    ----------
    func : callable
        ``func(state, *args, **kwargs)``; ``state`` is a :class:`State` (``ObjectState``, ``TensorFlowState``).

    Returns
    -------
    callable
        The wrapped function; it returns what ``func`` returns.
    """

    @functools.wraps(func)
    def wrapper(state, *args, **kwargs):
        if not isinstance(state, State):
            raise TypeError(f"hvd.elastic.run: the first argument must be an hvd.elastic state (ObjectState, "
                            f"TensorFlowState), got {type(state).__name__}")
        hvd = _hvd()
        directory = _directory()
        under_driver = _resume(state)
        restart = _restart_number() if under_driver else 0
        if restart:
            state.on_reset()  # the number of ranks may have changed: e.g. rescale the learning rate
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                if under_driver and state._rank() == 0 and state._resumed is not None:
                    size = hvd.size() if hvd.is_initialized() else 1
                    step = state._global_step_value()
                    cause = os.environ.get(ELASTIC_CAUSE, "")
                    at = f" at global step {step}" if step is not None else ""
                    _say(f"restart {restart}: resumed from commit {state._resumed}{at} on {size} rank(s)"
                         f"{f' (after: {cause})' if cause else ''}")
                    log_event(directory, event="resumed", restart=restart, commit=state._resumed, step=step,
                              size=size)
                    state._resumed = None
                return func(state, *args, **kwargs)
            except HorovodInternalError as exc:
                if under_driver or (hvd.is_initialized() and hvd.size() > 1):
                    _say(f"HorovodInternalError on rank {state._rank()} ({exc}): this launch ends; the driver "
                         "resumes from the last commit")
                    raise
                state.restore()
                skip_sync = False
            except HostsUpdatedInterrupt as exc:
                if under_driver:
                    if state._rank() == 0:
                        (directory / INTERRUPTED).write_text("hosts updated\n")
                        log_event(directory, event="interrupted", commit=state._commits,
                                  step=state._global_step_value())
                        _say(f"hosts updated: this launch ends at commit {state._commits}; the driver relaunches "
                             "on the new set of slots")
                    sys.exit(0)
                skip_sync = exc.skip_sync
            state.on_reset()

    return wrapper
