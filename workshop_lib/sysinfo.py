"""What this machine offers the labs: CPU features, cores, numba threads, MPI.

Mirrors ``lscpu`` and ``numba -s``. The one idea: every speed-up in this course
depends on what the CPU can do (AVX-512, VNNI, AMX) and on how work is spread
over cores (threads) and processes (MPI ranks), so we read it off the machine
instead of assuming it. Also home of the ``mpiexec`` helpers: we always call the
``mpiexec`` installed next to this Python, so a learner's other MPI is never
mixed with the libmpi that mpi4py was built against.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__all__ = [
    "FEATURES",
    "cpu_model",
    "ARM_FEATURES",
    "cpu_features",
    "os_features",
    "compile_target",
    "target_features",
    "target_has",
    "amx_status",
    "core_counts",
    "numba_info",
    "data_status",
    "mpi_library_version",
    "package_versions",
    "mpiexec_path",
    "mpiexec_command",
    "run_mpi",
    "mpi_cluster",
    "shm_bytes",
    "cgroup_cpu_quota",
    "report",
    "format_report",
    "problems",
]

# Our name -> (name in /proc/cpuinfo flags, name in LLVM's host features, macOS sysctl name)
FEATURES = {
    "sse4_2": ("sse4_2", "sse4.2", "SSE4.2"),
    "avx2": ("avx2", "avx2", "AVX2"),
    "fma": ("fma", "fma", "FMA"),
    "avx512f": ("avx512f", "avx512f", "AVX512F"),
    "avx512bw": ("avx512bw", "avx512bw", "AVX512BW"),
    "avx512_vnni": ("avx512_vnni", "avx512vnni", "AVX512VNNI"),
    "avx_vnni": ("avx_vnni", "avxvnni", "AVXVNNI"),
    "avx512_bf16": ("avx512_bf16", "avx512bf16", "AVX512BF16"),
    "amx_tile": ("amx_tile", "amx-tile", "AMX_TILE"),
    "amx_int8": ("amx_int8", "amx-int8", "AMX_INT8"),
}

# The same for aarch64: (name in /proc/cpuinfo "Features", LLVM's name, macOS sysctl hw.optional.arm.NAME).
# Linux's own answer comes from the auxiliary vector (AT_HWCAP / AT_HWCAP2), which QEMU's user mode emulates
# while its /proc/cpuinfo still shows the host's x86 flags.
ARM_FEATURES = {
    "asimd": ("asimd", "neon", "AdvSIMD"),
    "dotprod": ("asimddp", "dotprod", "FEAT_DotProd"),
    "i8mm": ("i8mm", "i8mm", "FEAT_I8MM"),
    "bf16": ("bf16", "bf16", "FEAT_BF16"),
    "sve": ("sve", "sve", "FEAT_SVE"),
    "sme": ("sme", "sme", "FEAT_SME"),
}
# Linux's arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h): (AT_HWCAP or AT_HWCAP2, bit)
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM_HWCAP = {"asimd": (_AT_HWCAP, 1), "dotprod": (_AT_HWCAP, 20), "sve": (_AT_HWCAP, 22),
              "i8mm": (_AT_HWCAP2, 13), "bf16": (_AT_HWCAP2, 14), "sme": (_AT_HWCAP2, 23)}

# Linux's x86-64 arch_prctl: a process must ask for the AMX tile state (XTILEDATA) before its first tile
# instruction, or the kernel kills it with SIGILL (Linux >= 5.16; see Documentation/arch/x86/xstate.rst)
_SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's marketing name, or the best substitute the OS offers."""
    match = re.search(r"^model name\s*:\s*(.+)$", _proc_cpuinfo(), re.M)
    if match:
        return match.group(1).strip()
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.processor()
    return platform.processor() or platform.machine()


def _llvm_features() -> dict:
    try:
        import llvmlite.binding as llvm

        try:
            llvm.initialize_native_target()
        except Exception:  # noqa: BLE001 - newer llvmlite initialises itself
            pass
        text = llvm.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001 - llvmlite missing or unable to probe: fall back
        return {}
    return {item[1:]: item[0] == "+" for item in text.split(",") if item}


