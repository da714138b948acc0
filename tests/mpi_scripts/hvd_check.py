"""workshop_lib.hvd under mpiexec (or alone): ``python hvd_check.py MODE [options]``.

Modes
-----
api          rank/size, eager and graph collectives against MPI's own, gradients, broadcast of variables.
mismatch     different shapes or variables across ranks: every rank catches the same error.
train        a few data-parallel steps of a small CNN in float64; rank 0 saves the final weights.
fail         the last rank raises after hvd.init() while the others wait in an allreduce.
exit         the last rank exits early: with a failure status, by SystemExit, or normally (--how); the others
             wait in hvd.allreduce, or in a plain MPI barrier (--how plain) that only the exit timeout covers.
stall        the last rank stays alive but reaches no collective (the stall inspector warns, then aborts); or
             (--how graph) does so while the others wait in a graph allreduce named "grads".
"""

import argparse
import sys

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf


def say(line):
    """One write per line: lines of different ranks never interleave within a line (a pipe write is atomic)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_api():
    from mpi4py import MPI

    hvd.init()
    hvd.init()  # twice is harmless
    r, n = hvd.rank(), hvd.size()
    world = MPI.COMM_WORLD
    assert (r, n) == (world.Get_rank(), world.Get_size())
    assert 0 <= hvd.local_rank() < hvd.local_size() <= n and hvd.cross_size() * hvd.local_size() == n
    rng = np.random.default_rng(100 + r)
    # eager allreduce against MPI's Allreduce: exact for integers, rounding for floats
    for dtype in (np.int32, np.int64, np.float32, np.float64):
        x = (rng.integers(-1000, 1000, 37) if np.dtype(dtype).kind == "i" else rng.standard_normal(37)).astype(dtype)
        expected = np.empty_like(x)
        world.Allreduce(x, expected, op=MPI.SUM)
        got = hvd.allreduce(x, op=hvd.Sum)
        assert got.dtype == x.dtype
        if x.dtype.kind == "i":
            assert np.array_equal(got, expected)
            assert np.array_equal(hvd.allreduce(x), expected // n)  # Average: integer division for integers
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)
            np.testing.assert_allclose(hvd.allreduce(x), expected / n, rtol=1e-5 if dtype == np.float32 else 1e-12)
        for op, mpi_op in ((hvd.Min, MPI.MIN), (hvd.Max, MPI.MAX)):
            world.Allreduce(x, expected, op=mpi_op)
            assert np.array_equal(hvd.allreduce(x, op=op), expected)
    y = rng.standard_normal(1000).astype(np.float32)
    exact = np.empty_like(y)
    world.Allreduce(y.astype(np.float16).astype(np.float32), exact, op=MPI.SUM)
    fp16 = hvd.allreduce(y, op=hvd.Sum, compression=hvd.Compression.fp16)
    assert fp16.dtype == np.float32 and np.abs(fp16 - exact).max() < 2e-3 * max(1.0, np.abs(exact).max()) * n
    # allgather with a different number of rows per rank, broadcast from the last rank
    gathered = hvd.allgather(np.full((r + 1, 2), r, dtype=np.int64))
    assert gathered[:, 0].tolist() == [k for k in range(n) for _ in range(k + 1)]
    assert hvd.broadcast(np.arange(3.0) + r, n - 1).tolist() == [n - 1.0, n, n + 1.0]

    # the same collectives as graph ops, and their gradients
    tf.set_random_seed(7)
    x = tf.placeholder(tf.float64, [None])
    w = tf.Variable(np.array([1.0, 2.0, 3.0]) * (r + 1), name="w")
    total = hvd.allreduce(w * w, op=hvd.Sum)
    mean = hvd.allreduce(w)
    rows = hvd.allgather(tf.reshape(w, [1, 3]))
    root = hvd.broadcast(w, 0)
    loss = tf.reduce_sum(total) + tf.reduce_sum(mean) + tf.reduce_sum(rows * rows) + tf.reduce_sum(root)
    grad = tf.gradients(loss, [w])[0]
    bcast = hvd.broadcast_global_variables(0)
    config = tf.ConfigProto(inter_op_parallelism_threads=2)  # collectives still run in one order on every rank
    with tf.Session(config=config) as sess:
        sess.run(tf.global_variables_initializer())
        t, m, g_rows, g = sess.run([total, mean, rows, grad], {x: [1.0]})
        base = np.array([1.0, 2.0, 3.0])
        scales = np.arange(1, n + 1)
        assert np.allclose(t, (base ** 2) * (scales ** 2).sum()) and np.allclose(m, base * scales.mean())
        assert np.allclose(g_rows, base[None, :] * scales[:, None])
        # d/dw of: sum-allreduce (grad n * 2w), average (grad 1), allgather rows (2 * n * w), broadcast (n on root)
        wr = base * (r + 1)
        expected = n * 2 * wr + 1.0 + n * 2 * wr + (n if r == 0 else 0)
        assert np.allclose(g, expected), (g, expected)
        sess.run(bcast)
        assert np.allclose(sess.run(w), base)
    # the optimizer wrapper averages the gradients, here through float16 on the wire
    with tf.Graph().as_default():
        v = tf.Variable(np.array([1.0, 2.0], dtype=np.float32) * (r + 1))
        opt = hvd.DistributedOptimizer(tf.train.GradientDescentOptimizer(0.1), compression=hvd.Compression.fp16)
        (g, _), = opt.compute_gradients(tf.reduce_sum(v * v))
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            got = sess.run(g)
        assert got.dtype == np.float32 and np.allclose(got, 2 * np.array([1.0, 2.0]) * np.mean(np.arange(1, n + 1)),
                                                       rtol=1e-3), got
    say(f"rank {r}: api ok (size {n})")


def check_mismatch():
    hvd.init()
    r, n = hvd.rank(), hvd.size()
    try:
        hvd.allreduce(np.zeros(3 + r, dtype=np.float32))
    except ValueError as e:
        say(f"rank {r} eager: ValueError {e}")
    with tf.Graph().as_default():
        tf.Variable(np.zeros(2), name="shared")
        if r == n - 1:
            tf.Variable(np.zeros(2), name=f"only_on_rank_{r}")
        op = hvd.broadcast_global_variables(0)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            try:
                sess.run(op)
            except ValueError as e:
                say(f"rank {r} variables: ValueError {e}")


def small_cnn(x, labels):
    """A float64 CNN with every kind of layer of the course's model: conv, bias, ReLU, max-pool, dense, xent."""
    rng = np.random.default_rng(0)  # the same on every rank; the broadcast makes sure anyway
    w1 = tf.Variable(rng.standard_normal((3, 3, 1, 4)) * 0.3, name="conv/w")
    b1 = tf.Variable(np.zeros(4), name="conv/b")
    w2 = tf.Variable(rng.standard_normal((14 * 14 * 4, 10)) * 0.05, name="fc/w")
    b2 = tf.Variable(np.zeros(10), name="fc/b")
    h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(tf.reshape(x, [-1, 28, 28, 1]), w1, [1, 1, 1, 1], "SAME"), b1))
    h = tf.nn.max_pool(h, [1, 2, 2, 1], [1, 2, 2, 1], "VALID")
    logits = tf.matmul(tf.reshape(h, [-1, 14 * 14 * 4]), w2) + b2
    return tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)


