"""Fault campaign: inject the classes of faults and bad input the reliability reviews found, classify each outcome.

Run:  python benchmarks/faults.py                 (every probe, a few minutes on 2 cores)
      python benchmarks/faults.py --only ckpt     (probes whose name or area contains "ckpt")
      python benchmarks/faults.py --list          (names only)
      workshop bench faults [--only ...]

Each probe runs in a process (or an ``mpiexec`` job) of its own, in a scratch folder under the system's
temporary folder, under a timeout; whatever is left of its process group afterwards is killed by id. Nothing
outside the scratch folder is written; the probes that try to make the course write elsewhere check a sentinel
file next to it (inside the scratch folder) and count as silent if it changed.

The classes injected: kill (SIGKILL of a rank, of a save), raise (an exception on one rank, inside and outside a
collective), hang (a rank that sleeps past a collective's timeout), mismatch (ranks that disagree), bad
environment values, bad and corrupt files (checkpoints, indexes, manifests, reports, markers), bad output paths,
and a full disk (a 64 KB tmpfs, where this process may mount one).

Each outcome is one of (the reviews' categories):

- ``clear``: an error whose message holds the words the probe expects (the argument or file, and what was wrong);
- ``unclear``: an error, but without them (a raw library error, a traceback from an exit hook);
- ``silent``: no error where one was due, or a wrong result or lost data;
- ``hang``: the timeout was needed;
- ``crash``: killed by a signal (segfault, abort) where an error was due;
- ``handled``: the fault was absorbed correctly (the probe checked the result).

The totals by category print at the end, and per area; ``--json FILE`` keeps every outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("clear", "unclear", "silent", "hang", "crash", "handled")


@dataclass
class Probe:
    """One fault: ``code`` runs as a Python program (``n`` ranks under mpiexec when ``n`` > 1).

    ``expect``: the words a clear error must hold (all of them), or None when the fault must be absorbed; the
    program then prints ``HANDLED`` when it checked that it was, or ``SILENT <why>``.
    """

    name: str
    area: str
    code: str
    expect: list | None = None
    n: int = 1
    env: dict = field(default_factory=dict)
    timeout: float = 60.0
    section1: bool = False  # a rank failing outside a collective (issue 22 section 1)


# every program starts with these lines: the scratch folder is the working folder
PRELUDE = """
import json, os, sys, signal, subprocess, time
from pathlib import Path
import numpy as np
ROOT = Path(os.environ["FAULTS_ROOT"])
SCRATCH = Path.cwd()
def handled(ok, why=""):
    print("HANDLED" if ok else f"SILENT {why}", flush=True)
"""

TF_COUNTER = """
import workshop_lib.tf as tf
tf.logging.set_verbosity(tf.logging.ERROR)
def counter_graph():
    step = tf.train.get_or_create_global_step()
    counter = tf.Variable(np.zeros(4, np.float32), name="counter")
    train = tf.group(tf.assign_add(counter, np.ones(4, np.float32)), tf.assign_add(step, np.int64(1)))
    return step, train
def save_steps(directory, steps, max_to_keep=5, start_from=None):
    tf.reset_default_graph()
    step, train = counter_graph()
    saver = tf.train.Saver(max_to_keep=max_to_keep)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        if start_from:
            saver.restore(sess, start_from)
        for _ in range(steps):
            sess.run(train)
            saver.save(sess, str(Path(directory) / "model.ckpt"), global_step=step)
"""

LABS = """
from workshop_lib import course
def tree():
    sol = SCRATCH / "proj" / "solutions"
    (sol / "scripts").mkdir(parents=True, exist_ok=True)
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                     "source": "### BEGIN SOLUTION Exercise 1\\nanswer_is_forty_two_and_more_text = 42\\n### END SOLUTION\\n"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (sol / "a.ipynb").write_text(json.dumps(nb))
    (sol / "scripts" / "run.py").write_text("x = 1\\n")
    return sol, SCRATCH / "proj" / "labs"
"""

REPORT = """
from workshop_lib import board, cli
def report(**figure):
    fig = {"value": 2.0, "how": "a probe", "unit": "x"}
    fig.update(figure)
    return {"schema": board.SCHEMA, "learner": "probe", "cpu": "cpu", "features": {"avx2": True},
            "cores": {"physical": 2, "logical": 2}, "figures": {"int8_gemm_speedup": fig}}
