"""The ``workshop`` command: ``check``, ``build-labs [--check]``, ``train mnist``, ``bench cnn|int8|kmeans``."""

from __future__ import annotations

import argparse
import json
import sys


def _check(args) -> int:
    from . import sysinfo

    info = sysinfo.report(mpi_check=not args.no_mpi)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(sysinfo.format_report(info))
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


def _number(kind, expected, ok):
    """An argparse type: a ``kind`` for which ``ok(value)`` holds, else an error naming the value received."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected
    return parse


def _positive(kind, name):
    import math

    return _number(kind, f"a positive {name}", lambda value: value > 0 and math.isfinite(value))


TRAIN_OUT = "mnist_cnn.npz"  # in the current folder: a course user's run never replaces the model that lab 01 uses


def _train_output(args):
    """The file ``workshop train`` writes, or an error message: the shipped model only with --overwrite-shipped."""
    from pathlib import Path

    from . import models
    from .data import DataError

    try:
        shipped = models.default_model_path().resolve()
    except DataError:  # no data folder: there is no shipped model to protect
        shipped = None
    out = Path(args.out) if args.out else (shipped if args.overwrite_shipped else Path(TRAIN_OUT))
    if out is None:
        return None, "--overwrite-shipped: no data folder found, so there is no shipped model; pass --out"
    if out.is_dir():
        return None, f"--out {out} is a folder; expected a file such as {out / TRAIN_OUT}"
    if shipped is not None and out.resolve() == shipped and not args.overwrite_shipped:
        return None, (f"--out {out} is the shipped model that lab 01 uses; pass --overwrite-shipped to replace it, "
                      f"or write elsewhere (default: ./{TRAIN_OUT})")
    if args.overwrite_shipped and out.resolve() != shipped:
        return None, f"--overwrite-shipped replaces {shipped}; it cannot be combined with --out {out}"
    return out, None


def _train(args) -> int:
    from . import models
    from .data import load_mnist

    out, problem = _train_output(args)
    if problem is None:
        data = load_mnist()
        n_train = len(data[0][0])
        if args.batch_size > n_train:
            problem = f"--batch-size {args.batch_size} is larger than the {n_train} training images"
    if problem is not None:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 2
    train = models.train_mnist_cnn_tf if args.engine == "tf" else models.train_mnist_cnn
    params, history = train(args.steps, args.batch_size, args.lr, seed=args.seed, data=data, progress=not args.quiet)
    meta = models.training_metadata(history, params, data, args.seed, args.steps, args.batch_size, args.lr)
    meta["engine"] = args.engine
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workshop", description="Deep Learning at Scale: course tools")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report CPU features, threads and MPI; fail if something essential is broken")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--no-mpi", action="store_true", help="skip starting 2 MPI ranks")
    check.set_defaults(func=_check)

    build = sub.add_parser("build-labs", help="generate labs/ from solutions/")
    build.add_argument("--check", action="store_true", help="exit non-zero if labs/ is stale instead of writing")
    build.add_argument("--solutions", default="solutions", help="source folder (default: solutions)")
    build.add_argument("--labs", default="labs", help="output folder (default: labs)")
    build.set_defaults(func=_build_labs)

    train = sub.add_parser(
        "train", help="train a model of the labs deterministically",
        description="Train the labs' MNIST CNN deterministically and write it to ./mnist_cnn.npz (or --out). "
                    "The model shipped in data/models/mnist_cnn.npz, which lab 01 uses, is replaced only with "
                    "--overwrite-shipped.")
    train.add_argument("model", choices=["mnist"], help="the labs' MNIST CNN")
    train.add_argument("--steps", type=_positive(int, "integer"), default=3000, help="training steps (default: 3000)")
    train.add_argument("--batch-size", type=_positive(int, "integer"), default=50,
                       help="images per step, at most the 8000 training images (default: 50)")
    train.add_argument("--lr", type=_positive(float, "number"), default=1e-3,
                       help="Adam's learning rate (default: 1e-3)")
    train.add_argument("--seed", type=_number(int, "a non-negative integer", lambda value: value >= 0), default=0)
    train.add_argument("--out", default=None, help=f"output .npz (default: ./{TRAIN_OUT})")
    train.add_argument("--overwrite-shipped", action="store_true",
                       help="write data/models/mnist_cnn.npz, the shipped model lab 01 uses (for maintainers)")
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