def train(args):
    """``updates`` optimizer steps at a global batch of ``global_batch`` images per pass, split over the ranks."""
    from workshop_lib.data import load_mnist

    hvd.init()
    r, n = hvd.rank(), hvd.size()
    k = args.passes
    (x_all, y_all), _ = load_mnist()
    needed = args.updates * k * args.global_batch
    x_all = x_all[:needed].reshape(-1, 784).astype(np.float64) / 255.0
    y_all = y_all[:needed].astype(np.int64)
    if args.global_batch % n:
        raise SystemExit(f"global batch {args.global_batch} is not divisible by {n} ranks")
    b = args.global_batch // n
    x = tf.placeholder(tf.float64, [None, 784])
    labels = tf.placeholder(tf.int64, [None])
    loss = small_cnn(x, labels)
    opt = tf.train.AdamOptimizer(0.01)  # not scaled: the reference takes the same step on the whole batch
    if args.hvd:
        opt = hvd.DistributedOptimizer(opt, backward_passes_per_step=k, average_aggregated_gradients=True)
    global_step = tf.train.get_or_create_global_step()
    train_op = opt.minimize(loss, global_step=global_step)
    hooks = [hvd.BroadcastGlobalVariablesHook(0), tf.train.StopAtStepHook(last_step=args.updates * k)]
    with tf.train.MonitoredTrainingSession(hooks=hooks) as sess:
        step = 0
        while not sess.should_stop():
            block = x_all[step * args.global_batch : (step + 1) * args.global_batch]
            block_y = y_all[step * args.global_batch : (step + 1) * args.global_batch]
            rows = slice(r * b, (r + 1) * b) if args.hvd else slice(None)
            sess.run(train_op, {x: block[rows], labels: block_y[rows]})
            step += 1
        weights = {v.name_prefix: sess._session.run(v) for v in tf.trainable_variables()}
        final_step = int(sess._session.run(global_step))
    if r == 0:
        np.savez(args.out, step=final_step, **weights)
        say(f"rank 0: {final_step} steps on {n} ranks")


