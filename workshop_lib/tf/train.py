"""``tf.train``: optimizers, the global step, checkpoints (Saver), hooks and MonitoredTrainingSession.

An optimizer's ``compute_gradients`` builds the gradient ops (``tf.gradients``)
and ``apply_gradients`` builds one update op per variable; ``minimize`` is
both. Horovod's ``DistributedOptimizer`` wraps ``compute_gradients`` only.
Checkpoints are ``.npz`` files (no pickle) written atomically, with a
``checkpoint`` index file beside them as TensorFlow writes it.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import kernels
from ..data import atomic_write, fsync_dir, is_temporary, remove_stale_temporaries
from . import logging
from .core import (
    GLOBAL_STEP,
    GLOBAL_VARIABLES,
    TRAINABLE_VARIABLES,
    Tensor,
    Variable,
    control_dependencies,
    convert_to_tensor,
    get_default_graph,
    make_op,
)
from .gradients import gradients
from .ops import assign_add, group
from .session import Session

__all__ = [
    "Optimizer", "GradientDescentOptimizer", "MomentumOptimizer", "AdamOptimizer", "AdagradOptimizer",
    "RMSPropOptimizer", "get_or_create_global_step", "get_global_step", "create_global_step",
    "Saver", "latest_checkpoint", "SessionRunHook", "SessionRunArgs", "SessionRunContext", "SessionRunValues",
    "StopAtStepHook", "LoggingTensorHook", "CheckpointSaverHook", "MonitoredTrainingSession",
]


# ----------------------------------------------------------------------------------------------
# global step


def get_global_step(graph=None):
    items = (graph or get_default_graph()).get_collection(GLOBAL_STEP)
    return items[0] if items else None


def create_global_step(graph=None):
    graph = graph or get_default_graph()
    if get_global_step(graph) is not None:
        raise ValueError("the global step already exists")
    with graph.as_default():
        return Variable(np.int64(0), trainable=False, name="global_step",
                        collections=[GLOBAL_VARIABLES, GLOBAL_STEP])


def get_or_create_global_step(graph=None):
    return get_global_step(graph) or create_global_step(graph)


# ----------------------------------------------------------------------------------------------
# optimizers


class Optimizer:
    """Base class: subclasses define ``_create_slots`` and ``_apply`` (the update of one variable).

    An update reads and writes variables through the run context (``ctx.read_variable``,
    ``ctx.write_variable``), as every op does.
    """

    def __init__(self, use_locking=False, name="Optimizer"):
        self._name = name
        self._slots = {}

    def compute_gradients(self, loss, var_list=None, gate_gradients=1, aggregation_method=None,
                          colocate_gradients_with_ops=False, grad_loss=None):
        """[(gradient, variable)] for ``var_list`` (default: the trainable variables)."""
        if var_list is None:
            var_list = get_default_graph().get_collection(TRAINABLE_VARIABLES)
        var_list = list(var_list)
        if not var_list:
            raise ValueError("no variables to optimize")
        grads = gradients(loss, var_list, grad_ys=None if grad_loss is None else [grad_loss])
        return list(zip(grads, var_list))

    def apply_gradients(self, grads_and_vars, global_step=None, name=None, gate=None):
        """One update op per (gradient, variable), grouped; then the global step is incremented.

        Parameters
        ----------
        grads_and_vars : list of (gradient, variable), as ``compute_gradients`` returns
        global_step : Variable, optional
            Incremented by one after the updates, on every run of the returned op.
        name : str, optional
        gate : bool scalar Tensor, optional
            When given, the updates (and an optimizer's own bookkeeping, such as Adam's powers of beta) take
            effect only on runs where it is True; the global step still advances on every run. This is how
            ``hvd.DistributedOptimizer(backward_passes_per_step=k)`` applies the aggregated gradients on
            every k-th pass only. Not in TensorFlow's signature: an addition of this engine.
        """
        if gate is not None and (not isinstance(gate, Tensor) or gate.dtype.name != "bool" or gate.shape.dims != []):
            raise TypeError(f"gate={gate!r} must be a scalar bool tensor or None")
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not pairs:
            raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in grads_and_vars]}")
        graph = get_default_graph()
        with graph.name_scope(name or self._name):
            for _, var in pairs:
                if var not in self._slots:
                    self._slots[var] = self._create_slots(var)
            grads = [convert_to_tensor(g) for g, _ in pairs]
            # every update waits for every gradient: updates change variables in place, and a gradient
            # (say, backpropagation through fc2's weights) must see the values of this step, not the next
            with control_dependencies([g.op for g in grads]):
                updates = [self._apply(g, v, gate) for g, (_, v) in zip(grads, pairs)]
            finish = self._finish(updates, gate)
            if global_step is None:
                return finish
            with control_dependencies([finish]):
                return assign_add(global_step, np.int64(1), name="update_global_step").op

    def minimize(self, loss, global_step=None, var_list=None, name=None):
        return self.apply_gradients(self.compute_gradients(loss, var_list), global_step=global_step, name=name)

    def get_slot(self, var, name):
        return self._slots.get(var, {}).get(name)

    def get_slot_names(self):
        return sorted({n for slots in self._slots.values() for n in slots})

    def variables(self):
        return [v for slots in self._slots.values() for v in slots.values()]

    # helpers for subclasses
    def _slot(self, var, name, fill=0.0):
        return Variable(np.full(var.shape.as_list(), fill, dtype=var.dtype.as_numpy_dtype), trainable=False,
                        name=f"{var.name_prefix}/{self._name}_{name}")

    def _update_op(self, op_type, grad, var, inputs, update, gate):
        """An op running ``update(ctx, grad_value, *input_values)``, which changes variables through ``ctx``."""
        return self._stateful_op(op_type, [grad, *inputs],
                                 lambda ctx, g, *values: update(ctx, np.asarray(g, dtype=var.dtype.as_numpy_dtype),
                                                                *values), gate)

    @staticmethod
    def _stateful_op(op_type, inputs, effect, gate, name=None):
        """An op with no outputs running ``effect(ctx, *input_values)``; skipped on runs where ``gate`` is False."""

        def compute(ctx, *values):
            if gate is not None:
                *values, open_ = values
                if not bool(open_):
                    return ()
            effect(ctx, *values)
            return ()

        inputs = list(inputs) + ([gate] if gate is not None else [])
        return make_op(op_type, inputs, compute, [], [], name=name or op_type, stateful=True)

    def _create_slots(self, var):
        return {}

    def _finish(self, updates, gate):
        return group(*updates, name="update")


def _lr(value):
    return value if isinstance(value, (Tensor, Variable)) else float(value)


class _LearningRate:
    def _lr_input(self):
        return [convert_to_tensor(self._learning_rate)] if isinstance(self._learning_rate, (Tensor, Variable)) else []

    def _lr_value(self, values):
        return float(values[0]) if isinstance(self._learning_rate, (Tensor, Variable)) else self._learning_rate


class GradientDescentOptimizer(_LearningRate, Optimizer):
    """var -= learning_rate * grad."""

    def __init__(self, learning_rate, use_locking=False, name="GradientDescent"):
        super().__init__(use_locking, name)
        self._learning_rate = _lr(learning_rate)

    def _apply(self, grad, var, gate):
        def update(ctx, g, *lr):
            ctx.write_variable(var, ctx.read_variable(var) - self._lr_value(lr) * g)

        return self._update_op("ApplyGradientDescent", grad, var, self._lr_input(), update, gate)


class MomentumOptimizer(_LearningRate, Optimizer):
    """accum = momentum * accum + grad; var -= lr * accum (or the Nesterov form)."""

    def __init__(self, learning_rate, momentum, use_locking=False, name="Momentum", use_nesterov=False):
        super().__init__(use_locking, name)
        self._learning_rate, self._momentum, self._nesterov = _lr(learning_rate), float(momentum), use_nesterov

    def _create_slots(self, var):
        return {"momentum": self._slot(var, "momentum")}

    def _apply(self, grad, var, gate):
        accum = self._slots[var]["momentum"]

        def update(ctx, g, *lr):
            lr = self._lr_value(lr)
            a = self._momentum * ctx.read_variable(accum) + g
            ctx.write_variable(accum, a)
            step = lr * (g + self._momentum * a) if self._nesterov else lr * a
            ctx.write_variable(var, ctx.read_variable(var) - step)

        return self._update_op("ApplyMomentum", grad, var, self._lr_input(), update, gate)


class AdamOptimizer(_LearningRate, Optimizer):
    """Adam with TensorFlow's update: lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, use_locking=False, name="Adam"):
        super().__init__(use_locking, name)
        self._learning_rate, self._beta1, self._beta2, self._epsilon = _lr(learning_rate), beta1, beta2, epsilon
        self._powers = None

    def _create_slots(self, var):
        if self._powers is None:
            self._powers = (Variable(np.float32(self._beta1), trainable=False, name="beta1_power"),
                            Variable(np.float32(self._beta2), trainable=False, name="beta2_power"))
        return {"m": self._slot(var, "m"), "v": self._slot(var, "v")}

    def _apply(self, grad, var, gate):
        m, v = self._slots[var]["m"], self._slots[var]["v"]
        b1p, b2p = self._powers

        def update(ctx, g, *lr):
            lr_t = kernels.adam_step_size(self._lr_value(lr), float(ctx.read_variable(b1p)),
                                          float(ctx.read_variable(b2p)))
            # one fused pass, in place on the session's arrays (the same step as TensorFlow's ApplyAdam)
            kernels.adam_update(ctx.read_variable(var), g, ctx.read_variable(m), ctx.read_variable(v), lr_t,
                                self._beta1, self._beta2, self._epsilon)

        return self._update_op("ApplyAdam", grad, var, self._lr_input(), update, gate)

    def _finish(self, updates, gate):
        b1p, b2p = self._powers

        def advance(ctx):
            ctx.write_variable(b1p, (ctx.read_variable(b1p) * self._beta1).astype(np.float32))
            ctx.write_variable(b2p, (ctx.read_variable(b2p) * self._beta2).astype(np.float32))

        with control_dependencies(updates):
            return self._stateful_op("AdamPowers", [], advance, gate, name="update_powers")


