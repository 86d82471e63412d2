"""The log rate limiter over arbitrary sequences of keyed occurrences and summary flushes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.obs.ratelimit import LogRateLimiter

KEYS = ("a", "b", "c")
#: One step: an occurrence of a key (or a flush, None) after a non-negative delay.
steps = st.lists(
    st.tuples(st.sampled_from((*KEYS, None)), st.floats(0, 3, allow_nan=False, allow_infinity=False)), max_size=300
)


@given(st.floats(0, 5, allow_nan=False, allow_infinity=False), steps)
def test_every_occurrence_is_reported_once_and_lines_are_an_interval_apart(
    interval: float, sequence: list[tuple[str | None, float]]
) -> None:
    limiter = LogRateLimiter(interval)
    now = 0.0
    occurrences = dict.fromkeys(KEYS, 0)
    reported = dict.fromkeys(KEYS, 0)
    lines: dict[str, list[float]] = {key: [] for key in KEYS}
    for key, delay in sequence:
        now += delay
        if key is None:
            for flushed, count in limiter.due(now):
                assert count > 0
                reported[flushed] += count
                lines[flushed].append(now)
            continue
        occurrences[key] += 1
        first = not lines[key]
        result = limiter.admit(key, now)
        if first:
            assert result == 0  # the first occurrence of a key always writes its line
        if result is not None:
            reported[key] += 1 + result
            lines[key].append(now)
    for key in KEYS:
        # Conservation: each occurrence is in exactly one line, or still pending.
        assert reported[key] + limiter.pending(key) == occurrences[key]
        assert len(lines[key]) <= occurrences[key]
        for earlier, later in zip(lines[key], lines[key][1:], strict=False):
            assert later - earlier >= interval


@given(st.integers(1, 500))
def test_a_burst_writes_one_line_and_one_summary(burst: int) -> None:
    limiter = LogRateLimiter(10.0)
    written = [limiter.admit("x", 1.0 + i * 0.001) for i in range(burst)]
    assert written[0] == 0
    assert all(result is None for result in written[1:])
    assert limiter.due(5.0) == []  # the interval has not passed
    assert limiter.due(11.0) == ([("x", burst - 1)] if burst > 1 else [])
    assert limiter.pending("x") == 0


def test_zero_interval_writes_every_line() -> None:
    limiter = LogRateLimiter(0.0)
    assert [limiter.admit("x", 1.0) for _ in range(3)] == [0, 0, 0]


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        LogRateLimiter(-1.0)
