"""Benchmark harness in the style of tf_cnn_benchmarks: images/second with uncertainty and jitter.

Mirrors tf_cnn_benchmarks' output (``images/sec: X +/- Y (jitter = Z)``, a total,
an executive summary). The one idea: measure the same model, same data and
same thread count, change one thing, and report ratios from one run.

The course's one measurement method is :func:`measure` (one untimed warm call kept apart, repeats to a
minimum time, median and spread, the machine's state) and :func:`compare` (variants interleaved round by
round, the ratio's spread over the rounds, a :class:`Verdict` that says "faster" only when the whole spread
says so). Every timed cell of the labs uses them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from .data import atomic_write

__all__ = ["measure", "compare", "verdict_apart", "cnn_steps", "energy_joules", "Measurement", "Comparison", "Verdict", "machine_state", "sig",
           "background_load", "RESULTS_ENV", "results_path", "record", "load_results", "best_time", "VARIANTS", "summarize", "report_lines", "measure_cnn", "measure_tensorflow_cnn", "measure_torch_cnn", "executive_summary",
           "ALLREDUCE_METHODS", "time_allreduce", "memcopy_bandwidth"]


RESULTS_ENV = "WORKSHOP_RESULTS"  # relocates the results file (tests and CI point it at a temporary folder)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def results_path():
    """Where :func:`record` keeps the learner's figures: ``$WORKSHOP_RESULTS``, else ``~/.workshop/results.json``."""
    return Path(os.environ.get(RESULTS_ENV) or Path.home() / ".workshop" / "results.json")


def load_results(path=None):
    """``{name: {"value", "how", "unit", "recorded"}}`` of the figures recorded so far (empty if none)."""
    path = Path(path) if path is not None else results_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"results file {path} is not readable JSON ({exc}); delete it or set {RESULTS_ENV}") from None
    figures = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figures, dict):
        raise ValueError(f"results file {path} has no 'figures' table; delete it or set {RESULTS_ENV}")
    return figures


def record(name, value, how, unit=None, path=None):
    """Keep one figure a lab measured, with how it was measured, for ``workshop report`` and the class board.

    Parameters
    ----------
    name : str
        The figure's name, letters, digits and ``_.-`` (e.g. ``"cnn_train_images_per_s_optimized"``).
        Recording a name again replaces its value (the latest run counts).
    value : float
        A finite number.
    how : str
        How it was measured, in a phrase another learner can repeat (sizes, threads, ranks, the reference).
    unit : str, optional
        ``"images/s"``, ``"GB/s"``, ``"x"`` (a ratio), ``"ms"``...
    path : str or Path, optional
        The results file; default :func:`results_path` (``$WORKSHOP_RESULTS`` or ``~/.workshop/results.json``).

    Under MPI, record on rank 0 only (every rank would write the same file).

    Returns
    -------
    Path
        The results file, rewritten atomically (a temporary file renamed over it), so a crash never leaves
        half a file.

    Examples
    --------
    >>> record("int8_gemm_speedup", 3.1, "int8 vs numpy fp32 GEMM, 1024^3, 2 threads, same run", "x")  # doctest: +SKIP
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name={name!r} must be letters, digits and _.- (starting with a letter or digit)")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"value={value!r} for {name!r} must be a finite number")
    if not isinstance(how, str) or not how.strip():
        raise ValueError(f"how={how!r} for {name!r} must say how the figure was measured")
    if unit is not None and not isinstance(unit, str):
        raise TypeError(f"unit={unit!r} must be a str or None")
    path = Path(path) if path is not None else results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        try:  # two labs recording at once must not lose each other's figure (read, change, write)
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock; the write itself is still atomic
            pass
        figures = load_results(path)
        figures[name] = {"value": float(value), "how": how.strip(), "unit": unit,
                         "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_recording_machine()}
        text = json.dumps({"figures": figures}, indent=1, sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _recording_machine():
    """The CPU and the 1-minute load average next to a recorded figure (the expected-figures table shows both)."""
    from .sysinfo import cpu_model

    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"cpu": cpu_model(), "load": load}


@contextlib.contextmanager
def background_load(n):
    """Keep ``n`` busy processes running inside the block (a shared classroom node), stopped after.

    Each is a Python loop that never sleeps, so the measurement sees ``n`` other programs wanting a core.

    Raises
    ------
    ValueError
        If ``n`` is not a non-negative int.
    """
    import subprocess
    import sys

    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int (busy processes)")
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def best_time(fn, repeats=3, warmup=True):
    """The shortest of ``repeats`` wall-clock times of ``fn()`` in seconds (after one warm-up call).

    The minimum is the least disturbed run: on a shared machine, noise only ever adds time. For a figure with
    its spread and the machine's state, use :func:`measure`; to compare variants, :func:`compare`.
    """
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


VARIANTS = ("stock", "reference", "optimized")  # tf.GraphOptions(kernels=NAME); see measure_cnn


def summarize(speeds):
    """(mean, uncertainty of the mean, jitter = 1.4826 x median absolute deviation), as tf_cnn_benchmarks."""
    speeds = np.asarray(speeds, dtype=np.float64)
    return (float(np.mean(speeds)), float(np.std(speeds) / np.sqrt(len(speeds))),
            float(1.4826 * np.median(np.abs(speeds - np.median(speeds)))))


def report_lines(title, speeds, losses=None, every=10, out=print):
    """Print tf_cnn_benchmarks' step lines and total; return the mean images/second."""
    out(f"\n== {title}")
    out("Step\tImg/sec\ttotal_loss")
    for i in range(len(speeds)):
        if i == 0 or (i + 1) % every == 0 or i == len(speeds) - 1:
            mean, err, jitter = summarize(speeds[: i + 1])
            loss = "" if losses is None or losses[i] is None else f"\t{losses[i]:.3f}"
            out(f"{i + 1}\timages/sec: {mean:.1f} +/- {err:.1f} (jitter = {jitter:.1f}){loss}")
    total = float(np.mean(speeds))
    out("-" * 64)
    out(f"total images/sec: {total:.2f}")
    out("-" * 64)
    return total