class AdagradOptimizer(_LearningRate, Optimizer):
    """accum += grad^2; var -= lr * grad / sqrt(accum)."""

    def __init__(self, learning_rate, initial_accumulator_value=0.1, use_locking=False, name="Adagrad"):
        super().__init__(use_locking, name)
        self._learning_rate, self._initial = _lr(learning_rate), initial_accumulator_value

    def _create_slots(self, var):
        return {"accumulator": self._slot(var, "accumulator", self._initial)}

    def _apply(self, grad, var, gate):
        accum = self._slots[var]["accumulator"]

        def update(ctx, g, *lr):
            a = ctx.read_variable(accum) + g * g
            ctx.write_variable(accum, a)
            ctx.write_variable(var, ctx.read_variable(var) - self._lr_value(lr) * g / np.sqrt(a))

        return self._update_op("ApplyAdagrad", grad, var, self._lr_input(), update, gate)


class RMSPropOptimizer(_LearningRate, Optimizer):
    """ms = decay * ms + (1 - decay) * grad^2; mom = momentum * mom + lr * grad / sqrt(ms + eps); var -= mom."""

    def __init__(self, learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, use_locking=False, centered=False,
                 name="RMSProp"):
        super().__init__(use_locking, name)
        if centered:
            raise NotImplementedError("centered RMSProp is not part of this course's engine; use centered=False")
        self._learning_rate, self._decay, self._momentum, self._epsilon = _lr(learning_rate), decay, momentum, epsilon

    def _create_slots(self, var):
        return {"rms": self._slot(var, "rms", 1.0), "momentum": self._slot(var, "momentum")}

    def _apply(self, grad, var, gate):
        rms, mom = self._slots[var]["rms"], self._slots[var]["momentum"]

        def update(ctx, g, *lr):
            ms = self._decay * ctx.read_variable(rms) + (1 - self._decay) * g * g
            mo = self._momentum * ctx.read_variable(mom) + self._lr_value(lr) * g / np.sqrt(ms + self._epsilon)
            ctx.write_variable(rms, ms)
            ctx.write_variable(mom, mo)
            ctx.write_variable(var, ctx.read_variable(var) - mo)

        return self._update_op("ApplyRMSProp", grad, var, self._lr_input(), update, gate)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _step_value(sess, global_step):
    if global_step is None:
        return None
    if isinstance(global_step, (Variable, Tensor)):
        return int(sess.run(global_step))
    return int(global_step)


