"""The alpha-beta cost model of allreduce: predict, from two numbers you measure, how an algorithm scales.

Mirrors the analysis of Thakur, Rabenseifner and Gropp ("Optimization of collective communication
operations in MPICH", 2005) and of NCCL's tuning model. A message of n bytes between two ranks takes
``alpha + n * beta``: alpha is the latency (seconds), beta the inverse bandwidth (seconds per byte).
Counting each algorithm's steps and bytes gives its time on p ranks (``gamma``, seconds per byte reduced,
adds the arithmetic):

============================  ==========================================================================
ring                          ``2(p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma``
recursive doubling            ``log2(p) (alpha + n beta + n gamma)`` (p a power of two)
parameter server              ``2 (p-1) (alpha + n beta) + (p-1) n gamma`` (the root's link carries all)
hierarchical (N nodes x L)    ``2 (L-1) (alpha_i + n/L beta_i) + ring(n/L, N) over the network``
============================  ==========================================================================

The one idea: the ring's bandwidth term stops growing with p (2n beta at most) but its latency term grows
as 2(p-1) alpha, so at many ranks small messages become latency-bound; the parameter server's root
carries (p-1) buffers each way and saturates first; hierarchical keeps the network's share to 1/L.

Units: bytes and seconds throughout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ALGORITHMS", "Link", "fit_link", "measure_link", "measure_gamma", "oversubscribed", "ring_time",
           "recursive_doubling_time",
           "parameter_server_time", "hierarchical_time", "predict", "cnn_gradient_bytes", "DEFAULT_RANKS"]

ALGORITHMS = ("ring", "recursive_doubling", "parameter_server", "hierarchical")
DEFAULT_RANKS = tuple(2 ** k for k in range(3, 13))  # 8 .. 4096


@dataclass(frozen=True)
class Link:
    """A link's cost: ``alpha`` seconds of latency, ``beta`` seconds per byte, ``gamma`` seconds per byte reduced."""

    alpha: float
    beta: float
    gamma: float = 0.0

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number of seconds >= 0")

    @property
    def bandwidth(self):
        """Bytes per second (1 / beta)."""
        return math.inf if self.beta == 0 else 1.0 / self.beta

    def time(self, nbytes):
        """Seconds to send ``nbytes`` once over this link."""
        return self.alpha + nbytes * self.beta


def fit_link(nbytes, seconds):
    """Fit ``seconds ~ alpha + nbytes * beta`` to measured one-way message times; returns a :class:`Link`.

    The fit minimises relative error (each point weighted by 1 / its time), since message sizes span
    decades and an absolute fit would ignore the small ones that set alpha. Both are kept >= 0.

    Parameters
    ----------
    nbytes, seconds : sequences of equal length (at least two distinct sizes)
    """
    n = np.asarray(nbytes, dtype=np.float64).reshape(-1)
    t = np.asarray(seconds, dtype=np.float64).reshape(-1)
    if n.shape != t.shape:
        raise ValueError(f"nbytes has {n.size} values and seconds {t.size}; they must pair up")
    if len(np.unique(n)) < 2:
        raise ValueError(f"nbytes={n.tolist()} needs at least two distinct sizes to separate alpha from beta")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(n >= 0)):
        raise ValueError("seconds must be positive and finite, nbytes >= 0")
    design = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:  # latency below resolution: fit the bandwidth alone
        alpha, beta = 0.0, float(np.sum(n / t) / np.sum((n / t) ** 2))
    if beta < 0:
        alpha, beta = float(np.sum(1 / t) / np.sum(1 / t**2)), 0.0
    return Link(float(alpha), float(beta))


