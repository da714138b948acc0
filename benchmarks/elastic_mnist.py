"""The labs' MNIST CNN trained elastically: run it under the driver, lose ranks, and it goes on from the last commit.

Run:  workshop launch benchmarks/elastic_mnist.py -n 4 --min-np 2 -- --steps 200 --out result.json

Every rank takes ``--batch-size`` images a step from one stream of shuffled epochs (a cursor, ``state.samples``,
counts the images the job has consumed, whatever its number of ranks), and the learning rate is Horovod's
``lr * size``, rescaled by the reset callback when the job comes back on another number of ranks. A commit every
``--commit-every`` steps, taken after the step, so nothing committed is done twice: the global step after recovery
is the committed step, the run ends at exactly ``--steps``, and the images trained on twice are the uncommitted tail
(at most ``--commit-every - 1`` steps' worth).

Faults for the benchmark (``benchmarks/elastic_bench.py``): a file ``fault`` in ``$WORKSHOP_ELASTIC_DIR`` holding
``raise R`` or ``hang R`` makes rank R of the running launch take it (and delete it) at its next step: raise a
RuntimeError (the job guard ends the job) or sleep until the stall inspector ends it.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf
from workshop_lib.data import load_mnist
from workshop_lib.elastic import log_event
from workshop_lib.models import deepnn

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=200, help="global steps in all")
parser.add_argument("--batch-size", type=int, default=32, help="images per step on each rank")
parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of one rank (times the ranks)")
parser.add_argument("--commit-every", type=int, default=10)
parser.add_argument("--sharded", action="store_true", help="hvd.DistributedOptimizer(sharded=True): ZeRO-1")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="rank 0 writes the result (JSON) here")
args = parser.parse_args()
for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--commit-every", args.commit_every)):
    if value < 1:
        parser.error(f"argument {flag}: expected a positive integer, got {value}")

hvd.init()
(x_train, y_train), (x_test, y_test) = load_mnist()
x_train = x_train.reshape(-1, 784).astype(np.float32) / 255.0
x_test = x_test.reshape(-1, 784).astype(np.float32) / 255.0

tf.set_random_seed(args.seed)
image = tf.placeholder(tf.float32, [None, 784], name="image")
label = tf.placeholder(tf.int64, [None], name="label")
logits, keep_prob = deepnn(image)
loss = tf.losses.sparse_softmax_cross_entropy(labels=label, logits=logits)
correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), label), tf.float32))
lr = tf.Variable(np.float32(args.lr * hvd.size()), trainable=False, name="learning_rate")
opt = hvd.DistributedOptimizer(tf.train.AdamOptimizer(lr), sharded=args.sharded)
global_step = tf.train.get_or_create_global_step()
train_op = opt.minimize(loss, global_step=global_step)
session = tf.Session()
session.run(tf.global_variables_initializer())
folder = Path(os.environ["WORKSHOP_ELASTIC_DIR"]) if os.environ.get("WORKSHOP_ELASTIC_DIR") else None


def images(start, count):
    """Images ``start .. start + count`` of the stream of epochs (epoch e is permutation e of the training set)."""
    out = []
    while count:
        epoch, at = divmod(start, len(x_train))
        order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
        take = min(count, len(x_train) - at)
        out.append(order[at:at + take])
        start, count = start + take, count - take
    return np.concatenate(out)


def take_fault():
    """``raise`` or ``hang`` if the benchmark left this rank a fault (it is deleted as it is taken)."""
    path = folder / "fault" if folder is not None else None
    if path is None or not path.exists():
        return None
    try:
        kind, rank = path.read_text().split()
    except ValueError:
        return None
    if int(rank) != hvd.rank():
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    log_event(folder, event="fault", kind=kind, rank=hvd.rank(), step=int(session.run(global_step)))
    return kind


@hvd.elastic.run
def train(state):
    while int(session.run(global_step)) < args.steps:
        per_step = args.batch_size * hvd.size()
        rows = images(state.samples + hvd.rank() * args.batch_size, args.batch_size)
        fault = take_fault()
        if fault == "raise":
            raise RuntimeError(f"fault injected on rank {hvd.rank()}")
        if fault == "hang":
            time.sleep(3600)  # the peers wait in the next allreduce until the stall inspector ends the job
        session.run(train_op, {image: x_train[rows], label: y_train[rows], keep_prob: 0.5})
        state.samples += per_step
        if int(session.run(global_step)) % args.commit_every == 0:
            state.commit()


def on_state_reset():
    lr.load(np.float32(args.lr * hvd.size()), session)  # Horovod's rule, for the new number of ranks
    if hvd.rank() == 0:
        print(f"reset: {hvd.size()} rank(s), learning rate {args.lr * hvd.size():g}", flush=True)


state = hvd.elastic.TensorFlowState(session=session, samples=0)
state.register_reset_callbacks([on_state_reset])
start = time.perf_counter()
train(state)
seconds = time.perf_counter() - start

if hvd.rank() == 0:
    hits = sum(session.run(correct, {image: x_test[i:i + 500], label: y_test[i:i + 500], keep_prob: 1.0})
               for i in range(0, len(x_test), 500))
    result = {"global_step": int(session.run(global_step)), "size": hvd.size(), "samples": state.samples,
              "test_accuracy": float(hits) / len(x_test), "seconds": seconds,
              "learning_rate": float(session.run(lr))}
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result))