def _write_index(directory, latest, all_paths):
    text = f'model_checkpoint_path: "{os.path.basename(latest)}"\n' + "".join(
        f'all_model_checkpoint_paths: "{os.path.basename(p)}"\n' for p in all_paths)
    atomic_write(Path(directory) / "checkpoint", lambda tmp: Path(tmp).write_text(text))


def _read_index(directory):
    """(newest prefix or None, [prefixes], why the index is unusable or None) from ``directory/checkpoint``.

    The index is a hint, never trusted: only plain names of files in ``directory`` count (no folders, no ``..``),
    and an index that is not text (a binary or half-written file) is reported in ``why``, naming the file.
    """
    path = Path(directory) / "checkpoint"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, [], None
    except (OSError, UnicodeDecodeError) as exc:
        return None, [], f"{path} is not a readable checkpoint index ({type(exc).__name__}: {exc})"

    def inside(name):
        return name and name not in (".", "..") and "/" not in name and os.sep not in name and "\\" not in name

    latest = re.search(r'^model_checkpoint_path: "(.*)"$', text, re.M)
    every = [p for p in re.findall(r'^all_model_checkpoint_paths: "(.*)"$', text, re.M) if inside(p)]
    latest = os.path.join(directory, latest.group(1)) if latest and inside(latest.group(1)) else None
    return latest, [os.path.join(directory, p) for p in every], None


