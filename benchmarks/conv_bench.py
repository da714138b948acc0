"""The labs' convolutions, one at a time: jit_conv's direct kernels against im2col + the BLAS GEMM, in GFLOP/s.

Run:  python benchmarks/conv_bench.py                 (batch 50, 2 threads, 40 repetitions)
      python benchmarks/conv_bench.py --batch-size 256 --threads 1

Every kernel runs inside ``placement.op_threads``, as a Session step runs it (numba and the GEMM slices on
``--threads`` threads, the BLAS itself single-threaded); the repetitions of all rows are interleaved and the
best time of each is printed, so a busy machine slows every row alike. "GEMM alone" is the product im2col
feeds to BLAS, the same FLOPs without building the columns: what a direct kernel must beat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workshop_lib import jit_conv, kernels, placement, roofline, sysinfo  # noqa: E402


def cases(batch, rng):
    """(name, function, FLOPs) of the labs' CNN's conv1 forward, conv2 forward and conv2 backward-data."""
    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x1, w1, b1 = f32(batch, 28, 28, 1), f32(5, 5, 1, 32), f32(32)
    x2, w2, b2 = f32(batch, 14, 14, 32), f32(5, 5, 32, 64), f32(64)
    dout2 = f32(batch, 14, 14, 64)
    same = ((2, 2), (2, 2))
    cols1, _ = kernels.im2col_nhwc(x1, (5, 5), 1, "SAME")
    cols2, _ = kernels.im2col_nhwc(x2, (5, 5), 1, "SAME")
    w2t = np.ascontiguousarray(w2.reshape(-1, 64).T)
    _, cache2 = kernels.conv2d_forward(x2, w2, 1, "SAME", algorithm="im2col")
    flops1, flops2 = 2 * batch * 28 * 28 * 25 * 32, 2 * batch * 14 * 14 * 800 * 64
    return [
        ("conv1 forward, jit (+bias+ReLU)", lambda: jit_conv.conv2d_nhwc_f32(x1, w1, same, b1, True), flops1),
        ("conv1 forward, GEMM alone", lambda: placement.matmul(cols1, w1.reshape(-1, 32)), flops1),
        ("conv1 forward, im2col + GEMM (+bias+ReLU)",
         lambda: kernels.conv2d_forward(x1, w1, 1, "SAME", algorithm="im2col", bias=b1, relu=True), flops1),
        ("conv2 forward, jit (+bias+ReLU)", lambda: jit_conv.conv2d_nhwc_f32(x2, w2, same, b2, True), flops2),
        ("conv2 forward, GEMM alone", lambda: placement.matmul(cols2, w2.reshape(-1, 64)), flops2),
        ("conv2 forward, im2col + GEMM (+bias+ReLU)",
         lambda: kernels.conv2d_forward(x2, w2, 1, "SAME", algorithm="im2col", bias=b2, relu=True), flops2),
        ("conv2 backward-data, jit", lambda: jit_conv.conv2d_backward_data_nhwc_f32(dout2, w2, (14, 14), same),
         flops2),
        ("conv2 backward-data, GEMM alone", lambda: placement.matmul(dout2.reshape(-1, 64), w2t), flops2),
        ("conv2 backward-data, GEMM + col2im",
         lambda: kernels.conv2d_backward(dout2, cache2, need_dw=False, algorithm="im2col"), flops2),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=40)
    args = parser.parse_args(argv)
    if jit_conv.simd_lanes() is None:
        print("this CPU has neither AVX-512F nor AVX2 + FMA: no jit_conv kernels to measure")
        return 0
    rows = cases(args.batch_size, np.random.default_rng(0))
    best = [float("inf")] * len(rows)
    with placement.op_threads(args.threads):
        for _, run, _ in rows:  # compile and warm up
            run()
        for _ in range(args.repetitions):
            for i, (_, run, _) in enumerate(rows):
                t0 = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - t0)
    print(f"CPU: {sysinfo.cpu_model()}; {args.threads} thread(s); {jit_conv.simd_lanes()} float32 lanes; "
          f"batch {args.batch_size}; best of {args.repetitions} interleaved repetitions")
    roofs = roofline.benchmark_roofs(("fp32",), threads=args.threads)
    peak = max(roofs["compute"]["fp32"]["one_core"], roofs["compute"]["fp32"]["all_cores"])
    for (name, _, flops), seconds in zip(rows, best):
        print(f"{name:45s} {seconds * 1e3:8.2f} ms {flops / seconds / 1e9:8.1f} GFLOP/s "
              f"{100 * flops / seconds / peak:5.1f}% of the measured fp32 peak")
    for op in ("conv1 forward", "conv2 forward", "conv2 backward-data"):
        times = {name.split(", ")[1]: t for (name, _, _), t in zip(rows, best) if name.startswith(op)}
        jit, gemm, path = (times[k] for k in sorted(times, key=lambda k: ("jit" not in k, "alone" not in k)))
        print(f"{op}: jit / GEMM alone = {gemm / jit:.2f}x, jit / im2col path = {path / jit:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
