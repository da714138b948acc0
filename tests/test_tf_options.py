"""workshop_lib.tf.options: the three variants' names, stock compiled in a Python of its own (no AVX2, FMA or
AVX-512 in its code) and refused elsewhere with the variables to set, and numba's cache keeping both targets."""

import json
import os
import pickle
import subprocess
import sys

import pytest

import workshop_lib.tf as tf
from workshop_lib import bench
from workshop_lib.tf import options as options_module

_TARGET_PROBE = """
import json, re, sys
import numba, numpy as np
from workshop_lib.tf import options

@numba.njit(fastmath=True)
def axpy(a, x, y):  # LLVM vectorizes this with FMAs wherever the target has them
    for i in range(x.size):
        y[i] += a * x[i]

x = np.ones(4096, np.float32)
axpy(np.float32(2.0), x, x.copy())
asm = "\\n".join(axpy.inspect_asm().values())
try:
    options.GraphOptions(kernels="stock")
    stock = "accepted"
except ValueError as exc:
    stock = str(exc)
print(json.dumps({"cpu_name": numba.config.CPU_NAME, "targets_stock": options.targets_stock(), "stock": stock,
                  "fma": bool(re.search(r"vfmadd|vfnmadd", asm)), "zmm": "zmm" in asm, "ymm": "ymm" in asm}))
"""


def _probe_target(root, stock, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    env.update(options_module.STOCK_NUMBA_ENV if stock else {})
    env.update(extra_env or {}, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", _TARGET_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_three_variants_have_one_set_of_names():
    assert bench.VARIANTS == options_module.VARIANTS == ("stock", "reference", "optimized")
    reference, optimized = tf.GraphOptions(kernels="reference"), tf.GraphOptions(kernels="optimized")
    assert (reference.variant, reference.kernels, reference.fusion, reference.layout) == \
        ("reference", "reference", False, "native")
    assert (optimized.variant, optimized.kernels, optimized.fusion) == ("optimized", "optimized", True)
    assert tf.GraphOptions().variant == "optimized"
    assert tf.GraphOptions(kernels="reference", fusion=True).variant is None  # one thing changed: not a variant
    assert tf.GraphOptions(kernels="optimized", layout="blocked").variant is None


def test_old_and_wrong_variant_names_raise_naming_the_new_ones():
    with pytest.raises(ValueError, match="'default' is now 'reference'"):
        tf.GraphOptions(kernels="default")
    with pytest.raises(ValueError, match="'default' is now 'reference'"):
        bench.measure_cnn("default")
    with pytest.raises(ValueError, match=r"kernels='fast' must be one of \('stock', 'reference', 'optimized'\)"):
        tf.GraphOptions(kernels="fast")
    with pytest.raises(TypeError, match="fusion='yes'"):
        tf.GraphOptions(fusion="yes")


@pytest.mark.skipif(options_module.targets_stock(), reason="this process's numba already targets stock")
def test_stock_in_a_process_whose_numba_targets_this_cpu_raises_naming_the_variables():
    with pytest.raises(ValueError, match="NUMBA_CPU_NAME='sandybridge' NUMBA_CPU_FEATURES=") as info:
        tf.GraphOptions(kernels="stock")
    assert "numba reads NUMBA_CPU_NAME and NUMBA_CPU_FEATURES once, at its import" in str(info.value)
    assert options_module.numba_target()[0] in str(info.value)


def test_stock_has_no_fusion_and_no_layout_propagation():
    with pytest.raises(ValueError, match="kernels='stock' has no fusion and no layout propagation"):
        tf.GraphOptions(kernels="stock", fusion=True)
    with pytest.raises(ValueError, match="kernels='stock' has no fusion and no layout propagation"):
        tf.GraphOptions(kernels="stock", layout="blocked")


@pytest.mark.timeout(300)
def test_a_python_started_with_the_stock_env_compiles_without_avx2_fma_or_avx512(root):
    stock = _probe_target(root, stock=True)
    assert stock["cpu_name"] == "sandybridge" and stock["targets_stock"] and stock["stock"] == "accepted"
    assert not stock["fma"] and not stock["zmm"]
    host = _probe_target(root, stock=False)
    assert not host["targets_stock"] and "NUMBA_CPU_NAME" in host["stock"]
    if "+fma" in options_module.numba_target()[1]:  # the control: the same loop here does use the FMAs
        assert host["fma"]


@pytest.mark.timeout(300)
def test_numba_cache_keeps_stock_and_host_entries_apart(root, tmp_path):
    """A cache=True kernel compiled for sandybridge and for this CPU: two index entries, each reloaded later."""
    (tmp_path / "cached_kernel.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2.0 * x\n")
    probe = ("import json, sys, numba\nsys.path.insert(0, sys.argv[1])\nimport cached_kernel\n"
             "cached_kernel.twice(1.5)\nprint(json.dumps(sum(cached_kernel.twice.stats.cache_hits.values())))\n")
    cache_dir = tmp_path / "numba_cache"

    def hits(stock):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
        env.update(options_module.STOCK_NUMBA_ENV if stock else {}, NUMBA_CACHE_DIR=str(cache_dir))
        proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    assert [hits(False), hits(True), hits(False), hits(True)] == [0, 0, 1, 1]
    (index,) = cache_dir.rglob("*.nbi")
    with open(index, "rb") as f:
        pickle.load(f)  # numba's version
        _, overloads = pickle.loads(f.read())
    cpu_names = {key[1][1] for key in overloads}  # key = (signature, (triple, cpu name, features), code hash)
    assert len(overloads) == 2 and "sandybridge" in cpu_names and len(cpu_names) == 2
