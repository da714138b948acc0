"""A real Slurm (Debian's slurm-wlm with munge, ``MpiDefault=none`` as most sites ship it) runs the course's jobs.

Every ``cluster/*.sbatch`` is submitted as written, scaled down from the command line (one node, 2 ranks of
1 CPU, few steps, small inputs), and ``salloc ... workshop launch --scheduler slurm`` is run; each job must be
ONE 2-rank MPI world, each rank bound by srun to its own CPU with one thread per pool. Before the fixes each
rank here was a world of one, with exit status 0. Root on Linux with the packages installed
(``make cluster-tools``, which ``make test`` calls) or skipped with the reason. About a minute.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import real_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

WHY_NOT = real_cluster.why_not(real_cluster.SLURM_PROGRAMS)
if WHY_NOT is None and len(os.sched_getaffinity(0)) < 2:
    WHY_NOT = "needs 2 CPUs for a 2-rank job of 1 CPU per rank"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, root):
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    folder = tmp_path_factory.mktemp("slurm")
    with real_cluster.slurm(folder) as env:
        env.update(WORKSHOP_PYTHON=sys.executable, WORKSHOP_VERBOSE="1", PYTHONPATH=str(root),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
        yield folder, env


def _small_image(path):
    from PIL import Image
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _scaled_down(name, folder):
    """The arguments that make each lab script's job small; sbatch passes them after the template's own."""
    return {
        "allreduce_timing": ["--sizes", "65536", "--repeats", "1"],
        "kmeans_quantize": ["--image", str(_small_image(folder / "small.png")), "--colors", "4", "--max-iter", "3",
                            "--out", str(folder / "quantized.png")],
        "link_timing": ["--sizes", "8", "65536", "--repeats", "1"],
        "model_parallel_fc": ["--rounds", "1", "--calls", "2"],
        "mpi_hello": [],
        "tensorflow_mnist": ["--steps", "20", "--batch-size", "20", "--log-every", "10",
                             "--checkpoint-dir", str(folder / "checkpoints")],
    }[name]


def _one_world_of_two(output):
    """Assert ``output`` shows one 2-rank world, each rank on its own single CPU with one thread per pool."""
    masks = re.findall(r"cpu-bind=MASK - \S+, task\s+(\d)\s+\d+ \[\d+\]: mask (0x[0-9a-f]+) set", output)
    assert sorted(t for t, _ in masks) == ["0", "1"], output
    bits = [int(m, 16) for _, m in masks]
    assert all(bin(b).count("1") == 1 for b in bits) and bits[0] != bits[1], masks  # one CPU each, not the same
    placed = re.findall(r"workshop_verbose,placement,rank (\d)/(\d) \(local \d/(\d)\): cores (\S+) .*?"
                        r"numba threads (\d+), BLAS threads (\d+)", output)
    hello = re.findall(r"rank (\d) of (\d) on ", output)
    worlds = {(r, size) for r, size, *_ in placed} | set(hello)
    if not worlds:  # a script that prints only on rank 0 (link_timing): one line, of 2 ranks, not 2 lines of 1
        assert re.findall(r'"ranks": (\d+)', output) == ["2"], output
    else:
        assert worlds == {("0", "2"), ("1", "2")}, output  # rank 0 of 1 twice before the fixes
    assert all(local == "2" and numba == blas == "1" for _, _, local, _, numba, blas in placed), placed


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "cluster").glob("*.sbatch")))
def test_every_batch_template_runs_as_one_mpi_world_with_its_threads_and_bindings(cluster, root, name):
    folder, env = cluster
    out = folder / f"{name}.out"
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:05:00",
           f"--output={out}", f"--chdir={root}", str(root / "cluster" / f"{name}.sbatch"), *_scaled_down(name, folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n--- job output ---\n{text}"
    _one_world_of_two(text)
    if name == "kmeans_quantize":
        assert (folder / "quantized.png").stat().st_size > 0
    if name in ("allreduce_timing", "link_timing", "model_parallel_fc"):
        assert '"ranks": 2' in text


def test_a_job_written_by_workshop_launch_batch_runs_as_one_world(cluster, root):
    folder, env = cluster
    script = folder / "hello.sbatch"
    with script.open("w") as out:
        subprocess.run([sys.executable, "-m", "workshop_lib.cli", "launch", "labs/scripts/mpi_hello.py", "-n", "2",
                        "--cpus-per-node", "2", "--scheduler", "slurm", "--batch"], stdout=out, check=True, env=env,
                       cwd=root, timeout=60)
    assert f'PYTHON="${{WORKSHOP_PYTHON:-{sys.executable}}}"' in script.read_text()  # names this interpreter
    out = folder / "hello.out"
    proc = subprocess.run(["sbatch", "--wait", f"--output={out}", f"--chdir={root}", str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out.read_text() if out.exists() else "")
    _one_world_of_two(out.read_text())


def test_salloc_workshop_launch_scheduler_slurm_sizes_from_the_allocation_and_forms_one_world(cluster, root):
    _, env = cluster
    cmd = ["salloc", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--time=00:05:00",
           sys.executable, "-m", "workshop_lib.cli", "launch", "labs/scripts/mpi_hello.py", "-n", "2",
           "--scheduler", "slurm", "--verbose"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("srun "))
    assert {"--mpi=pmi2", "--kill-on-bad-exit=1", "--cpus-per-task=1", "--ntasks=2"} <= set(line.split()), line
    _one_world_of_two(proc.stdout + proc.stderr)


def test_srun_without_a_pmi_is_stopped_by_the_world_of_one_guard_on_every_rank(cluster, root):
    # the defect itself, on purpose: srun --mpi=none gives MPICH's ranks no PMI, so each is a world of one
    _, env = cluster
    code = "from workshop_lib.comm import Communicator; Communicator(); print('started a world of one')"
    cmd = ["salloc", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--time=00:05:00",
           "srun", "--mpi=none", sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode != 0 and "started a world of one" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("srun started 2 tasks, but MPI sees a world of 1 rank") == 2, proc.stderr
