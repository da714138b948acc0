"""A per-rank timeline of data-parallel training, as Chrome-trace JSON (Horovod's ``HOROVOD_TIMELINE``).

Mirrors Horovod's timeline: set ``HOROVOD_TIMELINE=/path/timeline.json`` and open the file in
``chrome://tracing`` or https://ui.perfetto.dev. The one idea: a step of every rank is compute (forward and
backward), then a wait for the slowest rank, then the allreduce, then the update, and the speed-up is
lost wherever one of the three that are not compute grows. :func:`draw` shows it with matplotlib.

Events per rank (one process row per rank, Chrome's ``pid``):

- ``compute``: forward + backward, from the end of the previous step's update to the allreduce (it also
  holds the training loop's own work between ``Session.run`` calls; the first step has none, its start
  is not seen from Horovod's side);
- ``wait``: waiting for the other ranks to reach the allreduce (a barrier the timeline adds, as Horovod's
  NEGOTIATE phase: without the timeline that time is inside the allreduce);
- ``allreduce``: the fused allreduce, with its bytes, tensors and the algorithm that ran;
- ``update``: the optimizer's update after the allreduce.

Each rank keeps its events in memory; at exit every rank writes ``PATH.rankR`` and, once all have, rank 0
merges them into ``PATH`` (and removes the parts). Timestamps are microseconds since the earliest event of
the job, on each node's clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import job
from .data import atomic_write, check_output_path

__all__ = ["ENV", "PHASES", "Timeline", "check_path", "load", "phase_totals", "draw"]

ENV = "HOROVOD_TIMELINE"
PHASES = ("compute", "wait", "allreduce", "update")
_COLOURS = {"compute": "tab:blue", "wait": "tab:red", "allreduce": "tab:orange", "update": "tab:green"}


def _now_us():
    return time.time_ns() / 1000.0


def check_path(path, comm=None):
    """Check on every rank, at start-up, that each can write the timeline ``path`` (its part, and rank 0 the merge).

    Collective over ``comm`` (an mpi4py communicator; None: this process only): if any rank cannot write,
    every rank raises the same ValueError, naming the ranks and why, so the job ends at ``hvd.init()``
    instead of a traceback at exit with status 0.
    """
    try:
        check_output_path(path, (".json",), ENV)
        problem = None
    except ValueError as exc:
        problem = str(exc)
    problems = [problem] if comm is None else comm.allgather(problem)
    failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if failed:
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise ValueError(f"the timeline cannot be written on rank(s) {ranks}: {failed[0][1]}")


class Timeline:
    """One rank's events. ``with timeline.span("allreduce", bytes=...)``; :meth:`close` writes the file (collective)."""

    def __init__(self, path, rank=0, size=1, comm=None):
        self.path = Path(path)
        self.rank, self.size, self.comm = int(rank), int(size), comm
        self.events = []
        self.step = 0
        self.last_update_end = None
        self.closed = False

    def add(self, name, start_us, end_us, **args):
        """Record a complete event ``name`` from ``start_us`` to ``end_us`` (``time.time_ns() / 1000``)."""
        self.events.append({"name": name, "cat": name if name in PHASES else "other", "ph": "X", "pid": self.rank,
                            "tid": 0, "ts": start_us, "dur": max(0.0, end_us - start_us),
                            "args": {"step": self.step, **args}})

    def span(self, name, **args):
        """A context manager recording the time spent inside it as event ``name``."""
        return _Span(self, name, args)

    def mark_update_end(self):
        """Called when the optimizer's update has run: closes the step's ``update`` span."""
        end = _now_us()
        allreduce_end = next((e["ts"] + e["dur"] for e in reversed(self.events)
                              if e["name"] == "allreduce" and e["args"]["step"] == self.step), None)
        if allreduce_end is not None:  # a pass that only accumulated (backward_passes_per_step > 1) has none
            self.add("update", allreduce_end, end)
        self.last_update_end = end
        self.step += 1

    def _document(self, events):
        meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
                for r in sorted({e["pid"] for e in events} | {self.rank})]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms",
                "otherData": {"source": "workshop_lib.timeline", "ranks": self.size}}

    def close(self, wait_seconds=60.0):
        """Write this rank's part, then (rank 0, once every rank has written or ``wait_seconds`` passed) the merge."""
        if self.closed:
            return
        self.closed = True
        if self.size == 1 or self.comm is None:
            _write_json(self.path, self._document(_rebased(self.events)))
            return
        part = self.path.with_name(f"{self.path.name}.rank{self.rank}")
        _write_json(part, self._document(self.events))
        request = self.comm.Ibarrier()
        job.wait(request.Test, spin=False, deadline=time.monotonic() + wait_seconds)  # the job's one wait policy
        if self.rank != 0:
            return
        events, missing = [], []
        for r in range(self.size):
            p = self.path.with_name(f"{self.path.name}.rank{r}")
            try:
                events += [e for e in json.loads(p.read_text())["traceEvents"] if e.get("ph") == "X"]
                p.unlink()
            except (OSError, ValueError, KeyError):
                missing.append(r)
        document = self._document(_rebased(events))
        if missing:
            document["otherData"]["missing_ranks"] = missing
        _write_json(self.path, document)