def _prefix(save_path):
    """The path prefix of a checkpoint, from a prefix (``model.ckpt-7``) or its file (``model.ckpt-7.npz``)."""
    path = os.fspath(save_path)
    return path[: -len(".npz")] if path.endswith(".npz") else path


def _is_complete(prefix):
    """True if ``prefix.npz`` is a whole zip archive (a truncated copy lacks the directory at its end)."""
    return os.path.isfile(prefix + ".npz") and zipfile.is_zipfile(prefix + ".npz")


def _checkpoints_on_disk(directory):
    """The prefixes of the complete checkpoints in ``directory``, oldest first (by write time, then step)."""
    found = []
    for entry in Path(directory).glob("*.npz") if os.path.isdir(directory) else []:
        prefix = str(entry)[: -len(".npz")]
        if is_temporary(entry) or not _is_complete(prefix):
            continue
        step = re.search(r"-(\d+)$", prefix)
        found.append((entry.stat().st_mtime_ns, int(step.group(1)) if step else -1, prefix))
    return [prefix for _, _, prefix in sorted(found)]


def _find_latest(checkpoint_dir):
    """(prefix or None, why the index was not used or None): the index's newest if complete, else the disk's."""
    latest, _, unreadable = _read_index(checkpoint_dir)
    if latest is not None and _is_complete(latest):
        return latest, None
    on_disk = _checkpoints_on_disk(checkpoint_dir)
    if not on_disk:
        return None, None
    if unreadable is not None:
        why = unreadable
    elif latest is None:
        why = f"{os.path.join(checkpoint_dir, 'checkpoint')} is missing or names no checkpoint"
    else:
        state = "incomplete" if os.path.exists(latest + ".npz") else "missing"
        why = f"the index names {latest}.npz, which is {state}"
    return on_disk[-1], why