def measure_cnn(variant="optimized", mode="train", batch_size=50, num_batches=20, num_warmup=3, threads=2,
                data_format="NHWC", layout="native", fusion=None, images=None, labels=None, progress=False,
                inter_op=1):
    """Images/second of the labs' CNN on workshop_lib.tf; returns (speeds per batch, losses or None).

    ``variant`` is one of :data:`VARIANTS`, i.e. ``tf.GraphOptions(kernels=variant)``:

    - ``"stock"``: the reference kernels compiled for a ``sandybridge`` target (AVX, no AVX2/FMA/AVX-512), no
      fusion, as a stock TensorFlow wheel of the slides' time. numba picks its target when it is imported, so
      unless this process was started with ``tf.options.STOCK_NUMBA_ENV``, the measurement runs in a new Python
      started with it (a few seconds more, for numba's import and its compilation for that target);
    - ``"reference"``: the same kernels compiled for this CPU, no fusion;
    - ``"optimized"``: the fast kernels and fusion.

    ``fusion`` and ``layout`` override the variant's one at a time, so one measurement changes one thing
    (stock has neither); ``threads`` and ``inter_op`` are ConfigProto's ``intra_op_parallelism_threads`` and
    ``inter_op_parallelism_threads``.
    """
    import workshop_lib.tf as tf
    from workshop_lib.tf import options as tf_options

    from . import models
    from .data import load_mnist

    if variant not in VARIANTS:
        hint = " ('default' is now 'reference')" if variant == "default" else ""
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}{hint}")
    if mode not in ("train", "inference"):
        raise ValueError(f"mode={mode!r} must be 'train' or 'inference'")
    args = dict(mode=mode, batch_size=batch_size, num_batches=num_batches, num_warmup=num_warmup, threads=threads,
                data_format=data_format, layout=layout, fusion=fusion, inter_op=inter_op)
    if variant == "stock" and not tf_options.targets_stock():
        return _measure_in_stock_process(args, images, labels)
    if images is None:
        (images, labels), _ = load_mnist()
    options = (tf.GraphOptions(kernels=variant, fusion=fusion, layout=layout) if variant != "stock"
               else tf.GraphOptions(kernels="stock"))
    model = models.TrainingGraph(seed=0, data_format=data_format)
    config = tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=inter_op,
                            graph_options=options)
    desc = f"{variant}, {mode}, {data_format}/{layout}, {threads} thread(s)"
    with model.session(config) as sess:
        return _time_steps(sess, model, mode, batch_size, num_batches, num_warmup, images, labels, progress, desc)


def _time_steps(sess, model, mode, batch_size, num_batches, num_warmup, images, labels, progress=False, desc=""):
    """(images/s per timed step, losses or None) of ``model`` (a :class:`models.TrainingGraph`) run in ``sess``."""
    rng = np.random.default_rng(0)
    speeds, losses = [], []
    steps = range(num_warmup + num_batches)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    for i in steps:
        idx = rng.choice(len(images), batch_size, replace=len(images) < batch_size)
        if mode == "train":
            feed = model.feed(images[idx], labels[idx], keep_prob=0.5)
            t0 = time.perf_counter()
            _, loss = sess.run([model.train_op, model.loss], feed)
        else:
            feed = model.feed(images[idx])
            t0 = time.perf_counter()
            sess.run(model.logits, feed)
            loss = None
        dt = time.perf_counter() - t0
        if i >= num_warmup:
            speeds.append(batch_size / dt)
            losses.append(None if loss is None else float(loss))
    return speeds, (losses if mode == "train" else None)



