"""The alpha-beta cost model against measurement: fit latency and bandwidth, predict the CNN's allreduce.

Run:  python benchmarks/scaling_bench.py                 (launches mpiexec -n 2 and -n 4 itself)
      python benchmarks/scaling_bench.py --ranks 2 --nbytes 1048576

Ranks 0 and 1 ping-pong messages of 8 B to 4 MB; a fit of ``alpha + n beta`` to those times is this
machine's link, and numpy's add of the same buffer gives ``gamma``. The model (workshop_lib.scaling) then
predicts the ring allreduce of the CNN's gradient (about 13 MB) on 2 and 4 ranks, printed next to the time
measured in the same run, and extrapolates ring, recursive doubling, parameter server and hierarchical
allreduce to 8 .. 4096 ranks, with the network link either the one measured here or the one you give
(``--network-GBps``, ``--network-latency-us``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(args):
    import numpy as np
    from mpi4py import MPI

    from workshop_lib.bench import best_time, time_allreduce
    from workshop_lib.comm import Communicator
    from workshop_lib.scaling import measure_link

    world = MPI.COMM_WORLD
    sizes, seconds = measure_link(world, repeats=args.repeats)
    a = np.ones(args.nbytes // 4, dtype=np.float32)
    gamma = best_time(lambda: np.add(a, a, out=a), args.repeats) / a.nbytes
    gamma = world.bcast(gamma, root=0)
    comm = Communicator(shared_memory=False)  # the ring over messages: what the model describes
    row = time_allreduce(args.nbytes, ("mpi", "ring"), args.repeats, comm)
    if world.Get_rank() == 0:
        print(json.dumps({"ranks": world.Get_size(), "sizes": sizes, "seconds": seconds, "gamma": gamma,
                          "row": row}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--nbytes", type=int, default=None, help="allreduce size (default: the CNN's gradient)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks-per-node", type=int, default=None, help="for the hierarchical prediction "
                        "(default: this machine's usable cores)")
    parser.add_argument("--network-GBps", type=float, default=None, help="inter-node bandwidth to assume")
    parser.add_argument("--network-latency-us", type=float, default=None, help="inter-node latency to assume")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from workshop_lib import roofline, scaling, sysinfo

    if args.nbytes is None:
        args.nbytes = scaling.cnn_gradient_bytes()
    if args.worker:
        return worker(args)
    print(f"CPU: {sysinfo.cpu_model()}; MPI: {sysinfo.mpi_library_version()}")
    runs = []
    for n in args.ranks:
        proc = sysinfo.run_mpi(n, [__file__, "--worker", "--nbytes", args.nbytes, "--repeats", args.repeats],
                               timeout=1800)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = runs[0]
    fitted = scaling.fit_link(first["sizes"], first["seconds"])
    link = scaling.Link(fitted.alpha, fitted.beta, first["gamma"])
    print(f"link (ranks 0-1, fitted): alpha = {link.alpha * 1e6:.2f} us, bandwidth = {link.bandwidth / 1e9:.2f} GB/s, "
          f"reduction gamma = {link.gamma * 1e9:.3f} ns/byte")
    print(f"\nallreduce of {args.nbytes / 1e6:.1f} MB (the ring over messages), model vs measured in this run:")
    print(f"{'ranks':>6s} {'model ms':>10s} {'measured ms':>12s} {'model / measured':>17s} {'MPI ms':>9s}")
    comparison = []
    for run in runs:
        p = run["ranks"]
        model = scaling.ring_time(args.nbytes, p, link)
        measured = run["row"]["ring"]
        comparison.append({"ranks": p, "model": model, "measured": measured, "mpi": run["row"]["mpi"]})
        print(f"{p:6d} {model * 1e3:10.2f} {measured * 1e3:12.2f} {model / measured:17.2f} {run['row']['mpi'] * 1e3:9.2f}")
    roofs = roofline.benchmark_roofs((), memory=True)
    for item in comparison:
        print(roofline.fraction_line(f"ring allreduce, {item['ranks']} ranks", None, item["measured"], roofs, "memory",
                                     roofline.allreduce_counts(args.nbytes, item["ranks"])))
    network = scaling.Link(args.network_latency_us * 1e-6 if args.network_latency_us is not None else link.alpha,
                           1 / (args.network_GBps * 1e9) if args.network_GBps else link.beta, link.gamma)
    per_node = args.ranks_per_node or sysinfo.core_counts()["usable"]
    table = scaling.predict(args.nbytes, network, ranks_per_node=per_node, intra=link)
    source = "given" if args.network_GBps or args.network_latency_us is not None else "as measured here"
    print(f"\nextrapolation, network link {source} (alpha {network.alpha * 1e6:.2f} us, "
          f"{network.bandwidth / 1e9:.2f} GB/s), {per_node} ranks per node for hierarchical; ms per allreduce:")
    print(f"{'ranks':>6s} " + " ".join(f"{name:>19s}" for name in table))
    for k, p in enumerate(scaling.DEFAULT_RANKS):
        print(f"{p:6d} " + " ".join(f"{table[name][k] * 1e3:19.2f}" for name in table))
    if args.json:
        args.json.write_text(json.dumps({"link": vars(link), "comparison": comparison,
                                         "extrapolation": {k: v.tolist() for k, v in table.items()}}, indent=2))


if __name__ == "__main__":
    main()