def latest_checkpoint(checkpoint_dir, latest_filename=None):
    """The path prefix of the newest checkpoint in ``checkpoint_dir`` (as written by Saver), or None.

    The newest is the one the ``checkpoint`` index names. If that file is missing or
    incomplete (a truncated copy), the newest complete checkpoint on disk is used
    instead, with a warning that says why.

    Parameters
    ----------
    checkpoint_dir : str or Path
        The folder that ``Saver.save`` wrote to.
    latest_filename : None
        TensorFlow's name of another index file; only the default (``checkpoint``) is supported.

    Returns
    -------
    str or None
        A prefix for ``Saver.restore`` (``<dir>/model.ckpt-<step>``), None if the folder holds no checkpoint.
    """
    if latest_filename not in (None, "checkpoint"):
        raise NotImplementedError(f"latest_filename={latest_filename!r}: only the default index 'checkpoint' is "
                                  "supported")
    latest, why = _find_latest(checkpoint_dir)
    if why is not None:
        logging.warning("%s; using the newest complete checkpoint on disk, %s", why, latest)
    return latest


def _refuse_unusable_checkpoints(checkpoint_dir):
    """Raise if ``checkpoint_dir`` holds checkpoint files but no usable checkpoint: never restart at step 0 silently."""
    if not os.path.isdir(checkpoint_dir):
        return
    names = sorted(e.name for e in Path(checkpoint_dir).iterdir()
                   if not is_temporary(e) and (e.name == "checkpoint" or e.suffix == ".npz"))
    if names:
        raise ValueError(
            f"checkpoint_dir={os.fspath(checkpoint_dir)!r} holds {names} but no complete checkpoint to resume from; "
            "training would restart at step 0. Move or delete these files to start afresh, or pass another "
            "checkpoint_dir")


def _check_checkpoint_dir(directory, argument="checkpoint_dir", value=None):
    """Raise a ValueError naming ``argument`` if ``directory`` exists but is not a folder (a file in its place)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{argument}={os.fspath(directory if value is None else value)!r}: {os.fspath(directory)} "
                         "is a file, expected a folder for the checkpoints (or a path that does not exist yet)")


def _retention(directory, base, new, max_to_keep):
    """(names to keep, oldest first and ``new`` last; names to delete) among the checkpoints in ``directory``.

    Decided from the files on disk, never from the index alone: the candidates are the complete checkpoints in
    ``directory`` named ``<base>-<step>`` and those the index names (plain names in ``directory`` only, that
    exist and are complete), ordered by write time then step. Names, not paths, are compared, so ``./ckpt`` and
    ``ckpt`` are the same folder. A missing, garbled or binary index therefore never costs a checkpoint.
    """
    ours = re.compile(re.escape(base) + r"-\d+$")
    on_disk = [os.path.basename(p) for p in _checkpoints_on_disk(directory)]
    _, indexed, _ = _read_index(directory)
    indexed = {os.path.basename(p) for p in indexed}
    history = [name for name in on_disk if name != new and (ours.match(name) or name in indexed)] + [new]
    if not max_to_keep:
        return history, []
    return history[-max_to_keep:], history[:-max_to_keep]


class Saver:
    """Saves and restores variables as ``<prefix>.npz``; keeps the newest ``max_to_keep`` checkpoints.

    A save survives being killed at any moment: the new checkpoint is written
    first (a temporary file, fsync, rename, fsync of the folder), then the
    ``checkpoint`` index naming it, and only then are checkpoints beyond
    ``max_to_keep`` deleted, so the index never names a deleted file. Each save
    also deletes what killed saves left behind: their temporary files, and older
    checkpoints of the same name (``<save_path>-<step>.npz``) beyond ``max_to_keep``.
    """

    def __init__(self, var_list=None, max_to_keep=5):
        if var_list is None:
            var_list = get_default_graph().get_collection(GLOBAL_VARIABLES)
        if max_to_keep is not None and (not isinstance(max_to_keep, (int, np.integer)) or max_to_keep < 0):
            raise ValueError(f"max_to_keep={max_to_keep!r} must be a non-negative integer (0 or None: keep all)")
        self._vars = {v.name_prefix: v for v in (var_list.values() if isinstance(var_list, dict) else var_list)}
        self.max_to_keep = max_to_keep

    def save(self, sess, save_path, global_step=None, write_meta_graph=True, latest_filename=None):
        """Write a checkpoint and return its path prefix, ``save_path-<global_step>`` (a trailing .npz is dropped).

        The file is ``<prefix>.npz``; ``restore`` and ``latest_checkpoint`` take the prefix.
        """
        if latest_filename not in (None, "checkpoint"):
            raise NotImplementedError(f"latest_filename={latest_filename!r}: only the default index 'checkpoint' "
                                      "is supported")
        step = _step_value(sess, global_step)
        base = _prefix(save_path)
        prefix = f"{base}-{step}" if step is not None else base
        directory = os.path.dirname(prefix) or "."
        _check_checkpoint_dir(directory, "save_path", save_path)
        values = {name: sess.read_variable(var) for name, var in self._vars.items()}
        for name in (os.path.basename(base), "checkpoint"):
            remove_stale_temporaries(directory, name)
        atomic_write(Path(prefix + ".npz"), lambda tmp: np.savez(tmp, **values))
        kept, stale = _retention(directory, os.path.basename(base), os.path.basename(prefix), self.max_to_keep)
        _write_index(directory, prefix, [os.path.join(directory, name) for name in kept])
        if stale:  # old ones last: the index already names only the kept
            for name in stale:
                os.unlink(os.path.join(directory, name + ".npz"))
            fsync_dir(directory)
        return prefix

    def restore(self, sess, save_path):
        """Load every variable of this Saver from ``save_path``: a prefix, as latest_checkpoint returns, or its .npz.

        Every value is read before any variable changes, so a failed restore leaves the session as it was.
        """
        if save_path is None:
            raise ValueError("save_path is None: there is no checkpoint to restore (check latest_checkpoint's dir)")
        if os.path.isdir(save_path):
            raise ValueError(f"save_path={os.fspath(save_path)!r} is a folder; pass a checkpoint in it, e.g. "
                             "tf.train.latest_checkpoint(folder)")
        path = _prefix(save_path) + ".npz"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: checkpoint not found")
        values = _read_checkpoint(path, list(self._vars))
        for name, var in self._vars.items():
            sess.write_variable(var, values[name])
        logging.info("Restoring parameters from %s", save_path)


def _read_checkpoint(path, names):
    """{name: array} for ``names`` from the checkpoint file ``path``; errors name the file and what is wrong."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a complete checkpoint: expected an .npz (zip) archive as tf.train.Saver "
                         "writes, found a truncated file or a file of another kind")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [name for name in names if name not in f.files]
            if missing:
                raise KeyError(f"{path}: checkpoint has no value for {missing}")
            return {name: f[name] for name in names}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: corrupted checkpoint ({type(exc).__name__}: {exc}); restore an older one "
                         "or retrain") from exc
    except ValueError as exc:  # numpy refusing pickled (object) arrays, or a malformed array header
        raise ValueError(f"{path}: not a checkpoint of tf.train.Saver, which holds numeric arrays only") from exc


