"""bf16 vs fp32 GEMM on this CPU: the same register-blocked kernel with vdpbf16ps or with an fp32 FMA.

Run:  python benchmarks/bf16_bench.py                 (1024^3, 5 interleaved rounds)
      python benchmarks/bf16_bench.py --size 512 --rounds 3

Each round times, one right after the other: the bf16 kernel (``vdpbf16ps``, operands converted and packed
once, as weights are), its fp32 twin (the same 6 x 64 tile with ``vfmadd``, packed once), the bf16 GEMM
including the conversion of both float32 operands, and numpy's float32 BLAS. The ratios are per round
(same-run), their median printed with the spread: a figure from a loaded machine means little on its own.
``vdpbf16ps`` does 32 multiply-adds per instruction against the FMA's 16; whether that doubles the speed
depends on how many of each the core issues per cycle, which this benchmark measures rather than assumes.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workshop_lib import bf16, sysinfo  # noqa: E402
from workshop_lib.bench import best_time  # noqa: E402


def kernels(n, seed=0):
    """{name: zero-argument function} for the GEMMs compared, on n x n x n float32 data."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, n)).astype(np.float32), rng.standard_normal((n, n)).astype(np.float32)
    found = {"numpy fp32 (BLAS)": lambda: a @ b,
             "bf16 incl. conversion": lambda: bf16.gemm_bf16(a, b)}
    if bf16.bf16_isa() is not None:
        packed, a32 = bf16.pack_bf16(b), bf16._a_rows(bf16.convert_bf16(a), (n + 1) // 2)
        c16 = np.empty((a32.shape[0], packed.data.shape[0] * bf16._COLS), np.float32)
        mp, cols = a32.shape[0], packed.data.shape[0] * bf16._COLS
        af = np.zeros((mp, n), np.float32)
        af[:n] = a
        bp = np.zeros((n, cols), np.float32)
        bp[:, :n] = b
        bp = np.ascontiguousarray(bp.reshape(n, cols // bf16._COLS, bf16._COLS).transpose(1, 0, 2))
        c32 = np.empty((mp, cols), np.float32)
        found["bf16 kernel (vdpbf16ps)"] = lambda: bf16._fast_gemm("bf16")(a32, packed.data, c16)
        found["fp32 kernel (same tile, FMA)"] = lambda: bf16._fast_gemm("f32")(af, bp, c32)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many calls per round")
    args = parser.parse_args(argv)
    n = args.size
    print(f"CPU: {sysinfo.cpu_model()}; bf16 path: {bf16.describe_path()}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; GEMM {n}^3, "
          f"{args.rounds} interleaved rounds, best of {args.repeats} per round")
    fns = kernels(n)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(best_time(fn, args.repeats))
    flops = 2.0 * n**3
    for name, t in times.items():
        print(f"  {name:32s} {flops / np.median(t) / 1e9:8.1f} GFLOP/s (median of rounds)")
    pairs = [("bf16 kernel (vdpbf16ps)", "fp32 kernel (same tile, FMA)", " (target >= 1.7x)"),
             ("bf16 kernel (vdpbf16ps)", "numpy fp32 (BLAS)", ""),
             ("bf16 incl. conversion", "numpy fp32 (BLAS)", "")]
    for a, b, note in pairs:
        if a in times and b in times:
            ratios = np.array(times[b]) / np.array(times[a])
            print(f"{a} / {b} = {np.median(ratios):.2f}x{note} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
