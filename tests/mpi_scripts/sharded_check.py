"""ZeRO-1 against plain data parallelism: the same losses, state that moves between sharded and unsharded runs.

``python sharded_check.py --steps 8 [--sharded] --out run.json [--dump state.npz]`` under mpiexec; with
``WORKSHOP_ELASTIC_DIR`` set, every ``--commit-every`` steps is committed there (durably, at rank 0), and a run
resumes from the newest commit it finds. Rank 0's batch at step s is the same for every number of ranks.
"""

import argparse
import json

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--sharded", action="store_true")
parser.add_argument("--commit-every", type=int, default=4)
parser.add_argument("--out", required=True)
parser.add_argument("--dump", default=None, help="rank 0 writes the full state (weights, global step, Adam's) here")
args = parser.parse_args()

hvd.init()
x = tf.placeholder(tf.float32, [None, 20])
y = tf.placeholder(tf.float32, [None])
tf.set_random_seed(3)
w1 = tf.Variable(tf.truncated_normal([20, 64], stddev=0.3), name="w1")
b1 = tf.Variable(np.zeros(64, np.float32), name="b1")
w2 = tf.Variable(tf.truncated_normal([64, 33], stddev=0.3), name="w2")
w3 = tf.Variable(tf.truncated_normal([33, 1], stddev=0.3), name="w3")
pred = tf.reshape(tf.matmul(tf.nn.relu(tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2)), w3), [-1])
loss = tf.reduce_mean(tf.square(pred - y))
opt = hvd.DistributedOptimizer(tf.train.AdamOptimizer(0.01), sharded=args.sharded)
global_step = tf.train.get_or_create_global_step()
train_op = opt.minimize(loss, global_step=global_step)
session = tf.Session()
session.run(tf.global_variables_initializer())
truth = np.random.default_rng(0).standard_normal(20).astype(np.float32)
losses = []


def batch(step):
    rng = np.random.default_rng([step, hvd.rank()])
    data = rng.standard_normal((12, 20)).astype(np.float32)
    return {x: data, y: np.tanh(data @ truth)}


@hvd.elastic.run
def train(state):
    while state.step < args.steps:
        _, value = session.run([train_op, loss], batch(state.step))
        losses.append(float(value))
        state.step += 1
        if state.step % args.commit_every == 0:
            state.commit()


state = hvd.elastic.TensorFlowState(session=session, step=0)
train(state)

full = {v.name_prefix: session.run(v) for v in tf.global_variables()}
if args.sharded:
    gathered = opt.gather_state(session)  # collective
    full.update(gathered or {})
if hvd.rank() == 0:
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "global_step": int(session.run(global_step)), "size": hvd.size(),
                   "state_bytes": (opt.state_bytes(session) if args.sharded else
                                   int(sum(session.run(v).nbytes for v in opt.variables())))}, f)
    if args.dump:
        np.savez(args.dump, **full)
