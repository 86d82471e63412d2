"""The daemon over real loopback TCP, driven by a hand-rolled ONTAP peer built on the codec."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from fpolicyd.app import Daemon
from fpolicyd.events import NameMaps
from fpolicyd.pipeline.backpressure import Watermarks
from fpolicyd.pipeline.ingest import Ingest, IngestCounters
from fpolicyd.pipeline.records import Record
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import (
    Alert,
    BackPressure,
    Handshake,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
)
from fpolicyd.protocol.session import NoticeKind
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.protocol.xml_codec import decode_payload, encode_message, frame_message
from fpolicyd.server.connection import FPolicyConnection, LiveConnections, ServerContext
from fpolicyd.server.spooler import Spooler
from fpolicyd.simulator.generate import generate_frames
from fpolicyd.sinks.local import JsonlSender
from fpolicyd.storage.spool import Spool, SpoolSettings
from support.captures import KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN
from support.daemon import make_settings, running_daemon
from support.notifications import BASE_GENERATION_US
from support.peer import eventually, jsonl_events, loopback_peer, negotiated_peer, wait_for_events


async def test_handshake_over_tcp_is_byte_exact(daemon: Daemon) -> None:
    peer = await loopback_peer(daemon.port)
    await peer.send(NEGO_REQ.frame)
    assert await peer.receive() == NEGO_RESP.payload
    await peer.close()


async def test_async_events_reach_jsonl_and_nothing_is_answered(daemon: Daemon, tmp_path: Path) -> None:
    peer = await loopback_peer(daemon.port)
    await peer.send(NEGO_REQ.frame)
    await peer.receive()
    await peer.send(KEEP_ALIVE.frame, SMB_OPEN.frame, SMB_REN.frame, KEEP_ALIVE.frame)
    events = await wait_for_events(tmp_path, 2)
    assert [e["operation_type"] for e in events] == ["open", "rename"]
    rename = events[1]
    assert rename["file_path"] == "/renamed66.txt"
    assert rename["previous_path"] == "/renamed6.txt"
    assert rename["timestamp"] == "2024-02-09T15:28:52.045224Z"
    with pytest.raises(TimeoutError):
        await peer.receive(within=0.3)
    await peer.close()


@pytest.mark.settings(engine_mode="sync")
async def test_sync_mode_answers_every_screen_request(daemon: Daemon) -> None:
    peer = await loopback_peer(daemon.port)
    await peer.send(NEGO_REQ.frame)
    await peer.receive()
    await peer.send(SMB_OPEN.frame, SMB_REN.frame, encode_message(StatusQuery(77, "SMB_WR")))
    answers = [decode_payload(await peer.receive()).message for _ in range(3)]
    # SCREEN_RESPs wait until their event is durable, so the immediate status answer may overtake them; the
    # SCREEN_RESPs keep the order of their requests. ReqId 77 was never sent: "request lost", ONTAP re-sends it.
    assert StatusQueryResp(77, "SMB_WR", 2) in answers
    assert [a for a in answers if isinstance(a, ScreenResponse)] == [
        ScreenResponse(2822, "SMB_OPEN", 1),
        ScreenResponse(4996, "SMB_REN", 1),
    ]
    await peer.close()


@pytest.mark.settings(engine_mode="sync", peer_write_buffer_bytes=4096, peer_write_stall_timeout_s=1.0)
async def test_a_peer_that_reads_no_replies_is_not_read_and_then_closed(daemon: Daemon, tmp_path: Path) -> None:
    """Sync mode: every SCREEN_REQ read makes a SCREEN_RESP. A peer that sends and never reads must not make the
    daemon queue replies without end: it stops being read, then is closed; what was read is kept."""
    loop = asyncio.get_running_loop()
    ctx = daemon.context
    frames = list(generate_frames(seed=9, node=0, count=20_000, base_time_us=BASE_GENERATION_US))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window for replies
    stalled.setblocking(False)
    healthy = None
    try:
        await loop.sock_connect(stalled, ("127.0.0.1", daemon.port))
        await loop.sock_sendall(stalled, NEGO_REQ.frame)
        assert await eventually(lambda: len(ctx.connections) == 1)
        [conn] = list(ctx.connections)
        sent = 0
        # The daemon stops reading, so our sends block; then it closes the connection.
        with contextlib.suppress(TimeoutError, ConnectionResetError, BrokenPipeError):
            for start in range(0, len(frames), 100):
                await asyncio.wait_for(loop.sock_sendall(stalled, b"".join(frames[start : start + 100])), 2.0)
                sent += 100
        assert sent < len(frames), "the daemon kept reading a peer that reads none of its replies"
        assert await eventually(lambda: ctx.protocol_errors.get("write_stall") == 1)
        assert ctx.write_stalls == 1
        assert not ctx.connections
        read = conn.stats.events
        assert 0 < read <= sent
        # Every event read is kept, and another node is served normally.
        healthy = await loopback_peer(daemon.port)
        await healthy.send(NEGO_REQ.frame)
        await healthy.receive()
        await healthy.send(SMB_OPEN.frame)
        assert decode_payload(await healthy.receive()).message == ScreenResponse(2822, "SMB_OPEN", 1)
        events = await wait_for_events(tmp_path, read + 1)
        assert len(events) == read + 1
    finally:
        stalled.close()
        if healthy is not None:
            await healthy.close()


@pytest.mark.settings(engine_mode="sync", peer_write_buffer_bytes=4096, peer_write_stall_timeout_s=10.0)
async def test_a_peer_that_reads_its_replies_again_is_read_again(daemon: Daemon, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    ctx = daemon.context
    count = 20_000  # replies (~3.4 MB) beyond what the sockets' buffers hold
    frames = list(generate_frames(seed=10, node=0, count=count, base_time_us=BASE_GENERATION_US))
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    try:
        await loop.sock_connect(peer, ("127.0.0.1", daemon.port))
        await loop.sock_sendall(peer, NEGO_REQ.frame)
        sender = asyncio.create_task(loop.sock_sendall(peer, b"".join(frames)))
        assert await eventually(lambda: ctx.write_stalls >= 1)  # we read nothing yet: the daemon stops reading
        reader, answered = XmlFrameReader(), 0
        async with asyncio.timeout(30):
            while answered < count:  # now read every reply; the daemon reads the rest of the requests
                data = await loop.sock_recv(peer, 65536)
                assert data, "the daemon closed the connection"
                answered += sum(type(decode_payload(p).message) is ScreenResponse for p in reader.feed(data))
            await sender
        assert "write_stall" not in ctx.protocol_errors
        assert len(await wait_for_events(tmp_path, count)) == count
    finally:
        peer.close()


async def test_alerts_are_logged_once_per_severity_and_peer_per_interval(daemon: Daemon) -> None:
    """ONTAP's alerts are worth a line each, but a peer can send them at will: the first per (severity, address)
    is logged, the rest of the interval only counted in the next line (``suppressed``); the frames are counted."""
    peer = await loopback_peer(daemon.port)
    try:
        await peer.send(NEGO_REQ.frame)
        await peer.receive()
        with capture_logs() as logs:
            await peer.send(*(encode_message(Alert("S-1", "FATAL", f"fatal {n}")) for n in range(5)))
            await peer.send(encode_message(Alert("S-1", "WARNING", "warning")))
            assert await eventually(lambda: daemon.context.notices.get(NoticeKind.ALERT) == 6)
        alerts = [line for line in logs if line["event"] == "ontap_alert"]
        assert [(line["severity"], line["suppressed"]) for line in alerts] == [("FATAL", 0), ("WARNING", 0)]
        assert [line["log_level"] for line in alerts] == ["error", "warning"]
    finally:
        await peer.close()


async def test_a_bad_frame_closes_only_that_connection(daemon: Daemon, tmp_path: Path) -> None:
    good = await loopback_peer(daemon.port)
    bad = await loopback_peer(daemon.port)
    await good.send(NEGO_REQ.frame)
    await good.receive()
    await bad.send(NEGO_REQ.frame)
    await bad.receive()
    await bad.send(b'X\x00\x00\x00\x10"garbage-garbage!')
    assert await bad.closed_by_server()
    await good.send(SMB_REN.frame)
    events = await wait_for_events(tmp_path, 1)
    assert len(events) == 1
    assert daemon.context.protocol_errors.get("bad_marker") == 1
    await good.close()
    await bad.close()


@pytest.mark.settings(handshake_timeout_s=0.2)
async def test_a_peer_that_never_negotiates_is_dropped(daemon: Daemon) -> None:
    peer = await loopback_peer(daemon.port)
    assert await peer.closed_by_server(within=3.0)
    assert daemon.context.protocol_errors.get("handshake_timeout") == 1
    await peer.close()


@pytest.mark.settings(keep_alive_interval_s=0.1, idle_timeout_s=0.35)
async def test_idle_session_is_closed_and_keep_alives_keep_it_open(daemon: Daemon) -> None:
    lively = await loopback_peer(daemon.port)
    idle = await loopback_peer(daemon.port)
    for peer in (lively, idle):
        await peer.send(NEGO_REQ.frame)
        await peer.receive()
    for _ in range(6):
        await lively.send(KEEP_ALIVE.frame)
        await asyncio.sleep(0.1)
    assert await idle.closed_by_server(within=0.1) or idle.reader.at_eof()
    assert not lively.is_closing()
    assert daemon.context.protocol_errors.get("idle_timeout") == 1
    await lively.send(SMB_REN.frame)
    await lively.close()
    await idle.close()


@pytest.mark.settings(max_connections=2)
async def test_connection_limit(daemon: Daemon) -> None:
    first = await loopback_peer(daemon.port)
    second = await loopback_peer(daemon.port)
    for peer in (first, second):
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
    third = await loopback_peer(daemon.port)  # both sessions are taken: closed at accept
    assert await third.closed_by_server(within=2.0)
    assert daemon.context.rejected_connections == 1
    assert daemon.context.rejections == {"max_connections": 1}
    await third.close()
    await first.close()
    await second.close()


@pytest.mark.settings(max_connections=1)
async def test_connections_that_have_not_negotiated_hold_no_session_slot(daemon: Daemon) -> None:
    """Pending connections do not take session slots; the one that negotiates second is refused at NEGO."""
    first = await loopback_peer(daemon.port)
    second = await loopback_peer(daemon.port)
    await first.send(NEGO_REQ.frame)
    assert await first.receive() == NEGO_RESP.payload
    await second.send(NEGO_REQ.frame)
    assert await second.closed_by_server(within=2.0)  # no NEGO_RESP: the only session slot is taken
    assert daemon.context.rejections == {"max_connections": 1}
    await first.close()
    await second.close()
    for _ in range(100):  # the slot is free once the first session's close is seen
        if daemon.context.budget.sessions == 0:
            break
        await asyncio.sleep(0.02)
    third = await loopback_peer(daemon.port)
    await third.send(NEGO_REQ.frame)
    assert await third.receive() == NEGO_RESP.payload
    await third.close()


async def test_many_concurrent_sessions(daemon: Daemon, tmp_path: Path) -> None:
    peers = [await loopback_peer(daemon.port) for _ in range(20)]
    for index, peer in enumerate(peers):
        await peer.send(encode_message(Handshake("vs", f"policy-{index}", f"session-{index}", ("1.2",))))
    for peer in peers:
        await peer.receive()
    request = decode_payload(SMB_REN.payload).message
    assert isinstance(request, ScreenRequest)
    for index, peer in enumerate(peers):
        frames = [
            encode_message(
                ScreenRequest(
                    req_id=n,
                    req_type=request.req_type,
                    op_element=request.op_element,
                    # A distinct GenerationTime each: identical notifications would be one event (exact dedup).
                    common=dataclasses.replace(request.common, generation_time=BASE_GENERATION_US + n),
                    target_paths=request.target_paths,
                    display_path=request.display_path,
                    prot_ver=request.prot_ver,
                )
            )
            for n in range(index * 100, index * 100 + 50)
        ]
        await peer.send(*frames)
    events = await wait_for_events(tmp_path, 1000)
    assert len(events) == 1000
    assert {e["metadata"]["session_id"] for e in events} == {f"session-{i}" for i in range(20)}
    for peer in peers:
        await peer.close()


class SlowSender:
    """A sink that takes 20 ms per batch of at most 20 events, to drive the spool over its watermarks."""

    name = "slow"
    max_records = 20
    max_bytes = 1 << 20
    max_in_flight = 1
    linger_s = 0.0
    linger_records = 20

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def start(self) -> None:
        return None

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        await asyncio.sleep(0.02)
        self.payloads.extend(r.payload for r in records)
        return ()

    async def close(self) -> None:
        return None


async def test_a_slow_sink_applies_back_pressure_pauses_reading_and_loses_nothing(tmp_path: Path) -> None:
    spool = Spool.open(SpoolSettings(directory=tmp_path / "spool", segment_bytes=64 << 10, max_bytes=4 << 20), ["slow"])
    sender = SlowSender()
    connections = LiveConnections()
    spooler = Spooler(
        spool,
        [sender],
        Watermarks(low_bytes=256 << 10, high_bytes=512 << 10, hard_bytes=1 << 20),
        checkpoint_interval_s=0.05,
        broadcast_back_pressure=connections.broadcast_back_pressure,
    )
    context = ServerContext(
        session_config=SessionConfig(),
        ingest=Ingest(names=NameMaps(), counters=IngestCounters(), replay=ReplayTracker()),
        spooler=spooler,
        connections=connections,
        max_frame_bytes=1 << 20,
        max_connections=4,
    )
    await spooler.start()
    server = await asyncio.get_running_loop().create_server(lambda: FPolicyConnection(context), "127.0.0.1", 0)
    peer = await loopback_peer(server.sockets[0].getsockname()[1])
    try:
        await peer.send(NEGO_REQ.frame)
        await peer.receive()
        await peer.send(*([SMB_REN.frame] * 2500))
        assert decode_payload(await peer.receive(within=20)).message == BackPressure(SESSION_ID, True)
        assert decode_payload(await peer.receive(within=30)).message == BackPressure(SESSION_ID, False)
        deadline = time.monotonic() + 20
        while len(sender.payloads) < 2500 and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.02)
        assert len(sender.payloads) == 2500
        assert all(payload.startswith(b'{"event_id":') for payload in sender.payloads)
        assert spooler.pauses >= 1  # reading stopped at the pause watermark
    finally:
        await peer.close()
        server.close()
        await server.wait_closed()
        assert await spooler.drain(5.0) == 0
        spool.close()


SESSION_ID = "d8ad84cc-79dd-11ee-b638-000c29cdbe04"


async def test_the_daemon_asks_every_session_to_stop_and_resume_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon hands its live connections to the spooler (``LiveConnections``, made before both): when the
    spool passes the high watermark every negotiated session gets BACK_PRESSURE_APPLY, the one that sends nothing
    too, and BACK_PRESSURE_REM once the sink has drained it."""
    gate = asyncio.Event()
    real_send = JsonlSender.send

    async def stalled_send(self: JsonlSender, records: Sequence[Record]) -> Sequence[Record]:
        await gate.wait()
        return await real_send(self, records)

    monkeypatch.setattr(JsonlSender, "send", stalled_send)
    settings = make_settings(
        tmp_path,
        spool_segment_bytes=64 << 10,
        backpressure_low_bytes=256 << 10,
        backpressure_high_bytes=512 << 10,
        backpressure_pause_bytes=1 << 20,
        spool_max_bytes=3 << 19,
    )
    async with running_daemon(settings) as daemon:
        busy, quiet = await negotiated_peer(daemon.port), await negotiated_peer(daemon.port)
        try:
            await busy.send(*([SMB_REN.frame] * 2500))
            for peer in (busy, quiet):
                assert decode_payload(await peer.receive(within=20)).message == BackPressure(SESSION_ID, True)
            assert daemon.spooler.back_pressure_applied
            gate.set()
            for peer in (busy, quiet):
                assert decode_payload(await peer.receive(within=30)).message == BackPressure(SESSION_ID, False)
            assert len(await wait_for_events(tmp_path, 2500)) == 2500
        finally:
            gate.set()
            await busy.close()
            await quiet.close()


