"""The measurement method of workshop_lib.bench, on fake clocks and callables: deterministic, no timing thresholds."""

import pytest

from workshop_lib import bench


class FakeClock:
    """A clock that only moves when a fake callable says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, durations):
        """A callable whose k-th call takes durations[k] seconds (the last one repeating)."""
        calls = []

        def fn():
            k = min(len(calls), len(durations) - 1)
            calls.append(k)
            self.now += durations[k]
        fn.calls = calls
        return fn


def idle(load=0.1):
    return lambda: {"load": load, "cpu": "Test CPU", "usable_cpus": 2, "threads": {"numba": 2}}


def test_measure_keeps_the_first_call_apart_and_repeats_to_the_minimum_time():
    clock = FakeClock()
    fn = clock.work([5.0, 1 / 64])  # 5 s of compilation, then 15.6 ms calls (exact in binary)
    m = bench.measure(fn, min_time=0.25, min_repeats=5, clock=clock, state=idle())
    assert m.first_s == 5.0
    assert m.n == 16 and len(fn.calls) == 17  # 0.25 s / (1/64 s), plus the warm call
    assert m.median == m.min == m.max == 1 / 64
    assert "first call 5.00 s, compilation included" in str(m)


def test_measure_takes_at_least_min_repeats_of_a_slow_callable_and_at_most_max_repeats():
    clock = FakeClock()
    m = bench.measure(clock.work([2.0]), min_time=0.2, min_repeats=3, clock=clock, state=idle())
    assert m.n == 3
    m = bench.measure(clock.work([1e-6]), min_time=10.0, min_repeats=3, max_repeats=50, clock=clock, state=idle())
    assert m.n == 50


def test_measure_reports_median_and_interquartile_range():
    clock = FakeClock()
    durations = [0.0] + [0.001, 0.002, 0.003, 0.004, 0.100]  # one preempted call
    m = bench.measure(clock.work(durations), min_time=0, min_repeats=5, max_repeats=5, clock=clock, state=idle())
    assert m.median == pytest.approx(0.003)
    assert (m.q1, m.q3) == (pytest.approx(0.002), pytest.approx(0.004))
    assert m.max == pytest.approx(0.1)


def test_machine_state_flags_a_loaded_machine_and_names_it_in_the_verdict():
    clock = FakeClock()
    m = bench.measure(clock.work([0.01]), min_time=0, clock=clock, state=idle(load=1.7))
    assert m.machine.loaded and "LOADED" in str(m.machine) and "Test CPU" in str(m.machine)
    assert not bench.measure(clock.work([0.01]), min_time=0, clock=clock, state=idle()).machine.loaded
    verdict = bench.Verdict("b", "a", [1.5, 1.6], machine=m.machine)
    assert "loaded" in str(verdict) and "1.70" in str(verdict)


def test_real_machine_state_has_the_fields_a_figure_needs():
    state = bench.machine_state()
    assert {"load", "cpu", "usable_cpus", "threads", "busy_s", "own_s", "wall_s", "all_cpus"} <= set(state)
    assert state["usable_cpus"] >= 1


def test_loaded_means_other_programs_ran_not_our_own_work():
    """The load average counts the measuring process itself; the CPU time others used during the figure does not."""
    def state(load, busy, own, wall):
        return {"load": load, "cpu": "test", "usable_cpus": 2, "threads": {}, "busy_s": busy, "own_s": own,
                "wall_s": wall, "all_cpus": 2}

    ours = bench.MachineNote(state(1.9, 100.0, 10.0, 0.0), state(1.9, 102.0, 12.0, 1.0))  # 2 CPU-s, all ours
    assert ours.others == 0.0 and not ours.loaded and "LOADED" not in str(ours)
    shared = bench.MachineNote(state(0.1, 100.0, 10.0, 0.0), state(0.1, 102.0, 11.0, 1.0))  # 1 of 2 CPU-s others'
    assert shared.others == 0.5 and shared.loaded and "50% of the CPUs" in shared.loaded_note()
    no_proc = bench.MachineNote(state(1.5, None, 10.0, 0.0), state(1.5, None, 11.0, 1.0))  # no /proc/stat
    assert no_proc.others is None and no_proc.loaded  # falls back to the load average: 1.5 >= half of 2 CPUs


def test_compare_interleaves_the_variants_round_by_round():
    clock = FakeClock()
    order = []

    def variant(name, seconds):
        def fn():
            order.append(name)
            clock.now += seconds
        return fn
    c = bench.compare({"a": variant("a", 0.02), "b": variant("b", 0.01)}, rounds=4, min_round_time=0.02,
                      clock=clock, state=idle())
    timed = order[4:]  # two warm calls each, then rounds: a once (20 ms), b twice (10 ms)
    assert timed == ["a", "b", "b", "b", "b", "a", "a", "b", "b", "b", "b", "a"]
    assert c.rounds == 4 and c.ratios("b") == [pytest.approx(2.0)] * 4
    verdict = c.verdict("b", change="halving", what="the step")
    assert verdict.faster and verdict.ratio == pytest.approx(2.0)
    assert str(verdict).startswith("On this machine, halving made the step 2.00x faster (2.00-2.00 over 4 rounds)")


def test_compare_separates_drift_from_a_difference():
    """A machine that slows down 3x during the run: interleaved rounds still give each round's true ratio."""
    clock = FakeClock()
    slowdown = {"factor": 1.0}

    def variant(seconds):
        def fn():
            clock.now += seconds * slowdown["factor"]
            slowdown["factor"] += 0.02
        return fn
    c = bench.compare({"base": variant(0.010), "new": variant(0.009)}, rounds=7, min_round_time=0.0, clock=clock,
                      state=idle())
    assert c.verdict("new").faster  # each round's ratio ~1.09, although the times drifted 1.0 -> 1.4


