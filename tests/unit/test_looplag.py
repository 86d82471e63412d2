"""The event-loop lag probe: its arithmetic with hand-set times (obs/looplag.py), then on a real loop blocked on purpose
(server/runtime.py), and the settings that drive it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.obs.looplag import STALL_EVENT, LoopLag, Stall
from fpolicyd.obs.metrics import EVENT_LOOP_LAG_BUCKETS, Metrics
from fpolicyd.server.metric_labels import METRIC_LABELS
from fpolicyd.server.runtime import EventLoopProbe

LAG = "fpolicyd_event_loop_lag_seconds"


def counts(lag: LoopLag) -> dict[float, int]:
    """Observations per bucket (by upper bound; +Inf as inf), not cumulative."""
    per_bucket, _sum = lag.lag_seconds.state()
    return {bound: n for bound, n in zip((*EVENT_LOOP_LAG_BUCKETS, float("inf")), per_bucket, strict=True) if n}


def observed(lag: LoopLag) -> tuple[int, float]:
    per_bucket, total = lag.lag_seconds.state()
    return sum(per_bucket), total


# ------------------------------------------------------------------------------------------ sans-IO


def test_the_lag_is_how_late_the_probe_ran_after_its_due_time() -> None:
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    lag.armed(100.1)
    assert lag.fired(100.1 + 0.012) is None
    count, total = observed(lag)
    assert count == 1
    assert total == pytest.approx(0.012)
    assert counts(lag) == {0.015: 1}
    lag.armed(200.0)
    lag.fired(200.3)
    count, total = observed(lag)
    assert count == 2
    assert total == pytest.approx(0.312)
    assert counts(lag) == {0.015: 1, 0.5: 1}


def test_a_probe_run_early_is_no_lag() -> None:
    """asyncio runs a timer up to its clock's resolution before it is due."""
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    lag.armed(50.0)
    lag.fired(49.9999)
    assert observed(lag) == (1, 0.0)
    assert counts(lag) == {EVENT_LOOP_LAG_BUCKETS[0]: 1}


def test_every_probe_is_one_observation() -> None:
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    now = 0.0
    for n in range(1, 38):
        lag.armed(now + 0.1)
        now += 0.1 + (n % 4) * 0.001
        lag.fired(now)
    count, total = observed(lag)
    assert count == 37
    assert total == pytest.approx(sum((n % 4) * 0.001 for n in range(1, 38)))


def test_a_probe_fires_once_per_arming() -> None:
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    with pytest.raises(RuntimeError, match="armed"):
        lag.fired(1.0)
    lag.armed(1.0)
    lag.fired(1.0)
    with pytest.raises(RuntimeError, match="armed"):
        lag.fired(1.1)
    assert observed(lag) == (1, 0.0)


def test_a_stall_asks_for_a_warning_at_most_once_per_log_interval() -> None:
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    lag.armed(0.0)
    assert lag.fired(0.5) is None  # at the threshold: not over it
    lag.armed(1.0)
    assert lag.fired(1.75) == Stall(lag_s=0.75, suppressed=0)
    lag.armed(2.0)
    assert lag.fired(3.0) is None  # within the interval: counted, no line
    lag.armed(4.0)
    assert lag.fired(4.6) is None
    assert lag.summary(11.0) == 0  # the interval has not passed since the line at 1.75
    assert lag.summary(11.75) == 2  # two stalls left out: one summary line
    assert lag.summary(30.0) == 0  # reported
    lag.armed(30.0)
    assert lag.fired(31.0) == Stall(lag_s=1.0, suppressed=0)
    lag.armed(32.0)
    assert lag.fired(33.0) is None
    lag.armed(45.0)
    stall = lag.fired(45.5 + 1e-9)
    assert stall is not None
    assert stall.lag_s == pytest.approx(0.5 + 1e-9)
    assert stall.suppressed == 1
    assert observed(lag)[0] == 7  # the histogram counts every probe, stalled or not


def test_a_log_interval_of_zero_writes_every_stall() -> None:
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.2, log_interval_s=0.0)
    for n in range(3):
        lag.armed(float(n))
        stall = lag.fired(n + 0.3)
        assert stall is not None
        assert stall.lag_s == pytest.approx(0.3)
        assert stall.suppressed == 0


