"""The labs' MNIST CNN (the slides' ``deepnn``) in its three forms: a kernel chain, a ``tf`` graph, int8.

conv 5x5x32 SAME + ReLU + maxpool 2 -> conv 5x5x64 SAME + ReLU + maxpool 2 ->
FC 3136 -> 1024 + ReLU -> dropout -> FC 1024 -> 10. Layout NHWC, weights HWIO.
The one idea: a network is a chain of the kernels' forward passes, and training
is the same chain backwards plus an optimiser step (Adam here).

The model comes in three forms with the same parameter names: a chain of kernel
calls (``mnist_cnn_forward`` / ``mnist_cnn_backward``, trained by ``train_mnist_cnn``),
a ``workshop_lib.tf`` graph (``deepnn``, ``TrainingGraph``, ``train_mnist_cnn_tf``),
and int8 (:class:`QuantizedCNN`, fused layer by layer on CPUs with VNNI), the model
that lab 01 quantizes. ``workshop train mnist`` writes the weights plus metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import __version__, kernels
from . import _validate as check

__all__ = ["QuantizedCNN", "deepnn", "TrainingGraph", "train_mnist_cnn_tf", "init_mnist_cnn", "mnist_cnn_forward", "mnist_cnn_backward", "Adam", "train_mnist_cnn",
           "accuracy", "save_model", "load_model", "default_model_path", "images_to_input"]

SHAPES = {"conv1/w": (5, 5, 1, 32), "conv1/b": (32,), "conv2/w": (5, 5, 32, 64), "conv2/b": (64,),
          "fc1/w": (7 * 7 * 64, 1024), "fc1/b": (1024,), "fc2/w": (1024, 10), "fc2/b": (10,)}


def init_mnist_cnn(seed=0):
    """Weights from a truncated normal (stddev 0.1, cut at 2 stddev) and biases 0.1, as ``deepnn`` does."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        if name.endswith("/b"):
            params[name] = np.full(shape, 0.1, dtype=np.float32)
        else:
            params[name] = (0.1 * kernels.truncated_standard_normal(rng, shape)).astype(np.float32)
    return params


def images_to_input(images):
    """uint8 (N, 28, 28) -> float32 NHWC (N, 28, 28, 1) in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., None]


def mnist_cnn_forward(params, images, training=False, keep_prob=0.5, rng=None, return_taps=False):
    """Logits (N, 10) for uint8 images (N, 28, 28); returns (logits, caches) or, with ``return_taps``,
    (logits, {"a1", "a2", "a3": the ReLU outputs}) for calibration."""
    x = images_to_input(images)
    caches, taps = {}, {}
    for i, name in enumerate(("conv1", "conv2"), start=1):
        y, c_conv = kernels.conv2d_forward(x, params[f"{name}/w"], 1, "SAME")
        y, c_bias = kernels.bias_add_forward(y, params[f"{name}/b"])
        y, c_relu = kernels.relu_forward(y)
        taps[f"a{i}"] = y
        x, c_pool = kernels.maxpool_forward(y, 2, 2)
        caches[name] = (c_conv, c_bias, c_relu, c_pool)
    flat = x.reshape(len(x), -1)
    y, c_fc1 = kernels.gemm_forward(flat, params["fc1/w"])
    y, c_b1 = kernels.bias_add_forward(y, params["fc1/b"])
    y, c_r1 = kernels.relu_forward(y)
    taps["a3"] = y
    y, c_drop = kernels.dropout_forward(y, keep_prob, training=training, rng=rng)
    logits, c_fc2 = kernels.gemm_forward(y, params["fc2/w"])
    logits, c_b2 = kernels.bias_add_forward(logits, params["fc2/b"])
    caches.update(fc1=(c_fc1, c_b1, c_r1, x.shape), drop=c_drop, fc2=(c_fc2, c_b2))
    return (logits, taps) if return_taps else (logits, caches)


def mnist_cnn_backward(dlogits, caches):
    """Gradients of every parameter, as a dict with the parameters' names."""
    grads = {}
    c_fc2, c_b2 = caches["fc2"]
    d, grads["fc2/b"] = kernels.bias_add_backward(dlogits, c_b2)
    d, grads["fc2/w"] = kernels.gemm_backward(d, c_fc2)
    d = kernels.dropout_backward(d, caches["drop"])
    c_fc1, c_b1, c_r1, pooled_shape = caches["fc1"]
    d = kernels.relu_backward(d, c_r1)
    d, grads["fc1/b"] = kernels.bias_add_backward(d, c_b1)
    d, grads["fc1/w"] = kernels.gemm_backward(d, c_fc1)
    d = d.reshape(pooled_shape)
    for name in ("conv2", "conv1"):
        c_conv, c_bias, c_relu, c_pool = caches[name]
        d = kernels.maxpool_backward(d, c_pool)
        d = kernels.relu_backward(d, c_relu)
        d, grads[f"{name}/b"] = kernels.bias_add_backward(d, c_bias)
        d, grads[f"{name}/w"] = kernels.conv2d_backward(d, c_conv, need_dx=name != "conv1")
    return grads


