"""Restart equivalence of the processing stage: crash anywhere, restore the persisted state, read the spool again
from the floor — the outputs of the two runs together are exactly those of one run without a crash."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.processing import Candidate, ProcessingStage, ProcessingState
from fpolicyd.pipeline.records import Record
from fpolicyd.pipeline.settle import SettlePolicy, Settler, SettleStrategy, received_at_s
from support.stage_events import BASE, make_event

PATHS = ("/a", "/b", "/c/x.tmp", "/c/x", "/c/x.done")
OPERATIONS = ("create", "write", "read", "delete", "rename")


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[FileEvent, bool]], int, SettleStrategy]:
    count = draw(st.integers(1, 40))
    t = 0.0
    out: list[tuple[FileEvent, bool]] = []
    for n in range(1, count + 1):
        t += draw(st.sampled_from((0.0, 0.5, 1.0, 3.0, 7.0)))
        path = draw(st.sampled_from(PATHS))
        operation = draw(st.sampled_from(OPERATIONS))
        previous = draw(st.sampled_from(PATHS)) if operation == "rename" else None
        out.append((make_event(n, path, operation, t, previous), draw(st.booleans())))
    cut = draw(st.integers(0, count))
    strategy = draw(st.sampled_from(list(SettleStrategy)))
    return out, cut, strategy


def new_stage(strategy: SettleStrategy, state: ProcessingState) -> ProcessingStage:
    policy = SettlePolicy(window_s=5.0, max_hold_s=1e6, strategy=strategy)
    settler = Settler(lambda event: policy if policy.holds(event.operation_type) else None, max_pending=10_000)
    return ProcessingStage(settler=settler, state=state, received_at_s=received_at_s)


def run(
    stage: ProcessingStage, history: list[tuple[FileEvent, bool]], first_seq: int, last_seq: int
) -> list[Candidate]:
    """Feed records first_seq..last_seq one by one; after a record flagged True, settle's clock moves to its
    receive time (a watermark, as the processor does)."""
    out: list[Candidate] = []
    for seq in range(first_seq, last_seq + 1):
        event, tick = history[seq - 1]
        out.extend(stage.take([Record(seq, event.to_json())]))
        if tick:
            out.extend(stage.due(received_at_s(event)))
        stage.emitted(c.last_seq for c in out)
        stage.floor()
    return out


def identities(candidates: list[Candidate]) -> Counter[tuple[int, str, int]]:
    return Counter((c.last_seq, c.event_id, c.coalesced) for c in candidates)


@settings(max_examples=300, deadline=None)
@given(histories())
def test_crash_and_restart_emits_each_output_exactly_once(
    case: tuple[list[tuple[FileEvent, bool]], int, SettleStrategy],
) -> None:
    history, cut, strategy = case
    end = BASE + 1e7

    whole = new_stage(strategy, ProcessingState())
    expected = run(whole, history, 1, len(history)) + whole.due(end)

    before = new_stage(strategy, ProcessingState())
    emitted_before = run(before, history, 1, cut)
    saved = ProcessingState.from_json(before.state().to_json())
    after = new_stage(strategy, saved)
    emitted_after = run(after, history, saved.floor + 1, len(history)) + after.due(end)

    combined = identities(emitted_before) + identities(emitted_after)
    assert combined == identities(expected)
    assert all(count == 1 for count in combined.values())
