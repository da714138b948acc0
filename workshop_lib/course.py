"""Build the learners' labs/ from the complete solutions/ (nbgrader's idea, in a few hundred lines).

``solutions/`` is the single source. In code (notebook code cells and the
helper scripts under ``solutions/scripts/``) the lines between
``### BEGIN SOLUTION Exercise 2.1: build y = xW + b`` and ``### END SOLUTION``
become ``# YOUR CODE HERE`` and ``raise NotImplementedError("Exercise 2.1: build
y = xW + b")`` (the text after ``BEGIN SOLUTION`` names the exercise); in
markdown, text between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->``
is removed. Outputs, execution counts and volatile metadata are dropped, so a
lab is a pure function of its solution and ``--check`` can tell when labs/ is
stale.

labs/ is also where a learner works, so building never destroys work:
``labs/.build-manifest.json`` records the content hash of every file the build
wrote. A lab that no longer matches its hash was edited by the learner: it is
left as it is, and the new version is written beside it
(``01_dl_boost.updated.ipynb``). Files the build did not write (a learner's
``my_notes.ipynb``) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

__all__ = [
    "MarkerError",
    "strip_code",
    "strip_markdown",
    "make_lab_notebook",
    "build_labs",
    "stale_labs",
    "solution_lines",
    "leaked_lines",
]

CODE_BEGIN = "### BEGIN SOLUTION"
CODE_END = "### END SOLUTION"
MD_BEGIN = "<!-- BEGIN SOLUTION -->"
MD_END = "<!-- END SOLUTION -->"
MANIFEST = ".build-manifest.json"  # in labs/: {relative path: sha256 of what build-labs wrote there}
UPDATED = ".updated"  # 01_dl_boost.ipynb edited by the learner -> the new version is 01_dl_boost.updated.ipynb
LEAK_MIN_CHARS = 25  # a solution line at least this long must not appear in labs/

# what running a lab writes next to it (checkpoints, results): never copied, never compared
ARTIFACT_DIRS = {"runs", "__pycache__"}

NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


class MarkerError(ValueError):
    """Solution markers that do not pair up (unterminated, nested, or stray END)."""


def strip_code(source: str, where: str = "<code>") -> str:
    """Replace each marked solution block in code by a placeholder at the block's indentation.

    The text after ``### BEGIN SOLUTION`` on the marker line names the exercise; the placeholder raises
    ``NotImplementedError`` with that name, so a learner who runs a cell too early reads which exercise is missing.
    """
    out, inside, indent, begin_line, name = [], False, "", 0, ""
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped.startswith(CODE_BEGIN):
            if inside:
                raise MarkerError(f"{where}: line {number}: nested '{CODE_BEGIN}' (block opened on line {begin_line})")
            inside, begin_line = True, number
            indent = line[: len(line) - len(line.lstrip())]
            name = stripped[len(CODE_BEGIN) :].strip()
        elif stripped.startswith(CODE_END):
            if not inside:
                raise MarkerError(f"{where}: line {number}: '{CODE_END}' without a matching '{CODE_BEGIN}'")
            inside = False
            out.append(f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError({json.dumps(name, ensure_ascii=False)})\n" if name
                       else f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError()\n")
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


def _bytes(content) -> bytes:
    return content if isinstance(content, bytes) else content.encode("utf-8")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _updated_name(rel: Path) -> Path:
    """Where the new version of a learner-edited lab goes: ``01_dl_boost.ipynb`` -> ``01_dl_boost.updated.ipynb``."""
    return rel.with_name(rel.stem + UPDATED + rel.suffix)


def _manifest_text(hashes: dict) -> str:
    files = {Path(rel).as_posix(): digest for rel, digest in hashes.items()}
    return json.dumps({"generated_by": "workshop build-labs", "files": dict(sorted(files.items()))}, indent=1) + "\n"


def _read_manifest(labs: Path) -> dict:
    """``{relative path: sha256}`` of the files the last build wrote; empty when there is none (or it is unreadable)."""
    try:
        files = json.loads((labs / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {Path(rel): digest for rel, digest in files.items() if isinstance(digest, str)}


def stale_labs(solutions="solutions", labs="labs") -> list:
    """Paths in labs/ that are missing, out of date, or have no solution, and a wrong manifest. Empty means in sync.

    This is the CI check, for a clean tree: a learner's edited lab counts as stale here, although
    :func:`build_labs` keeps it.
    """
    solutions, labs = Path(solutions), Path(labs)
    expected = _expected_files(solutions)
    stale = []
    for rel, content in expected.items():
        target = labs / rel
        current = target.read_bytes() if target.exists() else None
        if current != _bytes(content):
            stale.append(str(target))
    stale += [str(labs / rel) for rel in sorted(_lab_files(labs) - set(expected))]
    wanted_manifest = _manifest_text({rel: _digest(_bytes(content)) for rel, content in expected.items()})
    manifest = labs / MANIFEST
    if not manifest.exists() or manifest.read_text(encoding="utf-8") != wanted_manifest:
        stale.append(str(manifest))
    return stale


def _write(target: Path, data: bytes, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    if source.stat().st_mode & 0o111:
        shutil.copymode(source, tmp)
    tmp.replace(target)  # atomic: an interrupted build leaves the old file or the new one, never half of one


def build_labs(solutions="solutions", labs="labs") -> list:
    """Write labs/ from solutions/, keeping every change a learner made there; returns one message per action.

    A file is (over)written only if it is missing or still holds exactly what the last build wrote (its hash in
    ``labs/.build-manifest.json``). A lab the learner edited is left untouched and the new version is written
    beside it (``name.updated.ipynb``); files the build did not write are never changed or deleted. A lab whose
    solution is gone is removed only if the learner never edited it.

    Parameters
    ----------
    solutions, labs : str or path
        The source directory and the learners' directory.

    Returns
    -------
    list of str
        The paths written, and a sentence for every lab kept because of the learner's edits
        (``"kept ... (your edits); new version: ..."``) or removed. Empty when labs/ was already up to date.

    Raises
    ------
    FileNotFoundError
        If ``solutions`` is not a directory.
    MarkerError, ValueError
        If a solution's markers do not pair up or a notebook is not valid JSON; nothing is written then.
    """
    solutions, labs = Path(solutions), Path(labs)
    if not solutions.is_dir():
        raise FileNotFoundError(f"solutions directory {solutions} not found; run from the repository root")
    expected = _expected_files(solutions)  # all markers validated before anything is written
    generated = _read_manifest(labs)  # what we wrote last time
    manifest, messages = {}, []

    def ours(path: Path, rel: Path) -> bool:
        """The file at ``path`` is missing or holds what the last build wrote there."""
        return not path.exists() or (rel in generated and _digest(path.read_bytes()) == generated[rel])

    for rel, content in expected.items():
        data, target = _bytes(content), labs / rel
        updated_rel = _updated_name(rel)
        updated = labs / updated_rel
        if target.exists() and target.read_bytes() == data:
            manifest[rel] = _digest(data)
            if updated.exists() and ours(updated, updated_rel):  # the learner's lab caught up: drop our copy
                updated.unlink()
                messages.append(f"removed {updated} (no longer needed)")
            continue
        if ours(target, rel):
            _write(target, data, solutions / rel)
            manifest[rel] = _digest(data)
            messages.append(str(target))
            continue
        # The learner changed this lab: keep it, and put the new version beside it.
        if rel in generated:
            manifest[rel] = generated[rel]  # still the learner's next time
        if ours(updated, updated_rel) or updated.read_bytes() == data:
            if not updated.exists() or updated.read_bytes() != data:
                _write(updated, data, solutions / rel)
            manifest[updated_rel] = _digest(data)
            messages.append(f"kept {target} (your edits); new version: {updated}")
        else:
            messages.append(f"kept {target} and {updated} (your edits); not updated")
    for rel in sorted(set(generated) - set(manifest)):
        path = labs / rel
        if rel in expected or not path.exists():
            continue
        if ours(path, rel):
            path.unlink()  # ours, unchanged, and its solution is gone
            messages.append(f"removed {path} (its solution is gone)")
        else:
            manifest[rel] = generated[rel]
    text = _manifest_text(manifest)
    manifest_path = labs / MANIFEST
    if not manifest_path.exists() or manifest_path.read_text(encoding="utf-8") != text:
        labs.mkdir(parents=True, exist_ok=True)
        tmp = labs / f"{MANIFEST}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(manifest_path)
    return messages


def _split_code(source: str):
    """(lines inside solution blocks, lines outside), marker lines in neither."""
    inside_lines, outside_lines, inside = [], [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(CODE_BEGIN):
            inside = True
        elif stripped.startswith(CODE_END):
            inside = False
        else:
            (inside_lines if inside else outside_lines).append(line)
    return inside_lines, outside_lines


def _split_markdown(source: str):
    inside_lines, outside_lines, inside, pos = [], [], False, 0
    for match in _MD_TOKEN.finditer(source):
        (inside_lines if inside else outside_lines).extend(source[pos : match.start()].splitlines())
        inside, pos = match.group() == MD_BEGIN, match.end()
    (inside_lines if inside else outside_lines).extend(source[pos:].splitlines())
    return inside_lines, outside_lines


def solution_lines(solutions="solutions") -> set:
    """The lines that only a solution holds: what must never appear in labs/.

    A solution line is a non-blank line of at least ``LEAK_MIN_CHARS`` characters (stripped) inside a solution
    block of a notebook (code or markdown) or a script in ``solutions``, that does not also appear outside
    solution blocks anywhere there.
    """
    inside, outside = set(), set()
    for path in sorted(Path(solutions).rglob("*")):
        rel = path.relative_to(solutions)
        if path.is_dir() or any(part.startswith(".") or part in ARTIFACT_DIRS for part in rel.parts):
            continue
        if path.suffix == ".ipynb":
            parts = []
            for cell in json.loads(path.read_text(encoding="utf-8")).get("cells", []):
                split = _split_code if cell.get("cell_type") == "code" else _split_markdown
                parts.append(split(_source(cell)))
        elif path.suffix == ".py":
            parts = [_split_code(path.read_text(encoding="utf-8"))]
        else:
            continue
        for ins, outs in parts:
            inside.update(line.strip() for line in ins)
            outside.update(line.strip() for line in outs)
    return {line for line in inside - outside if len(line) >= LEAK_MIN_CHARS}


def _lab_text(path: Path) -> str:
    if path.suffix == ".ipynb":
        notebook = json.loads(path.read_text(encoding="utf-8"))
        return "\n".join(_source(cell) for cell in notebook.get("cells", []))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""  # data files: no source text in them


def leaked_lines(solutions="solutions", labs="labs") -> list:
    """``[(path in labs/, solution line), ...]`` for every solution line found in a lab notebook or script."""
    secrets = solution_lines(solutions)
    labs = Path(labs)
    found = []
    for rel in sorted(_lab_files(labs)):
        text = _lab_text(labs / rel)
        found += [(str(labs / rel), line) for line in sorted(secrets) if line in text]
    return found
