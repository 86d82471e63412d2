"""The processing stage's sans-IO core: record kinds, destinations, the no-parse fast path, settle hold-back, floor."""

from __future__ import annotations

import orjson
import pytest

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.processing import (
    Candidate,
    Destinations,
    ProcessingStage,
    ProcessingState,
    encode_processed,
    processed_payload,
    sink_key,
    sink_selector,
    stored_event_id,
)
from fpolicyd.pipeline.records import Record
from fpolicyd.pipeline.settle import SettlePolicy, Settler, received_at_s
from support.stage_events import BASE, make_event

A, B, AUDIT = "jsonl:/a", "sqs:https://q/legal", "jsonl:/unrouted"


def record(seq: int, event: FileEvent) -> Record:
    return Record(seq, event.to_json())


def stage(
    *, settle_window_s: float = 0.0, state: ProcessingState | None = None, decode: bool = True
) -> ProcessingStage:
    settler = None
    if settle_window_s:
        policy = SettlePolicy(window_s=settle_window_s, max_hold_s=60.0)
        settler = Settler(lambda event: policy if policy.holds(event.operation_type) else None, max_pending=1000)
    return ProcessingStage(
        settler=settler, state=state or ProcessingState(), received_at_s=received_at_s, decode=decode
    )


def test_processed_records_reach_only_the_sinks_they_name() -> None:
    everyone = encode_processed(b'{"e":1}', None)
    only_b = encode_processed(b'{"e":2}', [sink_key(B)])
    assert processed_payload(everyone, sink_key(A)) == b'{"e":1}'
    assert processed_payload(only_b, sink_key(A)) is None
    assert processed_payload(only_b, sink_key(B)) == b'{"e":2}'
    assert processed_payload(b'{"raw":true}', sink_key(A)) is None


def test_selectors_with_and_without_the_stage() -> None:
    raw, processed = b'{"raw":true}', encode_processed(b'{"e":1}', [sink_key(A)])
    on, off = sink_selector(A, processing=True), sink_selector(A, processing=False)
    assert on(raw) is None
    assert on(processed) == b'{"e":1}'
    assert off(raw) == raw
    assert off(processed) == b'{"e":1}'  # a backlog left by a run with the stage on is still delivered
    assert sink_selector(B, processing=False)(processed) is None


def test_destinations() -> None:
    plain = Destinations(default_sinks=(A,), route_sinks={"legal": ()})
    assert plain.keys_for(["legal"]) is None
    assert plain.keys_for([]) is None
    own = Destinations(default_sinks=(A,), route_sinks={"legal": (B,), "media": ()}, unrouted_sinks=(AUDIT,))
    assert own.all_sinks == (A, B, AUDIT)
    assert own.sinks_for(["legal"]) == (B,)
    assert own.sinks_for(["media"]) == (A,)
    assert own.sinks_for(["legal", "media"]) == (B, A)
    assert own.sinks_for([]) == (AUDIT,)
    assert own.keys_for(["legal"]) == (sink_key(B),)


def test_processed_records_are_skipped_and_events_decoded() -> None:
    s = stage()
    first = make_event(1, "/legal/a.pdf", "create", 0.0).with_routes(["legal"])
    second = make_event(2, "/tmp/x", "create", 0.0)
    out = s.take([record(1, first), Record(2, encode_processed(b"{}", None)), record(3, second)])
    assert [c.event for c in out] == [first, second]
    assert [(c.first_seq, c.last_seq) for c in out] == [(1, 1), (3, 3)]
    s.emitted(c.last_seq for c in out)
    assert s.floor() == 3


def test_fast_path_hands_records_on_as_stored() -> None:
    s = stage(decode=False)
    event = make_event(1, "/data/a.csv", "write", 0.0)
    [candidate] = s.take([record(1, event)])
    assert candidate.event is None
    assert candidate.line == event.to_json()
    assert candidate.event_id == event.event_id
    assert stored_event_id(event.to_json()) == event.event_id
    assert stored_event_id(b'{"operation_type":"x"}') is None


def test_fast_path_falls_back_to_parsing_an_unusual_record() -> None:
    s = stage(decode=False)
    event = make_event(1, "/data/a.csv", "write", 0.0)
    reordered = orjson.dumps({"operation_type": "write", **event.to_dict()})
    [candidate] = s.take([Record(1, reordered)])
    assert candidate.event == event


def test_an_undecodable_raw_record_is_passed_on_not_dropped() -> None:
    s = stage()
    assert s.take([Record(1, b"{not json")]) == []
    assert s.passthrough == [(1, b"{not json")]
    assert s.stats.undecodable == 1


def test_settle_holds_the_floor_until_the_burst_is_out() -> None:
    s = stage(settle_window_s=5.0)
    out = s.take(
        [
            record(1, make_event(1, "/f", "create", 100.0)),
            record(2, make_event(2, "/f", "write", 101.0)),
            record(3, make_event(3, "/g", "read", 101.5)),
        ]
    )
    assert [c.last_seq for c in out] == [3]  # the read passes; the create+write burst is held
    s.emitted([3])
    assert s.floor() == 0  # seq 1 is still held by settle
    assert s.pending == 1
    assert s.due(BASE + 105.9) == []
    [burst] = s.due(BASE + 106.0)
    assert (burst.first_seq, burst.last_seq, burst.coalesced) == (1, 2, 2)
    assert burst.event is not None
    assert burst.event.operation_type == "create"
    s.emitted([2])
    assert s.floor() == 3


def test_restart_does_not_emit_twice_what_was_already_out() -> None:
    events = [
        make_event(1, "/f", "create", 100.0),
        make_event(2, "/g", "read", 100.5),
        make_event(3, "/f", "write", 101.0),
        make_event(4, "/h", "read", 101.5),
    ]
    first = stage(settle_window_s=5.0)
    out = first.take([record(i + 1, e) for i, e in enumerate(events)])
    assert [c.last_seq for c in out] == [2, 4]
    first.emitted([2, 4])
    state = first.state()
    assert state == ProcessingState(floor=0, emitted=(2, 4))

    restarted = stage(settle_window_s=5.0, state=ProcessingState.from_json(state.to_json()))
    again = restarted.take([record(i + 1, e) for i, e in enumerate(events)])
    assert again == []  # the reads are known to be out; the burst is pending again
    assert restarted.stats.already_emitted == 2
    [burst] = restarted.due(BASE + 200.0)
    assert isinstance(burst, Candidate)
    assert burst.last_seq == 3


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'{"version": 2}', b'{"version": 1, "floor": -1, "emitted": []}',
     b'{"version": 1, "floor": 5, "emitted": [3]}'],
)  # fmt: skip
def test_malformed_state_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        ProcessingState.from_json(data)
