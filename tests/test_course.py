import json

import pytest

from workshop_lib import cli, course
from workshop_lib.course import MarkerError, build_labs, make_lab_notebook, stale_labs, strip_code, strip_markdown


def _nb(*cells):
    return {"cells": list(cells), "metadata": {"foo": 1}, "nbformat": 4, "nbformat_minor": 5}


def _code(src, outputs=None, count=3):
    return {"cell_type": "code", "source": src, "outputs": outputs or [], "execution_count": count, "metadata": {"x": 1}}


def _md(src):
    return {"cell_type": "markdown", "source": src, "metadata": {}}


def test_strip_code_keeps_indentation_and_surroundings():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(f(1))\n"
    assert strip_code(src) == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f(1))\n"


def test_strip_markdown_removes_the_span():
    assert strip_markdown("Q: why?\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->\nNext") == "Q: why?\n\nNext"


@pytest.mark.parametrize(
    "src, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "nested"),
        ("x = 1\n### END SOLUTION\n", "without a matching"),
    ],
)
def test_bad_code_markers_raise_naming_notebook_and_cell(src, message):
    nb = _nb(_md("intro"), _code(src))
    with pytest.raises(MarkerError, match=rf"lab\.ipynb, cell 1.*{message}"):
        make_lab_notebook(nb, "lab.ipynb")


@pytest.mark.parametrize(
    "src, message",
    [
        ("<!-- BEGIN SOLUTION -->open", "never closed"),
        ("<!-- BEGIN SOLUTION --><!-- BEGIN SOLUTION --><!-- END SOLUTION -->", "nested"),
        ("a<!-- END SOLUTION -->", "without a matching"),
    ],
)
def test_bad_markdown_markers_raise_naming_notebook_and_cell(src, message):
    with pytest.raises(MarkerError, match=rf"x\.ipynb, cell 0.*{message}"):
        make_lab_notebook(_nb(_md(src)), "x.ipynb")


def test_lab_notebook_has_no_outputs_counts_or_volatile_metadata():
    nb = _nb(_code("print(1)", outputs=[{"output_type": "stream", "name": "stdout", "text": "1\n"}]))
    nb["cells"][0]["metadata"] = {"tags": ["keep"], "execution": {"iopub.execute_input": "2026"}}
    lab = make_lab_notebook(nb)
    cell = lab["cells"][0]
    assert cell["outputs"] == [] and cell["execution_count"] is None and cell["metadata"] == {"tags": ["keep"]}
    assert lab["metadata"] == course.NOTEBOOK_METADATA
    assert nb["cells"][0]["outputs"]  # the input is untouched


def _tree(tmp_path):
    sol = tmp_path / "solutions"
    (sol / "scripts").mkdir(parents=True)
    (sol / "a.ipynb").write_text(json.dumps(_nb(_code("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION\n"))))
    (sol / "scripts" / "run.py").write_text("x = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION\n")
    return sol, tmp_path / "labs"


def test_build_then_check_then_stale_after_a_change(tmp_path):
    sol, labs = _tree(tmp_path)
    assert stale_labs(sol, labs)  # nothing built yet
    written = build_labs(sol, labs)
    assert len(written) == 2 and stale_labs(sol, labs) == []
    assert "answer = 42" not in (labs / "a.ipynb").read_text()
    assert (labs / "scripts" / "run.py").read_text() == "x = 1\n# YOUR CODE HERE\nraise NotImplementedError()\n"
    assert build_labs(sol, labs) == []  # idempotent
    (sol / "scripts" / "run.py").write_text("x = 2\n")
    assert stale_labs(sol, labs) == [str(labs / "scripts" / "run.py")]
    (labs / "orphan.ipynb").write_text("{}")
    assert str(labs / "orphan.ipynb") in stale_labs(sol, labs)
    build_labs(sol, labs)
    assert not (labs / "orphan.ipynb").exists() and stale_labs(sol, labs) == []
    # what executing a lab writes under runs/ (checkpoints, results) is neither copied nor compared
    for tree in (sol, labs):
        (tree / "runs").mkdir()
        (tree / "runs" / "results.json").write_text("{}")
    assert stale_labs(sol, labs) == [] and build_labs(sol, labs) == []
    assert (labs / "runs" / "results.json").exists()


def test_cli_check_exit_codes(tmp_path, capsys):
    sol, labs = _tree(tmp_path)
    assert cli.main(["build-labs", "--check", "--solutions", str(sol), "--labs", str(labs)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)]) == 0
    assert cli.main(["build-labs", "--check", "--solutions", str(sol), "--labs", str(labs)]) == 0


def test_cli_reports_bad_markers_without_writing(tmp_path, capsys):
    sol, labs = _tree(tmp_path)
    (sol / "b.ipynb").write_text(json.dumps(_nb(_code("### BEGIN SOLUTION\n"))))
    assert cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)]) == 2
    assert "b.ipynb, cell 0" in capsys.readouterr().err
    assert not labs.exists()


def test_repository_labs_are_in_sync_with_solutions(root):
    stale = stale_labs(root / "solutions", root / "labs")
    assert stale == [], f"labs/ is stale, run `workshop build-labs`: {stale}"


def test_repository_labs_hold_no_solution_text_or_outputs(root):
    notebooks = sorted((root / "labs").glob("*.ipynb"))
    assert notebooks, "labs/ has no notebooks"
    for path in notebooks:
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, path
        nb = json.loads(text)
        for cell in nb["cells"]:
            assert cell.get("outputs", []) == [] and cell.get("execution_count") is None, path
    for path in (root / "labs" / "scripts").glob("*.py"):
        assert "BEGIN SOLUTION" not in path.read_text(), path


def test_every_solution_exercise_leaves_a_placeholder_in_its_lab(root):
    for path in sorted((root / "solutions").glob("*.ipynb")):
        n_blocks = path.read_text().count("### BEGIN SOLUTION")
        lab = (root / "labs" / path.name).read_text()
        assert lab.count("raise NotImplementedError()") >= n_blocks, path.name
