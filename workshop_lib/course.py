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
import os
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
    """Solution markers that do not pair up (unterminated, nested, or stray END), or that look like one but are not."""


# A line that reads like a marker to a person: BEGIN/END SOLUTION in any case, spacing or comment style, with
# only punctuation before it. Such a line must be exactly a marker of its cell's kind, or it would leak the answer.
_LOOKS_LIKE_MARKER = re.compile(r"^[\W_]*(begin|end)[\W_]*solutions?\b", re.IGNORECASE)


def _check_marker_line(line: str, exact: tuple, where: str, number: int) -> None:
    """Raise a MarkerError if ``line`` looks like a solution marker but is none of ``exact``."""
    stripped = line.strip()
    if not _LOOKS_LIKE_MARKER.match(stripped):
        return
    if stripped in exact or (stripped.startswith(CODE_BEGIN) and CODE_BEGIN in exact
                             and stripped[len(CODE_BEGIN):][:1] in ("", " ")):
        return
    raise MarkerError(f"{where}: line {number}: {stripped!r} looks like a solution marker but is not one; "
                      f"expected exactly {' or '.join(repr(m) for m in exact)} (the answer would be copied to labs/)")


def strip_code(source: str, where: str = "<code>") -> str:
    """Replace each marked solution block in code by a placeholder at the block's indentation.

    The text after ``### BEGIN SOLUTION`` on the marker line names the exercise; the placeholder raises
    ``NotImplementedError`` with that name, so a learner who runs a cell too early reads which exercise is missing.
    """
    out, inside, indent, begin_line, name = [], False, "", 0, ""
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        _check_marker_line(line, (CODE_BEGIN, CODE_END), where, number)
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
_MD_NEAR = re.compile(r"<!--[\W_]*(?:begin|end)[\W_]*solutions?\b.*?-->", re.IGNORECASE)


