"""The tf_cnn_benchmarks of this course: the labs' CNN, default vs optimized, in images/second.

Run:  python benchmarks/cnn_bench.py                      (training, batch 50, 2 threads)
      python benchmarks/cnn_bench.py --mode inference --batch-size 256
      python benchmarks/cnn_bench.py --num-batches 10 --json out.json
      python benchmarks/cnn_bench.py --background-load 2   (2 busy processes share the CPU meanwhile)

"default" is the engine with its reference kernels (direct convolution, the
textbook GEMM) and no graph rewriting, the analogue of stock TensorFlow;
"optimized" uses im2col + BLAS kernels and fuses conv/matmul + bias + ReLU,
as MKL-DNN builds did. When PyTorch happens to be installed, the same model
runs in PyTorch in the same process and the ratio is printed (an optional
peer, never a dependency). Lines follow tf_cnn_benchmarks: images/sec with its
uncertainty and jitter (1.4826 x the median absolute deviation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workshop_lib import bench, sysinfo  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402


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
    results = {}
    with bench.background_load(args.background_load):
        for name in args.variants:
            speeds, losses = bench.measure_cnn(name, **common)
            results[name] = bench.report_lines(f"workshop_lib.tf, {name}", speeds, losses, args.display_every)
        if not args.no_torch:
            try:
                import torch

                speeds, losses = bench.measure_torch_cnn(**common)
                results["pytorch"] = bench.report_lines(f"PyTorch {torch.__version__} (same model)", speeds, losses,
                                                        args.display_every)
            except ImportError:
                print("\n(PyTorch is not installed: no PyTorch comparison)")
    bench.executive_summary(results, args.mode, args.batch_size)
    if "default" in results and "optimized" in results:
        print(f"optimized / default = {results['optimized'] / results['default']:.2f}x (target >= 5x)")
    if "pytorch" in results and "optimized" in results:
        target = " (target >= 0.5 for training)" if args.mode == "train" else ""
        print(f"optimized / PyTorch = {results['optimized'] / results['pytorch']:.2f}{target}")
    if args.background_load:
        print(f"(under {args.background_load} busy process(es); targets with 2 on 2 cores: optimized / default "
              ">= 2x, optimized / PyTorch >= 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "batch_size": args.batch_size, "threads": args.threads,
                                         "images_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
