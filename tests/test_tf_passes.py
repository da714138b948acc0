"""workshop_lib.tf.passes: each graph rewrite, plan -> plan, on its own (without a Session)."""

import numpy as np
import pytest

import workshop_lib.tf as tf
from workshop_lib import kernels, models
from workshop_lib.tf import passes
from workshop_lib.tf.core import Operation, topological_order


pytestmark = pytest.mark.usefixtures("fresh_graph")  # every test starts from an empty default graph


def plan_for(*fetches):
    """The unrewritten plan of ``fetches``: every op they need, each after its inputs (what Session.run plans)."""
    roots = [f if isinstance(f, Operation) else f.op for f in fetches]
    return topological_order(roots, lambda op: [t.op for t in op.inputs] + list(op.control_inputs))


def assert_valid_order(plan):
    """Every input of every entry is produced by an earlier entry (or is a placeholder's output)."""
    produced = set()
    for entry in plan:
        for t in entry.inputs:
            assert t in produced, f"{entry.name} reads {t} before it is produced"
        produced.update(entry.outputs)


def _conv_net():
    x = tf.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.Variable(np.ones((3, 3, 3, 4), np.float32), name="w")
    b = tf.Variable(np.ones(4, np.float32), name="b")
    conv = tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME")
    biased = conv + b  # an Add of a 1-D bias, as the slides write it
    out = tf.nn.relu(biased)
    w2 = tf.Variable(np.ones((8 * 8 * 4, 2), np.float32), name="w2")
    logits = tf.nn.bias_add(tf.matmul(tf.reshape(out, [-1, 8 * 8 * 4]), w2), tf.ones([2]))
    return conv, biased, out, logits


def test_fuse_replaces_conv_bias_relu_and_matmul_bias_chains_keeping_a_valid_order():
    conv, biased, out, logits = _conv_net()
    plan = plan_for(logits)
    fused = passes.fuse(plan, {logits})
    types = [e.type for e in fused]
    assert "_FusedConv2DBiasAddRelu" in types and "_FusedMatMulBiasAdd" in types
    assert not {"Conv2D", "Add", "Relu", "MatMul", "BiasAdd"} & set(types)
    assert len(fused) == len(plan) - 3  # conv+add+relu -> 1, matmul+bias_add -> 1
    assert_valid_order(fused)
    entry = next(e for e in fused if e.type == "_FusedConv2DBiasAddRelu")
    assert entry.outputs[0] is out and entry.outputs[1] is conv.op.outputs[1]  # the workspace stays an output
    assert plan == plan_for(logits)  # the pass returns a new plan; the one it was given is unchanged


def test_fuse_keeps_an_intermediate_that_is_fetched_or_read_elsewhere():
    conv, biased, out, logits = _conv_net()
    types = [e.type for e in passes.fuse(plan_for(logits, biased), {logits, biased})]
    assert "_FusedConv2DBiasAdd" in types and "Relu" in types  # the bias is fused, the fetched sum stays computed
    other = tf.reduce_sum(conv)  # a second reader of the convolution's output
    types = [e.type for e in passes.fuse(plan_for(logits, other), {logits, other})]
    assert "Conv2D" in types and "_FusedConv2DBiasAddRelu" not in types


def test_fused_entries_compute_what_the_ops_they_replace_compute():
    conv, biased, out, logits = _conv_net()
    xv = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    results = {}
    for fusion in (False, True):
        with tf.Session(config=tf.ConfigProto(graph_options=tf.GraphOptions(fusion=fusion))) as sess:
            sess.run(tf.global_variables_initializer())
            results[fusion] = sess.run(logits, {conv.graph.get_tensor_by_name("x:0"): xv})
    np.testing.assert_array_equal(results[True], results[False])


def _inference_plan(model):
    plan = passes.fuse(plan_for(model.logits), {model.logits})
    return passes.propagate_layout(plan, {model.logits})