def room(bad_text):
    folder = SCRATCH / "room"
    folder.mkdir(exist_ok=True)
    (folder / "good.json").write_text(json.dumps(report()))
    (folder / "bad.json").write_text(bad_text)
    return folder
def collect_probe(bad_text):
    folder = room(bad_text)
    rc = cli.main(["collect", str(folder), "-o", str(SCRATCH / "board.html")])
    text = (SCRATCH / "board.html").read_text() if (SCRATCH / "board.html").exists() else ""
    handled(rc == 0 and "probe" in text and "nan" not in text.lower(), f"rc {rc}")
"""


def _py(*parts):
    return "\n".join(textwrap.dedent(p) for p in (PRELUDE, *parts))


def probes(tmpfs_ok: bool) -> list:
    """Every probe of the campaign."""
    out = []

    def add(name, area, code, expect=None, **kw):
        libs = [TF_COUNTER] if "save_steps" in code or "tf." in code else []
        libs += [LABS] if "tree()" in code else []
        libs += [REPORT] if "report(" in code or "collect_probe(" in code else []
        libs += ["from workshop_lib import cli"] if "cli." in code else []
        out.append(Probe(name, area, _py(*libs, code), expect, **kw))

    # ---- kill: a rank or a save killed at any moment ------------------------------------------------------
    add("kill_rank_in_allreduce", "mpi kill", """
        import workshop_lib.hvd as hvd
        hvd.init()
        if hvd.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        hvd.allreduce(np.ones(1000, np.float32))
        print("unreachable", flush=True)
        """, expect=["rank 1"], n=2, timeout=60)
    add("kill_during_saves_leaves_a_resumable_checkpoint", "ckpt kill", """
        child = '''
        import sys, numpy as np
        from pathlib import Path
        import workshop_lib.tf as tf
        step = tf.train.get_or_create_global_step()
        v = tf.Variable(np.zeros(50000, np.float32), name="v")
        train = tf.group(tf.assign_add(v, np.ones(50000, np.float32)), tf.assign_add(step, np.int64(1)))
        saver = tf.train.Saver(max_to_keep=2)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            latest = tf.train.latest_checkpoint("ck")
            if latest: saver.restore(sess, latest)
            print("start", sess.run(step), flush=True)
            while True:
                sess.run(train); saver.save(sess, "ck/model.ckpt", global_step=step)
        '''
        import random, textwrap
        import workshop_lib.tf as tf
        rng, last, ok = random.Random(3), 0, True
        for kill in range(5):
            p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(child)], stdout=subprocess.PIPE, text=True)
            line = p.stdout.readline().split()
            ok &= line == ["start", str(last)]
            time.sleep(rng.uniform(0.2, 0.6)); p.kill(); p.wait()
            latest = tf.train.latest_checkpoint("ck")
            ok &= latest is not None
            last = int(np.load(latest + ".npz")["global_step"]) if latest else 0
        handled(ok and last > 0, f"resume failed at step {last}")
        """, timeout=120)

    # ---- raise: an exception on one rank -----------------------------------------------------------------
    add("raise_on_one_rank_inside_training", "mpi raise", """
        import workshop_lib.hvd as hvd
        hvd.init()
        if hvd.rank() == 1:
            raise RuntimeError("rank 1 failed on purpose")
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["rank 1 failed on purpose"], n=2)
    add("raise_on_one_rank_before_hvd_init", "mpi raise (section 1)", """
        import workshop_lib.hvd as hvd
        if os.environ.get("PMI_RANK") == "1":
            os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "soon"
        hvd.init()
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["HOROVOD_STALL_CHECK_TIME_SECONDS", "soon"], n=2, timeout=30, section1=True)
    add("simulate_nodes_on_one_rank_only", "mpi raise (section 1)", """
        if os.environ.get("PMI_RANK") == "1":
            os.environ["WORKSHOP_SIMULATE_NODES"] = "2"
        from workshop_lib.comm import Communicator
        c = Communicator()
        c.allreduce(np.ones(10))
        print("HANDLED", flush=True)
        """, expect=["WORKSHOP_SIMULATE_NODES"], n=2, timeout=30, section1=True)
    add("os_exit_on_one_rank", "mpi raise", """
        import workshop_lib.hvd as hvd
        hvd.init()
        if hvd.rank() == 1:
            os._exit(3)
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["rank 1"], n=2)

    # ---- hang: a rank that stops taking part ----------------------------------------------------------------
    add("collective_timeout_without_hvd_guard", "mpi hang (section 1)", """
        from workshop_lib.comm import Communicator
        c = Communicator(timeout=3)
        if c.rank == 1:
            time.sleep(45)
        c.allreduce(np.ones(10))
        """, expect=["rank", "3"], n=2, timeout=30, section1=True)
    add("stall_check_disable_false_keeps_the_inspector", "mpi hang", """
        import workshop_lib.hvd as hvd
        hvd.init()
        if hvd.rank() == 1:
            time.sleep(45)
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["Missing ranks: 1"], n=2, timeout=30, section1=True,
        env={"HOROVOD_STALL_CHECK_DISABLE": "false", "HOROVOD_STALL_CHECK_TIME_SECONDS": "2",
             "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"})
    add("stuck_rank_ends_at_the_stall_shutdown", "mpi hang", """
        import workshop_lib.hvd as hvd
        hvd.init()
        if hvd.rank() == 1:
            time.sleep(45)
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["Missing ranks: 1"], n=2, timeout=30,
        env={"HOROVOD_STALL_CHECK_TIME_SECONDS": "2", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"})

    # ---- mismatch: ranks that disagree ------------------------------------------------------------------
    add("allreduce_shape_mismatch", "mpi mismatch", """
        import workshop_lib.hvd as hvd
        hvd.init()
        hvd.allreduce(np.ones(10 + hvd.rank(), np.float32))
        """, expect=["shape"], n=2)
    add("d4p_one_rank_not_distributed", "mpi mismatch (section 1)", """
        import workshop_lib.d4p as d4p
        d4p.daalinit()
        data = np.random.default_rng(d4p.my_procid()).random((200, 3))
        init = d4p.kmeans_init(4, method="randomDense", distributed=d4p.my_procid() == 0).compute(data)
        d4p.kmeans(4, 5, distributed=d4p.my_procid() == 0).compute(data, init.centroids)
        """, expect=["distributed"], n=2, timeout=30, section1=True)
    add("d4p_cluster_count_mismatch", "mpi mismatch", """
        import workshop_lib.d4p as d4p
        d4p.daalinit()
        data = np.random.default_rng(d4p.my_procid()).random((200, 3))
        d4p.kmeans_init(4 + d4p.my_procid(), method="randomDense", distributed=True).compute(data)
        """, expect=["nClusters"], n=2)

    # ---- bad environment values ------------------------------------------------------------------------------
    add("fusion_threshold_with_unit", "env", """
        import workshop_lib.hvd as hvd
        hvd.init()
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["HOROVOD_FUSION_THRESHOLD", "64MB"], n=2, env={"HOROVOD_FUSION_THRESHOLD": "64MB"},
        section1=True)  # read only by a fused allreduce today; section 1 reads every variable at start-up
    add("stall_check_time_not_a_number", "env", """
        import workshop_lib.hvd as hvd
        hvd.init()
        """, expect=["HOROVOD_STALL_CHECK_TIME_SECONDS", "soon"], env={"HOROVOD_STALL_CHECK_TIME_SECONDS": "soon"})
    add("exit_timeout_not_a_number", "env", """
        import workshop_lib.hvd as hvd
        hvd.init()
        hvd.allreduce(np.ones(10, np.float32))
        hvd.shutdown() if False else None
        """, expect=["WORKSHOP_HVD_EXIT_TIMEOUT", "abc"], n=2, env={"WORKSHOP_HVD_EXIT_TIMEOUT": "abc"},
        section1=True)  # read at exit today; section 1 reads every variable at start-up
    add("numba_num_threads_zero", "env", """
        import workshop_lib.hvd as hvd
        hvd.init()
        """, expect=["NUMBA_NUM_THREADS", "0"], env={"NUMBA_NUM_THREADS": "0"})
    add("timeline_unwritable", "env outputs", """
        import workshop_lib.hvd as hvd
        hvd.init()
        hvd.allreduce(np.ones(10, np.float32))
        """, expect=["HOROVOD_TIMELINE", "/proc/t.json", "expected"], n=2, env={"HOROVOD_TIMELINE": "/proc/t.json"})
    add("timeline_is_a_folder", "env outputs", """
        import workshop_lib.hvd as hvd
        hvd.init()
        """, expect=["HOROVOD_TIMELINE", "is a folder"], env={"HOROVOD_TIMELINE": "/tmp"})

    # ---- checkpoints: corrupt and missing indexes, the './' prefix, a file in the folder's place -------------
    for label, index in (("missing", None), ("text_garbage", b"garbage\n"), ("binary", b"\xcd\xff\x00\x81"),
                         ("names_outside", b'model_checkpoint_path: "../victim"\nall_model_checkpoint_paths: "../victim"\n')):
        add(f"ckpt_index_{label}_keeps_history", "ckpt bad files", f"""
            np.savez("victim.npz", x=np.zeros(1))
            save_steps("ck", 3)
            index = {index!r}
            if index is None:
                os.unlink("ck/checkpoint")
            else:
                Path("ck/checkpoint").write_bytes(index)
            latest = tf.train.latest_checkpoint("ck")
            save_steps("ck", 2, max_to_keep=5, start_from=latest)
            names = sorted(os.listdir("ck"))
            handled(names == ["checkpoint"] + [f"model.ckpt-{{i}}.npz" for i in (1, 2, 3, 4, 5)]
                    and Path("victim.npz").exists(), str(names))
            """)
    add("ckpt_dot_slash_dir_keeps_the_new_file", "ckpt bad files", """
        save_steps("./ck", 3, max_to_keep=2)
        names = sorted(os.listdir("ck"))
        handled(names == ["checkpoint", "model.ckpt-2.npz", "model.ckpt-3.npz"], str(names))
        """)
    add("ckpt_truncated_newest_falls_back", "ckpt bad files", """
        save_steps("ck", 3)
        data = Path("ck/model.ckpt-3.npz").read_bytes()
        Path("ck/model.ckpt-3.npz").write_bytes(data[:100])
        handled(tf.train.latest_checkpoint("ck") == "ck/model.ckpt-2")
        """)
    add("ckpt_dir_is_a_file", "ckpt bad files", """
        Path("ck").write_text("x")
        step, train = counter_graph()
        tf.train.MonitoredTrainingSession(checkpoint_dir="ck", save_checkpoint_steps=1)
        """, expect=["checkpoint_dir", "ck", "is a file"])
    add("ckpt_restore_pickle_refused", "ckpt bad files", """
        import pickle
        Path("evil.npz").write_bytes(pickle.dumps({"v": 1}))
        step, train = counter_graph()
        with tf.Session() as sess:
            tf.train.Saver().restore(sess, "evil.npz")
        """, expect=["evil.npz", "not a complete checkpoint"])

    # ---- build-labs: crafted and corrupt manifests, markers ----------------------------------------------------
    for label, manifest in (("traversal", '{"files": {"../../outside.txt": "%s"}}'),
                            ("absolute", '{"files": {"%s": "%s"}}'),
                            ("binary", None), ("files_is_a_list", '{"files": ["a.ipynb"]}')):
        add(f"labs_manifest_{label}", "build-labs bad files", f"""
            import hashlib
            sol, labs = tree()
            outside = SCRATCH / "outside.txt"
            outside.write_text("precious")
            digest = hashlib.sha256(b"precious").hexdigest()
            labs.mkdir(parents=True)
            (labs / "a.ipynb").write_text("the learner's work")
            template = {manifest!r}
            if template is None:
                (labs / course.MANIFEST).write_bytes(b"\\xcd\\xff\\x00")
            elif template.count("%s") == 2:
                (labs / course.MANIFEST).write_text(template % (outside, digest))
            elif "%s" in template:
                (labs / course.MANIFEST).write_text(template % digest)
            else:
                (labs / course.MANIFEST).write_text(template)
            course.build_labs(sol, labs)
            handled(outside.read_text() == "precious" and (labs / "a.ipynb").read_text() == "the learner's work"
                    and (labs / "a.updated.ipynb").exists(), "a file was lost or overwritten")
            """)
    add("labs_symlinked_folder", "build-labs bad files", """
        sol, labs = tree()
        course.build_labs(sol, labs)
        elsewhere = SCRATCH / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "run.py").write_text("x = 1\\n")
        import shutil
        shutil.rmtree(labs / "scripts")
        (labs / "scripts").symlink_to(elsewhere)
        (sol / "scripts" / "run.py").unlink()
        course.build_labs(sol, labs)
        handled((elsewhere / "run.py").exists(), "a file behind a symlink was deleted")
        """)
    for label, src in (("lowercase", "### begin solution\\nsecret_answer_is_here_12345 = 1\\n### end solution\\n"),
                       ("no_space", "###BEGIN SOLUTION\\nsecret_answer_is_here_12345 = 1\\n### END SOLUTION\\n"),
                       ("html_in_code", "# <!--BEGIN SOLUTION-->\\nsecret_answer_is_here_12345 = 1\\n"),
                       ("missing_end", "### BEGIN SOLUTION\\nsecret_answer_is_here_12345 = 1\\n")):
        add(f"labs_marker_{label}", "build-labs markers", f"""
            sol, labs = tree()
            nb = json.loads((sol / "a.ipynb").read_text())
            nb["cells"].append({{"cell_type": "code", "metadata": {{}}, "outputs": [], "execution_count": None,
                                 "source": {src!r}}})
            (sol / "a.ipynb").write_text(json.dumps(nb))
            from workshop_lib import cli
            rc = cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)])
            leaked = labs.exists() and "secret_answer" in (labs / "a.ipynb").read_text()
            sys.exit(rc) if not leaked else print("SILENT leaked", flush=True)
            """, expect=["a.ipynb, cell 1"])
    add("labs_markdown_marker_no_spaces", "build-labs markers", """
        sol, labs = tree()
        nb = json.loads((sol / "a.ipynb").read_text())
        nb["cells"].append({"cell_type": "markdown", "metadata": {},
                            "source": "<!--BEGIN SOLUTION-->\\nThe secret answer is here, 12345.\\n<!--END SOLUTION-->\\n"})
        (sol / "a.ipynb").write_text(json.dumps(nb))
        from workshop_lib import cli
        rc = cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)])
        leaked = labs.exists() and "secret answer" in (labs / "a.ipynb").read_text()
        sys.exit(rc) if not leaked else print("SILENT leaked", flush=True)
        """, expect=["a.ipynb, cell 1"])
    add("labs_is_a_file", "build-labs bad files", """
        sol, labs = tree()
        labs.write_text("x")
        from workshop_lib import cli
        sys.exit(cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)]))
        """, expect=["labs=", "is a file"])

    # ---- report / collect: invalid reports, output paths ---------------------------------------------------------
    for label, text in (("nan", "NaN"), ("infinity", "Infinity"), ("bool", "true"), ("huge_int", "1" + "0" * 400)):
        add(f"collect_value_{label}", "report schema", f"""
            collect_probe(json.dumps(report()).replace('"value": 2.0', '"value": {text}'))
            """)
    add("collect_how_is_a_number", "report schema", "collect_probe(json.dumps(report(how=5)))")
    add("collect_unit_is_a_list", "report schema", "collect_probe(json.dumps(report(unit=['x'])))")
    add("collect_cores_is_a_list", "report schema", """
        r = report(); r["cores"]["physical"] = [1, 2]
        collect_probe(json.dumps(r))
        """)
    add("collect_deep_nesting", "report schema", "collect_probe('[' * 100000 + ']' * 100000)")
    add("collect_binary_file", "report schema", "collect_probe('\\udcff'.encode('utf-8', 'surrogateescape').decode('latin-1'))")
    add("report_invalid_results_file", "report schema", """
        Path("results.json").write_text(json.dumps({"figures": {"x": 5}}))
        os.environ["WORKSHOP_RESULTS"] = "results.json"
        sys.exit(cli.main(["report", "-o", "me.json"]))
        """, expect=["figure 'x'", "results.json", "expected"])
    add("report_name_traversal", "outputs", """
        (SCRATCH / "w").mkdir()
        os.chdir(SCRATCH / "w")
        rc = cli.main(["report", "--name", "x/../../evil"])
        if (SCRATCH / "evil.json").exists():
            print("SILENT wrote outside", flush=True)
        sys.exit(rc)
        """, expect=["--name", "x/../../evil", "expected"])
    add("report_out_proc", "outputs", "sys.exit(cli.main(['report', '-o', '/proc/r.json']))",
        expect=["out=", "/proc/r.json", "cannot write"])
    add("collect_out_unknown_extension", "outputs", """
        folder = room(json.dumps(report()))
        sys.exit(cli.main(["collect", str(folder), "-o", "board.pdf"]))
        """, expect=["board.pdf", ".png or .html"])
    add("train_out_proc_before_training", "outputs", """
        from workshop_lib import cli
        t0 = time.monotonic()
        rc = cli.main(["train", "mnist", "--out", "/proc/x.npz", "--quiet"])
        print("seconds", time.monotonic() - t0, flush=True)
        sys.exit(rc)
        """, expect=["--out", "/proc/x.npz", "cannot write"])
    add("mnist_script_results_proc", "outputs", """
        sys.argv = ["tensorflow_mnist.py", "--results", "/proc/r.json", "--steps", "1"]
        import runpy
        runpy.run_path(str(ROOT / "labs" / "scripts" / "tensorflow_mnist.py"), run_name="__main__")
        """, expect=["--results", "/proc/r.json", "cannot write"])
    add("allreduce_timing_negative_size", "bad arguments", """
        sys.argv = ["allreduce_timing.py", "--sizes", "-4"]
        import runpy
        runpy.run_path(str(ROOT / "labs" / "scripts" / "allreduce_timing.py"), run_name="__main__")
        """, expect=["--sizes", "-4", "expected"])

    # ---- bad public input: kernels, int8, quantization, data -------------------------------------------------
    add("read_idx_overflowing_header", "bad files", """
        from workshop_lib.data import read_idx
        Path("x.idx").write_bytes(bytes([0, 0, 8, 1]) + (2**31 - 1).to_bytes(4, "big") + b"abc")
        read_idx("x.idx")
        """, expect=["x.idx"])
    add("mnist_idx_truncated", "bad files", """
        from workshop_lib.data import read_idx
        Path("t.idx").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") * 3 + b"\\0" * 50)
        read_idx("t.idx")
        """, expect=["t.idx"])
    add("quantization_nan_range", "bad input", """
        from workshop_lib import quantization
        quantization.choose_qparams(np.nan, 1.0)
        """, expect=["min_val", "nan"])
    add("int8_gemm_float_input", "bad input", """
        from workshop_lib import int8
        int8.gemm_u8s8s32(np.ones((2, 4), np.float32), np.ones((4, 2), np.int8))
        """, expect=["a", "uint8"])
    add("conv_negative_padding", "bad input", """
        from workshop_lib import kernels
        kernels.conv2d_forward(np.zeros((1, 4, 4, 1), np.float32), np.zeros((3, 3, 1, 1), np.float32), padding=-1)
        """, expect=["padding", "-1"])

    # ---- full disk ----------------------------------------------------------------------------------------
    if tmpfs_ok:
        add("full_disk_save_keeps_the_old_checkpoint", "full disk", """
            os.makedirs("disk", exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "disk"], check=True)
            try:
                save_steps("disk/ck", 1)
                Path("disk/filler").write_bytes(b"\\0" * 0)
                try:
                    with open("disk/filler", "wb") as f:
                        f.write(b"\\0" * 200000)
                except OSError:
                    pass
                tf.reset_default_graph()
                step, train = counter_graph()
                big = tf.Variable(np.zeros(100000, np.float32), name="big")
                try:
                    with tf.Session() as sess:
                        sess.run(tf.global_variables_initializer())
                        tf.train.Saver().save(sess, "disk/ck/model.ckpt", global_step=7)
                    print("SILENT save on a full disk succeeded", flush=True)
                except OSError as exc:
                    kept = tf.train.latest_checkpoint("disk/ck") == "disk/ck/model.ckpt-1"
                    leftovers = [n for n in os.listdir("disk/ck") if ".tmp" in n]
                    handled(kept and not leftovers and "No space" in str(exc), f"{exc} {leftovers}")
            finally:
                subprocess.run(["umount", "disk"], check=True)
            """)
        add("full_disk_report_out", "full disk", """
            os.makedirs("disk", exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", "disk"], check=True)
            try:
                try:
                    with open("disk/filler", "wb") as f:
                        f.write(b"\\0" * 100000)
                except OSError:
                    pass
                rc = cli.main(["report", "-o", "disk/r.json"])
            finally:
                subprocess.run(["umount", "disk"], check=True)
            sys.exit(rc)
            """, expect=["disk/r.json", "No space left"])
    return out


def _mountable() -> bool:
    """True if this process may mount a small tmpfs (root, and a kernel and container that allow it)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    with tempfile.TemporaryDirectory() as folder:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", folder],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", folder], check=False)
    return ok


