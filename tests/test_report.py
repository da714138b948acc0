"""The class results board: workshop_lib.bench.record, workshop_lib.board (report, collect), on synthetic reports."""

import json
import struct
from pathlib import Path

import pytest

from workshop_lib import bench, board, cli, sysinfo


@pytest.fixture(autouse=True)
def results(tmp_path, monkeypatch):
    """Every test records into its own temporary results file, never into the home directory."""
    path = tmp_path / "home" / "results.json"
    monkeypatch.setenv(bench.RESULTS_ENV, str(path))
    return path


FEATURES_OFF = {name: False for name in sysinfo.FEATURES}


def synthetic(learner, cpu, physical, figures, **features):
    return {"schema": board.SCHEMA, "learner": learner, "cpu": cpu, "created": "2026-12-01T10:00:00+0000",
            "features": {**FEATURES_OFF, **features}, "cores": {"logical": 2 * physical, "physical": physical,
                                                                "usable": 2 * physical},
            "cpu_quota": None, "where": "workstation", "platform": "Linux", "python": "3.11",
            "figures": {n: {"value": v, "how": f"how {n} was measured", "unit": board.FIGURES[n][0]}
                        for n, v in figures.items()}}


@pytest.fixture
def room(tmp_path):
    """Three learners: a Xeon with AMX, a Zen 5 laptop with VNNI, an old laptop with neither."""
    folder = tmp_path / "room"
    folder.mkdir()
    reports = [
        synthetic("ada", "Intel Xeon 6", 2, {"int8_gemm_speedup": 7.5, "hvd_speedup_2_ranks": 1.6,
                                             "memcopy_GBps": 15.0}, avx512_vnni=True, amx_int8=True),
        synthetic("bob", "AMD EPYC Zen 5", 2, {"int8_gemm_speedup": 3.9, "hvd_speedup_2_ranks": 1.7,
                                               "kmeans_ms_per_iteration_threads": 6.3}, avx512_vnni=True),
        synthetic("cy", "Intel Core i5-6200U", 4, {"int8_gemm_speedup": 1.2, "memcopy_GBps": 9.0}, avx2=True),
    ]
    for r in reports:
        (folder / f"{r['learner']}.json").write_text(json.dumps(r))
    return folder, reports


def test_record_writes_the_relocated_results_file_atomically_and_the_latest_value_wins(results):
    assert bench.results_path() == results
    bench.record("int8_gemm_speedup", 3.5, "int8 vs fp32 GEMM, 1024^3, 2 threads", "x")
    bench.record("memcopy_GBps", 44, "np.copyto of 64 MB, read + write", "GB/s")
    bench.record("int8_gemm_speedup", 3.9, "the same, again")
    figures = bench.load_results()
    assert figures["int8_gemm_speedup"]["value"] == 3.9 and figures["int8_gemm_speedup"]["how"] == "the same, again"
    assert figures["memcopy_GBps"] == {**figures["memcopy_GBps"], "value": 44.0, "unit": "GB/s"}
    assert json.loads(results.read_text())["figures"] == figures
    assert sorted(p.name for p in results.parent.iterdir()) == [".results.json.lock", "results.json"]  # no temp


