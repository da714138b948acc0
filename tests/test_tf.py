"""workshop_lib.tf: TF1 programs run unchanged; gradients match central differences; sessions, hooks, checkpoints."""

import os
import re

import numpy as np
import pytest

import workshop_lib.tf as tf


pytestmark = pytest.mark.usefixtures("fresh_graph")  # every test starts from an empty default graph


def test_the_issue_snippet_runs_unchanged():
    a = tf.placeholder(tf.float32, name="input1")
    b = tf.placeholder(tf.float32, name="input2")
    c = tf.add(a, b, name="my_add_op")
    assert c.name == "my_add_op:0"
    config = tf.ConfigProto(inter_op_parallelism_threads=2, intra_op_parallelism_threads=2)
    with tf.Session(config=config) as sess:
        out = sess.run(c, feed_dict={a: 3.0, b: 2.0})
    assert out == 5.0 and out.dtype == np.float32


def test_graph_operations_and_tensors_can_be_inspected():
    g = tf.Graph()
    with g.as_default():
        x = tf.placeholder(tf.float32, [None, 784], name="x")
        with tf.name_scope("layer"):
            w = tf.Variable(tf.zeros([784, 10]), name="w")
            y = tf.matmul(x, w, name="logits")
    assert tf.get_default_graph() is not g and y.graph is g
    assert y.name == "layer/logits:0" and y.op.type == "MatMul" and y.shape.as_list() == [None, 10]
    assert x.shape.as_list() == [None, 784] and x.dtype == tf.float32
    assert g.get_tensor_by_name("layer/logits:0") is y
    assert g.get_operation_by_name("layer/w") is w.op and w.name == "layer/w:0"
    assert [t.name for t in y.op.inputs] == ["x:0", "layer/w:0"]
    assert "Placeholder" in {op.type for op in g.get_operations()}


def test_constant_variable_initializer_assign_and_load():
    c = tf.constant(3, dtype=tf.float64, shape=[2, 2])
    v = tf.Variable(tf.ones([2, 2], dtype=tf.float64) * 2.0, name="v")
    w = tf.Variable(np.arange(3, dtype=np.float32), name="w")
    assign = v.assign(c + v)
    with tf.Session() as sess:
        with pytest.raises(tf.FailedPreconditionError, match="uninitialized value v"):
            sess.run(v)
        sess.run(tf.global_variables_initializer())
        np.testing.assert_array_equal(sess.run(c), np.full((2, 2), 3.0))
        np.testing.assert_array_equal(sess.run(assign), np.full((2, 2), 5.0))
        np.testing.assert_array_equal(sess.run(v), np.full((2, 2), 5.0))
        w.load(np.array([7, 8, 9], dtype=np.float32), sess)
        np.testing.assert_array_equal(w.eval(sess), [7, 8, 9])
        with pytest.raises(tf.InvalidArgumentError, match="shape"):
            w.load(np.zeros(4), sess)


def test_ops_compute_what_numpy_computes():
    x = tf.placeholder(tf.float32, [None, 3])
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((4, 3)).astype(np.float32)
    ops = {
        "add": (x + 1.0, xv + 1), "sub": (2.0 - x, 2 - xv), "mul": (x * x, xv * xv), "div": (x / 2.0, xv / 2),
        "neg": (-x, -xv), "mean": (tf.reduce_mean(x, axis=1), xv.mean(1)), "sum": (tf.reduce_sum(x), xv.sum()),
        "argmax": (tf.argmax(x, 1), xv.argmax(1)), "relu": (tf.nn.relu(x), np.maximum(xv, 0)),
        "cast": (tf.cast(x > 0 if False else tf.equal(x, x), tf.float32), np.ones_like(xv)),
        "reshape": (tf.reshape(x, [-1]), xv.reshape(-1)),
        "softmax": (tf.nn.softmax(x), np.exp(xv) / np.exp(xv).sum(1, keepdims=True)),
        "matmul_t": (tf.matmul(x, x, transpose_b=True), xv @ xv.T),
    }
    with tf.Session() as sess:
        got = sess.run({k: t for k, (t, _) in ops.items()}, feed_dict={x: xv})
    for k, (_, ref) in ops.items():
        np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)


