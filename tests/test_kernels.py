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
    with pytest.raises(ValueError, match=r"b.shape=\(4,\) must equal \(5,\), the channels of x"):
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


def test_per_example_cross_entropy_pair_matches_the_mean_pair_and_central_differences():
    x = RNG.standard_normal((5, 7)) * 3
    labels = RNG.integers(0, 7, 5)
    losses, cache = K.softmax_xent_forward(x, labels, reduction="none")
    ref = -np.log(np.exp(x[np.arange(5), labels]) / np.exp(x).sum(1))
    np.testing.assert_allclose(losses, ref, rtol=1e-12)
    np.testing.assert_allclose(K.log_softmax(x), np.log(K.softmax(x)), rtol=1e-12, atol=1e-12)
    weights = RNG.random(5)  # d(sum weights * losses) / dx, one dloss per example
    numeric = numerical_grad(lambda: (weights * K.softmax_xent_forward(x, labels, reduction="none")[0]).sum(), x)
    assert_grad(K.softmax_xent_backward(weights, cache), numeric)
    mean_loss, mean_cache = K.softmax_xent_forward(x, labels)
    assert mean_loss == losses.mean()
    np.testing.assert_allclose(K.softmax_xent_backward(1.0, mean_cache),
                               K.softmax_xent_backward(np.full(5, 1 / 5), cache), rtol=1e-12)
    with pytest.raises(ValueError, match="reduction='sum'"):
        K.softmax_xent_forward(x, labels, reduction="sum")


@pytest.mark.parametrize("name", ["relu", "tanh", "elu"])
def test_activation_caches_are_made_of_the_output_alone(name):
    # tf.nn's gradient ops see only the op's output y (so conv + bias + activation can fuse): a cache built
    # from y must give the same gradient as the forward's own cache, at the kink x = 0 as well
    fwd, bwd = getattr(K, f"{name}_forward"), getattr(K, f"{name}_backward")
    x = np.concatenate([RNG.standard_normal(20), [0.0, -0.0, 1e-30, -1e-30]])
    y, cache = fwd(x)
    g = RNG.standard_normal(y.shape)
    np.testing.assert_array_equal(bwd(g, {"relu": y, "tanh": y, "elu": (y, 1.0)}[name]), bwd(g, cache))


def test_conv2d_cache_rebuilds_the_forward_cache_and_hw_pair_reads_every_spelling():
    x, w = RNG.standard_normal((2, 7, 6, 3)), RNG.standard_normal((3, 2, 3, 4))
    _, cache = K.conv2d_forward(x, w, (2, 1), "SAME")
    rebuilt = K.conv2d_cache(x, w, [1, 2, 1, 1], "SAME", cols=cache.cols)
    assert isinstance(cache, K.ConvCache) and cache.cols is not None
    assert rebuilt.stride == cache.stride == (2, 1) and rebuilt.pads == cache.pads
    for got, want in zip(K.conv2d_backward(np.ones((2, 4, 6, 4)), rebuilt), K.conv2d_backward(np.ones((2, 4, 6, 4)), cache)):
        np.testing.assert_array_equal(got, want)
    assert K.hw_pair(3, "s") == (3, 3) and K.hw_pair([2], "s") == (2, 2) and K.hw_pair((2, 3), "s") == (2, 3)
    assert K.hw_pair([1, 2, 3, 1], "s") == (2, 3) and K.hw_pair([1, 1, 2, 3], "s") == (2, 3)
    with pytest.raises(ValueError, match=r"strides=\[0, 1\] must be a positive int"):
        K.hw_pair([0, 1], "strides")


def test_truncated_normal_stays_within_two_deviations_and_adam_step_size_is_tensorflows():
    x = K.truncated_standard_normal(np.random.default_rng(0), (200, 50))
    assert np.abs(x).max() <= 2 and abs(x.std() - 0.88) < 0.02  # the std of N(0, 1) cut at +-2 is 0.880
    assert K.adam_step_size(0.1, 0.9**3, 0.999**3) == 0.1 * np.sqrt(1 - 0.999**3) / (1 - 0.9**3)