class _Span:
    def __init__(self, timeline, name, args):
        self.timeline, self.name, self.args = timeline, name, args

    def __enter__(self):
        self.start = _now_us()
        return self

    def __exit__(self, *exc):
        self.timeline.add(self.name, self.start, _now_us(), **self.args)
        return False


def _rebased(events):
    if not events:
        return []
    origin = min(e["ts"] for e in events)
    return [{**e, "ts": round(e["ts"] - origin, 3), "dur": round(e["dur"], 3)} for e in events]


def _write_json(path, document):
    text = json.dumps(document)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load(path):
    """The complete events (``ph == "X"``) of a Chrome-trace file, checked; raises ValueError naming the file."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable Chrome-trace JSON file ({exc})") from None
    events = document.get("traceEvents") if isinstance(document, dict) else document
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def phase_totals(events):
    """``{rank: {phase: milliseconds}}`` summed over the steps: where each rank's time went."""
    totals = {}
    for e in events:
        if e["name"] in PHASES:
            by_phase = totals.setdefault(e["pid"], dict.fromkeys(PHASES, 0.0))
            by_phase[e["name"]] += e["dur"] / 1000.0
    return totals


def draw(events_or_path, ax=None, steps=None):
    """Draw the timeline: one row per rank, a bar per phase; returns the matplotlib Axes.

    Parameters
    ----------
    events_or_path : list of dict, str or Path
        Events (as :func:`load` returns) or a timeline file.
    ax : matplotlib Axes, optional
    steps : (first, last), optional
        Only the steps from ``first`` to ``last`` (inclusive), to zoom in.
    """
    events = load(events_or_path) if isinstance(events_or_path, (str, Path)) else list(events_or_path)
    if steps is not None:
        first, last = steps
        events = [e for e in events if first <= e.get("args", {}).get("step", 0) <= last]
    events = [e for e in events if e["name"] in PHASES]
    if not events:
        raise ValueError("no timeline events to draw (was HOROVOD_TIMELINE set, and did a step run?)")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(10, 1 + 0.6 * len({e['pid'] for e in events})))
    origin = min(e["ts"] for e in events)
    ranks = sorted({e["pid"] for e in events})
    labelled = set()
    for row, rank in enumerate(ranks):
        for phase in PHASES:
            bars = [((e["ts"] - origin) / 1000.0, e["dur"] / 1000.0) for e in events
                    if e["pid"] == rank and e["name"] == phase]
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), color=_COLOURS[phase],
                               label=None if phase in labelled else phase)
                labelled.add(phase)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper right", ncol=len(PHASES), fontsize=8)
    return ax
