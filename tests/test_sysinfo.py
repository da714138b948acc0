import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workshop_lib import cli, sysinfo


def test_cpu_features_agree_with_proc_cpuinfo():
    features = sysinfo.cpu_features()
    assert set(features) == set(sysinfo.FEATURES)
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()) if "flags" in text else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this OS")
    for name, (cpu_flag, _, _) in sysinfo.FEATURES.items():
        assert features[name] == (cpu_flag in flags), name


def test_llvm_view_agrees_with_the_kernel_on_avx512_vnni():
    llvm = sysinfo._llvm_features()
    if not llvm:
        pytest.skip("llvmlite cannot report host features here")
    assert llvm.get("avx512vnni", False) == sysinfo.cpu_features()["avx512_vnni"]


def test_core_counts_are_consistent():
    cores = sysinfo.core_counts()
    assert cores["logical"] >= 1 and 1 <= cores["usable"] <= cores["logical"]
    assert cores["physical"] is None or 1 <= cores["physical"] <= cores["logical"]


def test_amx_is_usable_only_with_the_cpu_flags_and_the_kernels_permission():
    usable, reason = sysinfo.amx_status()
    features = sysinfo.cpu_features()
    has_flags = features["amx_tile"] and features["amx_int8"]
    if not has_flags:
        assert not usable and reason.startswith("the CPU has no amx_"), reason
    # asking the kernel directly: granted exactly where the CPU has the tiles (Linux x86-64 >= 5.16)
    refused = sysinfo.request_tile_permission()
    if has_flags:
        assert usable == (refused is None), (usable, refused)
    else:
        assert refused is not None and ("arch_prctl" in refused or "x86-64" in refused), refused


def test_mpi_library_version_names_a_real_library():
    version = sysinfo.mpi_library_version()
    assert not version.startswith("unavailable"), version
    assert re.search(r"MPICH|Open MPI|Intel|MVAPICH|Microsoft", version), version


def test_workshop_check_reports_features_mpi_and_succeeds():
    proc = subprocess.run([sys.executable, "-m", "workshop_lib.cli", "check"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"avx512_vnni\s+(yes|no)", proc.stdout)
    assert re.search(r"AMX usable\s+(yes|no) \(", proc.stdout)
    if sysinfo.cpu_features()["avx512_vnni"]:
        assert re.search(r"avx512_vnni\s+yes", proc.stdout)
    assert "MPI library" in proc.stdout and sysinfo.mpi_library_version().splitlines()[0] in proc.stdout
    assert re.search(r"mpiexec -n 2\s+ok", proc.stdout)


def test_workshop_check_fails_clearly_when_mpiexec_is_broken(monkeypatch, capsys):
    monkeypatch.setattr(sysinfo, "mpiexec_path", lambda: "/bin/false")
    assert cli.main(["check"]) == 1
    err = capsys.readouterr().err
    assert "ERROR: mpiexec cannot start 2 ranks" in err


def test_problems_reports_a_numba_that_cannot_compile():
    info = {"numba": {"compiles": False, "error": "LoweringError: boom"}, "mpiexec": "/x", "mpi_library": "MPICH"}
    assert sysinfo.problems(info) == ["numba cannot compile a parallel kernel: LoweringError: boom"]


def test_run_mpi_kills_a_hung_job_and_says_so():
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        sysinfo.run_mpi(2, ["-c", "import time; time.sleep(60)"], timeout=3)


def test_mpiexec_command_validates_rank_count():
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        sysinfo.mpiexec_command(0, ["x.py"])


def _check_cli(root, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k != "WORKSHOP_DATA"} | env
    full["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")  # cwd is not the repository
    return subprocess.run([sys.executable, "-m", "workshop_lib.cli", "check", "--no-mpi"], capture_output=True,
                          text=True, timeout=300, env=full, cwd=tmp_path)


def test_workshop_check_fails_with_what_to_do_when_the_data_folder_is_missing(root, tmp_path):
    """It used to say "Everything the labs need is working." and exit 0."""
    proc = _check_cli(root, tmp_path, WORKSHOP_DATA=str(tmp_path / "nowhere"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Everything the labs need is working" not in proc.stdout
    assert re.search(r"Data\s+not found \(FAILED\)", proc.stdout)
    assert f"ERROR: course data: data directory not found (looked in {tmp_path / 'nowhere'})" in proc.stderr
    assert "set WORKSHOP_DATA" in proc.stderr


def test_workshop_check_reports_an_invalid_numba_thread_count_instead_of_a_traceback(root, tmp_path):
    """NUMBA_NUM_THREADS=0 made `import numba` raise inside the check: a raw traceback."""
    proc = _check_cli(root, tmp_path, NUMBA_NUM_THREADS="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "ERROR: numba cannot compile a parallel kernel: `import numba` failed" in proc.stderr
    assert "NUMBA_NUM_THREADS='0' must be a whole number of threads >= 1" in proc.stderr
    assert re.search(r"numba\s+\S+, threading layer unavailable", proc.stdout)


def test_data_status_names_each_missing_or_corrupted_file(root, tmp_path):
    assert sysinfo.data_status(root / "data") == {"dir": str(root / "data"), "problems": []}
    (tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(root / "data" / "mnist" / name, tmp_path / "mnist" / name)
    images = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-1000])
    status = sysinfo.data_status(tmp_path)
    assert status["dir"] == str(tmp_path)
    assert len(status["problems"]) == 3, status
    assert f"{images}: not a valid gzip file" in status["problems"][0]
    assert "mnist_cnn.npz: the trained model is missing" in status["problems"][1]
    assert "images: the photographs of lab 04 are missing" in status["problems"][2]
    info = {"numba": {"compiles": True}, "mpiexec": "/x", "mpi_library": "MPICH", "data": status}
    assert sysinfo.problems(info) == [f"course data: {p}" for p in status["problems"]]
