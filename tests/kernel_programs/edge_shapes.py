"""Every public kernel on edge shapes, checked against float64 / int64 numpy references.

Run by tests/test_kernels.py under ``NUMBA_BOUNDSCHECK=1`` (and a fresh ``NUMBA_CACHE_DIR``, so that no
kernel compiled without bounds checks is loaded): an index outside an array in any numba kernel raises
instead of reading or writing someone else's memory. Prints one line per group and ``ok`` at the end.

    NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(mktemp -d) python tests/kernel_programs/edge_shapes.py
"""

import sys
import time
from pathlib import Path

import numpy as np

from workshop_lib import int8
from workshop_lib import kernels as K

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_kernels import conv_reference, pool_reference  # noqa: E402 - the float64 references of the unit tests

RNG = np.random.default_rng(7)

# N, H, W, C, K, R, S, stride, padding: 1x1 images, kernel == input, kernel > input under SAME,
# stride > kernel, batch 1, one channel, odd sizes, C >= 8 (im2col's vectorised copy), explicit padding
CONV = [
    (1, 1, 1, 1, 1, 1, 1, (1, 1), "VALID"),
    (2, 1, 1, 3, 2, 3, 3, (1, 1), "SAME"),
    (1, 4, 4, 2, 3, 4, 4, (1, 1), "VALID"),
    (1, 5, 3, 1, 1, 5, 3, (2, 1), "VALID"),
    (2, 7, 7, 2, 2, 2, 2, (3, 3), "VALID"),
    (1, 7, 6, 1, 2, 1, 1, (4, 5), "SAME"),
    (3, 5, 7, 3, 5, 3, 2, (2, 1), "SAME"),
    (1, 9, 5, 17, 1, 3, 3, (2, 2), "SAME"),
    (1, 3, 4, 2, 2, 2, 3, (1, 2), ((2, 0), (0, 1))),
]

# N, H, W, C, ksize, stride, padding
POOL = [
    (1, 1, 1, 1, (1, 1), (1, 1), "VALID"),
    (1, 1, 1, 2, (3, 3), (2, 2), "SAME"),
    (2, 4, 4, 1, (4, 4), (1, 1), "VALID"),
    (1, 7, 5, 3, (2, 2), (3, 3), "VALID"),
    (1, 7, 5, 3, (3, 2), (4, 1), "SAME"),
    (1, 5, 5, 1, (3, 3), (2, 2), ((2, 1), (0, 2))),
]


def pads_of(padding, h, w, r, s, stride):
    return K.conv_padding(padding, h, w, r, s, stride)


def close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=what)


def check_conv():
    for n, h, w, c, k, r, s, stride, padding in CONV:
        what = f"conv {n, h, w, c, k, r, s, stride, padding}"
        x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
        wt = RNG.standard_normal((r, s, c, k)).astype(np.float32)
        pads = pads_of(padding, h, w, r, s, stride)
        ref = conv_reference(x, wt, stride, pads)
        dout = RNG.standard_normal(ref.shape).astype(np.float32)
        grads = {}
        for fmt in ("NHWC", "NCHW"):
            xin = x if fmt == "NHWC" else K.nhwc_to_nchw(x)
            for algorithm in ("im2col", "direct"):
                out, cache = K.conv2d_forward(xin, wt, stride, padding, fmt, algorithm)
                close(out if fmt == "NHWC" else K.nchw_to_nhwc(out), ref, f"{what} {fmt} {algorithm}")
                for gemm in ("blas", "reference"):
                    dx, dw = K.conv2d_backward(dout if fmt == "NHWC" else K.nhwc_to_nchw(dout), cache, gemm=gemm)
                    grads[fmt, algorithm, gemm] = (dx if fmt == "NHWC" else K.nchw_to_nhwc(dx), dw)
        # dw = sum over outputs of dout x receptive field; dx by the adjoint identity <conv(x), dout> = <x, dx>
        dx0, dw0 = grads["NHWC", "im2col", "blas"]
        for key, (dx, dw) in grads.items():
            close(dx, dx0, f"{what} dx {key}")
            close(dw, dw0, f"{what} dw {key}")
        close(np.vdot(x.astype(np.float64), dx0), np.vdot(ref, dout.astype(np.float64)), f"{what} adjoint")
        cols, (oh, ow) = K.im2col_nhwc(x, (r, s), stride, pads)
        close((cols.astype(np.float64) @ wt.reshape(-1, k)).reshape(ref.shape), ref, f"{what} im2col_nhwc")
        b = RNG.standard_normal(k).astype(np.float32)
        out = K.conv2d_blocked_forward(K.to_blocked(x, "NHWC"), K.weights_to_blocked(wt), stride, padding, b,
                                       relu=True)
        close(K.from_blocked(out, k, "NHWC"), np.maximum(ref + b, 0), f"{what} blocked")
    print(f"conv2d forward/backward (im2col, direct, blocked; NHWC, NCHW): {len(CONV)} edge shapes")


