"""The tf_cnn_benchmarks of this course: the labs' CNN, default vs optimized, in images/second.

Run:  python benchmarks/cnn_bench.py                      (training, batch 50, 2 threads)
      python benchmarks/cnn_bench.py --mode inference --batch-size 256
      python benchmarks/cnn_bench.py --num-batches 10 --json out.json

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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workshop_lib.tf as tf  # noqa: E402
from workshop_lib import models, sysinfo  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402

VARIANTS = {
    "default": tf.GraphOptions(kernels="reference", fusion=False),
    "optimized": tf.GraphOptions(kernels="optimized", fusion=True),
}


def summarize(speeds):
    speeds = np.asarray(speeds)
    return (float(np.mean(speeds)), float(np.std(speeds) / np.sqrt(len(speeds))),
            float(1.4826 * np.median(np.abs(speeds - np.median(speeds)))))


def report_lines(name, speeds, losses, every):
    print(f"\n== {name}")
    print("Step\tImg/sec\ttotal_loss")
    for i in range(len(speeds)):
        if i == 0 or (i + 1) % every == 0 or i == len(speeds) - 1:
            mean, err, jitter = summarize(speeds[: i + 1])
            loss = "" if losses is None else f"\t{losses[i]:.3f}"
            print(f"{i + 1}\timages/sec: {mean:.1f} +/- {err:.1f} (jitter = {jitter:.1f}){loss}")
    total = float(np.mean(speeds))
    print("-" * 64)
    print(f"total images/sec: {total:.2f}")
    print("-" * 64)
    return total


def run_ours(options, args, images, labels):
    model = models.TrainingGraph(seed=0)
    config = tf.ConfigProto(intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=1,
                            graph_options=options)
    rng = np.random.default_rng(0)
    speeds, losses = [], []
    with model.session(config) as sess:
        for i in range(args.num_warmup + args.num_batches):
            idx = rng.choice(len(images), args.batch_size, replace=False)
            if args.mode == "train":
                feed = model.feed(images[idx], labels[idx], keep_prob=0.5)
                t0 = time.perf_counter()
                _, loss = sess.run([model.train_op, model.loss], feed)
            else:
                feed = model.feed(images[idx])
                t0 = time.perf_counter()
                sess.run(model.logits, feed)
                loss = None
            dt = time.perf_counter() - t0
            if i >= args.num_warmup:
                speeds.append(args.batch_size / dt)
                losses.append(loss)
    return speeds, (losses if args.mode == "train" else None)


def run_torch(args, images, labels):
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3136, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    speeds, losses = [], []
    net.train(args.mode == "train")
    for i in range(args.num_warmup + args.num_batches):
        idx = rng.choice(len(images), args.batch_size, replace=False)
        x = torch.from_numpy(images[idx].astype(np.float32)[:, None] / 255.0)
        t0 = time.perf_counter()
        if args.mode == "train":
            opt.zero_grad()
            loss = loss_fn(net(x), torch.from_numpy(labels[idx].astype(np.int64)))
            loss.backward()
            opt.step()
            loss = float(loss)
        else:
            with torch.no_grad():
                net(x)
            loss = None
        dt = time.perf_counter() - t0
        if i >= args.num_warmup:
            speeds.append(args.batch_size / dt)
            losses.append(loss)
    return speeds, (losses if args.mode == "train" else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="default 50 (train) or 256 (inference)")
    parser.add_argument("--num-batches", type=int, default=30)
    parser.add_argument("--num-warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--display-every", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.batch_size = args.batch_size or (50 if args.mode == "train" else 256)

    (images, labels), _ = load_mnist()
    print(f"CPU: {sysinfo.cpu_model()}; {args.threads} intra-op threads; model: MNIST CNN (2 conv + 2 FC); "
          f"mode: {args.mode}; batch size: {args.batch_size}")
    results = {}
    for name in args.variants:
        speeds, losses = run_ours(VARIANTS[name], args, images, labels)
        results[name] = report_lines(f"workshop_lib.tf, {name} ({VARIANTS[name]})", speeds, losses,
                                     args.display_every)
    torch_available = False
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            torch_available = True
        except ImportError:
            print("\n(PyTorch is not installed: no PyTorch comparison)")
    if torch_available:
        speeds, losses = run_torch(args, images, labels)
        results["pytorch"] = report_lines(f"PyTorch {torch.__version__} (same model)", speeds, losses,
                                          args.display_every)

    print("\nExecutive summary")
    print(f"{'mode':10s} {'network':10s} {'batch size':>10s} {'variant':>10s} {'images/second':>14s}")
    for name, value in results.items():
        print(f"{args.mode:10s} {'mnist_cnn':10s} {args.batch_size:10d} {name:>10s} {value:14.1f}")
    if "default" in results and "optimized" in results:
        print(f"optimized / default = {results['optimized'] / results['default']:.2f}x (target >= 5x)")
    if "pytorch" in results and "optimized" in results:
        print(f"optimized / PyTorch = {results['optimized'] / results['pytorch']:.2f} (target >= 0.5 for training)")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "batch_size": args.batch_size, "threads": args.threads,
                                         "images_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