# ----------------------------------------------------------------------------------------------
# hooks


class SessionRunArgs:
    def __init__(self, fetches, feed_dict=None, options=None):
        self.fetches, self.feed_dict, self.options = fetches, feed_dict, options


class SessionRunContext:
    def __init__(self, original_args, session):
        self.original_args, self.session = original_args, session
        self._stop_requested = False

    def request_stop(self):
        self._stop_requested = True

    @property
    def stop_requested(self):
        return self._stop_requested


class SessionRunValues:
    def __init__(self, results, options=None, run_metadata=None):
        self.results, self.options, self.run_metadata = results, options, run_metadata


class SessionRunHook:
    """Called around session creation and every run, as TensorFlow's (and Horovod's) hooks expect."""

    def begin(self):
        pass

    def after_create_session(self, session, coord):
        pass

    def before_run(self, run_context):
        return None

    def after_run(self, run_context, run_values):
        pass

    def end(self, session):
        pass


class StopAtStepHook(SessionRunHook):
    """Request a stop once the global step reaches ``last_step`` (or ``num_steps`` more than at the start).

    The global step comes with each run's own fetches (``before_run``); it is the value the run read, which may
    be before the run's increment, so only when that value is one step short is it read again, as TensorFlow does.
    """

    def __init__(self, num_steps=None, last_step=None):
        if (num_steps is None) == (last_step is None):
            raise ValueError("pass exactly one of num_steps and last_step")
        self._num_steps, self._last_step = num_steps, last_step

    def begin(self):
        self._global_step = get_global_step()
        if self._global_step is None:
            raise RuntimeError("StopAtStepHook needs a global step: call tf.train.get_or_create_global_step()")

    def after_create_session(self, session, coord):
        if self._last_step is None:
            self._last_step = int(session.run(self._global_step)) + self._num_steps

    def before_run(self, run_context):
        return SessionRunArgs(self._global_step)

    def after_run(self, run_context, run_values):
        if int(run_values.results) + 1 >= self._last_step and \
                int(run_context.session.run(self._global_step)) >= self._last_step:
            run_context.request_stop()


