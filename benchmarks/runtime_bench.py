"""numba and the BLAS in one process: each kernel family alone, and interleaved with numpy's GEMM.

Run:  python benchmarks/runtime_bench.py            (int8 GEMM 1024^3, fp32 jit conv, d4p Lloyd; numpy fp32 1024^3)
      python benchmarks/runtime_bench.py --quick    (smaller shapes)
      python benchmarks/runtime_bench.py --no-yield (the kernels without workshop_lib.runtime's BLAS yield)

A learner's notebook calls numpy and our numba kernels one after the other. After numpy's GEMM the
BLAS's worker threads stay awake for a while, and numba's threads, which need the same cores, lose
them. For each family this prints its time alone (best of ``--repeats`` calls in a row) and
interleaved (each call right after a numpy GEMM), and numpy's GEMM alone and interleaved (each right
after the kernel), as interleaved/alone ratios: 1.00 is "no fight". Say the load (``uptime``) with
the figures: on a machine shared with other work, the ratios of one run are what compares.
"""

import argparse
import os
import time

import numpy as np

from workshop_lib import d4p, int8, kernels, runtime, sysinfo


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def families(quick, rng):
    n = 512 if quick else 1024
    a8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
    b8 = int8.pack_weights(rng.integers(-128, 128, (n, n), dtype=np.int8)) if int8.vnni_isa() else \
        rng.integers(-128, 128, (n, n), dtype=np.int8)
    x = rng.standard_normal((16 if quick else 32, 28, 28, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 64)).astype(np.float32)
    pts = rng.standard_normal((100_000 if quick else 400_000, 3))
    c0 = pts[:16].copy()
    lloyd = d4p.kmeans(16, maxIterations=1, assignFlag=False)
    return {
        f"int8 GEMM {n}^3 ({int8.vnni_isa() or 'portable'})": lambda: int8.gemm_u8s8s32(a8, b8),
        "fp32 conv (jit)": lambda: kernels.conv2d_forward(x, w, 1, "SAME", algorithm="jit"),
        "d4p Lloyd (1 iteration)": lambda: lloyd.compute(pts, c0),
    }


def measure(name, kernel, gemm, repeats):
    kernel(), gemm()  # compile and warm
    alone_k, alone_g = _best(kernel, repeats), _best(gemm, repeats)
    inter_k, inter_g = [], []
    for _ in range(repeats):
        inter_k.append(_best(kernel, 1))
        inter_g.append(_best(gemm, 1))
    return {"family": name, "kernel_alone": alone_k, "kernel_interleaved": min(inter_k),
            "gemm_alone": alone_g, "gemm_interleaved": min(inter_g)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-yield", action="store_true", help="turn workshop_lib.runtime's BLAS yield off")
    args = parser.parse_args(argv)
    if args.no_yield:
        runtime.set_blas_yield(False)
    rng = np.random.default_rng(29)
    n = 512 if args.quick else 1024
    a, b = rng.standard_normal((n, n)).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)

    def gemm():
        return a @ b

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {sysinfo.cpu_model()}; load {load:.1f}; numba {runtime.numba_threads()} threads, "
          f"BLAS {runtime.blas_threads()} threads; BLAS yield {'off' if args.no_yield else 'on'}")
    print(f"{'family':34s} {'kernel ms':>10s} {'inter/alone':>11s} {'numpy GEMM ms':>14s} {'inter/alone':>11s}")
    worst = 1.0
    for name, kernel in families(args.quick, rng).items():
        r = measure(name, kernel, gemm, args.repeats)
        k_ratio = r["kernel_alone"] / r["kernel_interleaved"]
        g_ratio = r["gemm_alone"] / r["gemm_interleaved"]
        worst = min(worst, k_ratio, g_ratio)
        print(f"{name:34s} {r['kernel_alone'] * 1e3:10.2f} {k_ratio:11.2f} {r['gemm_alone'] * 1e3:14.2f} {g_ratio:11.2f}")
    print(f"worst interleaved/alone speed: {worst:.2f} (target >= 0.90; load {load:.1f})")


if __name__ == "__main__":
    main()
