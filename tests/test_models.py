"""workshop_lib.models: the CNN's wiring (gradients), training that learns, model files, and the int8 CNN."""

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


def test_train_checks_its_output_before_training(data_copy, capsys, monkeypatch):
    from workshop_lib import cli, models as m

    monkeypatch.setattr(m, "train_mnist_cnn", lambda *a, **k: pytest.fail("trained before checking --out"))
    for out, message in (("/proc/x.npz", "--out='/proc/x.npz': cannot write in the folder /proc"),
                         ("model.pkl", "the extension '.pkl' is not one this output can have")):
        assert cli.main(["train", "mnist", "--steps", "1", "--out", out, "--quiet"]) == 2
        assert message in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------
# The CNN in int8


@pytest.fixture(scope="module")
def trained(data):
    params, _ = models.load_model()
    return params, data


@pytest.fixture(scope="module")
def int8_models(trained):
    from workshop_lib import int8

    params, ((x_train, _), _) = trained
    paths = ["reference", "portable"] + (["fast"] if int8.vnni_isa() else [])
    return {path: models.QuantizedCNN(params, x_train[:500], path=path) for path in paths}


def test_int8_cnn_is_within_0_3_points_of_float32(trained, int8_models):
    params, (_, (x_test, y_test)) = trained
    fp32 = models.accuracy(params, x_test, y_test)
    qmodel = int8_models["fast" if "fast" in int8_models else "portable"]
    int8_acc = (qmodel.predict(x_test) == y_test).mean()
    assert fp32 > 0.97
    assert abs(int8_acc - fp32) <= 0.003, (fp32, int8_acc)


def _edge_images(x_test):
    rng = np.random.default_rng(5)
    return np.concatenate([x_test[:12], np.zeros((2, 28, 28), np.uint8), np.full((2, 28, 28), 255, np.uint8),
                           rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)])


def test_every_layer_is_bit_identical_on_every_int8_path(trained, int8_models):
    _, (_, (x_test, _)) = trained
    images = _edge_images(x_test)
    stages = {path: model.stages(images) for path, model in int8_models.items()}
    expected = stages["reference"]
    assert [s.dtype for s in expected.values()] == [np.uint8] * 3 + [np.float32]
    assert {k: v.shape for k, v in expected.items()} == {"conv1": (20, 14, 14, 32), "conv2": (20, 7, 7, 64),
                                                         "fc1": (20, 1024), "logits": (20, 10)}
    assert expected["conv2"].max() == 255 or expected["fc1"].max() == 255  # noise and white images saturate
    for path, got in stages.items():
        for name in models.QuantizedCNN.STAGES:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{path}: {name}")


def test_fused_int8_cnn_matches_the_portable_path_on_a_full_batch(trained, int8_models):
    if "fast" not in int8_models:
        pytest.skip("this CPU has no VNNI: the fused pipeline does not run")
    _, (_, (x_test, _)) = trained
    assert int8_models["fast"].fused
    for name, got in int8_models["fast"].stages(x_test[:256]).items():
        np.testing.assert_array_equal(got, int8_models["portable"].stages(x_test[:256])[name], err_msg=name)


def test_int8_cnn_rejects_bad_input(trained, int8_models):
    params, ((x_train, _), _) = trained
    qmodel = int8_models["portable"]
    with pytest.raises(TypeError, match=r"images must be uint8 \(N, 28, 28\); got dtype=float32"):
        qmodel.logits(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        qmodel.predict(x_train[:4], batch_size=0)
    with pytest.raises(ValueError, match="path='avx' must be one of"):
        models.QuantizedCNN(params, x_train[:10], path="avx")


def test_quantization_holds_primitives_only():
    import subprocess
    import sys

    code = ("import sys, workshop_lib.quantization as q; assert not hasattr(q, 'QuantizedCNN'); "
            "assert 'workshop_lib.models' not in sys.modules, 'quantization imported models'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert "QuantizedCNN" in models.__all__


def test_int8_weights_are_about_four_times_smaller(int8_models):
    sizes = int8_models["portable"].weight_bytes()
    assert list(sizes) == ["conv1", "conv2", "fc1", "fc2"]
    assert sizes["fc1"] == {"fp32": 4 * (3136 * 1024 + 1024), "int8": 3136 * 1024 + 8 * 1024}
    fp32, int8_bytes = (sum(s[kind] for s in sizes.values()) for kind in ("fp32", "int8"))
    assert fp32 == 4 * sum(int(np.prod(shape)) for shape in models.SHAPES.values())
    assert 3.9 < fp32 / int8_bytes < 4.0


@pytest.mark.parametrize("train", [models.train_mnist_cnn, models.train_mnist_cnn_tf])
@pytest.mark.parametrize("kwargs, error, rule", [
    (dict(steps=-5), ValueError, "steps=-5 must be >= 1"),
    (dict(steps=2.5), TypeError, "steps=2.5 must be an integer"),
    (dict(batch_size=0), ValueError, r"batch_size=0 must be in \[1, 8000\]"),
    (dict(batch_size=9000), ValueError, r"batch_size=9000 must be in \[1, 8000\]"),
    (dict(lr=0.0), ValueError, "lr=0.0 must be in"),
    (dict(keep_prob=float("nan")), ValueError, "keep_prob=nan must be finite"),
])
def test_the_trainers_refuse_bad_arguments_before_any_work(train, kwargs, error, rule):
    """steps=-5 used to train nothing and return a NaN loss."""
    from workshop_lib.data import load_mnist

    with pytest.raises(error, match=rule):
        train(**{"steps": 1, **kwargs}, data=load_mnist())


def test_the_training_graph_is_the_same_in_tensorflow_compat_v1(data):
    """The benchmarks' TensorFlow peer: TrainingGraph built with tf.compat.v1, given our weights, gives our logits."""
    tensorflow = pytest.importorskip("tensorflow")
    tf1 = tensorflow.compat.v1
    (images, _), _ = data
    ours = models.TrainingGraph(seed=0)
    with ours.session() as sess:
        params = ours.export_params(sess)
        logits = sess.run(ours.logits, ours.feed(images[:16]))
    theirs = models.TrainingGraph(seed=0, tf=tf1)
    assert set(theirs.params) == set(params) == set(models.SHAPES)
    with theirs.session(tf1.ConfigProto(intra_op_parallelism_threads=1)) as sess:
        for name, var in theirs.params.items():
            var.load(params[name], sess)
        np.testing.assert_allclose(sess.run(theirs.logits, theirs.feed(images[:16])), logits, rtol=1e-4, atol=1e-4)