def test_propagate_layout_blocks_conv2_and_its_pool_with_reorders_only_at_the_boundaries():
    model = models.TrainingGraph(seed=0)
    with model.graph.as_default():
        plan = _inference_plan(model)
    assert_valid_order(plan)
    blocked = [(e.type, e.role) for e in plan if isinstance(e, passes.BlockedOp)]
    # conv1 has 1 input channel (< 16): plain; conv2 (32 channels, fused with its bias and ReLU) and pool2 blocked
    assert blocked == [("_FusedConv2DBiasAddRelu", "conv"), ("MaxPool", "pool")]
    kinds = [e.kind for e in plan if isinstance(e, passes.Reorder)]
    assert kinds == ["nhwc->nChw16c", "hwio->OIhw16i16o", "nChw16c->nhwc"]
    assert passes.reorder_counts(plan) == {"reorders": 2, "weight_reorders": 1}
    back = next(e for e in plan if isinstance(e, passes.Reorder) and e.direction == "to_plain")
    assert back.outputs[0].op.type == "MaxPool"  # the plain tensor the reshape after pool2 reads
    assert back.inputs[0].channels == 64


def test_propagate_layout_leaves_training_plans_plain():
    model = models.TrainingGraph(seed=0)
    with model.graph.as_default():
        plan = passes.fuse(plan_for(model.train_op, model.loss), {model.loss})
        assert passes.propagate_layout(plan, {model.loss}) == plan  # the gradients read every workspace
    assert passes.reorder_counts(plan) == {"reorders": 0, "weight_reorders": 0}


