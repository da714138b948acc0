"""Faults injected into one elastic training run of the labs' CNN, counted: does it finish, exactly, and how fast?

Run:  python benchmarks/elastic_bench.py                      (10 faults, 4 ranks down to 2, 320 steps)
      python benchmarks/elastic_bench.py --faults 3 --steps 80 --json elastic.json

``benchmarks/elastic_mnist.py`` runs under the elastic driver (``workshop launch -n N --min-np M --max-np N
--host-discovery-script``) twice: once without faults, and once while this script breaks it on purpose, cycling
through a rank SIGKILLed (at a random step), a rank raising an exception, and a rank hanging past the stall
inspector's shutdown time (``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, set to ``--stall-shutdown``, default 60 s: it
must exceed how far the ranks drift apart at a relaunch's first step, when each loads its kernels, or the inspector
ends healthy relaunches too; a hang's time lost includes it). Before each fault
the discovery file is set to the next size of ``--sizes``, so the job is relaunched on 2, 3 or 4 ranks.

Reported: every fault and how the driver named it; whether the run finished; its final global step against
``--steps`` (exact); held-out accuracy against the uninterrupted run; per failure the time from the fault to the
resumed training (detection + relaunch + restore: Python, MPI and the first step's kernels loading), median and max
(target <= 10 s); and the whole run's extra wall time per failure (which also counts the uncommitted tail trained
again and the first steps after a restart). Figures on a shared machine: the load (``uptime``) is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROGRAM = ROOT / "benchmarks" / "elastic_mnist.py"
KINDS = ("kill", "raise", "kill", "hang", "kill")


def _events(folder):
    from workshop_lib.elastic import read_events  # whole lines only: the driver may be writing one

    return read_events(folder)


def _load():
    return os.getloadavg()[0]


def run(args, folder, faults):
    """One driver run; with ``faults`` > 0 they are injected. Returns (result, events, injected, wall seconds)."""
    folder.mkdir(parents=True)
    hosts, discover = folder.parent / f"{folder.name}-hosts.txt", folder.parent / f"{folder.name}-discover.sh"
    hosts.write_text(f"localhost:{args.n}\n")
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    out = folder.parent / f"{folder.name}-result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1",
               HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=str(args.stall_shutdown), HOROVOD_STALL_CHECK_TIME_SECONDS="2")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "workshop_lib.cli", "launch", str(PROGRAM), "-n", str(args.n), "--min-np",
           str(args.min_np), "--max-np", str(args.n), "--host-discovery-script", str(discover), "--elastic-dir",
           str(folder), "--reset-limit", str(faults + 5), "--", "--steps", str(args.steps), "--commit-every",
           str(args.commit_every), "--batch-size", str(args.batch_size), "--out", str(out)]
    rng = random.Random(args.seed)
    log = open(folder.parent / f"{folder.name}-driver.log", "w")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    injected, wait_commits, launch_seen = [], None, 0
    try:
        while proc.poll() is None:
            time.sleep(0.05)
            if len(injected) >= faults:
                continue
            events = _events(folder)
            launches = [e for e in events if e["event"] == "launch"]
            if len(launches) != len(injected) + 1:
                continue  # the last fault's relaunch has not started yet
            since = [e for e in events if e["event"] == "commit" and e["t"] > launches[-1]["t"]]
            if wait_commits is None or launch_seen != len(launches):
                wait_commits, launch_seen = rng.randint(1, 2), len(launches)
                delay = rng.uniform(0, 1.5)  # past the commit: a random step between two commits
            if len(since) < wait_commits or time.time() - since[-1]["t"] < delay:
                continue
            if since[-1]["step"] >= args.steps - 2 * args.commit_every:
                continue  # too near the end to be sure the fault lands in training
            kind = KINDS[len(injected) % len(KINDS)]
            size = launches[-1]["size"]
            rank = rng.randrange(1, size) if kind != "kill" else rng.randrange(size)
            if kind == "kill":
                pid_file = folder / "pids" / f"rank-{rank}"
                if not pid_file.exists():
                    continue
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                injected.append({"kind": kind, "rank": rank, "t": time.time(), "size": size})
            else:
                (folder / "fault").write_text(f"{kind} {rank}\n")
                injected.append({"kind": kind, "rank": rank, "t": None, "size": size})
            hosts.write_text(f"localhost:{args.sizes[(len(injected) - 1) % len(args.sizes)]}\n")  # next launch's
            print(f"  fault {len(injected)}: {kind} rank {rank} of {size}", flush=True)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    wall = time.time() - start
    events = _events(folder)
    taken = [e for e in events if e["event"] == "fault"]
    for fault in injected:  # raise/hang: the time the rank took the fault
        if fault["t"] is None and taken:
            fault["t"] = taken.pop(0)["t"]
    result = json.loads(out.read_text()) if out.exists() else None
    return result, events, injected, wall, proc.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("-n", type=int, default=4, help="ranks of the first launch (and --max-np)")
    parser.add_argument("--min-np", type=int, default=2)
    parser.add_argument("--sizes", default="3,2,4", help="slots the discovery reports after each fault, in turn")
    parser.add_argument("--commit-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stall-shutdown", type=float, default=60.0,
                        help="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS: a hang is detected after it; it must exceed the "
                             "ranks' skew at a relaunch's first step (30 s and more on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if min(args.sizes) < args.min_np or max(args.sizes) > args.n:
        parser.error(f"--sizes {args.sizes}: expected sizes between --min-np {args.min_np} and -n {args.n}")
    from workshop_lib import sysinfo

    cpu = sysinfo.cpu_model()
    work = Path(tempfile.mkdtemp(prefix="elastic-bench-"))
    print(f"elastic_bench: {args.steps} steps of {args.batch_size} images per rank, commit every "
          f"{args.commit_every}; {args.faults} faults; CPU {cpu}; load {_load():.1f}", flush=True)
    load_before = _load()
    base, _, _, base_wall, base_rc = run(args, work / "uninterrupted", 0)
    print(f"uninterrupted: status {base_rc}, {base and base['global_step']} steps, accuracy "
          f"{base and base['test_accuracy']:.4f}, {base_wall:.1f} s", flush=True)
    got, events, injected, wall, rc = run(args, work / "faulted", args.faults)
    resumed = [e for e in events if e["event"] == "resumed"]
    ends = [e for e in events if e["event"] == "ended"]
    lost, by_kind = [], {}
    for fault in injected:
        after = [e for e in resumed if fault["t"] is not None and e["t"] > fault["t"]]
        if after:
            fault["lost"] = after[0]["t"] - fault["t"]
            lost.append(fault["lost"])
            by_kind.setdefault(fault["kind"], []).append(fault["lost"])
    finished = rc == 0 and got is not None
    summary = {
        "faults": injected, "causes": [e["cause"] for e in ends], "sizes": [e["size"] for e in events
                                                                            if e["event"] == "launch"],
        "finished": finished, "global_step": got and got["global_step"], "expected_step": args.steps,
        "accuracy": got and got["test_accuracy"], "accuracy_uninterrupted": base and base["test_accuracy"],
        "lost_seconds": lost, "lost_median": statistics.median(lost) if lost else None,
        "lost_max": max(lost) if lost else None, "wall": wall, "wall_uninterrupted": base_wall,
        "extra_per_failure": (wall - base_wall) / max(len(injected), 1), "load": [load_before, _load()],
        "cpu": cpu, "work": str(work)}
    kinds = {k: sum(f["kind"] == k for f in injected) for k in ("kill", "raise", "hang")}
    print(f"faults injected: {len(injected)} ({kinds['kill']} SIGKILL, {kinds['raise']} raise, {kinds['hang']} hang); "
          f"launch sizes {summary['sizes']}")
    for cause in summary["causes"]:
        print(f"  driver: {cause}")
    print(f"finished: {'yes' if finished else 'NO'}; final global step {summary['global_step']} "
          f"(expected {args.steps}: {'exact' if summary['global_step'] == args.steps else 'WRONG'})")
    if got and base:
        print(f"held-out accuracy: {got['test_accuracy']:.4f} with faults, {base['test_accuracy']:.4f} uninterrupted "
              f"(difference {got['test_accuracy'] - base['test_accuracy']:+.4f} on 2,000 images)")
    if lost:
        verdict = "meets" if summary["lost_max"] <= 10 else "misses"
        print(f"time lost per failure (fault -> resumed): median {summary['lost_median']:.1f} s, max "
              f"{summary['lost_max']:.1f} s over {len(lost)} ({verdict} the 10 s target); whole run: "
              f"{wall:.0f} s vs {base_wall:.0f} s, {summary['extra_per_failure']:.1f} s extra per failure")
    for kind, values in by_kind.items():
        print(f"  {kind}: fault -> resumed median {statistics.median(values):.1f} s, max {max(values):.1f} s "
              f"({len(values)})" + (f", of which {args.stall_shutdown:g} s is the stall inspector's shutdown time"
                                    if kind == "hang" else ""))
    print(f"load average {load_before:.1f} before, {_load():.1f} after, on {os.cpu_count()} CPUs; runs in {work}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if finished and summary["global_step"] == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