def check_pool():
    for n, h, w, c, ksize, stride, padding in POOL:
        what = f"pool {n, h, w, c, ksize, stride, padding}"
        x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
        pads = pads_of(padding, h, w, ksize[0], ksize[1], stride)
        for kind, forward, backward in (("max", K.maxpool_forward, K.maxpool_backward),
                                        ("avg", K.avgpool_forward, K.avgpool_backward)):
            ref = pool_reference(x, ksize, stride, pads, kind)
            dout = RNG.standard_normal(ref.shape).astype(np.float32)
            for fmt in ("NHWC", "NCHW"):
                out, cache = forward(x if fmt == "NHWC" else K.nhwc_to_nchw(x), ksize, stride, padding, fmt)
                close(out if fmt == "NHWC" else K.nchw_to_nhwc(out), ref, f"{what} {kind} {fmt}")
                dx = backward(dout if fmt == "NHWC" else K.nhwc_to_nchw(dout), cache)
                dx = dx if fmt == "NHWC" else K.nchw_to_nhwc(dx)
                # every window's gradient lands inside x and nowhere else: the totals agree
                close(dx.astype(np.float64).sum(), dout.astype(np.float64).sum(), f"{what} {kind} {fmt} dx")
                if kind == "max":  # the fused MaxPoolGrad -> ReluGrad -> BiasAddGrad on the same cache
                    y = x if fmt == "NHWC" else K.nhwc_to_nchw(x)
                    dy = K.relu_backward(backward(dout if fmt == "NHWC" else K.nhwc_to_nchw(dout), cache), y)
                    fused, db = K.maxpool_relu_backward(dout if fmt == "NHWC" else K.nhwc_to_nchw(dout), cache, out)
                    assert (fused == dy).all(), f"{what} fused {fmt}"
                    axes = (0, 1, 2) if fmt == "NHWC" else (0, 2, 3)
                    close(db, dy.astype(np.float64).sum(axis=axes), f"{what} fused {fmt} db")
        u8 = RNG.integers(0, 256, (n, h, w, c), dtype=np.uint8)
        out, _ = K.maxpool_forward(u8, ksize, stride, padding)
        assert out.dtype == np.uint8 and (out == pool_reference(u8, ksize, stride, pads, "max")).all(), what
    for shape in ((1, 1), (1, 5), (3, 1), (2, 1, 1, 3), (17, 33)):
        y = np.maximum(RNG.standard_normal(shape), 0).astype(np.float32)
        g = RNG.standard_normal(shape).astype(np.float32)
        dx, db = K.relu_bias_backward(g, y)
        assert (dx == g * (y > 0)).all() and (K.relu_backward(g, y) == dx).all(), shape
        close(db, (g * (y > 0)).astype(np.float64).reshape(-1, shape[-1]).sum(axis=0), f"relu_bias_backward {shape}")
        out, mask = K.dropout_forward(g, 0.5, rng=np.random.default_rng(1))
        assert (out == g * mask).all(), shape
    print(f"max/avg pooling forward/backward, float32 and u8: {len(POOL)} edge shapes")


def check_gemm_and_adam():
    for m, k, n in ((1, 1, 1), (1, 7, 1), (5, 1, 3), (3, 17, 2)):
        a = RNG.standard_normal((m, k)).astype(np.float32)
        b = RNG.standard_normal((k, n)).astype(np.float32)
        close(K.gemm_reference(a, b), a.astype(np.float64) @ b, f"gemm_reference {m, k, n}")
        for trans_a in (False, True):
            for trans_b in (False, True):
                aa, bb = (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)
                c, cache = K.gemm_forward(aa, bb, trans_a, trans_b, "reference")
                close(c, a.astype(np.float64) @ b, f"gemm_forward {m, k, n}")
                da, db = K.gemm_backward(np.ones_like(c), cache)
                assert da.shape == aa.shape and db.shape == bb.shape
        a8 = RNG.integers(0, 256, (m, k), dtype=np.uint8)
        b8 = RNG.integers(-128, 128, (k, n), dtype=np.int8)
        exact = a8.astype(np.int64) @ b8.astype(np.int64)
        for path in ("portable", "reference"):
            assert (int8.gemm_u8s8s32(a8, b8, path=path) == exact).all(), (path, m, k, n)
        a16 = RNG.integers(-300, 300, (m, k), dtype=np.int16)
        b16 = RNG.integers(-300, 300, (k, n), dtype=np.int16)
        for path in ("portable", "reference"):
            assert (int8.gemm_s16s16s32(a16, b16, path=path) == a16.astype(np.int64) @ b16).all(), (path, m, k, n)
    x8 = RNG.integers(0, 256, (1, 3, 3, 2), dtype=np.uint8)
    w8 = RNG.integers(-128, 128, (3, 3, 2, 1), dtype=np.int8)
    exact = conv_reference(x8.astype(np.float64), w8.astype(np.float64), (1, 1), ((0, 0), (0, 0)))
    assert (int8.conv2d_u8s8s32(x8, w8, 1, "VALID", path="portable") == exact).all()
    for size in (1, 3, 17):
        w = RNG.standard_normal(size).astype(np.float32)
        g = RNG.standard_normal(size).astype(np.float32)
        m, v = np.zeros_like(w), np.zeros_like(w)
        expected = w.astype(np.float64) - 0.1 * ((1 - 0.9) * g) / (np.sqrt((1 - 0.999) * g.astype(np.float64) ** 2)
                                                                   + 1e-8)
        K.adam_update(w, g, m, v, 0.1)
        close(w, expected, f"adam_update {size}")
    print("gemm (reference, forward, backward), int8 and s16 GEMM, int8 conv, adam_update: edge sizes")


if __name__ == "__main__":
    for check in (check_conv, check_pool, check_gemm_and_adam):
        start = time.process_time()
        check()
        print(f"  ({time.process_time() - start:.1f} s of CPU, most of it compiling)")
    print("ok")
