"""`workshop warm`: every step runs once, each timed, and the CLI exposes it (the real steps run in lab 00)."""

from workshop_lib import cli, warm


def test_warm_runs_every_step_once_and_reports_each_duration(monkeypatch):
    calls = []
    monkeypatch.setattr(warm, "STEPS", (("first", lambda: calls.append(1)), ("second", lambda: calls.append(2))))
    lines = []
    seconds, total = warm.warm(progress=False, out=lines.append)
    assert calls == [1, 2] and list(seconds) == ["first", "second"]
    assert total >= sum(seconds.values()) and lines[-1].startswith("warm-up took")


def test_warm_steps_cover_every_lab_that_times_numba_kernels():
    labs = " ".join(what for what, _ in warm.STEPS)
    assert all(f"lab {n}" in labs or f"labs {n}" in labs for n in ("01", "02", "04"))
    assert all(callable(step) for _, step in warm.STEPS)


def test_cli_has_a_warm_command(monkeypatch):
    seen = []
    monkeypatch.setattr(warm, "warm", lambda progress=True, out=print: seen.append(progress) or ({}, 0.0))
    assert cli.main(["warm", "--quiet"]) == 0 and seen == [False]
