"""workshop_lib.kernels against float64 numpy references, and every backward pass against central differences."""

import os

import numpy as np
import pytest

from workshop_lib import kernels as K

RNG = np.random.default_rng(1234)


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (x is perturbed in place)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def assert_grad(analytic, numeric, rtol=1e-4, atol=1e-7):
    err = np.abs(analytic - numeric).max() / max(np.abs(numeric).max(), 1e-12)
    assert err < rtol or np.allclose(analytic, numeric, atol=atol), f"relative gradient error {err:.2e}"


def conv_reference(x, w, stride, pads):
    """NHWC float64 convolution: pad, then one einsum per filter tap (independent of im2col)."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    r_size, s_size, _, k = w.shape
    oh = (xp.shape[1] - r_size) // stride[0] + 1
    ow = (xp.shape[2] - s_size) // stride[1] + 1
    out = np.zeros((x.shape[0], oh, ow, k))
    for r in range(r_size):
        for s in range(s_size):
            patch = xp[:, r : r + stride[0] * oh : stride[0], s : s + stride[1] * ow : stride[1], :]
            out += np.einsum("nhwc,ck->nhwk", patch, w[r, s].astype(np.float64))
    return out


def same_pads(h, w, r, s, stride):
    oh, ow = -(-h // stride[0]), -(-w // stride[1])
    ph, pw = max((oh - 1) * stride[0] + r - h, 0), max((ow - 1) * stride[1] + s - w, 0)
    return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


CONV_CASES = [  # N, H, W, C, K, R, S, stride, padding
    (1, 7, 9, 3, 5, 3, 3, (1, 1), "SAME"),
    (2, 8, 8, 17, 19, 5, 5, (1, 1), "SAME"),
    (3, 11, 6, 4, 2, 3, 2, (2, 1), "VALID"),
    (2, 9, 9, 5, 33, 3, 3, (2, 2), "SAME"),
    (1, 6, 7, 2, 3, 2, 3, (1, 2), ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("algorithm", ["im2col", "direct"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_float64_reference(case, algorithm, data_format):
    n, h, w, c, k, r, s, stride, padding = case
    x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
    wt = RNG.standard_normal((r, s, c, k)).astype(np.float32)
    pads = same_pads(h, w, r, s, stride) if padding == "SAME" else ((0, 0), (0, 0)) if padding == "VALID" else padding
    ref = conv_reference(x, wt, stride, pads)
    xin = x if data_format == "NHWC" else K.nhwc_to_nchw(x)
    out, _ = K.conv2d_forward(xin, wt, stride, padding, data_format, algorithm)
    out = out if data_format == "NHWC" else K.nchw_to_nhwc(out)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[4]])
def test_conv2d_backward_matches_central_differences(case, data_format):
    n, h, w, c, k, r, s, stride, padding = case
    x = RNG.standard_normal((n, h, w, c) if data_format == "NHWC" else (n, c, h, w))
    wt = RNG.standard_normal((r, s, c, k))
    out, cache = K.conv2d_forward(x, wt, stride, padding, data_format)
    g = RNG.standard_normal(out.shape)
    dx, dw = K.conv2d_backward(g, cache)
    loss = lambda: (K.conv2d_forward(x, wt, stride, padding, data_format)[0] * g).sum()  # noqa: E731
    assert_grad(dx, numerical_grad(loss, x))
    assert_grad(dw, numerical_grad(loss, wt))


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("algorithm", ["blas", "reference"])
def test_gemm_forward_and_backward(trans_a, trans_b, algorithm):
    m, k, n = 5, 7, 3
    a = RNG.standard_normal((k, m) if trans_a else (m, k))
    b = RNG.standard_normal((n, k) if trans_b else (k, n))
    c, cache = K.gemm_forward(a, b, trans_a, trans_b, algorithm)
    np.testing.assert_allclose(c, (a.T if trans_a else a) @ (b.T if trans_b else b), rtol=1e-12)
    g = RNG.standard_normal(c.shape)
    da, db = K.gemm_backward(g, cache)
    loss = lambda: (K.gemm_forward(a, b, trans_a, trans_b)[0] * g).sum()  # noqa: E731
    assert_grad(da, numerical_grad(loss, a))
    assert_grad(db, numerical_grad(loss, b))


def test_gemm_reference_float32_odd_sizes():
    a = RNG.standard_normal((33, 65)).astype(np.float32)
    b = RNG.standard_normal((65, 17)).astype(np.float32)
    np.testing.assert_allclose(K.gemm_reference(a, b), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def pool_reference(x, ksize, stride, pads, kind):
    n, h, w, c = x.shape
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - ksize[0]) // stride[0] + 1
    ow = (w + pl + pr - ksize[1]) // stride[1] + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * stride[0] - pt, j * stride[1] - pl
            win = x[:, max(h0, 0) : h0 + ksize[0], max(w0, 0) : w0 + ksize[1], :]
            out[:, i, j, :] = win.max(axis=(1, 2)) if kind == "max" else win.mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape, ksize, stride, padding", [
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((1, 7, 9, 17), (3, 3), (2, 2), "SAME"),
    ((3, 5, 6, 2), (2, 3), (1, 2), "SAME"),
])
def test_pooling_forward_and_backward(kind, data_format, shape, ksize, stride, padding):
    x = RNG.standard_normal(shape)
    pads = same_pads(shape[1], shape[2], ksize[0], ksize[1], stride) if padding == "SAME" else ((0, 0), (0, 0))
    fwd, bwd = (K.maxpool_forward, K.maxpool_backward) if kind == "max" else (K.avgpool_forward, K.avgpool_backward)
    xin = x if data_format == "NHWC" else K.nhwc_to_nchw(x)
    out, cache = fwd(xin, ksize, stride, padding, data_format)
    got = out if data_format == "NHWC" else K.nchw_to_nhwc(out)
    np.testing.assert_allclose(got, pool_reference(x, ksize, stride, pads, kind), rtol=1e-12)
    g = RNG.standard_normal(out.shape)
    dx = bwd(g, cache)
    loss = lambda: (fwd(xin, ksize, stride, padding, data_format)[0] * g).sum()  # noqa: E731
    assert_grad(dx, numerical_grad(loss, xin))


@pytest.mark.parametrize("name", ["relu", "tanh", "elu"])
def test_activations_backward(name):
    fwd, bwd = getattr(K, f"{name}_forward"), getattr(K, f"{name}_backward")
    x = RNG.standard_normal((4, 7))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink of relu
    y, cache = fwd(x)
    ref = {"relu": np.maximum(x, 0), "tanh": np.tanh(x), "elu": np.where(x > 0, x, np.exp(x) - 1)}[name]
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    g = RNG.standard_normal(y.shape)
    assert_grad(bwd(g, cache), numerical_grad(lambda: (fwd(x)[0] * g).sum(), x))


@pytest.mark.parametrize("data_format, shape", [("NHWC", (2, 3, 4, 5)), ("NCHW", (2, 5, 3, 4)), ("NHWC", (6, 5))])
def test_bias_add_forward_and_backward(data_format, shape):
    x = RNG.standard_normal(shape)
    b = RNG.standard_normal(5)
    out, cache = K.bias_add_forward(x, b, data_format)
    axis = 1 if data_format == "NCHW" else -1
    np.testing.assert_allclose(out, x + np.expand_dims(b, tuple(i for i in range(x.ndim) if i != axis % x.ndim)))
    g = RNG.standard_normal(shape)
    dx, db = K.bias_add_backward(g, cache)
    loss = lambda: (K.bias_add_forward(x, b, data_format)[0] * g).sum()  # noqa: E731
    assert_grad(dx, numerical_grad(loss, x))
    assert_grad(db, numerical_grad(loss, b))
    with pytest.raises(ValueError, match="bias shape"):
        K.bias_add_forward(x, np.ones(4), data_format)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("data_format, shape", [("NHWC", (3, 2, 2, 4)), ("NCHW", (3, 4, 2, 2))])
def test_batchnorm_forward_and_backward(training, data_format, shape):
    x = RNG.standard_normal(shape) * 2 + 1
    gamma, beta = RNG.standard_normal(4), RNG.standard_normal(4)
    rm, rv = RNG.standard_normal(4), RNG.random(4) + 0.5

    def run():
        return K.batchnorm_forward(x, gamma, beta, rm.copy(), rv.copy(), training, data_format=data_format)

    out, cache = run()
    axis = 1 if data_format == "NCHW" else 3
    axes = tuple(i for i in range(4) if i != axis)
    mean, var = (x.mean(axes), x.var(axes)) if training else (rm, rv)
    bshape = [1, 1, 1, 1]
    bshape[axis] = -1
    ref = gamma.reshape(bshape) * (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3) + beta.reshape(bshape)
    np.testing.assert_allclose(out, ref, rtol=1e-10)
    g = RNG.standard_normal(shape)
    dx, dgamma, dbeta = K.batchnorm_backward(g, cache)
    loss = lambda: (run()[0] * g).sum()  # noqa: E731
    assert_grad(dx, numerical_grad(loss, x))
    assert_grad(dgamma, numerical_grad(loss, gamma))
    assert_grad(dbeta, numerical_grad(loss, beta))


def test_batchnorm_updates_running_statistics_in_training_only():
    x = RNG.standard_normal((50, 3)) * 3 + 2
    rm, rv = np.zeros(3), np.ones(3)
    K.batchnorm_forward(x, np.ones(3), np.zeros(3), rm, rv, training=True, momentum=0.9)
    np.testing.assert_allclose(rm, 0.1 * x.mean(0))
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x.var(0, ddof=1))
    before = rm.copy()
    K.batchnorm_forward(x, np.ones(3), np.zeros(3), rm, rv, training=False)
    np.testing.assert_array_equal(rm, before)


def test_softmax_is_stable_and_cross_entropy_gradient_is_right():
    logits = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0]])
    p = K.softmax(logits)
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
    np.testing.assert_allclose(p[0], np.exp([-2, -1, 0]) / np.exp([-2, -1, 0]).sum())
    x = RNG.standard_normal((6, 10)) * 3
    labels = RNG.integers(0, 10, 6)
    loss, cache = K.softmax_xent_forward(x, labels)
    ref = -np.mean(np.log(np.exp(x[np.arange(6), labels]) / np.exp(x).sum(1)))
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    assert_grad(K.softmax_xent_backward(1.0, cache), numerical_grad(lambda: K.softmax_xent_forward(x, labels)[0], x))
    with pytest.raises(ValueError, match="labels must lie in"):
        K.softmax_xent_forward(x, np.full(6, 10))


def test_dropout_keeps_expectation_and_backward_uses_the_mask():
    x = np.ones((200, 500), dtype=np.float32)
    y, mask = K.dropout_forward(x, 0.7, rng=np.random.default_rng(0))
    assert abs(y.mean() - 1.0) < 0.01 and abs((y > 0).mean() - 0.7) < 0.01
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.7)}
    g = RNG.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(K.dropout_backward(g, mask), g * mask)
    same, none = K.dropout_forward(x, 0.7, training=False)
    assert same is x and none is None
    with pytest.raises(ValueError, match="keep_prob"):
        K.dropout_forward(x, 0.0)


@pytest.mark.parametrize("c", [1, 16, 17, 40])
def test_blocked_layout_round_trips_and_pads_channels(c):
    x = RNG.standard_normal((2, c, 5, 3)).astype(np.float32)
    xb = K.to_blocked(x, "NCHW")
    assert xb.shape == (2, -(-c // 16), 5, 3, 16)
    assert (K.from_blocked(xb, c, "NCHW") == x).all()
    assert (K.from_blocked(K.to_blocked(K.nchw_to_nhwc(x), "NHWC"), c, "NHWC") == K.nchw_to_nhwc(x)).all()
    padded = xb.transpose(0, 1, 4, 2, 3).reshape(2, -1, 5, 3)[:, c:]
    assert (padded == 0).all()
    last = c - 1  # channel ch lives in block ch // 16, lane ch % 16
    assert xb[1, last // 16, 2, 1, last % 16] == x[1, last, 2, 1]


@pytest.mark.parametrize("c, k, stride, padding", [(3, 5, 1, "SAME"), (17, 33, 2, "SAME"), (16, 16, 1, "VALID")])
def test_blocked_conv_with_fused_bias_relu_matches_reference(c, k, stride, padding):
    x = RNG.standard_normal((2, 9, 8, c)).astype(np.float32)
    w = RNG.standard_normal((3, 3, c, k)).astype(np.float32)
    b = RNG.standard_normal(k).astype(np.float32)
    s = (stride, stride)
    pads = same_pads(9, 8, 3, 3, s) if padding == "SAME" else ((0, 0), (0, 0))
    ref = np.maximum(conv_reference(x, w, s, pads) + b, 0)
    out = K.conv2d_blocked_forward(K.to_blocked(x, "NHWC"), K.weights_to_blocked(w), stride, padding, bias=b, relu=True)
    np.testing.assert_allclose(K.from_blocked(out, k, "NHWC"), ref, rtol=1e-4, atol=1e-4)


def test_the_allocator_setting_respects_the_users_choice(root):
    import subprocess
    import sys

    code = "from workshop_lib import kernels; print(kernels.keep_freed_memory(), kernels.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != "WORKSHOP_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    applied = sys.platform.startswith("linux")
    assert out.stdout.split() == [str(applied), str(applied)]
    env.update(WORKSHOP_MALLOC="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]
