"""Settle under wall-clock jumps (the pure parts: :class:`SettleClock`, :class:`ProcessingStage`, :class:`Settler`).

The processor's caught-up loop is replayed here step by step: events are stamped with the (jumping) wall clock
as the reader stamps ``received_at``, offered with ``not_before`` = settle's watermark, and ``due`` is asked at
the watermark, ``SettleClock.now(max(wall, offered_through), mono) - SETTLE_WATERMARK_LAG_S`` (as
``ProcessingWorker._settle_now``). Whatever the wall clock does (an hour
back or forward, several times):

- nothing is lost: every event is in exactly one output;
- nothing is held past ``max_hold_s`` (+ the watermark lag) of real (monotonic) time after its burst began —
  before the fix a step back froze the watermark and held every burst for the length of the step;
- unless the wall clock stepped forward meanwhile, a burst goes out no sooner than its quiet window after its
  last event (real time): an event received after a step back is not released at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.pipeline.processing import Candidate, ProcessingStage, ProcessingState
from fpolicyd.pipeline.records import Record
from fpolicyd.pipeline.settle import SettleClock, SettlePolicy, Settler, received_at_s
from fpolicyd.server.processing import SETTLE_WATERMARK_LAG_S as LAG
from support.stage_events import BASE, make_event

WINDOW, MAX_HOLD = 5.0, 30.0
HOUR = 3600.0


@dataclass(frozen=True)
class Step:
    dt: float  # monotonic seconds since the previous step
    jump: float  # the wall clock is stepped by this much (before the event)
    path: str | None  # an event on this path, or none


steps_strategy = st.lists(
    st.builds(
        Step,
        dt=st.sampled_from((0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 7.0)),
        jump=st.sampled_from((0.0, 0.0, 0.0, 0.0, HOUR, -HOUR, 2 * HOUR, -2 * HOUR)),
        path=st.sampled_from((None, "/a", "/b", "/c", "/d")),
    ),
    min_size=1,
    max_size=60,
)


def new_stage() -> ProcessingStage:
    policy = SettlePolicy(window_s=WINDOW, max_hold_s=MAX_HOLD)
    return ProcessingStage(
        settler=Settler(lambda event: policy, max_pending=1000), state=ProcessingState(), received_at_s=received_at_s
    )


@given(steps=steps_strategy, start_wall=st.floats(min_value=0.0, max_value=10 * HOUR))
@settings(max_examples=300, deadline=None)
def test_wall_clock_jumps_neither_lose_nor_hold_nor_release_early(steps: list[Step], start_wall: float) -> None:
    stage, clock = new_stage(), SettleClock()
    mono, offset = 0.0, start_wall  # wall = mono + offset (+ BASE: the epoch of make_event)
    sent_at: dict[int, float] = {}  # seq -> monotonic time it was received
    path_of: dict[int, str] = {}
    forward_jump_at: list[float] = []  # monotonic times of forward steps
    released: list[tuple[Candidate, float]] = []
    seq = 0

    def round_(records: list[Record]) -> None:
        wall = BASE + mono + offset
        watermark = max(clock.now(max(wall, stage.offered_through), mono) - LAG, stage.offered_through)
        out = stage.take(records, watermark)
        out += stage.due(max(clock.now(max(wall, stage.offered_through), mono) - LAG, stage.offered_through))
        released.extend((candidate, mono) for candidate in out)

    for step in steps:
        mono += step.dt
        if step.jump:
            offset += step.jump
            if step.jump > 0:
                forward_jump_at.append(mono)
        records = []
        if step.path is not None:
            seq += 1
            sent_at[seq] = mono
            path_of[seq] = step.path
            event = make_event(seq, step.path, "write", mono + offset)
            records.append(Record(seq, event.to_json()))
        round_(records)
    for _ in range(int((MAX_HOLD + LAG) / 0.5) + 2):  # quiet: time goes on, nothing arrives
        mono += 0.5
        round_([])

    # Nothing lost, nothing twice: an output covers the events of its path from its first to its last seq.
    covered = sorted(
        s
        for candidate, _ in released
        for s in range(candidate.first_seq, candidate.last_seq + 1)
        if path_of[s] == path_of[candidate.last_seq]
    )
    assert covered == list(range(1, seq + 1))
    assert sum(candidate.coalesced for candidate, _ in released) == seq
    assert stage.pending == 0
    for candidate, at in released:
        first, last = sent_at[candidate.first_seq], sent_at[candidate.last_seq]
        # Never held past max_hold_s of real time (plus the lag and the step that saw it due).
        assert at - first <= MAX_HOLD + LAG + 7.0, (candidate, at, first)
        # Not released before its quiet window, unless the wall clock stepped forward while it was held.
        if not any(first <= jump_at <= at for jump_at in forward_jump_at):
            assert at - last >= WINDOW - 1e-6 or at - first >= MAX_HOLD - 1e-6, (candidate, at, last)


@given(
    readings=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=10.0), st.floats(min_value=-3 * HOUR, max_value=3 * HOUR)),
        min_size=1,
        max_size=50,
    )
)
def test_settle_clock_never_goes_back_and_keeps_real_time(readings: list[tuple[float, float]]) -> None:
    clock, mono, wall = SettleClock(), 0.0, 1_700_000_000.0
    previous: float | None = None
    for dt, jump in readings:
        mono += dt
        wall += dt + jump
        now = clock.now(wall, mono)
        assert now >= wall
        if previous is not None:
            assert now >= previous + dt - 1e-6
        previous = now


@given(steps=steps_strategy)
@settings(max_examples=200, deadline=None)
def test_a_restart_after_a_step_back_does_not_wait_for_the_wall_clock(steps: list[Step]) -> None:
    """Events received before and after a step back are still in the spool at a restart (nothing emitted yet):
    the new stage reads them all again; the wall clock is still an hour behind their oldest receive times. Each
    comes out within ``max_hold_s`` (+ lag) of real time after the restart."""
    events = [make_event(n, step.path, "write", n * 0.1 + (-HOUR if n > len(steps) // 2 else 0.0))
              for n, step in enumerate(steps, 1) if step.path is not None]  # fmt: skip
    records = [Record(n, event.to_json()) for n, event in enumerate(events, 1)]
    stage, clock = new_stage(), SettleClock()
    mono, wall0 = 0.0, BASE - HOUR  # the host clock is an hour behind the first receive times
    released: list[Candidate] = []

    def watermark() -> float:
        return max(clock.now(max(wall0 + mono, stage.offered_through), mono) - LAG, stage.offered_through)

    released += stage.take(records, watermark())
    released += stage.due(watermark())
    while mono <= MAX_HOLD + LAG + 1.0:
        mono += 0.5
        released += stage.due(watermark())
    assert sum(candidate.coalesced for candidate in released) == len(records)
    assert stage.pending == 0