@pytest.mark.parametrize(("interval_s", "stall_warn_s"), [(0.0, 0.5), (-1.0, 0.5), (0.1, 0.0), (0.1, -0.5)])
def test_the_probe_refuses_times_that_are_not_positive(interval_s: float, stall_warn_s: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        LoopLag(interval_s=interval_s, stall_warn_s=stall_warn_s, log_interval_s=10.0)


def test_the_metric_reads_the_probes_histogram() -> None:
    without = Metrics(labels=METRIC_LABELS, process_metrics=False)
    (empty,) = [family for family in without.registry.collect() if family.name == LAG]
    assert {(s.name, s.value) for s in empty.samples if not s.name.endswith("_bucket")} == {
        (f"{LAG}_count", 0),
        (f"{LAG}_sum", 0),
    }
    lag = LoopLag(interval_s=0.1, stall_warn_s=0.5, log_interval_s=10.0)
    metrics = Metrics(labels=METRIC_LABELS, process_metrics=False, event_loop=lag)
    for due, ran in ((1.0, 1.0), (2.0, 2.004), (3.0, 4.5)):
        lag.armed(due)
        lag.fired(ran)
    (family,) = [family for family in metrics.registry.collect() if family.name == LAG]
    assert family.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[(f"{LAG}_count", None)] == 3
    assert samples[(f"{LAG}_sum", None)] == pytest.approx(1.504)
    assert samples[(f"{LAG}_bucket", "0.0005")] == 1
    assert samples[(f"{LAG}_bucket", "0.005")] == 2
    assert samples[(f"{LAG}_bucket", "1.0")] == 2
    assert samples[(f"{LAG}_bucket", "2.5")] == 3
    assert samples[(f"{LAG}_bucket", "+Inf")] == 3


# ------------------------------------------------------------------------------------------ on a loop


async def wait_for_probes(lag: LoopLag, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while observed(lag)[0] < count:
        assert time.monotonic() < deadline, f"{observed(lag)[0]} probes, {count} expected"
        await asyncio.sleep(0.01)


def stalls(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [line for line in logs if line["event"] == STALL_EVENT]


def running(probe: EventLoopProbe) -> bool:
    """``probe.running`` read anew (mypy keeps a property narrowed by an earlier assert)."""
    return probe.running


def slower_than(lag: LoopLag, bound: float) -> int:
    """Probes whose lag exceeded ``bound`` (a bucket bound)."""
    per_bucket, _sum = lag.lag_seconds.state()
    return sum(per_bucket[EVENT_LOOP_LAG_BUCKETS.index(bound) + 1 :])


@pytest.mark.both_loops
async def test_a_blocked_loop_shows_as_one_late_probe_and_one_warning() -> None:
    loop = asyncio.get_running_loop()
    probe = EventLoopProbe(LoopLag(interval_s=0.02, stall_warn_s=0.15, log_interval_s=60.0))
    lag = probe.lag
    with capture_logs() as logs:
        probe.start(loop)
        try:
            assert probe.running
            await wait_for_probes(lag, 3)
            assert slower_than(lag, 0.1) == 0
            # A callback that blocks the loop (a long read, a big batch): the probe due meanwhile runs ~0.3 s late.
            before = observed(lag)[0]
            loop.call_soon(time.sleep, 0.3)
            await wait_for_probes(lag, before + 2)
            assert slower_than(lag, 0.25) == 1
            assert observed(lag)[1] >= 0.25
            (line,) = stalls(logs)
            assert line["log_level"] == "warning"
            assert line["threshold_s"] == 0.15
            assert line["suppressed"] == 0
            assert 0.25 <= line["lag_s"] < 5
            # A second stall within log_rate_limit_interval_s: measured, not logged.
            before = observed(lag)[0]
            loop.call_soon(time.sleep, 0.3)
            await wait_for_probes(lag, before + 2)
            assert slower_than(lag, 0.25) == 2
            assert len(stalls(logs)) == 1
        finally:
            probe.stop()
    assert not running(probe)
    # Nothing left scheduled: no probe runs after stop().
    count = observed(lag)[0]
    await asyncio.sleep(0.1)
    assert observed(lag)[0] == count


@pytest.mark.both_loops
async def test_stalls_left_out_are_summed_up_once_the_log_interval_passed() -> None:
    loop = asyncio.get_running_loop()
    probe = EventLoopProbe(LoopLag(interval_s=0.02, stall_warn_s=0.15, log_interval_s=0.8))
    with capture_logs() as logs:
        probe.start(loop)
        try:
            for _ in range(2):
                before = observed(probe.lag)[0]
                loop.call_soon(time.sleep, 0.25)
                await wait_for_probes(probe.lag, before + 2)
            await asyncio.sleep(1.0)
        finally:
            probe.stop()
    first, summary = stalls(logs)
    assert first["suppressed"] == 0
    assert "summary" not in first
    assert summary["suppressed"] == 1
    assert summary["summary"] is True
    assert summary["threshold_s"] == 0.15


async def test_the_probe_starts_once() -> None:
    probe = EventLoopProbe(LoopLag(interval_s=0.05, stall_warn_s=0.5, log_interval_s=10.0))
    probe.start(asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError, match="already running"):
            probe.start(asyncio.get_running_loop())
    finally:
        probe.stop()
    probe.stop()  # a second stop is harmless
    assert not probe.running


# ------------------------------------------------------------------------------------------ settings


def test_the_probe_settings_default_to_a_tenth_of_a_second_and_half_a_second() -> None:
    settings = load_settings(search_default_paths=False)
    assert (settings.event_loop_probe_interval_s, settings.event_loop_stall_warn_s) == (0.1, 0.5)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("event_loop_probe_interval_s", "0"),
        ("event_loop_probe_interval_s", "0.009"),
        ("event_loop_probe_interval_s", "10.5"),
        ("event_loop_stall_warn_s", "0"),
        ("event_loop_stall_warn_s", "-1"),
        ("event_loop_stall_warn_s", "3601"),
    ],
)
def test_the_probe_settings_are_bounded(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(overrides={key: value}, search_default_paths=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("event_loop_probe_interval_s", 0.01),
        ("event_loop_probe_interval_s", 10.0),
        ("event_loop_stall_warn_s", 0.001),
        ("event_loop_stall_warn_s", 3600.0),
    ],
)
def test_the_probe_settings_take_their_bounds(key: str, value: float) -> None:
    settings = load_settings(overrides={key: str(value)}, search_default_paths=False)
    assert getattr(settings, key) == value
