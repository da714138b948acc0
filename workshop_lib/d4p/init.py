"""d4p's initialisations over every rank's rows: k-means++ with exact integer D^2 weights, and k-means|| (parallel).

Every rank holds a chunk of the rows; the chosen centroids are the same on every rank and, for k-means++, bit for
bit the same for any number of ranks (see :mod:`workshop_lib.d4p`). ``comm`` is d4p's ``_Serial`` or
``_Distributed``: numbers travel through buffers.
"""

from __future__ import annotations

import numba
import numpy as np

from .kernels import (_d2_to_point, _find_weighted, _lloyd_pass, _oversample, _panels, _trial_potentials,
                      _update_d2_and_weigh)

_WEIGHT_RANGE = 2.0**62  # integer D^2 weights of all points sum to less than this
# ----------------------------------------------------------------------------------------------
# Initialisation


def _n_chunks(n):
    return max(1, min(4 * numba.get_num_threads(), n // 4096 or 1))


def _row(comm, x, counts, global_index):
    """Row ``global_index`` of the union of the chunks (in rank order), on every rank."""
    bounds = np.cumsum([0] + list(counts))
    owner = int(np.searchsorted(bounds, global_index, side="right") - 1)
    row = x[global_index - bounds[owner]].copy() if comm.rank == owner else None
    return comm.bcast_row(row, owner, x.shape[1], x.dtype)


class _PlusPlusSampler:
    """D^2 sampling over the union of all chunks, with exact integer weights.

    Every d2 is at most the global maximum of the previous step (d2 only
    shrinks), so weights floor(d2 * 2^62 / (n_total * that maximum)) sum below
    2^62; integer sums do not depend on how the rows are split over ranks.
    """

    def __init__(self, comm, x, counts, first):
        self.comm, self.x, self.n_total = comm, x, sum(counts)
        self.d2 = np.empty(x.shape[0], dtype=np.float64)
        self.chunk_sums = np.zeros(_n_chunks(x.shape[0]), dtype=np.int64)
        self.global_max = comm.allreduce_max(_d2_to_point(x, first, self.d2) if x.shape[0] else 0.0)
        self.add(np.empty((0, x.shape[1]), dtype=x.dtype))

    def add(self, new_centroids):
        """Account for new centroids (m, d): shrink d2, re-weigh, agree on the totals."""
        self.scale = _WEIGHT_RANGE / (self.n_total * self.global_max) if self.global_max > 0 else 0.0
        local_max = 0.0
        if self.x.shape[0]:
            local_max = _update_d2_and_weigh(self.x, new_centroids, self.d2, self.scale, self.chunk_sums)
        self.rank_totals = self.comm.allgather_ints(int(self.chunk_sums.sum()))
        self.total = int(self.rank_totals.sum())
        self.global_max = self.comm.allreduce_max(float(local_max))

    def draw(self, target):
        """The row whose cumulative weight first exceeds ``target`` (0 <= target < total), on every rank."""
        prefix = np.concatenate([[0], np.cumsum(self.rank_totals)])
        owner = int(np.searchsorted(prefix, target, side="right") - 1)
        row = None
        if self.comm.rank == owner:
            i = _find_weighted(self.d2, self.scale, self.chunk_sums, np.int64(target - prefix[owner]))
            row = self.x[i].copy()
        return self.comm.bcast_row(row, owner, self.x.shape[1], self.x.dtype)

    def potentials(self, candidates):
        """For each candidate, the total weight if it were added (greedy k-means++)."""
        out = np.zeros(candidates.shape[0], dtype=np.int64)
        if self.x.shape[0]:
            _trial_potentials(self.x, candidates, self.d2, self.scale, out)
        return self.comm.allreduce_sum(out)


def _plus_plus(comm, x, counts, k, n_trials, rng):
    n_total = sum(counts)
    centroids = np.empty((k, x.shape[1]), dtype=x.dtype)
    centroids[0] = _row(comm, x, counts, int(rng.integers(n_total)))
    sampler = _PlusPlusSampler(comm, x, counts, centroids[0])
    for j in range(1, k):
        if sampler.total == 0:  # every point coincides with a centroid: take any remaining row
            centroids[j] = _row(comm, x, counts, int(rng.integers(n_total)))
            continue
        targets = [int(rng.integers(sampler.total)) for _ in range(n_trials)]
        candidates = np.array([sampler.draw(t) for t in targets])
        best = 0
        if n_trials > 1:  # greedy k-means++: keep the candidate that lowers the potential most
            best = int(np.argmin(sampler.potentials(candidates)))
        centroids[j] = candidates[best]
        sampler.add(centroids[j : j + 1])
    return centroids


def _weighted_plus_plus_lloyd(points, weights, k, rng, iterations=20):
    """Serial weighted k-means++ then weighted Lloyd on a small candidate set (k-means|| recluster)."""
    points = points.astype(np.float64)
    centroids = np.empty((k, points.shape[1]))
    probs = weights / weights.sum()
    centroids[0] = points[rng.choice(len(points), p=probs)]
    d2 = ((points - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        w = weights * d2
        idx = rng.choice(len(points), p=w / w.sum()) if w.sum() > 0 else int(rng.integers(len(points)))
        centroids[j] = points[idx]
        d2 = np.minimum(d2, ((points - centroids[j]) ** 2).sum(1))
    for _ in range(iterations):
        labels = ((points[:, None, :] - centroids[None]) ** 2).sum(2).argmin(1)
        new = centroids.copy()
        for j in range(k):
            mask = labels == j
            if weights[mask].sum() > 0:
                new[j] = (weights[mask, None] * points[mask]).sum(0) / weights[mask].sum()
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids


def _parallel_plus_plus(comm, x, counts, k, oversampling, n_rounds, rng, offset):
    n_total = sum(counts)
    first = _row(comm, x, counts, int(rng.integers(n_total)))
    candidates = [first]
    sampler = _PlusPlusSampler(comm, x, counts, first)
    ell = oversampling * k
    chosen = np.zeros(x.shape[0], dtype=np.bool_)
    for _ in range(n_rounds):
        if sampler.total == 0:
            break
        seed = int(rng.integers(2**63))
        if x.shape[0]:
            _oversample(sampler.d2, sampler.scale, float(sampler.total), ell, seed, offset, chosen)
        new_rows = comm.allgatherv(x[chosen])
        candidates.extend(new_rows)
        sampler.add(new_rows)
    cand = np.array(candidates)
    # Weight of a candidate: how many points are nearest to it (an exact integer count).
    labels = np.empty(x.shape[0], dtype=np.int32)
    n_chunks = _n_chunks(x.shape[0])
    sums = np.zeros((n_chunks, len(cand), x.shape[1]))
    cnt = np.zeros((n_chunks, len(cand)))
    obj = np.zeros(n_chunks)
    if x.shape[0]:
        _lloyd_pass(_panels(x), cand.astype(x.dtype), labels, sums, cnt, obj)
    weights = comm.allreduce_sum(cnt.sum(0))
    if len(cand) <= k:
        extra = [_row(comm, x, counts, int(i)) for i in rng.choice(n_total, k, replace=False)]
        return np.array((list(cand) + extra)[:k], dtype=x.dtype)
    return _weighted_plus_plus_lloyd(cand, weights, k, rng).astype(x.dtype)
