"""No setting of numba's compile target crashes the interpreter; every kernel family is right on each.

Each target runs tests/kernel_programs/every_target.py in its own process with its own NUMBA_CACHE_DIR (an
intrinsic the target lacks aborts the process inside LLVM, and a cache shared across targets could load
another target's code). Two run at a time; the five take about 1-2 minutes on 2 cores.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workshop_lib import sysinfo

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "tests" / "kernel_programs" / "every_target.py"
TARGETS = ["generic", "sandybridge", "haswell", "skylake-avx512", "host"]


def _run(target, cache):
    env = dict(os.environ, NUMBA_CPU_NAME=target, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("NUMBA_CPU_FEATURES", None)
    return subprocess.run([sys.executable, str(PROGRAM)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_every_kernel_family_on_every_numba_target(tmp_path):
    if sysinfo._machine() != "x86_64":
        pytest.skip(f"the x86 CPU names are for x86-64; this is {sysinfo._machine()}")
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(TARGETS, pool.map(lambda t: _run(t, tmp_path / t), TARGETS)))
    for target, proc in procs.items():
        assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ALL OK"), (
            f"NUMBA_CPU_NAME={target}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    # the paths follow the target: no VNNI for generic and sandybridge, VNNI where the host has it
    assert "portable" in procs["generic"].stdout and "im2col" in procs["generic"].stdout
    assert "portable" in procs["sandybridge"].stdout
    if sysinfo.target_has("avx512_vnni", "avx512f"):
        assert "avx512_vnni" in procs["haswell"].stdout  # numba gives a named CPU the host's features


@pytest.mark.parametrize("name, features, avx, want", [
    ("generic", "", True, set()),
    ("sandybridge", None, False, {"sse4_2"}),  # numba turns every avx* off for this name (config.ENABLE_AVX)
    ("sandybridge", "", True, {"sse4_2"}),
    ("sandybridge", "+avx2,+fma", True, {"sse4_2", "avx2", "fma"}),
    ("haswell", "", True, {"sse4_2", "avx2", "fma"}),
    ("skylake-avx512", "", True, {"sse4_2", "avx2", "fma", "avx512f", "avx512bw"}),
    ("skylake-avx512", "-avx2", True, {"sse4_2", "fma"}),  # turning a base feature off turns off what builds on it
    ("cascadelake", "-avx512vnni", True, {"sse4_2", "avx2", "fma", "avx512f", "avx512bw"}),
    ("some-future-cpu", "+avx512f", True, set()),  # unknown name: its prerequisites are not assumed
])
def test_target_features_from_cpu_name_and_feature_string(name, features, avx, want):
    resolved = sysinfo._resolve_target(name, features, avx, False, "x86_64")
    assert {f for f, on in resolved["features"].items() if on} == want


def test_a_feature_the_os_denies_is_not_usable(monkeypatch):
    monkeypatch.setattr(sysinfo, "_os_view", lambda: dict.fromkeys(sysinfo.FEATURES, False))
    monkeypatch.setattr(sysinfo, "_machine", lambda: "x86_64")
    target = sysinfo.compile_target()
    assert not any(target["usable"].values())
    assert set(target["disagree"]) == {f for f, on in target["target"].items() if on}
