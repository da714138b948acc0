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
    assert stale_labs(sol, labs) == [str(labs / "scripts" / "run.py"), str(labs / course.MANIFEST)]
    assert build_labs(sol, labs) == [str(labs / "scripts" / "run.py")]  # unedited by the learner: updated in place
    assert (labs / "scripts" / "run.py").read_text() == "x = 2\n" and stale_labs(sol, labs) == []
    # what executing a lab writes under runs/ (checkpoints, results) is neither copied nor compared
    for tree in (sol, labs):
        (tree / "runs").mkdir()
        (tree / "runs" / "results.json").write_text("{}")
    assert stale_labs(sol, labs) == [] and build_labs(sol, labs) == []
    assert (labs / "runs" / "results.json").exists()


def test_an_edited_lab_is_kept_and_the_new_version_written_beside_it(tmp_path, capsys):
    sol, labs = _tree(tmp_path)
    build_labs(sol, labs)
    lab = labs / "a.ipynb"
    mine = json.loads(lab.read_text())
    mine["cells"].append(_md("my own note"))  # the learner adds a cell ...
    lab.write_text(json.dumps(mine))
    (sol / "a.ipynb").write_text(json.dumps(_nb(_code("### BEGIN SOLUTION Exercise 1: the answer\nanswer = 43\n"
                                                      "### END SOLUTION\n"))))  # ... and the course changes
    assert cli.main(["build-labs", "--solutions", str(sol), "--labs", str(labs)]) == 0
    out = capsys.readouterr().out
    updated = labs / "a.updated.ipynb"
    assert f"kept {lab} (your edits); new version: {updated}" in out
    assert json.loads(lab.read_text()) == mine  # every edit kept
    assert 'raise NotImplementedError("Exercise 1: the answer")' in json.loads(updated.read_text())["cells"][0]["source"]
    # the next build keeps both, says so again, and rewrites nothing
    before = updated.stat().st_mtime_ns
    assert build_labs(sol, labs) == [f"kept {lab} (your edits); new version: {updated}"]
    assert json.loads(lab.read_text()) == mine and updated.stat().st_mtime_ns == before
    # once the learner takes the new version, the copy beside it goes (it was ours, unchanged)
    updated.replace(lab)
    assert build_labs(sol, labs) == [] and stale_labs(sol, labs) == []


def test_an_edited_lab_with_an_edited_updated_copy_is_left_alone(tmp_path):
    sol, labs = _tree(tmp_path)
    build_labs(sol, labs)
    (labs / "a.ipynb").write_text("{}")
    (sol / "a.ipynb").write_text(json.dumps(_nb(_code("print(2)\n"))))
    build_labs(sol, labs)
    (labs / "a.updated.ipynb").write_text("mine too")
    (sol / "a.ipynb").write_text(json.dumps(_nb(_code("print(3)\n"))))
    assert build_labs(sol, labs) == [f"kept {labs / 'a.ipynb'} and {labs / 'a.updated.ipynb'} (your edits); not updated"]
    assert (labs / "a.ipynb").read_text() == "{}" and (labs / "a.updated.ipynb").read_text() == "mine too"


def test_the_learners_own_files_are_never_deleted(tmp_path):
    sol, labs = _tree(tmp_path)
    build_labs(sol, labs)
    (labs / "my_notes.ipynb").write_text('{"cells": []}')
    (labs / "scripts" / "my_script.py").write_text("print('mine')\n")
    build_labs(sol, labs)
    (sol / "scripts" / "run.py").unlink()  # a solution goes away: its unedited lab goes with it
    assert build_labs(sol, labs) == [f"removed {labs / 'scripts' / 'run.py'} (its solution is gone)"]
    assert (labs / "my_notes.ipynb").read_text() == '{"cells": []}'
    assert (labs / "scripts" / "my_script.py").read_text() == "print('mine')\n"
    # a lab the learner edited stays even when its solution is gone
    (labs / "a.ipynb").write_text("edited")
    (sol / "a.ipynb").unlink()
    (sol / "b.ipynb").write_text(json.dumps(_nb(_code("print(1)\n"))))
    build_labs(sol, labs)
    assert (labs / "a.ipynb").read_text() == "edited" and (labs / "b.ipynb").exists()


def test_a_tree_without_manifest_treats_differing_labs_as_the_learners(tmp_path):
    sol, labs = _tree(tmp_path)
    (labs / "scripts").mkdir(parents=True)
    (labs / "scripts" / "run.py").write_text("# written before manifests existed, maybe edited\n")
    build_labs(sol, labs)
    assert (labs / "scripts" / "run.py").read_text().startswith("# written before")
    assert (labs / "scripts" / "run.updated.py").read_text() == "x = 1\n# YOUR CODE HERE\nraise NotImplementedError()\n"


def test_check_fails_on_a_stale_tree_and_on_a_learners_tree(tmp_path, capsys):
    sol, labs = _tree(tmp_path)
    build_labs(sol, labs)
    assert cli.main(["build-labs", "--check", "--solutions", str(sol), "--labs", str(labs)]) == 0
    (sol / "scripts" / "run.py").write_text("x = 3\n")  # solutions changed, labs/ not rebuilt
    assert cli.main(["build-labs", "--check", "--solutions", str(sol), "--labs", str(labs)]) == 1
    assert str(labs / "scripts" / "run.py") in capsys.readouterr().err
    build_labs(sol, labs)
    (labs / "a.ipynb").write_text("{}")  # a hand edit in labs/ is caught by CI too
    assert cli.main(["build-labs", "--check", "--solutions", str(sol), "--labs", str(labs)]) == 1
    (labs / course.MANIFEST).unlink()  # and so is a missing manifest
    assert str(labs / course.MANIFEST) in stale_labs(sol, labs)


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


def test_make_lab_builds_without_force_and_opens_labs(root):
    makefile = (root / "Makefile").read_text()
    lab_rule = makefile[makefile.index("\nlab:") :].split("\n\n")[0]
    labs_rule = makefile[makefile.index("\nlabs:") :].split("\n\n")[0]
    assert "lab: labs" in lab_rule and "--ServerApp.root_dir=labs" in lab_rule
    assert "workshop build-labs" in labs_rule and "rm " not in labs_rule  # build_labs itself keeps the learner's edits
