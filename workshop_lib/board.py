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
import math
import os
import platform
import re
import time
import warnings
from pathlib import Path

from .bench import load_results, results_path
from .data import atomic_write, check_output_path

__all__ = ["SCHEMA", "FIGURES", "make_report", "write_report", "validate_report", "load_reports", "group_of",
           "board_table", "collect", "BoardWarning"]

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
    """Write :func:`make_report` as JSON to ``path`` (atomically); returns the report.

    ``path`` is checked before anything is measured or read, and the report against the schema before it is
    written (:func:`validate_report`), so the file written is one that ``workshop collect`` accepts.
    """
    check_output_path(path, (".json",), "out")
    report = make_report(learner, figures)
    try:
        validate_report(report, "the report")
    except ValueError as exc:
        raise ValueError(f"{exc} (the figures come from {results_path() if figures is None else 'figures='}; "
                         "re-run the lab cell that recorded it, or delete the file)") from None
    text = json.dumps(report, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return report


# The schema's bounds: what a real report holds, with room to spare; anything beyond is not a report.
MAX_REPORT_BYTES = 1 << 20
MAX_DEPTH = 6
MAX_FIGURES = 64
MAX_FEATURES = 512
MAX_TEXT = 2000
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def _depth(value, limit):
    """True if ``value`` (parsed JSON) nests no deeper than ``limit`` containers (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _finite_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range, e.g. 10**400
        return False


def validate_report(report, where="report"):
    """Check a parsed report against the schema ``workshop-report/1``; returns it, or raises ValueError.

    Types of every field the board uses, finite numbers (no NaN, Infinity, booleans or integers beyond float),
    bounded sizes (at most ``MAX_FIGURES`` figures, ``MAX_TEXT`` characters per text) and nesting depth.

    Parameters
    ----------
    report : object
        A parsed JSON document.
    where : str or Path
        What to call it in the error (its file).

    Returns
    -------
    dict
        ``report``, unchanged.

    Raises
    ------
    ValueError
        Naming ``where``, the field, its value (shortened) and what was expected.
    """
    def fail(field, value, expected):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{where}: {field} = {shown}: expected {expected}")

    if not _depth(report, MAX_DEPTH):
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels: expected a `workshop report` file")
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        schema = report.get("schema") if isinstance(report, dict) else None
        raise ValueError(f"{where}: not a workshop report (schema {schema!r}, expected {SCHEMA!r}); make it with "
                         "`workshop report`")
    for key, kind in (("learner", str), ("features", dict), ("cores", dict), ("figures", dict)):
        if not isinstance(report.get(key), kind):
            fail(f"field {key!r}", report.get(key), f"a {'text' if kind is str else 'JSON object'}")
    if not report["learner"].strip() or len(report["learner"]) > 100:
        fail("learner", report["learner"], "a name of 1 to 100 characters")
    for key in ("cpu", "where", "created", "platform", "python"):
        if key in report and not (isinstance(report[key], str) and len(report[key]) <= MAX_TEXT):
            fail(f"field {key!r}", report[key], f"text of at most {MAX_TEXT} characters")
    features = report["features"]
    if len(features) > MAX_FEATURES:
        fail("features", f"{len(features)} entries", f"at most {MAX_FEATURES}")
    for name, flag in features.items():
        if not isinstance(flag, bool):
            fail(f"features[{name!r}]", flag, "true or false")
    for name, count in report["cores"].items():
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1 << 20):
            fail(f"cores[{name!r}]", count, "a whole number of cores (or null)")
    quota = report.get("cpu_quota")
    if quota is not None and (not _finite_number(quota) or quota < 0):
        fail("cpu_quota", quota, "a non-negative number of CPUs or null")
    figures = report["figures"]
    if len(figures) > MAX_FIGURES:
        fail("figures", f"{len(figures)} figures", f"at most {MAX_FIGURES}")
    for name, figure in figures.items():
        if not _NAME.fullmatch(name):
            fail("figure name", name, "1 to 100 letters, digits or _.-")
        if not isinstance(figure, dict):
            fail(f"figure {name!r}", figure, "an object with a numeric 'value' and a 'how'")
        if not _finite_number(figure.get("value")):
            fail(f"figure {name!r} 'value'", figure.get("value"), "a finite number")
        how = figure.get("how")
        if not isinstance(how, str) or not how.strip() or len(how) > MAX_TEXT:
            fail(f"figure {name!r} 'how'", how, f"a description of 1 to {MAX_TEXT} characters")
        unit = figure.get("unit")
        if unit is not None and not (isinstance(unit, str) and len(unit) <= 32):
            fail(f"figure {name!r} 'unit'", unit, "a unit of at most 32 characters, or null")
    return report


def _validate(report, where):
    return validate_report(report, where)


def load_reports(folder, skipped=None):
    """Every valid ``*.json`` report in ``folder``, sorted by learner.

    Parameters
    ----------
    folder : str or Path
        The folder of ``workshop report`` files.
    skipped : list, optional
        Receives ``(path, why)`` for every file that is not a valid report; such files are left out, so one
        learner's broken file never blocks the class board. Without it, each is a :class:`BoardWarning`.

    Returns
    -------
    list of dict
        The valid reports.

    Raises
    ------
    ValueError
        If ``folder`` is not a folder, or holds no valid report.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} is not a directory of `workshop report` files")
    reports, bad = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            if not path.is_file():
                raise ValueError("not a regular file")
            if path.stat().st_size > MAX_REPORT_BYTES:
                raise ValueError(f"{path.stat().st_size} bytes, more than a report's {MAX_REPORT_BYTES}")
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
            except RecursionError:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
            except ValueError as exc:
                raise ValueError(f"not JSON ({exc})") from None
            reports.append(validate_report(data, path))
        except (OSError, ValueError) as exc:
            why = str(exc)
            why = why[len(f"{path}: "):] if why.startswith(f"{path}: ") else why
            bad.append((path, why))
    for path, why in bad:
        if skipped is not None:
            skipped.append((path, why))
        else:
            warnings.warn(f"skipped {path}: {why}", BoardWarning, stacklevel=2)
    if not reports:
        raise ValueError(f"no valid *.json reports in {folder}" + (f" ({len(bad)} skipped)" if bad else ""))
    return sorted(reports, key=lambda r: r["learner"])


class BoardWarning(UserWarning):
    """A report file left off the board: it names the file and why."""


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


def collect(folder, out, skipped=None):
    """Draw the board of every report in ``folder`` into ``out`` (``.png``, or ``.html`` with the plot and a table).

    ``out`` is checked before any report is read; invalid reports are left off (see :func:`load_reports`).

    Returns
    -------
    list of dict
        The reports drawn.
    """
    out = check_output_path(out, (".png", ".html"), "out")
    reports = load_reports(folder, skipped)
    if not any(r["figures"] for r in reports):
        raise ValueError(f"the reports in {folder} hold no figures yet: the labs record them as they run")
    fig = _plot(reports)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    if out.suffix.lower() == ".png":
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
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
    page = (
        "<!doctype html><meta charset=utf-8><title>Deep Learning at Scale: the class board</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}td:nth-child(-n+3){text-align:left}"
        "tr.how td{text-align:left;color:#666;font-size:80%}</style>"
        f"<h1>The class board: {len(reports)} learners</h1><img alt=board src=\"data:image/png;base64,{image}\">"
        f"<table><tr><th>learner</th><th>CPU</th><th>group</th>{head}</tr>{''.join(body)}</table>\n")
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return reports