async def test_stop_reads_what_ontap_already_sent_and_asks_it_to_pause(tmp_path: Path) -> None:
    d = Daemon(make_settings(tmp_path, shutdown_read_grace_s=5.0))
    await d.start()
    peer = await loopback_peer(d.port)
    await peer.send(NEGO_REQ.frame)
    await peer.receive()
    await peer.send(*([SMB_REN.frame] * 2000))  # sits in socket buffers when the stop begins
    report = await d.stop()
    assert report.events == 2000
    assert report.undelivered == 0
    assert len(jsonl_events(tmp_path)) == 2000
    back_pressure = decode_payload(await peer.receive()).message
    assert back_pressure == BackPressure(SESSION_ID, True)
    await peer.close()


async def test_the_suite_runs_on_uvloop() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_an_undecodable_notification_is_kept_in_the_dead_letter_file(daemon: Daemon, tmp_path: Path) -> None:
    import base64

    peer = await loopback_peer(daemon.port)
    await peer.send(NEGO_REQ.frame)
    await peer.receive()
    body = SMB_REN.body
    assert body is not None
    broken = frame_message("SCREEN_REQ", body.replace(b"</FscreenReq>", b"</FscreenRe>"))
    await peer.send(broken)
    assert await peer.closed_by_server()
    await peer.close()
    records = [
        orjson.loads(line) for line in (tmp_path / "dead-letter" / "dead-letter.jsonl").read_bytes().splitlines()
    ]
    assert len(records) == 1
    assert records[0]["sink"] == "decoder"
    assert records[0]["reason"].startswith("bad_xml")
    assert base64.b64decode(records[0]["event_raw_b64"]) == broken[6:]
