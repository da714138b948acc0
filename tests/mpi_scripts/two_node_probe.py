"""Per rank, on two real nodes: its host and local rank, the hierarchical allreduce against MPI_Allreduce, a timeline.

Launch (tests/test_two_nodes.py, from node1):  HOROVOD_TIMELINE=t.json workshop launch \
    tests/mpi_scripts/two_node_probe.py -n 4 --hostfile hosts
"""

import os
import socket
import sys

import numpy as np
from mpi4py import MPI

import workshop_lib.hvd as hvd
import workshop_lib.tf as tf
from workshop_lib import placement
from workshop_lib.comm import Communicator

hvd.init()
world = MPI.COMM_WORLD
comm = Communicator()
rng = np.random.default_rng(10 + hvd.rank())

# 4 MB of float32: bandwidth-bound, so "auto" takes the hierarchical algorithm across nodes
x = (rng.standard_normal(1_000_003) * 10).astype(np.float32)
got = comm.allreduce(x, op="sum")
algorithm = comm.last_algorithm
wide = x.astype(np.float64)
exact, magnitude = np.empty_like(wide), np.empty_like(wide)
world.Allreduce(wide, exact, op=MPI.SUM)  # MPI's own, in float64: the reference
world.Allreduce(np.abs(wide), magnitude, op=MPI.SUM)
bound = (hvd.size() + 2) * np.finfo(np.float32).eps * magnitude + np.finfo(np.float32).tiny
match = bool(np.all(np.abs(got.astype(np.float64) - exact) <= bound))
same = len(set(world.allgather(got.tobytes()))) == 1

# a few data-parallel steps, so HOROVOD_TIMELINE has compute / wait / allreduce / update on every rank
inputs = tf.placeholder(tf.float32, [None, 64])
labels = tf.placeholder(tf.int64, [None])
logits = tf.layers.dense(tf.layers.dense(inputs, 128, activation=tf.nn.relu), 10)
loss = tf.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)
train_op = hvd.DistributedOptimizer(tf.train.GradientDescentOptimizer(0.1)).minimize(loss)
with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(hvd.broadcast_global_variables(0))
    for _ in range(3):
        sess.run(train_op, {inputs: rng.standard_normal((32, 64)).astype(np.float32),
                            labels: rng.integers(0, 10, 32)})

line = (f"rank {hvd.rank()}/{hvd.size()} host={socket.gethostname()} local={hvd.local_rank()}/{hvd.local_size()} "
        f"nodes={comm.nodes.nodes} simulated={comm.nodes.simulated} algorithm={algorithm} match_MPI={match and same} "
        f"threads={os.environ.get('NUMBA_NUM_THREADS')} cores={placement.format_cpus(os.sched_getaffinity(0))}")
lines = world.gather(line, root=0)
if hvd.rank() == 0:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
