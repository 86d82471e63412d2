"""The replay-test plot (``fpolicyd replay-test --plot``): the pure renderer and the timeline it draws."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from array import array
from typing import Any

import pytest

from fpolicyd.errors import ConfigError
from fpolicyd.replaytest.config import ReplayTestConfig
from fpolicyd.replaytest.plot import (
    MAX_TIMELINE_POINTS,
    Phase,
    TimelinePoint,
    downsample,
    merge,
    plot_html,
    points_from_json,
    render_html,
    timeline_json,
)
from fpolicyd.replaytest.run import TIMELINE_INTERVAL_S, TIMELINE_MIN_INTERVAL_S, _Timeline

SVG = "{http://www.w3.org/2000/svg}"
PHASES = [Phase.LIVE, Phase.LIVE, Phase.OUTAGE, Phase.OUTAGE, Phase.REPLAY, Phase.REPLAY, Phase.SETTLE]


def series(n: int, step: float = 0.5) -> list[TimelinePoint]:
    return [
        TimelinePoint(
            start_s=i * step,
            end_s=(i + 1) * step,
            phase=PHASES[min(i * len(PHASES) // max(n, 1), len(PHASES) - 1)],
            sent=100 + i,
            delivered=90 + i,
            latency_count=(i % 3) * 10,
            p50_ms=float(i),
            p99_ms=2.0 * i,
            max_ms=3.0 * i,
        )
        for i in range(n)
    ]


def svgs(page: str) -> list[ET.Element]:
    root = ET.fromstring(page)  # the whole page is well-formed XML
    assert root.tag == "html"
    charts = root.findall(".//body/" + SVG + "svg")
    for chart in charts:
        ET.fromstring(ET.tostring(chart))
    return charts


def test_the_page_is_well_formed_with_three_labelled_charts_and_one_step_per_point() -> None:
    points = series(25)
    page = render_html(points, title="run", verdict="lost = 0 ✓")
    charts = svgs(page)
    assert len(charts) == 3
    titles = [c.find(SVG + "text").text for c in charts]  # type: ignore[union-attr]
    assert titles == [
        "send rate and sink arrival rate",
        "cumulative sent and delivered",
        "sink-arrival latency (live notifications)",
    ]
    texts = [" ".join(t.text or "" for t in c.iter(SVG + "text")) for c in charts]
    for text, unit in zip(texts, ("events/s", "notifications", "latency (ms)"), strict=True):
        assert unit in text
        assert "time since the start of the run (s)" in text
    rate, cumulative, latency = charts
    sent_rate = rate.findall(SVG + "polyline")[0].get("points", "").split()
    assert len(sent_rate) == 2 * len(points)  # a step: start and end of each interval
    sent_total = cumulative.findall(SVG + "polyline")[0].get("points", "").split()
    assert len(sent_total) == len(points) + 1  # from 0 at the start, then each interval's end
    # Latency at each measured interval's middle, broken where an interval measured nothing (every third here).
    runs = "".join("x" if p.latency_count else " " for p in points).split()
    expected = [max(2, len(run)) for run in runs]
    lines = [len(line.get("points", "").split()) for line in latency.findall(SVG + "polyline")]
    assert lines == expected * 2  # p50, then p99
    # Phases shaded: one rectangle per run of the same phase, in order.
    shaded = [r.find(SVG + "title").text for r in rate.findall(SVG + "rect")]  # type: ignore[union-attr]
    assert shaded == ["live", "outage", "replay", "settle"]
    assert "lost = 0 ✓" in page
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_cumulative_line_ends_at_the_totals() -> None:
    points = series(10)
    cumulative = svgs(render_html(points, title="t", verdict="v"))[1]
    sent, delivered = cumulative.findall(SVG + "polyline")
    ys = [float(xy.split(",")[1]) for xy in sent.get("points", "").split()]
    assert ys == sorted(ys, reverse=True)  # rising (SVG y grows downwards)
    assert len(delivered.get("points", "").split()) == len(points) + 1


def test_text_is_escaped() -> None:
    nasty = "<script>alert('x')</script> & \"quoted\""
    page = render_html(series(3), title=nasty, verdict="1 lost <b>")
    assert "<script>" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;" in page
    root = ET.fromstring(page)
    assert root.findtext("head/title") == nasty
    assert nasty in "".join(root.find("body/h1").itertext())  # type: ignore[union-attr]


@pytest.mark.parametrize("n", [0, 1])
def test_an_empty_or_one_point_series_renders(n: int) -> None:
    page = render_html(series(n), title="t", verdict="v")
    charts = svgs(page)
    assert len(charts) == 3
    assert all(not re.search(r"nan|inf", ET.tostring(c).decode()) for c in charts)
    if n == 0:
        assert "no samples" in page


def test_a_zero_length_interval_does_not_divide_by_zero() -> None:
    point = TimelinePoint(start_s=1.0, end_s=1.0, phase=Phase.SETTLE, sent=5, delivered=5)
    assert len(svgs(render_html([point], title="t", verdict="v"))) == 3


def test_downsampling_merges_adjacent_pairs_down_to_the_cap() -> None:
    points = series(MAX_TIMELINE_POINTS * 2 + 1, step=0.1)
    out = downsample(points)
    assert len(out) <= MAX_TIMELINE_POINTS
    assert sum(p.sent for p in out) == sum(p.sent for p in points)
    assert (out[0].start_s, out[-1].end_s) == (points[0].start_s, points[-1].end_s)
    assert downsample(points[:5], 5) == points[:5]
    with pytest.raises(ValueError, match="cap"):
        downsample(points, 0)


def test_merging_adds_counts_and_approximates_latency() -> None:
    a = TimelinePoint(0.0, 1.0, Phase.LIVE, 10, 8, latency_count=3, p50_ms=10.0, p99_ms=20.0, max_ms=30.0)
    b = TimelinePoint(1.0, 3.0, Phase.OUTAGE, 0, 2, latency_count=1, p50_ms=2.0, p99_ms=50.0, max_ms=60.0)
    m = merge(a, b)
    assert (m.start_s, m.end_s, m.phase, m.sent, m.delivered, m.latency_count) == (0.0, 3.0, Phase.OUTAGE, 10, 10, 4)
    assert (m.p50_ms, m.p99_ms, m.max_ms) == (8.0, 50.0, 60.0)
    empty = merge(TimelinePoint(0, 1, Phase.LIVE, 1, 1), TimelinePoint(1, 2, Phase.LIVE, 1, 1))
    assert (empty.latency_count, empty.p50_ms) == (0, 0.0)


def test_the_report_timeline_has_running_totals_and_reads_back() -> None:
    points = series(4)
    timeline = timeline_json(points)
    assert [t["sent_total"] for t in timeline] == [100, 201, 303, 406]
    assert timeline[-1]["delivered_total"] == sum(p.delivered for p in points)
    assert timeline[1]["latency_ms"] == {"count": 10, "p50": 1.0, "p99": 2.0, "max": 3.0}
    assert points_from_json(timeline) == points


def report(lost: int) -> dict[str, Any]:
    return {
        "lost": lost,
        "config": {"events": 2000, "nodes": 2, "outage_s": 2.0, "outage_fraction": 0.3, "engine_mode": "async",
                   "daemon": "in-process", "sink": None, "restart_daemon": True, "restart_mode": "kill"},
        "timeline": timeline_json(series(5)),
    }  # fmt: skip


def test_the_page_of_a_report_names_the_run_and_the_verdict() -> None:
    ok = plot_html(report(0))
    title = ET.fromstring(ok).findtext("head/title") or ""
    assert "2,000 notifications over 2 nodes" in title
    assert "restart: kill" in title
    assert "lost = 0 ✓" in ok
    lossy = plot_html(report(1234))
    assert "1,234 lost" in lossy
    assert "lost = 0" not in lossy
    assert len(svgs(lossy)) == 3


def test_the_sampler_slices_latencies_per_interval_and_keeps_at_most_the_cap() -> None:
    timeline = _Timeline(None)
    timeline.begin(2.0)
    assert timeline.interval_s(2.0) == TIMELINE_MIN_INTERVAL_S  # early in the run: fine-grained
    assert timeline.interval_s(2.0 + 100) == TIMELINE_INTERVAL_S
    latencies = array("q", [1000, 3000])
    timeline.sample(2.5, "live", sent=10, delivered=2, latencies_us=latencies)
    latencies.extend([5000])
    timeline.sample(3.0, "verify", sent=10, delivered=3, latencies_us=latencies)
    first, second = timeline.points
    assert (first.start_s, first.end_s, first.phase, first.sent, first.delivered) == (2.0, 2.5, Phase.LIVE, 10, 2)
    assert (first.latency_count, first.max_ms) == (2, 3.0)
    assert (second.phase, second.sent, second.delivered, second.latency_count, second.p50_ms) == (
        Phase.SETTLE, 0, 1, 1, 5.0
    )  # fmt: skip
    fixed = _Timeline(0.5)
    for i in range(1, MAX_TIMELINE_POINTS + 2):
        fixed.sample(i * 0.5, "replay", sent=i, delivered=i, latencies_us=array("q"))
    assert len(fixed.points) <= MAX_TIMELINE_POINTS
    assert sum(p.sent for p in fixed.points) == MAX_TIMELINE_POINTS + 1
    assert fixed.interval_s(0.0) == 1.0  # merged pairwise: the period doubles to match


def test_a_sampling_period_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="timeline_interval_s"):
            ReplayTestConfig(timeline_interval_s=bad)
    assert ReplayTestConfig(timeline=True, timeline_interval_s=0.1).timeline_interval_s == 0.1