class Adam:
    """Adam (Kingma & Ba) with TensorFlow's defaults: beta1 0.9, beta2 0.999, epsilon 1e-8."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        lr_t = kernels.adam_step_size(self.lr, self.beta1**self.t, self.beta2**self.t)
        for k, g in grads.items():
            kernels.adam_update(params[k], g, self.m[k], self.v[k], lr_t, self.beta1, self.beta2, self.eps)


def accuracy(params, images, labels, batch_size=500):
    """Top-1 accuracy of the float32 model."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits, _ = mnist_cnn_forward(params, images[i : i + batch_size])
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def _check_training(steps, batch_size, lr, keep_prob, n_examples):
    """Both trainers' arguments: a bad one raises here, before any work (steps=-5 gave a NaN loss)."""
    check.integer(steps, "steps", 1)
    check.integer(batch_size, "batch_size", 1, n_examples)
    check.real(lr, "lr", 0, low_open=True)
    check.real(keep_prob, "keep_prob", 0, 1, low_open=True)


def _minibatches(n_examples, batch_size, steps, rng, progress, desc):
    """(step, indices) for ``steps`` batches: reshuffled each epoch, seeded; a tqdm bar when ``progress``."""
    order, cursor = rng.permutation(n_examples), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    try:
        for step in range(1, steps + 1):
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(n_examples), 0
            yield step, order[cursor : cursor + batch_size], bar
            cursor += batch_size
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def train_mnist_cnn(steps=2000, batch_size=50, lr=1e-3, keep_prob=0.5, seed=0, data=None, progress=False,
                    eval_every=0):
    """Train deterministically (seeded init, data order and dropout). Returns (params, history).

    ``history`` has the loss of every step and, every ``eval_every`` steps, the held-out accuracy.
    """
    if data is None:
        from .data import load_mnist

        data = load_mnist()
    (x_train, y_train), (x_test, y_test) = data
    _check_training(steps, batch_size, lr, keep_prob, len(x_train))
    params = init_mnist_cnn(seed)
    opt = Adam(params, lr)
    rng = np.random.default_rng(seed + 1)
    history = {"loss": [], "eval_step": [], "eval_accuracy": []}
    t0 = time.perf_counter()
    for step, idx, bar in _minibatches(len(x_train), batch_size, steps, rng, progress, "training"):
        logits, caches = mnist_cnn_forward(params, x_train[idx], training=True, keep_prob=keep_prob, rng=rng)
        loss, c_loss = kernels.softmax_xent_forward(logits, y_train[idx])
        grads = mnist_cnn_backward(kernels.softmax_xent_backward(1.0, c_loss), caches)
        opt.step(params, grads)
        history["loss"].append(float(loss))
        if eval_every and (step % eval_every == 0 or step == steps):
            history["eval_step"].append(step)
            history["eval_accuracy"].append(accuracy(params, x_test, y_test))
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}")
    history["seconds"] = time.perf_counter() - t0
    return params, history


