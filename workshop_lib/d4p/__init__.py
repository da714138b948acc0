"""Distributed K-Means with daal4py's names: ``daalinit``, ``kmeans_init``, ``kmeans``.

Mirrors daal4py's SPMD mode: every MPI rank calls the same function on its own
chunk of rows (``distributed=True``) and every rank receives the same global
result. The one idea: a data-parallel algorithm only needs each rank to reduce
its chunk to a few numbers (per-cluster sums and counts, an objective), and one
allreduce per iteration (workshop_lib.comm, the collectives of lab 03) combines
them; the data never moves.

Shapes: n points (rows) of d features; k clusters. ``assignments`` is (n, 1) for
the rank's own rows, as daal4py returns it.

Determinism: k-means++ (``plusPlusDense``) samples with D^2 weights that are
rounded to 64-bit integers on a scale every rank agrees on, and sums integers,
so the chosen centroids are *bit for bit* the same for 1, 2 or 3 ranks and equal
the serial result for the same seed. Lloyd iterations sum floating-point
partials, so their results agree across rank counts to rounding.

Empty clusters: when a cluster receives no point, it is re-seeded with the point
farthest from its own centroid (over all ranks; ties go to the lowest global row
index), the next empty cluster with the next-farthest point, as daal4py does.

Agreement: every rank must call a distributed algorithm with the same
parameters (only the data differ). The call's parameters travel in the one
small allgather that validates the chunks, so a rank that passes another
``nClusters``, ``method``, ``fptype``, ``maxIterations`` or engine seed makes
every rank raise a ValueError naming the parameter and each rank's value,
instead of a hang or different results per rank.

``daalinit()`` guards the job as ``hvd.init()`` does (:func:`workshop_lib.job.guard_job`):
an uncaught exception or a failing ``sys.exit`` on any rank aborts the whole
job with its message, so no rank waits for ever in a collective. Every
distributed call, and ``daalfini()``, is a phase that every rank must enter
alike: a rank that calls another one (``distributed=False`` while the others
pass True, then ``daalfini()``) or has ended aborts the job with a message
naming both ranks' phases, instead of leaving the others waiting for ever.
``daalfini()`` ends the distributed session but leaves ``MPI_Finalize`` to
mpi4py at exit, so a notebook can call ``daalinit()`` again.

The package follows scikit-learn's split of ``_kmeans.py``: this file holds
daal4py's names, the process state, the communication (numbers through
buffers: ``Bcast``, ``Allgather(v)``, ``Allreduce``; only the validating
exchange's metadata is a small Python object) and the validation at the public
boundary; ``init.py`` the initialisations over every rank's rows; ``kernels.py``
the numba kernels, which trust their callers.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import job, placement, runtime
from .init import _n_chunks, _parallel_plus_plus, _plus_plus, _row
from .kernels import _dist_to_assigned, _lloyd_pass, _panels

__all__ = [
    "daalinit",
    "daalfini",
    "num_procs",
    "my_procid",
    "num_threads",
    "engines_mt19937",
    "kmeans_init",
    "kmeans",
    "kmeans_init_result",
    "kmeans_result",
    "row_range",
]

INIT_METHODS = ("defaultDense", "randomDense", "plusPlusDense", "parallelPlusDense")
FPTYPES = {"double": np.float64, "float": np.float32}


# ----------------------------------------------------------------------------------------------
# Process-wide state: one small object, as Horovod keeps it.


class _State:
    def __init__(self):
        self.comm = None  # mpi4py communicator once MPI is in use
        self.collectives = None  # workshop_lib.comm.Communicator on it, created by the first distributed call
        self.initialized = False  # daalinit() has installed the job guard (abort on a failing rank)

    def mpi(self):
        if self.comm is None:
            from mpi4py import MPI  # lazy: importing this package never starts MPI

            self.comm = MPI.COMM_WORLD
        return self.comm

    def communicator(self):
        """The course's collectives (ring / shared memory / recursive doubling); creating it is collective."""
        if self.collectives is None:
            from ..comm import Communicator

            self.collectives = Communicator(self.mpi())
        return self.collectives