# ----------------------------------------------------------------------------------------------
# The public boundary: every bad input is an error naming the argument, the value and the rule


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_adam_update_refuses_moments_shorter_than_w_instead_of_writing_past_them():
    w, g = f32(1000), f32(1000)
    with pytest.raises(ValueError, match=r"m.shape=\(3,\) must equal w.shape=\(1000,\)"):
        K.adam_update(w, g, np.zeros(3, np.float32), np.zeros(1000, np.float32), 0.1)
    with pytest.raises(ValueError, match=r"v.shape=\(3,\) must equal w.shape=\(1000,\)"):
        K.adam_update(w, g, np.zeros(1000, np.float32), np.zeros(3, np.float32), 0.1)
    with pytest.raises(ValueError, match=r"g.shape=\(10,\) must equal w.shape=\(1000,\)"):
        K.adam_update(w, f32(10), np.zeros(1000, np.float32), np.zeros(1000, np.float32), 0.1)
    with pytest.raises(TypeError, match="m.dtype=float64 must equal w.dtype=float32"):
        K.adam_update(w, g, np.zeros(1000), np.zeros(1000, np.float32), 0.1)
    with pytest.raises(TypeError, match="m is a list; it is updated in place"):
        K.adam_update(w, g, [0.0] * 1000, np.zeros(1000, np.float32), 0.1)
    frozen = np.zeros(1000, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="v is updated in place, so it must be a writeable"):
        K.adam_update(w, g, np.zeros(1000, np.float32), frozen, 0.1)
    with pytest.raises(ValueError, match=r"beta1=1.0 must be in \[0, 1\)"):
        K.adam_update(w, g, np.zeros(1000, np.float32), np.zeros(1000, np.float32), 0.1, beta1=1.0)
    with pytest.raises(ValueError, match="lr_t=nan must be finite"):
        K.adam_update(w, g, np.zeros(1000, np.float32), np.zeros(1000, np.float32), float("nan"))


