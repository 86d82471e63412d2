"""The replay-test timeline's downsampler over arbitrary series: order kept, totals conserved, at most the cap."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.replaytest.plot import Phase, TimelinePoint, downsample


@st.composite
def timelines(draw: st.DrawFn) -> list[TimelinePoint]:
    durations = draw(st.lists(st.floats(0, 10, allow_nan=False), max_size=300))
    points: list[TimelinePoint] = []
    at = 0.0
    for duration in durations:
        count = draw(st.integers(0, 50))
        p50 = draw(st.floats(0, 1000, allow_nan=False))
        p99 = p50 + draw(st.floats(0, 1000, allow_nan=False))
        points.append(
            TimelinePoint(
                start_s=at,
                end_s=at + duration,
                phase=draw(st.sampled_from(Phase)),
                sent=draw(st.integers(0, 10**6)),
                delivered=draw(st.integers(0, 10**6)),
                latency_count=count,
                p50_ms=p50 if count else 0.0,
                p99_ms=p99 if count else 0.0,
                max_ms=p99 + 1 if count else 0.0,
            )
        )
        at += duration
    return points


@given(timelines(), st.integers(1, 64))
def test_downsampling_keeps_order_and_totals_within_the_cap(points: list[TimelinePoint], cap: int) -> None:
    out = downsample(points, cap)
    assert len(out) <= cap
    assert len(out) == len(points) if len(points) <= cap else len(out) > cap // 2
    # Order kept: the intervals still tile the run, in order, from its start to its end.
    assert all(a.end_s == b.start_s for a, b in itertools.pairwise(out))
    if points:
        assert (out[0].start_s, out[-1].end_s) == (points[0].start_s, points[-1].end_s)
    for name in ("sent", "delivered", "latency_count"):
        assert sum(getattr(p, name) for p in out) == sum(getattr(p, name) for p in points)
    assert max((p.max_ms for p in out), default=0.0) == max((p.max_ms for p in points), default=0.0)
    assert max((p.p99_ms for p in out), default=0.0) == max((p.p99_ms for p in points), default=0.0)
    for p in out:  # a merged p50 stays within the p50s it came from
        assert p.p50_ms <= p.p99_ms + 1e-6 or p.latency_count == 0