_state = _State()


def daalinit(nthreads=None):
    """Start a (possibly distributed) session; optionally set the number of threads per process.

    Parameters
    ----------
    nthreads : int, optional
        Threads each rank uses for its chunk (numba's thread count). Must be at
        most ``NUMBA_NUM_THREADS`` (set it before Python starts to allow more).
    """
    placement.check_launcher_world()  # srun/mpirun started N tasks but MPI sees 1: stop, say why
    if not _state.initialized:  # first the guard: from here on a failure on one rank ends the job
        job.guard_job("d4p", _state.mpi())  # as after hvd.init()
    _state.initialized = True
    placement.place(_state.mpi())  # each rank's share of the node's cores; nthreads below overrides numba's
    if nthreads is not None:
        limit = numba.config.NUMBA_NUM_THREADS
        if isinstance(nthreads, bool) or not isinstance(nthreads, (int, np.integer)) or not 1 <= nthreads <= limit:
            raise ValueError(f"nthreads={nthreads!r} must be an integer between 1 and NUMBA_NUM_THREADS={limit}")
        runtime.set_numba_threads(int(nthreads))


def daalfini():
    """End the distributed session: wait for every rank (a barrier), then restore the hooks of ``daalinit()``."""
    if _state.comm is not None:
        _enter("d4p.daalfini")  # a rank still in a distributed call, or ended, aborts the job here
        _state.comm.Barrier()
    if _state.initialized:
        job.release_job("d4p")
    _state.initialized = False


def num_procs() -> int:
    """Number of MPI ranks (1 when not started under mpiexec)."""
    return _state.mpi().Get_size()


def my_procid() -> int:
    """This process's rank, 0 .. num_procs() - 1."""
    return _state.mpi().Get_rank()


def num_threads() -> int:
    """Threads this process uses for its chunk."""
    return numba.get_num_threads()


def row_range(n_rows, rank, size):
    """Rows ``[start, stop)`` of ``rank``'s band when ``n_rows`` rows are split over ``size`` ranks.

    The domain decomposition of lab 04 (not a daal4py function: daal4py leaves the split to its caller):
    contiguous bands in rank order that cover every row exactly once, the first ``n_rows % size`` ranks one row
    longer, so no row is dropped (as ``int(n_rows / size)`` rows per rank would drop up to ``size - 1``).

    Parameters
    ----------
    n_rows : int
        Rows to split, at least 0.
    rank : int
        This rank, ``0 <= rank < size``.
    size : int
        Number of ranks, at least 1.

    Returns
    -------
    (int, int)
        ``start`` and ``stop``; ``stop - start`` is ``n_rows // size`` or one more.

    Examples
    --------
    >>> [row_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    for name, value in (("n_rows", n_rows), ("rank", rank), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}={value!r} must be an integer")
    if n_rows < 0:
        raise ValueError(f"n_rows={n_rows} must be at least 0")
    if size < 1:
        raise ValueError(f"size={size} must be at least 1")
    if not 0 <= rank < size:
        raise ValueError(f"rank={rank} must be between 0 and size - 1 = {size - 1}")
    base, extra = divmod(int(n_rows), int(size))
    start = int(rank) * base + min(int(rank), extra)
    return start, start + base + (1 if rank < extra else 0)


class engines_mt19937:  # noqa: N801 - daal4py's name
    """A Mersenne Twister random engine with a seed, as ``daal4py.engines_mt19937(seed=777)``.

    Parameters
    ----------
    seed : int
        A non-negative integer.
    """

    def __init__(self, seed=777):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        self.seed = int(seed)

    def generator(self) -> np.random.Generator:
        return np.random.Generator(np.random.MT19937(self.seed))

    def __repr__(self):
        return f"engines_mt19937(seed={self.seed})"


class kmeans_init_result:  # noqa: N801
    """Result of :class:`kmeans_init`: ``centroids`` (k, d).

    Parameters
    ----------
    centroids : numpy.ndarray
        (nClusters, d), of the call's ``fptype``.
    """

    def __init__(self, centroids):
        self.centroids = centroids

    def __repr__(self):
        return f"kmeans_init_result(centroids: {self.centroids.shape})"


class kmeans_result:  # noqa: N801
    """Result of :class:`kmeans`, with daal4py's attribute names and shapes.

    Parameters
    ----------
    centroids : numpy.ndarray
        (nClusters, d).
    assignments : numpy.ndarray or None
        (n, 1) int32 labels of this rank's rows, or None when not asked for.
    objective : float
        The sum of squared distances to the returned centroids (``objectiveFunction``, (1, 1) float64).
    n_iterations : int
        Lloyd iterations run (``nIterations``, (1, 1) int64).
    """

    def __init__(self, centroids, assignments, objective, n_iterations):
        self.centroids = centroids
        self.assignments = assignments
        self.objectiveFunction = np.array([[objective]], dtype=np.float64)
        self.goalFunction = self.objectiveFunction
        self.nIterations = np.array([[n_iterations]], dtype=np.int64)

    def __repr__(self):
        return (
            f"kmeans_result(centroids: {self.centroids.shape}, objectiveFunction={self.objectiveFunction[0, 0]:.6g}, "
            f"nIterations={self.nIterations[0, 0]})"
        )


# ----------------------------------------------------------------------------------------------
# Communication: every rank calls these in the same order. Small Python objects go through the
# lower-case methods, numpy buffers through the upper-case ones.


def _raise_first(errors, size):
    """Raise the first rank's error (the same on every rank, since every rank holds the same list)."""
    for rank, message in enumerate(errors):
        if message:
            raise ValueError(message if size == 1 else f"rank {rank}: {message}")


