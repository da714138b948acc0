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