class LoggingTensorHook(SessionRunHook):
    """Log the values of ``tensors`` (a dict tag -> tensor, or a list) every ``every_n_iter`` runs via tf.logging.info."""

    def __init__(self, tensors, every_n_iter=None, every_n_secs=None, at_end=False, formatter=None):
        if every_n_iter is None and every_n_secs is None and not at_end:
            raise ValueError("pass every_n_iter, every_n_secs or at_end=True")
        self._tensors = dict(tensors) if isinstance(tensors, dict) else {
            (t if isinstance(t, str) else t.name): t for t in tensors}
        self._every_n_iter, self._every_n_secs, self._at_end, self._formatter = every_n_iter, every_n_secs, at_end, \
            formatter

    def begin(self):
        graph = get_default_graph()
        self._fetches = {tag: graph.as_graph_element(t) if not isinstance(t, Variable) else t.value()
                         for tag, t in self._tensors.items()}
        self._iter, self._last_time = 0, None

    def _due(self):
        if self._every_n_iter is not None:
            return self._iter % self._every_n_iter == 0
        return self._last_time is None or time.time() - self._last_time >= self._every_n_secs

    def before_run(self, run_context):
        self._should_log = self._due()
        return SessionRunArgs(self._fetches) if self._should_log else None

    def _log(self, values):
        if self._formatter:
            logging.info(self._formatter(values))
        else:
            text = ", ".join(f"{tag} = {values[tag]}" for tag in self._tensors)
            elapsed = "" if self._last_time is None else f" ({time.time() - self._last_time:.3f} sec)"
            logging.info("%s%s", text, elapsed)
        self._last_time = time.time()

    def after_run(self, run_context, run_values):
        if self._should_log:
            self._log(run_values.results)
        self._iter += 1

    def end(self, session):
        if self._at_end:
            self._log(session.run(self._fetches))


class CheckpointSaverHook(SessionRunHook):
    """Save a checkpoint every ``save_steps`` steps or ``save_secs`` seconds, and at the end.

    As :class:`StopAtStepHook`, it reads the global step from each run's fetches and reads it again only when a
    save may be due.
    """

    def __init__(self, checkpoint_dir, save_secs=None, save_steps=None, saver=None, checkpoint_basename="model.ckpt"):
        if (save_secs is None) == (save_steps is None):
            raise ValueError("pass exactly one of save_secs and save_steps")
        self._dir, self._secs, self._steps, self._saver = checkpoint_dir, save_secs, save_steps, saver
        self._path = os.path.join(checkpoint_dir, checkpoint_basename)

    def begin(self):
        self._global_step = get_global_step()
        if self._global_step is None:
            raise RuntimeError("CheckpointSaverHook needs a global step: call tf.train.get_or_create_global_step()")
        self._saver = self._saver or Saver()
        _check_checkpoint_dir(self._dir)
        os.makedirs(self._dir, exist_ok=True)

    def after_create_session(self, session, coord):
        self._last_step = int(session.run(self._global_step))
        self._last_time = time.time()
        if _find_latest(self._dir)[0] is None:
            self._save(session, self._last_step)

    def _save(self, session, step):
        logging.info("Saving checkpoints for %d into %s.", step, self._path)
        self._saver.save(session, self._path, global_step=step)
        self._last_step, self._last_time = step, time.time()

    def before_run(self, run_context):
        return SessionRunArgs(self._global_step)

    def _due(self, step):
        return (step - self._last_step >= self._steps) if self._steps else (time.time() - self._last_time >= self._secs)

    def after_run(self, run_context, run_values):
        if not self._due(int(run_values.results) + 1):
            return
        step = int(run_context.session.run(self._global_step))
        if self._due(step) and step != self._last_step:
            self._save(run_context.session, step)

    def end(self, session):
        step = int(session.run(self._global_step))
        if step != self._last_step or _find_latest(self._dir)[0] is None:
            self._save(session, step)