class _Serial:
    rank, size = 0, 1

    def agree(self, error):
        _raise_first([error], 1)

    def allgather(self, obj):
        return [obj]

    def allreduce_sum(self, buf):
        return buf

    def allreduce_max(self, value):
        return value

    def bcast_row(self, row, root, d, dtype):
        return row

    def allgather_ints(self, value):
        return np.array([value], dtype=np.int64)

    def allgatherv(self, array):
        return np.ascontiguousarray(array)


class _Distributed:
    """Numbers through buffers (``Bcast``, ``Allgather(v)``, ``Allreduce``; the sums through workshop_lib.comm, lab
    03's allreduce); only the validating exchange's metadata (parameters, shapes, messages) is a small Python object."""

    def __init__(self, comm, collectives):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.collectives = collectives

    def agree(self, error):
        """Raise the same error on every rank if any rank found one; never leave a rank waiting."""
        _raise_first(self.comm.allgather(error), self.size)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def allreduce_sum(self, buf):
        # every rank gets bit-identical sums (each algorithm reduces in one order and copies the result),
        # which keeps the centroids identical on all ranks
        return self.collectives.allreduce(np.ascontiguousarray(buf), op="sum")

    def allreduce_max(self, value):
        from mpi4py import MPI

        out = np.empty(1, dtype=np.float64)
        self.comm.Allreduce(np.array([value], dtype=np.float64), out, op=MPI.MAX)
        return float(out[0])

    def bcast_row(self, row, root, d, dtype):
        """Root's row (``d`` values of ``dtype``) on every rank, through one ``Bcast``."""
        buf = np.ascontiguousarray(row, dtype=dtype) if self.rank == root else np.empty(d, dtype=dtype)
        self.comm.Bcast(buf, root=root)
        return buf

    def allgather_ints(self, value):
        """Every rank's integer ``value``, in rank order (int64, one ``Allgather``)."""
        out = np.empty(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([value], dtype=np.int64), out)
        return out

    def allgatherv(self, array):
        """Every rank's rows of ``array`` concatenated in rank order (first dimensions may differ; ``Allgatherv``)."""
        x = np.ascontiguousarray(array)
        rows = self.allgather_ints(x.shape[0] if x.ndim else 1)
        width = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((int(rows.sum()), *x.shape[1:]), dtype=x.dtype)
        self.comm.Allgatherv(x.reshape(-1), [out.reshape(-1), rows * width])
        return out