def _machine() -> str:
    """The CPU architecture this Python runs on, in LLVM's spelling (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def _feature_table() -> dict:
    return ARM_FEATURES if _machine() == "aarch64" else FEATURES


def _hwcaps():
    """``(AT_HWCAP, AT_HWCAP2)`` from Linux's auxiliary vector, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        return int(getauxval(_AT_HWCAP)), int(getauxval(_AT_HWCAP2))
    except (OSError, AttributeError):
        return None


def os_features():
    """``{feature: bool}``: what the operating system says this CPU has and enabled, or None if it does not say.

    x86-64: the ``flags`` of /proc/cpuinfo (Linux), ``machdep.cpu.*features`` (macOS). aarch64: the auxiliary
    vector's hwcaps (Linux; right under QEMU's user mode too), the ``Features`` of /proc/cpuinfo, or
    ``hw.optional.*`` (macOS). The keys are :data:`FEATURES` on x86-64 and :data:`ARM_FEATURES` on aarch64.
    """
    table, text = _feature_table(), _proc_cpuinfo()
    if table is ARM_FEATURES:
        if sys.platform == "darwin":
            answers = {name: _sysctl(("hw.optional." if mac == "AdvSIMD" else "hw.optional.arm.") + mac)
                       for name, (_, _, mac) in table.items()}
            if any(answers.values()):
                return {name: value.strip() == "1" for name, value in answers.items()}
            return None
        caps = _hwcaps()
        if caps and caps[0]:
            return {name: bool(caps[0 if at == _AT_HWCAP else 1] >> bit & 1) for name, (at, bit) in _ARM_HWCAP.items()}
        match = re.search(r"^Features\s*:\s*(.+)$", text, re.M)
        if match:
            flags = set(match.group(1).split())
            return {name: cpu in flags for name, (cpu, _, _) in table.items()}
        return None
    match = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if match:
        flags = set(match.group(1).split())
        return {name: cpu in flags for name, (cpu, _, _) in table.items()}
    if sys.platform == "darwin":
        words = " ".join(_sysctl(k) for k in ("machdep.cpu.features", "machdep.cpu.leaf7_features")).upper().split()
        if words:
            return {name: mac in words for name, (_, _, mac) in table.items()}
    return None


def cpu_features() -> dict:
    """``{feature: bool}`` for the features of this architecture (:data:`FEATURES`, or :data:`ARM_FEATURES`).

    The operating system's view (:func:`os_features`: what the kernel enabled) where it gives one, else
    LLVM's view of the host. A feature is reported only if the source says it is there. Which kernels run
    is decided by :func:`target_features` (what numba compiles for), not by this.
    """
    table = _feature_table()
    found = os_features()
    if found is not None:
        return found
    llvm = _llvm_features()
    return {name: bool(llvm.get(llvm_name, False)) for name, (_, llvm_name, _) in table.items()}


# ----------------------------------------------------------------------------------------------
# What numba compiles for. numba builds its target machine from NUMBA_CPU_NAME (else the host's name) and
# NUMBA_CPU_FEATURES (else the host's features, with every avx* feature turned off where numba's ENABLE_AVX
# is off, as it is for sandybridge and ivybridge; "" for generic). A feature the string does not name comes
# from the CPU name's own definition in LLVM. An intrinsic the target lacks does not raise: LLVM aborts the
# process ("Do not know how to split the result of this operator!"), so a kernel must ask here first.

