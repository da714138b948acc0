"""ZeRO-1 (``hvd.DistributedOptimizer(opt, sharded=True)``) against plain data parallelism on the labs' CNN.

Run:  python benchmarks/zero_bench.py                   (state bytes at 1, 2, 4 ranks; step time at 2 ranks)
      python benchmarks/zero_bench.py --rounds 4 --steps 3 --json zero.json

Memory: Adam's state per rank, counted from the arrays themselves (``nbytes`` of m, v and the two powers): the
plain optimizer's slot variables in the session, the sharded optimizer's slices (:meth:`state_bytes`), on every
rank of a job of 1, 2 and 4 ranks. Time: one job of 2 ranks builds both training graphs and runs them in
alternating rounds of ``--steps`` steps (same batches, same seeds), so both see the same load; the figure is the
median over rounds of the sharded / plain step-time ratio (target: within 5%). Same-run ratios only: this machine
is shared, and its load is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args):
    import numpy as np

    import workshop_lib.hvd as hvd
    import workshop_lib.tf as tf
    from workshop_lib.data import load_mnist
    from workshop_lib.models import deepnn

    hvd.init()
    (x, y), _ = load_mnist()
    x = x.reshape(-1, 784).astype(np.float32) / 255.0
    runs = {}
    for sharded in (False, True):
        graph = tf.Graph()
        with graph.as_default():
            tf.set_random_seed(0)
            image = tf.placeholder(tf.float32, [None, 784])
            label = tf.placeholder(tf.int64, [None])
            logits, keep = deepnn(image)
            loss = tf.losses.sparse_softmax_cross_entropy(labels=label, logits=logits)
            opt = hvd.DistributedOptimizer(tf.train.AdamOptimizer(1e-3), sharded=sharded)
            train = opt.minimize(loss, global_step=tf.train.get_or_create_global_step())
            session = tf.Session(graph=graph)
            session.run(tf.global_variables_initializer())
            runs[sharded] = (session, train, loss, image, label, keep, opt)
    rows = np.arange(hvd.rank() * args.batch_size, (hvd.rank() + 1) * args.batch_size)
    times = {False: [], True: []}
    losses = {False: [], True: []}
    for round_ in range(args.rounds + 1):  # round 0 warms up both (the first step loads the kernels)
        for sharded in ((False, True) if round_ % 2 == 0 else (True, False)):
            session, train, loss, image, label, keep, _ = runs[sharded]
            feed = {image: x[rows], label: y[rows], keep: 1.0}
            hvd.allreduce(np.zeros(1, np.float32), name="barrier")
            start = time.perf_counter()
            for _ in range(args.steps):
                losses[sharded].append(float(session.run([train, loss], feed)[1]))
            if round_:
                times[sharded].append((time.perf_counter() - start) / args.steps)
    plain_session, *_, plain_opt = runs[False]
    zero_session, *_, zero_opt = runs[True]
    plain_bytes = sum(int(plain_session.run(v).nbytes) for v in plain_opt.variables())
    plain_bytes += sum(int(np.asarray(plain_session.run(p)).nbytes) for p in plain_opt._powers)
    mine = {"rank": hvd.rank(), "plain_bytes": plain_bytes, "sharded_bytes": zero_opt.state_bytes(zero_session),
            "plain_times": times[False], "sharded_times": times[True],
            "loss_gap": max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))}
    everyone = hvd._require().comm.comm.gather(mine, root=0)
    if hvd.rank() == 0:
        Path(args.out).write_text(json.dumps({"size": hvd.size(), "ranks": everyone}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from workshop_lib import sysinfo

    print(f"zero_bench: labs' CNN, Adam, batch {args.batch_size} per rank; CPU {sysinfo.cpu_model()}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    report = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        out = Path(f"/tmp/zero_bench_{os.getpid()}_{n}.json")
        steps = ["--rounds", str(args.rounds if n == 2 else 1), "--steps", str(args.steps if n == 2 else 1)]
        sysinfo.run_mpi(n, [__file__, "--worker", "--out", str(out), "--batch-size", str(args.batch_size), *steps],
                        timeout=1800, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
        got = json.loads(out.read_text())
        out.unlink()
        report[n] = got
        ranks = got["ranks"]
        plain, zero = ranks[0]["plain_bytes"], [r["sharded_bytes"] for r in ranks]
        print(f"{n} rank(s): Adam state per rank {plain:,} B plain, {min(zero):,}-{max(zero):,} B sharded "
              f"({max(zero) / plain:.3f} of plain; 1/{n} = {1 / n:.3f}); largest loss difference "
              f"{max(r['loss_gap'] for r in ranks):.1e} (relative)", flush=True)
        if n == 2:
            ratios = [s / p for s, p in zip(ranks[0]["sharded_times"], ranks[0]["plain_times"])]
            median = statistics.median(ratios)
            verdict = "within" if abs(median - 1) <= 0.05 else "outside"
            print(f"2 ranks: step time sharded / plain, median of {len(ratios)} interleaved rounds: {median:.3f} "
                  f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; plain {statistics.median(ranks[0]['plain_times']):.3f}"
                  f" s/step): {verdict} the 5% target", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