def _enter(phase):
    """Enter ``phase`` on every rank alike (job's stall inspector, strict): a rank elsewhere, or ended, aborts."""
    guard = job.current_guard()
    if guard is not None and _state.mpi().Get_size() > 1:
        guard.wait_for_peers(phase, strict=True)


def _communicator(distributed, phase="d4p compute(distributed=True)"):
    """d4p's communication for one call; entering a distributed call is a phase every rank must enter alike.

    One phase name for kmeans_init and kmeans: a rank that calls the other one still reaches the validating
    exchange, which raises a ValueError naming each rank's algorithm on every rank (catchable, as before).
    """
    if not distributed:
        return _Serial()
    if job.current_guard() is None:  # no daalinit(): creating the Communicator takes the job guard
        _state.communicator()
    _enter(phase)  # before anything collective, so that a rank that is elsewhere is named, never waited for
    return _Distributed(_state.mpi(), _state.communicator())


# ----------------------------------------------------------------------------------------------
# Validation at the public boundary (the kernels trust their inputs).


def _is_real(value):
    """A real number (int or float, numpy's too), not a bool or a string: what a numeric parameter may be."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_common(nClusters, fptype):
    if not isinstance(nClusters, (int, np.integer)) or isinstance(nClusters, bool) or nClusters < 1:
        raise ValueError(f"nClusters={nClusters!r} must be a positive integer")
    if fptype not in FPTYPES:
        raise ValueError(f"fptype={fptype!r} must be one of {sorted(FPTYPES)}")


def _local_data_error(data, dtype, name="data"):
    """A message describing what is wrong with this rank's chunk, or None; plus the converted array."""
    arr = np.asarray(data) if not isinstance(data, np.ndarray) else data
    if arr.dtype.kind not in "iuf":
        return f"{name}.dtype={arr.dtype} must be a real numeric type (float64, float32 or integer)", None
    if arr.ndim != 2:
        return f"{name}.shape={arr.shape} must be 2-D (n_rows, n_features)", None
    if arr.shape[1] < 1:
        return f"{name}.shape={arr.shape} has no features", None
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the value
        given, arr = arr, np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        if np.isfinite(given[bad[0], bad[1]]):  # finite, but beyond the range of fptype's dtype
            return (f"{name}[{bad[0]}, {bad[1]}]={float(given[bad[0], bad[1]])!r} is beyond the range of {np.dtype(dtype)}; "
                    "use fptype='double' or scale the data"), None
        return f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]}); clean or impute it first", None
    return None, arr


def _disagreement(calls):
    """The parameters on which the ranks' calls differ, with every rank's value; None if they all agree.

    ``calls`` holds one ``((name, value), ...)`` per rank: the algorithm and the parameters that steer its
    collectives and its result.
    """
    tables = [dict(call) for call in calls]
    names = list(dict.fromkeys(name for call in calls for name, _ in call))
    differing = [name for name in names if len({repr(t.get(name)) for t in tables}) > 1]
    if not differing:
        return None
    listing = "; ".join(f"{name} (" + ", ".join(f"rank {r}: {t.get(name, '-')!r}" for r, t in enumerate(tables)) + ")"
                        for name in differing)
    return (f"{tables[0].get('algorithm', 'd4p')}: the ranks passed different parameters: {listing}; every rank "
            "must call a distributed algorithm with the same parameters (only the data differ)")