def test_the_default_results_file_is_in_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(bench.RESULTS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bench.results_path() == tmp_path / ".workshop" / "results.json"
    assert bench.load_results() == {}


@pytest.mark.parametrize("args, words", [
    (("", 1.0, "h"), "name=''"), (("a b", 1.0, "h"), "name='a b'"), (("x", float("nan"), "h"), "must be a finite"),
    (("x", "3", "h"), "value='3'"), (("x", True, "h"), "value=True"), (("x", 1.0, " "), "must say how"),
])
def test_record_rejects_bad_input_naming_it(args, words, results):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        bench.record(*args)
    assert not results.exists()


def test_a_corrupt_results_file_is_an_error_naming_it(results):
    results.parent.mkdir(parents=True)
    results.write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not readable JSON"):
        bench.record("x", 1.0, "h")


def test_a_report_holds_this_cpu_its_cores_and_the_recorded_figures_with_how(tmp_path):
    bench.record("hvd_speedup_2_ranks", 1.66, "2 ranks x 1 thread over 1 x 1, 120 steps/rank", "x")
    out = tmp_path / "me.json"
    assert cli.main(["report", "-o", str(out), "--name", "me"]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == board.SCHEMA and report["learner"] == "me"
    assert report["cpu"] == sysinfo.cpu_model() and report["features"] == sysinfo.cpu_features()
    assert report["cores"] == sysinfo.core_counts()
    assert report["figures"]["hvd_speedup_2_ranks"]["value"] == 1.66
    assert "120 steps/rank" in report["figures"]["hvd_speedup_2_ranks"]["how"]
    assert board.make_report()["learner"].startswith("learner-")  # anonymous unless named
    with pytest.raises(ValueError, match="learner=''"):
        board.make_report("")


def test_the_three_reports_fall_in_amx_vnni_and_neither_groups(room):
    folder, reports = room
    loaded = board.load_reports(folder)
    assert [r["learner"] for r in loaded] == ["ada", "bob", "cy"]
    assert [board.group_of(r) for r in loaded] == ["AMX, 2 cores", "VNNI, 2 cores", "no VNNI, 4 cores"]
    assert board.group_of({**loaded[1], "where": "cluster node"}) == "VNNI, 2 cores, cluster node"
    names, groups, cells = board.board_table(loaded)
    assert names[:2] == ["int8_gemm_speedup", "memcopy_GBps"]  # FIGURES' order, then alphabetical
    assert set(names) == {"int8_gemm_speedup", "hvd_speedup_2_ranks", "memcopy_GBps",
                          "kmeans_ms_per_iteration_threads"}
    assert cells[("int8_gemm_speedup", "AMX, 2 cores")] == [("ada", 7.5, "how int8_gemm_speedup was measured")]
    assert [v for _, v, _ in cells[("memcopy_GBps", "no VNNI, 4 cores")]] == [9.0]
    assert ("memcopy_GBps", "VNNI, 2 cores") not in cells


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_collect_draws_a_png_board_with_one_panel_per_figure(room, tmp_path, capsys):
    folder, _ = room
    out = tmp_path / "board.png"
    assert cli.main(["collect", str(folder), "-o", str(out)]) == 0
    assert "3 report(s) in 3 group(s)" in capsys.readouterr().out
    width, height = _png_size(out)
    assert width > 1000 and height > 300  # 4 figures: 3 panels a row, 2 rows


def test_collect_writes_an_html_board_with_the_plot_and_every_figure_and_how(room, tmp_path):
    folder, reports = room
    out = tmp_path / "board.html"
    board.collect(folder, out)
    text = out.read_text()
    assert 'src="data:image/png;base64,' in text
    for r in reports:
        assert r["learner"] in text and r["cpu"] in text
        for name, figure in r["figures"].items():
            assert f"{figure['value']:.4g}" in text and figure["how"] in text
    assert "AMX, 2 cores" in text and "no VNNI, 4 cores" in text


def test_collect_skips_a_file_that_is_not_a_report_naming_it(room, tmp_path):
    folder, reports = room
    (folder / "zz.json").write_text(json.dumps({"schema": "other"}))
    with pytest.warns(board.BoardWarning, match="skipped .*zz.json: not a workshop report"):
        assert len(board.collect(folder, tmp_path / "b.png")) == len(reports)
    with pytest.raises(ValueError, match=r"out='.*b.pdf': the extension '.pdf' is not one this output can have; "
                                         r"expected a writable file path ending in .png or .html"):
        board.collect(folder, tmp_path / "b.pdf")
    with pytest.raises(ValueError, match="not a directory"):
        board.load_reports(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["collect", str(empty), "-o", str(tmp_path / "b.png")]) == 2


def _broken(report, path, value):
    """``report`` with the field at ``path`` (a tuple of keys) set to ``value``."""
    report = json.loads(json.dumps(report))
    node = report
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return report


BAD_FIELDS = [  # each of these drew garbage or raised a raw traceback in `workshop collect` before the schema
    (("figures", "int8_gemm_speedup", "value"), float("nan"), "a finite number"),
    (("figures", "int8_gemm_speedup", "value"), float("inf"), "a finite number"),
    (("figures", "int8_gemm_speedup", "value"), True, "a finite number"),
    (("figures", "int8_gemm_speedup", "value"), 10 ** 400, "a finite number"),
    (("figures", "int8_gemm_speedup", "how"), 5, "a description"),
    (("figures", "int8_gemm_speedup", "unit"), ["x"], "a unit of at most 32 characters"),
    (("cores", "physical"), [1, 2], "a whole number of cores"),
    (("features", "avx2"), "yes", "true or false"),
    (("learner",), "", "a name of 1 to 100 characters"),
    (("figures",), {f"f{i}": {"value": 1, "how": "h"} for i in range(100)}, "at most 64"),
]


def test_collect_skips_each_invalid_report_naming_file_and_field_and_draws_the_rest(room, tmp_path, capsys):
    folder, reports = room
    good = reports[0]
    for i, (path, value, expected) in enumerate(BAD_FIELDS):
        text = json.dumps(_broken(good, path, value)) if value != 10 ** 400 else \
            json.dumps(good).replace('"value": 7.5', '"value": 1' + "0" * 400)
        (folder / f"bad{i}.json").write_text(text)
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "binary.json").write_bytes(b"\xcd\xff\x00")
    (folder / "huge.json").write_text(" " * (board.MAX_REPORT_BYTES + 1))
    out = tmp_path / "board.html"
    assert cli.main(["collect", str(folder), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    for i, (_, _, expected) in enumerate(BAD_FIELDS):
        line = next((x for x in err.splitlines() if f"bad{i}.json" in x), "")
        assert line.startswith("WARNING: skipped ") and expected in line, (i, err)
    for name, why in (("deep", "nested deeper"), ("binary", "not JSON"), ("huge", "more than a report's")):
        assert any(f"{name}.json" in x and why in x for x in err.splitlines()), (name, err)
    text = out.read_text()
    assert all(r["learner"] in text for r in reports) and "nan" not in text.lower()


@pytest.mark.parametrize("figures, expected", [({"x": 5}, "figure 'x' = 5: expected an object"),
                                               ({"x": {"value": "NaN", "how": "h"}}, "'value' = 'NaN'")])
def test_report_refuses_a_results_file_collect_would_refuse_naming_it(results, figures, expected, tmp_path, capsys):
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"figures": figures}))
    out = tmp_path / "me.json"
    assert cli.main(["report", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(results) in err and not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["report", "--name", "x/../../../evil"], "--name 'x/../../../evil': expected a name without '/'"),
    (["report", "-o", "/proc/r.json"], "out='/proc/r.json': cannot write in the folder /proc"),
    (["report", "-o", "r.txt"], "out='r.txt': the extension '.txt' is not one this output can have"),
    (["collect", ".", "-o", "/proc/b.html"], "out='/proc/b.html': cannot write in the folder /proc"),
])
def test_report_and_collect_check_their_output_before_the_work(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] or list(tmp_path.iterdir()) == []
