"""The pure ingest step: payloads of one read → spool records, replies, notices; counters; dedup in the reader."""

from __future__ import annotations

import orjson
import pytest

from fpolicyd.events import NameMaps, normalize
from fpolicyd.obs.classification import DataClassification, Redactor
from fpolicyd.pipeline.dedup_window import DedupWindow, key_of_event_id
from fpolicyd.pipeline.ingest import Ingest, IngestCounters, IngestSession
from fpolicyd.pipeline.records import DUPLICATE_TAG, duplicate_payload
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.pipeline.router import Router, RouteTable
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import ScreenRequest, ScreenResponse, StatusQuery
from fpolicyd.protocol.session import EngineMode, NoticeKind, Session, SessionConfig
from fpolicyd.protocol.xml_codec import decode_payload, encode_message, fast_screen
from support.captures import NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN
from support.notifications import frame, notification

RECEIVED_US = 1_707_492_600_000_000
WALL_S = RECEIVED_US / 1e6
#: The handshake happens before the captures' GenerationTimes (2023, 2024): their events are live, not replayed.
HANDSHAKE_US = 1_600_000_000_000_000


def payload(framed: bytes) -> bytes:
    [out] = XmlFrameReader().feed(framed)
    return out


def make(
    *,
    window: DedupWindow | None = None,
    route: bool = False,
    redact: Redactor | None = None,
    engine: EngineMode = EngineMode.ASYNC,
) -> tuple[IngestSession, IngestCounters]:
    counters = IngestCounters()
    ingest = Ingest(
        names=NameMaps(),
        counters=counters,
        replay=ReplayTracker(),
        route=Router(RouteTable.load(None)).match if route else None,
        window=window,
        redact=None if redact is None else redact.redact_event,
    )
    session = Session(SessionConfig(engine_mode=engine), peer="10.0.0.5:40001", now=0.0, fast=fast_screen)
    return ingest.session(session), counters


def handshake(step: IngestSession) -> None:
    batch = step.feed([NEGO_REQ.payload], 0.0, HANDSHAKE_US, WALL_S)
    assert batch.replies == [NEGO_RESP.frame]
    assert [n.kind for n in batch.notices] == [NoticeKind.HANDSHAKE, NoticeKind.STATE]


