"""A few data-parallel steps with HOROVOD_TIMELINE set, for tests/test_timeline.py.

Launch:  HOROVOD_TIMELINE=/tmp/timeline.json mpiexec -n 2 python tests/mpi_scripts/timeline_train.py --steps 4
"""

import argparse
import sys

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

hvd.init()
rng = np.random.default_rng(hvd.rank())
x = tf.placeholder(tf.float32, [None, 64])
labels = tf.placeholder(tf.int64, [None])
hidden = tf.layers.dense(x, 128, activation=tf.nn.relu)
logits = tf.layers.dense(hidden, 10)
loss = tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)
train_op = hvd.DistributedOptimizer(tf.train.GradientDescentOptimizer(0.1)).minimize(loss)
with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(hvd.broadcast_global_variables(0))
    for _ in range(args.steps):
        sess.run(train_op, {x: rng.standard_normal((32, 64)).astype(np.float32), labels: rng.integers(0, 10, 32)})
total = hvd.allreduce(np.arange(5, dtype=np.int64), op=hvd.Sum)  # an eager call: wait + allreduce, no step
assert total.tolist() == [k * hvd.size() for k in range(5)]
sys.stdout.write(f"rank {hvd.rank()}: {args.steps} steps\n")  # one write: ranks' lines never interleave
sys.stdout.flush()