def test_a_fetched_blocked_value_is_reordered_back_once_for_all_its_readers():
    x = tf.placeholder(tf.float32, [None, 6, 6, kernels.BLOCK])
    w = tf.Variable(np.ones((3, 3, kernels.BLOCK, 20), np.float32))
    y = tf.nn.relu(tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME"))
    total, peak = tf.reduce_sum(y), tf.reduce_max(y)
    plan = passes.propagate_layout(plan_for(total, peak, y), {total, peak, y})
    assert_valid_order(plan)
    assert [e.role for e in plan if isinstance(e, passes.BlockedOp)] == ["conv", "relu"]
    assert passes.reorder_counts(plan) == {"reorders": 2, "weight_reorders": 1}  # x in; y out, once
    xv = np.random.default_rng(1).standard_normal((2, 6, 6, kernels.BLOCK)).astype(np.float32)
    results = {}
    for layout in ("native", "blocked"):
        with tf.Session(config=tf.ConfigProto(graph_options=tf.GraphOptions(layout=layout))) as sess:
            sess.run(tf.global_variables_initializer())
            results[layout] = sess.run([y, total, peak], {x: xv})
            assert sess.stats["reorders"] == (2 if layout == "blocked" else 0)
    for got, want in zip(results["blocked"], results["native"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert results["blocked"][0].shape == (2, 6, 6, 20)  # fetched in the graph's own layout, padding dropped


def _types(plan):
    return [e.type for e in plan]


def test_fuse_gradients_replaces_the_pool_relu_bias_and_relu_bias_gradient_chains():
    model = models.TrainingGraph(seed=0)
    with model.graph.as_default():
        plan = passes.fuse(plan_for(model.train_op, model.loss), {model.loss})
        given = list(plan)
        fused = passes.fuse_gradients(plan, {model.loss})
    assert plan == given  # the pass returns a new plan; the one it was given is unchanged
    assert_valid_order(fused)
    types = _types(fused)
    # conv1 and conv2: pooled, biased, ReLU'd; fc1: biased and ReLU'd; fc2 has no ReLU: its BiasAddGrad stays
    assert types.count("_FusedMaxPoolGradReluGradBiasAddGrad") == 2 and types.count("_FusedReluGradBiasAddGrad") == 1
    assert "MaxPoolGrad" not in types and "ReluGrad" not in types and types.count("BiasAddGrad") == 1
    assert len(fused) == len(plan) - 2 * 2 - 1 and passes.fused_gradient_count(fused) == 3
    entry = next(e for e in fused if e.type == "_FusedMaxPoolGradReluGradBiasAddGrad")
    relu_grad, bias_grad = entry.ops[1], entry.ops[2]
    assert entry.outputs == [relu_grad.outputs[0], bias_grad.outputs[0]]
    assert entry.inputs[2] is entry.pool.outputs[0]  # the pooled values, not the ReLU's larger output


def test_fuse_gradients_needs_the_pool_to_read_the_relu_and_keeps_a_fetched_pool_gradient():
    x = tf.placeholder(tf.float32, [2, 4, 4, 3])
    b = tf.Variable(np.ones(3, np.float32))
    y = tf.nn.relu(tf.nn.bias_add(x, b))
    pooled_elsewhere = tf.nn.max_pool(tf.identity(y) * 1.0, [1, 2, 2, 1], [1, 2, 2, 1], "VALID")
    loss = tf.reduce_sum(pooled_elsewhere)
    (dx,) = tf.gradients(loss, [x])
    assert "_FusedMaxPoolGradReluGradBiasAddGrad" not in _types(passes.fuse_gradients(plan_for(dx), {dx}))
    pooled = tf.nn.max_pool(y, [1, 2, 2, 1], [1, 2, 2, 1], "VALID")
    dx, db = tf.gradients(tf.reduce_sum(pooled * pooled), [x, b])
    plan = plan_for(dx, db)
    assert "_FusedMaxPoolGradReluGradBiasAddGrad" in _types(passes.fuse_gradients(plan, {dx, db}))
    pool_grad = next(e for e in plan if e.type == "MaxPoolGrad").outputs[0]
    kept = passes.fuse_gradients(plan, {dx, db, pool_grad})
    assert "MaxPoolGrad" in _types(kept) and "_FusedReluGradBiasAddGrad" in _types(kept)  # relu + bias still fuse


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_fused_gradients_equal_the_unfused_ones_and_are_counted_in_session_stats(data_format):
    model = models.TrainingGraph(seed=3, data_format=data_format)
    with model.graph.as_default():
        names = sorted(model.params)
        grads = tf.gradients(model.loss, [model.params[n] for n in names])
    rng = np.random.default_rng(5)
    feed = model.feed(rng.random((4, 784), dtype=np.float32), rng.integers(0, 10, 4))
    results = {}
    for fusion in (False, True):
        with model.session(tf.ConfigProto(graph_options=tf.GraphOptions(fusion=fusion))) as sess:
            results[fusion] = dict(zip(names, sess.run(grads, feed)))
            assert sess.stats["fused_gradients"] == (3 if fusion else 0)
    for name in names:
        got, want = results[True][name], results[False][name]
        if name.endswith("/b"):  # summed in another order (in float64): equal to rounding
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        else:  # the weights' gradients read dx, which the fused pass computes bit for bit
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_a_bias_added_with_plus_fuses_its_broadcast_gradient_and_gives_the_same_gradients():
    x = tf.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    w = tf.Variable(np.random.default_rng(2).standard_normal((3, 3, 3, 4)).astype(np.float32))
    b = tf.Variable(np.array([0.5, -0.5, 0.1, 0.0], np.float32))
    h = tf.nn.max_pool(tf.nn.relu(tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME") + b), [1, 2, 2, 1], [1, 2, 2, 1], "SAME")
    w2 = tf.Variable(np.random.default_rng(3).standard_normal((4 * 4 * 4, 5)).astype(np.float32))
    b2 = tf.Variable(np.full(5, 0.1, np.float32))
    out = tf.nn.relu(tf.matmul(tf.reshape(h, [-1, 4 * 4 * 4]), w2) + b2)
    grads = tf.gradients(tf.reduce_sum(out * out), [w, b, w2, b2])
    types = _types(passes.fuse_gradients(plan_for(*grads), set(grads)))
    assert types.count("_FusedMaxPoolGradReluGradBroadcastGradient") == 1
    assert types.count("_FusedReluGradBroadcastGradient") == 1 and "ReluGrad" not in types
    xv = np.random.default_rng(4).standard_normal((3, 8, 8, 3)).astype(np.float32)
    results = {}
    for fusion in (False, True):
        with tf.Session(config=tf.ConfigProto(graph_options=tf.GraphOptions(fusion=fusion))) as sess:
            sess.run(tf.global_variables_initializer())
            results[fusion] = sess.run(grads, {x: xv})
    for i, (got, want) in enumerate(zip(results[True], results[False])):
        if i % 2:  # the biases
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
