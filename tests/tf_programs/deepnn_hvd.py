"""The seed's deepnn with Horovod's six steps, as the slides write it: no ConfigProto, no thread variables.

Run:  mpiexec -n 2 python tests/tf_programs/deepnn_hvd.py [steps] [results.json]

Rank 0 prints (and writes, when a path is given) the training images per second of all ranks together,
the training loop only. ``benchmarks/horovod_bench.py`` runs it with nothing set in the environment, to
show what placement by default gives a script that pins nothing itself.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workshop_lib.hvd as hvd  # noqa: E402
import workshop_lib.tf as tf  # noqa: E402
from deepnn_seed import deepnn  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402


def main(steps, results=None):
  hvd.init()                                                                    # Horovod: (1) initialize
  (x_train, y_train), _ = load_mnist()                                          # (2) pinning: hvd.init() did it
  x_train = x_train.reshape(-1, 784) / 255.0
  tf.set_random_seed(0)
  x = tf.placeholder(tf.float32, [None, 784])
  y_ = tf.placeholder(tf.int64, [None])
  y_conv, keep_prob = deepnn(x)
  cross_entropy = tf.losses.sparse_softmax_cross_entropy(labels=y_, logits=y_conv)
  opt = tf.train.AdamOptimizer(1e-4 * hvd.size())                               # Horovod: (3) scale the rate
  opt = hvd.DistributedOptimizer(opt)                                           # Horovod: (4) average gradients
  global_step = tf.train.get_or_create_global_step()
  train_step = opt.minimize(cross_entropy, global_step=global_step)
  hooks = [hvd.BroadcastGlobalVariablesHook(0),                                 # Horovod: (5) same start
           tf.train.StopAtStepHook(last_step=steps // hvd.size())]
  checkpoint_dir = None                                                         # Horovod: (6) rank 0 only saves
  rng = np.random.default_rng(hvd.rank())
  with tf.train.MonitoredTrainingSession(checkpoint_dir=checkpoint_dir, hooks=hooks) as sess:
    start, done = time.perf_counter(), 0
    while not sess.should_stop():
      idx = rng.choice(len(x_train), 50, replace=False)
      sess.run(train_step, feed_dict={x: x_train[idx], y_: y_train[idx], keep_prob: 0.5})
      done += 1
  seconds = time.perf_counter() - start
  if hvd.rank() == 0:
    summary = {"ranks": hvd.size(), "steps_per_rank": done, "seconds": seconds,
               "images_per_second": done * 50 * hvd.size() / seconds}
    print(json.dumps(summary), flush=True)
    if results:
      Path(results).write_text(json.dumps(summary))


if __name__ == '__main__':
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, sys.argv[2] if len(sys.argv) > 2 else None)