def measure_link(comm=None, sizes=(8, 1024, 16384, 262144, 4 << 20, 16 << 20), repeats=20):
    """Times of exchanges of messages between ranks 0 and 1, as a ring's step makes them.

    Both ranks send and receive at once (``Sendrecv``), as in every step of the ring and of recursive
    doubling, so the bandwidth is the one each direction gets while the other is busy too. Call it on
    every rank of an MPI job of at least 2 ranks (the others wait). Returns ``(sizes, seconds)`` on every
    rank, ready for :func:`fit_link`: per size, the best of ``repeats`` loops' mean time per exchange.
    """
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    if comm.Get_size() < 2:
        raise ValueError(f"measure_link needs at least 2 ranks, the communicator has {comm.Get_size()}")
    rank = comm.Get_rank()
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"sizes={sizes} must be positive numbers of bytes")
    seconds = []
    for size in sizes:
        send, recv = np.zeros(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)
        iters = max(3, min(200, int(5e7 // size)))
        best = math.inf
        for k in range(repeats + 1):  # loops of exchanges, as bench.time_allreduce times allreduces
            comm.Barrier()
            t0 = time.perf_counter()
            if rank < 2:
                for _ in range(iters):
                    comm.Sendrecv(send, 1 - rank, 41, recv, 1 - rank, 41)
            if k:  # the first loop warms up
                best = min(best, (time.perf_counter() - t0) / iters)
        seconds.append(comm.bcast(best, root=0))
    return sizes, seconds


def measure_gamma(nbytes=8 << 20, repeats=5):
    """Seconds per byte of the ring's reduction step, measured here: the best of ``repeats`` ``np.add(a, b, out=a)``.

    Two float32 arrays of ``nbytes`` each, as the ring reduces an arriving chunk with this rank's own one
    (two streams read, one written). Call it with the size of the chunks the ring reduces (``nbytes / p``):
    chunks that fit in the caches reduce faster than ones that stream from memory.
    """
    from .bench import best_time

    if not isinstance(nbytes, (int, np.integer)) or nbytes < 4:
        raise ValueError(f"nbytes={nbytes!r} must be an int >= 4 (bytes of float32)")
    a, b = np.ones(nbytes // 4, dtype=np.float32), np.ones(nbytes // 4, dtype=np.float32)
    return best_time(lambda: np.add(a, b, out=a), repeats) / a.nbytes


def oversubscribed(link, ranks, cores):
    """``link`` as ``ranks`` ranks see it when they share ``cores`` cores (more ranks than cores).

    The processors themselves copy every byte MPI moves between ranks of one node and do every reduction,
    and only ``cores`` of them run at once: beta and gamma grow by ranks / cores. Alpha is kept: the model
    does not describe the time slices a descheduled partner costs, so at small sizes it stays optimistic.
    """
    if not isinstance(cores, (int, np.integer)) or cores < 1:
        raise ValueError(f"cores={cores!r} must be a positive integer")
    _check(0, ranks)
    factor = max(1.0, ranks / cores)
    return Link(link.alpha, link.beta * factor, link.gamma * factor)


def _check(nbytes, ranks):
    if not isinstance(ranks, (int, np.integer)) or ranks < 1:
        raise ValueError(f"ranks={ranks!r} must be a positive integer")
    if not nbytes >= 0:
        raise ValueError(f"nbytes={nbytes!r} must be >= 0")


def ring_time(nbytes, ranks, link):
    """Reduce-scatter + allgather round a ring: 2(p-1) steps, each sending a 1/p chunk."""
    _check(nbytes, ranks)
    p = int(ranks)
    if p == 1:
        return 0.0
    chunk = nbytes / p
    return 2 * (p - 1) * link.time(chunk) + (p - 1) * chunk * link.gamma


def recursive_doubling_time(nbytes, ranks, link):
    """log2(p) exchanges of the whole buffer; a p that is not a power of two folds the extra ranks in first (+2)."""
    _check(nbytes, ranks)
    p = int(ranks)
    if p == 1:
        return 0.0
    pof2 = 1 << (p.bit_length() - 1)
    steps = int(math.log2(pof2)) + (2 if p != pof2 else 0)
    return steps * link.time(nbytes) + (int(math.log2(pof2)) + (1 if p != pof2 else 0)) * nbytes * link.gamma


def parameter_server_time(nbytes, ranks, link):
    """Every worker sends to the root, which reduces and sends back: the root's link carries 2(p-1) buffers."""
    _check(nbytes, ranks)
    p = int(ranks)
    return 2 * (p - 1) * link.time(nbytes) + (p - 1) * nbytes * link.gamma


def hierarchical_time(nbytes, ranks, ranks_per_node, intra, inter):
    """Reduce-scatter in each node (``intra`` link), a ring of each 1/L chunk over the network (``inter``), allgather.

    ``ranks`` must be a multiple of ``ranks_per_node`` (L); N = ranks / L nodes.
    """
    _check(nbytes, ranks)
    if not isinstance(ranks_per_node, (int, np.integer)) or ranks_per_node < 1 or ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be a positive divisor of ranks={ranks}")
    local, nodes = int(ranks_per_node), int(ranks) // int(ranks_per_node)
    in_node = 2 * (local - 1) * intra.time(nbytes / local) + (local - 1) * nbytes / local * intra.gamma
    return in_node + ring_time(nbytes / local, nodes, inter)


def predict(nbytes, link, ranks=DEFAULT_RANKS, ranks_per_node=None, intra=None):
    """Seconds per allreduce of ``nbytes`` for each algorithm at each rank count: ``{algorithm: array}``.

    ``link`` is the network between nodes (or between any two ranks); with ``ranks_per_node`` L (and
    ``intra``, the link inside a node, default the same) "hierarchical" is included for the rank counts
    that L divides (NaN elsewhere).
    """
    ranks = [int(p) for p in ranks]
    out = {"ring": np.array([ring_time(nbytes, p, link) for p in ranks]),
           "recursive_doubling": np.array([recursive_doubling_time(nbytes, p, link) for p in ranks]),
           "parameter_server": np.array([parameter_server_time(nbytes, p, link) for p in ranks])}
    if ranks_per_node is not None:
        intra = intra or link
        out["hierarchical"] = np.array([hierarchical_time(nbytes, p, ranks_per_node, intra, link)
                                        if p % ranks_per_node == 0 else np.nan for p in ranks])
    return out


def cnn_gradient_bytes(dtype_bytes=4):
    """Bytes of the labs' CNN's gradient (all its parameters), as one fused allreduce moves them."""
    from .models import SHAPES

    return int(sum(math.prod(shape) for shape in SHAPES.values()) * dtype_bytes)
