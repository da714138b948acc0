"""Allreduce benchmark: workshop_lib.comm's ring against MPI's own Allreduce, 2 and 4 ranks, 4 KB to 64 MB.

Run:  python benchmarks/allreduce_bench.py               (launches mpiexec -n 2 and -n 4 itself)
      python benchmarks/allreduce_bench.py --ranks 2 --max-bytes 4194304

Bus bandwidth is 2(p-1)/p * bytes / time, the data each rank's link carries
per second in a ring (NCCL's definition), so 2 and 4 ranks compare directly.
The physical reference, measured in the same run, is this machine's memory
copy bandwidth (read + write). "ours" is the default call, which checks that all
ranks passed the same shape, dtype and op: recursive doubling with the data inside
the check's messages below 8 KB, on one node the shared-memory algorithm from there
to 4 MB (at every size with more ranks than cores), the ring above; "unchecked" skips
the check; "ring" is the ring over point-to-point messages (recursive doubling below
32 KB), checked, which is what runs across nodes; "hvd" is ``hvd.allreduce(x, op=hvd.Sum)``, the eager call users
make. The machine's load shows in every column alike: compare ratios.

"model" is the alpha-beta cost model (workshop_lib.scaling) of that ring, fitted in the
same run from this machine's own exchanges (``Sendrecv`` between ranks 0 and 1, 8 B to
16 MB) and reductions (numpy's add of two chunks), printed next to the measured ring:
``2(p-1)(alpha + n/p beta) + (p-1) n/p gamma``, with beta and gamma scaled by ranks / cores
when there are more ranks than cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(args):
    from mpi4py import MPI

    from workshop_lib.bench import time_allreduce
    from workshop_lib.comm import Communicator
    from workshop_lib.scaling import measure_gamma, measure_link

    comm = Communicator()
    world = MPI.COMM_WORLD
    sizes, seconds = measure_link(world, sizes=(8, 1024, 16384, 262144, 1 << 20, 4 << 20, 16 << 20),
                                  repeats=max(3, args.repeats // 2))
    gamma = world.bcast(measure_gamma(min(args.max_bytes, 16 << 20) // 2, repeats=args.repeats), root=0)
    rows, nbytes = [], 4096
    while nbytes <= args.max_bytes:
        rows.append(time_allreduce(nbytes, ("mpi", "ours", "ours_unchecked", "ring", "hvd"), args.repeats, comm))
        nbytes *= 4
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps({"ranks": comm.size, "rows": rows, "link_bytes": sizes, "link_seconds": seconds,
                          "gamma": gamma}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from workshop_lib import roofline, scaling, sysinfo
    from workshop_lib.bench import memcopy_bandwidth
    from workshop_lib.comm import SMALL_BYTES

    copy = memcopy_bandwidth()
    print(f"CPU: {sysinfo.cpu_model()}; MPI: {sysinfo.mpi_library_version()}")
    print(f"memory copy bandwidth (read + write): {copy / 1e9:.1f} GB/s  (the physical reference)")
    results = {"memcopy_GBps": copy / 1e9, "runs": []}
    roofs = roofline.benchmark_roofs((), memory=True)
    cores = sysinfo.core_counts()["usable"]
    for n in args.ranks:
        proc = sysinfo.run_mpi(n, [__file__, "--worker", "--max-bytes", args.max_bytes, "--repeats", args.repeats],
                               timeout=1800)
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        results["runs"].append(run)
        factor = 2 * (n - 1) / n
        fitted = scaling.fit_link(run["link_bytes"], run["link_seconds"])
        link = scaling.oversubscribed(scaling.Link(fitted.alpha, fitted.beta, run["gamma"]), n, cores)
        run["model_link"] = vars(link)
        print(f"\n{n} ranks on {cores} cores; model link fitted in this run: alpha {link.alpha * 1e6:.2f} us, "
              f"{link.bandwidth / 1e9:.2f} GB/s, reduction {link.gamma * 1e9:.3f} ns/byte"
              + (f" (beta and gamma x {n / cores:g}: more ranks than cores)" if n > cores else ""))
        print(f"          {'bytes':>10s} {'MPI us':>10s} {'ours us':>10s} {'unchecked':>10s} {'ring us':>10s} "
              f"{'model us':>9s} {'model/ring':>10s} {'MPI / ours':>10s} {'MPI / ring':>10s} {'bus GB/s MPI':>13s} "
              f"{'bus GB/s ours':>14s}")
        for row in run["rows"]:
            # the "ring" column is recursive doubling below SMALL_BYTES, as comm's message_algorithm picks
            model = (scaling.ring_time if row["bytes"] >= SMALL_BYTES else scaling.recursive_doubling_time)(
                row["bytes"], n, link)
            row["model"] = model
            print(f"          {row['bytes']:10d} {1e6 * row['mpi']:10.1f} {1e6 * row['ours']:10.1f} "
                  f"{1e6 * row['ours_unchecked']:10.1f} {1e6 * row['ring']:10.1f} {1e6 * model:9.1f} "
                  f"{model / row['ring']:10.2f} {row['mpi'] / row['ours']:10.2f} "
                  f"{row['mpi'] / row['ring']:10.2f} {factor * row['bytes'] / row['mpi'] / 1e9:13.2f} "
                  f"{factor * row['bytes'] / row['ours'] / 1e9:14.2f}")
        small = [r for r in run["rows"] if r["bytes"] == 4096]
        large = [r for r in run["rows"] if r["bytes"] >= 256 * 1024]
        if small:
            print(f"  at 4 KB ours takes {small[0]['ours'] / small[0]['mpi']:.2f}x MPI's time (target <= 1.5)")
        if large:
            worst = min(r["mpi"] / r["ours"] for r in large)
            worst_ring = min(r["mpi"] / r["ring"] for r in large)
            print(f"  from 256 KB up ours is at worst {worst:.2f}x MPI's speed (target >= 1.0); "
                  f"the ring over messages {worst_ring:.2f}x")
            print("  hvd.allreduce(x, op=hvd.Sum), MPI / hvd: " + ", ".join(
                f"{r['bytes'] // 1024} KB {r['mpi'] / r['hvd']:.2f}" for r in large)
                + f"; at worst {min(r['mpi'] / r['hvd'] for r in large):.2f} (target >= 1.0)")
        biggest = max(run["rows"], key=lambda r: r["bytes"])
        for method in ("mpi", "ours", "hvd"):
            if method in biggest:
                print("  " + roofline.fraction_line(
                    f"{method} at {biggest['bytes']:,} B (each rank moves 2(p-1)/p of it)", None, biggest[method],
                    roofs, "memory", roofline.allreduce_counts(biggest["bytes"], n)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