class MonitoredTrainingSession:
    """A session that initialises or restores variables, calls hooks around every run, and saves checkpoints.

    With ``checkpoint_dir`` (on the chief) it resumes from the latest checkpoint there and says so, and
    adds a CheckpointSaverHook (every ``save_checkpoint_steps`` steps, else every ``save_checkpoint_secs``).
    A ``checkpoint_dir`` that holds checkpoint files none of which can be used raises a ValueError
    naming them, rather than starting again at step 0.
    """

    def __init__(self, master="", is_chief=True, checkpoint_dir=None, scaffold=None, hooks=None,
                 chief_only_hooks=None, save_checkpoint_secs=600, save_summaries_steps=100, save_summaries_secs=None,
                 config=None, stop_grace_period_secs=120, log_step_count_steps=100, save_checkpoint_steps=None):
        graph = get_default_graph()
        restored = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        if checkpoint_dir and restored is None:
            _refuse_unusable_checkpoints(checkpoint_dir)
        self._hooks = list(hooks or []) + (list(chief_only_hooks or []) if is_chief else [])
        if checkpoint_dir and is_chief and (save_checkpoint_steps or save_checkpoint_secs):
            self._hooks.append(CheckpointSaverHook(
                checkpoint_dir, save_steps=save_checkpoint_steps,
                save_secs=None if save_checkpoint_steps else save_checkpoint_secs))
        for hook in self._hooks:
            hook.begin()
        init = make_op("NoOp", [], lambda ctx: (), [], [], name="init_all")
        init.control_inputs.extend(v.initializer for v in graph.get_collection(GLOBAL_VARIABLES))
        self._session = Session(graph=graph, config=config)
        self._session.run(init)
        if restored:
            Saver().restore(self._session, restored)
            step = get_global_step(graph)
            at = f" at global step {int(self._session.run(step))}" if step is not None else ""
            logging.warning("Restoring parameters from %s: resuming%s", restored, at)
        for hook in self._hooks:
            hook.after_create_session(self._session, None)
        self._stop = False

    def run(self, fetches, feed_dict=None, options=None, run_metadata=None):
        context = SessionRunContext(SessionRunArgs(fetches, feed_dict), self._session)
        extra = [hook.before_run(context) for hook in self._hooks]
        merged_feed = dict(feed_dict or {})
        for args in extra:
            if args is not None and args.feed_dict:
                merged_feed.update(args.feed_dict)
        all_fetches = [fetches] + [None if a is None else a.fetches for a in extra]
        flat = [f for f in all_fetches if f is not None]
        results = self._session.run(flat, merged_feed)
        by_hook, i = [], 1
        for a in extra:
            if a is None:
                by_hook.append(None)
            else:
                by_hook.append(results[i])
                i += 1
        for hook, value in zip(self._hooks, by_hook):
            hook.after_run(context, SessionRunValues(value))
        if context.stop_requested:
            self._stop = True
        return results[0]

    def should_stop(self):
        return self._stop

    def close(self):
        if not self._session.closed:
            for hook in self._hooks:
                hook.end(self._session)
            self._session.close()

    @property
    def graph(self):
        return self._session.graph

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._session.close()


class experimental:  # noqa: N801 - TensorFlow 1's namespace ``tf.train.experimental``
    """``tf.train.experimental.enable_mixed_precision_graph_rewrite(opt)``: bf16 mixed precision on this engine."""

    from .options import disable_mixed_precision_graph_rewrite, enable_mixed_precision_graph_rewrite

    enable_mixed_precision_graph_rewrite = staticmethod(enable_mixed_precision_graph_rewrite)
    disable_mixed_precision_graph_rewrite = staticmethod(disable_mixed_precision_graph_rewrite)
