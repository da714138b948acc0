"""workshop_lib.tf: short seeded training runs give the losses recorded before the engine's refactor (issue 12).

The expected values were computed by the engine as it was before ``tf/passes.py``, ``tf/trace.py`` and the
public run context existed (commit ab4a376), so a refactor that changes the numerics in any way fails here.
They are compared to the last digit on the CPU they were recorded on. Elsewhere BLAS may sum in another
order (OpenBLAS picks its kernel by CPU), so there they are compared to 1e-4 relative, which a wrong
update (a lost step, a wrong gradient, a stale variable) still fails by far.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

import workshop_lib.tf as tf
from workshop_lib import jit_conv, models
from workshop_lib.data import load_mnist

STEPS, BATCH = 6, 16
RECORDED_ON = "AMD EPYC"  # the start of /proc/cpuinfo's "model name" where EXPECTED was computed


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


JIT_RTOL = 1e-5  # jit_conv's kernels sum R*S*C in another order than im2col + BLAS: 6e-7 seen after 6 steps


def _uses_jit_conv(kernels="optimized", data_format="NHWC"):
    """Whether the run's convolutions go through jit_conv's kernels (recorded before they existed).

    The forward and backward-data kernels take NHWC; the weight gradient takes either layout.
    """
    return kernels == "optimized" and jit_conv.simd_lanes() is not None


def _check(got, want, jit=False):
    got = [float(v) for v in got]
    if jit:
        np.testing.assert_allclose(got, want, rtol=JIT_RTOL)
    elif _cpu_model().startswith(RECORDED_ON):
        assert got == want, f"losses changed: got {got!r}, recorded {want!r}"
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.fixture(scope="module")
def batches():
    (x_train, y_train), _ = load_mnist()
    rng = np.random.default_rng(7)
    return [(x_train[idx], y_train[idx]) for idx in (rng.choice(len(x_train), BATCH, replace=False)
                                                      for _ in range(STEPS))]


CNN_RUNS = {
    "fusion": dict(fusion=True),
    "no_fusion": dict(fusion=False),
    "reference_kernels": dict(fusion=True, kernels="reference"),
    "inter_op_2": dict(fusion=True, inter=2),
    "nchw": dict(fusion=True, data_format="NCHW"),
}

# computed by this file's runs at commit ab4a376 (before the refactor), AMD EPYC (Zen 5), 2 threads
# except the runs trained with Adam, recomputed when (1) Adam's update moved to float32 arithmetic for float32
# variables, as TensorFlow's ApplyAdam computes (it ran in float64 by accident: a constant 1 - beta1 promoted
# it), and (2) with fusion on, the backward pass was fused (tf/passes.fuse_gradients), which sums the bias
# gradients in float64 in the pass that computes dx, where BiasAddGrad summed them in float32 with a BLAS GEMV.
# Both move the losses by about 1e-7 relative; the runs with other optimizers still give ab4a376's exactly,
# and test_fused_gradients_equal_the_unfused_ones_and_are_counted_in_session_stats checks that (2) changes
# nothing but the rounding of the biases' gradients.
EXPECTED = {
    "cnn_fusion": [
        7.594151496887207, 11.400596618652344, 13.384725570678711, 11.108842849731445, 8.049704551696777,
        4.7683210372924805, 3.7018730640411377,
    ],
    "cnn_no_fusion": [
        7.594151496887207, 11.400596618652344, 13.384725570678711, 11.108842849731445, 8.049704551696777,
        4.7683210372924805, 3.7018728256225586,
    ],
    "cnn_reference_kernels": [
        7.594151973724365, 11.400595664978027, 13.384729385375977, 11.108843803405762, 8.04970932006836,
        4.768324375152588, 3.7018704414367676,
    ],
    "cnn_inter_op_2": [
        7.594151496887207, 11.400596618652344, 13.384725570678711, 11.108842849731445, 8.049704551696777,
        4.7683210372924805, 3.7018730640411377,
    ],
    "cnn_nchw": [
        11.801692962646484, 7.632984161376953, 11.576252937316895, 9.438375473022461, 8.483668327331543,
        3.571669340133667, 1.4410805702209473,
    ],
    "cnn_blocked_inference": [
        6.711662769317627, 6.2992401123046875, 5.593318939208984, 6.42603063583374, 6.974432468414307,
        6.365268230438232,
    ],
    "optimizer_gd": [
        1.8510091304779053, 1.5828592777252197, 1.44631028175354, 1.0799140930175781, 1.1118415594100952,
        0.9651046991348267, 0.9779020547866821, 0.8846818804740906,
    ],
    "optimizer_momentum": [
        1.8510091304779053, 1.7653734683990479, 1.526977777481079, 1.1201295852661133, 1.112013339996338,
        0.7801831960678101, 0.8214905858039856, 0.7117983102798462,
    ],
    "optimizer_nesterov": [
        1.8510091304779053, 1.5997886657714844, 1.4028977155685425, 0.9498098492622375, 1.0362857580184937,
        0.7300059795379639, 0.8092982172966003, 0.6650707125663757,
    ],
    "optimizer_adam_lr_tensor": [
        1.8510091304779053, 1.8460842370986938, 1.6775529384613037, 1.5655156373977661, 1.4701400995254517,
        1.5224506855010986, 1.5905386209487915, 1.5206435918807983,
    ],
    "optimizer_adagrad": [
        1.8510091304779053, 0.8604303598403931, 1.0930694341659546, 0.6969415545463562, 0.6472037434577942,
        0.6077867746353149, 0.6381059288978577, 0.5955226421356201,
    ],
    "optimizer_rmsprop": [
        1.8510091304779053, 1.7577831745147705, 1.5482816696166992, 1.2064824104309082, 1.1686103343963623,
        0.9553864598274231, 0.9479734301567078, 0.8354953527450562,
    ],
}


@pytest.mark.parametrize("run", list(CNN_RUNS))
def test_the_labs_cnn_trains_to_the_recorded_losses(batches, run):
    opts = CNN_RUNS[run]
    model = models.TrainingGraph(learning_rate=1e-3, seed=11, data_format=opts.get("data_format", "NHWC"))
    config = tf.ConfigProto(inter_op_parallelism_threads=opts.get("inter", 0), graph_options=tf.GraphOptions(
        kernels=opts.get("kernels", "optimized"), fusion=opts["fusion"]))
    losses = []
    with model.session(config) as sess:
        for images, labels in batches:
            _, loss = sess.run([model.train_op, model.loss], model.feed(images, labels, keep_prob=0.5))
            losses.append(loss)
        losses.append(sess.run(model.loss, model.feed(*batches[0])))  # evaluation: no dropout, after training
    _check(losses, EXPECTED["cnn_" + run], _uses_jit_conv(opts.get("kernels", "optimized"),
                                                          opts.get("data_format", "NHWC")))


def test_blocked_layout_inference_gives_the_recorded_losses(batches):
    model = models.TrainingGraph(seed=11)
    config = tf.ConfigProto(graph_options=tf.GraphOptions(layout="blocked"))
    with model.session(config) as sess:
        losses = [sess.run(model.loss, model.feed(images, labels)) for images, labels in batches]
        assert sess.stats["reorders"] == 2 * STEPS and sess.stats["weight_reorders"] == STEPS
    _check(losses, EXPECTED["cnn_blocked_inference"], _uses_jit_conv())  # conv1 (C=1) is not blocked


OPTIMIZERS = {
    "gd": lambda: tf.train.GradientDescentOptimizer(0.1),
    "momentum": lambda: tf.train.MomentumOptimizer(0.05, 0.9),
    "nesterov": lambda: tf.train.MomentumOptimizer(0.05, 0.9, use_nesterov=True),
    "adam_lr_tensor": lambda: tf.train.AdamOptimizer(tf.constant(0.01)),
    "adagrad": lambda: tf.train.AdagradOptimizer(0.5),
    "rmsprop": lambda: tf.train.RMSPropOptimizer(0.05, momentum=0.5),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_gives_the_recorded_losses(name):
    tf.reset_default_graph()
    tf.set_random_seed(4)
    rng = np.random.default_rng(2)
    x = tf.placeholder(tf.float32, [None, 6])
    y = tf.placeholder(tf.int64, [None])
    w1 = tf.Variable(tf.truncated_normal([6, 8], stddev=0.5))
    b1 = tf.Variable(tf.zeros([8]))
    w2 = tf.Variable(tf.random_normal([8, 3], stddev=0.5))
    hidden = tf.nn.dropout(tf.nn.elu(tf.matmul(x, w1) + b1), keep_prob=0.75)
    logits = tf.nn.tanh(tf.matmul(hidden, w2)) * 3.0
    loss = tf.losses.sparse_softmax_cross_entropy(labels=y, logits=logits)
    step = tf.train.get_or_create_global_step()
    train = OPTIMIZERS[name]().minimize(loss, global_step=step)
    feed = {x: rng.standard_normal((10, 6)).astype(np.float32), y: rng.integers(0, 3, 10)}
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        losses = [sess.run([train, loss], feed)[1] for _ in range(8)]
        assert sess.run(step) == 8
    tf.reset_default_graph()
    _check(losses, EXPECTED["optimizer_" + name])
