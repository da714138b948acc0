"""workshop_lib.d4p against scikit-learn's KMeans (a test-only reference) and against its own definitions."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from workshop_lib import d4p


def _blobs(n=3000, k=5, d=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, (k, d))
    return centers[rng.integers(k, size=n)] + rng.normal(size=(n, d))


@pytest.mark.parametrize("k, max_iter, d", [(5, 1, 3), (5, 10, 3), (8, 100, 3), (3, 300, 7)])
def test_lloyd_matches_sklearn_from_the_same_initial_centroids(k, max_iter, d):
    X = _blobs(d=d, seed=k)
    init = d4p.kmeans_init(k, method="randomDense", engine=d4p.engines_mt19937(seed=3)).compute(X).centroids
    ours = d4p.kmeans(k, max_iter).compute(X, init)
    ref = KMeans(k, init=init, n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd").fit(X)
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ours.assignments[:, 0], ref.labels_)
    np.testing.assert_allclose(ours.objectiveFunction[0, 0], ref.inertia_, rtol=1e-10)
    assert ours.nIterations[0, 0] <= max_iter


def test_result_shapes_and_dtypes_are_daal4pys():
    X = _blobs()
    res = d4p.kmeans(4, 5).compute(X, X[:4])
    assert res.centroids.shape == (4, 3) and res.centroids.dtype == np.float64
    assert res.assignments.shape == (len(X), 1) and res.assignments.dtype == np.int32
    assert res.objectiveFunction.shape == (1, 1) and res.nIterations.shape == (1, 1)
    assert res.goalFunction is res.objectiveFunction
    assert res.nIterations <= 5  # compares as daal4py's (1, 1) array does
    assert d4p.kmeans(4, 5, assignFlag=False).compute(X, X[:4]).assignments is None


def test_objective_is_for_the_returned_centroids():
    X = _blobs()
    res = d4p.kmeans(5, 3).compute(X, X[:5])
    d2 = ((X[:, None, :] - res.centroids[None]) ** 2).sum(2)
    np.testing.assert_array_equal(res.assignments[:, 0], d2.argmin(1))
    np.testing.assert_allclose(res.objectiveFunction[0, 0], d2.min(1).sum(), rtol=1e-10)


def test_max_iterations_zero_only_assigns():
    X = _blobs()
    C = X[10:15].copy()
    res = d4p.kmeans(5, 0).compute(X, C)
    np.testing.assert_array_equal(res.centroids, C)
    assert res.nIterations[0, 0] == 0
    d2 = ((X[:, None, :] - C[None]) ** 2).sum(2)
    np.testing.assert_array_equal(res.assignments[:, 0], d2.argmin(1))


def test_float_fptype_computes_in_float32_close_to_double():
    X = _blobs()
    C = X[:5]
    r64 = d4p.kmeans(5, 20).compute(X, C)
    r32 = d4p.kmeans(5, 20, fptype="float").compute(X.astype(np.float32), C.astype(np.float32))
    assert r32.centroids.dtype == np.float32
    np.testing.assert_allclose(r32.centroids, r64.centroids, rtol=1e-4, atol=1e-4)


def test_accuracy_threshold_stops_early_on_relative_change():
    X = _blobs(n=5000, k=8)
    C = X[:8]
    full = d4p.kmeans(8, 200, accuracyThreshold=0.0).compute(X, C)
    loose = d4p.kmeans(8, 200, accuracyThreshold=0.05).compute(X, C)
    assert 1 <= loose.nIterations[0, 0] < full.nIterations[0, 0]
    # stopping rule: the last iteration lowered the objective by at most 5 %, the one before by more
    prev = d4p.kmeans(8, int(loose.nIterations[0, 0]) - 1).compute(X, C).objectiveFunction[0, 0]
    assert prev - loose.objectiveFunction[0, 0] <= 0.05 * prev


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    X = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [10, 0], [10.2, 0], [30, 0]])
    C = np.array([[0.1, 0], [10.1, 0], [1000.0, 1000]])  # the third centroid attracts nobody
    res = d4p.kmeans(3, 1).compute(X, C)
    # after one update: [0.1, 0], [10.1, 0] (the 30 joined cluster 1) and the empty one re-seeded
    # with the point farthest from its own centroid: [30, 0] (distance to (40.2/3, 0))
    np.testing.assert_allclose(res.centroids[2], [30, 0])
    assert np.bincount(res.assignments[:, 0], minlength=3).min() >= 1


def test_default_and_random_init_pick_rows():
    X = _blobs()
    np.testing.assert_array_equal(d4p.kmeans_init(4).compute(X).centroids, X[:4])
    C = d4p.kmeans_init(6, method="randomDense", engine=d4p.engines_mt19937(5)).compute(X).centroids
    rows = {tuple(r) for r in X}
    assert all(tuple(c) in rows for c in C) and len({tuple(c) for c in C}) == 6


@pytest.mark.parametrize("trials", [1, 3])
def test_plus_plus_is_deterministic_for_a_seed_and_picks_distinct_rows(trials):
    X = _blobs()
    make = lambda seed: d4p.kmeans_init(  # noqa: E731
        8, method="plusPlusDense", nTrials=trials, engine=d4p.engines_mt19937(seed)
    ).compute(X).centroids
    a, b, c = make(7), make(7), make(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rows = {tuple(r) for r in X}
    assert all(tuple(r) in rows for r in a) and len({tuple(r) for r in a}) == 8


def test_plus_plus_samples_the_second_centroid_proportionally_to_d_squared():
    # 1-D points 0, 1, 3, 7; when the first centroid is 0 the second is drawn with weights 1 : 9 : 49.
    X = np.array([[0.0], [1.0], [3.0], [7.0]])
    picks = []
    for seed in range(3000):
        c = d4p.kmeans_init(2, method="plusPlusDense", engine=d4p.engines_mt19937(seed)).compute(X).centroids
        if c[0, 0] == 0.0:
            picks.append(c[1, 0])
    picks = np.array(picks)
    assert len(picks) > 500
    observed = np.array([(picks == v).mean() for v in (1.0, 3.0, 7.0)])
    expected = np.array([1, 9, 49]) / 59
    assert (picks != 0.0).all()
    tolerance = 4 * np.sqrt(expected * (1 - expected) / len(picks))  # four standard errors
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)


def test_plus_plus_spreads_over_separated_blobs():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=float)
    X = np.repeat(centers, 250, axis=0) + rng.normal(scale=0.5, size=(1000, 2))
    C = d4p.kmeans_init(4, method="plusPlusDense", nTrials=3).compute(X).centroids
    nearest = ((C[:, None] - centers[None]) ** 2).sum(2).argmin(1)
    assert sorted(nearest) == [0, 1, 2, 3]


def test_parallel_plus_plus_is_deterministic_and_starts_better_than_random():
    X = _blobs(n=4000, k=6, seed=2)

    def start(method, seed):
        C = d4p.kmeans_init(6, method=method, oversamplingFactor=2.0, engine=d4p.engines_mt19937(seed)).compute(X)
        return C.centroids, d4p.kmeans(6, 0).compute(X, C.centroids).objectiveFunction[0, 0]

    np.testing.assert_array_equal(start("parallelPlusDense", 1)[0], start("parallelPlusDense", 1)[0])
    seeds = range(10)
    parallel = np.median([start("parallelPlusDense", s)[1] for s in seeds])
    plus_plus = np.median([start("plusPlusDense", s)[1] for s in seeds])
    random = np.median([start("randomDense", s)[1] for s in seeds])
    best = KMeans(6, n_init=10, random_state=0).fit(X).inertia_
    assert parallel <= plus_plus < random
    assert parallel < 1.5 * best


def test_identical_points_do_not_break_plus_plus():
    X = np.ones((50, 2))
    X[:3] = [[0, 0], [5, 5], [9, 9]]
    C = d4p.kmeans_init(5, method="plusPlusDense").compute(X).centroids
    assert C.shape == (5, 2) and np.isfinite(C).all()


@pytest.mark.parametrize(
    "data, k, message",
    [
        (np.array([[1.0, np.nan], [2, 3]]), 1, "NaN or Inf .*row 0, column 1"),
        (np.array([[1.0, 2], [np.inf, 3]]), 1, "NaN or Inf"),
        (np.ones((3, 2)), 4, r"nClusters=4 is larger than the number of rows in total \(3\)"),
        (np.ones(5), 1, r"data.shape=\(5,\) must be 2-D"),
        (np.ones((3, 2), dtype=complex), 1, "data.dtype=complex128 must be a real numeric type"),
        (np.array([["a", "b"]]), 1, "must be a real numeric type"),
    ],
)
def test_bad_data_raises_clearly(data, k, message):
    with pytest.raises(ValueError, match=message):
        d4p.kmeans_init(k).compute(data)
    with pytest.raises(ValueError, match=message):
        d4p.kmeans(k, 3).compute(data, np.ones((k, data.shape[-1] if data.ndim == 2 else 1)))


def test_bad_centroids_and_parameters_raise_clearly():
    X = _blobs()
    with pytest.raises(ValueError, match=r"centroids.shape=\(4, 3\) must be \(nClusters, n_features\) = \(5, 3\)"):
        d4p.kmeans(5, 3).compute(X, X[:4])
    with pytest.raises(ValueError, match="centroids contains NaN"):
        d4p.kmeans(2, 3).compute(X, np.array([[0, 0, np.nan], [1, 1, 1]]))
    with pytest.raises(ValueError, match="nClusters=0 must be a positive integer"):
        d4p.kmeans(0, 3)
    with pytest.raises(ValueError, match="maxIterations=-1"):
        d4p.kmeans(2, -1)
    with pytest.raises(ValueError, match="method='kmeans'"):
        d4p.kmeans_init(2, method="kmeans")
    with pytest.raises(ValueError, match="fptype='half'"):
        d4p.kmeans(2, 1, fptype="half")
    with pytest.raises(TypeError, match="engine=42 must be an engines_mt19937"):
        d4p.kmeans_init(2, engine=42)


def test_integer_data_is_accepted_and_converted():
    X = np.arange(20, dtype=np.int64).reshape(10, 2)
    res = d4p.kmeans(2, 10).compute(X, X[:2])
    assert res.centroids.dtype == np.float64


def test_session_functions_outside_mpiexec():
    d4p.daalinit()
    assert d4p.num_procs() == 1 and d4p.my_procid() == 0 and d4p.num_threads() >= 1
    d4p.daalfini()
    with pytest.raises(ValueError, match="nthreads=0"):
        d4p.daalinit(0)
    # the guard was taken first, so that this error on one rank would have ended the job: daalfini lets go
    d4p.daalfini()


def test_row_range_covers_every_row_once_in_bands_that_differ_by_at_most_one():
    for n_rows in (0, 1, 7, 10, 872):
        for size in (1, 2, 3, 4, 8, 16):
            bands = [d4p.row_range(n_rows, r, size) for r in range(size)]
            rows = np.concatenate([np.arange(start, stop) for start, stop in bands])
            np.testing.assert_array_equal(rows, np.arange(n_rows))  # every row once, in rank order
            lengths = [stop - start for start, stop in bands]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    assert [d4p.row_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


@pytest.mark.parametrize(
    "args, error, message",
    [((10, 3, 3), ValueError, "rank=3"), ((10, -1, 3), ValueError, "rank=-1"), ((10, 0, 0), ValueError, "size=0"),
     ((-1, 0, 2), ValueError, "n_rows=-1"), ((10.0, 0, 2), TypeError, "n_rows=10.0")],
)
def test_row_range_rejects_bad_arguments_naming_them(args, error, message):
    with pytest.raises(error, match=message):
        d4p.row_range(*args)


@pytest.mark.parametrize("fptype, scale", [("double", 1e170), ("float", 1e20)])
def test_data_whose_squared_distances_overflow_raises_naming_the_magnitude(fptype, scale):
    X = _blobs() * scale
    for call in (lambda: d4p.kmeans_init(4, method="plusPlusDense", fptype=fptype).compute(X),
                 lambda: d4p.kmeans(4, 5, fptype=fptype).compute(X, X[:4])):
        with pytest.raises(ValueError, match=f"squared distances would overflow {np.dtype(d4p.FPTYPES[fptype]).name}"):
            call()
    small = _blobs()
    with pytest.raises(ValueError, match="centroids has values up to"):
        d4p.kmeans(4, 5, fptype=fptype).compute(small, small[:4] * scale)
    with pytest.raises(ValueError, match="would underflow"):
        d4p.kmeans(4, 5).compute(small * 1e-160, small[:4] * 1e-160)


def test_large_magnitudes_below_the_limit_give_the_exactly_scaled_result():
    # scaling by a power of two is exact in floating point: the result must be the unscaled one, scaled
    X = _blobs()
    scale = 2.0**400  # about 2.6e120
    init = d4p.kmeans_init(5, method="plusPlusDense", engine=d4p.engines_mt19937(seed=5))
    np.testing.assert_array_equal(init.compute(X * scale).centroids, init.compute(X).centroids * scale)
    ref = d4p.kmeans(5, 20).compute(X, X[:5])
    big = d4p.kmeans(5, 20).compute(X * scale, X[:5] * scale)
    assert np.isfinite(big.objectiveFunction).all()
    np.testing.assert_array_equal(big.centroids, ref.centroids * scale)
    np.testing.assert_array_equal(big.assignments, ref.assignments)
    np.testing.assert_array_equal(big.objectiveFunction, ref.objectiveFunction * scale**2)


def test_daalinit_and_hvd_init_hold_one_shared_job_guard_and_the_last_release_restores_the_hooks():
    import sys

    from workshop_lib import hvd, job

    before = (sys.excepthook, sys.exit)
    d4p.daalinit()
    guard = job.current_guard()
    assert sys.excepthook == guard._abort_on_uncaught_exception and sys.exit == guard._exit_recording_status
    hvd.init()
    try:
        assert hvd._state.guard is guard and guard.users == {"d4p", "hvd"}
        d4p.daalfini()
        assert sys.excepthook == guard._abort_on_uncaught_exception  # hvd still holds it
    finally:
        hvd.shutdown()
    assert (sys.excepthook, sys.exit) == before and not guard.users