def _magnitude_error(name, largest, n_total, d, dtype):
    """Why values up to ``largest`` would overflow (data: or underflow) the squared distances, or None.

    The kernels form squared distances (at most d (2M)^2 for values up to M) in the working precision, and
    the objective and the k-means++ weights sum n_total of them in float64.
    """
    limit = min(math.sqrt(np.finfo(dtype).max / (4 * d)), math.sqrt(np.finfo(np.float64).max / (4 * d * max(n_total, 1))))
    if largest >= limit:
        return (f"{name} has values up to {largest:.3g} in magnitude: their squared distances would overflow "
                f"{np.dtype(dtype).name} (the objective would be inf and every point fall in one cluster); "
                f"with n={n_total} rows of d={d} features, values must stay below {limit:.3g}: scale the data "
                "(e.g. divide by its largest magnitude)")
    smallest = math.sqrt(np.finfo(dtype).tiny)
    if name == "data" and 0 < largest < smallest:
        return (f"{name} has values only up to {largest:.3g} in magnitude: their squared distances would underflow "
                f"{np.dtype(dtype).name} to zero; values must reach at least {smallest:.3g}: scale the data up")
    return None


def _largest(arr):
    return float(np.abs(arr).max()) if arr is not None and arr.size else 0.0


def _prepare(comm, data, nClusters, dtype, call):
    """Validate every rank's chunk and parameters together (one allgather); return (chunk, n_total, offset, counts).

    ``call`` is this rank's ``((name, value), ...)`` (see :func:`_disagreement`).
    """
    error, arr = _local_data_error(data, dtype)
    info = comm.allgather((call, error, None if arr is None else arr.shape, _largest(arr)))
    disagreement = _disagreement([i[0] for i in info])
    if disagreement:
        raise ValueError(disagreement)
    _raise_first([i[1] for i in info], comm.size)
    shape_info = [i[2] for i in info]
    features = {s[1] for s in shape_info}
    if len(features) != 1:
        comm.agree(f"ranks hold different numbers of features: {[s[1] for s in shape_info]}")
    counts = [s[0] for s in shape_info]
    n_total = sum(counts)
    if nClusters > n_total:
        comm.agree(f"nClusters={nClusters} is larger than the number of rows in total ({n_total})")
    magnitude = _magnitude_error("data", max(i[3] for i in info), n_total, arr.shape[1], dtype)
    if magnitude:
        raise ValueError(magnitude)
    return arr, n_total, sum(counts[: comm.rank]), counts