def _numeric_grad(sess, loss, var, feed, eps=1e-6):
    value = sess.run(var)
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        for sign in (1, -1):
            v = value.copy()
            v[i] += sign * eps
            var.load(v, sess)
            grad[i] += sign * sess.run(loss, feed) / (2 * eps)
    var.load(value, sess)
    return grad


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_gradients_match_central_differences_in_float64(data_format):
    rng = np.random.default_rng(1)
    tf.set_random_seed(0)
    shape = (2, 6, 6, 3) if data_format == "NHWC" else (2, 3, 6, 6)
    x = tf.placeholder(tf.float64, shape)
    labels = tf.placeholder(tf.int64, [2])
    w = tf.Variable(rng.standard_normal((3, 3, 3, 4)), name="w")
    b = tf.Variable(rng.standard_normal(4), name="b")
    w2 = tf.Variable(rng.standard_normal((36, 5)) * 0.3, name="w2")
    scale = tf.Variable(rng.random(5) + 0.5, name="scale")
    h = tf.nn.conv2d(x, w, strides=[1, 1, 1, 1], padding="SAME", data_format=data_format)
    h = tf.nn.tanh(tf.nn.bias_add(h, b, data_format=data_format))
    h = tf.nn.max_pool(h, [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2],
                       [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2], "VALID", data_format=data_format)
    h = tf.nn.avg_pool(h, [1, 1, 1, 1], [1, 1, 1, 1], "SAME", data_format=data_format)
    logits = tf.matmul(tf.reshape(h, [2, 36]), w2) * scale / 2.0 - 1.0
    loss = tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=tf.nn.elu(logits)) + \
        tf.reduce_sum(tf.square(w2)) * 0.01
    variables = [w, b, w2, scale]
    grads = tf.gradients(loss, variables)
    feed = {x: rng.standard_normal(shape), labels: np.array([1, 3])}
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        analytic = sess.run(grads, feed)
        for var, g in zip(variables, analytic):
            numeric = _numeric_grad(sess, loss, var, feed)
            err = np.abs(g - numeric).max() / np.abs(numeric).max()
            assert err < 1e-4, (var.name, err)


def test_one_hot_and_dense_softmax_cross_entropy_match_the_sparse_form_and_central_differences():
    rng = np.random.default_rng(3)
    labels = tf.placeholder(tf.int64, [4])
    logits = tf.Variable(rng.standard_normal((4, 5)), name="logits")
    soft = tf.Variable(rng.dirichlet(np.ones(5), size=4), name="soft")  # gradients flow to soft labels too
    onehot = tf.one_hot(tf.cast(labels, tf.int32), 5, 1, 0)  # Horovod's MNIST sample builds its targets so
    dense = tf.losses.softmax_cross_entropy(onehot, logits)
    sparse = tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)
    soft_loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits_v2(labels=soft, logits=logits * 2.0))
    feed = {labels: np.array([0, 4, 2, 9])}  # 9 is out of range: an all-zero row, as in TensorFlow
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        oh = sess.run(onehot, feed)
        assert oh.tolist()[3] == [0] * 5 and oh[:3].argmax(1).tolist() == [0, 4, 2]
        feed = {labels: np.array([0, 4, 2, 1])}
        d, sp = sess.run([dense, sparse], feed)
        assert abs(d - sp) < 1e-12
        grads = sess.run(tf.gradients(soft_loss, [logits, soft]))
        for var, g in zip([logits, soft], grads):
            numeric = _numeric_grad(sess, soft_loss, var, {})
            assert np.abs(g - numeric).max() / np.abs(numeric).max() < 1e-6, var.name
    with pytest.raises(ValueError, match="shape"):
        tf.nn.softmax_cross_entropy_with_logits(labels=tf.zeros([4, 3], tf.float64), logits=logits)


def test_gradients_return_none_without_a_path_and_sum_over_paths():
    x = tf.Variable(2.0)
    y = tf.Variable(5.0)
    z = x * x + x * 3.0
    gx, gy = tf.gradients(z, [x, y])
    assert gy is None
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        assert sess.run(gx) == pytest.approx(2 * 2.0 + 3.0)


def test_run_accepts_nested_fetches_feeds_by_name_and_operations():
    a = tf.placeholder(tf.float32, [], name="a")
    b = a * 2.0
    c = a + 1.0
    op = tf.no_op()
    with tf.Session() as sess:
        out = sess.run({"pair": (b, [c, op]), "name": "a:0"}, feed_dict={"a:0": 3.0})
    assert out["pair"][0] == 6.0 and out["pair"][1] == [4.0, None] and out["name"] == 3.0
    assert isinstance(out["pair"], tuple)


