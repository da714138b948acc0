"""The instructor guide's expected figures are generated from the figures the executed solutions recorded."""

import json

import pytest

from workshop_lib import cli, expected


def test_the_guide_agrees_with_the_recorded_figures():
    assert expected.update(check=True), ("docs/instructor_guide.md's expected figures differ from docs/expected_figures/; "
                                         "run `workshop report --expected`")


def write(folder, cpu, figures):
    entries = {name: {"value": value, "how": f"how {name}", "unit": unit, "recorded": "2026-12-08T02:00:00+0000",
                      "cpu": cpu, "load": load} for name, (value, unit, load) in figures.items()}
    (folder / f"{expected.cpu_slug(cpu)}.json").write_text(json.dumps({"figures": entries}))


def test_render_gives_a_column_per_cpu_with_its_date_and_load(tmp_path):
    write(tmp_path, "AMD EPYC", {"int8_gemm_speedup": (3.5249, "x", 8.2), "memcopy_GBps": (17.65, "GB/s", 9.1)})
    write(tmp_path, "Intel Xeon", {"int8_gemm_speedup": (4.061, "x", 1.0)})
    table = expected.render(expected.load_cpus(tmp_path))
    assert "| figure | how it was measured | AMD EPYC | Intel Xeon |" in table
    assert "| `int8_gemm_speedup` | how int8_gemm_speedup | 3.52x | 4.06x |" in table
    assert "| `memcopy_GBps` | how memcopy_GBps | 17.6 GB/s |  |" in table
    assert "- AMD EPYC: recorded 2026-12-08, 1-minute load average 8.2 to 9.1 while recording." in table


def test_update_rewrites_only_the_generated_block_and_check_detects_a_stale_one(tmp_path):
    write(tmp_path, "AMD EPYC", {"int8_gemm_speedup": (3.52, "x", 8.0)})
    guide = tmp_path / "guide.md"
    guide.write_text(f"intro\n{expected.BEGIN}\n| typed | 2.34x |\n{expected.END}\nafter\n")
    assert expected.update(guide, tmp_path, check=True) is False
    assert "2.34x" in guide.read_text()  # check never writes
    assert expected.update(guide, tmp_path) is False and expected.update(guide, tmp_path, check=True) is True
    text = guide.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "2.34x" not in text and "3.52x" in text


def test_a_guide_without_markers_or_a_missing_folder_is_a_clear_error(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("no markers\n")
    write(tmp_path, "X", {"a": (1.0, "x", 1.0)})
    with pytest.raises(ValueError, match="no generated-figures block"):
        expected.update(guide, tmp_path)
    with pytest.raises(FileNotFoundError, match="no recorded figures"):
        expected.load_cpus(tmp_path / "absent")
    with pytest.raises(ValueError, match="cpu=' '"):
        expected.cpu_slug(" ")


def test_cli_report_expected_check_fails_on_a_stale_guide(monkeypatch, tmp_path):
    monkeypatch.setattr(expected, "update", lambda check=False: False)
    assert cli.main(["report", "--expected", "--check"]) == 1
    assert cli.main(["report", "--expected"]) == 0
