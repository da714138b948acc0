"""Mixed precision (bf16) in the graph engine: the pass, its three switches, its casts, and a training step."""

import os

import numpy as np
import pytest

import workshop_lib.tf as tf
from workshop_lib import bf16, models
from workshop_lib.tf import passes
from workshop_lib.tf.options import RewriterConfig

pytestmark = pytest.mark.usefixtures("fresh_graph")
RNG = np.random.default_rng(3)


def _net():
    x = tf.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.Variable(RNG.standard_normal((3, 3, 3, 4)).astype(np.float32), name="w")
    b = tf.Variable(RNG.standard_normal(4).astype(np.float32), name="b")
    h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME"), b))
    w2 = tf.Variable(RNG.standard_normal((8 * 8 * 4, 5)).astype(np.float32), name="w2")
    logits = tf.matmul(tf.reshape(h, [-1, 8 * 8 * 4]), w2)
    labels = tf.placeholder(tf.int64, [None], name="y")
    loss = tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)
    train = tf.train.GradientDescentOptimizer(0.1).minimize(loss)
    return x, labels, w, b, w2, h, logits, loss, train


def _feed(x, labels):
    return {x: RNG.standard_normal((6, 8, 8, 3)).astype(np.float32), labels: RNG.integers(0, 5, 6)}


def test_forward_is_the_bf16_kernels_bit_for_bit():
    x, labels, w, b, w2, h, logits, loss, train = _net()
    feed = _feed(x, labels)
    with tf.Session(config=tf.ConfigProto(graph_options=tf.GraphOptions(precision="bf16"))) as sess:
        sess.run(tf.global_variables_initializer())
        got_h, got_logits, wv, bv, w2v = sess.run([h, logits, w, b, w2], feed)
        assert sess.stats["weight_casts"] == 2 and sess.stats["casts"] == 2  # w, w2; x and h's reshape
    expected_h = bf16.conv2d_bf16(feed[x], wv, 1, "SAME", bias=bv, relu=True)
    assert np.array_equal(got_h.view(np.uint32), expected_h.view(np.uint32))
    expected = bf16.gemm_reference(expected_h.reshape(6, -1), w2v)
    assert np.array_equal(got_logits.view(np.uint32), expected.view(np.uint32))


def test_training_step_casts_once_per_value_and_keeps_fp32_masters(capfd):
    x, labels, w, b, w2, h, logits, loss, train = _net()
    feed = _feed(x, labels)
    results = {}
    for precision in ("fp32", "bf16"):
        with tf.Session(config=tf.ConfigProto(graph_options=tf.GraphOptions(precision=precision))) as sess:
            sess.run(tf.global_variables_initializer())
            os.environ["WORKSHOP_VERBOSE"] = "1"
            try:
                sess.run(train, feed)
            finally:
                os.environ["WORKSHOP_VERBOSE"] = "0"
            results[precision] = sess.run([w, w2, loss], feed), dict(sess.stats)
    err = capfd.readouterr().err
    (w32, w2_32, loss32), stats32 = results["fp32"]
    (w16, w2_16, loss16), stats16 = results["bf16"]
    assert stats32["casts"] == 0 and stats32["weight_casts"] == 0
    # forward: x, the flattened activation; backward: the logits' gradient (read by both its matmuls) and the
    # ReLU's gradient (read by the conv's weight gradient); weights: w and w2 at each of the two runs
    assert stats16["weight_casts"] == 4 and stats16["casts"] == 2 * 2 + 2
    assert "cast,fp32->bf16" in err and "_Bf16Conv2DBackpropFilter,bf16" in err
    assert w16.dtype == np.float32 and w2_16.dtype == np.float32  # the master weights stay fp32
    assert np.allclose(w16, w32, atol=2e-2) and abs(loss16 - loss32) < 0.05 * abs(loss32) + 1e-2
    assert not np.array_equal(w16, w32)  # bf16's rounding shows: this is not the fp32 run


def test_tf1_switches_turn_it_on_and_off():
    x, labels, w, b, w2, h, logits, loss, train = _net()

    def casts(config=None):
        with tf.Session(config=config) as sess:
            sess.run(tf.global_variables_initializer())
            sess.run(logits, _feed(x, labels))
            return sess.stats["weight_casts"]

    config = tf.ConfigProto()
    config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = tf.RewriterConfig.ON
    assert casts() == 0 and casts(config) == 2
    opt = tf.train.AdamOptimizer(1e-3)
    assert tf.train.experimental.enable_mixed_precision_graph_rewrite(opt) is opt
    try:
        assert casts() == 2
        off = tf.ConfigProto()
        off.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = RewriterConfig.OFF
        assert casts(off) == 0
    finally:
        tf.compat.v1.mixed_precision.disable_mixed_precision_graph_rewrite()
    assert casts() == 0


def test_bad_switch_values_are_named():
    with pytest.raises(ValueError, match="precision='fp16'"):
        tf.GraphOptions(precision="fp16")
    with pytest.raises(ValueError, match="auto_mixed_precision_onednn_bfloat16=True"):
        tf.ConfigProto().graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = True
    with pytest.raises(TypeError, match="must be an optimizer"):
        tf.train.experimental.enable_mixed_precision_graph_rewrite("adam")


def test_pass_leaves_nchw_and_float64_ops_alone():
    x = tf.placeholder(tf.float64, [2, 4], name="x")
    w = tf.Variable(np.ones((4, 3)), name="w")
    y = tf.matmul(x, w)
    plan = [y.op]
    assert passes.mixed_precision(plan) == plan