def default_model_path():
    from .data import find_data_dir

    return find_data_dir() / "models" / "mnist_cnn.npz"


def save_model(path, params, metadata):
    """Write weights and JSON metadata to an .npz, no pickle, atomically: a crash leaves the old file or the new.

    The data goes to a temporary file beside ``path``, which is flushed to disk (fsync), renamed, and
    the folder flushed too (:func:`workshop_lib.data.atomic_write`).
    """
    from .data import atomic_write

    blob = np.array(json.dumps(metadata, sort_keys=True))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to a name without it
            np.savez_compressed(f, **params, metadata=blob)

    atomic_write(Path(path), write)


def load_model(path=None):
    """(params, metadata) from an .npz written by :func:`save_model` (the shipped model by default)."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model; create it with `workshop train mnist`")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in SHAPES if k not in f.files]
        if missing or "metadata" not in f.files:
            raise ValueError(f"{path}: not a model file of this course (missing {missing or ['metadata']})")
        params = {k: f[k] for k in SHAPES}
        metadata = json.loads(str(f["metadata"]))
    for k, shape in SHAPES.items():
        if params[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {params[k].shape}, expected {shape}")
    return params, metadata


def training_metadata(history, params, data, seed, steps, batch_size, lr):
    (_, _), (x_test, y_test) = data
    return {"accuracy": accuracy(params, x_test, y_test), "seed": seed, "steps": steps, "batch_size": batch_size,
            "learning_rate": lr, "final_loss": float(np.mean(history["loss"][-50:])),
            "train_seconds": round(history["seconds"], 1), "library_version": __version__,
            "data": "MNIST test set split 8000/2000 (workshop_lib.data.load_mnist)"}


# ----------------------------------------------------------------------------------------------
# The same CNN as a workshop_lib.tf graph (the slides' deepnn), with the same parameter names.


def deepnn(x, data_format="NHWC", tf=None):
    """Build the CNN on images ``x`` (N, 784) float32; returns (logits, keep_prob placeholder).

    Variables are named like :data:`SHAPES` ("conv1/w", ...), so :func:`export_params` gives a dict
    that :class:`QuantizedCNN` and :func:`mnist_cnn_forward` accept. ``tf`` is the module to build with:
    ``workshop_lib.tf`` by default, or ``tensorflow.compat.v1``, where the same code runs unchanged.
    """
    if tf is None:
        import workshop_lib.tf as tf

    nhwc = data_format == "NHWC"
    stride = [1, 1, 1, 1]
    pool = [1, 2, 2, 1] if nhwc else [1, 1, 2, 2]
    with tf.name_scope("reshape"):
        h = tf.reshape(x, [-1, 28, 28, 1] if nhwc else [-1, 1, 28, 28])
    for name, (r, s, c, k) in (("conv1", SHAPES["conv1/w"]), ("conv2", SHAPES["conv2/w"])):
        with tf.name_scope(name):
            w = tf.Variable(tf.truncated_normal([r, s, c, k], stddev=0.1), name="w")
            b = tf.Variable(tf.constant(0.1, shape=[k]), name="b")
            h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, w, stride, "SAME", data_format=data_format), b,
                                          data_format=data_format))
        h = tf.nn.max_pool(h, pool, pool, "SAME", data_format=data_format)
    if not nhwc:  # flatten in NHWC order so the weights mean the same in both layouts
        h = tf.transpose(h, [0, 2, 3, 1])
    with tf.name_scope("fc1"):
        w = tf.Variable(tf.truncated_normal(list(SHAPES["fc1/w"]), stddev=0.1), name="w")
        b = tf.Variable(tf.constant(0.1, shape=[1024]), name="b")
        h = tf.nn.relu(tf.nn.bias_add(tf.matmul(tf.reshape(h, [-1, 7 * 7 * 64]), w), b))
    with tf.name_scope("dropout"):
        keep_prob = tf.placeholder(tf.float32, [], name="keep_prob")
        h = tf.nn.dropout(h, keep_prob)
    with tf.name_scope("fc2"):
        w = tf.Variable(tf.truncated_normal(list(SHAPES["fc2/w"]), stddev=0.1), name="w")
        b = tf.Variable(tf.constant(0.1, shape=[10]), name="b")
        logits = tf.nn.bias_add(tf.matmul(h, w), b)
    return logits, keep_prob


class TrainingGraph:
    """The graph of one training setup: placeholders, loss, train op and accuracy, in a graph of its own."""

    def __init__(self, learning_rate=1e-3, seed=0, data_format="NHWC", tf=None):
        if tf is None:  # or tensorflow.compat.v1: the same graph in TensorFlow (benchmarks compare the two)
            import workshop_lib.tf as tf

        self._tf = tf
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.set_random_seed(seed)
            self.x = tf.placeholder(tf.float32, [None, 784], name="x")
            self.y = tf.placeholder(tf.int64, [None], name="y")
            self.logits, self.keep_prob = deepnn(self.x, data_format, tf)
            self.loss = tf.losses.sparse_softmax_cross_entropy(labels=self.y, logits=self.logits)
            self.global_step = tf.train.get_or_create_global_step()
            self.train_op = tf.train.AdamOptimizer(learning_rate).minimize(self.loss, global_step=self.global_step)
            correct = tf.equal(tf.argmax(self.logits, 1), self.y)
            self.accuracy = tf.reduce_mean(tf.cast(correct, tf.float32))
            self.init = tf.global_variables_initializer()
            self.params = {v.op.name: v for v in tf.trainable_variables()}

    def session(self, config=None):
        sess = self._tf.Session(graph=self.graph, config=config)
        sess.run(self.init)
        return sess

    def feed(self, images, labels=None, keep_prob=1.0):
        feed = {self.x: np.asarray(images, dtype=np.float32).reshape(len(images), 784) / 255.0,
                self.keep_prob: keep_prob}
        if labels is not None:
            feed[self.y] = labels
        return feed

    def evaluate(self, sess, images, labels, batch_size=500):
        correct = 0.0
        for i in range(0, len(images), batch_size):
            part = slice(i, i + batch_size)
            correct += sess.run(self.accuracy, self.feed(images[part], labels[part])) * len(images[part])
        return correct / len(images)

    def export_params(self, sess):
        """The trained weights as a dict of float32 arrays named like :data:`SHAPES`."""
        return {name: np.asarray(sess.run(var), dtype=np.float32) for name, var in self.params.items()}


def train_mnist_cnn_tf(steps=1000, batch_size=50, lr=1e-3, keep_prob=0.5, seed=0, data=None, config=None,
                       progress=False, eval_every=0, data_format="NHWC"):
    """Train the CNN with the graph engine (Adam); returns (params, history) like :func:`train_mnist_cnn`."""
    if data is None:
        from .data import load_mnist

        data = load_mnist()
    (x_train, y_train), (x_test, y_test) = data
    _check_training(steps, batch_size, lr, keep_prob, len(x_train))
    model = TrainingGraph(lr, seed, data_format)
    history = {"loss": [], "eval_step": [], "eval_accuracy": []}
    rng = np.random.default_rng(seed + 1)
    with model.session(config) as sess:
        t0 = time.perf_counter()
        for step, idx, bar in _minibatches(len(x_train), batch_size, steps, rng, progress,
                                           "training (workshop_lib.tf)"):
            _, loss = sess.run([model.train_op, model.loss], model.feed(x_train[idx], y_train[idx], keep_prob))
            history["loss"].append(float(loss))
            if eval_every and (step % eval_every == 0 or step == steps):
                history["eval_step"].append(step)
                history["eval_accuracy"].append(model.evaluate(sess, x_test, y_test))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}")
        history["seconds"] = time.perf_counter() - t0
        params = model.export_params(sess)
    return params, history


# ----------------------------------------------------------------------------------------------
# The same CNN in int8 (the model that lab 01 quantizes)


class QuantizedCNN:
    """int8 inference of the CNN: u8 activations, s8 per-channel weights, s32 accumulation; float32 logits.

    Calibrated on ``calibration_images`` (``method``: see :class:`workshop_lib.quantization.Calibrator`;
    the default, the 99.99th percentile of |x|, keeps this model's top-1 on the 2,000 held-out images
    equal to fp32's with 500 calibration images, where entropy's clip costs 0.25 points).
    ``path`` chooses how it runs; every path gives the same bits:

    - ``"fast"`` (what ``"auto"`` picks on a CPU with VNNI): the fused pipeline. Each layer is one
      pass (:func:`workshop_lib.int8.conv2d_u8s8u8_fused` and friends): conv + bias + ReLU +
      requantize + max-pool on ``vpdpbusd`` accumulators held in registers; u8 NHWC activations
      from the first layer to the last (conv1 writes the zero border that conv2 reads); only the
      logits leave int8.
    - ``"portable"`` and ``"reference"``: the specification, one primitive per pass: the s32
      convolution (im2col + :func:`workshop_lib.int8.gemm_u8s8s32` on that path),
      :func:`workshop_lib.quantization.requantize` with the bias and ReLU, then max-pooling on u8
      (exact: max commutes with a monotonic quantization).
    """

    STAGES = ("conv1", "conv2", "fc1", "logits")

    def __init__(self, params, calibration_images, method="percentile", path="auto"):
        from . import int8
        from .quantization import Calibrator, QuantParams, choose_qparams, qrange, quantize

        if path not in int8.PATHS:
            raise ValueError(f"path={path!r} must be one of {int8.PATHS}")
        isa = int8.fused_isa()  # the fused layers are x86 VNNI; elsewhere the int8 GEMMs take their own path
        if path == "fast" and isa is None:
            raise RuntimeError("path='fast' needs avx512_vnni or avx_vnni, which this CPU lacks; use 'portable'")
        self.path = path
        self.fused = path in ("auto", "fast") and isa is not None
        self.in_qp = QuantParams(np.float64(1 / 255), np.int32(0), np.dtype(np.uint8))  # raw pixels are u8 already
        _, taps = mnist_cnn_forward(params, calibration_images, training=False, return_taps=True)
        self.act_qp = {name: Calibrator(method).update(taps[name]).qparams(np.uint8) for name in ("a1", "a2", "a3")}
        self.layers = {}
        in_qp = self.in_qp
        for name, act in (("conv1", "a1"), ("conv2", "a2"), ("fc1", "a3"), ("fc2", None)):
            w, b = params[f"{name}/w"], params[f"{name}/b"]
            w2d = w.reshape(-1, w.shape[-1])
            wq = choose_qparams(w2d.min(0), w2d.max(0), np.int8, symmetric=True, axis=-1)
            w_s8 = quantize(w2d, wq).reshape(w.shape)
            acc_scale = in_qp.scale * wq.scale  # per output channel
            out = self.act_qp.get(act)
            layer = dict(w=w_s8, acc_scale=acc_scale, out=out, pad_value=int(in_qp.zero_point),
                         bias=np.clip(np.rint(b / acc_scale), *qrange(np.int32)).astype(np.int32))
            if out is not None:  # requantize's multiplier, computed as it computes it
                layer["multiplier"] = np.broadcast_to(np.asarray(acc_scale, dtype=np.float64) / out.scale,
                                                      (w.shape[-1],)).copy()
                in_qp = out
            if self.fused:
                layer["packed"] = int8.pack_fused_weights(w_s8, isa)
            self.layers[name] = layer

    def _check_images(self, images_u8):
        x = np.asarray(images_u8)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise TypeError(f"images must be uint8 (N, 28, 28); got dtype={x.dtype}, shape={x.shape}")
        return x

    def _fused_stages(self, x):
        from . import int8

        conv1, conv2, fc1, fc2 = (self.layers[n] for n in ("conv1", "conv2", "fc1", "fc2"))
        border = (conv2["w"].shape[0] - 1) // 2  # conv1 writes the SAME padding that conv2 reads
        a1 = int8.conv2d_u8s8u8_fused(x[..., None], conv1["packed"], conv1["bias"], conv1["multiplier"],
                                      int(conv1["out"].zero_point), relu=True, pool=2, padding="SAME",
                                      pad_value=conv1["pad_value"], out_pad=border)
        a2 = int8.conv2d_u8s8u8_fused(a1, conv2["packed"], conv2["bias"], conv2["multiplier"],
                                      int(conv2["out"].zero_point), relu=True, pool=2, padding="VALID")
        a3 = int8.gemm_u8s8u8_fused(a2.reshape(len(a2), -1), fc1["packed"], fc1["bias"], fc1["multiplier"],
                                    int(fc1["out"].zero_point), relu=True)
        logits = int8.gemm_u8s8f32_fused(a3, fc2["packed"], fc2["bias"], fc2["acc_scale"])
        return {"conv1": a1[:, border:-border or None, border:-border or None], "conv2": a2, "fc1": a3,
                "logits": logits}

    def _reference_stages(self, x):
        from . import int8
        from .quantization import requantize

        gemm_path = self.path if self.path in ("reference", "amx") else "portable"  # amx: tdpbusd, one stage a pass
        stages, a = {}, x[..., None]
        for name in ("conv1", "conv2"):
            layer = self.layers[name]
            acc = int8.conv2d_u8s8s32(a, layer["w"], 1, "SAME", pad_value=layer["pad_value"], path=gemm_path)
            a = requantize(acc, layer["acc_scale"], layer["out"], layer["bias"], relu=True)
            a = stages[name] = kernels.maxpool_forward(a, 2, 2)[0]
        fc1, fc2 = self.layers["fc1"], self.layers["fc2"]
        acc = int8.gemm_u8s8s32(a.reshape(len(a), -1), fc1["w"], path=gemm_path)
        a = stages["fc1"] = requantize(acc, fc1["acc_scale"], fc1["out"], fc1["bias"], relu=True)
        acc = int8.gemm_u8s8s32(a, fc2["w"], path=gemm_path).astype(np.int64) + fc2["bias"]
        stages["logits"] = (acc * fc2["acc_scale"]).astype(np.float32)
        return stages

    def stages(self, images_u8):
        """Every layer's output for uint8 images (N, 28, 28): u8 ``"conv1"`` (N, 14, 14, 32) and ``"conv2"``
        (N, 7, 7, 64) after pooling, u8 ``"fc1"`` (N, 1024), float32 ``"logits"`` (N, 10)."""
        x = self._check_images(images_u8)
        return self._fused_stages(x) if self.fused else self._reference_stages(x)

    def logits(self, images_u8):
        """float32 logits (N, 10) for uint8 images (N, 28, 28)."""
        return self.stages(images_u8)["logits"]

    def weight_bytes(self):
        """Bytes of each layer's parameters, float32 vs int8: ``{layer: {"fp32": n, "int8": n}}``.

        fp32: float32 weights and biases. int8: s8 weights, s32 biases and one float32 scale per
        output channel (what an int8 model file holds). The weights dominate, so about 4x smaller.
        """
        sizes = {}
        for name, layer in self.layers.items():
            w, k = layer["w"], layer["w"].shape[-1]
            sizes[name] = {"fp32": 4 * (w.size + k), "int8": w.size + 4 * k + 4 * k}
        return sizes

    def predict(self, images_u8, batch_size=256):
        """Predicted classes (N,), in batches of ``batch_size``."""
        x = self._check_images(images_u8)
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        return np.concatenate([self.logits(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
