"""The ingest step (pipeline/ingest.py), with the C accelerator and on the pure-Python path: every test runs on
both, and the two give the same batches, byte for byte, with the same session and counters."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from fpolicyd import speedups
from fpolicyd.events import FileEvent, NameMaps, normalize
from fpolicyd.pipeline.dedup_window import DedupWindow
from fpolicyd.pipeline.ingest import Ingest, IngestBatch, IngestCounters, IngestSession
from fpolicyd.pipeline.records import duplicate_payload
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.pipeline.router import Router, RouteTable
from fpolicyd.protocol.messages import ALLOW, Handshake, ScreenRequest, ScreenResponse
from fpolicyd.protocol.session import EngineMode, NoticeKind, Session, SessionConfig, SessionState
from fpolicyd.protocol.xml_codec import (
    FastScreen,
    SwitchedFastScreen,
    decode_payload,
    encode_message,
    fast_screen,
)
from fpolicyd.simulator import generate_frames
from support.captures import KEEP_ALIVE, NEGO_REQ, SMB_OPEN, SMB_REN

#: The accelerator where it is built (where it is not, both modes run the Python path and must still pass).
MODES = [pytest.param(True, id="accelerated"), pytest.param(False, id="pure-python")]
BUILT = speedups.accelerator_status().path == "c"

RECEIVED_US = 1_707_492_600_000_000
#: Before the captures' GenerationTime: their events are not flagged as replayed.
HANDSHAKE_US = 1_690_000_000_000_000
NAMES = NameMaps(volumes={2147830405: "vol1"}, default_svm="svm1")
PEER = "10.0.0.5:40000"


def ingest_session(
    accelerate: bool,
    *,
    engine: EngineMode = EngineMode.ASYNC,
    route: Any = None,
    window: DedupWindow | None = None,
    redact: Any = None,
    fast: FastScreen | None = fast_screen,
) -> IngestSession:
    ingest = Ingest(
        names=NAMES,
        counters=IngestCounters(),
        replay=ReplayTracker(),
        route=route,
        window=window,
        redact=redact,
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


# ------------------------------------------------------------------------------------------ differential


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
    router = Router(RouteTable.load())
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


# ------------------------------------------------------------------------------------------- each mode


@pytest.mark.parametrize("accelerate", MODES)
def test_an_event_is_the_normalized_notification(accelerate: bool) -> None:
    ingest = ingest_session(accelerate)
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [SMB_OPEN.payload, SMB_REN.payload])  # in GenerationTime order: no replay flag
    context = ingest.session.context
    assert context is not None
    expected = []
    for capture in (SMB_OPEN, SMB_REN):
        request = decode_payload(capture.payload).message
        assert isinstance(request, ScreenRequest)
        expected.append(normalize(request, context, NAMES, RECEIVED_US).to_json())
    assert batch.records == expected
    assert batch.events == 2
    counters = ingest._ingest.counters
    assert counters.operations == {"rename": 1, "open": 1}
    assert (counters.accelerated, counters.fast_decoded) == ((2, 0) if accelerate and BUILT else (0, 2))


@pytest.mark.parametrize("accelerate", MODES)
def test_a_sync_engine_is_answered_once_the_record_is_durable(accelerate: bool) -> None:
    ingest = ingest_session(accelerate, engine=EngineMode.SYNC)
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [KEEP_ALIVE.payload, SMB_REN.payload], now=7.5)
    assert batch.durable_replies == [(0, encode_message(ScreenResponse(4996, "SMB_REN", ALLOW)))]
    assert batch.replies == []
    assert ingest.session.last_received == 7.5


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
def test_duplicates_are_kept_and_tagged(accelerate: bool) -> None:
    ingest = ingest_session(accelerate, window=DedupWindow(max_entries=10, ttl_s=60.0))
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [SMB_REN.payload, SMB_REN.payload])
    assert len(batch.claims) == 1
    assert duplicate_payload(batch.records[0]) is None
    assert duplicate_payload(batch.records[1]) == batch.records[0].replace(b"}}", b',"duplicate":true}}')
    assert ingest._ingest.counters.duplicates == 1


@pytest.mark.parametrize("accelerate", MODES)
def test_routes_are_stored_with_the_event(accelerate: bool) -> None:
    ingest = ingest_session(accelerate, route=lambda path, op: ("renames", "all") if op == "rename" else ())
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [SMB_OPEN.payload, SMB_REN.payload])
    assert [orjson.loads(r)["metadata"]["routes"] for r in batch.records] == [[], ["renames", "all"]]
    counters = ingest._ingest.counters
    assert (counters.route_matches, counters.unrouted) == ({"renames": 1, "all": 1}, 1)


@pytest.mark.parametrize("accelerate", MODES)
def test_a_renegotiation_in_the_middle_of_a_read_applies_to_what_follows(accelerate: bool) -> None:
    ingest = ingest_session(accelerate)
    batch = feed(ingest, [nego("S-1"), SMB_REN.payload, nego("S-2"), SMB_REN.payload])
    sessions = [orjson.loads(r)["metadata"]["session_id"] for r in batch.records]
    assert sessions == ["S-1", "S-2"]


@pytest.mark.parametrize("accelerate", MODES)
def test_nothing_is_read_before_the_handshake(accelerate: bool) -> None:
    ingest = ingest_session(accelerate)
    batch = feed(ingest, [SMB_REN.payload])
    assert batch.close is not None
    assert batch.close.reason == "expected_nego"
    assert batch.rejected == SMB_REN.payload
    assert batch.records == []


def test_redaction_keeps_the_python_path() -> None:
    def redact(event: FileEvent) -> FileEvent:
        return event.with_routes(["redacted"])

    ingest = ingest_session(True, redact=redact)
    assert ingest._ingest.accelerator.path == "python"
    feed(ingest, [NEGO_REQ.payload], received_at_us=HANDSHAKE_US)
    batch = feed(ingest, [SMB_REN.payload])
    assert orjson.loads(batch.records[0])["metadata"]["routes"] == ["redacted"]
    assert ingest._ingest.counters.accelerated == 0


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
    from fpolicyd.errors import LocalProtocolError

    session = Session(SessionConfig(), peer=PEER, now=0.0, fast=fast_screen)
    assert not session.fast_ready()
    with pytest.raises(LocalProtocolError):
        session.screened(1, "SMB_REN", 1.0)
