"""The ``workshop`` command: ``check``, ``build-labs [--check]``, ``train mnist``, ``bench NAME``, ``launch``,
``warm``, ``report``, ``collect``, ``roofline``, ``--version``."""

from __future__ import annotations

import argparse
import json
import sys


def kernel_paths() -> dict:
    """``{kernel family: the path it takes in this process}``, chosen from numba's compile target."""
    import numpy as np

    from . import int8, jit_conv

    from threadpoolctl import threadpool_info

    blas = next((lib.get("internal_api", "?") for lib in threadpool_info() if lib.get("user_api") == "blas"),
                "the BLAS numpy was built with")
    lanes = jit_conv.simd_lanes()
    isa = int8.vnni_isa()
    vnni = int8.describe_isa(isa)
    return {
        "fp32 GEMM": f"numpy {np.__version__} matmul ({blas})",
        "fp32 conv": (f"jit direct convolution, {lanes}-lane FMA vectors" if lanes
                      else "im2col + BLAS (the target has no AVX2+FMA or AVX-512F vectors)"),
        "int8 GEMM/conv": vnni or "portable numba loops (the target has no VNNI)",
        "int8 fused layers": (f"fused {vnni}" if int8.fused_isa() else "unfused: the int8 GEMM's path + requantize"),
        "K-Means (d4p Lloyd)": "numba loops, vectorized by LLVM for the target",
    }


