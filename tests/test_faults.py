"""The fault campaign (benchmarks/faults.py) runs and classifies its outcomes (a small subset of its probes)."""

import json
import subprocess
import sys


def test_the_fault_campaign_classifies_handled_clear_and_silent_probes(root, tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "benchmarks/faults.py", "--only", "labs_manifest_traversal",
                           "--only", "labs_is_a_file", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outcomes = {p["name"]: p["category"] for p in json.loads(out.read_text())["probes"]}
    assert outcomes == {"labs_manifest_traversal": "handled", "labs_is_a_file": "clear"}, proc.stdout
    assert "totals over 2 probes" in proc.stdout and "1 clear, 0 unclear, 0 silent, 0 hang, 0 crash, 1 handled" \
        in proc.stdout


def test_a_probe_that_finds_no_error_where_one_was_due_is_silent(tmp_path):
    from importlib import util

    from conftest import ROOT

    spec = util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    faults = util.module_from_spec(spec)
    sys.modules["faults"] = faults  # dataclasses look their module up there
    spec.loader.exec_module(faults)
    probe = faults.Probe("quiet", "test", faults._py("print('no error')"), expect=["x"])
    assert faults.run_probe(probe, tmp_path, None)["category"] == "silent"
    probe = faults.Probe("slow", "test", faults._py("time.sleep(30)"), timeout=2)
    assert faults.run_probe(probe, tmp_path, None)["category"] == "hang"
    probe = faults.Probe("segv", "test", faults._py("os.kill(os.getpid(), signal.SIGSEGV)"), expect=["x"])
    assert faults.run_probe(probe, tmp_path, None)["category"] == "crash"
