"""The pure ingest step: payloads of one read → spool records, replies, notices; counters; dedup in the reader.

Every test that builds events runs with the C accelerator (where it is built) and on the pure-Python path, and the
two give the same batches, byte for byte, with the same session and counters."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from fpolicyd.errors import LocalProtocolError
from fpolicyd.events import NameMaps, normalize
from fpolicyd.pipeline import speedups
from fpolicyd.pipeline.dedup_window import DedupWindow, key_of_event_id
from fpolicyd.pipeline.ingest import Ingest, IngestBatch, IngestCounters, IngestSession
from fpolicyd.pipeline.records import DUPLICATE_TAG, duplicate_payload
from fpolicyd.pipeline.redaction import DataClassification, Redactor
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import Handshake, ScreenRequest, ScreenResponse, StatusQuery, StatusQueryResp
from fpolicyd.protocol.session import NoticeKind, Session, SessionState
from fpolicyd.protocol.session_config import EngineMode, SessionConfig
from fpolicyd.protocol.xml_codec import (
    FastScreen,
    SwitchedFastScreen,
    decode_payload,
    encode_message,
    fast_screen,
)
from fpolicyd.simulator.generate import generate_frames
from fpolicyd.storage.routes_file import load_routes
from support.captures import KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN
from support.notifications import frame, notification

RECEIVED_US = 1_707_492_600_000_000
WALL_S = RECEIVED_US / 1e6
#: The handshake happens before the captures' GenerationTimes (2023, 2024): their events are live, not replayed.
HANDSHAKE_US = 1_600_000_000_000_000
#: With the accelerator where it is built; where it is not, both modes run the Python path and must still pass.
MODES = [pytest.param(True, id="accelerated"), pytest.param(False, id="pure-python")]
BUILT = speedups.accelerator_status().path == "c"


def payload(framed: bytes) -> bytes:
    [out] = XmlFrameReader().feed(framed)
    return out


def make(
    accelerate: bool = True,
    *,
    window: DedupWindow | None = None,
    route: bool = False,
    redact: Redactor | None = None,
    engine: EngineMode = EngineMode.ASYNC,
    fast: FastScreen | None = fast_screen,
    max_outstanding: int = 10_000,
    path_max_chars: int = 0,
) -> tuple[IngestSession, IngestCounters]:
    counters = IngestCounters()
    ingest = Ingest(
        names=NameMaps(),
        counters=counters,
        replay=ReplayTracker(),
        route=Router(load_routes(None)).match if route else None,
        window=window,
        redact=None if redact is None else redact.redact_event,
        accelerate=accelerate,
        path_max_chars=path_max_chars,
    )
    config = SessionConfig(engine_mode=engine, max_outstanding=max_outstanding)
    session = Session(config, peer="10.0.0.5:40001", now=0.0, fast=fast)
    return ingest.session(session), counters


def canonical_screen(req_id: int) -> bytes:
    """The payload of a canonical SCREEN_REQ (the accelerator's and the fast path's layout) with ``req_id``."""
    [framed] = generate_frames(seed=1, node=0, count=1, first_req_id=req_id, base_time_us=RECEIVED_US)
    return payload(framed)


def canonical_reads(counters: IngestCounters, accelerate: bool) -> int:
    """SCREEN_REQs read on a canonical path; checks they went to the accelerator exactly when it runs."""
    reads = counters.accelerated + counters.fast_decoded
    assert counters.accelerated == (reads if accelerate and BUILT else 0)
    return reads


def handshake(step: IngestSession) -> None:
    batch = step.feed([NEGO_REQ.payload], 0.0, HANDSHAKE_US, WALL_S)
    assert batch.replies == [NEGO_RESP.frame]
    assert [n.kind for n in batch.notices] == [NoticeKind.HANDSHAKE, NoticeKind.STATE]


@pytest.mark.parametrize("accelerate", MODES)
def test_events_are_the_reference_normalization_and_counted(accelerate: bool) -> None:
    step, counters = make(accelerate)
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
    assert canonical_reads(counters, accelerate) == 2
    assert counters.full_decoded == 0


@pytest.mark.parametrize("accelerate", MODES)
def test_a_layout_the_fast_path_does_not_take_is_decoded_in_full_with_the_same_result(accelerate: bool) -> None:
    step, counters = make(accelerate)
    handshake(step)
    spaced = SMB_REN.payload.replace(b"<ReqId>", b" <ReqId>")  # whitespace between elements: not canonical
    spaced = spaced.replace(b"<ContentLen>1224<", b"<ContentLen>1225<")
    batch = step.feed([spaced, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert counters.full_decoded == 1
    assert canonical_reads(counters, accelerate) == 1
    full, fast = (orjson.loads(record) for record in batch.records)
    assert fast["metadata"].pop("duplicate") is True  # the replay tracker saw the same notification twice
    assert full == fast


@pytest.mark.parametrize("accelerate", MODES)
def test_exact_dedup_in_the_reader_keeps_the_duplicate_as_a_tagged_record(accelerate: bool) -> None:
    window = DedupWindow(max_entries=100, ttl_s=3600)
    step, counters = make(accelerate, window=window)
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


@pytest.mark.parametrize("accelerate", MODES)
def test_sync_engines_are_answered_per_record_once_durable_duplicates_included(accelerate: bool) -> None:
    step, _ = make(accelerate, window=DedupWindow(max_entries=10, ttl_s=60), engine=EngineMode.SYNC)
    handshake(step)
    batch = step.feed([SMB_OPEN.payload, SMB_OPEN.payload], 1.0, RECEIVED_US, WALL_S)
    assert [index for index, _ in batch.durable_replies] == [0, 1]
    for _, reply in batch.durable_replies:
        assert decode_payload(reply.data[6:]).message == ScreenResponse(2822, "SMB_OPEN", 1)
    query = encode_message(StatusQuery(2822, "SMB_OPEN"))[6:]
    status = step.feed([query], 1.0, RECEIVED_US, WALL_S)
    # STATUS_QUERY is answered at once, from what is outstanding: the second copy is, until its answer is written.
    assert [decode_payload(r[6:]).message for r in status.replies] == [StatusQueryResp(2822, "SMB_OPEN", 1)]
    first, second = (answer for _, answer in batch.durable_replies)
    step.session.answered(first)
    [still] = step.feed([query], 1.0, RECEIVED_US, WALL_S).replies
    assert decode_payload(still[6:]).message == StatusQueryResp(2822, "SMB_OPEN", 1)
    step.session.answered(second)
    [lost] = step.feed([query], 1.0, RECEIVED_US, WALL_S).replies
    assert decode_payload(lost[6:]).message == StatusQueryResp(2822, "SMB_OPEN", 2)


@pytest.mark.parametrize("accelerate", MODES)
def test_requests_beyond_the_outstanding_bound_are_counted_once_logged_once(accelerate: bool) -> None:
    step, counters = make(accelerate, engine=EngineMode.SYNC, max_outstanding=2)
    handshake(step)
    first = step.feed([SMB_OPEN.payload, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert counters.untracked_requests == 0
    assert not [n for n in first.notices if n.kind is NoticeKind.UNTRACKED]
    over = step.feed([canonical_screen(req_id) for req_id in (100, 101, 102)], 1.0, RECEIVED_US, WALL_S)
    assert counters.untracked_requests == 3
    assert [n.fields for n in over.notices if n.kind is NoticeKind.UNTRACKED] == [{"untracked": 3, "limit": 2}]
    again = step.feed([canonical_screen(103)], 1.0, RECEIVED_US, WALL_S)
    assert counters.untracked_requests == 4
    assert not [n for n in again.notices if n.kind is NoticeKind.UNTRACKED]
    assert len(step.session.outstanding) == 2
    assert 102 in step.session.outstanding
    assert 103 in step.session.outstanding
    assert 2822 not in step.session.outstanding


@pytest.mark.parametrize("accelerate", MODES)
def test_routes_are_stored_with_the_event_and_counted(accelerate: bool) -> None:
    step, counters = make(accelerate, route=True)
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


@pytest.mark.parametrize("accelerate", MODES)
def test_redaction_applies_to_the_stored_event(accelerate: bool) -> None:
    redactor = Redactor(level=DataClassification.REGULATED, classify_events=True)
    step, counters = make(accelerate, redact=redactor)
    handshake(step)
    batch = step.feed([SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    event = orjson.loads(batch.records[0])
    assert event["file_path"] == redactor.hash_path("/renamed66.txt")
    assert event["metadata"]["path_hashed"] is True
    assert "sid" not in event["metadata"]["user"]
    assert step._ingest.accelerator.path == "python"  # redaction needs the event as an object
    assert counters.accelerated == 0


@pytest.mark.parametrize("bound", [0, 4096])
@pytest.mark.parametrize("accelerate", MODES)
def test_long_paths_are_cut_alike_on_every_path(accelerate: bool, bound: int) -> None:
    """path_max_chars on the accelerator (which leaves a longer path to Python), the canonical fast path and the
    full decoder (a body over the fast paths' 64 KiB): the reference normalization with the same bound, routed on
    the path as emitted (its head and its last 255 characters are the full path's, so prefix and suffix routes
    match as on the full path)."""
    step, counters = make(accelerate, route=True, path_max_chars=bound)
    handshake(step)
    long = "/legal/" + "d\u00e9/" * 2000 + "report.pdf"  # 6,017 characters, 8,017 UTF-8 bytes
    huge = "/legal/" + "x" * 70_000 + ".pdf"
    payloads = [
        payload(frame(1, "SMB_CREAT", long)),
        payload(frame(2, "SMB_CREAT", huge)),
        payload(frame(3, "SMB_CREAT", "/legal/a.pdf")),
        payload(frame(4, "SMB_REN", long, target=long + ".pdf")),
    ]
    batch = step.feed(payloads, 1.0, RECEIVED_US, WALL_S)
    context = step.session.context
    assert context is not None
    router = Router(load_routes(None))
    for record, framed in zip(batch.records, payloads, strict=True):
        request = decode_payload(framed).message
        assert isinstance(request, ScreenRequest)
        whole = normalize(request, context, NameMaps(), RECEIVED_US)
        expected = normalize(request, context, NameMaps(), RECEIVED_US, path_max_chars=bound)
        routes = router.match(expected.file_path, expected.operation_type)
        assert routes == router.match(whole.file_path, whole.operation_type)
        assert "legal-compliance" in routes
        assert record == expected.with_routes(routes).to_json()
        assert expected.event_id == whole.event_id
    cut = [orjson.loads(r)["metadata"].get("path_truncated", False) for r in batch.records]
    assert cut == ([True, True, False, True] if bound else [False] * 4)
    assert counters.paths_truncated == (3 if bound else 0)
    # Only the short path is the accelerator's when paths are cut; the huge one is always the full decoder's.
    assert counters.full_decoded == 1
    assert counters.accelerated == ((1 if bound else 3) if accelerate and BUILT else 0)
    assert counters.accelerated + counters.fast_decoded == 3


@pytest.mark.parametrize("accelerate", MODES)
def test_a_bad_payload_closes_the_session_and_is_handed_back_whole(accelerate: bool) -> None:
    step, _ = make(accelerate)
    handshake(step)
    bad = SMB_REN.payload.replace(b"<ReqId>4996</ReqId>", b"<ReqId>x</ReqId>")
    batch = step.feed([SMB_OPEN.payload, bad, SMB_REN.payload], 1.0, RECEIVED_US, WALL_S)
    assert batch.events == 1  # what came before stays
    assert batch.close is not None
    assert batch.close.reason == "bad_value"
    assert batch.rejected == bad
    assert batch.abandoned == [SMB_REN.payload]  # read from ONTAP but not decoded: handed back to be kept


@pytest.mark.parametrize("accelerate", MODES)
def test_nothing_is_an_event_before_the_handshake(accelerate: bool) -> None:
    step, counters = make(accelerate)
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


# ------------------------------------------------------------------------------- accelerated and pure-Python

PEER = "10.0.0.5:40000"
NAMES = NameMaps(volumes={2147830405: "vol1"}, default_svm="svm1")


def ingest_session(
    accelerate: bool,
    *,
    engine: EngineMode = EngineMode.ASYNC,
    route: Any = None,
    window: DedupWindow | None = None,
    fast: FastScreen | None = fast_screen,
) -> IngestSession:
    ingest = Ingest(
        names=NAMES,
        counters=IngestCounters(),
        replay=ReplayTracker(),
        route=route,
        window=window,
        accelerate=accelerate,
    )
    return ingest.session(Session(SessionConfig(engine_mode=engine), peer=PEER, now=0.0, fast=fast))


def feed(
    ingest: IngestSession, payloads: list[bytes], now: float = 1.0, received_at_us: int = RECEIVED_US
) -> IngestBatch:
    return ingest.feed(payloads, now, received_at_us, received_at_us / 1e6)


def snapshot(batch: IngestBatch) -> dict[str, Any]:
    return {name: getattr(batch, name) for name in IngestBatch.__slots__}


def decoded_counts(counters: IngestCounters) -> dict[str, Any]:
    """The counters, with the three decoder counts folded into one (they differ by design between the modes)."""
    values = {name: getattr(counters, name) for name in IngestCounters.__dataclass_fields__}
    values["screen_requests"] = values.pop("accelerated") + values.pop("fast_decoded") + values.pop("full_decoded")
    return values


def nego(session_id: str) -> bytes:
    return encode_message(Handshake("VS-1", "policy-a", session_id, ("1.2",)))[6:]


def test_both_paths_make_the_same_batches_from_the_simulator_corpus() -> None:
    """64-frame reads of three nodes' streams, with routing, exact dedup, a sync engine and replay flags (some
    notifications twice, some out of order, some generated before the handshake)."""
    rng = random.Random(5)
    payloads = [NEGO_REQ.payload]
    for seed in range(3):
        frames = [f[6:] for f in generate_frames(seed=seed, node=seed, count=700, base_time_us=RECEIVED_US - 10**9)]
        frames += rng.sample(frames, 60)  # repeats: dedup window and replay duplicates
        rng.shuffle(frames)  # out of order
        payloads += frames
    payloads.insert(500, KEEP_ALIVE.payload)
    payloads.insert(900, SMB_REN.payload.replace(b"<ContentLen>1224<", b"<ContentLen>1225<"))  # general path
    router = Router(load_routes())
    sessions = [
        ingest_session(
            accelerate,
            engine=EngineMode.SYNC,
            route=router.match,
            window=DedupWindow(max_entries=100_000, ttl_s=600.0),
        )
        for accelerate in (True, False)
    ]
    results = []
    for ingest in sessions:
        batches = [
            snapshot(feed(ingest, payloads[i : i + 64], now=1.0 + i, received_at_us=RECEIVED_US + i * 1000))
            for i in range(0, len(payloads), 64)
        ]
        results.append((batches, decoded_counts(ingest._ingest.counters), ingest.session.last_received))
    accelerated, pure = results
    assert accelerated == pure
    records = [record for batch in accelerated[0] for record in batch["records"]]
    flags = [orjson.loads(duplicate_payload(r) or r)["metadata"] for r in records]
    assert any(m.get("duplicate") for m in flags)
    assert any(m.get("out_of_order") for m in flags)
    assert any(m.get("replayed") for m in flags)
    assert any(m["routes"] for m in flags)
    assert any(duplicate_payload(r) is not None for r in records)
    counters = sessions[0]._ingest.counters
    assert counters.accelerated == (counters.events - counters.full_decoded if BUILT else 0)
    assert sessions[1]._ingest.counters.accelerated == 0


@pytest.mark.parametrize("accelerate", MODES)
def test_a_content_length_mismatch_takes_the_general_path_and_is_reported(accelerate: bool) -> None:
    ingest = ingest_session(accelerate)
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [SMB_REN.payload.replace(b"<ContentLen>1224<", b"<ContentLen>1300<")])
    assert batch.events == 1
    assert [notice.kind for notice in batch.notices] == [NoticeKind.CONTENT_LEN_MISMATCH]
    counters = ingest._ingest.counters
    assert (counters.accelerated, counters.fast_decoded, counters.full_decoded) == (0, 0, 1)


@pytest.mark.parametrize("accelerate", MODES)
def test_a_renegotiation_in_the_middle_of_a_read_applies_to_what_follows(accelerate: bool) -> None:
    ingest = ingest_session(accelerate)
    batch = feed(ingest, [nego("S-1"), SMB_REN.payload, nego("S-2"), SMB_REN.payload])
    sessions = [orjson.loads(r)["metadata"]["session_id"] for r in batch.records]
    assert sessions == ["S-1", "S-2"]


@pytest.mark.parametrize("xml", [True, False])
def test_the_accelerator_reads_only_what_the_sessions_fast_reader_would(xml: bool) -> None:
    """An auto-detecting connection that turned out to be protobuf has a switched-off fast reader: its payloads
    go to the session's decoder, never to the accelerator (here the decoder is XML's, to see where they go)."""
    ingest = ingest_session(True, fast=SwitchedFastScreen(lambda: xml))
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    assert ingest.session.fast_ready() is xml
    batch = feed(ingest, [SMB_REN.payload])
    assert batch.events == 1
    counters = ingest._ingest.counters
    assert counters.accelerated == (1 if xml and BUILT else 0)
    assert counters.full_decoded == (0 if xml else 1)


def test_without_a_fast_reader_the_session_is_never_fast_ready() -> None:
    ingest = ingest_session(True, fast=None)
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    assert ingest.session.state is SessionState.ACTIVE
    assert not ingest.session.fast_ready()
    feed(ingest, [SMB_REN.payload])
    assert ingest._ingest.counters.full_decoded == 1


def test_screened_needs_an_active_session() -> None:
    session = Session(SessionConfig(), peer=PEER, now=0.0, fast=fast_screen)
    assert not session.fast_ready()
    with pytest.raises(LocalProtocolError):
        session.screened(1, "SMB_REN", 1.0)