def _kill_group(proc):
    """Kill the process group this campaign started for a probe (by its id), if anything is left in it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_probe(probe: Probe, scratch: Path, mpiexec: str | None, root: Path = ROOT) -> dict:
    """Run one probe in ``scratch`` against the checkout ``root``; returns its outcome as a dict."""
    program = scratch / "probe.py"
    program.write_text(probe.code)
    env = {**os.environ, "FAULTS_ROOT": str(root), "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1", "WORKSHOP_RESULTS": str(scratch / "results.json"), **probe.env}
    if probe.n > 1:
        if mpiexec is None:
            return {"name": probe.name, "area": probe.area, "category": "skipped", "seconds": 0.0,
                    "detail": "no mpiexec"}
        command = [mpiexec, "-n", str(probe.n), sys.executable, str(program)]
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("NUMBA_NUM_THREADS", "1")
    else:
        command = [sys.executable, str(program)]
    t0 = time.monotonic()
    proc = subprocess.Popen(command, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=probe.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        timed_out = True
    _kill_group(proc)  # anything the probe left running (an orphaned rank)
    seconds = time.monotonic() - t0
    rc = proc.returncode
    last = [line for line in output.strip().splitlines() if line.strip()]
    tail = last[-1][:300] if last else ""
    if timed_out:
        category = "hang"
    elif "SILENT" in output:
        category, tail = "silent", next(line for line in output.splitlines() if "SILENT" in line)[:300]
    elif probe.expect is None:
        category = "handled" if rc == 0 and "HANDLED" in output else ("crash" if rc < 0 else "unclear")
    elif rc == 0:
        category = "silent"  # an error was due
    elif rc < 0 or rc in (128 + signal.SIGSEGV, 128 + signal.SIGABRT, 128 + signal.SIGBUS) and "Error" not in output:
        category = "crash"
    else:
        category = "clear" if all(word in output for word in probe.expect) else "unclear"
    return {"name": probe.name, "area": probe.area, "category": category, "seconds": round(seconds, 1),
            "rc": rc, "detail": tail, "section1": probe.section1}


def _table(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(r[key], {c: 0 for c in CATEGORIES})
        if r["category"] in CATEGORIES:
            groups[r[key]][r["category"]] += 1
    lines = [f"| {key} | probes | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for name, counts in sorted(groups.items()):
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts[c]) for c in CATEGORIES) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run only probes whose name or area contains this text (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    parser.add_argument("--json", help="write every outcome to this .json file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--root", default=str(ROOT),
                        help="the course checkout whose workshop_lib and labs the probes use (default: this one); "
                             "another commit's checkout gives the before/after")
    args = parser.parse_args(argv)
    if not (Path(args.root) / "workshop_lib" / "__init__.py").is_file():
        parser.error(f"argument --root: expected a checkout of the course (with workshop_lib/), got {args.root}")
    if args.json:
        sys.path.insert(0, str(ROOT))
        from workshop_lib.data import check_output_path

        try:
            check_output_path(args.json, (".json",), "--json")
        except ValueError as exc:
            parser.error(str(exc))
    tmpfs_ok = _mountable()
    selected = [p for p in probes(tmpfs_ok) if not args.only or any(o in p.name or o in p.area for o in args.only)]
    if args.list:
        for p in selected:
            print(f"{p.area:28s} {p.name}")
        return 0
    sys.path.insert(0, str(ROOT))
    from workshop_lib.sysinfo import mpiexec_path

    mpiexec = mpiexec_path()
    base = Path(tempfile.mkdtemp(prefix="workshop-faults-"))
    print(f"{len(selected)} probes of {Path(args.root).resolve()} in {base}" + ("" if tmpfs_ok else "; no tmpfs can be mounted here: full-disk "
                                                "probes left out"), flush=True)
    rows, t0 = [], time.monotonic()
    try:
        for i, probe in enumerate(selected):
            scratch = base / probe.name
            scratch.mkdir()
            row = run_probe(probe, scratch, mpiexec, Path(args.root).resolve())
            rows.append(row)
            print(f"[{i + 1:3d}/{len(selected)}] {row['category']:8s} {row['seconds']:5.1f}s  {probe.area:24s} "
                  f"{probe.name}" + (f"  | {row['detail']}" if row["category"] not in ("clear", "handled") else ""),
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    totals = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    print()
    print(_table(rows, "area"))
    print()
    print(f"totals over {len(rows)} probes in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{totals[c]} {c}" for c in CATEGORIES))
    s1 = [r for r in rows if r["section1"]]
    if s1:
        print("section 1 probes (a rank failing outside a collective): "
              + ", ".join(f"{r['name']}={r['category']}" for r in s1))
    if args.json:
        from workshop_lib.data import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps({"totals": totals, "probes": rows},
                                                                            indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