def strip_markdown(source: str, where: str = "<markdown>") -> str:
    """Remove each ``<!-- BEGIN SOLUTION -->`` ... ``<!-- END SOLUTION -->`` span, markers included."""
    for number, line in enumerate(source.splitlines(), start=1):
        near = [m for m in _MD_NEAR.findall(line) if m not in (MD_BEGIN, MD_END)]
        rest = _MD_TOKEN.sub("", line).strip()
        if near or _LOOKS_LIKE_MARKER.match(rest):
            raise MarkerError(f"{where}: line {number}: {(near or [rest])[0]!r} looks like a solution marker but is "
                              f"not one; expected exactly {MD_BEGIN!r} or {MD_END!r} (the answer would be copied to "
                              "labs/)")
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
                if not isinstance(notebook, dict):
                    raise ValueError("expected a JSON object with 'cells'")
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
                raise ValueError(f"{path}: not a valid notebook ({exc})") from None
            files[rel] = _dump(make_lab_notebook(notebook, str(path)))
        elif path.suffix == ".py":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text ({exc}); save the script as UTF-8") from None
            files[rel] = strip_code(text, str(path))
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


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _manifest_entry_problem(rel) -> str | None:
    """Why a manifest entry cannot be a file build-labs wrote in labs/ (None if it can)."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r} is not a relative path"
    if "\\" in rel or rel.startswith("/") or Path(rel).is_absolute() or re.match(r"^[A-Za-z]:", rel):
        return f"{rel!r} is absolute"
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"{rel!r} leaves labs/ or is not a plain path"
    if any(part.startswith(".") or part in ARTIFACT_DIRS for part in parts):
        return f"{rel!r} is a hidden or artifact path build-labs never writes"
    return None


def _read_manifest(labs: Path):
    """(``{relative path: sha256}`` of the files the last build wrote, why the manifest was rejected or None).

    The manifest is untrusted input (labs/ is shared and copied between learners): unless every entry is a plain
    relative path inside labs/ with a sha256 digest, the whole manifest is rejected, and the build then treats
    every existing file as the learner's (keeps it, and writes new versions beside edited ones).
    """
    path = labs / MANIFEST
    if not path.exists() and not path.is_symlink():
        return {}, None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("it is not a regular file")
        document = json.loads(path.read_bytes().decode("utf-8"))
        files = document.get("files") if isinstance(document, dict) else None
        if not isinstance(files, dict):
            raise ValueError("expected a JSON object with a 'files' object of {path: sha256}")
        for rel, digest in files.items():
            problem = _manifest_entry_problem(rel)
            if problem is None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
                problem = f"the digest of {rel!r} is not a sha256 hex string"
            if problem:
                raise ValueError(problem)
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"{path} is not a manifest build-labs wrote ({exc})"
    return {Path(rel): digest for rel, digest in files.items()}, None


def _through_symlink(labs: Path, rel: Path) -> bool:
    """True if ``labs/rel`` or a folder between labs/ and it is a symbolic link (never followed)."""
    path = labs
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


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


def _write(target: Path, data: bytes, source: Path | None) -> None:
    """Write ``data`` to ``target`` atomically (with ``source``'s executable bits); errors name ``target``."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        if source is not None and source.stat().st_mode & 0o111:
            shutil.copymode(source, tmp)
        tmp.replace(target)  # atomic: an interrupted build leaves the old file or the new one, never half of one
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)  # no half-written temporary left behind (a full disk)
        except OSError:
            pass
        raise OSError(exc.errno, f"cannot write {target} ({exc.strerror or exc}); labs/ keeps what it held, "
                                 "and the next build completes it") from None


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
    if labs.exists() and not labs.is_dir():
        raise ValueError(f"labs={os.fspath(labs)!r} is a file, expected the labs folder (or a path that does not "
                         "exist yet); move the file away")
    expected = _expected_files(solutions)  # all markers validated before anything is written
    _refuse_leaks(solutions, expected)
    generated, rejected = _read_manifest(labs)  # what we wrote last time, if the manifest can be trusted
    manifest, messages = {}, []
    if rejected:
        messages.append(f"ignored {rejected}: every existing file in {labs} is kept, new versions go beside edited "
                        "ones")

    def ours(path: Path, rel: Path) -> bool:
        """The file at ``path`` is missing or holds what the last build wrote there (never through a link)."""
        if _through_symlink(labs, rel):
            return False
        return not path.exists() or (rel in generated and path.is_file()
                                     and _digest(path.read_bytes()) == generated[rel])

    for rel, content in expected.items():
        data, target = _bytes(content), labs / rel
        updated_rel = _updated_name(rel)
        updated = labs / updated_rel
        if _through_symlink(labs, rel) or _through_symlink(labs, updated_rel):
            messages.append(f"skipped {target}: it or a folder above it is a symbolic link, which build-labs "
                            "never follows")
            continue
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
        if rel in expected or _through_symlink(labs, rel) or not path.is_file():
            continue
        if ours(path, rel):
            path.unlink()  # ours, unchanged, and its solution is gone
            messages.append(f"removed {path} (its solution is gone)")
        else:
            manifest[rel] = generated[rel]
    text = _manifest_text(manifest)
    manifest_path = labs / MANIFEST
    if rejected or not manifest_path.is_file() or manifest_path.read_bytes() != text.encode("utf-8"):
        if manifest_path.is_symlink():
            manifest_path.unlink()  # the link itself, never what it points to
        _write(manifest_path, text.encode("utf-8"), None)
    return messages


def _refuse_leaks(solutions: Path, expected: dict) -> None:
    """Raise a MarkerError if a lab about to be written holds a line that only a solution block holds."""
    secrets = solution_lines(solutions)
    for rel, content in expected.items():
        if isinstance(content, str):
            text = content
            if rel.suffix == ".ipynb":
                text = "\n".join(_source(cell) for cell in json.loads(content)["cells"])
            for line in text.splitlines():
                if line.strip() in secrets:
                    raise MarkerError(f"{solutions / rel}: the lab would hold the solution line {line.strip()!r}; "
                                      "check the solution markers around it")


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
