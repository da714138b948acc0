"""Build the learners' labs/ from the complete solutions/ (nbgrader's idea, in 150 lines).

``solutions/`` is the single source. In code (notebook code cells and the
helper scripts under ``solutions/scripts/``) the lines between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` become ``# YOUR CODE HERE`` and
``raise NotImplementedError()``; in markdown, text between
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` is removed. Outputs,
execution counts and volatile metadata are dropped, so a lab is a pure function
of its solution and ``--check`` can tell when labs/ is stale.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

__all__ = ["MarkerError", "strip_code", "strip_markdown", "make_lab_notebook", "build_labs", "stale_labs"]

CODE_BEGIN = "### BEGIN SOLUTION"
CODE_END = "### END SOLUTION"
MD_BEGIN = "<!-- BEGIN SOLUTION -->"
MD_END = "<!-- END SOLUTION -->"

# what running a lab writes next to it (checkpoints, results): never copied, never compared
ARTIFACT_DIRS = {"runs", "__pycache__"}

NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


class MarkerError(ValueError):
    """Solution markers that do not pair up (unterminated, nested, or stray END)."""


def strip_code(source: str, where: str = "<code>") -> str:
    """Replace each marked solution block in code by a placeholder at the block's indentation."""
    out, inside, indent, begin_line = [], False, "", 0
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped.startswith(CODE_BEGIN):
            if inside:
                raise MarkerError(f"{where}: line {number}: nested '{CODE_BEGIN}' (block opened on line {begin_line})")
            inside, begin_line = True, number
            indent = line[: len(line) - len(line.lstrip())]
        elif stripped.startswith(CODE_END):
            if not inside:
                raise MarkerError(f"{where}: line {number}: '{CODE_END}' without a matching '{CODE_BEGIN}'")
            inside = False
            out.append(f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError()\n")
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: '{CODE_BEGIN}' on line {begin_line} is never closed by '{CODE_END}'")
    return "".join(out)


_MD_TOKEN = re.compile(re.escape(MD_BEGIN) + "|" + re.escape(MD_END))


def strip_markdown(source: str, where: str = "<markdown>") -> str:
    """Remove each ``<!-- BEGIN SOLUTION -->`` ... ``<!-- END SOLUTION -->`` span, markers included."""
    out, inside, pos = [], False, 0
    for match in _MD_TOKEN.finditer(source):
        if match.group() == MD_BEGIN:
            if inside:
                raise MarkerError(f"{where}: nested '{MD_BEGIN}'")
            out.append(source[pos : match.start()])
            inside = True
        else:
            if not inside:
                raise MarkerError(f"{where}: '{MD_END}' without a matching '{MD_BEGIN}'")
            inside = False
        pos = match.end()
    if inside:
        raise MarkerError(f"{where}: '{MD_BEGIN}' is never closed by '{MD_END}'")
    out.append(source[pos:])
    return "".join(out)


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def make_lab_notebook(notebook: dict, name: str = "<notebook>") -> dict:
    """The learner's version of a solution notebook (a new dict; the input is not changed)."""
    cells = []
    for index, cell in enumerate(notebook.get("cells", [])):
        where = f"{name}, cell {index}"
        kind = cell.get("cell_type")
        text = _source(cell)
        new = {"cell_type": kind, "metadata": {}}
        if "id" in cell:
            new["id"] = cell["id"]
        if kind == "code":
            new["source"] = strip_code(text, where)
            new["execution_count"] = None
            new["outputs"] = []
        elif kind == "markdown":
            new["source"] = strip_markdown(text, where)
        else:
            new["source"] = text
        tags = cell.get("metadata", {}).get("tags")
        if tags:
            new["metadata"]["tags"] = list(tags)
        cells.append(new)
    return {"cells": cells, "metadata": NOTEBOOK_METADATA, "nbformat": 4, "nbformat_minor": 5}


def _dump(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _expected_files(solutions: Path) -> dict:
    """``{relative path: text}`` of everything labs/ should contain."""
    files = {}
    for path in sorted(solutions.rglob("*")):
        rel = path.relative_to(solutions)
        if path.is_dir() or any(part.startswith(".") or part in ARTIFACT_DIRS for part in rel.parts):
            continue
        if path.suffix == ".ipynb":
            try:
                notebook = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not a valid notebook ({exc})") from None
            files[rel] = _dump(make_lab_notebook(notebook, str(path)))
        elif path.suffix == ".py":
            files[rel] = strip_code(path.read_text(encoding="utf-8"), str(path))
        else:
            files[rel] = path.read_bytes()
    return files


def _lab_files(labs: Path) -> set:
    if not labs.exists():
        return set()
    return {
        p.relative_to(labs)
        for p in labs.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part in ARTIFACT_DIRS for part in p.relative_to(labs).parts)
    }


def stale_labs(solutions="solutions", labs="labs") -> list:
    """Paths in labs/ that are missing, out of date, or have no solution. Empty means in sync."""
    solutions, labs = Path(solutions), Path(labs)
    expected = _expected_files(solutions)
    stale = []
    for rel, content in expected.items():
        target = labs / rel
        current = target.read_bytes() if target.exists() else None
        wanted = content if isinstance(content, bytes) else content.encode("utf-8")
        if current != wanted:
            stale.append(str(target))
    stale += [str(labs / rel) for rel in sorted(_lab_files(labs) - set(expected))]
    return stale


def build_labs(solutions="solutions", labs="labs") -> list:
    """Write labs/ from solutions/; returns the paths written. Files in labs/ with no source are removed."""
    solutions, labs = Path(solutions), Path(labs)
    if not solutions.is_dir():
        raise FileNotFoundError(f"solutions directory {solutions} not found; run from the repository root")
    expected = _expected_files(solutions)  # all markers validated before anything is written
    written = []
    for rel, content in expected.items():
        target = labs / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
            if (solutions / rel).stat().st_mode & 0o111:
                shutil.copymode(solutions / rel, target)
            written.append(str(target))
    for rel in _lab_files(labs) - set(expected):
        (labs / rel).unlink()
        written.append(f"removed {labs / rel}")
    return written
