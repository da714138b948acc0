"""The ``workshop`` command: ``check``, ``build-labs [--check]``, ``train mnist``, ``bench cnn|int8|kmeans``."""

from __future__ import annotations

import argparse
import json
import sys


def _check(args) -> int:
    from . import placement, sysinfo

    info = sysinfo.report(mpi_check=not args.no_mpi)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(sysinfo.format_report(info))
        print(placement.format_plan(args.ranks))
    found = sysinfo.problems(info)
    for problem in found:
        print(f"ERROR: {problem}", file=sys.stderr)
    if not found and not args.json:
        print("Everything the labs need is working.")
    return 1 if found else 0


def _build_labs(args) -> int:
    from . import course

    try:
        if args.check:
            stale = course.stale_labs(args.solutions, args.labs)
            if stale:
                print("labs/ is out of date with solutions/; run `workshop build-labs`. Stale:", file=sys.stderr)
                for path in stale:
                    print(f"  {path}", file=sys.stderr)
                return 1
            print(f"{args.labs} is in sync with {args.solutions}")
            return 0
        written = course.build_labs(args.solutions, args.labs)
    except (course.MarkerError, FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"{len(written)} file(s) updated in {args.labs}" if written else f"{args.labs} already up to date")
    return 0


def _train(args) -> int:
    from . import models
    from .data import load_mnist

    data = load_mnist()
    train = models.train_mnist_cnn_tf if args.engine == "tf" else models.train_mnist_cnn
    params, history = train(args.steps, args.batch_size, args.lr, seed=args.seed, data=data, progress=not args.quiet)
    meta = models.training_metadata(history, params, data, args.seed, args.steps, args.batch_size, args.lr)
    meta["engine"] = args.engine
    out = args.out or models.default_model_path()
    models.save_model(out, params, meta)
    print(f"held-out accuracy {meta['accuracy']:.4f} after {args.steps} steps ({meta['train_seconds']} s); wrote {out}")
    return 0


def _bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}_bench.py"
    if not script.exists():
        print(f"ERROR: {script} not found; `workshop bench` runs the benchmarks of a clone of the course",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workshop", description="Deep Learning at Scale: course tools")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report CPU features, threads and MPI; fail if something essential is broken")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--no-mpi", action="store_true", help="skip starting 2 MPI ranks")
    check.add_argument("--ranks", type=_positive_int, default=1,
                       help="show the cores and threads each of N ranks on this node would get (default 1)")
    check.set_defaults(func=_check)

    build = sub.add_parser("build-labs", help="generate labs/ from solutions/")
    build.add_argument("--check", action="store_true", help="exit non-zero if labs/ is stale instead of writing")
    build.add_argument("--solutions", default="solutions", help="source folder (default: solutions)")
    build.add_argument("--labs", default="labs", help="output folder (default: labs)")
    build.set_defaults(func=_build_labs)

    train = sub.add_parser("train", help="train a model of the labs deterministically")
    train.add_argument("model", choices=["mnist"], help="the labs' MNIST CNN")
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--batch-size", type=int, default=50)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="output .npz (default: data/models/mnist_cnn.npz)")
    train.add_argument("--engine", choices=["kernels", "tf"], default="kernels",
                       help="train with the kernels directly or with the workshop_lib.tf graph engine")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="run a benchmark of benchmarks/: cnn, int8 or kmeans")
    bench.add_argument("name", choices=["cnn", "int8", "kmeans"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
