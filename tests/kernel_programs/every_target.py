"""Every public kernel family, compiled for whatever numba targets in this process, against its reference.

Run by tests/test_targets.py once per ``NUMBA_CPU_NAME`` (generic, sandybridge, haswell, skylake-avx512,
host), each in its own process with its own ``NUMBA_CACHE_DIR``: a kernel that chose an intrinsic the
target lacks aborts the whole process inside LLVM, so surviving to the last line is half the test. Prints
the target, one line per family (``family: ok (path)``) and ``ALL OK``; exits 1 on the first mismatch.

    NUMBA_CPU_NAME=generic NUMBA_CACHE_DIR=$(mktemp -d) python tests/kernel_programs/every_target.py
"""

import sys
from pathlib import Path

import numpy as np

from workshop_lib import int8, jit_conv, sysinfo
from workshop_lib import kernels as K
from workshop_lib import quantization as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_kernels import conv_reference  # noqa: E402 - the float64 reference of the unit tests

RNG = np.random.default_rng(28)


def conv_f64(x, w, pads):
    return conv_reference(x, w, (1, 1), pads)


def same(name, got, want):
    if got.shape != want.shape or not np.array_equal(got, want):
        print(f"{name}: MISMATCH {got.shape} vs {want.shape}; max |diff| "
              f"{np.max(np.abs(got.astype(np.float64) - want)) if got.shape == want.shape else 'n/a'}")
        sys.exit(1)


def close(name, got, want, tol):
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    if got.shape != want.shape or not err <= tol:
        print(f"{name}: MISMATCH relative error {err:.3g} > {tol}")
        sys.exit(1)