def test_errors_name_what_is_wrong():
    p = tf.placeholder(tf.float32, [None, 3], name="images")
    q = tf.placeholder(tf.int32, [2], name="labels")
    y = p * 2.0
    with tf.Session() as sess:
        with pytest.raises(tf.InvalidArgumentError, match="You must feed a value for placeholder tensor 'images'"):
            sess.run(y)
        with pytest.raises(tf.InvalidArgumentError, match=r"shape \(4, 2\) to images:0, which has shape \(\?, 3\)"):
            sess.run(y, {p: np.zeros((4, 2))})
        with pytest.raises(tf.InvalidArgumentError, match="float64 value to labels:0 of dtype int32"):
            sess.run(q, {q: np.zeros(2)})
        other = tf.Graph()
        with other.as_default():
            foreign = tf.constant(1.0)
        with pytest.raises(ValueError, match="not an element of this session's graph"):
            sess.run(foreign)
        with other.as_default(), pytest.raises(ValueError, match="another graph"):
            tf.add(foreign, y)
    with pytest.raises(RuntimeError, match="closed Session"):
        sess.run(y, {p: np.zeros((1, 3))})


@pytest.mark.parametrize("dtype, value, message", [
    (tf.int32, np.array([3, 2**40 + 7]), "an int64 value to ids:0 of dtype int32: 1099511627783 lies outside int32's "
                                         r"range \[-2147483648, 2147483647\]"),
    (tf.int32, 2**40 + 7, "int64 value to ids:0 of dtype int32: 1099511627783 lies outside"),
    (tf.uint8, np.array([-1, 3]), r"-1 lies outside uint8's range \[0, 255\]"),
    (tf.int64, np.array([2**64 - 1], np.uint64), "a uint64 value to ids:0 of dtype int64: 18446744073709551615 lies"),
    (tf.bool, np.array([0, 1, 2]), r"2 lies outside bool's range \[0, 1\]"),
    (tf.float32, np.array([2**24 + 1]), "16777217 is not exactly representable in float32"),
    (tf.float32, np.array([1.0, 1e39]), r"float64 value to ids:0 of dtype float32: 1e\+39 overflows float32"),
    (tf.int32, np.array([1.5]), r"float64 value to ids:0 of dtype int32; convert it first \(np.rint"),
    (tf.float32, np.array(["a"]), "feed a numeric array"),
])
def test_lossy_feeds_raise_naming_the_placeholder_the_value_and_both_dtypes(dtype, value, message):
    ids = tf.placeholder(dtype, None, name="ids")
    with tf.Session() as sess, pytest.raises(tf.InvalidArgumentError, match=message):
        sess.run(ids, {ids: value})


def test_feeds_that_lose_nothing_are_converted_as_tensorflow_converts_them():
    ids, x = tf.placeholder(tf.int32, None), tf.placeholder(tf.float32, None)
    with tf.Session() as sess:
        got = sess.run(ids, {ids: np.array([-2**31, 7, 2**31 - 1], np.int64)})
        assert got.dtype == np.int32 and got.tolist() == [-2**31, 7, 2**31 - 1]
        assert sess.run(ids, {ids: np.array([True, False])}).tolist() == [1, 0]
        assert sess.run(x, {x: np.array([2**24, 3], np.int64)}).tolist() == [2**24, 3]
        # float64 into float32 rounds (as in TensorFlow); inf and nan stay what they are
        got = sess.run(x, {x: np.array([0.1, np.inf, -np.inf, 1e-50])})
        assert got.dtype == np.float32 and got[0] == np.float32(0.1) and got[1:3].tolist() == [np.inf, -np.inf]
        assert np.isnan(sess.run(x, {x: np.nan})) and sess.run(ids, {ids: np.zeros(0, np.int64)}).shape == (0,)