class kmeans_init:  # noqa: N801 - daal4py's name
    """Initial centroids for K-Means, as ``daal4py.kmeans_init``.

    Parameters
    ----------
    nClusters : int
        Number of centroids k.
    method : {"defaultDense", "randomDense", "plusPlusDense", "parallelPlusDense"}
        ``defaultDense``: the first k rows (of the union of chunks, in rank
        order). ``randomDense``: k distinct rows drawn uniformly.
        ``plusPlusDense``: k-means++ (D^2 sampling; with ``nTrials > 1`` the
        greedy variant keeps the best of nTrials candidates). ``parallelPlusDense``:
        k-means|| (``nRounds`` rounds oversampling ``oversamplingFactor * k``
        points each, then a weighted k-means++ recluster of the candidates).
    nTrials, oversamplingFactor, nRounds : see ``method``.
    engine : engines_mt19937
        Random engine; the same seed gives the same centroids for any number of ranks.
    distributed : bool
        Each rank passes its own chunk; every rank gets the same centroids.
    fptype : {"double", "float"}

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).random((1000, 3))
    >>> kmeans_init(4, method="plusPlusDense").compute(X).centroids.shape
    (4, 3)
    """

    def __init__(self, nClusters, method="defaultDense", nTrials=1, oversamplingFactor=0.5, nRounds=5,
                 engine=None, distributed=False, fptype="double"):
        _check_common(nClusters, fptype)
        if method not in INIT_METHODS:
            raise ValueError(f"method={method!r} must be one of {INIT_METHODS}")
        if not isinstance(nTrials, (int, np.integer)) or nTrials < 1:
            raise ValueError(f"nTrials={nTrials!r} must be a positive integer")
        if not _is_real(oversamplingFactor) or not oversamplingFactor > 0:
            raise ValueError(f"oversamplingFactor={oversamplingFactor!r} must be a positive number")
        if not isinstance(nRounds, (int, np.integer)) or nRounds < 1:
            raise ValueError(f"nRounds={nRounds!r} must be a positive integer")
        self.nClusters, self.method, self.nTrials = int(nClusters), method, int(nTrials)
        self.oversamplingFactor, self.nRounds = float(oversamplingFactor), int(nRounds)
        self.engine = engine if engine is not None else engines_mt19937(seed=777)
        if not isinstance(self.engine, engines_mt19937):
            raise TypeError(f"engine={engine!r} must be an engines_mt19937")
        self.distributed, self.fptype = bool(distributed), fptype

    def compute(self, data) -> kmeans_init_result:
        """Initial centroids from ``data`` (this rank's rows when distributed; collective then).

        Parameters
        ----------
        data : array_like
            (n, d) rows.

        Returns
        -------
        kmeans_init_result
        """
        comm = _communicator(self.distributed)
        runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
        call = (("algorithm", "kmeans_init"), ("nClusters", self.nClusters), ("method", self.method),
                ("nTrials", self.nTrials), ("oversamplingFactor", self.oversamplingFactor), ("nRounds", self.nRounds),
                ("engine seed", self.engine.seed), ("fptype", self.fptype))
        x, n_total, offset, counts = _prepare(comm, data, self.nClusters, FPTYPES[self.fptype], call)
        k, rng = self.nClusters, self.engine.generator()
        if self.method == "defaultDense":
            centroids = np.array([_row(comm, x, counts, i) for i in range(k)], dtype=x.dtype)
        elif self.method == "randomDense":
            picks = rng.choice(n_total, size=k, replace=False)
            centroids = np.array([_row(comm, x, counts, int(i)) for i in picks], dtype=x.dtype)
        elif self.method == "plusPlusDense":
            centroids = _plus_plus(comm, x, counts, k, self.nTrials, rng)
        else:
            centroids = _parallel_plus_plus(comm, x, counts, k, self.oversamplingFactor, self.nRounds, rng, offset)
        return kmeans_init_result(np.ascontiguousarray(centroids, dtype=x.dtype).reshape(k, x.shape[1]))


# ----------------------------------------------------------------------------------------------
# Lloyd iterations


