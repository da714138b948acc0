"""An hvd.elastic program that fails on purpose: launch 0's rank 1 raises, launch 1's rank 1 hangs, launch 2 finishes.

Under ``workshop launch --min-np``: a counter is summed over the ranks (an allreduce per step) and committed every
``--commit-every`` steps; rank 0 writes the final step and the sum to ``--out``. The failures come two steps after
the second commit of a launch, so each launch loses an uncommitted tail of two steps.
"""

import argparse
import json
import os
import time

import numpy as np

import workshop_lib.hvd as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--commit-every", type=int, default=5)
parser.add_argument("--out", required=True)
args = parser.parse_args()
hvd.init()
restart = int(os.environ.get("WORKSHOP_ELASTIC_RESTART", "0"))


@hvd.elastic.run
def train(state):
    commits = 0
    while state.step < args.steps:
        state.total += int(hvd.allreduce(np.ones(1, np.int64), op=hvd.Sum)[0])
        state.step += 1
        if state.step % args.commit_every == 0:
            state.commit()
            commits += 1
        if commits == 2 and state.step % args.commit_every == 2 and hvd.rank() == 1:
            if restart == 0:
                raise RuntimeError("fault injected: rank 1 raises")
            if restart == 1:
                time.sleep(600)  # the others wait in the next allreduce until the stall inspector ends the job


state = hvd.elastic.ObjectState(step=0, total=0)
train(state)
if hvd.rank() == 0:
    with open(args.out, "w") as f:
        json.dump({"step": state.step, "total": state.total, "size": hvd.size()}, f)
