"""tf.train.Saver's files: killed saves leave a restorable checkpoint, names agree, broken files are named."""

import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import workshop_lib.tf as tf
from conftest import ROOT
from workshop_lib.data import is_temporary

LOOP = ROOT / "tests" / "tf_programs" / "save_in_a_loop.py"
KILLS = 30

pytestmark = pytest.mark.usefixtures("fresh_graph")  # every test starts from an empty default graph


def _temporaries(directory):
    return sorted(p.name for p in Path(directory).iterdir() if is_temporary(p))


def _checkpoint_step(prefix):
    """The step of a checkpoint, after checking that every counter element agrees with it."""
    with np.load(prefix + ".npz", allow_pickle=False) as f:
        step, counter = int(f["global_step"]), f["counter"]
    assert prefix.endswith(f"model.ckpt-{step}"), (prefix, step)
    np.testing.assert_array_equal(counter, np.full(counter.shape, step, np.float32))
    return step


@pytest.mark.timeout(600)
def test_checkpoints_survive_sigkill_at_random_moments_and_resume_where_they_were(tmp_path):
    """A process saving every step with max_to_keep=1 is killed 30 times; each restart resumes the last save."""
    rng = random.Random(11)
    directory = tmp_path / "ckpt"
    resumed_at, temporaries_seen = 0, 0
    for kill in range(KILLS):
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen([sys.executable, str(LOOP), str(directory)], stdout=subprocess.PIPE, stderr=err,
                                    text=True, cwd=ROOT)
            try:
                line = proc.stdout.readline()
                # never silently back at step 0: the restart continues from the checkpoint the last kill left
                assert line.split() == ["start", str(resumed_at)], (kill, line, (tmp_path / "stderr.txt").read_text())
                time.sleep(rng.uniform(0.05, 0.4))
            finally:
                proc.kill()
                proc.wait()
        latest = tf.train.latest_checkpoint(str(directory))
        assert latest is not None, (kill, sorted(os.listdir(directory)))
        step = _checkpoint_step(latest)
        assert step >= resumed_at
        with tf.Graph().as_default():  # and the Saver restores it
            counter = tf.Variable(np.zeros(100_000, np.float32), name="counter")
            tf.train.get_or_create_global_step()
            with tf.Session() as sess:
                tf.train.Saver().restore(sess, latest)
                assert sess.run(counter)[0] == step
        temporaries_seen += len(_temporaries(directory))
        resumed_at = step
    assert resumed_at > KILLS  # the runs made progress across the kills
    print(f"{KILLS} kills: resumed up to step {resumed_at}; {temporaries_seen} temporaries seen after kills")

    # the next save removes what the killed saves left: temporaries, and checkpoints beyond max_to_keep=1
    tf.reset_default_graph()
    step = tf.train.get_or_create_global_step()
    counter = tf.Variable(np.zeros(100_000, np.float32), name="counter")
    train = tf.group(tf.assign_add(counter, np.ones(100_000, np.float32)), tf.assign_add(step, np.int64(1)))
    hooks = [tf.train.CheckpointSaverHook(str(directory), save_steps=1, saver=tf.train.Saver(max_to_keep=1))]
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(directory), hooks=hooks,
                                           save_checkpoint_secs=None) as sess:
        sess.run(train)
    assert sorted(os.listdir(directory)) == ["checkpoint", f"model.ckpt-{resumed_at + 1}.npz"]


def _counter_graph(size=4):
    step = tf.train.get_or_create_global_step()
    counter = tf.Variable(np.zeros(size, np.float32), name="counter")
    train = tf.group(tf.assign_add(counter, np.ones(size, np.float32)), tf.assign_add(step, np.int64(1)))
    return step, counter, train


def _save_steps(directory, steps, max_to_keep=5):
    """Save checkpoints after each of ``steps`` training steps; returns their prefixes."""
    step, counter, train = _counter_graph()
    saver = tf.train.Saver(max_to_keep=max_to_keep)
    prefixes = []
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for _ in range(steps):
            sess.run(train)
            prefixes.append(saver.save(sess, str(Path(directory) / "model.ckpt"), global_step=step))
    return prefixes


def test_the_index_names_the_new_checkpoint_before_any_old_one_is_deleted(tmp_path, monkeypatch):
    _save_steps(tmp_path, 1, max_to_keep=1)
    deletions = []
    unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):
        deletions.append((os.path.basename(path), (tmp_path / "checkpoint").read_text()))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    tf.reset_default_graph()
    step, _, train = _counter_graph()
    saver = tf.train.Saver(max_to_keep=1)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        sess.run(train)
        sess.run(train)
        saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    assert deletions == [("model.ckpt-1.npz", 'model_checkpoint_path: "model.ckpt-2"\n'
                                              'all_model_checkpoint_paths: "model.ckpt-2"\n')]


