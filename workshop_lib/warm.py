"""Compile, into numba's on-disk cache, every kernel the labs time: ``workshop warm`` and lab 00.

A numba kernel is compiled on its first call with a given type signature, and with ``cache=True`` the machine code is
kept under ``__pycache__`` (or ``NUMBA_CACHE_DIR``) for this CPU. Each step below calls the labs' timed code once on
small inputs of the labs' dtypes and layouts, so a lab's first run loads machine code instead of compiling it.
Code generated per shape at run time (``jit_conv``'s LLVM kernels) is compiled per process; the labs' timings
exclude it with an untimed first call (:func:`workshop_lib.bench.measure`).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["STEPS", "warm"]


def _int8_gemms():
    from . import int8

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    b8 = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    a16 = rng.integers(-100, 100, (64, 64), dtype=np.int16)
    b16 = rng.integers(-100, 100, (64, 64), dtype=np.int16)
    int8.gemm_u8s8s32(a8, b8)
    int8.gemm_s16s16s32(a16, b16)
    if int8.vnni_isa():
        int8.gemm_u8s8s32(a8, int8.pack_weights(b8))
        int8.gemm_s16s16s32(a16, int8.pack_weights(b16))


def _cnn_fp32_and_int8():
    from . import int8, models
    from .data import load_mnist

    params, _ = models.load_model()
    (x_train, _), _ = load_mnist()
    images = x_train[:32]
    models.mnist_cnn_forward(params, images)
    paths = ["auto", "portable"] if int8.vnni_isa() else ["portable"]
    for path in paths:
        models.QuantizedCNN(params, x_train[:64], method="minmax", path=path)  # calibration is numpy.logits(images)


def _cnn_training():
    from . import bench

    (images, labels) = _mnist_train()
    for kwargs in (dict(variant="reference"), dict(variant="optimized"), dict(variant="optimized", fusion=False),
                   dict(variant="optimized", data_format="NCHW"), dict(variant="optimized", layout="blocked")):
        for mode in ("train", "inference"):
            bench.measure_cnn(mode=mode, batch_size=8, num_batches=1, num_warmup=0, images=images, labels=labels,
                              **kwargs)


def _mnist_train():
    from .data import load_mnist

    (images, labels), _ = load_mnist()
    return images[:256], labels[:256]


def _kmeans():
    from . import d4p

    pixels = np.random.default_rng(0).random((4096, 3))
    init = d4p.kmeans_init(4, method="plusPlusDense", engine=d4p.engines_mt19937(seed=0)).compute(pixels)
    fit = d4p.kmeans(4, 3, assignFlag=False).compute(pixels, init.centroids)
    d4p.kmeans(4, 0).compute(pixels, fit.centroids)


# (what, function): what the labs time, in the order they first need it
STEPS = (
    ("int8 GEMMs (lab 01)", _int8_gemms),
    ("fp32 and int8 CNN inference (lab 01)", _cnn_fp32_and_int8),
    ("CNN training and inference kernels (labs 02, 03)", _cnn_training),
    ("k-means++ and Lloyd kernels (lab 04)", _kmeans),
)


def warm(progress=True, out=print):
    """Run every step of :data:`STEPS` once; return ``{what: seconds}`` and the total.

    Parameters
    ----------
    progress : bool
        Show a tqdm progress bar.
    out : callable or None
        Where the summary line goes (None: nowhere).

    Returns
    -------
    (dict, float)
        Seconds per step and in all. A second run, with the cache written, takes a fraction of the first.
    """
    steps = STEPS
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(STEPS, desc="compiling the labs' kernels", unit="step")
    seconds = {}
    start = time.perf_counter()
    for what, step in steps:
        if progress:
            steps.set_postfix_str(what)
        t0 = time.perf_counter()
        step()
        seconds[what] = time.perf_counter() - t0
    total = time.perf_counter() - start
    if out is not None:
        for what, s in seconds.items():
            out(f"  {what:50s} {s:6.1f} s")
        out(f"warm-up took {total:.1f} s (numba's cache now holds the labs' kernels for this CPU)")
    return seconds, total