def main():
    target = sysinfo.compile_target()
    print(f"target: {target['cpu_name']} usable: {','.join(k for k, v in target['usable'].items() if v) or 'none'}")

    a, b = RNG.standard_normal((13, 37)).astype(np.float32), RNG.standard_normal((37, 9)).astype(np.float32)
    for algorithm in ("blas", "reference"):
        close(f"fp32 GEMM {algorithm}", K.gemm_forward(a, b, algorithm=algorithm)[0], a.astype(np.float64) @ b, 1e-5)
    print("fp32 GEMM: ok (blas, reference)")

    x = RNG.standard_normal((2, 7, 9, 3)).astype(np.float32)
    w = RNG.standard_normal((3, 3, 3, 5)).astype(np.float32)
    want = conv_f64(x, w, ((1, 1), (1, 1)))
    for algorithm in ("jit", "im2col", "direct"):
        out, cache = K.conv2d_forward(x, w, 1, "SAME", algorithm=algorithm)
        close(f"fp32 conv {algorithm}", out, want, 1e-5)
    dout = RNG.standard_normal(out.shape).astype(np.float32)
    dx, dw = K.conv2d_backward(dout, cache)
    dw_want = np.einsum("nhwk,nhwc->ck", dout.astype(np.float64),
                        np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, 1:8, 1:10, :].astype(np.float64))
    close("fp32 conv dw (centre tap)", dw[1, 1], dw_want, 1e-4)
    print(f"fp32 conv: ok ({'jit %d lanes' % jit_conv.simd_lanes() if jit_conv.simd_lanes() else 'im2col'})")

    a8 = RNG.integers(0, 256, (11, 45), dtype=np.uint8)
    b8 = RNG.integers(-128, 128, (45, 70), dtype=np.int8)
    exact = a8.astype(np.int64) @ b8.astype(np.int64)
    paths = ["auto", "portable", "reference"] + (["fast"] if int8.vnni_isa() else [])
    for path in paths:
        same(f"int8 GEMM {path}", int8.gemm_u8s8s32(a8, b8, path=path), exact)
    if int8.vnni_isa():
        same("int8 GEMM packed", int8.gemm_u8s8s32(a8, int8.pack_weights(b8)), exact)
    else:
        try:
            int8.gemm_u8s8s32(a8, b8, path="fast")
            print("int8 GEMM: path='fast' ran on a target without VNNI")
            sys.exit(1)
        except RuntimeError as exc:
            assert "numba compiles for" in str(exc), exc
    ap, bp = np.pad(a8, ((0, 0), (0, 3))).astype(np.int64), np.pad(b8, ((0, 3), (0, 0))).astype(np.int64)
    pairs = ap[:, 0::2, None] * bp[None, 0::2, :] + ap[:, 1::2, None] * bp[None, 1::2, :]
    same("int8 GEMM avx512bw", int8.gemm_u8s8s32(a8, b8, semantics="avx512bw"), np.clip(pairs, -32768, 32767).sum(1))
    a16 = RNG.integers(-3000, 3000, (7, 21), dtype=np.int16)
    b16 = RNG.integers(-3000, 3000, (21, 19), dtype=np.int16)
    same("s16 GEMM", int8.gemm_s16s16s32(a16, b16), a16.astype(np.int64) @ b16.astype(np.int64))
    print(f"int8 GEMM: ok ({int8.vnni_isa() or 'portable'}; {', '.join(paths)})")

    xq = RNG.integers(0, 256, (2, 6, 8, 4), dtype=np.uint8)
    wq = RNG.integers(-128, 128, (3, 3, 4, 16), dtype=np.int8)
    acc = conv_f64(xq, wq, ((1, 1), (1, 1)))
    same("int8 conv", int8.conv2d_u8s8s32(xq, wq, padding="SAME"), acc.astype(np.int64))
    print("int8 conv: ok")

    bias = RNG.integers(-500, 500, 16).astype(np.int32)
    mult = RNG.uniform(1e-4, 3e-4, 16)
    out_qp = Q.QuantParams(np.float64(1.0), np.int32(3), np.dtype(np.uint8))
    want_u8 = np.clip(np.maximum(np.rint((acc + bias) * mult) + 3, 3), 0, 255).astype(np.uint8)
    requant = Q.requantize(acc.astype(np.int32), mult, out_qp, bias=bias, relu=True)
    same("requantize", requant, want_u8)
    if int8.vnni_isa():
        fused = int8.conv2d_u8s8u8_fused(xq, int8.pack_fused_weights(wq), bias, mult, 3, True)
        same("int8 fused conv", fused, want_u8)
        fc = int8.gemm_u8s8u8_fused(a8, int8.pack_fused_weights(b8), bias[:1].repeat(70), 1e-4)
        same("int8 fused FC", fc, np.clip(np.maximum(np.rint((exact + bias[0]) * 1e-4), 0), 0, 255).astype(np.uint8))
        print("int8 fused layers: ok")
    else:
        try:
            int8.pack_fused_weights(wq)
            print("int8 fused layers: packed for a target without VNNI")
            sys.exit(1)
        except RuntimeError as exc:
            assert "numba compiles for" in str(exc), exc
        print("int8 fused layers: ok (not offered: the target has no VNNI; refused with a clear error)")

    f = RNG.standard_normal((5, 8)).astype(np.float32)
    qp = Q.choose_qparams(f.min(0), f.max(0), np.int8, symmetric=True, axis=-1)
    q = Q.quantize(f, qp)
    same("quantize", q, np.clip(np.rint(f / qp.scale), -128, 127).astype(np.int8))
    same("dequantize", Q.dequantize(q, qp), (q.astype(np.float64) * qp.scale).astype(np.float32))
    print("quantization: ok")

    from workshop_lib import d4p

    pts = np.concatenate([RNG.normal(c, 0.3, (40, 3)) for c in (-2.0, 0.0, 2.0)])
    c0 = pts[[0, 40, 80]].copy()
    result = d4p.kmeans(3, maxIterations=4, accuracyThreshold=0.0).compute(pts, c0)
    c = c0
    for _ in range(4):
        labels = np.argmin(((pts[:, None, :] - c[None]) ** 2).sum(2), 1)
        c = np.stack([pts[labels == j].mean(0) for j in range(3)])
    close("d4p Lloyd centroids", result.centroids, c, 1e-9)
    same("d4p Lloyd assignments", result.assignments.ravel(), np.argmin(((pts[:, None] - c[None]) ** 2).sum(2), 1))
    print("K-Means (d4p Lloyd): ok")
    print("ALL OK")


if __name__ == "__main__":
    main()