@pytest.mark.parametrize("make, steps", [
    (lambda: tf.train.GradientDescentOptimizer(0.1), 60),
    (lambda: tf.train.MomentumOptimizer(0.05, 0.9), 60),
    (lambda: tf.train.AdamOptimizer(0.1), 100),
    (lambda: tf.train.AdagradOptimizer(0.5), 100),
    (lambda: tf.train.RMSPropOptimizer(0.05), 100),
])
def test_optimizers_minimize_a_quadratic_and_count_steps(make, steps):
    target = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    w = tf.Variable(np.zeros(3, dtype=np.float32))
    loss = tf.reduce_sum(tf.square(w - target))
    step = tf.train.get_or_create_global_step()
    train = make().minimize(loss, global_step=step)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        start = sess.run(loss)
        for _ in range(steps):
            sess.run(train)
        assert sess.run(loss) < 0.05 * start
        assert sess.run(step) == steps


def test_adam_matches_its_formula():
    g_value = np.array([0.5, -1.0], dtype=np.float32)
    w = tf.Variable(np.array([1.0, 2.0], dtype=np.float32))
    loss = tf.reduce_sum(w * g_value)  # gradient is g_value
    opt = tf.train.AdamOptimizer(0.01)
    train = opt.minimize(loss)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for _ in range(3):
            sess.run(train)
        got = sess.run(w)
    m = v = np.zeros(2)
    ref = np.array([1.0, 2.0])
    for t in range(1, 4):
        m = 0.9 * m + 0.1 * g_value
        v = 0.999 * v + 0.001 * g_value**2
        ref = ref - 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_layers_api_scopes_and_reuse():
    x = tf.placeholder(tf.float32, [None, 28, 28, 1])
    training = tf.placeholder(tf.bool, [])
    h = tf.layers.conv2d(x, 32, 5, padding="same", activation=tf.nn.relu)
    h = tf.layers.max_pooling2d(h, 2, 2)
    h = tf.layers.flatten(h)
    h = tf.layers.dropout(tf.layers.dense(h, 16, activation=tf.nn.relu), rate=0.5, training=training)
    logits = tf.layers.dense(h, 10)
    assert logits.shape.as_list() == [None, 10]
    names = sorted(v.name for v in tf.trainable_variables())
    assert names == ["conv2d/bias:0", "conv2d/kernel:0", "dense/bias:0", "dense/kernel:0", "dense_1/bias:0",
                     "dense_1/kernel:0"]
    with tf.variable_scope("shared"):
        a = tf.get_variable("v", [2])
    with tf.variable_scope("shared", reuse=True):
        assert tf.get_variable("v", [2]) is a
    with pytest.raises(ValueError, match="already exists"), tf.variable_scope("shared"):
        tf.get_variable("v", [2])
    xv = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        eval_a = sess.run(logits, {x: xv, training: False})
        eval_b = sess.run(logits, {x: xv, training: False})
        train_out = sess.run(logits, {x: xv, training: True})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_out, eval_a)


def _mlp():
    tf.set_random_seed(1)
    x = tf.placeholder(tf.float32, [None, 4])
    y = tf.placeholder(tf.int64, [None])
    logits = tf.layers.dense(tf.layers.dense(x, 8, activation=tf.nn.relu), 3)
    loss = tf.losses.sparse_softmax_cross_entropy(labels=y, logits=logits)
    step = tf.train.get_or_create_global_step()
    train = tf.train.AdamOptimizer(0.01).minimize(loss, global_step=step)
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((16, 4)), y: rng.integers(0, 3, 16)}
    return loss, train, step, feed


def test_monitored_session_hooks_checkpoints_and_resume(tmp_path, capsys):
    tf.logging.set_verbosity(tf.logging.INFO)
    loss, train, step, feed = _mlp()
    hooks = [tf.train.StopAtStepHook(last_step=7), tf.train.LoggingTensorHook({"loss": loss, "step": step},
                                                                              every_n_iter=2)]
    runs = 0
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), hooks=hooks,
                                           save_checkpoint_steps=3) as sess:
        while not sess.should_stop():
            sess.run(train, feed_dict=feed)
            runs += 1
    assert runs == 7
    err = capsys.readouterr().err
    assert re.search(r"INFO:tensorflow:loss = [\d.]+, step = \d+", err)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("model.ckpt-7") and os.path.exists(latest + ".npz")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("model.ckpt-7.npz.")]  # no temporary left
    with np.load(latest + ".npz", allow_pickle=False) as f:
        assert int(f["global_step"]) == 7

    # a restart resumes from the checkpoint, says so, and stops at the new last step
    tf.reset_default_graph()
    loss, train, step, feed = _mlp()
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path),
                                           hooks=[tf.train.StopAtStepHook(last_step=10)]) as sess:
        runs = 0
        while not sess.should_stop():
            sess.run(train, feed_dict=feed)
            runs += 1
    assert runs == 3
    assert "Restoring parameters from" in capsys.readouterr().err


