"""Data-parallel training of a CNN on MNIST with Horovod's TensorFlow-1 API.

The TF1-era Horovod sample (``examples/tensorflow_mnist.py``), with these changes:
the imports (``workshop_lib.tf`` / ``workshop_lib.hvd`` instead of ``tensorflow`` /
``horovod.tensorflow``), the dataset loader (``workshop_lib.data`` instead of
a download), argument checks, each rank's cores, and a results file; lab 03 shows each. Run it with any number of ranks::

    mpiexec -n 2 python tensorflow_mnist.py --steps 1000 --batch-size 100

Each rank trains on its own shuffle of the data; gradients are averaged over
the ranks at every step. The six steps of the slides are marked (1) to (6).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf
from workshop_lib import placement
from workshop_lib.data import atomic_write, check_output_path, load_mnist

layers = tf.layers
tf.logging.set_verbosity(tf.logging.INFO)


def conv_model(feature, target, mode):
    """2-layer convolution model."""
    # Convert the target to a one-hot tensor of shape (batch_size, 10) with a on-value of 1 for each one-hot vector
    # of length 10.
    target = tf.one_hot(tf.cast(target, tf.int32), 10, 1, 0)

    # Reshape feature to 4d tensor with 2nd and 3rd dimensions being image width and height; the final dimension is
    # the number of color channels.
    feature = tf.reshape(feature, [-1, 28, 28, 1])

    # First conv layer will compute 32 features for each 5x5 patch
    with tf.variable_scope("conv_layer1"):
        h_conv1 = layers.conv2d(feature, 32, kernel_size=[5, 5], activation=tf.nn.relu, padding="SAME")
        h_pool1 = tf.nn.max_pool(h_conv1, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME")

    # Second conv layer will compute 64 features for each 5x5 patch.
    with tf.variable_scope("conv_layer2"):
        h_conv2 = layers.conv2d(h_pool1, 64, kernel_size=[5, 5], activation=tf.nn.relu, padding="SAME")
        h_pool2 = tf.nn.max_pool(h_conv2, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME")
        # reshape tensor into a batch of vectors
        h_pool2_flat = tf.reshape(h_pool2, [-1, 7 * 7 * 64])

    # Densely connected layer with 1024 neurons.
    h_fc1 = layers.dropout(layers.dense(h_pool2_flat, 1024, activation=tf.nn.relu), rate=0.5,
                           training=mode == tf.estimator.ModeKeys.TRAIN)

    # Compute logits (1 per class) and compute loss.
    logits = layers.dense(h_fc1, 10, activation=None)
    loss = tf.losses.softmax_cross_entropy(target, logits)

    return tf.argmax(logits, 1), loss


def train_input_generator(x_train, y_train, batch_size=64, seed=None):
    assert len(x_train) == len(y_train)
    if not 1 <= batch_size <= len(x_train):  # a larger batch would never be yielded: the loop below would spin
        raise ValueError(f"--batch-size {batch_size}: expected at most the {len(x_train)} training images")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(len(x_train))
        x_train, y_train = x_train[p], y_train[p]
        index = 0
        while index <= len(x_train) - batch_size:
            yield x_train[index:index + batch_size], y_train[index:index + batch_size],
            index += batch_size


def test_accuracy(checkpoint_dir, x_test, y_test, batch_size=500):
    """Rebuild the model for evaluation (no dropout), restore the latest checkpoint, and score the held-out set."""
    with tf.Graph().as_default():
        image = tf.placeholder(tf.float32, [None, 784], name="image")
        label = tf.placeholder(tf.float32, [None], name="label")
        predict, _ = conv_model(image, label, tf.estimator.ModeKeys.EVAL)
        with tf.Session() as sess:
            tf.train.Saver().restore(sess, tf.train.latest_checkpoint(checkpoint_dir))
            hits = 0
            for i in range(0, len(x_test), batch_size):
                hits += int((sess.run(predict, {image: x_test[i:i + batch_size]}) == y_test[i:i + batch_size]).sum())
    return hits / len(x_test)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps for one rank; each of N ranks runs steps // N")
    parser.add_argument("--batch-size", type=int, default=100, help="images per step on each rank")
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate for one rank (scaled by the ranks)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per rank (0: this machine's cores divided by the ranks on it)")
    parser.add_argument("--checkpoint-dir", default="./checkpoints", help="where rank 0 writes checkpoints")
    parser.add_argument("--log-every", type=int, default=10, help="LoggingTensorHook period, in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="rank 0 writes a JSON summary here")
    args = parser.parse_args()
    # Every rank checks its arguments before hvd.init(), so a bad value ends each one with this message
    for flag, value, ok, expected in (
            ("--steps", args.steps, args.steps >= 1, "a positive integer"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, "a positive integer"),
            ("--lr", args.lr, args.lr > 0 and math.isfinite(args.lr), "a positive number"),
            ("--threads", args.threads, args.threads >= 0, "0 (this machine's share) or a positive integer"),
            ("--log-every", args.log_every, args.log_every >= 1, "a positive integer"),
            ("--seed", args.seed, args.seed >= 0, "a non-negative integer")):
        if not ok:
            parser.error(f"argument {flag}: expected {expected}, got {value}")
    if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        parser.error(f"argument --checkpoint-dir: expected a folder, got {args.checkpoint_dir} (a file)")
    if args.results:
        try:  # before training: a typo must not cost the run
            check_output_path(args.results, (".json",), "--results")
        except ValueError as exc:
            parser.error(str(exc))
    return args


class LossHistoryHook(tf.train.SessionRunHook):
    """Asks for ``loss`` at every step and keeps it (rank 0's go into the --results file)."""

    def __init__(self, loss):
        self.loss, self.history = loss, []

    def before_run(self, run_context):
        return tf.train.SessionRunArgs(self.loss)

    def after_run(self, run_context, run_values):
        self.history.append(float(run_values.results))


def main():
    args = parse_args()

    # (1) Horovod: initialize Horovod.
    hvd.init()

    # Each rank loads the data; the shuffles differ per rank (the seed includes the rank).
    (x_train, y_train), (x_test, y_test) = load_mnist()
    x_train = x_train.reshape(-1, 784).astype(np.float32) / 255.0
    x_test = x_test.reshape(-1, 784).astype(np.float32) / 255.0

    tf.set_random_seed(args.seed)
    with tf.name_scope("input"):
        image = tf.placeholder(tf.float32, [None, 784], name="image")
        label = tf.placeholder(tf.float32, [None], name="label")
    predict, loss = conv_model(image, label, tf.estimator.ModeKeys.TRAIN)

    # (3) Horovod: adjust learning rate based on number of ranks.
    opt = tf.train.AdamOptimizer(args.lr * hvd.size())

    # (4) Horovod: add Horovod Distributed Optimizer.
    opt = hvd.DistributedOptimizer(opt)

    global_step = tf.train.get_or_create_global_step()
    train_op = opt.minimize(loss, global_step=global_step)

    hooks = [
        # (5) Horovod: BroadcastGlobalVariablesHook broadcasts initial variable states from rank 0 to all other
        # processes. This is necessary to ensure consistent initialization of all workers when training is started
        # with random weights or restored from a checkpoint.
        hvd.BroadcastGlobalVariablesHook(0),

        # Horovod: adjust number of steps based on number of ranks.
        tf.train.StopAtStepHook(last_step=args.steps // hvd.size()),

        tf.train.LoggingTensorHook(tensors={"step": global_step, "loss": loss}, every_n_iter=args.log_every),
    ]
    losses = LossHistoryHook(loss)  # every step's loss on this rank, for the lab's loss curves
    hooks.append(losses)

    # (2) Horovod: pin each rank to its share of the cores (on GPUs: one GPU per local rank). On CPUs hvd.init()
    # did it: placement.current() says which cores and threads this rank got; --threads overrides the threads.
    threads = args.threads or placement.current().numba_threads
    config = tf.ConfigProto(intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=1)
    config.gpu_options.allow_growth = True
    config.gpu_options.visible_device_list = str(hvd.local_rank())

    # (6) Horovod: save checkpoints only on worker 0 to prevent other workers from corrupting them.
    checkpoint_dir = args.checkpoint_dir if hvd.rank() == 0 else None
    training_batch_generator = train_input_generator(x_train, y_train, batch_size=args.batch_size,
                                                     seed=args.seed + 1 + hvd.rank())

    # The MonitoredTrainingSession takes care of session initialization, restoring from a checkpoint, saving to a
    # checkpoint, and closing when done or an error occurs.
    # Timing: the steps after the first, as tf_cnn_benchmarks' warm-up does (the first step loads the compiled
    # kernels and allocates); the checkpoint written when the session closes is not a step either.
    start, seconds = None, 0.0
    with tf.train.MonitoredTrainingSession(checkpoint_dir=checkpoint_dir, hooks=hooks, config=config) as mon_sess:
        steps_run = 0
        while not mon_sess.should_stop():
            # Run a training step synchronously.
            image_, label_ = next(training_batch_generator)
            mon_sess.run(train_op, feed_dict={image: image_, label: label_})
            steps_run += 1
            if steps_run == 1:
                start = time.perf_counter()
        if steps_run > 1:
            seconds = time.perf_counter() - start

    if hvd.rank() == 0:
        accuracy = test_accuracy(args.checkpoint_dir, x_test, y_test)
        summary = {"ranks": hvd.size(), "threads_per_rank": threads, "steps_per_rank": steps_run,
                   "batch_per_rank": args.batch_size, "learning_rate": args.lr * hvd.size(), "seconds": seconds,
                   "images_per_second": (steps_run - 1) * args.batch_size * hvd.size() / seconds if seconds else 0.0,
                   "test_accuracy": accuracy, "loss_history": losses.history}
        print(f"ranks={hvd.size()} steps/rank={steps_run} time={seconds:.1f}s "
              f"images/s={summary['images_per_second']:.0f} test accuracy={accuracy:.4f}", flush=True)
        if args.results:
            atomic_write(args.results, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))


if __name__ == "__main__":
    main()