def test_latest_checkpoint_falls_back_to_the_newest_complete_checkpoint_with_a_warning(tmp_path, capsys):
    prefixes = _save_steps(tmp_path, 3)
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[2] and capsys.readouterr().err == ""
    # the newest, named by the index, is truncated (a partial copy): the one before it is used, with a warning
    newest = Path(prefixes[2] + ".npz")
    newest.write_bytes(newest.read_bytes()[:200])
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[1]
    err = capsys.readouterr().err
    assert f"the index names {newest}, which is incomplete; using the newest complete checkpoint on disk, " \
           f"{prefixes[1]}" in err, err
    newest.unlink()
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[1]
    assert "which is missing" in capsys.readouterr().err
    # no index at all (deleted, or a kill before the first index was written): the newest file on disk
    (tmp_path / "checkpoint").unlink()
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[1]
    assert "checkpoint is missing or names no checkpoint" in capsys.readouterr().err
    assert tf.train.latest_checkpoint(str(tmp_path / "nothing_here")) is None


def test_a_resume_from_checkpoints_it_cannot_use_raises_instead_of_restarting_at_step_0(tmp_path):
    prefixes = _save_steps(tmp_path, 2)
    for prefix in prefixes:
        os.unlink(prefix + ".npz")  # the index remains, naming deleted files
    tf.reset_default_graph()
    _counter_graph()
    with pytest.raises(ValueError, match=r"holds \['checkpoint'\] but no complete checkpoint to resume from; "
                                         r"training would restart at step 0"):
        tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path))
    (tmp_path / "model.ckpt-2.npz").write_bytes(b"PK\x03\x04 a truncated archive")
    with pytest.raises(ValueError, match=r"holds \['checkpoint', 'model.ckpt-2.npz'\]"):
        tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path))
    # an empty or absent folder is a fresh start
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path / "fresh")) as sess:
        assert sess.run(tf.train.get_global_step()) == 0


def test_the_next_save_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f"model.ckpt-3.npz.tmp{dead_pid}-abc_1234.npz", f"checkpoint.tmp{dead_pid}-zz9"]
        live = f"model.ckpt-4.npz.tmp{alive.pid}-q1w2e3r4.npz"
        other = f"results.json.tmp{dead_pid}-a1b2c3d4.json"  # not the Saver's: left alone
        for name in [*stale, live, other]:
            (tmp_path / name).write_bytes(b"partial")
        _save_steps(tmp_path, 1)
        assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint", "model.ckpt-1.npz", live, other])
    finally:
        alive.kill()
        alive.wait()


def test_save_restore_and_latest_checkpoint_agree_on_names(tmp_path):
    v = tf.Variable(np.arange(3.0), name="v")
    saver = tf.train.Saver()
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for save_path, step, prefix in (("x.npz", None, "x"), ("x.npz", 3, "x-3"), ("model.ckpt", 5, "model.ckpt-5")):
            got = saver.save(sess, str(tmp_path / save_path), global_step=step)
            assert got == str(tmp_path / prefix) and (tmp_path / (prefix + ".npz")).is_file()
            assert tf.train.latest_checkpoint(str(tmp_path)) == got
            for restore_path in (got, got + ".npz"):
                v.load(np.zeros(3), sess)
                saver.restore(sess, restore_path)
                np.testing.assert_array_equal(sess.run(v), np.arange(3.0))
        assert not (tmp_path / "x.npz.npz").exists()
        with pytest.raises(ValueError, match="is a folder; pass a checkpoint in it, e.g. tf.train.latest_checkpoint"):
            saver.restore(sess, str(tmp_path))
    with pytest.raises(ValueError, match="max_to_keep=-1 must be a non-negative integer"):
        tf.train.Saver(max_to_keep=-1)