def test_events_are_the_reference_normalization_and_counted() -> None:
    step, counters = make()
    handshake(step)
    batch = step.feed([SMB_OPEN.payload, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert batch.events == batch.frames == 2
    assert batch.replies == []
    assert batch.durable_replies == []
    assert batch.close is None
    context = step.session.context
    assert context is not None
    for record, capture in zip(batch.records, (SMB_OPEN, SMB_REN), strict=True):
        request = decode_payload(capture.payload).message
        assert isinstance(request, ScreenRequest)
        assert record == normalize(request, context, NameMaps(), RECEIVED_US).to_json()
    assert counters.events == 2
    assert counters.operations == {"open": 1, "rename": 1}
    assert counters.fast_decoded == 2
    assert counters.full_decoded == 0


def test_a_layout_the_fast_path_does_not_take_is_decoded_in_full_with_the_same_result() -> None:
    step, counters = make()
    handshake(step)
    spaced = SMB_REN.payload.replace(b"<ReqId>", b" <ReqId>")  # whitespace between elements: not canonical
    spaced = spaced.replace(b"<ContentLen>1224<", b"<ContentLen>1225<")
    batch = step.feed([spaced, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert counters.full_decoded == 1
    assert counters.fast_decoded == 1
    full, fast = (orjson.loads(record) for record in batch.records)
    assert fast["metadata"].pop("duplicate") is True  # the replay tracker saw the same notification twice
    assert full == fast


def test_exact_dedup_in_the_reader_keeps_the_duplicate_as_a_tagged_record() -> None:
    window = DedupWindow(max_entries=100, ttl_s=3600)
    step, counters = make(window=window)
    handshake(step)
    first = payload(frame(1, "SMB_WR", "/data/a.csv"))
    rewrite = payload(frame(2, "SMB_WR", "/data/a.csv"))  # a later GenerationTime: a genuine rewrite
    batch = step.feed([first, rewrite, first], 1.0, RECEIVED_US, WALL_S)
    assert [r[0] for r in batch.records] == [ord("{"), ord("{"), DUPLICATE_TAG]
    duplicate = duplicate_payload(batch.records[2])
    assert duplicate is not None
    ids = [orjson.loads(record)["event_id"] for record in (batch.records[0], batch.records[1], duplicate)]
    assert ids[0] == ids[2] != ids[1]
    assert batch.claims == [(0, key_of_event_id(ids[0])), (1, key_of_event_id(ids[1]))]
    assert counters.duplicates == 1
    assert counters.events == 3  # a duplicate is still a notification received
    # A later read, another connection even: the window remembers.
    again = step.feed([first], 2.0, RECEIVED_US, WALL_S)
    assert again.records[0][0] == DUPLICATE_TAG
    assert again.claims == []


def test_sync_engines_are_answered_per_record_once_durable_duplicates_included() -> None:
    step, _ = make(window=DedupWindow(max_entries=10, ttl_s=60), engine=EngineMode.SYNC)
    handshake(step)
    batch = step.feed([SMB_OPEN.payload, SMB_OPEN.payload], 1.0, RECEIVED_US, WALL_S)
    assert [index for index, _ in batch.durable_replies] == [0, 1]
    for _, reply in batch.durable_replies:
        assert decode_payload(reply[6:]).message == ScreenResponse(2822, "SMB_OPEN", 1)
    status = step.feed([encode_message(StatusQuery(2822, "SMB_OPEN"))[6:]], 1.0, RECEIVED_US, WALL_S)
    assert len(status.replies) == 1  # STATUS_QUERY is answered at once


def test_routes_are_stored_with_the_event_and_counted() -> None:
    step, counters = make(route=True)
    handshake(step)
    batch = step.feed(
        [payload(frame(1, "SMB_CREAT", "/legal/audit/report.pdf")), payload(frame(2, "SMB_CREAT", "/tmp/x"))],
        1.0,
        RECEIVED_US,
        WALL_S,
    )
    routes = [orjson.loads(r)["metadata"]["routes"] for r in batch.records]
    assert "legal-compliance" in routes[0]
    assert routes[1] == []
    assert counters.route_matches["legal-compliance"] == 1
    assert counters.unrouted == 1


def test_redaction_applies_to_the_stored_event() -> None:
    redactor = Redactor(level=DataClassification.REGULATED, classify_events=True)
    step, _ = make(redact=redactor)
    handshake(step)
    batch = step.feed([SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    event = orjson.loads(batch.records[0])
    assert event["file_path"] == redactor.hash_path("/renamed66.txt")
    assert event["metadata"]["path_hashed"] is True
    assert "sid" not in event["metadata"]["user"]


def test_a_bad_payload_closes_the_session_and_is_handed_back_whole() -> None:
    step, _ = make()
    handshake(step)
    bad = SMB_REN.payload.replace(b"<ReqId>4996</ReqId>", b"<ReqId>x</ReqId>")
    batch = step.feed([SMB_OPEN.payload, bad, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert batch.events == 1  # what came before stays; nothing after the bad frame is read
    assert batch.close is not None
    assert batch.close.reason == "bad_value"
    assert batch.rejected == bad


def test_nothing_is_an_event_before_the_handshake() -> None:
    step, counters = make()
    batch = step.feed([SMB_REN.payload], 0.0, RECEIVED_US, WALL_S)
    assert batch.close is not None
    assert batch.close.reason == "expected_nego"
    assert batch.records == []
    assert counters.events == 0


@pytest.mark.parametrize("engine", [EngineMode.ASYNC, EngineMode.SYNC])
def test_the_fast_entry_point_is_exactly_receive(engine: EngineMode) -> None:
    """Session.screen and Session.receive agree on every capture (fields and the sync reply)."""
    fast = Session(SessionConfig(engine_mode=engine), peer="p:1", now=0.0, fast=fast_screen)
    full = Session(SessionConfig(engine_mode=engine), peer="p:1", now=0.0)
    for session in (fast, full):
        session.receive(NEGO_REQ.payload, 0.0)
    assert fast.screen(NEGO_REQ.payload, 1.0) is None  # not a SCREEN_REQ
    assert full.screen(SMB_REN.payload, 1.0) is None  # no fast reader configured
    for capture in (SMB_OPEN, SMB_REN, payload(encode_message(notification(7, "NFS_WR", "/n/f")))):
        data = capture if isinstance(capture, bytes) else capture.payload
        quick = fast.screen(data, 2.0)
        [slow] = full.receive(data, 2.0)
        assert quick == slow
    assert fast.last_received == 2.0
