"""The class results board: every learner's measured figures, side by side, grouped by what their CPU can do.

No course package has one: a speed-up measured on one laptop is an anecdote, thirty of them are a
distribution. The labs keep their figures with :func:`workshop_lib.bench.record`; ``workshop report``
writes them, with the CPU's model, features and cores, as one JSON file per learner; ``workshop collect``
reads a folder of those files and plots the room's spread, grouped by VNNI / AMX and core count, so an
instructor can show why an int8 speed-up is 4x on one machine and 1.3x on the next.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import platform
import time
from pathlib import Path

from .bench import load_results
from .data import atomic_write

__all__ = ["SCHEMA", "FIGURES", "make_report", "write_report", "load_reports", "group_of", "board_table", "collect"]

SCHEMA = "workshop-report/1"

# the figures the labs record, in the board's order: name -> (unit, what it is)
FIGURES = {
    "int8_gemm_speedup": ("x", "int8 GEMM over numpy's fp32 GEMM (lab 01)"),
    "int8_cnn_speedup": ("x", "int8 CNN inference over fp32 (lab 01)"),
    "cnn_train_images_per_s_stock": ("images/s", "CNN training, stock: reference kernels for sandybridge (lab 02)"),
    "cnn_train_images_per_s_reference": ("images/s", "CNN training, reference: the same kernels for this CPU (lab 02)"),
    "cnn_train_images_per_s_optimized": ("images/s", "CNN training, optimized: fast kernels and fusion (lab 02)"),
    "allreduce_bus_GBps": ("GB/s", "allreduce bus bandwidth, 2 ranks, large message (lab 03)"),
    "memcopy_GBps": ("GB/s", "memory copy, read + write (lab 03)"),
    "hvd_speedup_2_ranks": ("x", "training speed-up, 2 ranks over 1 (lab 03)"),
    "hvd_speedup_4_ranks": ("x", "training speed-up, 4 ranks over 1 (lab 03)"),
    "kmeans_ms_per_iteration_threads": ("ms", "Lloyd iteration, 1 rank x all threads (lab 04)"),
    "kmeans_ms_per_iteration_processes": ("ms", "Lloyd iteration, all ranks x 1 thread (lab 04)"),
}

_BATCH_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def _where():
    if any(os.environ.get(v) for v in _BATCH_JOB_VARIABLES):
        return "cluster node"
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return "container"
    return "workstation"


def make_report(learner=None, figures=None):
    """This learner's report: CPU model and features, cores, where it ran, and the recorded figures.

    Parameters
    ----------
    learner : str, optional
        A name to show on the board; default an anonymous, stable id (a hash of user and host name).
    figures : dict, optional
        ``{name: {"value", "how", ...}}``; default the results file (:func:`workshop_lib.bench.load_results`).
    """
    from . import sysinfo

    if learner is not None and (not isinstance(learner, str) or not learner.strip()):
        raise ValueError(f"learner={learner!r} must be a non-empty name, or None for an anonymous id")
    if learner is None:
        user = os.environ.get("USER") or os.environ.get("USERNAME") or "?"
        learner = "learner-" + hashlib.sha256(f"{user}@{platform.node()}".encode()).hexdigest()[:8]
    figures = load_results() if figures is None else figures
    return {
        "schema": SCHEMA,
        "learner": learner.strip(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": sysinfo.cpu_model(),
        "features": sysinfo.cpu_features(),
        "cores": sysinfo.core_counts(),
        "cpu_quota": sysinfo.cgroup_cpu_quota(),
        "where": _where(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "figures": figures,
    }


def write_report(path, learner=None, figures=None):
    """Write :func:`make_report` as JSON to ``path`` (atomically); returns the report."""
    report = make_report(learner, figures)
    text = json.dumps(report, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return report


def _validate(report, where):
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise ValueError(f"{where}: not a workshop report (schema {report.get('schema') if isinstance(report, dict) else None!r}, "
                         f"expected {SCHEMA!r}); make it with `workshop report`")
    for key, kind in (("learner", str), ("features", dict), ("cores", dict), ("figures", dict)):
        if not isinstance(report.get(key), kind):
            raise ValueError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    for name, figure in report["figures"].items():
        if not isinstance(figure, dict) or not isinstance(figure.get("value"), (int, float)) or not figure.get("how"):
            raise ValueError(f"{where}: figure {name!r} = {figure!r} needs a numeric 'value' and a 'how'")
    return report


def load_reports(folder):
    """Every ``*.json`` report in ``folder``, validated, sorted by learner; raises ValueError naming a bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} is not a directory of `workshop report` files")
    reports = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        reports.append(_validate(data, path))
    if not reports:
        raise ValueError(f"no *.json reports in {folder}")
    return sorted(reports, key=lambda r: r["learner"])


