"""The process runtime a step relies on: numba's and the BLAS's threads, the sliced GEMM, idle policy, allocator.

Mirrors oneDNN's threadpool: one owner of the cores inside a process. No MPI here: :mod:`placement`
decides a rank's share of the cores and calls :func:`set_numba_threads` / :func:`set_blas_threads`;
``Session.run`` and ``d4p.daalinit`` call them too; :mod:`kernels`' GEMMs go through :func:`matmul`.

The one idea: numba's threads and the BLAS's threads need the same cores, and neither gives them back
by itself. After numpy's GEMM, OpenBLAS's workers keep spinning for a while, waiting for the next call;
a numba parallel kernel started then runs beside them at about half its speed. So every public entry
point that runs a numba parallel kernel calls :func:`yield_blas` first: the BLAS's worker threads are
told to stop now (OpenBLAS: they park and are started again by its next multi-threaded call), and
numba's own OpenMP workers sleep, not spin, between parallel loops (:func:`numba_workers_sleep_when_idle`),
so numpy's next GEMM finds the cores free too.

What the user set wins: ``OPENBLAS_NUM_THREADS`` etc. and threadpoolctl's limits (the BLAS is only ever
parked, never given a thread count here outside a step), ``NUMBA_NUM_THREADS``, ``OMP_WAIT_POLICY``,
``WORKSHOP_BLAS_YIELD=0`` (turns the yield off).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import numpy as np

__all__ = ["numba_threads", "set_numba_threads", "blas_threads", "set_blas_threads", "yield_blas", "set_blas_yield",
           "numba_workers_sleep_when_idle", "keep_freed_memory", "op_threads", "matmul"]

# ----------------------------------------------------------------------------------------------
# numba's threads: set here, and only here


def numba_threads() -> int:
    """Threads numba's parallel loops use now in this thread."""
    import numba

    return numba.get_num_threads()


def set_numba_threads(n) -> int:
    """Set numba's thread count (for this thread); the one place the library sets it. Returns the previous count.

    Parameters
    ----------
    n : int
        1 <= n <= ``NUMBA_NUM_THREADS`` (the pool's size, fixed when numba starts).

    Returns
    -------
    int
        The count before.
    """
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"n={n!r} must be an integer between 1 and NUMBA_NUM_THREADS={limit} "
                         "(set NUMBA_NUM_THREADS before Python starts to allow more)")
    numba_workers_sleep_when_idle()
    before = numba.get_num_threads()
    if int(n) != before:
        numba.set_num_threads(int(n))
    return before


def numba_workers_sleep_when_idle():
    """Ask numba's OpenMP workers to sleep, not spin, between parallel loops (before its pool starts).

    GNU OpenMP reads ``OMP_WAIT_POLICY`` once, when numba loads it for its first parallel loop; its
    default spin takes the cores from the BLAS and the GEMM slices that follow and, on a shared CPU,
    from the other programs. The user's own setting, or a pool already started, wins. The variable is
    removed again once the pool has read it: child processes and OpenMP libraries loaded later
    (PyTorch's) see the user's environment.
    """
    if "OMP_WAIT_POLICY" in os.environ or "numba.np.ufunc.omppool" in sys.modules:
        return
    import numba

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        numba.get_num_threads()  # starts the pool: GNU OpenMP reads its environment as it loads
    finally:
        del os.environ["OMP_WAIT_POLICY"]


# ----------------------------------------------------------------------------------------------
# The BLAS's threads

_blas = None  # threadpoolctl's controllers of the BLAS libraries, found once
_parkers = None  # OpenBLAS's "stop your workers now" entry points, found once
_yield_on = os.environ.get("WORKSHOP_BLAS_YIELD", "1") != "0"
_lock = threading.Lock()


def _blas_libraries():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


def blas_threads() -> int | None:
    """Threads the BLAS uses now (the largest over the loaded BLAS libraries; None if none is loaded)."""
    counts = [lib.num_threads for lib in _blas_libraries()]
    return max(counts) if counts else None