def fail():
    import time

    hvd.init()
    r, n = hvd.rank(), hvd.size()
    if r == n - 1:
        time.sleep(1.0)
        raise RuntimeError(f"rank {r} failed on purpose")
    hvd.allreduce(np.ones(1000, dtype=np.float32))  # waits for the failed rank
    say(f"rank {r}: unreachable")


def exit_early(how):
    """The last rank leaves while the others still have work (or a collective) ahead of them."""
    import time

    hvd.init()
    r, n = hvd.rank(), hvd.size()
    if r == n - 1:
        time.sleep(0.5)
        if how == "status":
            sys.exit(3)
        if how in ("raise", "plain"):
            raise SystemExit(4)  # not through sys.exit: its peers must learn that it has ended
        sys.exit(0)  # "early": a normal end, before the others
    if how == "early":
        time.sleep(2.0)  # rank 0 works on (say, an evaluation) while the last rank waits at its exit
        say(f"rank {r}: finished after the last rank")
        return
    if how == "plain":
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()  # not a Horovod collective: only the last rank's bounded wait at exit can tell
        say(f"rank {r}: unreachable")
    hvd.allreduce(np.ones(1000, dtype=np.float32))  # waits for the rank that left
    say(f"rank {r}: unreachable")


def stall(how):
    """The last rank is alive but never joins the collective the others wait in."""
    import time

    hvd.init()
    r, n = hvd.rank(), hvd.size()
    if r == n - 1:
        time.sleep(60)
        say(f"rank {r}: unreachable")
        return
    if how == "graph":
        with tf.Graph().as_default():
            total = hvd.allreduce(tf.constant(np.ones(4)), name="grads")
            with tf.Session() as sess:
                sess.run(total)
    else:
        hvd.allreduce(np.ones(10, dtype=np.float32), name="weights")
    say(f"rank {r}: unreachable")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["api", "mismatch", "train", "fail", "exit", "stall"])
    parser.add_argument("--how", choices=["status", "raise", "early", "plain", "eager", "graph"], default="status")
    parser.add_argument("--global-batch", type=int, default=12)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--passes", type=int, default=1, help="backward passes per optimizer step")
    parser.add_argument("--no-hvd", dest="hvd", action="store_false",
                        help="train: plain optimizer on the whole batch (the reference)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode == "api":
        check_api()
    elif args.mode == "mismatch":
        check_mismatch()
    elif args.mode == "train":
        train(args)
    elif args.mode == "exit":
        exit_early(args.how)
    elif args.mode == "stall":
        stall(args.how)
    else:
        fail()


if __name__ == "__main__":
    sys.exit(main())
