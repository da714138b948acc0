"""The tf_cnn_benchmarks of this course: the labs' CNN in three variants, in images/second.

Run:  python benchmarks/cnn_bench.py                      (training, batch 50, 2 threads)
      python benchmarks/cnn_bench.py --mode inference --batch-size 256
      python benchmarks/cnn_bench.py --num-batches 10 --json out.json
      python benchmarks/cnn_bench.py --background-load 2   (2 busy processes share the CPU meanwhile)
      python benchmarks/cnn_bench.py --rounds 6 --num-batches 10 --variants optimized
      python benchmarks/cnn_bench.py --bf16 --variants optimized --rounds 3   (bf16 mixed precision vs fp32)
                                    (6 interleaved rounds: each ratio's median over rounds, on a noisy machine)

The variants are ``tf.GraphOptions(kernels=NAME)``, the slides' split of CPU optimizations:

- ``stock``: the engine's reference kernels (direct convolution, the textbook GEMM) compiled for a
  ``sandybridge`` target (AVX, no AVX2, FMA or AVX-512), no fusion, no layout propagation: what a stock
  TensorFlow wheel of the slides' time ran. numba picks its target when it is imported, so this variant is
  measured in a Python started with ``NUMBA_CPU_NAME=sandybridge`` (and the matching ``NUMBA_CPU_FEATURES``).
- ``reference``: the same kernels compiled for this CPU (AVX-512 here), no fusion. reference / stock is
  "the compiler used your ISA".
- ``optimized``: register-blocked direct convolutions (``workshop_lib.jit_conv``, as oneDNN's JIT kernels),
  BLAS matmuls, conv/matmul + bias + ReLU fused and the backward pool/ReLU/bias gradients fused, as MKL-DNN builds
  did: operator and graph optimizations. optimized / reference is "better algorithms and fusion".

The script prints ``optimized / stock`` (target >= 5x) and ``optimized / reference``. Two optional peers run
the same model in the same process when they are importable (never dependencies): PyTorch (target:
optimized >= 1.3x PyTorch's training images/s) and TensorFlow, which runs the very same graph-building code
(``models.TrainingGraph``) through ``tf.compat.v1``, with the same Adam, batch and intra-op threads.
Lines follow tf_cnn_benchmarks: images/sec with its uncertainty and jitter (1.4826 x the median absolute
deviation).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from workshop_lib import bench, roofline, sysinfo  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402


def _wanted(mode):
    train = mode == "train"
    return [("optimized", "stock", " (target >= 5x)" if train else ""), ("optimized", "reference", ""),
            ("reference", "stock", " (the compiler used your ISA)"),
            ("optimized", "pytorch", " (target >= 1.3x)" if train else ""), ("optimized", "tensorflow", ""),
            ("bf16", "optimized", " (bf16 mixed precision over fp32; target >= 1.6x)" if train else ""),
            ("bf16", "pytorch_bf16", " (target >= 1.3x)" if train else "")]


NAMES = {"pytorch": "PyTorch", "tensorflow": "TensorFlow", "pytorch_bf16": "PyTorch autocast bf16"}


def measure_bf16_cnn(mode="train", batch_size=50, num_batches=20, num_warmup=3, threads=2, images=None, labels=None):
    """The optimized variant with mixed precision: ``GraphOptions(precision="bf16")`` (bf16 conv/matmul, fp32 rest)."""
    import workshop_lib.tf as tf
    from workshop_lib import models

    model = models.TrainingGraph(seed=0)
    config = tf.ConfigProto(intra_op_parallelism_threads=threads, graph_options=tf.GraphOptions(precision="bf16"))
    with model.session(config) as sess:
        return bench._time_steps(sess, model, mode, batch_size, num_batches, num_warmup, images, labels, False,
                                 f"bf16, {mode}, {threads} thread(s)")


def measure_torch_autocast_cnn(**common):
    """PyTorch's CPU mixed precision: the same model under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return bench.measure_torch_cnn(**common)


def ratio_lines(results, mode):
    """The same-run ratios of ``results`` ({variant or peer: images/s}) that both sides were measured for."""
    return [f"{a} / {NAMES.get(b, b)} = {results[a] / results[b]:.2f}x{note}"
            for a, b, note in _wanted(mode) if a in results and b in results]


def round_ratio_lines(rounds, mode):
    """Per-round ratios of interleaved rounds ({name: [median images/s of each round]}) and their median.

    Each round measures every side once, one right after the other, so a burst of load on a shared machine
    falls on both sides of a ratio rather than on one variant's whole run.
    """
    lines = []
    for a, b, note in _wanted(mode):
        if a in rounds and b in rounds:
            ratios = np.array(rounds[a]) / np.array(rounds[b])
            each = " ".join(f"{r:.2f}" for r in ratios)
            lines.append(f"{a} / {NAMES.get(b, b)}, median of {len(ratios)} interleaved rounds = "
                         f"{np.median(ratios):.2f}x{note} (rounds: {each})")
    return lines


