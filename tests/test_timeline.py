"""HOROVOD_TIMELINE: a Chrome-trace JSON of every rank's steps (compute, wait, allreduce, update), and its drawing."""

import json
import os
import re

import pytest

from workshop_lib import timeline

SCRIPT = "tests/mpi_scripts/timeline_train.py"
STEPS = 4
PARAMETERS = 64 * 128 + 128 + 128 * 10 + 10  # the script's two dense layers


def _chrome_trace(path):
    """The file parsed as Chrome's trace-event format requires: a traceEvents list of well-formed events."""
    document = json.loads(path.read_text())
    events = document["traceEvents"]
    for e in events:
        assert e["ph"] in ("X", "M") and isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0 and e["tid"] == 0
    return events


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_horovod_timeline_writes_one_chrome_trace_with_every_ranks_steps(mpirun, tmp_path, n):
    path = tmp_path / "timeline.json"
    proc = mpirun(n, [SCRIPT, "--steps", str(STEPS)], timeout=180, env={**os.environ, "HOROVOD_TIMELINE": str(path)})
    assert sorted(re.findall(r"rank \d+: \d+ steps", proc.stdout)) == [f"rank {r}: {STEPS} steps" for r in range(n)]
    events = _chrome_trace(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.json"]  # the per-rank parts were merged
    assert {e["pid"] for e in events if e["ph"] == "M"} == set(range(n))
    complete = [e for e in events if e["ph"] == "X"]
    for r in range(n):
        mine = sorted((e for e in complete if e["pid"] == r), key=lambda e: e["ts"])
        names = [e["name"] for e in mine]
        steps = [e for e in mine if e["name"] == "update"]
        assert len(steps) == STEPS and names.count("compute") == STEPS - 1
        reduces = [e for e in mine if e["name"] == "allreduce"]
        assert len(reduces) == STEPS + 1 and names.count("wait") == STEPS + 1  # + the eager hvd.allreduce
        for e in reduces[:STEPS]:
            assert e["args"]["bytes"] == 4 * PARAMETERS and e["args"]["tensors"] == 4
            assert e["args"]["algorithm"] in ("ring", "recursive_doubling", "shared_memory", "hierarchical")
        assert reduces[-1]["args"]["bytes"] == 5 * 8 and reduces[-1]["args"]["tensors"] == 1
        for k in range(STEPS):  # within a step: wait, then allreduce, then update, never overlapping
            step = [e for e in mine if e["args"]["step"] == k and e["name"] in ("wait", "allreduce", "update")]
            assert [e["name"] for e in step] == ["wait", "allreduce", "update"]
            for a, b in zip(step, step[1:]):
                assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
    totals = timeline.phase_totals(complete)
    assert sorted(totals) == list(range(n)) and all(set(t) == set(timeline.PHASES) for t in totals.values())


@pytest.mark.mpi
def test_a_timeline_that_cannot_be_written_fails_hvd_init_on_every_rank(mpirun, tmp_path):
    """Before: a FileNotFoundError traceback from the exit hook on every rank, and exit status 0."""
    for path, why in (("/proc/timeline.json", "cannot write in the folder /proc"), (str(tmp_path), "is a folder")):
        proc = mpirun(2, [SCRIPT, "--steps", "1"], timeout=120, check=False,
                      env={**os.environ, "HOROVOD_TIMELINE": path})
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        message = f"the timeline cannot be written on rank(s) 0, 1: HOROVOD_TIMELINE={path!r}: {why}"
        assert out.count(message) == 2, out  # on both ranks, at hvd.init(), before any step
        assert "steps" not in proc.stdout


def test_check_path_names_every_rank_that_cannot_write(tmp_path):
    class Ranks:  # three ranks' answers, as comm.allgather returns them
        def allgather(self, mine):
            return [None, mine, "HOROVOD_TIMELINE='x': cannot write"]

    timeline.check_path(tmp_path / "t.json")
    with pytest.raises(ValueError, match=r"on rank\(s\) 2: HOROVOD_TIMELINE='x': cannot write"):
        timeline.check_path(tmp_path / "t.json", Ranks())


def test_a_single_process_timeline_and_its_drawing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "t.json"
    line = timeline.Timeline(path)
    line.add("wait", 1000.0, 1500.0)
    line.add("allreduce", 1500.0, 3500.0, bytes=8, algorithm="ring")
    line.mark_update_end()
    line.add("compute", line.last_update_end, line.last_update_end + 100.0)
    line.close()
    events = timeline.load(path)
    assert [e["name"] for e in events] == ["wait", "allreduce", "update", "compute"]
    assert events[0]["ts"] == 0 and events[1]["ts"] == 500 and events[1]["dur"] == 2000
    assert timeline.phase_totals(events)[0]["allreduce"] == 2.0
    ax = timeline.draw(path)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"wait", "allreduce", "update", "compute"}
    with pytest.raises(ValueError, match="no timeline events"):
        timeline.draw(path, steps=(5, 6))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not a readable"):
        timeline.load(tmp_path / "bad.json")
