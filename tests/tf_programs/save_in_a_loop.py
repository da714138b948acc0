"""Count steps forever, checkpointing after every step with max_to_keep=1: what test_checkpoints kills.

Run:  python tests/tf_programs/save_in_a_loop.py CHECKPOINT_DIR

It resumes from CHECKPOINT_DIR through MonitoredTrainingSession, prints ``start <step>``
(the global step it resumed at), then runs until it is killed. Every checkpoint holds
``counter``, a vector whose every element equals the global step, so a checkpoint that
mixes two saves shows.
"""

import sys

import numpy as np

import workshop_lib.tf as tf

SIZE = 100_000  # 400 KB per checkpoint: a save takes long enough for kills to land inside it

checkpoint_dir = sys.argv[1]
step = tf.train.get_or_create_global_step()
counter = tf.Variable(np.zeros(SIZE, np.float32), name="counter")
train = tf.group(tf.assign_add(counter, np.ones(SIZE, np.float32)), tf.assign_add(step, np.int64(1)))
hooks = [tf.train.CheckpointSaverHook(checkpoint_dir, save_steps=1, saver=tf.train.Saver(max_to_keep=1))]
with tf.train.MonitoredTrainingSession(checkpoint_dir=checkpoint_dir, hooks=hooks, save_checkpoint_secs=None) as sess:
    print("start", sess.run(step), flush=True)
    while True:
        sess.run(train)
