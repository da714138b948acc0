"""workshop_lib.models: the CNN's wiring (gradients), deterministic training that learns, and model files."""

import json

import numpy as np
import pytest

from workshop_lib import kernels, models
from workshop_lib.data import load_mnist


@pytest.fixture(scope="module")
def data():
    return load_mnist()


def test_model_gradients_match_central_differences(data):
    (x_train, y_train), _ = data
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) for k, v in models.init_mnist_cnn(1).items()}
    images, labels = x_train[:2], y_train[:2]

    def loss():
        logits, _ = models.mnist_cnn_forward(params, images)
        return kernels.softmax_xent_forward(logits, labels)[0]

    logits, caches = models.mnist_cnn_forward(params, images)
    _, c_loss = kernels.softmax_xent_forward(logits, labels)
    grads = models.mnist_cnn_backward(kernels.softmax_xent_backward(1.0, c_loss), caches)
    for name in models.SHAPES:
        flat = params[name].reshape(-1)
        candidates = np.flatnonzero(np.abs(grads[name].reshape(-1)) > 1e-6)
        for i in rng.choice(candidates, size=min(4, len(candidates)), replace=False):
            old = flat[i]
            flat[i] = old + 1e-6
            up = loss()
            flat[i] = old - 1e-6
            down = loss()
            flat[i] = old
            numeric = (up - down) / 2e-6
            assert abs(grads[name].reshape(-1)[i] - numeric) <= 1e-4 * max(abs(numeric), 1e-3), name


def test_training_briefly_lowers_the_loss_and_is_deterministic(data):
    params, history = models.train_mnist_cnn(steps=40, seed=3, data=data)
    loss = np.array(history["loss"])
    assert loss[-10:].mean() < 0.5 * loss[:10].mean()
    again, _ = models.train_mnist_cnn(steps=3, seed=3, data=data)
    once_more, _ = models.train_mnist_cnn(steps=3, seed=3, data=data)
    for k in again:
        np.testing.assert_array_equal(again[k], once_more[k])


def test_save_and_load_round_trip_atomically(tmp_path):
    params = models.init_mnist_cnn(0)
    path = tmp_path / "m.npz"
    models.save_model(path, params, {"accuracy": 0.5, "seed": 0})
    loaded, meta = models.load_model(path)
    assert meta == {"accuracy": 0.5, "seed": 0}
    for k in params:
        np.testing.assert_array_equal(loaded[k], params[k])
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no trained model; create it with `workshop train mnist`"):
        models.load_model(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a model file"):
        models.load_model(tmp_path / "other.npz")


def test_shipped_model_is_what_its_metadata_says(data):
    params, meta = models.load_model()
    assert {"accuracy", "seed", "steps", "library_version"} <= set(meta)
    (_, _), (x_test, y_test) = data
    assert models.accuracy(params, x_test, y_test) == pytest.approx(meta["accuracy"], abs=1e-9)
    assert meta["accuracy"] >= 0.98
    json.dumps(meta)


def test_save_model_flushes_the_file_and_its_folder_to_disk_and_takes_any_name(tmp_path, monkeypatch):
    import os

    from workshop_lib.data import is_temporary

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name what fsync flushed")
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    params = models.init_mnist_cnn(0)
    models.save_model(tmp_path / "weights", params, {"seed": 0})  # no .npz: numpy must not append one
    assert len(synced) == 2 and is_temporary(synced[0]) and synced[1] == str(tmp_path), synced
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
    loaded, meta = models.load_model(tmp_path / "weights")
    assert meta == {"seed": 0}
    np.testing.assert_array_equal(loaded["fc2/w"], params["fc2/w"])


@pytest.fixture
def data_copy(tmp_path, monkeypatch, root):
    """A data folder whose shipped model may be replaced: WORKSHOP_DATA points at it; the cwd is empty."""
    import shutil

    copy = tmp_path / "data"
    (copy / "models").mkdir(parents=True)
    (copy / "mnist").symlink_to(root / "data" / "mnist")
    shutil.copy(root / "data" / "models" / "mnist_cnn.npz", copy / "models" / "mnist_cnn.npz")
    monkeypatch.setenv("WORKSHOP_DATA", str(copy))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return copy


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-5"], "argument --steps: expected a positive integer, got -5"),
    (["--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--lr", "-0.1"], "argument --lr: expected a positive number, got -0.1"),
    (["--lr", "inf"], "argument --lr: expected a positive number, got inf"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
])
def test_train_rejects_bad_arguments_naming_them(data_copy, capsys, argv, message):
    from workshop_lib import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["train", "mnist", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_train_never_replaces_the_shipped_model_unless_asked(data_copy, capsys):
    import hashlib

    from workshop_lib import cli

    shipped = data_copy / "models" / "mnist_cnn.npz"

    def digest():
        return hashlib.sha256(shipped.read_bytes()).hexdigest()

    before = digest()
    assert cli.main(["train", "mnist", "--steps", "1", "--batch-size", "9000", "--quiet"]) == 2
    assert "--batch-size 9000 is larger than the 8000 training images" in capsys.readouterr().err
    assert cli.main(["train", "mnist", "--steps", "1", "--out", str(shipped), "--quiet"]) == 2
    assert "is the shipped model that lab 01 uses; pass --overwrite-shipped" in capsys.readouterr().err
    assert cli.main(["train", "mnist", "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    assert "wrote mnist_cnn.npz" in capsys.readouterr().out and digest() == before
    _, meta = models.load_model("mnist_cnn.npz")
    assert meta["steps"] == 2 and meta["batch_size"] == 8
    assert cli.main(["train", "mnist", "--steps", "2", "--batch-size", "8", "--quiet", "--overwrite-shipped"]) == 0
    assert digest() != before and models.load_model(shipped)[1]["steps"] == 2