def _check(args) -> int:
    from . import placement, sysinfo

    try:
        info = sysinfo.report(mpi_check=not args.no_mpi)
    except Exception as exc:  # noqa: BLE001 - a diagnosis tool reports what broke, never a traceback
        print(f"ERROR: workshop check could not finish: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        info["kernel_paths"] = kernel_paths()
    except Exception as exc:  # noqa: BLE001 - numba cannot import: the problems below say why
        info["kernel_paths"] = {"every kernel": f"unavailable ({type(exc).__name__}: {exc})"}
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
    from .launch import shm_problem

    found += [p for p in [shm_problem(args.ranks)] if p]  # MPICH's share of /dev/shm grows with the ranks
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
    except (course.MarkerError, OSError, ValueError) as exc:
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
    from .data import DataError, check_output_path

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
    try:  # before the training: a typo must not cost the run
        check_output_path(out, (".npz",), "--out")
    except ValueError as exc:
        return None, str(exc)
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
    if args.name == "faults":  # the fault campaign, benchmarks/faults.py: outcomes, not timings
        script = script.with_name("faults.py")
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
    found += ["faults"] if (_benchmarks_dir() / "faults.py").exists() else []
    return found or ["allreduce", "cnn", "horovod", "int8", "kmeans"]


def _launch(args) -> int:
    import subprocess

    from . import launch

    try:
        if args.batch:
            if args.scheduler != "slurm":
                raise ValueError("--batch writes a Slurm batch script; add --scheduler slurm")
            nodes, per_node, _, threads = launch.job_layout(args.n, args.nodes, None, args.cpus_per_node)
            print(launch.batch_script(args.script, nodes, per_node, threads, args.args, python=sys.executable), end="")
            return 0
        mpiexec = args.mpiexec
        if args.dry_run and args.mpi and mpiexec is None and args.scheduler == "mpiexec":
            try:  # a line written here for another machine: that machine's `mpiexec`, when this one has none
                mpiexec = launch.find_mpiexec(args.mpi)
            except RuntimeError as exc:
                print(f"note: {exc}; the line says `mpiexec`", file=sys.stderr)
                mpiexec = "mpiexec"
        if args.min_np is not None:  # elastic: relaunched on the slots left when a rank dies (hvd.elastic)
            driver = launch.ElasticDriver(args.script, args.n, args.min_np, args.max_np, args.host_discovery_script,
                                          args.reset_limit, args.elastic_dir, args.scheduler, args.mpi, args.args,
                                          args.cpus_per_node)
            if args.dry_run:
                print(launch.format_command(driver.command(args.n)))
                return 0
            return driver.run()
        cmd = launch.launch_command(args.script, args.n, nodes=args.nodes, hostfile=args.hostfile,
                                    scheduler=args.scheduler, mpi=args.mpi, args=args.args,
                                    cpus_per_node=args.cpus_per_node, mpiexec=mpiexec, verbose=args.verbose)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(launch.format_command(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(cmd).returncode


def _expected(args) -> int:
    from . import expected

    try:
        current = expected.update(check=args.check)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    if args.check and not current:
        print(f"{expected.GUIDE} disagrees with the figures in {expected.FIGURES_DIR}; run `workshop report --expected`",
              file=sys.stderr)
        return 1
    print(f"{expected.GUIDE}: expected figures {'up to date' if current else 'regenerated'}")
    return 0


def _warm(args) -> int:
    from . import warm

    warm.warm(progress=not args.quiet)
    return 0


def _report(args) -> int:
    if args.expected:
        return _expected(args)
    from . import board
    from .bench import results_path

    try:
        if args.name is not None and ("/" in args.name or "\\" in args.name or args.name.strip() in ("", ".", "..")):
            raise ValueError(f"--name {args.name!r}: expected a name without '/' or '\\' (it is also the file name "
                             "workshop-report-NAME.json)")
        out = args.out or f"workshop-report-{args.name or 'me'}.json"
        report = board.write_report(out, learner=args.name)
    except (ValueError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"{len(report['figures'])} figure(s) from {results_path()} on {report['cpu']} ({board.group_of(report)}); "
          f"wrote {out}: hand it to your instructor")
    return 0


def _collect(args) -> int:
    from . import board

    skipped = []
    try:
        reports = board.collect(args.folder, args.out, skipped=skipped)
    except (ValueError, OSError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    finally:
        for path, why in skipped:
            print(f"WARNING: skipped {path}: {why}", file=sys.stderr)
    groups = sorted({board.group_of(r) for r in reports})
    print(f"{len(reports)} report(s) in {len(groups)} group(s) ({'; '.join(groups)}); wrote {args.out}")
    return 0


_ALLREDUCE_SCRIPT = """
import json
from mpi4py import MPI
from workshop_lib import bench
rows = [bench.time_allreduce(n, methods=("mpi", "hvd")) for n in (4096, 64 << 20)]
if MPI.COMM_WORLD.Get_rank() == 0:
    print("ROWS", json.dumps(rows))
"""


def _roofline_extras(roofs, ranks, points, clusters):
    """K-Means (through d4p's public API) and the allreduce (2 ranks under mpiexec) placed on ``roofs``."""
    import numpy as np

    from . import bench, d4p, roofline, sysinfo

    x = np.random.default_rng(0).random((points, 3))
    init = d4p.kmeans_init(clusters, method="plusPlusDense")
    centroids = init.compute(x).centroids
    rows = []
    one_pass = [bench.best_time(lambda it=it: d4p.kmeans(clusters, it, assignFlag=False).compute(x, centroids))
                for it in (0, 1)]  # one more Lloyd iteration is exactly one more pass
    ops, moved = roofline.lloyd_counts(points, 3, clusters)
    rows.append(roofline.place(roofs, f"K-Means Lloyd pass (n={points}, k={clusters})", "fp32", ops, moved,
                               max(one_pass[1] - one_pass[0], 1e-9)))
    ops, moved = roofline.kmeanspp_step_counts(points, 3)
    rows.append(roofline.place(roofs, f"k-means++ ({clusters - 1} steps)", "fp32", ops * (clusters - 1),
                               moved * (clusters - 1), bench.best_time(lambda: init.compute(x))))
    if ranks:
        out = sysinfo.run_mpi(ranks, ["-c", _ALLREDUCE_SCRIPT], timeout=300)
        for row in json.loads(out.stdout.split("ROWS", 1)[1]):
            moved = roofline.allreduce_counts(row["bytes"], ranks)
            for method in ("mpi", "hvd"):
                label = "MPI Allreduce" if method == "mpi" else "hvd.allreduce"
                rows.append(roofline.place(roofs, f"{label} {row['bytes']:,} B x {ranks} ranks (moves 2(p-1)/p)",
                                           "memory", None, moved, row[method]))
    return rows


def _roofline(args) -> int:
    from . import bench, roofline

    result = roofline.report(args.duration, timer=bench.best_time)
    result["kernels"] += _roofline_extras(result, 0 if args.no_mpi else 2, args.points, 16)
    if args.plot:
        from . import figures

        figures.roofline_plot(result).savefig(args.plot, dpi=120)
    print(json.dumps(result, indent=1, default=str) if args.json else roofline.format_table(result))
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
                       help="show the cores and threads each of N ranks on this node would get, and check that "
                            "/dev/shm holds N ranks (default 1)")
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
                     help="CPUs per node shared by its ranks (default: the Slurm allocation's, else the CPUs "
                          "this process may use)")
    run.add_argument("--mpiexec", default=None,
                     help="the launcher to use (default: the one next to this Python, or on PATH for --mpi)")
    run.add_argument("--verbose", action="store_true",
                     help="show each rank's binding (the launcher's report and the library's placement)")
    run.add_argument("--dry-run", action="store_true", help="print the line only")
    run.add_argument("--batch", action="store_true", help="with --scheduler slurm: print a batch script instead")
    run.add_argument("--min-np", type=int, default=None, help="elastic (hvd.elastic scripts): go on with at least "
                     "this many ranks, relaunching from the last commit when a rank dies")
    run.add_argument("--max-np", type=int, default=None, help="elastic: at most this many ranks (default: -n)")
    run.add_argument("--host-discovery-script", default=None, help="elastic: executable printing `host:slots` lines")
    run.add_argument("--reset-limit", type=int, default=20, help="elastic: most relaunches (default 20)")
    run.add_argument("--elastic-dir", default=None, help="elastic: folder for commits and the event log "
                     "(default: a new temporary folder; one holding commits is resumed from)")
    run.set_defaults(func=_launch, args=[])

    wrm = sub.add_parser("warm", help="compile every kernel the labs time into numba's cache, for this CPU")
    wrm.add_argument("--quiet", action="store_true", help="no progress bar")
    wrm.set_defaults(func=_warm)

    rep = sub.add_parser("report", help="write your CPU and the figures the labs recorded as one JSON for the class board")
    rep.add_argument("-o", "--out", default=None, help="output file (default: workshop-report-NAME.json)")
    rep.add_argument("--name", default=None, help="your name on the board (default: an anonymous id)")
    rep.add_argument("--expected", action="store_true",
                     help="regenerate docs/instructor_guide.md's expected figures from docs/expected_figures/")
    rep.add_argument("--check", action="store_true", help="with --expected: fail if the guide is out of date")
    rep.set_defaults(func=_report)

    roof = sub.add_parser("roofline", help="measure this CPU's roofs and place the labs' kernels on them")
    roof.add_argument("--json", action="store_true", help="print the result as JSON")
    roof.add_argument("--duration", type=_positive(float, "number"), default=0.3,
                      help="seconds per compute roof and core count (default: 0.3)")
    roof.add_argument("--no-mpi", action="store_true", help="skip the allreduce (2 MPI ranks)")
    roof.add_argument("--points", type=_positive_int, default=1 << 20, help="K-Means points (default: 1048576)")
    roof.add_argument("--plot", default=None, help="also draw the log-log roofline into this image file")
    roof.set_defaults(func=_roofline)

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
