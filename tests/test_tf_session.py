"""workshop_lib.tf.session: a small executor that rewrites nothing itself, a public run context, the trace
switch read once per run, hooks that read what they asked for, and arguments that would change results raise."""

import re
from pathlib import Path

import numpy as np
import pytest

import workshop_lib.tf as tf
from workshop_lib import hvd, kernels
from workshop_lib.tf import session as session_module
from workshop_lib.tf import trace
from workshop_lib.tf.core import make_op

PACKAGE = Path(__file__).resolve().parent.parent / "workshop_lib"


pytestmark = pytest.mark.usefixtures("fresh_graph")  # every test starts from an empty default graph


def _session_private_names():
    """A Session's underscored attributes and methods, and those other modules used to reach for (issue 12)."""
    sess = tf.Session(graph=tf.Graph())
    names = {a for a in vars(sess) if a.startswith("_")} | {"_variable_value", "_set_variable", "_rng_for",
                                                            "_count_reorder"}
    names |= {a for a in vars(tf.Session) if a.startswith("_") and not a.startswith("__")}
    return names


def test_nothing_outside_session_py_touches_a_sessions_private_state():
    names = _session_private_names()
    assert {"_variables", "_closed", "_rngs", "_plans"} <= names
    pattern = re.compile(r"(?<!self)\.(" + "|".join(sorted(names)) + r")\b")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "tf" / "session.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "Session privates used outside session.py:\n" + "\n".join(offenders)


def test_the_executor_is_short_and_holds_no_graph_rewrite():
    source = Path(session_module.__file__).read_text()
    assert len(source.splitlines()) < 400
    # no op type is special-cased: rewrites live in passes.py, variables and placeholders compute themselves
    assert not re.search(r"\.type\b|Fused|Blocked|Reorder\(|\"(Conv2D|MatMul|Relu|VariableV2|Placeholder)\"", source)
    assert "os.environ" not in source  # the trace switch is read by trace.verbose() alone


def test_an_op_reads_and_writes_variables_and_draws_random_numbers_through_the_run_context():
    tf.set_random_seed(5)
    v = tf.Variable(np.array([1.0, 2.0], np.float32), name="v")

    def compute(ctx, scale):
        assert isinstance(ctx, tf.session.RunContext)
        ctx.write_variable(v, ctx.read_variable(v) * scale)
        return (ctx.rng_for(op).standard_normal(2).astype(np.float32),)

    op = make_op("ScaleAndDraw", [tf.constant(3.0)], compute, [tf.float32], [[2]], stateful=True)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        first = sess.run(op.outputs[0])
        np.testing.assert_array_equal(sess.read_variable(v), [3.0, 6.0])
        second = sess.run(op.outputs[0])
        np.testing.assert_array_equal(v.eval(sess), [9.0, 18.0])
        with pytest.raises(tf.InvalidArgumentError, match="shape"):
            sess.write_variable(v, np.zeros(3, np.float32))
        with pytest.raises(tf.InvalidArgumentError, match="dtype"):
            sess.write_variable(v, np.array(["a", "b"]))
    assert not np.array_equal(first, second)  # one generator per op, advancing from run to run
    with tf.Session() as again:  # the same seeds in a new session: the same numbers
        again.run(tf.global_variables_initializer())
        np.testing.assert_array_equal(again.run(op.outputs[0]), first)
        assert not again.closed
    assert again.closed


def test_the_verbose_switch_is_read_once_per_run(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(trace, "verbose", lambda: calls.append(1) or len(calls) == 2)
    x = tf.placeholder(tf.float32, [2, 2])
    y = tf.nn.relu(tf.matmul(x, x) + 1.0)
    with tf.Session() as sess:
        for _ in range(3):
            sess.run(y, {x: np.eye(2, dtype=np.float32)})
    assert len(calls) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workshop_verbose,")]
    # only the second run traced, one line per primitive (Const, MatMul, Add, Relu), with the trace's fields
    assert len(lines) == 4
    assert any(line.startswith("workshop_verbose,exec,MatMul,blas,-,src:2x2,2x2,dst:2x2,") for line in lines)


def test_hooks_read_the_global_step_from_their_own_fetches_without_extra_runs(tmp_path, monkeypatch):
    runs = []
    plain_run = tf.Session.run
    monkeypatch.setattr(tf.Session, "run", lambda self, *args, **kwargs: runs.append(1) or plain_run(self, *args,
                                                                                                      **kwargs))
    w = tf.Variable(np.zeros(3, np.float32))
    loss = tf.reduce_sum(tf.square(w - 1.0))
    step = tf.train.get_or_create_global_step()
    train = tf.train.GradientDescentOptimizer(0.1).minimize(loss, global_step=step)
    hooks = [tf.train.StopAtStepHook(last_step=20)]
    with tf.train.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), hooks=hooks,
                                           save_checkpoint_steps=5) as sess:
        start, steps = len(runs), 0
        while not sess.should_stop():
            sess.run(train)
            steps += 1
        extra = len(runs) - start - steps
    assert steps == 20
    # re-reads of the global step only when a save or the stop may be due: 4 saves (5, 10, 15, 20), 1 stop
    assert extra <= 5, f"{extra} extra session runs for {steps} steps"
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-20")
    kept = sorted(p.name for p in tmp_path.glob("model.ckpt-*.npz"))
    assert kept == sorted(f"model.ckpt-{s}.npz" for s in (0, 5, 10, 15, 20))


