"""d4p's numba kernels: the D^2 weights of k-means++ and the Lloyd pass, in cache blocks, trusting their callers.

Each takes its output buffers (``# OUT``) and does no checking: :mod:`workshop_lib.d4p` validates at its public
boundary first, as scikit-learn's ``_k_means_lloyd.pyx`` trusts ``KMeans.fit``. Shapes: n points of d features, k
clusters.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_BLOCK = 256  # points per cache block in the Lloyd kernel

# ----------------------------------------------------------------------------------------------
# Kernels. Each takes its output buffers (# OUT) and does no checking.


@numba.njit(cache=True, inline="always")
def _weight(d2, scale):
    return np.int64(math.floor(d2 * scale))


@numba.njit(parallel=True, cache=True)
def _d2_to_point(x, c, d2):  # IN x (n, d), c (d,); OUT d2 (n,); returns max
    n, d = x.shape
    for i in numba.prange(n):
        s = 0.0
        for q in range(d):
            diff = np.float64(x[i, q]) - np.float64(c[q])
            s += diff * diff
        d2[i] = s
    m = 0.0
    for i in range(n):
        if d2[i] > m:
            m = d2[i]
    return m


@numba.njit(parallel=True, cache=True)
def _update_d2_and_weigh(x, new_centroids, d2, scale, chunk_sums):  # OUT d2, chunk_sums; returns max d2
    """d2 = min(d2, |x - c|^2 over the new centroids); integer weights floor(d2 * scale) summed per chunk."""
    n, d = x.shape
    n_new = new_centroids.shape[0]
    n_chunks = chunk_sums.shape[0]
    size = (n + n_chunks - 1) // n_chunks
    maxima = np.zeros(n_chunks)
    for t in numba.prange(n_chunks):
        total = np.int64(0)
        m = 0.0
        for i in range(t * size, min(n, (t + 1) * size)):
            v = d2[i]
            for j in range(n_new):
                s = 0.0
                for q in range(d):
                    diff = np.float64(x[i, q]) - np.float64(new_centroids[j, q])
                    s += diff * diff
                if s < v:
                    v = s
            d2[i] = v
            total += _weight(v, scale)
            if v > m:
                m = v
        chunk_sums[t] = total
        maxima[t] = m
    return maxima.max()


@numba.njit(cache=True)
def _find_weighted(d2, scale, chunk_sums, target):
    """Index of the first row whose cumulative integer weight exceeds ``target``."""
    n = d2.shape[0]
    n_chunks = chunk_sums.shape[0]
    size = (n + n_chunks - 1) // n_chunks
    acc = np.int64(0)
    for t in range(n_chunks):
        if acc + chunk_sums[t] > target:
            for i in range(t * size, min(n, (t + 1) * size)):
                acc += _weight(d2[i], scale)
                if acc > target:
                    return i
        acc += chunk_sums[t]
    return -1


@numba.njit(parallel=True, cache=True)
def _trial_potentials(x, candidates, d2, scale, out):  # OUT out (n_trials,): sum of weights if candidate is added
    n, d = x.shape
    n_trials = candidates.shape[0]
    for t in range(n_trials):
        total = np.int64(0)
        for i in numba.prange(n):
            s = 0.0
            for q in range(d):
                diff = np.float64(x[i, q]) - np.float64(candidates[t, q])
                s += diff * diff
            total += _weight(min(s, d2[i]), scale)
        out[t] = total


_PANEL = 4  # features are processed four at a time: xt is padded with zero rows to a multiple of 4
_LANES = 4  # independent accumulators, so runs of equal labels do not serialise on one memory cell


def _panels(x):
    """The chunk transposed to (4 * ceil(d / 4), n), zero-padded: inner loops run over contiguous points."""
    n, d = x.shape
    xt = np.zeros((-(-d // _PANEL) * _PANEL, n), dtype=x.dtype)
    xt[:d] = x.T
    return xt


@numba.njit(parallel=True, cache=True)
def _lloyd_pass(xt, centroids, labels, sums, counts, objective):
    """Assign each point to its nearest centroid; accumulate per-chunk sums, counts and objective.

    IN  xt (4P, n) from :func:`_panels`; centroids (k, d).
    OUT labels (n,), sums (n_chunks, k, d), counts (n_chunks, k), objective (n_chunks,).
    Distances are |x|^2 - 2 x.c + |c|^2; only the last two terms decide the nearest centroid,
    computed for a block of points at a time so the loops over points vectorise.
    """
    n = xt.shape[1]
    k, d = centroids.shape
    n_panels = xt.shape[0] // _PANEL
    n_chunks = counts.shape[0]
    size = (n + n_chunks - 1) // n_chunks
    cm2 = np.zeros((k, xt.shape[0]), dtype=xt.dtype)  # -2 c, zero-padded like xt
    c_norm = np.zeros(k, dtype=xt.dtype)
    for j in range(k):
        for q in range(d):
            cm2[j, q] = -2 * centroids[j, q]
            c_norm[j] += centroids[j, q] * centroids[j, q]
    flat = xt.reshape(-1)  # 1-D slices of a contiguous array stay contiguous for the vectoriser
    for t in numba.prange(n_chunks):
        best = np.empty(_BLOCK, dtype=xt.dtype)
        dist = np.empty(_BLOCK, dtype=xt.dtype)
        arg = np.empty(_BLOCK, dtype=np.int32)
        local_sums = np.zeros((_LANES, k, d))
        local_counts = np.zeros((_LANES, k))
        obj = np.zeros(_LANES)
        start = t * size
        stop = min(n, start + size)
        for b0 in range(start, stop, _BLOCK):
            m = min(_BLOCK, stop - b0)
            for i in range(m):
                best[i] = np.inf
                arg[i] = 0
            if n_panels == 1:  # d <= 4 (RGB pixels): the distance never leaves a register
                a0 = flat[b0 : b0 + m]
                a1 = flat[n + b0 : n + b0 + m]
                a2 = flat[2 * n + b0 : 2 * n + b0 + m]
                a3 = flat[3 * n + b0 : 3 * n + b0 + m]
                for j in range(k):
                    cj = c_norm[j]
                    c0, c1, c2, c3 = cm2[j, 0], cm2[j, 1], cm2[j, 2], cm2[j, 3]
                    for i in range(m):
                        s = cj + c0 * a0[i] + c1 * a1[i] + c2 * a2[i] + c3 * a3[i]
                        better = s < best[i]
                        best[i] = s if better else best[i]
                        arg[i] = j if better else arg[i]
            for j in range(k if n_panels > 1 else 0):
                cj = c_norm[j]
                for i in range(m):
                    dist[i] = cj
                for p in range(n_panels):
                    q = p * _PANEL
                    a0 = flat[q * n + b0 : q * n + b0 + m]
                    a1 = flat[(q + 1) * n + b0 : (q + 1) * n + b0 + m]
                    a2 = flat[(q + 2) * n + b0 : (q + 2) * n + b0 + m]
                    a3 = flat[(q + 3) * n + b0 : (q + 3) * n + b0 + m]
                    c0, c1, c2, c3 = cm2[j, q], cm2[j, q + 1], cm2[j, q + 2], cm2[j, q + 3]
                    for i in range(m):
                        dist[i] = dist[i] + c0 * a0[i] + c1 * a1[i] + c2 * a2[i] + c3 * a3[i]
                for i in range(m):
                    better = dist[i] < best[i]
                    best[i] = dist[i] if better else best[i]
                    arg[i] = j if better else arg[i]
            for i in range(m):
                lab = arg[i]
                labels[b0 + i] = lab
                lane = i & (_LANES - 1)
                xx = 0.0
                for q in range(d):
                    v = np.float64(xt[q, b0 + i])
                    xx += v * v
                    local_sums[lane, lab, q] += v
                local_counts[lane, lab] += 1.0
                obj[lane] += max(np.float64(best[i]) + xx, 0.0)
        for j in range(k):
            counts[t, j] = local_counts[:, j].sum()
            for q in range(d):
                sums[t, j, q] = local_sums[:, j, q].sum()
        objective[t] = obj.sum()


@numba.njit(parallel=True, cache=True)
def _dist_to_assigned(x, centroids, labels, out):  # OUT out (n,)
    n, d = x.shape
    for i in numba.prange(n):
        s = 0.0
        for q in range(d):
            diff = np.float64(x[i, q]) - np.float64(centroids[labels[i], q])
            s += diff * diff
        out[i] = s


@numba.njit(cache=True)
def _mix64(z):
    """SplitMix64 finaliser: a counter-based uniform in [0, 1) keyed by (round seed, global row index)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(parallel=True, cache=True)
def _oversample(d2, scale, total, ell, seed, offset, chosen):  # OUT chosen (n,) bool
    n = d2.shape[0]
    for i in numba.prange(n):
        w = _weight(d2[i], scale)
        key = np.uint64(seed) + np.uint64(offset + i) * np.uint64(0x9E3779B97F4A7C15)
        chosen[i] = w > 0 and _mix64(key) * total < ell * w
