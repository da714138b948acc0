"""workshop_lib.job without MPI: the wait policy and the environment read with its owners' semantics."""

from __future__ import annotations

import time

import pytest

from workshop_lib import job


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True),
                                             ("0", False), ("false", False), ("False", False), ("NO", False),
                                             ("off", False), ("", None), (" ", None)])
def test_horovod_booleans_accept_every_spelling_in_any_case(value, expected):
    default = object()
    got = job.env_bool("HOROVOD_STALL_CHECK_DISABLE", default, {"HOROVOD_STALL_CHECK_DISABLE": value})
    assert got is (default if expected is None else expected)


@pytest.mark.parametrize("value", ["maybe", "2", "-1", "truee"])
def test_an_unparseable_boolean_is_an_error_naming_the_variable_and_the_value(value):
    with pytest.raises(ValueError, match=f"HOROVOD_STALL_CHECK_DISABLE='{value}' must be a boolean"):
        job.stall_settings({"HOROVOD_STALL_CHECK_DISABLE": value})


def test_stall_check_disable_false_keeps_the_inspector_on():
    assert job.stall_settings({"HOROVOD_STALL_CHECK_DISABLE": "false"}) == (60.0, 300.0)
    assert job.stall_settings({"HOROVOD_STALL_CHECK_DISABLE": "off", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "15"}) \
        == (60.0, 15.0)
    assert job.stall_settings({"HOROVOD_STALL_CHECK_DISABLE": "TRUE"}) is None


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_seconds_must_be_finite_and_not_negative(value):
    with pytest.raises(ValueError, match=f"WORKSHOP_HVD_EXIT_TIMEOUT='{value}' must be a number of seconds >= 0"):
        job.env_seconds("WORKSHOP_HVD_EXIT_TIMEOUT", 300, {"WORKSHOP_HVD_EXIT_TIMEOUT": value})


class _OneRank:
    def Get_size(self):
        return 1


def test_read_environment_reports_a_bad_value_with_its_rank():
    import os

    os.environ["WORKSHOP_HVD_EXIT_TIMEOUT"] = "abc"
    try:
        with pytest.raises(ValueError, match=r"WORKSHOP_HVD_EXIT_TIMEOUT='abc' .* \(rank 0\)"):
            job.read_environment(_OneRank())
    finally:
        del os.environ["WORKSHOP_HVD_EXIT_TIMEOUT"]


def test_wait_returns_when_done_calls_the_inspector_and_honours_a_deadline():
    turns, inspected = [0], [0]

    def done():
        turns[0] += 1
        return turns[0] > job.SPIN_TURNS + 10 * job.INSPECT_EVERY

    assert job.wait(done, inspect=lambda: inspected.__setitem__(0, inspected[0] + 1)) is True
    assert inspected[0] == 10  # every INSPECT_EVERY-th turn once spinning is over
    t0 = time.monotonic()
    assert job.wait(lambda: False, spin=False, deadline=t0 + 0.05) is False
    assert 0.05 <= time.monotonic() - t0 < 2.0