def test_saver_restore_and_latest_checkpoint(tmp_path):
    v = tf.Variable(np.arange(4.0), name="v")
    saver = tf.train.Saver()
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        path = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=42)
        v.load(np.zeros(4), sess)
        saver.restore(sess, tf.train.latest_checkpoint(str(tmp_path)))
        np.testing.assert_array_equal(sess.run(v), np.arange(4.0))
    assert path == str(tmp_path / "model.ckpt-42")
    assert tf.train.latest_checkpoint(str(tmp_path / "empty")) is None
    with tf.Session() as sess, pytest.raises(FileNotFoundError, match="checkpoint not found"):
        saver.restore(sess, str(tmp_path / "nope"))


def test_fusion_and_kernel_choice_change_speed_not_results(capsys, monkeypatch):
    tf.set_random_seed(3)
    x = tf.placeholder(tf.float32, [None, 12, 12, 3])
    w = tf.Variable(tf.truncated_normal([3, 3, 3, 8], stddev=0.5))
    b = tf.Variable(tf.ones([8]) * 0.1)
    h = tf.nn.relu(tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME") + b)
    w2 = tf.Variable(tf.truncated_normal([12 * 12 * 8, 5], stddev=0.1))
    out = tf.nn.relu(tf.nn.bias_add(tf.matmul(tf.reshape(h, [-1, 12 * 12 * 8]), w2), tf.ones([5])))
    xv = np.random.default_rng(0).random((4, 12, 12, 3)).astype(np.float32)
    results = {}
    init = tf.global_variables_initializer()
    for kernels in ("reference", "optimized"):
        for fusion in (False, True):
            config = tf.ConfigProto(graph_options=tf.GraphOptions(kernels=kernels, fusion=fusion))
            with tf.Session(config=config) as sess:
                sess.run(init)
                monkeypatch.setenv("WORKSHOP_VERBOSE", "1")
                results[(kernels, fusion)] = sess.run(out, {x: xv})
                monkeypatch.delenv("WORKSHOP_VERBOSE")
            trace = capsys.readouterr().err
            if fusion:
                assert "_FusedConv2DBiasAddRelu" in trace and "_FusedMatMulBiasAddRelu" in trace
            else:
                assert "_Fused" not in trace and ",Conv2D," in trace
            assert ("direct" if kernels == "reference" else "jit") in trace
    ref = results[("reference", False)]
    for value in results.values():
        np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-5)


def test_inter_op_threads_give_the_same_results():
    a = tf.placeholder(tf.float64, [50, 50])
    branches = [tf.matmul(a, a) * float(i) for i in range(6)]
    total = tf.add_n(branches)
    av = np.random.default_rng(0).random((50, 50))
    with tf.Session(config=tf.ConfigProto(inter_op_parallelism_threads=3)) as sess:
        parallel = sess.run(total, {a: av})
    np.testing.assert_allclose(parallel, (av @ av) * 15, rtol=1e-12)