def test_an_optimizer_applies_its_updates_only_where_its_gate_is_open():
    w = tf.Variable(np.array([1.0], np.float32))
    gate = tf.placeholder(tf.bool, [])
    step = tf.train.get_or_create_global_step()
    opt = tf.train.AdamOptimizer(0.1)
    train = opt.apply_gradients(opt.compute_gradients(tf.reduce_sum(w * 2.0)), global_step=step, gate=gate)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        sess.run(train, {gate: False})
        beta1_power = next(v for v in tf.global_variables() if v.name_prefix.endswith("beta1_power"))
        assert sess.run(w)[0] == 1.0 and sess.run(step) == 1 and sess.run(beta1_power) == np.float32(0.9)
        sess.run(train, {gate: True})
        assert sess.run(w)[0] < 1.0 and sess.run(step) == 2
    with pytest.raises(TypeError, match="gate"):
        opt.apply_gradients(opt.compute_gradients(tf.reduce_sum(w * 2.0)), gate=tf.constant(1.0))


def test_arguments_that_would_change_results_raise_and_harmless_ones_are_accepted():
    x = tf.placeholder(tf.float32, [None, 8, 8, 16])
    w = tf.Variable(np.ones((3, 3, 16, 16), np.float32))
    with pytest.raises(NotImplementedError, match=r"dilations=\[1, 2, 2, 1\]"):
        tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME", dilations=[1, 2, 2, 1])
    tf.nn.conv2d(x, w, [1, 1, 1, 1], "SAME", dilations=[1, 1, 1, 1], use_cudnn_on_gpu=False)
    with pytest.raises(NotImplementedError, match=r"noise_shape=\[1, 8, 8, 16\]"):
        tf.nn.dropout(x, 0.5, noise_shape=[1, 8, 8, 16])
    with pytest.raises(NotImplementedError, match="seed=3"):
        tf.nn.dropout(x, 0.5, seed=3)
    with pytest.raises(NotImplementedError, match="seed=3"):
        tf.layers.dropout(x, 0.5, seed=3, training=False)
    xb = kernels.to_blocked(np.ones((1, 8, 8, 16), np.float32), "NHWC")
    wb = kernels.weights_to_blocked(np.ones((3, 3, 16, 16), np.float32))
    kernels.conv2d_blocked_forward(xb, wb, 1, "SAME", ksize=(3, 3))  # oneDNN's call shape: ksize checked, not ignored
    with pytest.raises(ValueError, match=r"ksize=\(5, 5\) must equal wb.shape\[2:4\]=\(3, 3\)"):
        kernels.conv2d_blocked_forward(xb, wb, 1, "SAME", ksize=(5, 5))
    optimizer = tf.train.GradientDescentOptimizer(0.1)
    for kwargs, text in (({"gradient_predivide_factor": 2.0}, "gradient_predivide_factor=2.0"),
                         ({"groups": [[w]]}, "groups="), ({"num_groups": 2}, "num_groups=2")):
        with pytest.raises(NotImplementedError, match=text):
            hvd.DistributedOptimizer(optimizer, **kwargs)
    hvd.DistributedOptimizer(optimizer, sparse_as_dense=True, device_dense="/cpu:0", device_sparse="/cpu:0")
    config = tf.ConfigProto()
    config.gpu_options.visible_device_list = "0"
    config.gpu_options.allow_growth = True


def test_a_run_frees_each_value_after_its_last_reader_and_keeps_the_fetched_ones():
    import weakref

    produced, alive_later = [], []

    def make(v):
        out = v * 2
        produced.append(weakref.ref(out))
        return out

    def look(v):
        alive_later.append(produced[-1]() is not None)
        return v

    x = tf.placeholder(tf.float32, [3])
    a = tf.py_func(make, [x], tf.float32)
    b = tf.py_func(look, [a + 1], tf.float32)  # runs after a's last reader (the Add)
    xv = np.arange(3, dtype=np.float32)
    with tf.Session() as sess:
        np.testing.assert_array_equal(sess.run(b, {x: xv}), 2 * xv + 1)
        assert alive_later == [False]  # a was dead, and freed, before look ran
        got_a, got_b = sess.run([a, b], {x: xv})  # fetched: kept to the end
        assert alive_later == [False, True]
        np.testing.assert_array_equal(got_a, 2 * xv)


def test_bad_fetch_names_ragged_feeds_and_empty_batches_are_named():
    """Before: a raw IndexError, int()'s ValueError, numpy's inhomogeneous-shape error and a ZeroDivisionError."""
    import numpy as np

    import workshop_lib.tf as tf

    x = tf.placeholder(tf.float32, [None, 2], name="x")
    w = tf.Variable(np.ones((2, 1), np.float32))
    loss = tf.reduce_mean(tf.matmul(x, w), name="loss")
    train = tf.train.GradientDescentOptimizer(0.1).minimize(loss)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for name in ("loss:3", "loss:zero"):
            with pytest.raises(ValueError, match=f"tensor name '{name}': 'loss' has 1 output\\(s\\), so the index"):
                sess.run(name, {x: np.ones((1, 2))})
        with pytest.raises(tf.errors.InvalidArgumentError, match="cannot feed x:0 a ragged value"):
            sess.run(loss, {x: [[1, 2], [3]]})
        with pytest.raises(tf.errors.InvalidArgumentError, match="a mean over an empty input .* at least one example"):
            sess.run(train, {x: np.zeros((0, 2), np.float32)})