def set_blas_threads(n) -> None:
    """Set every loaded BLAS library's thread count (threadpoolctl), as :mod:`placement` and steps do.

    Parameters
    ----------
    n : int
        Threads, >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    for lib in _blas_libraries():
        lib.set_num_threads(int(n))


def _openblas_parkers():
    """``blas_thread_shutdown_`` of each loaded OpenBLAS built with pthreads: it ends the workers at once; the
    next multi-threaded call starts them again (OpenBLAS's own fork handler does the same)."""
    global _parkers
    if _parkers is None:
        found = []
        for lib in _blas_libraries():
            if lib.internal_api != "openblas" or getattr(lib, "threading_layer", "") != "pthreads":
                continue
            try:
                fn = ctypes.CDLL(lib.filepath).blas_thread_shutdown_
            except (OSError, AttributeError):
                continue
            fn.restype, fn.argtypes = ctypes.c_int, []
            found.append(fn)
        _parkers = found
    return _parkers


def set_blas_yield(on) -> bool:
    """Turn :func:`yield_blas` on or off for this process (``WORKSHOP_BLAS_YIELD=0`` starts it off).

    Parameters
    ----------
    on : bool

    Returns
    -------
    bool
        The setting before.
    """
    global _yield_on
    before, _yield_on = _yield_on, bool(on)
    return before


def yield_blas() -> None:
    """Make the BLAS's worker threads give the cores back now, before a numba parallel kernel runs.

    OpenBLAS (pthreads): its idle workers spin for up to ``OPENBLAS_THREAD_TIMEOUT`` after each call; they
    are ended here (a few microseconds when they exist, nothing when they do not) and the BLAS's next
    multi-threaded GEMM starts them again, with the thread count the user or threadpoolctl set. Inside a
    step (:func:`op_threads`) the BLAS is single-threaded already and nothing is done; the same from a
    second Python thread while another may be inside the BLAS. Other BLAS builds (MKL, OpenBLAS with
    OpenMP) are left as they are: their idle policy is the OpenMP runtime's (``KMP_BLOCKTIME``,
    ``OMP_WAIT_POLICY``), which a user sets before Python starts.
    """
    if not _yield_on or _in_steps or threading.current_thread() is not threading.main_thread():
        return
    parkers = _openblas_parkers()
    if parkers and _lock.acquire(blocking=False):
        try:
            for park in parkers:
                park()
        finally:
            _lock.release()


# ----------------------------------------------------------------------------------------------
# The allocator

_ALLOCATOR_TUNED = False


def keep_freed_memory():
    """Ask glibc's malloc to keep freed buffers of up to 32 MB for reuse instead of unmapping them.

    A training step allocates the same large temporaries every time (im2col's columns are 31 MB at batch
    50). By default glibc gives such buffers back to the OS and maps fresh pages for the next step, and
    every first touch of a page is a page fault plus zeroing by the kernel: about a tenth of a step here.
    TensorFlow avoids this with its own allocator (BFC); this is the one-call equivalent. It applies to
    the whole process, on Linux with glibc only; ``WORKSHOP_MALLOC=0`` turns it off. Returns whether it
    was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("WORKSHOP_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MB is the largest mmap threshold glibc accepts on 64-bit; freed memory is trimmed above 1 GB only
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------------------------
# A step's threads and the sliced GEMM

_in_steps = 0  # how many op_threads blocks are open (the BLAS is single-threaded while any is)
_gemm_pool = None  # the threads that run matmul's slices beside the calling thread
_PARTITION_MIN_FLOPS = 1 << 21  # below, one slice: a thread hand-off costs more than it saves
_PARTITION_MIN_ROWS = 32


@contextlib.contextmanager
def op_threads(threads=0):
    """A step's threads: numba (in this thread) runs ``threads``, the BLAS one, and :func:`matmul` splits
    each GEMM over ``threads`` threads (0 keeps this thread's numba count, the rank's placement).

    ``Session.run`` wraps its ops in this with ``ConfigProto.intra_op_parallelism_threads``. One owner of
    the cores: numba's pool and the step's GEMM slices never run at once (ops run one after another on
    each thread), and the BLAS never starts threads of its own that would spin beside them. The previous
    counts come back after.

    Parameters
    ----------
    threads : int
        Threads of the step; 0 keeps the current counts.

    Raises
    ------
    ValueError
        If ``threads`` is not a non-negative int.
    """
    global _in_steps

    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads={threads!r} must be a non-negative int (0 keeps the current counts)")
    numba_workers_sleep_when_idle()
    numba_before, blas_before = numba_threads(), blas_threads()
    if threads:
        set_numba_threads(threads)
    if blas_before is not None and blas_before != 1:
        set_blas_threads(1)
    _in_steps += 1
    try:
        yield
    finally:
        _in_steps -= 1
        set_numba_threads(numba_before)
        if blas_before is not None and blas_before != 1 and not _in_steps:
            set_blas_threads(blas_before)


def matmul(a, b):
    """``a @ b`` for 2-D arrays; inside :func:`op_threads`, split into one slice per thread of the step.

    The slices (rows of ``a``, or columns of ``b`` when ``a`` has few rows) are independent BLAS calls
    on a single-threaded BLAS, joined once: a thread the OS parks for a while (another program on the
    same cores) delays one slice, where a multi-threaded BLAS GEMM waits for it at every block. Outside
    a step, the BLAS's own threads do the work.

    Parameters
    ----------
    a, b : 2-D arrays with ``a.shape[1] == b.shape[0]``

    Returns
    -------
    ndarray
        ``a @ b``.

    Raises
    ------
    ValueError
        If ``a`` and ``b`` are not 2-D arrays whose inner dimensions agree.
    """
    import numba

    global _gemm_pool
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a.shape={getattr(a, 'shape', None)} and b.shape={getattr(b, 'shape', None)} "
                         "must be 2-D with a.shape[1] == b.shape[0]")
    m, n = a.shape[0], b.shape[1]
    parts = numba.get_num_threads() if _in_steps else 1
    by_rows = m >= parts * _PARTITION_MIN_ROWS
    if parts < 2 or 2 * m * n * a.shape[1] < _PARTITION_MIN_FLOPS or not (by_rows or n >= parts * _PARTITION_MIN_ROWS):
        return a @ b
    if _gemm_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _gemm_pool = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1), "workshop-gemm")
    out = np.empty((m, n), dtype=np.result_type(a, b))
    size = m if by_rows else n
    bounds = [size * i // parts for i in range(parts + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    if by_rows:
        jobs = [(a[s], b, out[s]) for s in slices]
    else:
        jobs = [(a, b[:, s], out[:, s]) for s in slices]
    futures = [_gemm_pool.submit(np.matmul, x, y, out=o) for x, y, o in jobs[1:]]
    np.matmul(*jobs[0][:2], out=jobs[0][2])
    for future in futures:
        future.result()
    return out