def test_gemm_refuses_mismatched_inner_dimensions_on_every_path():
    with pytest.raises(ValueError, match=r"a.shape\[1\]=3 must equal b.shape\[0\]=5"):
        K.gemm_reference(np.ones((2, 3)), np.ones((5, 2)))
    for algorithm in ("blas", "reference"):
        with pytest.raises(ValueError, match=r"op\(a\).shape\[1\]=3 must equal op\(b\).shape\[0\]=5"):
            K.gemm_forward(np.ones((2, 3)), np.ones((5, 2)), algorithm=algorithm)
    with pytest.raises(ValueError, match=r"a.shape=\(3,\) must be 2-D"):
        K.gemm_reference(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match="algorithm='fast' must be one of 'blas', 'reference'"):
        K.gemm_forward(np.ones((2, 3)), np.ones((3, 2)), algorithm="fast")
    _, cache = K.gemm_forward(np.ones((2, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"dc.shape=\(4, 2\) must equal \(2, 4\), the shape of the forward output"):
        K.gemm_backward(np.ones((4, 2)), cache)


@pytest.mark.parametrize("forward", [K.maxpool_forward, K.avgpool_forward])
@pytest.mark.parametrize("bad, rule", [
    (dict(ksize=0), "ksize=0 must be a positive integer"),
    (dict(ksize=(2, -1)), r"ksize=\(2, -1\) must be a positive integer"),
    (dict(stride=0), "stride=0 must be a positive integer"),
    (dict(stride=-2), "stride=-2 must be a positive integer"),
    (dict(stride=1.5), "stride=1.5 must be a positive integer"),
    (dict(ksize=True), "ksize=True must be a positive integer"),
    (dict(ksize=5), r"ksize=\(5, 5\) with padding='VALID' and stride=\(2, 2\) does not fit the 4x4 input"),
    (dict(ksize=2, padding=((2, 0), (0, 0))), r"padding=\(\(2, 0\), \(0, 0\)\) must be smaller than ksize"),
    (dict(padding=-1), "padding=-1 must be 'SAME', 'VALID', a non-negative int"),
    (dict(padding=(1, 2, 3)), r"padding=\(1, 2, 3\) must be 'SAME', 'VALID'"),
    (dict(data_format="NWHC"), "data_format='NWHC' must be 'NHWC' or 'NCHW'"),
])
def test_pooling_refuses_empty_windows_strides_and_paddings(forward, bad, rule):
    """ksize=0 returned uninitialised memory (max) or NaN (avg); stride=0 a ZeroDivisionError."""
    args = dict(ksize=2, stride=2, padding="VALID", data_format="NHWC") | bad
    with pytest.raises((ValueError, TypeError), match=rule):
        forward(f32(1, 4, 4, 1), **args)


@pytest.mark.parametrize("call", [
    lambda x, w: K.conv2d_forward(x, w, 1, "VALID", algorithm="direct"),
    lambda x, w: K.conv2d_forward(x, w, 1, "VALID", algorithm="im2col"),
    lambda x, w: K.conv2d_forward(K.nhwc_to_nchw(x), w, 1, "VALID", "NCHW", algorithm="direct"),
    lambda x, w: K.conv2d_forward(K.nhwc_to_nchw(x), w, 1, "VALID", "NCHW", algorithm="im2col"),
    lambda x, w: K.conv2d_blocked_forward(K.to_blocked(x, "NHWC"), K.weights_to_blocked(w), 1, "VALID"),
    lambda x, w: K.im2col_nhwc(x, w.shape[:2], 1, "VALID"),
    lambda x, w: K.conv2d_output_size(4, 4, 5, 5, 1, "VALID"),
])
def test_every_conv_path_refuses_a_kernel_larger_than_a_valid_input(call):
    """A 5x5 kernel on a 4x4 VALID input returned an empty array on the direct path; im2col raised."""
    with pytest.raises(ValueError, match="does not fit the 4x4 input: the output would be 0x0"):
        call(f32(1, 4, 4, 1), f32(5, 5, 1, 1))


@pytest.mark.parametrize("stride, rule", [
    (0, "stride=0 must be a positive integer"),
    (-1, "stride=-1 must be a positive integer"),
    ((1, 0), r"stride=\(1, 0\) must be a positive integer"),
    ([1, 2, 2, 2], r"stride=\[1, 2, 2, 2\]: four values must be TensorFlow's \[1, h, w, 1\]"),
    ("2", "stride='2' must be a positive integer"),
])
@pytest.mark.parametrize("call", [
    lambda x, w, st: K.conv2d_forward(x, w, st, "SAME", algorithm="direct"),
    lambda x, w, st: K.conv2d_forward(x, w, st, "SAME", algorithm="im2col"),
    lambda x, w, st: K.conv2d_blocked_forward(K.to_blocked(x, "NHWC"), K.weights_to_blocked(w), st, "SAME"),
    lambda x, w, st: K.im2col_nhwc(x, w.shape[:2], st, "SAME"),
    lambda x, w, st: K.conv2d_output_size(4, 4, 3, 3, st, "SAME"),
])
def test_a_zero_or_negative_stride_is_blamed_on_the_stride(call, stride, rule):
    """stride=0 raised a bare ZeroDivisionError, a negative one was blamed on the kernel size."""
    with pytest.raises((ValueError, TypeError), match=rule):
        call(f32(1, 4, 4, 1), f32(3, 3, 1, 1), stride)


def test_softmax_cross_entropy_of_an_empty_batch_raises_instead_of_nan():
    with pytest.raises(ValueError, match=r"logits.shape=\(0, 10\) must have at least one example"):
        K.softmax_xent_forward(np.zeros((0, 10), np.float32), np.zeros(0, np.int64))
    with pytest.raises(TypeError, match="labels.dtype=float64 must be"):
        K.softmax_xent_forward(f32(2, 3), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits.shape=\(6,\) must be 2-D"):
        K.softmax_xent_forward(f32(6), np.zeros(6, np.int64))
    with pytest.raises(ValueError, match=r"labels.shape=\(3,\) must equal \(2,\), one label per row"):
        K.softmax_xent_forward(f32(2, 3), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"logits.shape=\(2, 0\) must have at least one class"):
        K.softmax(np.zeros((2, 0)))


def test_backward_passes_refuse_a_gradient_of_the_wrong_shape():
    """dout of another shape read past the cached argmax / columns, or broadcast silently."""
    x = f32(2, 6, 6, 3)
    _, cache = K.maxpool_forward(x, 2, 2)
    with pytest.raises(ValueError, match=r"dout.shape=\(2, 4, 4, 3\) must equal \(2, 3, 3, 3\)"):
        K.maxpool_backward(f32(2, 4, 4, 3), cache)
    _, cache = K.avgpool_forward(K.nhwc_to_nchw(x), 2, 2, data_format="NCHW")
    with pytest.raises(ValueError, match=r"dout.shape=\(2, 3, 4, 3\) must equal \(2, 3, 3, 3\), the shape of the "
                                         "forward output in NCHW"):
        K.avgpool_backward(f32(2, 3, 4, 3), cache)
    _, cache = K.conv2d_forward(x, f32(3, 3, 3, 4), 1, "SAME")
    with pytest.raises(ValueError, match=r"dout.shape=\(2, 7, 7, 4\) must equal \(2, 6, 6, 4\), the shape of the "
                                         "forward output in NHWC"):
        K.conv2d_backward(f32(2, 7, 7, 4), cache)
    with pytest.raises(ValueError, match="gemm='fast' must be one of 'blas', 'reference'"):
        K.conv2d_backward(f32(2, 6, 6, 4), cache, gemm="fast")
    for forward, backward in ((K.relu_forward, K.relu_backward), (K.tanh_forward, K.tanh_backward),
                              (K.elu_forward, K.elu_backward)):
        _, cache = forward(f32(4, 5))
        with pytest.raises(ValueError, match=r"dout.shape=\(4, 1\) must equal \(4, 5\)"):
            backward(f32(4, 1), cache)
    _, cache = K.dropout_forward(f32(4, 5), 0.5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"dout.shape=\(5,\) must equal \(4, 5\)"):
        K.dropout_backward(f32(5), cache)
    g = f32(3, 4)
    _, cache = K.batchnorm_forward(f32(3, 4), np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), True)
    with pytest.raises(ValueError, match=r"dout.shape=\(4, 3\) must equal \(3, 4\)"):
        K.batchnorm_backward(g.T, cache)
    _, cache = K.bias_add_forward(f32(3, 4), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"dout.shape=\(12,\) must be 2-D"):
        K.bias_add_backward(f32(12), cache)


@pytest.mark.parametrize("call, error, rule", [
    (lambda: K.conv2d_forward(f32(1, 4, 4), f32(3, 3, 1, 1)), ValueError, r"x.shape=\(1, 4, 4\) must be 4-D"),
    (lambda: K.conv2d_forward(f32(1, 4, 4, 2), f32(3, 3, 1, 1)), ValueError,
     r"w.shape\[2\]=1 must equal x.shape\[3\]=2 \(the input channels\)"),
    (lambda: K.conv2d_forward(f32(1, 2, 4, 4), f32(3, 3, 1, 1), data_format="NCHW"), ValueError,
     r"w.shape\[2\]=1 must equal x.shape\[1\]=2"),
    (lambda: K.conv2d_forward(np.ones((1, 4, 4, 1), np.int32), f32(3, 3, 1, 1)), TypeError,
     "x.dtype=int32 must be float32 or float64"),
    (lambda: K.conv2d_forward(f32(1, 4, 4, 1), f32(3, 3, 1, 1), algorithm="winograd"), ValueError,
     "algorithm='winograd' must be one of 'im2col', 'direct'"),
    (lambda: K.conv2d_forward(f32(1, 4, 4, 1), f32(3, 3, 1, 0)), ValueError, "must have every dimension at least 1"),
    (lambda: K.conv2d_forward(f32(1, 0, 4, 1), f32(3, 3, 1, 1)), ValueError,
     r"x.shape\[1\]=0 \(H\) must be at least 1"),
    (lambda: K.conv2d_forward(f32(1, 4, 4, 1), f32(3, 3, 1, 1), padding=((1, 1), (1, -1))), ValueError,
     "padding=.* must be 'SAME', 'VALID', a non-negative int"),
    (lambda: K.im2col_nhwc(np.zeros((1, 4, 4, 1), np.uint8), (3, 3), 1, "SAME", pad_value=300), ValueError,
     r"pad_value=300 must be in \[0, 255\]"),
    (lambda: K.bias_add_forward(f32(2, 3, 4, 5), np.ones(5), "NCWH"), ValueError, "data_format='NCWH'"),
    (lambda: K.bias_add_forward(f32(2, 5), np.ones((5, 1))), ValueError, r"b.shape=\(5, 1\) must be 1-D"),
    (lambda: K.batchnorm_forward(f32(3, 4), np.ones(4), np.zeros(4), [0.0] * 4, np.ones(4), True), TypeError,
     "running_mean is a list; it is updated in place"),
    (lambda: K.batchnorm_forward(f32(3, 4), np.ones(3), np.zeros(4), np.zeros(4), np.ones(4), False), ValueError,
     r"gamma.shape=\(3,\) must equal \(4,\), the channels of x"),
    (lambda: K.batchnorm_forward(f32(0, 4), np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), True), ValueError,
     "needs at least one value per channel"),
    (lambda: K.softmax(f32(2, 3), axis=2), ValueError, r"axis=2 must be in \[-2, 1\]"),
    (lambda: K.dropout_forward(np.ones(4, np.int64), 0.5), TypeError, "x.dtype=int64 must be float32 or float64"),
    (lambda: K.dropout_forward(f32(4), 0.5, rng=np.random.RandomState(0)), TypeError,
     "rng is a RandomState; it must be a numpy.random.Generator"),
    (lambda: K.dropout_forward(f32(4), float("nan")), ValueError, "keep_prob=nan must be finite"),
    (lambda: K.nchw_to_nhwc(f32(2, 3, 4)), ValueError, r"x.shape=\(2, 3, 4\) must be 4-D \(N, C, H, W\)"),
    (lambda: K.to_blocked(f32(2, 3, 4, 5), block=0), ValueError, "block=0 must be >= 1"),
    (lambda: K.from_blocked(K.to_blocked(f32(1, 3, 2, 2)), 17), ValueError, r"channels=17 must be in \[1, 16\]"),
    (lambda: K.weights_to_blocked(f32(3, 3, 2)), ValueError, r"w.shape=\(3, 3, 2\) must be 4-D"),
    (lambda: K.conv2d_blocked_forward(K.to_blocked(f32(1, 3, 5, 5)), K.weights_to_blocked(f32(3, 3, 3, 2)),
                                      ksize=(5, 5)), ValueError,
     r"ksize=\(5, 5\) must equal wb.shape\[2:4\]=\(3, 3\)"),
    (lambda: K.conv2d_blocked_forward(K.to_blocked(f32(1, 3, 5, 5), block=8), K.weights_to_blocked(f32(3, 3, 3, 2))),
     ValueError, r"wb.shape\[4:\]=\(16, 16\) must equal \(xb.shape\[4\], xb.shape\[4\]\)=\(8, 8\)"),
    (lambda: K.conv2d_blocked_forward(K.to_blocked(f32(1, 3, 5, 5)), K.weights_to_blocked(f32(3, 3, 3, 2)),
                                      bias=np.ones(17)), ValueError, r"bias.shape=\(17,\) must have at most 16"),
    (lambda: K.conv2d_blocked_forward(K.to_blocked(f32(1, 17, 5, 5)), K.weights_to_blocked(f32(3, 3, 3, 2))),
     ValueError, r"wb.shape\[1\]=1 must equal xb.shape\[1\]=2 \(the input channel blocks\)"),
])
def test_bad_arguments_name_the_argument_the_value_and_the_rule(call, error, rule):
    with pytest.raises(error, match=rule):
        call()


def test_public_kernels_stay_in_bounds_on_edge_shapes_under_numba_boundscheck(root, tmp_path):
    """1x1 images, kernel == input, stride > kernel, batch 1, one channel, odd sizes: every numba kernel
    compiled with bounds checks (in a fresh cache, so none compiled without them is loaded) and compared
    with numpy references."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(root / "tests" / "kernel_programs" / "edge_shapes.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok"), proc.stdout


# ----------------------------------------------------------------------------------------------
# the backward fusions (MaxPoolGrad -> ReluGrad -> BiasAddGrad, ReluGrad -> BiasAddGrad)


def _pooled_relu_case(shape, ksize, stride, padding, data_format, dtype):
    z = RNG.standard_normal(shape).astype(dtype)
    b = RNG.standard_normal(shape[3] if data_format == "NHWC" else shape[1]).astype(dtype)
    b_shape = (-1,) if data_format == "NHWC" else (-1, 1, 1)

    def forward():
        y = np.maximum(z + b.reshape(b_shape), 0)
        return (y, *K.maxpool_forward(y, ksize, stride, padding, data_format))

    return z, b, b_shape, forward


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape, ksize, stride, padding", [
    ((3, 8, 8, 5), (2, 2), (2, 2), "VALID"),  # the CNN's pooling (the unrolled fast path)
    ((2, 7, 9, 4), (2, 2), (2, 2), "VALID"),  # odd sizes: a last row and column no window covers
    ((2, 7, 9, 17), (3, 3), (2, 2), "SAME"),  # overlapping windows: a cell can win twice
    ((1, 6, 6, 3), (3, 3), (3, 3), "VALID"),
])
def test_maxpool_relu_backward_equals_the_unfused_ops_and_central_differences(shape, ksize, stride, padding,
                                                                               data_format):
    layout_shape = shape if data_format == "NHWC" else (shape[0], shape[3], shape[1], shape[2])
    _, _, b_shape, forward32 = _pooled_relu_case(layout_shape, ksize, stride, padding, data_format, np.float32)
    y, pooled, cache = forward32()
    g = RNG.standard_normal(pooled.shape).astype(np.float32)
    dx, db = K.maxpool_relu_backward(g, cache, pooled)
    unfused = K.relu_backward(K.maxpool_backward(g, cache), y)
    np.testing.assert_array_equal(dx, unfused)
    if stride[0] >= ksize[0] and stride[1] >= ksize[1]:  # disjoint windows: bit for bit, the sign of zero too
        assert (np.signbit(dx) == np.signbit(unfused)).all()
    channel_axes = (0, 1, 2) if data_format == "NHWC" else (0, 2, 3)
    assert db.dtype == np.float32
    np.testing.assert_allclose(db, unfused.astype(np.float64).sum(axis=channel_axes), rtol=1e-6, atol=1e-6)
    assert K.maxpool_relu_backward(g, cache, pooled, need_db=False)[1] is None

    z, b, _, forward = _pooled_relu_case(layout_shape, ksize, stride, padding, data_format, np.float64)
    z[np.abs(z + b.reshape(b_shape)) < 1e-3] += 0.01  # keep away from the ReLU's kink
    g = RNG.standard_normal(forward()[1].shape)
    dz, db = K.maxpool_relu_backward(g, forward()[2], forward()[1])
    loss = lambda: (forward()[1] * g).sum()  # noqa: E731
    assert_grad(dz, numerical_grad(loss, z))
    assert_grad(db, numerical_grad(loss, b))


@pytest.mark.parametrize("shape", [(7, 5), (50, 1024), (2, 5, 6, 33)])
def test_relu_bias_backward_equals_the_unfused_ops_and_central_differences(shape):
    y = np.maximum(RNG.standard_normal(shape), 0).astype(np.float32)
    g = RNG.standard_normal(shape).astype(np.float32)
    g[0, 0] = -0.0
    dx, db = K.relu_bias_backward(g, y)
    unfused = g * (y > 0)
    np.testing.assert_array_equal(dx, unfused)
    assert (np.signbit(dx) == np.signbit(unfused)).all()
    np.testing.assert_allclose(db, unfused.astype(np.float64).reshape(-1, shape[-1]).sum(axis=0), rtol=1e-6,
                               atol=1e-6)

    x, b = RNG.standard_normal(shape), RNG.standard_normal(shape[-1])
    x[np.abs(x + b) < 1e-3] += 0.01
    g = RNG.standard_normal(shape)
    dx, db = K.relu_bias_backward(g, np.maximum(x + b, 0))
    loss = lambda: (np.maximum(x + b, 0) * g).sum()  # noqa: E731
    assert_grad(dx, numerical_grad(loss, x))
    assert_grad(db, numerical_grad(loss, b))
    with pytest.raises(TypeError, match="float32 or float64"):
        K.relu_bias_backward(g.astype(np.float32), np.maximum(x + b, 0))


def test_relu_backward_is_numpys_product_with_nan_and_signed_zeros():
    y = np.array([1.0, 0.0, 2.0, 0.0, 3.0], np.float32)
    g = np.array([np.nan, np.nan, -0.0, -1.0, 2.0], np.float32)
    got, want = K.relu_backward(g, y), g * (y > 0)
    np.testing.assert_array_equal(got, want)
    assert (np.signbit(got) == np.signbit(want)).all()
    np.testing.assert_array_equal(K.relu_backward(np.arange(4), np.array([1, 0, 2, 0])), [0, 0, 2, 0])  # integers


def test_the_2x2_max_pooling_fast_path_breaks_ties_as_the_general_kernel():
    x = RNG.integers(0, 3, (3, 6, 8, 5)).astype(np.float32)  # many ties: the first maximum in the window wins
    x[0, 0, 0, 0] = np.nan
    out, (_, argmax, _, disjoint) = K.maxpool_forward(x, 2, 2, "VALID")
    ref_out, ref_argmax = np.empty_like(out), np.empty_like(argmax)
    K._maxpool_nhwc(x, 2, 2, 2, 2, 0, 0, ref_out, ref_argmax)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    assert disjoint


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keep_prob", [0.5, 0.7, 1 / 3])
def test_dropout_draws_the_generators_stream_and_gives_numpys_masks(dtype, keep_prob):
    x = RNG.standard_normal((30, 70)).astype(dtype)
    out, mask = K.dropout_forward(x, keep_prob, rng=np.random.default_rng(9))
    uniform = np.random.default_rng(9).random(x.shape, dtype=np.float32)
    want = (uniform < keep_prob).astype(dtype) / dtype(keep_prob)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(out, x * want)
    assert out.dtype == mask.dtype == dtype
    # a draw equal to float32(keep_prob) is dropped, as numpy's float32 comparison drops it
    edge = np.array([np.float32(keep_prob), np.nextafter(np.float32(keep_prob), np.float32(0))], np.float32)
    got, kept = np.empty(2, dtype), np.empty(2, dtype)
    K._dropout_flat(np.ones(2, dtype), edge, np.float32(keep_prob), dtype(1) / dtype(keep_prob), dtype(0), got, kept)
    np.testing.assert_array_equal(kept, (edge < keep_prob).astype(dtype) / dtype(keep_prob))


def test_adam_update_computes_in_the_variables_dtype_on_one_thread_and_in_parallel():
    rng = np.random.default_rng(4)
    f32 = np.float32
    for size in (K._SERIAL_BELOW - 1, K._SERIAL_BELOW):  # either side of the switch to the parallel loop
        w, g = rng.standard_normal(size).astype(f32), rng.standard_normal(size).astype(f32)
        m, v = rng.standard_normal(size).astype(f32), rng.random(size).astype(f32)
        args = [a.copy() for a in (w, g, m, v)]
        K.adam_update(*args, 1e-3)
        # float32 numpy, one rounding per operation, as TensorFlow's ApplyAdam on float32 variables: bit for bit
        m32 = f32(0.9) * m + (f32(1) - f32(0.9)) * g
        v32 = f32(0.999) * v + (f32(1) - f32(0.999)) * g * g
        w32 = w - f32(1e-3) * m32 / (np.sqrt(v32) + f32(1e-8))
        for got, want in zip((args[0], args[2], args[3]), (w32, m32, v32)):
            np.testing.assert_array_equal(got, want)
        w64, g64, m64, v64 = (a.astype(np.float64) for a in (w, g, m, v))
        m64, v64 = 0.9 * m64 + 0.1 * g64, 0.999 * v64 + 0.001 * g64 * g64
        np.testing.assert_allclose(args[0], w64 - 1e-3 * m64 / (np.sqrt(v64) + 1e-8), rtol=1e-6, atol=1e-9)