def fixed_rounds(ratios):
    return bench.Verdict("fused", "plain", ratios, change="fusion", what="training")


def test_verdict_says_faster_only_when_the_whole_spread_is_above_one():
    assert fixed_rounds([1.02, 1.05, 1.10]).outcome == "faster"
    noisy = fixed_rounds([0.97, 1.04, 1.12, 1.01, 1.06, 0.99, 1.08])
    assert noisy.outcome == "no difference" and not noisy.faster and not noisy.slower
    assert str(noisy) == ("On this machine, fusion made training 1.04x faster (0.970-1.12 over 7 rounds): "
                          "no difference beyond this machine's noise.")


def test_verdict_says_slower_with_the_inverted_ratio_and_spread():
    slow = fixed_rounds([0.5, 0.4, 0.8])
    assert slow.outcome == "slower"
    assert str(slow) == ("On this machine, fusion made training 2.00x slower (1.25-2.50 over 3 rounds): "
                         "slower in every round.")


def test_verdict_threshold_demands_more_than_a_small_gain():
    gain = [1.05, 1.06, 1.07]
    assert fixed_rounds(gain).faster
    at_10_percent = bench.Verdict("fused", "plain", gain, threshold=1.1)
    assert at_10_percent.outcome == "no difference" and "beyond the stated 1.10x" in str(at_10_percent)
    assert bench.Verdict("x", "y", [0.5, 0.6], threshold=1.1).slower


def test_sig_gives_three_significant_digits_in_plain_notation():
    assert [bench.sig(x) for x in (1234.5, 29060, 8.0712, 0.012345, 1.0, 0)] == \
        ["1230", "29100", "8.07", "0.0123", "1.00", "0"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(variants={"a": lambda: None}), "at least two"),
    (dict(variants={"a": lambda: None, "b": 3}), r"variants\['b'\]"),
    (dict(variants={"a": lambda: None, "b": lambda: None}, rounds=0), "rounds=0"),
    (dict(variants={"a": lambda: None, "b": lambda: None}, baseline="c"), "baseline='c'"),
])
def test_compare_rejects_bad_arguments_by_name(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bench.compare(**kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(min_time=-1), "min_time=-1"), (dict(min_repeats=0), "min_repeats=0"),
                                           (dict(min_repeats=5, max_repeats=2), "max_repeats=2")])
def test_measure_rejects_bad_arguments_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.measure(lambda: None, **kwargs)


def test_comparison_verdict_rejects_an_unknown_name():
    c = bench.Comparison(["a", "b"], {"a": [1.0], "b": [1.0]}, {"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}, "a",
                         bench.MachineNote(idle()(), idle()()))
    with pytest.raises(KeyError, match="'c'"):
        c.verdict("c")


@pytest.mark.parametrize("plan, match", [(dict(thread=2), "unknown keys"), (dict(variant="stock"), "variant='stock'"),
                                         (dict(mode="eval"), "mode='eval'")])
def test_cnn_steps_rejects_a_bad_plan_by_name(plan, match):
    import numpy as np

    with pytest.raises(ValueError, match=match):
        with bench.cnn_steps({"p": plan}, images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64)):
            pass


def test_verdict_apart_takes_its_spread_from_both_interquartile_ranges():
    clock = FakeClock()
    durations = [0.0, 0.009, 0.010, 0.011, 0.010, 0.010]
    base = bench.measure(clock.work(durations), min_time=0, min_repeats=5, max_repeats=5, clock=clock, state=idle(),
                         name="fp32")
    fast = bench.measure(clock.work([0.0, 0.004, 0.005, 0.005, 0.005, 0.006]), min_time=0, min_repeats=5,
                         max_repeats=5, clock=clock, state=idle(), name="int8")
    v = bench.verdict_apart(base, fast, change="int8", what="the GEMM")
    assert v.ratio == pytest.approx(2.0) and v.low == pytest.approx(0.010 / 0.005) and v.faster
    assert "measured apart" in str(v) and str(v).startswith("On this machine, int8 made the GEMM 2.00x faster")
    with pytest.raises(TypeError, match="baseline="):
        bench.verdict_apart(0.01, fast)


def test_energy_joules_reads_rapl_zones_and_says_why_when_it_cannot(tmp_path):
    assert bench.energy_joules(tmp_path / "absent")[1].endswith("(no RAPL counters exposed: a virtual machine, "
                                                                "a container, or not Linux)")
    assert bench.energy_joules(tmp_path) == (None, f"{tmp_path} holds no readable RAPL zone")
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("2500000\n")
    assert bench.energy_joules(tmp_path) == ({"intel-rapl:0 (package-0)": 2.5}, None)


def test_verdict_of_an_unchanged_speed_says_so_instead_of_1_00x_slower():
    same = fixed_rounds([0.94, 0.997, 1.09])
    assert str(same) == ("On this machine, fusion left training at the same speed, 0.997x (0.940-1.09 over 3 rounds): "
                         "no difference beyond this machine's noise.")