def group_of(report):
    """The board's group of a report: int8 hardware (AMX, VNNI or neither), cores, and where it ran."""
    features = report["features"]
    if features.get("amx_int8"):
        isa = "AMX"
    elif features.get("avx512_vnni") or features.get("avx_vnni"):
        isa = "VNNI"
    else:
        isa = "no VNNI"
    cores = report["cores"].get("physical") or report["cores"].get("logical")
    return f"{isa}, {cores} cores" + (f", {report['where']}" if report.get("where") == "cluster node" else "")


def board_table(reports):
    """``(figure names in board order, groups in order, {(name, group): [(learner, value, how), ...]})``."""
    names = [n for n in FIGURES if any(n in r["figures"] for r in reports)]
    names += sorted({n for r in reports for n in r["figures"]} - set(names))
    groups = sorted({group_of(r) for r in reports})
    cells = {}
    for r in reports:
        for name, figure in r["figures"].items():
            cells.setdefault((name, group_of(r)), []).append((r["learner"], float(figure["value"]), figure["how"]))
    return names, groups, cells


def _plot(reports):
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no backend change, nothing left open in a notebook

    names, groups, cells = board_table(reports)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = colormaps["tab10"]
    for ax, name in zip(axes.flat, names):
        for g, group in enumerate(groups):
            values = [v for _, v, _ in cells.get((name, group), [])]
            if not values:
                continue
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(g + np.asarray(jitter), values, color=colours(g % 10), s=28, zorder=3)
            ax.hlines(np.median(values), g - 0.3, g + 0.3, color="black", lw=1)
        unit, what = FIGURES.get(name, (None, name))
        units = {r["figures"][name].get("unit") for r in reports if name in r["figures"]} - {None}
        ax.set_title(what if name in FIGURES else name, fontsize=9)
        ax.set_ylabel(unit or ", ".join(sorted(units)) or "")
        ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"The room: {len(reports)} learners (points), median per group (line)")
    fig.tight_layout()
    return fig


def collect(folder, out):
    """Draw the board of every report in ``folder`` into ``out`` (``.png``, or ``.html`` with the plot and a table).

    Returns
    -------
    list of dict
        The reports drawn.
    """
    out = Path(out)
    if out.suffix.lower() not in (".png", ".html"):
        raise ValueError(f"out={str(out)!r} must end in .png or .html")
    reports = load_reports(folder)
    if not any(r["figures"] for r in reports):
        raise ValueError(f"the reports in {folder} hold no figures yet: the labs record them as they run")
    fig = _plot(reports)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    if out.suffix.lower() == ".png":
        out.write_bytes(buffer.getvalue())
        return reports
    names, _, _ = board_table(reports)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for r in reports:
        cells = "".join(
            f"<td title=\"{html.escape(r['figures'][n]['how'])}\">{r['figures'][n]['value']:.4g}</td>"
            if n in r["figures"] else "<td></td>" for n in names)
        body.append(f"<tr><td>{html.escape(r['learner'])}</td><td>{html.escape(str(r.get('cpu', '?')))}</td>"
                    f"<td>{html.escape(group_of(r))}</td>{cells}</tr>")
        hows = "; ".join(f"{n}: {r['figures'][n]['how']}" for n in names if n in r["figures"])
        body.append(f"<tr class=how><td colspan={3 + len(names)}>{html.escape(hows)}</td></tr>")
    image = base64.b64encode(buffer.getvalue()).decode()
    out.write_text(
        "<!doctype html><meta charset=utf-8><title>Deep Learning at Scale: the class board</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}td:nth-child(-n+3){text-align:left}"
        "tr.how td{text-align:left;color:#666;font-size:80%}</style>"
        f"<h1>The class board: {len(reports)} learners</h1><img alt=board src=\"data:image/png;base64,{image}\">"
        f"<table><tr><th>learner</th><th>CPU</th><th>group</th>{head}</tr>{''.join(body)}</table>\n")
    return reports
