"""The back-pressure policy against its rules, over arbitrary sequences of spool sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.errors import ConfigError
from fpolicyd.pipeline.backpressure import Action, BackPressureGate, Pressure, Watermarks

W = Watermarks(low_bytes=100, high_bytes=200, hard_bytes=300)


@given(st.lists(st.integers(0, 400), max_size=200))
def test_actions_alternate_and_match_the_state(sizes: list[int]) -> None:
    bp = BackPressureGate(W)
    applied = paused = paused_before = False
    for size in sizes:
        for action in bp.update(size):
            if action is Action.APPLY:
                assert not applied
                applied = True
            elif action is Action.REMOVE:
                assert applied
                assert not paused
                applied = False
            elif action is Action.PAUSE_READING:
                assert applied
                assert not paused
                paused = True
            else:
                assert paused
                paused = False
        assert applied == (bp.state is not Pressure.NORMAL)
        assert paused == (bp.state is Pressure.PAUSED)
        # The state is always the one the thresholds and the hysteresis call for: paused from hard down to high.
        was_paused = paused_before
        assert paused == (size >= W.hard_bytes or (was_paused and size >= W.high_bytes))
        paused_before = paused
        if size >= W.high_bytes:
            assert applied
        if size <= W.low_bytes:
            assert not applied


def test_hysteresis_between_low_and_high() -> None:
    bp = BackPressureGate(W)
    assert bp.update(150) == ()
    assert bp.update(250) == (Action.APPLY,)
    assert bp.update(150) == ()
    assert bp.update(100) == (Action.REMOVE,)
    assert bp.update(350) == (Action.APPLY, Action.PAUSE_READING)
    assert bp.update(299) == ()  # just under hard: still paused
    assert bp.update(200) == ()
    assert bp.update(199) == (Action.RESUME_READING,)
    assert bp.update(350) == (Action.PAUSE_READING,)
    assert bp.update(0) == (Action.RESUME_READING, Action.REMOVE)


@given(st.lists(st.integers(0, 400), max_size=200))
def test_reading_pauses_only_over_hard_and_resumes_only_under_high(sizes: list[int]) -> None:
    """So a pause and the next resume are a whole gap apart: a spool hovering at one threshold cannot flap."""
    bp = BackPressureGate(W)
    for size in sizes:
        for action in bp.update(size):
            if action is Action.PAUSE_READING:
                assert size >= W.hard_bytes
            elif action is Action.RESUME_READING:
                assert size < W.high_bytes


@pytest.mark.parametrize(("low", "high", "hard"), [(200, 200, 300), (100, 300, 200), (-1, 10, 20), (100, 200, 200)])
def test_watermarks_are_validated(low: int, high: int, hard: int) -> None:
    with pytest.raises(ConfigError, match="watermarks"):
        Watermarks(low, high, hard)