@contextlib.contextmanager
def cnn_steps(plans, images=None, labels=None):
    """``{name: step}``: one callable per plan, each running one step of the labs' CNN in a session of its own.

    For :func:`compare`: every plan's session stays open inside the block, so the rounds time steps, not graph
    building. Each call feeds a fresh random batch (seeded per plan).

    Parameters
    ----------
    plans : dict
        ``{name: kwargs}``, the keywords of :func:`measure_cnn` that shape a run: ``variant`` ("reference" or
        "optimized"), ``mode``, ``batch_size``, ``threads``, ``inter_op``, ``data_format``, ``layout``, ``fusion``.
    images, labels : ndarray, optional
        The batches' source (default MNIST's training set).
    """
    import workshop_lib.tf as tf

    from . import models
    from .data import load_mnist

    allowed = {"variant", "mode", "batch_size", "threads", "inter_op", "data_format", "layout", "fusion"}
    if images is None:
        (images, labels), _ = load_mnist()
    with contextlib.ExitStack() as stack:
        steps = {}
        for name, plan in plans.items():
            unknown = set(plan) - allowed
            if unknown:
                raise ValueError(f"plans[{name!r}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            variant = plan.get("variant", "optimized")
            if variant not in ("reference", "optimized"):
                raise ValueError(f"plans[{name!r}]: variant={variant!r} must be 'reference' or 'optimized' "
                                 "(stock needs a Python of its own: measure_cnn('stock'))")
            mode, batch = plan.get("mode", "train"), plan.get("batch_size", 50)
            if mode not in ("train", "inference"):
                raise ValueError(f"plans[{name!r}]: mode={mode!r} must be 'train' or 'inference'")
            model = models.TrainingGraph(seed=0, data_format=plan.get("data_format", "NHWC"))
            options = tf.GraphOptions(kernels=variant, fusion=plan.get("fusion"), layout=plan.get("layout", "native"))
            config = tf.ConfigProto(intra_op_parallelism_threads=plan.get("threads", 2),
                                    inter_op_parallelism_threads=plan.get("inter_op", 1), graph_options=options)
            sess = stack.enter_context(model.session(config))
            steps[name] = _one_step(sess, model, mode, batch, images, labels)
        yield steps


def _one_step(sess, model, mode, batch_size, images, labels):
    rng = np.random.default_rng(0)

    def step():
        idx = rng.choice(len(images), batch_size, replace=len(images) < batch_size)
        if mode == "train":
            sess.run(model.train_op, model.feed(images[idx], labels[idx], keep_prob=0.5))
        else:
            sess.run(model.logits, model.feed(images[idx]))
    step.batch_size = batch_size
    return step

_STOCK_CHILD = """
import json, sys
import numpy as np
from workshop_lib import bench
args = json.loads(sys.argv[1])
data = args.pop("data")
images = labels = None
if data:
    with np.load(data) as arrays:
        images, labels = arrays["images"], arrays["labels"]
speeds, losses = bench.measure_cnn("stock", images=images, labels=labels, **args)
print(json.dumps({"speeds": speeds, "losses": losses}))
"""


def _measure_in_stock_process(args, images, labels):
    """measure_cnn("stock", **args) in a Python started with the stock numba target; its (speeds, losses)."""
    import subprocess
    import sys
    import tempfile

    from workshop_lib.tf.options import STOCK_NUMBA_ENV

    package_parent = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **STOCK_NUMBA_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        data = ""
        if images is not None:
            data = os.path.join(tmp, "batch_source.npz")
            np.savez(data, images=images, labels=labels if labels is not None else np.zeros(len(images), np.int64))
        proc = subprocess.run([sys.executable, "-c", _STOCK_CHILD, json.dumps({**args, "data": data})], env=env,
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the stock measurement's Python (NUMBA_CPU_NAME={STOCK_NUMBA_ENV['NUMBA_CPU_NAME']}) "
                           f"failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["speeds"], result["losses"]


def measure_tensorflow_cnn(mode="train", batch_size=50, num_batches=20, num_warmup=3, threads=2, images=None,
                           labels=None):
    """The same graph in TensorFlow's ``tf.compat.v1``, when it is installed (an optional peer, never a dependency).

    :class:`models.TrainingGraph` builds it with ``tensorflow.compat.v1`` in place of ``workshop_lib.tf``: the
    same CNN, initialisation, Adam and loss, run by a TF1 Session with ``threads`` intra-op threads and one
    inter-op thread. Raises ImportError when TensorFlow is not importable.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner, not its errors
    import tensorflow as tensorflow_module

    from . import models
    from .data import load_mnist

    tf1 = tensorflow_module.compat.v1
    if images is None:
        (images, labels), _ = load_mnist()
    model = models.TrainingGraph(seed=0, tf=tf1)
    config = tf1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    with model.session(config) as sess:
        return _time_steps(sess, model, mode, batch_size, num_batches, num_warmup, images, labels)


def measure_torch_cnn(mode="train", batch_size=50, num_batches=20, num_warmup=3, threads=2, images=None,
                      labels=None):
    """The same model in PyTorch, when it is installed (an optional peer, never a dependency)."""
    import torch
    from torch import nn

    from .data import load_mnist

    if images is None:
        (images, labels), _ = load_mnist()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3136, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    speeds, losses = [], []
    net.train(mode == "train")
    for i in range(num_warmup + num_batches):
        idx = rng.choice(len(images), batch_size, replace=len(images) < batch_size)
        x = torch.from_numpy(images[idx].astype(np.float32)[:, None] / 255.0)
        t0 = time.perf_counter()
        if mode == "train":
            opt.zero_grad()
            loss = loss_fn(net(x), torch.from_numpy(labels[idx].astype(np.int64)))
            loss.backward()
            opt.step()
            loss = float(loss.detach())
        else:
            with torch.no_grad():
                net(x)
            loss = None
        dt = time.perf_counter() - t0
        if i >= num_warmup:
            speeds.append(batch_size / dt)
            losses.append(loss)
    return speeds, (losses if mode == "train" else None)


def executive_summary(results, mode, batch_size, out=print):
    out("\nExecutive summary")
    out(f"{'mode':10s} {'network':10s} {'batch size':>10s} {'variant':>10s} {'images/second':>14s}")
    for name, value in results.items():
        out(f"{mode:10s} {'mnist_cnn':10s} {batch_size:10d} {name:>10s} {value:14.1f}")


ALLREDUCE_METHODS = ("mpi", "ours", "ours_unchecked", "ring", "parameter_server", "hvd")


def time_allreduce(nbytes, methods=ALLREDUCE_METHODS, repeats=3, comm=None):
    """Seconds per allreduce of ``nbytes`` of float32 for each method; call it on every rank (under mpiexec).

    Methods: ``mpi`` (MPI_Allreduce), ``ours`` (:meth:`Communicator.allreduce` as called by default: shared
    memory on one node, with its cross-rank check), ``ours_unchecked`` (the same without the check), ``ring``
    (the ring over point-to-point messages, or recursive doubling below ``small_bytes``; checked),
    ``parameter_server`` (rank 0 reduces and sends back), and ``hvd`` (``hvd.allreduce(x, op=hvd.Sum)``, the eager
    call users make, out of place like ``mpi``; it calls ``hvd.init()``).
    Each figure is the best of ``repeats`` loops, a loop's time being the slowest rank's; every rank gets it.
    """
    from mpi4py import MPI

    from .comm import Communicator

    ours = comm or Communicator()
    world = ours.comm
    x = np.random.default_rng(world.Get_rank()).random(nbytes // 4).astype(np.float32)
    out = np.empty_like(x)
    message_algorithm = ours.message_algorithm(x)
    calls = {"mpi": lambda: world.Allreduce(x, out, op=MPI.SUM),
             "ours": lambda: ours.allreduce(x, op="sum", out=out),
             "ours_unchecked": lambda: ours.allreduce(x, op="sum", out=out, check=False),
             "ring": lambda: ours.allreduce(x, op="sum", out=out, algorithm=message_algorithm),
             "parameter_server": lambda: ours.parameter_server_allreduce(x, op="sum")}
    if "hvd" in methods:
        from . import hvd

        hvd.init()
        calls["hvd"] = lambda: hvd.allreduce(x, op=hvd.Sum)
    unknown = set(methods) - set(calls)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} unknown; choose from {list(calls)}")
    iters = max(3, min(300, int(2e8 // max(nbytes, 1))))
    row = {"bytes": nbytes}
    for name in methods:
        calls[name]()  # warm up (and allocate)
    for _ in range(repeats):  # methods interleaved, so that a noisy second hurts them alike
        for name in methods:
            fn = calls[name]
            world.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            row[name] = min(row.get(name, float("inf")), world.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
    return row


def memcopy_bandwidth(nbytes=64 << 20, repeats=5):
    """This machine's memory-copy bandwidth in bytes/s (bytes read + written): the physical reference."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    return 2 * nbytes / best_time(lambda: np.copyto(b, a), repeats)


# --- The one measurement method: warm-up, repeats to a minimum time, interleaved rounds, verdicts ----------------

def sig(x, digits=3):
    """``x`` with ``digits`` significant digits, in plain notation (``1234.5 -> '1230'``, ``0.0123 -> '0.0123'``)."""
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    exponent = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - exponent)
    rounded = round(x, digits - 1 - exponent)
    return f"{rounded:.{decimals}f}"


def _seconds(s):
    """A duration with 3 significant digits in the unit that suits it (``0.00123 -> '1.23 ms'``)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale:
            return f"{sig(s / scale)} {unit}"
    return f"{sig(s / 1e-9)} ns"


def machine_state():
    """The machine's state next to a figure: load average, CPU, usable CPUs and the thread plan.

    Returns
    -------
    dict
        ``load`` (1-minute load average, None where the OS has none), ``cpu`` (model name), ``usable_cpus``,
        ``threads`` (numba's thread count when numba is loaded, and the ``*_NUM_THREADS`` variables set).
    """
    import sys

    from .sysinfo import core_counts, cpu_model

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        load = None
    threads = {key: os.environ[key] for key in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "MKL_NUM_THREADS") if key in os.environ}
    numba = sys.modules.get("numba")
    if numba is not None:  # never import numba just to describe the machine
        try:
            threads["numba"] = int(numba.get_num_threads())
        except Exception:  # noqa: BLE001 - a refused NUMBA_NUM_THREADS: the figure still gets a state
            pass
    busy, cpus = _busy_cpu_seconds()
    own = os.times()
    return {"load": load, "cpu": cpu_model(), "usable_cpus": core_counts()["usable"], "threads": threads,
            "busy_s": busy, "all_cpus": cpus, "own_s": own.user + own.system + own.children_user + own.children_system,
            "wall_s": time.monotonic()}


def _busy_cpu_seconds():
    """(CPU seconds every process of the machine has run, CPUs counted), from /proc/stat; (None, None) elsewhere."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None, None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait; guest time is already in user
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (steal: other VMs had the core)
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), cpus or None


LOADED_FRACTION = 0.5  # without /proc/stat: loaded when the 1-minute load average before is >= half the usable CPUs
OTHERS_FRACTION = 0.2  # with it: loaded when other processes ran on >= this share of the CPUs during the measurement


class MachineNote:
    """Load before and after a measurement, the CPU and the thread plan; ``loaded`` when others wanted the cores."""

    def __init__(self, before, after):
        self.before, self.after = before, after
        self.cpu, self.usable_cpus, self.threads = before["cpu"], before["usable_cpus"], before["threads"]
        self.load_before, self.load_after = before["load"], after["load"]
        # what other processes ran meanwhile: the machine's busy CPU time less this process's own (and its children's
        # that ended, e.g. mpiexec's ranks), over the CPUs and the wall time; the load average counts our own work
        self.others = None
        keys = ("busy_s", "own_s", "wall_s", "all_cpus")
        if all(before.get(k) is not None and after.get(k) is not None for k in keys):
            wall = after["wall_s"] - before["wall_s"]
            if wall > 0.05:
                others = (after["busy_s"] - before["busy_s"]) - (after["own_s"] - before["own_s"])
                self.others = min(1.0, max(0.0, others / (wall * before["all_cpus"])))
        if self.others is not None:
            self.loaded = self.others >= OTHERS_FRACTION
        else:
            self.loaded = self.load_before is not None and self.load_before >= LOADED_FRACTION * self.usable_cpus

    def as_dict(self):
        return {"cpu": self.cpu, "usable_cpus": self.usable_cpus, "threads": self.threads,
                "load_before": self.load_before, "load_after": self.load_after, "others": self.others,
                "loaded": self.loaded}

    def __str__(self):
        if self.load_before is None:
            load = "load average unknown"
        else:
            load = f"load average {self.load_before:.2f} -> {self.load_after:.2f} on {self.usable_cpus} CPU(s)"
        plan = ", ".join(f"{k}={v}" for k, v in self.threads.items()) or "threads: library defaults"
        others = "" if self.others is None else f"; other programs used {100 * self.others:.0f}% of the CPUs"
        return f"{self.cpu}; {load}{others}; {plan}" + ("; LOADED: other programs wanted the cores" if self.loaded else "")

    def loaded_note(self):
        """The sentence a verdict adds when the machine was loaded (empty otherwise)."""
        if not self.loaded:
            return ""
        if self.others is not None:
            return f" (Measured while other programs used {100 * self.others:.0f}% of the CPUs.)"
        return f" (Measured while the machine was loaded: load average {self.load_before:.2f} on {self.usable_cpus} CPU(s).)"


class Measurement:
    """Seconds per call of one callable: samples, median, spread, the first call and the machine's state.

    ``first_s`` is the untimed warm call (compilation and first touch included); ``times`` the timed calls.
    ``str()`` gives ``"12.3 ms (IQR 11.9-13.0 ms, 57 runs)"``.
    """

    def __init__(self, times, first_s, machine, name=None):
        self.times = [float(t) for t in times]
        self.first_s, self.machine, self.name = first_s, machine, name
        arr = np.asarray(self.times)
        self.median = float(np.median(arr))
        self.q1, self.q3 = (float(q) for q in np.percentile(arr, [25, 75]))
        self.min, self.max = float(arr.min()), float(arr.max())

    @property
    def n(self):
        return len(self.times)

    def rate(self, work):
        """``work`` per second at the median (e.g. images per call -> images/s)."""
        return work / self.median

    def as_dict(self):
        return {"name": self.name, "median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "min_s": self.min,
                "max_s": self.max, "n": self.n, "first_s": self.first_s, "machine": self.machine.as_dict()}

    def __str__(self):
        first = "" if self.first_s is None else f"; first call {_seconds(self.first_s)}, compilation included"
        text = f"{_seconds(self.median)} (IQR {_seconds(self.q1)}-{_seconds(self.q3)}, {self.n} runs{first})"
        return (f"{self.name}: " if self.name else "") + text

    __repr__ = __str__


def _check_timing_args(min_time, min_repeats, max_repeats):
    if isinstance(min_time, bool) or not isinstance(min_time, (int, float)) or not min_time >= 0:
        raise ValueError(f"min_time={min_time!r} must be a number of seconds >= 0")
    for name, value in (("min_repeats", min_repeats), ("max_repeats", max_repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if max_repeats < min_repeats:
        raise ValueError(f"max_repeats={max_repeats} must be >= min_repeats={min_repeats}")


def measure(fn, min_time=0.2, min_repeats=5, max_repeats=10_000, warmup=True, name=None, clock=time.perf_counter,
            state=machine_state):
    """Seconds per call of ``fn()``, measured the course's one way.

    One untimed warm call (its time, compilation and first touch included, is kept as ``first_s``), then timed
    calls until both ``min_time`` seconds in all and ``min_repeats`` calls are reached (so a 0.3 ms kernel gets
    hundreds of samples and a 2 s training run a few), at most ``max_repeats``.

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    min_time : float
        Least total seconds of timed calls.
    min_repeats, max_repeats : int
        Least and most timed calls.
    warmup : bool
        Make the untimed first call (default True). Without it ``first_s`` is None.
    name : str, optional
        A label printed with the figure.
    clock : callable
        Seconds now; tests pass a fake clock.
    state : callable
        Returns the machine's state (:func:`machine_state`); called before and after.

    Returns
    -------
    Measurement
        ``median``, ``q1``/``q3``, ``min``/``max`` in seconds, ``times``, ``first_s`` and ``machine``
        (a :class:`MachineNote`: load before/after, CPU, thread plan, ``loaded``).

    Examples
    --------
    >>> m = measure(lambda: sum(range(1000)), min_time=0.01)  # doctest: +SKIP
    >>> print(m)  # doctest: +SKIP
    12.3 µs (IQR 12.1-12.6 µs, 812 runs; first call 20.1 µs, compilation included)
    """
    if not callable(fn):
        raise TypeError(f"fn={fn!r} must be callable")
    _check_timing_args(min_time, min_repeats, max_repeats)
    before = state()
    first = None
    if warmup:
        t0 = clock()
        fn()
        first = clock() - t0
    times, total = [], 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or total < min_time):
        t0 = clock()
        fn()
        dt = clock() - t0
        times.append(dt)
        total += dt
    return Measurement(times, first, MachineNote(before, state()), name)


class Verdict:
    """What a comparison showed: ``variant`` against ``baseline``, the ratio, its spread, and the outcome.

    ``ratio`` is baseline time / variant time (above 1: the variant is faster), ``low``/``high`` its least and
    greatest over the rounds. ``outcome`` is ``"faster"`` or ``"slower"`` only when the whole spread lies beyond
    ``threshold`` (above it, or below ``1/threshold``), else ``"no difference"``. ``str()`` is the sentence a lab
    prints; the numbers stay available as attributes.
    """

    def __init__(self, variant, baseline, ratios, threshold=1.0, change=None, what="the run", machine=None, over=None):
        if not ratios:
            raise ValueError("ratios must hold at least one round's ratio")
        self.variant, self.baseline, self.threshold, self.machine = variant, baseline, threshold, machine
        self.change = change or variant
        self.what = what
        self.ratios = [float(r) for r in ratios]
        self.ratio = float(np.median(self.ratios))
        self.low, self.high = min(self.ratios), max(self.ratios)
        self.rounds = len(self.ratios)
        self.over = over or f"over {self.rounds} round{'s' if self.rounds != 1 else ''}"
        if self.low > threshold:
            self.outcome = "faster"
        elif self.high < 1.0 / threshold:
            self.outcome = "slower"
        else:
            self.outcome = "no difference"

    @property
    def faster(self):
        return self.outcome == "faster"

    @property
    def slower(self):
        return self.outcome == "slower"

    def spread(self, inverted=None):
        """``"0.97-1.12 over 7 rounds"``, as the ratio the sentence states (inverted when the variant is slower)."""
        inverted = self.ratio < 1 if inverted is None else inverted
        low, high = (1 / self.high, 1 / self.low) if inverted else (self.low, self.high)
        return f"{sig(low)}-{sig(high)} {self.over}"

    def as_dict(self):
        return {"variant": self.variant, "baseline": self.baseline, "ratio": self.ratio, "low": self.low,
                "high": self.high, "rounds": self.rounds, "threshold": self.threshold, "outcome": self.outcome,
                "machine": None if self.machine is None else self.machine.as_dict()}

    def __str__(self):
        if sig(self.ratio) == sig(1.0) or sig(1 / self.ratio) == sig(1.0):
            text = f"On this machine, {self.change} left {self.what} at the same speed, {sig(self.ratio)}x ({self.spread(False)})"
        elif self.ratio >= 1:
            text = f"On this machine, {self.change} made {self.what} {sig(self.ratio)}x faster ({self.spread()})"
        else:
            text = f"On this machine, {self.change} made {self.what} {sig(1 / self.ratio)}x slower ({self.spread()})"
        if self.outcome == "no difference":
            beyond = "" if self.threshold == 1.0 else f" the stated {sig(self.threshold)}x and"
            text += f": no difference beyond{beyond} this machine's noise."
        else:
            text += f": {self.outcome} {'in every round' if self.over.startswith('over') else 'across the spread'}" + \
                ("." if self.threshold == 1.0 else f", by more than {sig(self.threshold)}x.")
        if self.machine is not None:
            text += self.machine.loaded_note()
        return text

    __repr__ = __str__


POWERCAP = "/sys/class/powercap"


def energy_joules(root=POWERCAP):
    """``({domain: joules}, None)`` from the CPU's RAPL energy counters, or ``(None, why not)`` where unreadable.

    Linux exposes Intel's and AMD's running-average-power-limit counters under ``/sys/class/powercap``
    (``intel-rapl:0/energy_uj``: the package; ``intel-rapl:0:0``: its cores...). They are often readable by root only,
    and absent in most virtual machines and containers. A counter counts the whole package, other programs included:
    read energy per call on a quiet machine only.
    """
    base = Path(root)
    if not base.is_dir():
        return None, f"{base} does not exist (no RAPL counters exposed: a virtual machine, a container, or not Linux)"
    readings, refused = {}, []
    for zone in sorted(base.glob("*rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
            readings[f"{zone.name} ({name})"] = int((zone / "energy_uj").read_text()) / 1e6
        except PermissionError:
            refused.append(zone.name)
        except (OSError, ValueError):
            continue
    if readings:
        return readings, None
    if refused:
        return None, f"{', '.join(refused)} exist but are readable by root only (sudo chmod o+r .../energy_uj)"
    return None, f"{base} holds no readable RAPL zone"

def verdict_apart(baseline, variant, change=None, what="the run", threshold=1.0):
    """The :class:`Verdict` of two :class:`Measurement` taken one after the other (not interleaved).

    For variants that cannot take turns (two processes, or two thread pools that disturb each other). The ratio is
    of the medians; its spread runs from the least to the greatest ratio the two interquartile ranges allow
    (``baseline.q1 / variant.q3`` to ``baseline.q3 / variant.q1``), which is wider than an interleaved comparison's.
    """
    for name, m in (("baseline", baseline), ("variant", variant)):
        if not isinstance(m, Measurement):
            raise TypeError(f"{name}={m!r} must be a bench.Measurement (from bench.measure)")
    ratios = [baseline.q1 / variant.q3, baseline.median / variant.median, baseline.q3 / variant.q1]
    over = f"from the interquartile ranges of {baseline.n} and {variant.n} runs measured apart"
    return Verdict(variant.name or "variant", baseline.name or "baseline", ratios, threshold, change, what,
                   variant.machine, over=over)

class Comparison:
    """Variants measured round by round, interleaved; per-round seconds per call, and verdicts against a baseline."""

    def __init__(self, names, round_times, first_s, calls, baseline, machine, what="the run"):
        self.names, self.round_times, self.first_s, self.calls = list(names), round_times, first_s, calls
        self.baseline, self.machine, self.what = baseline, machine, what
        self.measurements = {n: Measurement(round_times[n], first_s[n], machine, n) for n in self.names}

    @property
    def rounds(self):
        return len(self.round_times[self.baseline])

    def seconds(self, name):
        """Median seconds per call of ``name`` over the rounds."""
        return self.measurements[name].median

    def ratios(self, name, baseline=None):
        """Per-round speed ratio of ``name`` over ``baseline`` (baseline time / name's time, same round)."""
        base = self.round_times[baseline or self.baseline]
        return [b / t for b, t in zip(base, self.round_times[self._known(name)])]

    def _known(self, name):
        if name not in self.round_times:
            raise KeyError(f"name={name!r} is not one of the variants compared: {self.names}")
        return name

    def verdict(self, name, baseline=None, threshold=1.0, change=None, what=None):
        """The :class:`Verdict` of ``name`` against ``baseline`` (default: the comparison's baseline)."""
        baseline = self._known(baseline or self.baseline)
        return Verdict(name, baseline, self.ratios(name, baseline), threshold, change, what or self.what,
                       self.machine)

    def table(self, work=None, unit="images/s"):
        """One line per variant: median time (or ``work``/s), its IQR over rounds, the ratio to the baseline."""
        lines = []
        for name in self.names:
            m = self.measurements[name]
            if work is None:
                figure = f"{_seconds(m.median):>10s} per call (IQR {_seconds(m.q1)}-{_seconds(m.q3)})"
            else:
                figure = f"{sig(work / m.median):>8s} {unit} (IQR {sig(work / m.q3)}-{sig(work / m.q1)})"
            ratios = self.ratios(name)
            ratio = "" if name == self.baseline else \
                f"  {sig(np.median(ratios))}x ({sig(min(ratios))}-{sig(max(ratios))})"
            lines.append(f"{name:>16s}: {figure}{ratio}")
        lines.append(f"({self.rounds} interleaved rounds; {self.machine})")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def compare(variants, rounds=7, baseline=None, min_round_time=0.05, what="the run", clock=time.perf_counter,
            state=machine_state):
    """Measure several variants interleaved round by round (A B A B ...), so a shared machine's drift hits all.

    Each variant first runs once untimed (its time kept, compilation included). Each round then calls every
    variant as many times as it needs for ``min_round_time`` (sized from a second untimed call, at least once), the
    order rotating from round to round; a variant's round figure is the median seconds of its calls in that round.

    Parameters
    ----------
    variants : dict
        ``{name: fn}``, at least two; ``fn()`` takes no arguments.
    rounds : int
        Rounds (>= 1); the ratio's spread is taken over them. 5 to 9 suits a lab.
    baseline : str, optional
        The name the ratios are taken against; default the first.
    min_round_time : float
        Least seconds of calls per variant per round.
    what : str
        What the callables do, for the verdicts' sentences ("training", "the GEMM").
    clock, state : callable
        As in :func:`measure` (tests pass fakes).

    Returns
    -------
    Comparison
        ``.verdict(name)`` gives a :class:`Verdict`; ``.measurements[name]`` a :class:`Measurement` over the
        rounds; ``.table()`` the figures.

    Examples
    --------
    >>> c = compare({"unfused": run_plain, "fused": run_fused}, rounds=7, what="training")  # doctest: +SKIP
    >>> print(c.verdict("fused", change="fusion"))  # doctest: +SKIP
    On this machine, fusion changed training's speed 1.04x (0.97-1.12 over 7 rounds): no difference beyond ...
    """
    if not isinstance(variants, dict) or len(variants) < 2:
        raise ValueError(f"variants must be a dict of at least two {{name: fn}}; got {variants!r}")
    for name, fn in variants.items():
        if not callable(fn):
            raise TypeError(f"variants[{name!r}]={fn!r} must be callable")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1")
    names = list(variants)
    baseline = names[0] if baseline is None else baseline
    if baseline not in variants:
        raise ValueError(f"baseline={baseline!r} must be one of {names}")
    _check_timing_args(min_round_time, 1, 1)
    before = state()
    first, calls = {}, {}
    for name in names:
        t0 = clock()
        variants[name]()
        first[name] = clock() - t0
    # the warm call may still carry one-off costs; one more untimed call sizes the rounds
    for name in names:
        t0 = clock()
        variants[name]()
        once = clock() - t0
        calls[name] = max(1, math.ceil(min_round_time / once)) if once > 0 else 1
    round_times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, samples = variants[name], []
            for _ in range(calls[name]):
                t0 = clock()
                fn()
                samples.append(clock() - t0)
            round_times[name].append(float(np.median(samples)))  # a preempted call does not make the round
    return Comparison(names, round_times, first, calls, baseline, MachineNote(before, state()), what)