def test_restoring_a_file_that_is_not_a_whole_checkpoint_names_it(tmp_path):
    v = tf.Variable(np.arange(3.0), name="v")
    saver = tf.train.Saver()
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        good = Path(saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1) + ".npz")
        data = good.read_bytes()
        (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"v": np.arange(3.0)}))
        with open(tmp_path / "array.npz", "wb") as f:  # a plain .npy under a checkpoint's name
            np.save(f, np.arange(3.0))
        (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
        corrupt = bytearray(data)
        start = data.index(b"\x93NUMPY") + 128  # inside the stored array's bytes: the CRC check fails
        corrupt[start:start + 8] = b"\xff" * 8
        (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
        np.savez(tmp_path / "objects.npz", v=np.array([{"a": 1}], dtype=object))
        expected = {
            "pickled.npz": "not a complete checkpoint: expected an .npz \\(zip\\) archive",
            "array.npz": "not a complete checkpoint: expected an .npz \\(zip\\) archive",
            "truncated.npz": "found a truncated file or a file of another kind",
            "corrupt.npz": "corrupted checkpoint \\(BadZipFile: Bad CRC-32",
            "objects.npz": "not a checkpoint of tf.train.Saver, which holds numeric arrays only",
        }
        for name, message in expected.items():
            with pytest.raises(ValueError, match=message) as info:
                saver.restore(sess, str(tmp_path / name))
            assert str(tmp_path / name) in str(info.value) and "allow_pickle" not in str(info.value), name
        v.load(np.zeros(3), sess)  # a failed restore changed nothing
        with pytest.raises(KeyError, match=r"has no value for \['w'\]"):
            tf.Variable(np.zeros(2), name="w")
            tf.train.Saver().restore(sess, str(good))
        np.testing.assert_array_equal(sess.run(v), np.zeros(3))


def test_a_checkpoint_dir_given_as_dot_slash_keeps_the_checkpoint_just_written(tmp_path, monkeypatch):
    """The MNIST script's default ``./checkpoints``: ``./x`` and ``x`` name one folder, the new file stays."""
    monkeypatch.chdir(tmp_path)
    step, _, train = _counter_graph()
    saver = tf.train.Saver(max_to_keep=2)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for _ in range(4):
            sess.run(train)
            prefix = saver.save(sess, "./ckpt/model.ckpt", global_step=step)
            assert os.path.isfile(prefix + ".npz"), sorted(os.listdir("ckpt"))
    assert sorted(os.listdir("ckpt")) == ["checkpoint", "model.ckpt-3.npz", "model.ckpt-4.npz"]
    assert tf.train.latest_checkpoint("./ckpt") == "./ckpt/model.ckpt-4"


@pytest.mark.parametrize("index", [None, b"garbage without a single key\n", b"\xcd\xff\x00\x81binary",
                                   b'model_checkpoint_path: "model.ckpt-1"\n'])
def test_retention_is_decided_from_the_files_on_disk_whatever_the_index_says(tmp_path, index):
    """A missing, garbled, binary or stale index never makes a save delete checkpoints within max_to_keep."""
    _save_steps(tmp_path, 3, max_to_keep=5)
    if index is None:
        (tmp_path / "checkpoint").unlink()
    else:
        (tmp_path / "checkpoint").write_bytes(index)
    tf.reset_default_graph()
    step, _, train = _counter_graph()
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        tf.train.Saver().restore(sess, str(tmp_path / "model.ckpt-3"))
        saver = tf.train.Saver(max_to_keep=3)
        for _ in range(2):
            sess.run(train)
            saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "model.ckpt-3.npz", "model.ckpt-4.npz", "model.ckpt-5.npz"]
    assert (tmp_path / "checkpoint").read_text().count("all_model_checkpoint_paths") == 3


def test_an_index_naming_files_outside_its_folder_never_deletes_them(tmp_path):
    inside = tmp_path / "ckpt"
    _save_steps(inside, 1, max_to_keep=1)
    victim = tmp_path / "victim.npz"
    np.savez(victim, x=np.zeros(1))
    (inside / "checkpoint").write_text(f'model_checkpoint_path: "../victim"\nall_model_checkpoint_paths: "../victim"\n'
                                       f'all_model_checkpoint_paths: "{victim.with_suffix("")}"\n')
    tf.reset_default_graph()
    _save_steps(inside, 1, max_to_keep=1)
    assert victim.is_file()
    assert tf.train.latest_checkpoint(str(inside)) == str(inside / "model.ckpt-1")


def test_a_binary_index_falls_back_to_the_newest_complete_checkpoint_naming_the_file(tmp_path, capsys):
    prefixes = _save_steps(tmp_path, 2)
    (tmp_path / "checkpoint").write_bytes(b"\xcd\xff\x00\x81 not text")
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[1]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoint'} is not a readable checkpoint index (UnicodeDecodeError" in err, err
    tf.reset_default_graph()
    _counter_graph()
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path)) as sess:
        assert sess.run(tf.train.get_global_step()) == 2


def test_a_checkpoint_dir_that_is_a_file_is_named_before_training(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    _counter_graph()
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*ckpt': .*ckpt is a file, expected a folder"):
        tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path / "ckpt"), save_checkpoint_steps=1)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        with pytest.raises(ValueError, match=r"save_path='.*model.ckpt': .*ckpt is a file, expected a folder"):
            tf.train.Saver().save(sess, str(tmp_path / "ckpt" / "model.ckpt"), global_step=1)