def _peer_version(module):
    """The installed version of an optional peer, read without importing it; None when it is not installed.

    Not importing matters: a peer imported first starts its own OpenMP runtime, and numba's pool then runs
    under that runtime's settings rather than the ones ``workshop_lib.placement`` gives it as it starts
    (``OMP_WAIT_POLICY=PASSIVE``), which slowed the engine by a quarter in a same-minute A/B on this machine.
    Each peer is imported by its own measurement, after the engine's first.
    """
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version("tensorflow-cpu" if module == "tensorflow" else module)
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version(module)


def _quiet_tensorflow_cnn(**common):
    import tensorflow

    tensorflow.get_logger().setLevel("ERROR")  # its deprecation notes (dropout's keep_prob), not errors
    return bench.measure_tensorflow_cnn(**common)


def _runs(args, common):
    """(name, title, measure) for every variant and every installed peer, in the order they are measured."""
    runs = [(name, f"workshop_lib.tf, {name}", functools.partial(bench.measure_cnn, name, **common))
            for name in args.variants]
    if args.bf16:
        runs.append(("bf16", "workshop_lib.tf, optimized + bf16 mixed precision",
                     functools.partial(measure_bf16_cnn, **common)))
    for flag, module, name, title, measure in (
            (args.no_tensorflow, "tensorflow", "tensorflow", "TensorFlow {}, tf.compat.v1 (same graph)",
             _quiet_tensorflow_cnn),
            (args.no_torch, "torch", "pytorch", "PyTorch {} (same model)", bench.measure_torch_cnn)):
        if flag:
            continue
        version = _peer_version(module)
        if version is None:
            print(f"\n({title.split()[0]} is not installed: no {title.split()[0]} comparison)")
        else:
            runs.append((name, title.format(version), functools.partial(measure, **common)))
            if name == "pytorch" and args.bf16:
                runs.append(("pytorch_bf16", f"PyTorch {version}, autocast bf16 (same model)",
                             functools.partial(measure_torch_autocast_cnn, **common)))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="default 50 (train) or 256 (inference)")
    parser.add_argument("--num-batches", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--display-every", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(bench.VARIANTS), choices=list(bench.VARIANTS))
    parser.add_argument("--bf16", action="store_true",
                        help="also measure bf16 mixed precision (GraphOptions(precision='bf16')) and, when PyTorch is "
                             "installed, its CPU autocast bf16")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    parser.add_argument("--no-tensorflow", action="store_true", help="skip TensorFlow even when installed")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="keep N busy processes running during the measurement (a shared node)")
    parser.add_argument("--rounds", type=int, default=1, metavar="R",
                        help="measure every variant and peer R times, interleaved, and print each ratio's median "
                             "over the rounds (steadier on a shared machine); --num-batches is per round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} must be at least 1")
    args.batch_size = args.batch_size or (50 if args.mode == "train" else 256)

    (images, labels), _ = load_mnist()
    print(f"CPU: {sysinfo.cpu_model()}; {args.threads} intra-op threads; model: MNIST CNN (2 conv + 2 FC); "
          f"mode: {args.mode}; batch size: {args.batch_size}; background load: {args.background_load} busy process(es)")
    common = dict(mode=args.mode, batch_size=args.batch_size, num_batches=args.num_batches,
                  num_warmup=args.num_warmup, threads=args.threads, images=images, labels=labels)
    results, per_batch, rounds = {}, {}, {}
    runs = _runs(args, common)
    with bench.background_load(args.background_load):
        for _ in range(args.rounds):
            for name, title, measure in runs:
                speeds, losses = measure()
                per_batch.setdefault(name, []).extend(speeds)
                rounds.setdefault(name, []).append(float(np.median(speeds)))
                if args.rounds == 1:
                    results[name] = bench.report_lines(title, speeds, losses, args.display_every)
    if args.rounds > 1:
        for name, title, _measure in runs:
            results[name] = bench.report_lines(f"{title}, {args.rounds} rounds", per_batch[name], None,
                                               args.display_every)
    bench.executive_summary(results, args.mode, args.batch_size)
    for ratio in ratio_lines(results, args.mode) + (round_ratio_lines(rounds, args.mode) if args.rounds > 1 else []):
        print(ratio)
    roofs = roofline.benchmark_roofs(("fp32",), threads=args.threads)  # the machine's limit, beside the peers
    for name, images_per_second in results.items():
        print(roofline.fraction_line(f"{name} ({args.mode})", roofline.cnn_ops_per_image(args.mode) * images_per_second,
                                     1.0, roofs))
    if args.background_load:
        print(f"(under {args.background_load} busy process(es); targets with 2 on 2 cores: optimized / reference "
              ">= 2x, optimized / PyTorch >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "batch_size": args.batch_size, "threads": args.threads,
                                         "images_per_second": results, "per_batch_images_per_second": per_batch,
                                         "median_per_round": rounds}, indent=2))


if __name__ == "__main__":
    main()
