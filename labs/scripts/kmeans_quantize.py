"""Colour quantization of a photograph with distributed K-Means (daal4py's SPMD style).

Launch (from the repository root):
    mpiexec -n 2 python labs/scripts/kmeans_quantize.py --image data/images/hubble_deep_field.jpg --colors 16 --out quantized.png

Every rank runs this same program. Each one loads only its own band of rows
(the domain decomposition), the ranks fit K-Means together (one allreduce per
iteration), each rank assigns its own pixels to the nearest colour with
``maxIterations=0``, and rank 0 gathers the labels and writes the image. It also
runs without mpiexec, as a single rank.
"""

import argparse
import io
import json
import os
import time

import numpy as np

import workshop_lib.d4p as d4p
from workshop_lib.data import check_output_path, load_image, save_image


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="photograph to quantize")
    parser.add_argument("--colors", type=int, default=16, help="number of colours k (default 16)")
    parser.add_argument("--out", default="quantized.png", help="output image (written by rank 0)")
    parser.add_argument("--max-iter", type=int, default=30, help="Lloyd iterations at most (default 30)")
    parser.add_argument("--init", default="plusPlusDense", choices=d4p.INIT_METHODS, help="initialisation")
    parser.add_argument("--seed", type=int, default=777, help="random seed of the initialisation")
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: numba's)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        parser.error(problem)  # on every rank (each parses the same line), before any collective
    return args


MAX_COLORS = 256  # a palette, as PNG's and GIF's


def argument_problem(args):
    """What is wrong with the arguments (checked before the fit, so no rank is left waiting), or None."""
    import numba
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.image) as im:  # reads the header only
            n_pixels = im.size[0] * im.size[1]
    except (FileNotFoundError, IsADirectoryError):
        return f"--image {args.image}: no such file"
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"--image {args.image}: not a readable image ({exc})"
    if not 1 <= args.colors <= min(MAX_COLORS, n_pixels):
        return f"--colors {args.colors} must be between 1 and {min(MAX_COLORS, n_pixels)}"
    if args.max_iter < 0:
        return f"--max-iter {args.max_iter} must be >= 0"
    if args.seed < 0:
        return f"--seed {args.seed} must be >= 0"
    limit = numba.config.NUMBA_NUM_THREADS
    if args.threads is not None and not 1 <= args.threads <= limit:
        return f"--threads {args.threads} must be between 1 and NUMBA_NUM_THREADS={limit}"
    extension = os.path.splitext(args.out)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        return (f"--out {args.out}: {extension or 'no extension'} is not an image format PIL can write; "
                "use .png (lossless), .jpg, .bmp, .tif or .webp")
    try:
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as exc:
        return f"--out {args.out}: {image_format} cannot hold an RGB image ({exc}); use .png or .jpg"
    try:  # a trial write, before the fit: permission bits say nothing of /proc or a full disk
        check_output_path(args.out, (extension,), "--out")
    except ValueError as exc:
        return str(exc)
    return None


def main(argv=None):
    args = parse_args(argv)
    d4p.daalinit(args.threads)
    rank, size = d4p.my_procid(), d4p.num_procs()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    timings = {}

    comm.Barrier()
    t0 = time.perf_counter()
    image = load_image(args.image)  # a JPEG must be decoded whole; each rank keeps only its band
    height, width, _ = image.shape
    start, stop = d4p.row_range(height, rank, size)  # this rank's band: the split of lab 04's exercise
    pixels = np.ascontiguousarray(image[start:stop].reshape(-1, 3), dtype=np.float64)
    del image
    timings["load"] = time.perf_counter() - t0

    comm.Barrier()
    t0 = time.perf_counter()
    init = d4p.kmeans_init(args.colors, method=args.init, engine=d4p.engines_mt19937(seed=args.seed),
                           distributed=True).compute(pixels)
    timings["init"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit = d4p.kmeans(args.colors, args.max_iter, distributed=True, assignFlag=False).compute(pixels, init.centroids)
    timings["lloyd"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Inference as in the slides: maxIterations=0 only assigns each pixel to its nearest centroid.
    assigned = d4p.kmeans(args.colors, 0, distributed=True).compute(pixels, fit.centroids)
    timings["assign"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = assigned.assignments[:, 0].astype(np.int32)
    counts = np.array(comm.allgather(labels.size))
    gathered = np.empty(counts.sum(), dtype=np.int32) if rank == 0 else None
    comm.Gatherv(labels, (gathered, counts) if rank == 0 else None, root=0)
    timings["gather"] = time.perf_counter() - t0

    if rank == 0:
        t0 = time.perf_counter()
        quantized = fit.centroids[gathered].reshape(height, width, 3)
        save_image(args.out, np.clip(quantized, 0.0, 1.0))
        timings["write"] = time.perf_counter() - t0
        iterations = int(fit.nIterations[0, 0])
        report = {
            "ranks": size, "threads_per_rank": d4p.num_threads(), "pixels": height * width, "colors": args.colors,
            "iterations": iterations, "objective": float(assigned.objectiveFunction[0, 0]),
            "seconds": {key: round(value, 4) for key, value in timings.items()},
            "ms_per_iteration": round(1e3 * timings["lloyd"] / (iterations + 1), 2), "out": args.out,
        }
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            print(f"{size} rank(s) x {d4p.num_threads()} thread(s): {height}x{width} pixels -> {args.colors} colours")
            print(f"  {iterations} Lloyd iterations, objective {report['objective']:.4f}")
            for key, value in timings.items():
                print(f"  {key:7s} {value * 1e3:9.1f} ms")
            print(f"  wrote {args.out}", flush=True)
    d4p.daalfini()


if __name__ == "__main__":
    main()