_SSE42 = {"sse4.2"}
_AVX = _SSE42 | {"avx"}
_AVX2 = _AVX | {"avx2", "fma"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw"}
_VNNI512 = _AVX512 | {"avx512vnni"}
_BF16_512 = _VNNI512 | {"avx512bf16"}
_AVXVNNI = _AVX2 | {"avxvnni"}
_AMX = _BF16_512 | {"avxvnni", "amx-tile", "amx-int8"}
_NEON = {"neon"}
_DOT = _NEON | {"dotprod"}
_V86 = _DOT | {"i8mm", "bf16"}
# LLVM's CPU names -> the features above that each defines (X86.td, AArch64Processors.td); a name not here
# is taken to have none of them (never more than it has), unless NUMBA_CPU_FEATURES grants them.
_CPU_FEATURES = {
    **dict.fromkeys(("x86-64-v2", "nehalem", "corei7", "westmere", "silvermont", "slm", "goldmont",
                     "goldmont-plus", "tremont"), _SSE42),
    **dict.fromkeys(("sandybridge", "corei7-avx", "ivybridge", "core-avx-i", "btver2"), _AVX),
    **dict.fromkeys(("x86-64-v3", "haswell", "core-avx2", "broadwell", "skylake", "bdver4", "znver1", "znver2",
                     "znver3"), _AVX2),
    **dict.fromkeys(("alderlake", "raptorlake", "meteorlake", "arrowlake", "arrowlake-s", "lunarlake",
                     "pantherlake", "gracemont", "sierraforest", "grandridge", "clearwaterforest"), _AVXVNNI),
    **dict.fromkeys(("x86-64-v4", "skylake-avx512", "skx", "cannonlake"), _AVX512),
    **dict.fromkeys(("knl", "knm"), _AVX2 | {"avx512f"}),
    **dict.fromkeys(("cascadelake", "icelake-client", "icelake-server", "tigerlake", "rocketlake"), _VNNI512),
    **dict.fromkeys(("cooperlake", "znver4", "znver5"), _BF16_512),
    **dict.fromkeys(("sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids"), _AMX),
    **dict.fromkeys(("cortex-a55", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78", "neoverse-n1",
                     "apple-a13", "apple-m1", "apple-a14"), _DOT),
    **dict.fromkeys(("neoverse-v1", "neoverse-n2", "neoverse-v2", "neoverse-v3", "cortex-x2", "cortex-a710",
                     "cortex-a510", "apple-m2", "apple-m3", "apple-a15", "apple-a16", "apple-a17", "grace"), _V86),
    **dict.fromkeys(("apple-m4", "apple-a18"), _V86 | {"sme"}),
}
# a feature is off if one it builds on is turned off (LLVM clears the dependents of a "-feature")
_REQUIRES = {"avx2": ("avx",), "fma": ("avx",), "avx512f": ("avx2", "fma"), "avx512bw": ("avx512f",),
             "avx512vnni": ("avx512f",), "avx512bf16": ("avx512bw",), "avxvnni": ("avx2",),
             "amx-int8": ("amx-tile",), "dotprod": ("neon",), "i8mm": ("neon",), "bf16": ("neon",)}
_NUMBA_AVX_OFF_CPUS = {"corei7-avx", "core-avx-i", "sandybridge", "ivybridge", "nocona"}  # numba's config.avx_default


def _parse_features(text: str) -> dict:
    return {item[1:]: item[0] == "+" for item in (text or "").split(",") if item[:1] in "+-" and len(item) > 1}


def _host_cpu_name() -> str:
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - llvmlite missing: no name
        return "unknown"


def _numba_config():
    """numba's (CPU_NAME, CPU_FEATURES, ENABLE_AVX), as numba's codegen reads them now."""
    try:
        from numba.core import config
    except Exception:  # noqa: BLE001 - numba cannot import: nothing will be compiled
        return None, None, True
    return config.CPU_NAME, config.CPU_FEATURES, bool(getattr(config, "ENABLE_AVX", True))


@functools.lru_cache(maxsize=None)
def _resolve_target(cpu_name, cpu_features_text, enable_avx, avx_env, arch):
    host = _host_cpu_name()
    name = host if cpu_name in (None, "host") else cpu_name or "generic"  # LLVM reads "" as generic
    host_llvm = _llvm_features()
    if cpu_features_text is None:
        avx_on = enable_avx if avx_env else enable_avx and name not in _NUMBA_AVX_OFF_CPUS
        explicit = {k: v and (avx_on or not k.startswith("avx")) for k, v in host_llvm.items()}
        source = "the host's" + ("" if avx_on else ", every avx* turned off by numba for this CPU name")
    else:
        explicit = _parse_features(cpu_features_text)
        source = f"NUMBA_CPU_FEATURES={cpu_features_text!r}"
    base = {k for k, v in host_llvm.items() if v} if name == host else set(_CPU_FEATURES.get(name, ()))
    if arch == "aarch64":
        base |= _NEON  # Advanced SIMD is part of the aarch64 base architecture

    def on(feature):
        if not explicit.get(feature, feature in base):
            return False
        return all(on(required) for required in _REQUIRES.get(feature, ()))

    table = ARM_FEATURES if arch == "aarch64" else FEATURES
    return {"cpu_name": name, "cpu_source": "host" if cpu_name in (None, "host") else "NUMBA_CPU_NAME",
            "features_source": source, "features": {f: on(llvm_name) for f, (_, llvm_name, _) in table.items()}}


@functools.lru_cache(maxsize=None)
def _os_view():
    return os_features()


def compile_target() -> dict:
    """What numba compiles for in this process, the OS's view beside it, and what kernels may therefore use.

    Returns
    -------
    dict
        ``arch`` (``x86_64``, ``aarch64``), ``cpu_name`` (LLVM's name numba targets), ``cpu_source``
        (``"host"`` or ``"NUMBA_CPU_NAME"``), ``features_source`` (where the feature string came from),
        ``target`` ``{feature: bool}`` (what the compiler will emit), ``os`` ``{feature: bool}`` or None (what
        the OS says the CPU has), ``usable`` ``{feature: bool}`` (both agree: the only view a kernel may choose
        an ISA-specific path from) and ``disagree`` (features the target has but the OS denies, which would
        fault at run time).
    """
    arch = _machine()
    name, features, enable_avx = _numba_config()
    resolved = _resolve_target(name, features, enable_avx, "NUMBA_ENABLE_AVX" in os.environ, arch)
    target, osv = resolved["features"], _os_view()
    usable = {f: on and (osv is None or bool(osv.get(f))) for f, on in target.items()}
    return {"arch": arch, "cpu_name": resolved["cpu_name"], "cpu_source": resolved["cpu_source"],
            "features_source": resolved["features_source"], "target": dict(target), "os": osv,
            "usable": usable, "disagree": [f for f, on in target.items() if on and not usable[f]]}


def target_features() -> dict:
    """``{feature: bool}``: the features numba's compile target has and the OS grants (:func:`compile_target`'s
    ``usable``). Every kernel that emits an ISA-specific intrinsic chooses its path from this."""
    return compile_target()["usable"]


def target_has(*names) -> bool:
    """Whether numba's compile target has, and the OS grants, every one of ``names`` (keys of :data:`FEATURES`
    on x86-64, :data:`ARM_FEATURES` on aarch64; a name of the other architecture is simply absent)."""
    usable = target_features()
    return all(usable.get(name, False) for name in names)


def request_tile_permission() -> str | None:
    """Ask Linux for the AMX tile state for this process: None if granted, else why not."""
    import ctypes

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"tile state is requested from Linux on x86-64; this is {sys.platform} on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                      ctypes.c_long(XFEATURE_XTILEDATA))
    if rc != 0:
        errno = ctypes.get_errno()
        return f"the kernel refused the tile state: arch_prctl(ARCH_REQ_XCOMP_PERM) failed with {os.strerror(errno)}"
    return None


def amx_status() -> tuple:
    """``(usable, reason)``: whether this process may issue AMX-INT8 instructions.

    Both must hold: the CPU has ``amx_tile`` and ``amx_int8`` (Sapphire Rapids and later), and
    Linux grants the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, which
    this function asks for; the permission then holds for the whole process).
    """
    features = cpu_features()
    missing = [name for name in ("amx_tile", "amx_int8") if not features.get(name)]
    if missing:
        return False, f"the CPU has no {' or '.join(missing)}"
    refused = request_tile_permission()
    if refused:
        return False, refused
    return True, "amx_tile and amx_int8, and the kernel granted the tile state"


def core_counts() -> dict:
    """Logical CPUs, physical cores (when the OS says), and the CPUs this process may use."""
    logical = os.cpu_count() or 1
    physical = None
    text = _proc_cpuinfo()
    pairs = set(re.findall(r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", text, re.S))
    if pairs:
        physical = len(pairs)
    elif sys.platform == "darwin":
        value = _sysctl("hw.physicalcpu")
        physical = int(value) if value.isdigit() else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = logical
    return {"logical": logical, "physical": physical, "usable": usable}


def _numba_env_hint() -> str:
    """What to do about a NUMBA_NUM_THREADS that numba refuses, or '' if it is not the cause."""
    value = os.environ.get("NUMBA_NUM_THREADS")
    if value is None:
        return ""
    try:
        if int(value) >= 1:
            return ""
    except ValueError:
        pass
    usable = core_counts()["usable"]
    return (f" NUMBA_NUM_THREADS={value!r} must be a whole number of threads >= 1 (this process may use "
            f"{usable} CPUs): unset it or `export NUMBA_NUM_THREADS={usable}`")


def numba_info() -> dict:
    """numba's version, threading layer and thread count (compiles a tiny parallel kernel).

    If numba cannot even be imported (a broken install, or a NUMBA_* variable it refuses), the dict says
    so under ``"error"`` with ``compiles=False`` instead of raising: this is a diagnosis tool.
    """
    try:
        import numba
    except Exception as exc:  # noqa: BLE001 - numba raises ValueError, ImportError, OSError... at import
        try:
            version = metadata.version("numba")
        except metadata.PackageNotFoundError:
            version = "not installed"
        return {"version": version, "threads": None, "compiles": False, "threading_layer": "unavailable",
                "error": f"`import numba` failed: {type(exc).__name__}: {exc}{_numba_env_hint()}"}
    import numpy as np

    @numba.njit(parallel=True, cache=False)
    def _parallel_sum(x):
        total = 0.0
        for i in numba.prange(x.shape[0]):
            total += x[i]
        return total

    info = {"version": numba.__version__, "threads": numba.get_num_threads()}
    try:
        ok = _parallel_sum(np.ones(1000)) == 1000.0
        info["compiles"] = bool(ok)
        info["threading_layer"] = numba.threading_layer()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this is a diagnosis tool
        info["compiles"] = False
        info["threading_layer"] = "unavailable"
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def data_status(data_dir=None) -> dict:
    """Where the course's data folder is, and what in it is missing or corrupted.

    Returns ``{"dir": path or None, "problems": [sentences]}``; the shipped MNIST files are read and checked
    against their SHA-256 (the same check :func:`workshop_lib.data.load_mnist` makes), and the trained model
    and photographs the labs open must be present.
    """
    from .data import DataError, find_data_dir, load_mnist

    try:
        folder = find_data_dir(data_dir)
    except DataError as exc:
        return {"dir": None, "problems": [str(exc)]}
    found = []
    try:
        load_mnist(folder)
    except DataError as exc:
        found.append(f"{exc} (restore {folder / 'mnist'} from the course repository: `git checkout -- data`)")
    model = folder / "models" / "mnist_cnn.npz"
    if not model.is_file():
        found.append(f"{model}: the trained model is missing; restore it with `git checkout -- data` "
                     "or create it with `workshop train mnist`")
    images = folder / "images"
    if not images.is_dir() or not any(images.iterdir()):
        found.append(f"{images}: the photographs of lab 04 are missing; restore them with `git checkout -- data`")
    return {"dir": str(folder), "problems": found}


def mpiexec_path() -> str | None:
    """The ``mpiexec`` next to this Python (the one mpi4py's MPI came with), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def mpiexec_command(n: int, args, python: bool = True) -> list:
    """``[mpiexec, -n, N, python, *args]`` with this interpreter; raises if no mpiexec exists."""
    exe = mpiexec_path()
    if exe is None:
        raise RuntimeError(
            "no mpiexec found next to this Python or on PATH; install the MPI runtime "
            "with `pip install mpich` (or use your site's MPI module)"
        )
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer number of ranks")
    return [exe, "-n", str(n)] + ([sys.executable] if python else []) + [str(a) for a in args]


def run_mpi(n: int, args, timeout: float = 120, threads_per_rank: int | None = 1, check: bool = True, env=None, cwd=None):
    """Run ``mpiexec -n N python *args`` and return the CompletedProcess.

    Each rank gets ``NUMBA_NUM_THREADS=threads_per_rank`` (None leaves it alone),
    so N ranks do not each start a thread per core. The whole process group is
    killed if it outlives ``timeout`` seconds, so a deadlock is an error, not a hang.
    """
    cmd = mpiexec_command(n, args)
    full_env = dict(os.environ if env is None else env)
    if threads_per_rank is not None:
        full_env["NUMBA_NUM_THREADS"] = str(threads_per_rank)
        full_env["OMP_NUM_THREADS"] = str(threads_per_rank)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(
            f"`{' '.join(cmd)}` did not finish within {timeout} s and was killed.\n"
            f"stdout:\n{out}\nstderr:\n{err}"
        ) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}.\nstdout:\n{out}\nstderr:\n{err}")
    return result


def mpi_library_version(timeout: float = 60) -> str:
    """The MPI library's own version string (asked in a child process, so this one never initialises MPI)."""
    code = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(MPI.Get_library_version().strip())"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "unavailable (mpi4py timed out)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"unavailable ({last})"
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "unknown"


def package_versions() -> dict:
    names = ["numpy", "numba", "llvmlite", "mpi4py", "mpich", "ipyparallel", "jupyterlab", "matplotlib", "pillow"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def mpi_cluster(n: int = 2, threads_per_engine: int = 1):
    """An ipyparallel ``Cluster`` of ``n`` MPI engines launched with this Python's mpiexec.

    Start it with ``rc = cluster.start_and_connect_sync()`` and stop it with
    ``cluster.stop_cluster_sync()``; each engine is an MPI rank.
    """
    import ipyparallel as ipp

    exe = mpiexec_path()
    if exe is None:
        raise RuntimeError("no mpiexec found; install it with `pip install mpich`")
    cluster = ipp.Cluster(engines="mpi", n=n, log_level=40)
    cluster.config.MPIEngineSetLauncher.mpi_cmd = [exe]
    cluster.config.MPIEngineSetLauncher.environment = {
        "NUMBA_NUM_THREADS": str(threads_per_engine),
        "OMP_NUM_THREADS": str(threads_per_engine),
    }
    return cluster


SHM_ADVISED_BYTES = 512 << 20  # below this, MPI's shared-memory transport can fail (Docker's default is 64 MB)


def shm_bytes(path="/dev/shm"):
    """Size of the shared-memory file system MPI's intra-node transport uses, in bytes (None if there is none)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_blocks * st.f_frsize


def cgroup_cpu_quota(root="/sys/fs/cgroup", proc_cgroup=None):
    """CPUs this process's cgroup may use per second (``docker run --cpus``, Slurm's cgroup), or None if unlimited.

    Reads cgroup v2's ``cpu.max`` (``"quota period"`` or ``"max period"``) or v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``, in the process's own cgroup (from ``/proc/self/cgroup``) or at the root, as a
    container mounts it. A quota is not an affinity: ``os.sched_getaffinity`` may show more CPUs than it allows.
    """
    root = Path(root)
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    v2, v1 = [], []
    for line in proc_cgroup.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        if controllers == "":
            v2.append(root / rel / "cpu.max")
        elif "cpu" in controllers.split(","):
            v1 += [root / c / rel for c in (controllers, "cpu", "cpu,cpuacct")]
    v2.append(root / "cpu.max")
    v1 += [root / "cpu", root / "cpu,cpuacct"]
    for candidate in v2:
        try:
            quota, period = candidate.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for folder in v1:
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota < 0 else quota / period
    return None


_HELLO = (
    "from mpi4py import MPI; c = MPI.COMM_WORLD; "
    "s = c.allreduce(c.Get_rank() + 1); "
    "lines = c.gather(f'rank {c.Get_rank()} of {c.Get_size()}: sum={s}', root=0); "
    "c.Get_rank() == 0 and print('\\n'.join(lines), flush=True)"
)


def _mpi_smoke(n: int = 2, timeout: float = 60) -> str | None:
    """None if ``mpiexec -n n`` starts n ranks that can allreduce, else what went wrong."""
    try:
        proc = run_mpi(n, ["-c", _HELLO], timeout=timeout, check=False)
    except (RuntimeError, TimeoutError, OSError) as exc:
        return str(exc).splitlines()[0]
    expected = n * (n + 1) // 2
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rank ")]
    if proc.returncode != 0 or len(lines) != n or not all(f"sum={expected}" in ln for ln in lines):
        return f"mpiexec -n {n} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:300]}"
    return None


def report(mpi_check: bool = True) -> dict:
    """Everything ``workshop check`` prints, as a dict."""
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": core_counts(),
        "features": cpu_features(),
        "target": compile_target(),
        "amx": amx_status(),
        "numba": numba_info(),
        "data": data_status(),
        "mpi_library": mpi_library_version(),
        "mpiexec": mpiexec_path(),
        "packages": package_versions(),
        "shm_bytes": shm_bytes(),
        "cpu_quota": cgroup_cpu_quota(),
    }
    if mpi_check:
        info["mpi_smoke"] = _mpi_smoke(2)
    return info


def problems(info: dict) -> list:
    """The essential things that are broken, as sentences a learner can act on."""
    found = []
    if not info["numba"].get("compiles"):
        found.append(f"numba cannot compile a parallel kernel: {info['numba'].get('error', 'unknown error')}")
    found += [f"course data: {problem}" for problem in info.get("data", {}).get("problems", [])]
    if info["mpiexec"] is None:
        found.append("no mpiexec found: install the MPI runtime with `pip install mpich`")
    if info.get("mpi_smoke"):
        found.append(f"mpiexec cannot start 2 ranks: {info['mpi_smoke']}")
    if info["mpi_library"].startswith("unavailable"):
        found.append(f"mpi4py cannot load an MPI library: {info['mpi_library']}")
    return found


def format_report(info: dict) -> str:
    """The report as a two-column text table."""
    cores = info["cores"]
    rows = [
        ("Python", info["python"]),
        ("Platform", info["platform"]),
        ("CPU", info["cpu"]),
        ("Cores", f"{cores['logical']} logical, {cores['physical'] or '?'} physical, {cores['usable']} usable"),
    ]
    if "cpu_quota" in info:
        quota = info["cpu_quota"]
        rows.append(("cgroup CPU quota", "none" if quota is None else f"{quota:g} CPUs"
                     + (" (fewer than the usable cores: give each rank fewer threads)" if quota < cores["usable"] else "")))
    target = info.get("target")
    if target:
        rows.append(("numba compiles for", f"{target['cpu_name']} ({target['arch']}; CPU name from "
                                           f"{target['cpu_source']}, features from {target['features_source']})"))
    rows.append(("Feature", "OS   numba target   usable" if target else "OS"))
    for name, present in info["features"].items():
        cell = "yes" if present else "no"
        if target:
            cell = (f"{cell:<5}{'yes' if target['target'].get(name) else 'no':<15}"
                    f"{'yes' if target['usable'].get(name) else 'no'}")
        rows.append((f"  {name}", cell))
    if target and target["disagree"]:
        rows.append(("  target vs OS", f"the target has {', '.join(target['disagree'])}, which the OS does not "
                                       "grant: kernels will not use them"))
    for family, path in info.get("kernel_paths", {}).items():
        rows.append((f"path: {family}", path))
    if "amx" in info:
        usable, reason = info["amx"]
        rows.append(("AMX usable", f"{'yes' if usable else 'no'} ({reason})"))
    nb = info["numba"]
    rows += [
        ("numba", f"{nb['version']}, threading layer {nb.get('threading_layer')}, {nb['threads'] or '?'} threads"),
        ("MPI library", info["mpi_library"]),
        ("mpiexec", info["mpiexec"] or "not found"),
    ]
    if "data" in info:
        data = info["data"]
        rows.append(("Data", f"{data['dir'] or 'not found'} ({'FAILED' if data['problems'] else 'ok'})"))
    if "mpi_smoke" in info:
        rows.append(("mpiexec -n 2", "ok" if info["mpi_smoke"] is None else "FAILED"))
    if "shm_bytes" in info:
        shm = info["shm_bytes"]
        rows.append(("/dev/shm", "not found" if shm is None else f"{shm / 2**20:,.0f} MB" + (
            " (too small for MPI's shared memory: `docker run --shm-size=1g`)" if shm < SHM_ADVISED_BYTES else "")))
    rows += [(name, version) for name, version in info["packages"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])
