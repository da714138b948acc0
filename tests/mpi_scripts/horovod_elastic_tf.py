"""A training script written for Horovod Elastic's TensorFlow API, as Horovod's documentation writes it.

Only the imports differ from a ``horovod.tensorflow`` script (``workshop_lib.tf`` / ``workshop_lib.hvd``). Run it with
``workshop launch tests/mpi_scripts/horovod_elastic_tf.py -n 3 --min-np 2 -- --out result.json``.

The loop is the documentation's: the commit after batch ``b`` records ``state.batch = b``, so a recovery trains
batch ``b`` once more (one extra global step per recovery), then the batches after it that were lost.
"""

import argparse
import json

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batches-per-epoch", type=int, default=30)
parser.add_argument("--batches-per-commit", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--out", default=None)
args = parser.parse_args()

hvd.init()

x = tf.placeholder(tf.float32, [None, 20])
y = tf.placeholder(tf.float32, [None])
tf.set_random_seed(1)
w1 = tf.Variable(tf.truncated_normal([20, 32], stddev=0.3), name="w1")
w2 = tf.Variable(tf.truncated_normal([32, 1], stddev=0.3), name="w2")
pred = tf.reshape(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2), [-1])
loss = tf.reduce_mean(tf.square(pred - y))

base_lr = 0.01
lr = tf.Variable(base_lr * hvd.size(), trainable=False, name="lr")
opt = tf.train.AdamOptimizer(lr)
opt = hvd.DistributedOptimizer(opt)
global_step = tf.train.get_or_create_global_step()
train_op = opt.minimize(loss, global_step=global_step)

session = tf.Session()
session.run(tf.global_variables_initializer())
truth = np.random.default_rng(0).standard_normal(20).astype(np.float32)


def get_random_batch(epoch, batch):
    rng = np.random.default_rng([epoch, batch, hvd.rank()])
    data = rng.standard_normal((args.batch_size, 20)).astype(np.float32)
    return data, np.tanh(data @ truth)


@hvd.elastic.run
def train(state):
    for state.epoch in range(state.epoch, args.epochs):
        for state.batch in range(state.batch, args.batches_per_epoch):
            data, target = get_random_batch(state.epoch, state.batch)
            session.run(train_op, feed_dict={x: data, y: target})
            if state.batch % args.batches_per_commit == 0:
                state.commit()
        state.batch = 0


def on_state_reset():
    lr.load(base_lr * hvd.size(), session)


state = hvd.elastic.TensorFlowState(session=session, batch=0, epoch=0)
state.register_reset_callbacks([on_state_reset])
train(state)

if hvd.rank() == 0 and args.out:
    with open(args.out, "w") as f:
        json.dump({"global_step": int(session.run(global_step)), "size": hvd.size(), "lr": float(session.run(lr)),
                   "loss": float(session.run(loss, {x: get_random_batch(99, 0)[0], y: get_random_batch(99, 0)[1]}))},
                  f)
