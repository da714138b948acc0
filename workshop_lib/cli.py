"""The ``workshop`` command: ``check``, ``build-labs [--check]``, ``train mnist``, ``bench NAME``, ``launch``,
``report``, ``collect``, ``--version``."""

from __future__ import annotations

import argparse
import json
import sys


def _check(args) -> int:
    from . import placement, sysinfo

    try:
        info = sysinfo.report(mpi_check=not args.no_mpi)
    except Exception as exc:  # noqa: BLE001 - a diagnosis tool reports what broke, never a traceback
        print(f"ERROR: workshop check could not finish: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        from .bf16 import describe_path

        info["bf16"] = describe_path()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info["bf16"] = f"unavailable ({type(exc).__name__}: {exc})"
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(sysinfo.format_report(info))
        print(f"bf16 kernels: {info['bf16']}")
        try:
            print(placement.format_plan(args.ranks))
        except Exception as exc:  # noqa: BLE001 - e.g. numba refuses NUMBA_NUM_THREADS=0: the problems below say why
            print(f"Placement of {args.ranks} rank(s): unavailable ({type(exc).__name__}: {exc})")
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
    for line in written:  # paths written, and every lab kept because the learner edited it
        print(f"  {line}")
    print(f"{len(written)} change(s) in {args.labs}" if written else f"{args.labs} already up to date")
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
    engine, extra = args.engine, {}
    if args.precision == "bf16":  # mixed precision is a pass of the graph engine
        if engine == "kernels":
            print("note: --precision bf16 trains on the graph engine (--engine tf), whose pass it is", file=sys.stderr)
        import workshop_lib.tf as tf

        engine, extra = "tf", {"config": tf.ConfigProto(graph_options=tf.GraphOptions(precision="bf16"))}
    train = models.train_mnist_cnn_tf if engine == "tf" else models.train_mnist_cnn
    params, history = train(args.steps, args.batch_size, args.lr, seed=args.seed, data=data, progress=not args.quiet,
                            **extra)
    meta = models.training_metadata(history, params, data, args.seed, args.steps, args.batch_size, args.lr)
    meta["engine"], meta["precision"] = engine, args.precision
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


def _benchmarks_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "benchmarks"


def bench_names():
    """The benchmarks ``workshop bench`` runs: every ``benchmarks/NAME_bench.py`` of the course's clone."""
    found = sorted(p.name[: -len("_bench.py")] for p in _benchmarks_dir().glob("*_bench.py"))
    return found or ["allreduce", "cnn", "horovod", "int8", "kmeans"]


def _launch(args) -> int:
    import subprocess

    from . import launch

    try:
        if args.batch:
            if args.scheduler != "slurm":
                raise ValueError("--batch writes a Slurm batch script; add --scheduler slurm")
            nodes, per_node, _, threads = launch.job_layout(args.n, args.nodes, None, args.cpus_per_node)
            print(launch.batch_script(args.script, nodes, per_node, threads, args.args), end="")
            return 0
        cmd = launch.launch_command(args.script, args.n, nodes=args.nodes, hostfile=args.hostfile,
                                    scheduler=args.scheduler, mpi=args.mpi, args=args.args,
                                    cpus_per_node=args.cpus_per_node)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(launch.format_command(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(cmd).returncode


def _report(args) -> int:
    from . import board
    from .bench import results_path

    out = args.out or f"workshop-report-{args.name or 'me'}.json"
    try:
        report = board.write_report(out, learner=args.name)
    except (ValueError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"{len(report['figures'])} figure(s) from {results_path()} on {report['cpu']} ({board.group_of(report)}); "
          f"wrote {out}: hand it to your instructor")
    return 0


def _collect(args) -> int:
    from . import board

    try:
        reports = board.collect(args.folder, args.out)
    except (ValueError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    groups = sorted({board.group_of(r) for r in reports})
    print(f"{len(reports)} report(s) in {len(groups)} group(s) ({'; '.join(groups)}); wrote {args.out}")
    return 0


def _version():
    from . import __version__

    return f"workshop {__version__}"


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workshop", description="Deep Learning at Scale: course tools")
    parser.add_argument("--version", action="version", version=_version())
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
    train.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: mixed precision (bf16 convolutions and matmuls, fp32 weights, loss and update) "
                            "on the graph engine")
    train.set_defaults(func=_train)

    names = bench_names()
    bench = sub.add_parser("bench", help=f"run a benchmark of benchmarks/: {', '.join(names)}")
    bench.add_argument("name", choices=names)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    bench.set_defaults(func=_bench)

    run = sub.add_parser("launch", help="print (and run) the mpiexec or srun line for a script, threads exported and bound",
                         description="Print, then run, the launch line of SCRIPT for the MPI found (or named): "
                                     "thread variables exported the launcher's way (-genv, -x, --export) and "
                                     "each rank bound to its cores. Arguments after -- go to the script.")
    run.add_argument("script", help="the Python script every rank runs")
    run.add_argument("-n", type=int, required=True, help="number of ranks")
    run.add_argument("--nodes", type=int, default=None, help="number of nodes (default: the hostfile's hosts, else 1)")
    run.add_argument("--hostfile", default=None, help="host file (Open MPI `host slots=N` or MPICH `host:N`)")
    run.add_argument("--scheduler", choices=["mpiexec", "slurm"], default="mpiexec")
    run.add_argument("--mpi", choices=["mpich", "openmpi", "intel"], default=None,
                     help="the MPI behind mpiexec (default: asked of `mpiexec --version`)")
    run.add_argument("--cpus-per-node", type=int, default=None,
                     help="CPUs per node shared by its ranks (default: SLURM_CPUS_ON_NODE, else this machine's)")
    run.add_argument("--dry-run", action="store_true", help="print the line only")
    run.add_argument("--batch", action="store_true", help="with --scheduler slurm: print a batch script instead")
    run.set_defaults(func=_launch, args=[])

    rep = sub.add_parser("report", help="write your CPU and the figures the labs recorded as one JSON for the class board")
    rep.add_argument("-o", "--out", default=None, help="output file (default: workshop-report-NAME.json)")
    rep.add_argument("--name", default=None, help="your name on the board (default: an anonymous id)")
    rep.set_defaults(func=_report)

    col = sub.add_parser("collect", help="plot the room's spread from a folder of `workshop report` files")
    col.add_argument("folder", help="folder of report JSON files")
    col.add_argument("-o", "--out", required=True, help="board.png or board.html")
    col.set_defaults(func=_collect)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = []
    if argv[:1] == ["launch"] and "--" in argv:  # what follows -- belongs to the launched script
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "launch":
        args.args = script_args
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