def test_the_seeds_deepnn_code_trains():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "tf_programs" / "deepnn_seed.py"
    spec = importlib.util.spec_from_file_location("deepnn_seed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses, accuracy = module.main(40)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy > 0.5


def test_layout_propagation_runs_convolutions_blocked_with_reorders_only_at_the_boundaries(capsys, monkeypatch):
    from workshop_lib import models

    model = models.TrainingGraph(seed=0)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    results, stats = {}, {}
    for layout in ("native", "blocked"):
        config = tf.ConfigProto(graph_options=tf.GraphOptions(layout=layout))
        with model.session(config) as sess:
            monkeypatch.setenv("WORKSHOP_VERBOSE", "1")
            results[layout] = sess.run(model.logits, model.feed(images))
            monkeypatch.delenv("WORKSHOP_VERBOSE")
            stats[layout] = dict(sess.stats)
        trace = capsys.readouterr().err
        if layout == "blocked":
            assert ",blocked,nChw16c," in trace and "reorder,nhwc->nChw16c" in trace
    np.testing.assert_allclose(results["blocked"], results["native"], rtol=1e-4, atol=1e-4)
    assert stats["native"]["reorders"] == 0
    # conv1 (1 channel) stays plain; conv2, its ReLU and pool run blocked: one reorder in, one out
    assert stats["blocked"]["reorders"] == 2 and stats["blocked"]["weight_reorders"] == 1


def test_nchw_and_nhwc_models_compute_the_same_logits_and_train():
    from workshop_lib import models

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3])
    weights, logits = None, {}
    for fmt in ("NHWC", "NCHW"):
        model = models.TrainingGraph(learning_rate=1e-4, seed=5, data_format=fmt)
        with model.session() as sess:
            if weights is None:
                weights = model.export_params(sess)
            else:  # the same weights in both layouts (random initialisers are seeded per op)
                for name, var in model.params.items():
                    var.load(weights[name], sess)
            logits[fmt] = sess.run(model.logits, model.feed(images))
            before = sess.run(model.loss, model.feed(images, labels))
            for _ in range(10):
                sess.run(model.train_op, model.feed(images, labels))
            assert sess.run(model.loss, model.feed(images, labels)) < before
    np.testing.assert_allclose(logits["NCHW"], logits["NHWC"], rtol=1e-4, atol=1e-4)


def test_updates_wait_for_every_gradient_and_fetched_values_are_copies():
    # y = w2 * (w1 * x): w1's gradient reads w2, whose in-place update must come after it
    x = tf.constant(np.array([2.0], dtype=np.float32))
    w1 = tf.Variable(np.array([3.0], dtype=np.float32))
    w2 = tf.Variable(np.array([5.0], dtype=np.float32))
    loss = tf.reduce_sum(w2 * (w1 * x))
    opt = tf.train.AdamOptimizer(0.5)
    train = opt.minimize(loss)
    grads = tf.gradients(loss, [w1, w2])
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        before = sess.run(w2)
        g_w1, g_w2 = sess.run(grads)
        sess.run(train)
        assert before[0] == 5.0  # the array handed out earlier did not change with the update
        assert g_w1[0] == 10.0 and g_w2[0] == 6.0
        # Adam's first moment is 0.1 * the gradient it used: w1's must come from w2 = 5 (10), not 4.5 (9)
        np.testing.assert_allclose(sess.run(opt.get_slot(w1, "m")), [1.0], rtol=1e-6)
        np.testing.assert_allclose(sess.run([w1, w2]), [[2.5], [4.5]], rtol=1e-6)


@pytest.mark.parametrize("build, rule", [
    (lambda x, w: tf.nn.conv2d(x, w, [1, 0, 0, 1], "SAME"), r"strides=\[1, 0, 0, 1\] must be a positive integer"),
    (lambda x, w: tf.nn.conv2d(x, w, [1, -1, 1, 1], "SAME"), r"strides=\[1, -1, 1, 1\] must be a positive integer"),
    (lambda x, w: tf.nn.conv2d(x, w, [2, 1, 1, 1], "SAME"), "supports no strides over the batch or channel axis"),
    (lambda x, w: tf.nn.max_pool(x, [1, 0, 0, 1], [1, 1, 1, 1], "VALID"), r"ksize=\[1, 0, 0, 1\] must be a positive integer"),
    (lambda x, w: tf.nn.avg_pool(x, [1, 2, 2, 1], 0, "VALID"), "strides=0 must be a positive integer"),
    (lambda x, w: tf.nn.conv2d(x, w, [1, 1, 1, 1], "VALID"), "5x5 window with padding='VALID' .* does not fit the 4x4"),
    (lambda x, w: tf.nn.max_pool(x, [1, 5, 5, 1], [1, 1, 1, 1], "VALID"), "does not fit the 4x4 input"),
])
def test_a_zero_negative_or_oversized_stride_or_window_is_an_error_naming_it(build, rule):
    """strides=[1, 0, 0, 1] raised a bare ZeroDivisionError while the graph was built; negative ones blamed the kernel."""
    x = tf.placeholder(tf.float32, [None, 4, 4, 1])
    w = tf.Variable(tf.zeros([5, 5, 1, 1]))
    with pytest.raises(ValueError, match=rule):
        build(x, w)
