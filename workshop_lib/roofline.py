"""The roofline of this CPU: its measured peaks, and every kernel of the labs placed under them.

Mirrors Intel Advisor's roofline. The one idea: a kernel can go no faster than the lower of two roofs, the
arithmetic the cores can do (operations per second) and the bytes memory can deliver times the kernel's
arithmetic intensity (operations per byte it must move at least). Which roof binds says what to optimise:
a compute-bound kernel needs wider vectors or narrower types (int8, bf16), a memory-bound one needs fewer
bytes (fusion, which keeps intermediates in registers).

The peaks are measured by small kernels written for the purpose: a loop of independent accumulators fed by
one instruction (``vfmadd231ps``, ``vpdpbusd``, ``vpdpwssd``, ``vdpbf16ps``) with no memory traffic, at the
widest vector numba's compile target has; the bandwidths by STREAM-style copy and triad over arrays beyond
the last-level cache, and by read sweeps at L1 and L2 sizes. Beside each measured peak, the nominal one
(ISA x clock, where the OS reveals the clock, under a stated assumption of pipes per core).

Shapes: GEMM (M, K) x (K, N); convolutions NHWC x (R, S, C, K), stride 1, SAME; K-Means n points of d
features and k clusters. "ops" are multiplies and adds counted separately (one FMA = 2).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _validate as check

__all__ = ["ROOFS", "compile_target", "vector_isa", "cpu_clock_hz", "nominal_peaks", "measure_compute_peaks",
           "measure_memory", "measure_roofs", "conv_counts", "gemm_counts", "lloyd_counts", "kmeanspp_step_counts",
           "adam_counts", "allreduce_counts", "cnn_ops_per_image", "place", "attainable", "measure_kernels", "report",
           "format_table", "benchmark_roofs", "fraction_line"]

# compute roofs: name -> (instruction, operations per 32-bit lane of one instruction)
ROOFS = {
    "fp32": ("vfmadd231ps", 2),  # one fused multiply-add per float32 lane
    "int8": ("vpdpbusd", 8),  # four u8 x s8 products added into each s32 lane
    "int16": ("vpdpwssd", 4),  # two s16 x s16 products
    "bf16": ("vdpbf16ps", 4),  # two bf16 x bf16 products added into each float32 lane
    "amx_int8": ("tdpbusd", None),
}
_REQUIRES = {"fp32": ("fma",), "int8": ("avx512vnni",), "int16": ("avx512vnni",), "bf16": ("avx512bf16",)}
_ACCUMULATORS = {16: 16, 8: 12}  # independent chains per vector width: > FMA latency x pipes, < registers


def compile_target() -> dict:
    """The CPU numba compiles for: ``{"cpu": name, "features": {feature: bool}}`` as LLVM spells them.

    Honours ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` (then only what they grant counts), else LLVM's view
    of the host, so a peak kernel never uses an instruction that numba would not emit here.

    Returns
    -------
    dict
        ``{"cpu": str, "features": {name: bool}}``.
    """
    import llvmlite.binding as llvm
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):
        granted = (config.CPU_FEATURES or "").split(",")
        return {"cpu": config.CPU_NAME, "features": {f[1:]: f[0] == "+" for f in granted if f[:1] in "+-" and f[1:]}}
    try:
        features = dict(llvm.get_host_cpu_features())
    except Exception:  # noqa: BLE001 - LLVM cannot probe this host: assume nothing
        features = {}
    return {"cpu": llvm.get_host_cpu_name(), "features": features}


def vector_isa(features=None):
    """(name, float32 lanes) of the widest FMA vector in ``features``: ("avx512", 16), ("avx2", 8) or (None, None).

    Parameters
    ----------
    features : dict, optional
        LLVM feature names -> bool; :func:`compile_target`'s by default.

    Returns
    -------
    tuple
    """
    features = compile_target()["features"] if features is None else features
    if features.get("avx512f") and features.get("fma"):
        return "avx512", 16
    if features.get("avx2") and features.get("fma"):
        return "avx2", 8
    return None, None


def _missing(kind, features, lanes):
    """Why the peak kernel of ``kind`` cannot run on this compile target, or None."""
    if kind == "amx_int8":
        return "not on this CPU" if not features.get("amx-int8") else "AMX peak kernel not measured by this version"
    if lanes is None:
        return "not on this CPU (no FMA vectors: neither AVX2+FMA nor AVX-512)"
    need = [f for f in _REQUIRES[kind] if not features.get(f)]
    if kind in ("int8", "int16") and lanes == 8 and features.get("avxvnni"):
        need = []
    if kind == "bf16" and lanes != 16:
        need = need or ["avx512f"]
    return f"not on this CPU (no {', '.join(need)})" if need else None


# ----------------------------------------------------------------------------------------------
# Compute peaks: one instruction on independent accumulators, operands in registers


@functools.lru_cache(maxsize=None)
def _enable_inline_asm():
    """numba's JIT assembles inline assembly only once LLVM's native assembly parser is initialised."""
    import llvmlite.binding as llvm

    try:
        llvm.initialize_native_asmparser()
    except Exception:  # noqa: BLE001 - newer llvmlite initialises itself
        pass


@functools.lru_cache(maxsize=None)
def _peak_intrinsic(kind: str, lanes: int, n_acc: int):
    """An intrinsic ``(iters, buf) -> float64``: ``iters`` x ``n_acc`` independent ``kind`` instructions.

    Two source vectors are loaded once from ``buf`` (so LLVM cannot fold them), each accumulator is updated
    ``iters`` times, and the accumulators' sum is returned so the work is not dead code.
    """
    f32, i32 = ir.FloatType(), ir.IntType(32)
    is_float = kind in ("fp32", "bf16")
    acc_t = ir.VectorType(f32 if is_float else i32, lanes)
    src_t = ir.VectorType(f32 if kind == "fp32" else i32, lanes)

    @intrinsic
    def peak(typingctx, iters, buf):
        sig = types.float64(iters, buf)

        def codegen(context, builder, signature, args):
            buf_arr = context.make_array(signature.args[1])(context, builder, args[1])
            base = builder.bitcast(buf_arr.data, src_t.as_pointer())
            a = builder.load(base, align=1)
            b = builder.load(builder.gep(base, [ir.Constant(ir.IntType(64), 1)]), align=1)
            init = builder.load(builder.bitcast(builder.gep(base, [ir.Constant(ir.IntType(64), 2)]),
                                                acc_t.as_pointer()), align=1)
            if kind == "fp32":
                op = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [acc_t] * 3),
                                                    f"llvm.fma.v{lanes}f32")
                step = lambda acc: builder.call(op, [a, b, acc])  # noqa: E731
            elif kind == "bf16":  # inline assembly: llvmlite's IR has no bfloat vector type for the intrinsic
                _enable_inline_asm()
                asm = ir.InlineAsm(ir.FunctionType(acc_t, [src_t, src_t, acc_t]), "vdpbf16ps $2, $1, $0",
                                   "=v,v,v,0")
                step = lambda acc: builder.call(asm, [a, b, acc])  # noqa: E731
            else:
                name = {"int8": "vpdpbusd", "int16": "vpdpwssd"}[kind]
                op = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [acc_t] * 3),
                                                    f"llvm.x86.avx512.{name}.{lanes * 32}")
                step = lambda acc: builder.call(op, [acc, a, b])  # noqa: E731
            accs = [cgutils.alloca_once_value(builder, init) for _ in range(n_acc)]
            with cgutils.for_range(builder, args[0]):
                for acc in accs:
                    builder.store(step(builder.load(acc)), acc)
            total = builder.load(accs[0])
            for acc in accs[1:]:
                total = (builder.fadd if is_float else builder.add)(total, builder.load(acc))
            first = builder.extract_element(total, ir.Constant(i32, 0))
            return builder.fpext(first, ir.DoubleType()) if is_float else builder.sitofp(first, ir.DoubleType())

        return sig, codegen

    return peak


@functools.lru_cache(maxsize=None)
def _peak_driver(kind: str, lanes: int, n_acc: int):
    peak = _peak_intrinsic(kind, lanes, n_acc)

    @numba.njit(parallel=True, cache=False)
    def run(iters, buf, out):  # OUT out (threads,): one checksum per thread
        for t in numba.prange(out.shape[0]):
            out[t] = peak(iters, buf)

    return run


def _peak_operands(kind, lanes):
    """Three vectors of bytes: two sources and the accumulators' start, with values that never reach denormals."""
    if kind == "fp32":
        return np.array([0.5] * lanes + [1e-6] * lanes + [1.0] * lanes, dtype=np.float32).view(np.uint8).copy()
    if kind == "bf16":  # bf16 1/128 in both halves of each 32-bit lane; float32 1.0 in the accumulators
        src = np.full(2 * lanes, 0x3C00, dtype=np.uint16).view(np.uint32)
        return np.concatenate([src, src, np.full(lanes, np.float32(1.0)).view(np.uint32)]).view(np.uint8).copy()
    return np.random.default_rng(0).integers(0, 100, 3 * lanes, dtype=np.int32).view(np.uint8).copy()


def _threads(threads):
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    most = min(numba.config.NUMBA_NUM_THREADS, usable)
    if threads is None:
        return most
    return check.integer(threads, "threads", 1, most)


def _timed_runs(call, iters_for, duration):
    """Best ops/s of ``call(iters)`` over short runs filling ``duration`` seconds (at least 3 runs).

    Runs are short (about a tenth of ``duration``, at least 2^18 iterations, so that waking the threads is
    negligible) and the fastest counts: on a shared machine another process only ever takes cycles away,
    so the least disturbed run is the closest to the hardware.
    """
    call(1024)  # compile and warm up
    per_iter = float("inf")
    for iters in (1 << 12, 1 << 14, 1 << 16):  # the cost of one iteration, as undisturbed as seen
        t0 = time.perf_counter()
        call(iters)
        per_iter = min(per_iter, (time.perf_counter() - t0) / iters)
    iters = max(1 << 18, int(max(duration / 10, 1e-3) / per_iter))
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < duration:
        t0 = time.perf_counter()
        call(iters)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return iters_for(iters) / best


def _with_threads(threads, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def measure_compute_peaks(duration=0.3, threads=None, kinds=None):
    """Measured peak operations per second of each compute roof, on one core and on all usable cores.

    Parameters
    ----------
    duration : float, > 0
        Seconds of measurement per roof and core count, roughly (tests use 0.01).
    threads : int, optional
        "All cores": numba threads to use; the usable cores (capped by ``NUMBA_NUM_THREADS``) by default.
    kinds : sequence of str, optional
        Which of :data:`ROOFS` to measure; all by default.

    Returns
    -------
    dict
        ``{kind: {"instruction", "vector_bits", "ops_per_instruction", "one_core", "all_cores", "threads"}}``
        in ops/s, or ``{kind: {"instruction", "missing": reason}}`` where the compile target lacks it.
    """
    duration = check.real(duration, "duration", 0, low_open=True)
    threads = _threads(threads)
    kinds = list(ROOFS) if kinds is None else [check.option(k, "kinds", tuple(ROOFS)) for k in kinds]
    features = compile_target()["features"]
    _, lanes = vector_isa(features)
    result = {}
    for kind in kinds:
        instruction, per_lane = ROOFS[kind]
        why = _missing(kind, features, lanes)
        if why:
            result[kind] = {"instruction": instruction, "missing": why}
            continue
        n_acc = _ACCUMULATORS[lanes]
        run = _peak_driver(kind, lanes, n_acc)
        buf = _peak_operands(kind, lanes)
        per_iter = n_acc * lanes * per_lane
        row = {"instruction": instruction, "vector_bits": 32 * lanes, "ops_per_instruction": lanes * per_lane,
               "threads": threads}
        for label, n in (("one_core", 1), ("all_cores", threads)):
            out = np.zeros(n)
            row[label] = _with_threads(n, lambda: _timed_runs(lambda it: run(np.int64(it), buf, out),
                                                               lambda it: it * per_iter * n, duration))
        result[kind] = row
    return result


def cpu_clock_hz():
    """(Hz, where it was read) of the cores' highest clock the OS reveals, or (None, why not).

    Returns
    -------
    tuple
        ``(float or None, str)``.
    """
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(path.read_text()) * 1000.0, str(path)
    except (OSError, ValueError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    if match and float(match.group(1)) > 0:
        return float(match.group(1)) * 1e6, "/proc/cpuinfo 'cpu MHz' (a virtual machine's is its base clock)"
    if sys.platform == "darwin":
        import subprocess

        try:
            hz = subprocess.run(["sysctl", "-n", "hw.cpufrequency_max"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
            if hz.isdigit():
                return float(hz), "sysctl hw.cpufrequency_max"
        except (OSError, subprocess.SubprocessError):
            pass
    return None, "the OS does not reveal the clock"


def _vector_pipes(features, lanes):
    """(pipes per core issuing one full-width vector instruction per cycle, the assumption in words)."""
    model = ""
    try:
        model = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    amd = "AuthenticAMD" in model
    if lanes == 16 and amd:
        return 1, "1 x 512-bit per cycle (AMD Zen 4 runs AVX-512 on two 256-bit pipes)"
    if lanes == 16:
        return 2, "2 x 512-bit per cycle (Xeon Scalable with two FMA units; some SKUs have one)"
    return 2, "2 x 256-bit per cycle (AVX2-era cores)"


def nominal_peaks(features=None, cores=None):
    """Nominal ops/s per roof from the ISA and the clock: lanes x ops per lane x pipes x clock (x cores).

    Parameters
    ----------
    features : dict, optional
        LLVM feature names -> bool; :func:`compile_target`'s by default.
    cores : int, optional
        Cores for "all cores"; the usable ones by default.

    Returns
    -------
    dict
        ``{"clock_hz", "clock_source", "assumption", kind: {"one_core", "all_cores"} or None}``.
    """
    features = compile_target()["features"] if features is None else features
    cores = _threads(cores)
    hz, source = cpu_clock_hz()
    _, lanes = vector_isa(features)
    result = {"clock_hz": hz, "clock_source": source, "assumption": None}
    if lanes is None or hz is None:
        return result
    pipes, words = _vector_pipes(features, lanes)
    result["assumption"] = words + "; integer and bf16 dot products on the same pipes"
    for kind, (_, per_lane) in ROOFS.items():
        if per_lane is None or _missing(kind, features, lanes):
            continue
        one = lanes * per_lane * pipes * hz
        result[kind] = {"one_core": one, "all_cores": one * cores}
    return result


# ----------------------------------------------------------------------------------------------
# Memory and cache bandwidth


@numba.njit(parallel=True, cache=True)
def _stream_copy(a, b):  # IN a; OUT b
    for i in numba.prange(a.shape[0]):
        b[i] = a[i]


@numba.njit(parallel=True, cache=True)
def _stream_triad(a, b, c, s):  # IN b, c; OUT a = b + s * c
    for i in numba.prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@numba.njit(parallel=True, fastmath=True, cache=True)
def _read_sweeps(bufs, sweeps, out):  # IN bufs (threads, n) float32; OUT out (threads,)
    for t in numba.prange(bufs.shape[0]):
        total = np.float32(0.0)
        for _ in range(sweeps):
            for i in range(bufs.shape[1]):
                total += bufs[t, i]
        out[t] = total


def _cache_bytes():
    """{level: bytes} of the data caches of cpu0, as Linux's sysfs reports them (empty elsewhere)."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes[level] = int(text.rstrip("KMG")) * unit
    return sizes


def _best_bandwidth(call, nbytes, repeats):
    return nbytes / _best_time(call, repeats)


def measure_memory(nbytes=None, threads=None, repeats=5, cache_sweeps=None):
    """STREAM copy and triad bandwidth (bytes/s) beyond the last-level cache, and L1/L2 read bandwidth.

    Bytes are counted as STREAM counts them: copy moves 2 x 8 bytes per element, triad 3 x 8 (no
    write-allocate traffic).

    Parameters
    ----------
    nbytes : int, optional
        Bytes of each float64 array; by default 4x the last-level cache, kept within 64 MiB .. 256 MiB (a shared machine's memory).
    threads : int, optional
        Numba threads for "all cores" (the usable cores by default).
    repeats : int
        Best of this many runs.
    cache_sweeps : int, optional
        Sweeps over each cache-sized buffer (tests pass a small number).

    Returns
    -------
    dict
        ``{"copy": {"one_core", "all_cores"}, "triad": {...}, "L1": {...}, "L2": {...}, "array_bytes",
        "llc_bytes", "threads"}``; a cache level the OS does not report is absent.
    """
    threads = _threads(threads)
    repeats = check.integer(repeats, "repeats", 1)
    caches = _cache_bytes()
    llc = max(caches.values()) if caches else None
    if nbytes is None:
        nbytes = min(256 << 20, max(64 << 20, 4 * (llc or 0)))
    nbytes = check.integer(nbytes, "nbytes", 4096)
    n = nbytes // 8
    a, b, c = np.ones(n), np.full(n, 2.0), np.full(n, 0.5)
    result = {"array_bytes": n * 8, "llc_bytes": llc, "threads": threads}
    for name, call, moved in (("copy", lambda: _stream_copy(a, b), 16 * n),
                              ("triad", lambda: _stream_triad(a, b, c, 3.0), 24 * n)):
        result[name] = {label: _with_threads(k, lambda: _best_bandwidth(call, moved, repeats))
                        for label, k in (("one_core", 1), ("all_cores", threads))}
    for level in (1, 2):
        if level not in caches:
            continue
        elems = caches[level] // 2 // 4  # half the cache, so the sweep stays resident
        sweeps = cache_sweeps or max(1, int(2e8 // (elems * 4)))
        row = {}
        for label, k in (("one_core", 1), ("all_cores", threads)):
            bufs, out = np.ones((k, elems), dtype=np.float32), np.zeros(k, dtype=np.float32)
            row[label] = _with_threads(k, lambda: _best_bandwidth(lambda: _read_sweeps(bufs, sweeps, out),
                                                                   k * elems * 4 * sweeps, repeats))
        result[f"L{level}"] = row
    return result


def measure_roofs(duration=0.3, threads=None, memory_bytes=None, cache_sweeps=None):
    """Every roof of this CPU: compute peaks (measured and nominal) and bandwidths, with the CPU they came from.

    Parameters
    ----------
    duration : float
        Seconds per compute roof and core count, roughly.
    threads : int, optional
        Numba threads for "all cores".
    memory_bytes, cache_sweeps : optional
        Passed to :func:`measure_memory` (tests make them small).

    Returns
    -------
    dict
        ``{"cpu", "compile_target", "vector", "threads", "load", "compute", "nominal", "memory"}`` (``load``: the
        1, 5 and 15 minute load averages when measured, or None).
    """
    from .sysinfo import cpu_model

    target = compile_target()
    isa, lanes = vector_isa(target["features"])
    threads = _threads(threads)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "compile_target": target["cpu"], "vector": isa, "threads": threads, "load": load,
            "compute": measure_compute_peaks(duration, threads),
            "nominal": nominal_peaks(target["features"], threads),
            "memory": measure_memory(memory_bytes, threads, cache_sweeps=cache_sweeps)}


# ----------------------------------------------------------------------------------------------
# Arithmetic intensity from shapes: operations and the bytes a kernel must move at least


def gemm_counts(m, k, n, in_bytes=4, out_bytes=4, weight_bytes=None):
    """(ops, bytes) of C (M, N) = A (M, K) B (K, N): 2MNK ops; A, B read once and C written once.

    Parameters
    ----------
    m, k, n : int
        The GEMM's shape.
    in_bytes, out_bytes, weight_bytes : int
        Bytes per element of A, C and B (B: ``in_bytes`` by default).

    Returns
    -------
    tuple
        ``(ops, bytes)``.
    """
    m, k, n = (check.integer(v, name, 1) for v, name in ((m, "m"), (k, "k"), (n, "n")))
    weight_bytes = in_bytes if weight_bytes is None else weight_bytes
    return 2 * m * n * k, m * k * in_bytes + k * n * weight_bytes + m * n * out_bytes


def conv_counts(n, h, w, c, r, s, k, direction="forward", in_bytes=4, out_bytes=4):
    """(ops, bytes) of a stride-1 SAME convolution of x (N, H, W, C) with w (R, S, C, K).

    All three directions do 2 N H W K R S C ops. Bytes: ``forward`` reads x, w and writes y;
    ``backward_data`` reads dy, w and writes dx; ``backward_weights`` reads x, dy and writes dw.

    Parameters
    ----------
    n, h, w, c, r, s, k : int
        Batch, input height, width, channels; filter height, width; output channels.
    direction : {"forward", "backward_data", "backward_weights"}
    in_bytes, out_bytes : int
        Bytes per element read and written.

    Returns
    -------
    tuple
        ``(ops, bytes)``.
    """
    dims = [check.integer(v, name, 1) for v, name in zip((n, h, w, c, r, s, k), "nhwcrsk")]
    n, h, w, c, r, s, k = dims
    check.option(direction, "direction", ("forward", "backward_data", "backward_weights"))
    image, weights, output = n * h * w * c, r * s * c * k, n * h * w * k
    moved = {"forward": image * in_bytes + weights * in_bytes + output * out_bytes,
             "backward_data": output * in_bytes + weights * in_bytes + image * out_bytes,
             "backward_weights": image * in_bytes + output * in_bytes + weights * out_bytes}[direction]
    return 2 * n * h * w * k * r * s * c, moved


def lloyd_counts(n, d, k, itemsize=8):
    """(ops, bytes) of one Lloyd pass: 2nkd for the n x k distances (a dot product each), nd for the
    per-cluster sums; the points read once, the k centroids read and the new ones written.

    Parameters
    ----------
    n, d, k : int
        Points, features, clusters.
    itemsize : int
        Bytes per value (8: float64).

    Returns
    -------
    tuple
        ``(ops, bytes)``.
    """
    n, d, k = (check.integer(v, name, 1) for v, name in ((n, "n"), (d, "d"), (k, "k")))
    return 2 * n * k * d + n * d, (n * d + 2 * k * d) * itemsize


def kmeanspp_step_counts(n, d, itemsize=8):
    """(ops, bytes) of one k-means++ step: each point's squared distance to the new centroid (3d ops: subtract,
    multiply, add) and the minimum with its old D^2 (1); the points read once, D^2 (float64) read and written.

    Parameters
    ----------
    n, d : int
        Points, features.
    itemsize : int
        Bytes per value of the points.

    Returns
    -------
    tuple
        ``(ops, bytes)``.
    """
    n, d = check.integer(n, "n", 1), check.integer(d, "d", 1)
    return 3 * n * d + n, n * d * itemsize + 2 * n * 8


def adam_counts(size, itemsize=4):
    """(ops, bytes) of Adam's update of ``size`` values: 12 ops each (m: 3, v: 4, w: sqrt, add, divide, multiply,
    subtract); w, g, m, v read and w, m, v written.

    Parameters
    ----------
    size : int
        Values updated.
    itemsize : int
        Bytes per value (4: float32).

    Returns
    -------
    tuple
        ``(ops, bytes)``.
    """
    size = check.integer(size, "size", 1)
    return 12 * size, 7 * size * itemsize


def allreduce_counts(nbytes, ranks):
    """Bytes each rank must send (and receive) in a ring allreduce of ``nbytes``: 2 (p - 1) / p x nbytes.

    Parameters
    ----------
    nbytes : int
        Size of the buffer reduced.
    ranks : int

    Returns
    -------
    int
    """
    nbytes, ranks = check.integer(nbytes, "nbytes", 1), check.integer(ranks, "ranks", 1)
    return 2 * (ranks - 1) * nbytes // ranks


# ----------------------------------------------------------------------------------------------
# Placing kernels under the roofs


def _peak(roofs, roof, threads="all_cores"):
    """The roof for ``threads``; all cores can do at least what one core did (a loaded machine can hide that)."""
    row = roofs["compute"].get(roof, {})
    if threads == "all_cores" and "one_core" in row:
        return max(row["one_core"], row["all_cores"])
    return row.get(threads)


def _bandwidth(roofs, kind, threads):
    row = roofs["memory"][kind]
    return max(row["one_core"], row["all_cores"]) if threads == "all_cores" else row[threads]


def attainable(roofs, roof, intensity, threads="all_cores"):
    """(ops/s the roofline allows at ``intensity`` ops/byte on the ``roof`` compute peak, "compute" or "memory").

    Parameters
    ----------
    roofs : dict
        From :func:`measure_roofs`.
    roof : str
        A compute roof of :data:`ROOFS`.
    intensity : float
        Operations per byte.
    threads : {"all_cores", "one_core"}

    Returns
    -------
    tuple
    """
    peak = _peak(roofs, roof, threads)
    if peak is None:
        raise ValueError(f"roof={roof!r} was not measured on this CPU: {roofs['compute'].get(roof)}")
    memory = intensity * _bandwidth(roofs, "triad", threads)
    return (peak, "compute") if peak <= memory else (memory, "memory")


def place(roofs, name, roof, ops, nbytes, seconds, threads="all_cores"):
    """One kernel on the roofline: its intensity, achieved rate and the fraction of the roof that binds it.

    Parameters
    ----------
    roofs : dict
        From :func:`measure_roofs`.
    name : str
    roof : str
        The compute roof of its arithmetic (``"fp32"``, ``"int8"``...), or ``"memory"`` for a data mover
        (an allreduce), placed by bytes/s against the memory-copy bandwidth.
    ops, nbytes : int
        Operations and the least bytes it must move (``ops`` is ignored for ``"memory"``).
    seconds : float
        Its measured time.

    Returns
    -------
    dict
        ``{"name", "roof", "ops", "bytes", "seconds", "intensity", "rate", "bound", "attainable", "fraction"}``.
    """
    seconds = check.real(seconds, "seconds", 0, low_open=True)
    if roof == "memory":
        rate = nbytes / seconds
        ceiling = _bandwidth(roofs, "copy", threads)
        return {"name": name, "roof": roof, "ops": None, "bytes": int(nbytes), "seconds": seconds, "intensity": None,
                "rate": rate, "bound": "memory", "attainable": ceiling, "fraction": rate / ceiling}
    intensity = ops / nbytes
    ceiling, bound = attainable(roofs, roof, intensity, threads)
    rate = ops / seconds
    return {"name": name, "roof": roof, "ops": int(ops), "bytes": int(nbytes), "seconds": seconds,
            "intensity": intensity, "rate": rate, "bound": bound, "attainable": ceiling, "fraction": rate / ceiling}


def _best_time(fn, repeats=3):
    """The minimum of ``repeats`` timed calls after one warm-up: workshop_lib.bench.best_time's method (bench
    sits above this layer, so a caller may pass its own timer to :func:`measure_kernels`)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


CNN_BATCH = 50  # the labs' training batch
INT8_BATCH = 256  # the labs' int8 inference batch


def _cnn_kernels(rng, batch):
    from . import kernels

    out = []
    for name, (h, c, k) in (("conv1", (28, 1, 32)), ("conv2", (14, 32, 64))):
        x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
        w = rng.standard_normal((5, 5, c, k), dtype=np.float32) * 0.1
        dy = rng.standard_normal((batch, h, h, k), dtype=np.float32)
        cache = kernels.conv2d_forward(x, w, 1, "SAME", algorithm="jit")[1]
        shape = (batch, h, h, c, 5, 5, k)
        out.append((f"{name} forward", "fp32", conv_counts(*shape, "forward"),
                    lambda x=x, w=w: kernels.conv2d_forward(x, w, 1, "SAME", algorithm="jit")))
        if name != "conv1":  # the first layer's dx is never needed
            out.append((f"{name} backward-data", "fp32", conv_counts(*shape, "backward_data"),
                        lambda dy=dy, cache=cache: kernels.conv2d_backward(dy, cache, need_dw=False, algorithm="jit")))
        out.append((f"{name} backward-weights", "fp32", conv_counts(*shape, "backward_weights"),
                    lambda dy=dy, cache=cache: kernels.conv2d_backward(dy, cache, need_dx=False)))
    fx, fw = rng.standard_normal((batch, 3136), dtype=np.float32), rng.standard_normal((3136, 1024), dtype=np.float32)
    fdy, fw2 = rng.standard_normal((batch, 1024), dtype=np.float32), rng.standard_normal((1024, 10), dtype=np.float32)
    out += [("fc1 forward", "fp32", gemm_counts(batch, 3136, 1024), lambda: kernels.gemm_forward(fx, fw)),
            ("fc1 backward-data", "fp32", gemm_counts(batch, 1024, 3136),  # dy w^T, as the engine calls it
             lambda: kernels.gemm_forward(fdy, fw, trans_b=True)),
            ("fc1 backward-weights", "fp32", gemm_counts(3136, batch, 1024),  # x^T dy
             lambda: kernels.gemm_forward(fx, fdy, trans_a=True)),
            ("fc2 forward", "fp32", gemm_counts(batch, 1024, 10), lambda: kernels.gemm_forward(fdy, fw2))]
    size = 3136 * 1024
    aw, ag, am, av = (rng.standard_normal(size, dtype=np.float32) for _ in range(4))
    av = np.abs(av)
    out.append(("Adam update (fc1/w)", "fp32", adam_counts(size), lambda: kernels.adam_update(aw, ag, am, av, 1e-4)))
    return out


def _int8_kernels(rng, batch):
    from . import int8

    if int8.vnni_isa() is None:
        return []
    out = []
    for m, kk, n in ((64, 3136, 1024), (1024, 1024, 1024)):
        a = rng.integers(0, 256, (m, kk), dtype=np.uint8)
        b = rng.integers(-128, 128, (kk, n), dtype=np.int8)
        packed = int8.pack_weights(b)  # packed once, as inference does
        out.append((f"int8 GEMM {m}x{kk}x{n}", "int8", gemm_counts(m, kk, n, 1, 4, 1),
                    lambda a=a, packed=packed: int8.gemm_u8s8s32(a, packed)))
    for name, (h, c, k) in (("conv1", (28, 1, 32)), ("conv2", (14, 32, 64))):
        x = rng.integers(0, 256, (batch, h, h, c), dtype=np.uint8)
        wq = int8.pack_fused_weights(rng.integers(-128, 128, (5, 5, c, k), dtype=np.int8))
        bias = rng.integers(-1000, 1000, k).astype(np.int32)
        ops, moved = conv_counts(batch, h, h, c, 5, 5, k, "forward", in_bytes=1, out_bytes=1)
        moved -= batch * h * h * k * 3 // 4  # the 2x2 max-pool writes a quarter of the outputs
        out.append((f"int8 fused {name} (+bias, ReLU, requantize, pool)", "int8", (ops, moved),
                    lambda x=x, wq=wq, bias=bias: int8.conv2d_u8s8u8_fused(x, wq, bias, 1e-3, pool=2)))
    a = rng.integers(0, 256, (batch, 3136), dtype=np.uint8)
    wq = int8.pack_fused_weights(rng.integers(-128, 128, (3136, 1024), dtype=np.int8))
    bias = rng.integers(-1000, 1000, 1024).astype(np.int32)
    out.append(("int8 fused fc1 (+bias, ReLU, requantize)", "int8", gemm_counts(batch, 3136, 1024, 1, 1, 1),
                lambda: int8.gemm_u8s8u8_fused(a, wq, bias, 1e-3)))
    return out


def measure_kernels(roofs, timer=None, batch=CNN_BATCH, int8_batch=INT8_BATCH, seed=0):
    """Place the labs' kernels of this layer on ``roofs``: the CNN's convolutions (forward, backward-data,
    backward-weights) and FC GEMMs at ``batch``, Adam's update, the int8 GEMMs and fused int8 layers.

    Parameters
    ----------
    roofs : dict
        From :func:`measure_roofs`.
    timer : callable, optional
        ``timer(fn) -> seconds``; by default the best of 3 calls after a warm-up (bench's method).
    batch, int8_batch : int
        Batch sizes of the fp32 training kernels and of the int8 inference layers (tests make them small).
    seed : int

    Returns
    -------
    list of dict
        One :func:`place` row per kernel.
    """
    timer = timer or _best_time
    batch = check.integer(batch, "batch", 1)
    int8_batch = check.integer(int8_batch, "int8_batch", 1)
    rng = np.random.default_rng(seed)
    rows = []
    for name, roof, (ops, moved), fn in _cnn_kernels(rng, batch) + _int8_kernels(rng, int8_batch):
        if _peak(roofs, roof) is None:
            continue
        rows.append(place(roofs, name, roof, ops, moved, timer(fn)))
    return rows


def report(duration=0.3, timer=None, extra=(), **measure):
    """Roofs and placed kernels as one JSON-able dict: ``measure_roofs(...)`` plus ``"kernels"``.

    Parameters
    ----------
    duration : float
        Seconds per compute roof and core count.
    timer : callable, optional
        See :func:`measure_kernels`.
    extra : sequence of dict
        Rows built with :func:`place` by layers above this one (K-Means, allreduce).
    **measure
        ``threads``, ``memory_bytes``, ``cache_sweeps`` (for :func:`measure_roofs`), ``batch``, ``int8_batch``
        (for :func:`measure_kernels`).

    Returns
    -------
    dict
    """
    roofs = measure_roofs(duration, **{k: measure[k] for k in ("threads", "memory_bytes", "cache_sweeps")
                                       if k in measure})
    kernel_args = {k: measure[k] for k in ("batch", "int8_batch") if k in measure}
    roofs["kernels"] = measure_kernels(roofs, timer, **kernel_args) + list(extra)
    return roofs


def _si(value, unit):
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:,.1f} {prefix}{unit}"
    return f"{value:,.1f} {unit}"


def format_table(result):
    """The roofs and the "% of the roof that binds it" table as text.

    Parameters
    ----------
    result : dict
        From :func:`report` or :func:`measure_roofs`.

    Returns
    -------
    str
    """
    lines = [f"Roofline of {result['cpu']} (numba target {result['compile_target']}, {result['vector']} vectors, "
             f"{result['threads']} thread(s))", "", f"{'roof':10s} {'instruction':12s} {'one core':>14s} "
             f"{'all cores':>14s} {'nominal (all)':>14s}"]
    nominal = result["nominal"]
    for kind, row in result["compute"].items():
        if "missing" in row:
            lines.append(f"{kind:10s} {row['instruction']:12s} {row['missing']}")
            continue
        nom = nominal.get(kind) or {}
        lines.append(f"{kind:10s} {row['instruction']:12s} {_si(row['one_core'], 'op/s'):>14s} "
                     f"{_si(row['all_cores'], 'op/s'):>14s} {_si(nom.get('all_cores'), 'op/s'):>14s}")
    clock = nominal["clock_hz"]
    lines.append(f"nominal: clock {clock / 1e9:.2f} GHz from {nominal['clock_source']}; {nominal['assumption']}"
                 if clock and nominal["assumption"] else f"nominal: none ({nominal['clock_source']})")
    mem = result["memory"]
    for name in ("copy", "triad", "L1", "L2"):
        if name in mem:
            lines.append(f"{name:10s} {'bandwidth':12s} {_si(mem[name]['one_core'], 'B/s'):>14s} "
                         f"{_si(mem[name]['all_cores'], 'B/s'):>14s}")
    llc = mem["llc_bytes"]
    lines.append(f"STREAM arrays of {mem['array_bytes'] / 2**20:.0f} MiB each"
                 + (f" (last-level cache {llc / 2**20:.0f} MiB)" if llc else " (last-level cache size unknown)"))
    if result.get("kernels"):
        lines += ["", f"{'kernel':52s} {'roof':6s} {'ops/byte':>9s} {'achieved':>14s} {'bound':8s} {'% of roof':>9s}"]
        for row in result["kernels"]:
            intensity = "-" if row["intensity"] is None else f"{row['intensity']:.2f}"
            unit = "B/s" if row["roof"] == "memory" else "op/s"
            lines.append(f"{row['name'][:52]:52s} {row['roof']:6s} {intensity:>9s} {_si(row['rate'], unit):>14s} "
                         f"{row['bound']:8s} {100 * row['fraction']:8.1f}%")
        lines.append("roofs on all cores: the larger of the one-core and all-core measurements; slanted roof: triad")
        above = [row["name"] for row in result["kernels"] if row["fraction"] > 1.05]
        if above:
            load = result.get("load")
            lines.append(f"WARNING: {len(above)} kernel(s) ran above their roof ({', '.join(above[:3])}...): the roofs were "
                         f"measured while other programs held the cores (load average {load[0]:.1f} on "
                         f"{result['threads']} threads); rerun on a quiet machine" if load else
                         f"WARNING: {len(above)} kernel(s) ran above their roof: rerun on a quiet machine")
        if any(row["roof"] == "memory" for row in result["kernels"]):
            lines.append("memory rows: bytes each rank must send per second (a ring moves 2(p-1)/p bytes per byte "
                         "reduced) against the copy bandwidth")
    return "\n".join(lines)


def benchmark_roofs(kinds=("fp32",), memory=False, threads=None, duration=0.2):
    """The roofs a benchmark needs, measured quickly in its own run: ``{"compute": ..., "memory": ... or None}``.

    Parameters
    ----------
    kinds : sequence of str
        Compute roofs to measure.
    memory : bool
        Also measure the memory bandwidths.
    threads : int, optional
        The benchmark's own thread count, capped at the usable cores.
    duration : float

    Returns
    -------
    dict
    """
    threads = None if threads is None else min(_threads(None), check.integer(threads, "threads", 1))
    return {"compute": measure_compute_peaks(duration, threads, kinds),
            "memory": measure_memory(threads=threads, repeats=3) if memory else None}


def fraction_line(label, ops, seconds, roofs, roof="fp32", nbytes=None):
    """One line for a benchmark: ``label``'s achieved rate and its fraction of the measured roof that binds it.

    Parameters
    ----------
    label : str
    ops : int or None
        Operations done in ``seconds`` (None for a data mover, ``roof="memory"``).
    seconds : float
    roofs : dict
        From :func:`benchmark_roofs` or :func:`measure_roofs`.
    roof : str
        The compute roof (``"fp32"``, ``"int8"``...) or ``"memory"``.
    nbytes : int, optional
        The least bytes moved; with it the memory roof is considered too (``roofs`` must hold ``memory``).

    Returns
    -------
    str
    """
    if roof != "memory" and "missing" in roofs["compute"][roof]:
        return f"{label}: no {roof} roof on this CPU ({roofs['compute'][roof]['missing']})"
    if nbytes is None:
        peak = _peak(roofs, roof)
        rate = ops / seconds
        return f"{label}: {_si(rate, 'op/s')} = {100 * rate / peak:.1f}% of the measured {roof} peak ({_si(peak, 'op/s')})"
    row = place(roofs, label, roof, ops, nbytes, seconds)
    unit = "B/s" if roof == "memory" else "op/s"
    return (f"{label}: {_si(row['rate'], unit)} = {100 * row['fraction']:.1f}% of the {row['bound']} roof that binds "
            f"it ({_si(row['attainable'], unit)})")


def cnn_ops_per_image(mode="train"):
    """Operations per image of the labs' CNN (conv 5x5x1x32, conv 5x5x32x64, FC 3136x1024, FC 1024x10; SAME,
    2x2 pools): forward 27,767,808; training adds backward-data (not for conv1) and backward-weights.

    Parameters
    ----------
    mode : {"train", "inference"}

    Returns
    -------
    int
    """
    check.option(mode, "mode", ("train", "inference"))
    convs = [conv_counts(1, 28, 28, 1, 5, 5, 32)[0], conv_counts(1, 14, 14, 32, 5, 5, 64)[0]]
    fcs = [gemm_counts(1, 3136, 1024)[0], gemm_counts(1, 1024, 10)[0]]
    forward = sum(convs) + sum(fcs)
    if mode == "inference":
        return forward
    return forward + convs[0] + 2 * convs[1] + 2 * sum(fcs)
