"""The tf_cnn_benchmarks of this course: the labs' CNN in three variants, in images/second.

Run:  python benchmarks/cnn_bench.py                      (training, batch 50, 2 threads)
      python benchmarks/cnn_bench.py --mode inference --batch-size 256
      python benchmarks/cnn_bench.py --num-batches 10 --json out.json
      python benchmarks/cnn_bench.py --background-load 2   (2 busy processes share the CPU meanwhile)

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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workshop_lib import bench, sysinfo  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402


def ratio_lines(results, mode):
    """The same-run ratios of ``results`` ({variant or peer: images/s}) that both sides were measured for."""
    train = mode == "train"
    wanted = [("optimized", "stock", " (target >= 5x)" if train else ""), ("optimized", "reference", ""),
              ("reference", "stock", " (the compiler used your ISA)"),
              ("optimized", "pytorch", " (target >= 1.3x)" if train else ""), ("optimized", "tensorflow", "")]
    names = {"pytorch": "PyTorch", "tensorflow": "TensorFlow"}
    return [f"{a} / {names.get(b, b)} = {results[a] / results[b]:.2f}x{note}"
            for a, b, note in wanted if a in results and b in results]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="default 50 (train) or 256 (inference)")
    parser.add_argument("--num-batches", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--display-every", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(bench.VARIANTS), choices=list(bench.VARIANTS))
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    parser.add_argument("--no-tensorflow", action="store_true", help="skip TensorFlow even when installed")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="keep N busy processes running during the measurement (a shared node)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (50 if args.mode == "train" else 256)

    (images, labels), _ = load_mnist()
    print(f"CPU: {sysinfo.cpu_model()}; {args.threads} intra-op threads; model: MNIST CNN (2 conv + 2 FC); "
          f"mode: {args.mode}; batch size: {args.batch_size}; background load: {args.background_load} busy process(es)")
    common = dict(mode=args.mode, batch_size=args.batch_size, num_batches=args.num_batches,
                  num_warmup=args.num_warmup, threads=args.threads, images=images, labels=labels)
    results, per_batch = {}, {}
    with bench.background_load(args.background_load):
        for name in args.variants:
            speeds, losses = bench.measure_cnn(name, **common)
            results[name] = bench.report_lines(f"workshop_lib.tf, {name}", speeds, losses, args.display_every)
            per_batch[name] = speeds
        if not args.no_tensorflow:
            try:
                import tensorflow

                tensorflow.get_logger().setLevel("ERROR")  # its deprecation notes (dropout's keep_prob), not errors
                speeds, losses = bench.measure_tensorflow_cnn(**common)
                results["tensorflow"] = bench.report_lines(
                    f"TensorFlow {tensorflow.__version__}, tf.compat.v1 (same graph)", speeds, losses,
                    args.display_every)
            except ImportError:
                print("\n(TensorFlow is not installed: no TensorFlow comparison)")
        if not args.no_torch:
            try:
                import torch

                speeds, losses = bench.measure_torch_cnn(**common)
                results["pytorch"] = bench.report_lines(f"PyTorch {torch.__version__} (same model)", speeds, losses,
                                                        args.display_every)
            except ImportError:
                print("\n(PyTorch is not installed: no PyTorch comparison)")
    bench.executive_summary(results, args.mode, args.batch_size)
    for ratio in ratio_lines(results, args.mode):
        print(ratio)
    if args.background_load:
        print(f"(under {args.background_load} busy process(es); targets with 2 on 2 cores: optimized / reference "
              ">= 2x, optimized / PyTorch >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "batch_size": args.batch_size, "threads": args.threads,
                                         "images_per_second": results, "per_batch_images_per_second": per_batch}, indent=2))


if __name__ == "__main__":
    main()
