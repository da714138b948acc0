"""int8 vs fp32 on this CPU: GEMM throughput and the MNIST CNN's inference speed.

Run:  python benchmarks/int8_bench.py            (GEMM 256..2048 and the CNN's FC shapes; CNN at batch 256)
      python benchmarks/int8_bench.py --quick    (small sizes)

Reference measured in the same run: numpy's float32 GEMM (its BLAS). OpenBLAS
reads OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE when it loads, and some machines
set them to values that pick a slower kernel, so this script restarts itself
with both unset: the reference is numpy's best. Figures are the best of
several repeats; GOP/s counts a multiply and an add as two operations.
"""

import os
import sys

_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _OPENBLAS_VARS):  # before numpy loads OpenBLAS
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_VARS}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workshop_lib import int8, models, sysinfo  # noqa: E402
from workshop_lib.bench import best_time  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402
from workshop_lib.quantization import QuantizedCNN  # noqa: E402


def gemm_rows(shapes, repeats):
    rng = np.random.default_rng(0)
    rows = []
    isa = int8.vnni_isa()
    for m, k, n in shapes:
        a32, b32 = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
        a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
        ops = 2.0 * m * k * n
        row = {"shape": [m, k, n], "fp32_gflops": ops / best_time(lambda: a32 @ b32, repeats) / 1e9}
        if isa:
            packed = int8.pack_weights(b8)  # weights are packed once, as inference libraries do
            row["int8_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, packed), repeats) / 1e9
        else:
            row["int8_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, b8, path="portable"), repeats) / 1e9
        if m * k * n <= 1024**3:
            row["int8_portable_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, b8, path="portable"), 1) / 1e9
        row["ratio"] = row["int8_gops"] / row["fp32_gflops"]
        rows.append(row)
        extra = f"   (portable numba loops: {row['int8_portable_gops']:6.0f} GOP/s)" if "int8_portable_gops" in row else ""
        print(f"  {m:5d} x {k:5d} x {n:5d}   fp32 {row['fp32_gflops']:7.0f} GFLOP/s   int8 {row['int8_gops']:7.0f} GOP/s"
              f"   int8 / fp32 = {row['ratio']:.2f}{extra}")
    return rows


def cnn_row(batch, repeats):
    params, meta = models.load_model()
    (x_train, _), (x_test, y_test) = load_mnist()
    images = x_test[:batch]
    qmodel = QuantizedCNN(params, x_train[:500])
    fp32 = best_time(lambda: models.mnist_cnn_forward(params, images), repeats)
    i8 = best_time(lambda: qmodel.logits(images), repeats)
    acc32 = models.accuracy(params, x_test, y_test)
    acc8 = float((qmodel.predict(x_test) == y_test).mean())
    row = {"batch": batch, "fp32_images_per_s": batch / fp32, "int8_images_per_s": batch / i8, "ratio": fp32 / i8,
           "fp32_accuracy": acc32, "int8_accuracy": acc8}
    print(f"  fp32 {row['fp32_images_per_s']:8.0f} images/s   int8 {row['int8_images_per_s']:8.0f} images/s   "
          f"int8 / fp32 = {row['ratio']:.2f} (target >= 1.5)")
    print(f"  top-1 on 2,000 held-out images: fp32 {acc32:.4f}, int8 {acc8:.4f} ({100 * (acc8 - acc32):+.2f} points)")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import numba

    features = [f for f, present in sysinfo.cpu_features().items() if present]
    print(f"CPU: {sysinfo.cpu_model()} ({', '.join(features)}); int8 path: "
          f"{int8.vnni_isa() or 'portable (no VNNI)'}; {numba.get_num_threads()} threads")
    cubes = [256, 512] if args.quick else [256, 512, 1024, 2048]
    shapes = [(s, s, s) for s in cubes] + ([(64, 3136, 1024)] if args.quick else [(64, 3136, 1024), (256, 3136, 1024)])
    print("GEMM (numpy float32 is the reference):")
    figures = {"gemm": gemm_rows(shapes, 2 if args.quick else args.repeats)}
    print("MNIST CNN inference, batch", 64 if args.quick else 256)
    figures["cnn"] = cnn_row(64 if args.quick else 256, 2 if args.quick else args.repeats)
    at_1024 = [r for r in figures["gemm"] if r["shape"] == [1024, 1024, 1024]]
    if at_1024:
        print(f"\nint8 GEMM at 1024^3 is {at_1024[0]['ratio']:.2f}x numpy's fp32 GEMM (target >= 2.0)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