class kmeans:  # noqa: N801 - daal4py's name
    """K-Means clustering by Lloyd iterations, as ``daal4py.kmeans``.

    Parameters
    ----------
    nClusters : int
    maxIterations : int
        Lloyd iterations at most; ``0`` only assigns points to the given
        centroids (inference).
    accuracyThreshold : float
        Stop when the objective's relative decrease in one iteration is at most
        this (``0`` stops when it no longer decreases at all).
    assignFlag : bool
        Return ``assignments`` (n, 1) for this rank's rows.
    distributed : bool
        Each rank passes its own chunk; one allreduce per iteration combines the
        per-cluster sums, counts and the objective; every rank gets the same centroids.
    fptype : {"double", "float"}

    Returns (from ``compute(data, centroids)``)
    -------
    kmeans_result
        ``centroids`` (k, d); ``assignments`` (n, 1) int32 or None;
        ``objectiveFunction`` (1, 1): the sum of squared distances of all points
        to the *returned* centroids; ``goalFunction`` (the same);
        ``nIterations`` (1, 1).

    Raises
    ------
    ValueError
        On every rank, if any rank's data or centroids are invalid.
    """

    def __init__(self, nClusters, maxIterations=300, accuracyThreshold=0.0, assignFlag=True,
                 distributed=False, fptype="double"):
        _check_common(nClusters, fptype)
        if not isinstance(maxIterations, (int, np.integer)) or maxIterations < 0:
            raise ValueError(f"maxIterations={maxIterations!r} must be a non-negative integer")
        if not _is_real(accuracyThreshold) or not accuracyThreshold >= 0:
            raise ValueError(f"accuracyThreshold={accuracyThreshold!r} must be a number >= 0")
        self.nClusters, self.maxIterations = int(nClusters), int(maxIterations)
        self.accuracyThreshold, self.assignFlag = float(accuracyThreshold), bool(assignFlag)
        self.distributed, self.fptype = bool(distributed), fptype

    def compute(self, data, centroids) -> kmeans_result:
        """Lloyd iterations on ``data`` (this rank's rows when distributed; collective then) from ``centroids``.

        Parameters
        ----------
        data : array_like
            (n, d) rows.
        centroids : array_like
            (nClusters, d) starting centroids, the same on every rank.

        Returns
        -------
        kmeans_result
        """
        comm = _communicator(self.distributed)
        runtime.yield_blas()  # the BLAS's idle workers give the cores to numba's
        dtype = FPTYPES[self.fptype]
        call = (("algorithm", "kmeans"), ("nClusters", self.nClusters), ("maxIterations", self.maxIterations),
                ("accuracyThreshold", self.accuracyThreshold), ("fptype", self.fptype))
        x, n_total, offset, counts = _prepare(comm, data, self.nClusters, dtype, call)
        error, c = _local_data_error(centroids, dtype, name="centroids")
        if error is None and c.shape != (self.nClusters, x.shape[1]):
            error = f"centroids.shape={c.shape} must be (nClusters, n_features) = ({self.nClusters}, {x.shape[1]})"
        if error is None:
            error = _magnitude_error("centroids", _largest(c), n_total, x.shape[1], dtype)
        comm.agree(error)

        k, d, n = self.nClusters, x.shape[1], x.shape[0]
        xt = _panels(x)
        labels = np.zeros(n, dtype=np.int32)
        n_chunks = _n_chunks(n)
        sums = np.zeros((n_chunks, k, d))
        cnt = np.zeros((n_chunks, k))
        obj = np.zeros(n_chunks)
        packed = np.empty(k * d + k + 1)

        def assign(cur):
            """One pass: labels for ``cur``; global sums (k, d), counts (k,) and objective by one allreduce."""
            if n:
                _lloyd_pass(xt, cur, labels, sums, cnt, obj)
            packed[: k * d] = sums.sum(0).ravel() if n else 0.0
            packed[k * d : k * d + k] = cnt.sum(0) if n else 0.0
            packed[-1] = obj.sum() if n else 0.0
            total = comm.allreduce_sum(packed)
            return total[: k * d].reshape(k, d), total[k * d : k * d + k], float(total[-1])

        current = c.copy()
        global_sums, global_counts, objective = assign(current)
        iterations = 0
        while iterations < self.maxIterations:
            new = np.empty_like(current)
            filled = global_counts > 0
            new[filled] = (global_sums[filled] / global_counts[filled, None]).astype(dtype)
            empty = np.flatnonzero(~filled)
            if empty.size:
                new[empty] = self._farthest_points(comm, x, current, labels, offset, empty.size)
            previous, current = objective, new
            global_sums, global_counts, objective = assign(current)
            iterations += 1
            if previous - objective <= self.accuracyThreshold * previous:
                break
        assignments = labels.reshape(-1, 1).copy() if self.assignFlag else None
        return kmeans_result(current, assignments, objective, iterations)

    @staticmethod
    def _farthest_points(comm, x, centroids, labels, offset, m):
        """The m rows farthest from their own centroid over all ranks (ties: lowest global index)."""
        dist = np.empty(x.shape[0])
        if x.shape[0]:
            _dist_to_assigned(x, centroids, labels, dist)
        top = np.arange(0)
        if dist.size:  # the m largest, ties to the lowest index, without sorting all n distances
            m_local = min(m, dist.size)
            threshold = np.partition(dist, dist.size - m_local)[dist.size - m_local]
            candidates = np.flatnonzero(dist >= threshold)
            top = candidates[np.lexsort((candidates, -dist[candidates]))][:m_local]
        dists, indices, rows = (comm.allgatherv(a) for a in (dist[top], offset + top.astype(np.int64), x[top]))
        order = np.lexsort((indices, -dists))[:m]  # farthest first, ties to the lowest global index
        return np.ascontiguousarray(rows[order], dtype=x.dtype)
