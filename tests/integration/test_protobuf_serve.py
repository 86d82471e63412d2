"""Protobuf mode end to end: an in-process Daemon over loopback TCP, fed by a small protobuf client.

The events a protobuf session produces must equal those of the XML path for the same notifications; with
``fpolicy_format = auto`` an XML simulator session and a protobuf one share the listener; capture records both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.app import Daemon
from fpolicyd.cli.capture import decode_capture
from fpolicyd.config import Settings, load_settings
from fpolicyd.protocol import proto_codec
from fpolicyd.protocol.framing import FrameReader
from fpolicyd.protocol.messages import (
    Handshake,
    HandshakeResp,
    KeepAlive,
    Message,
    ScreenRequest,
    ScreenResponse,
)
from fpolicyd.protocol.readers import LengthPrefixedReader, ReaderName, VarintDelimitedReader, make_reader
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from fpolicyd.server.capture import read_capture
from fpolicyd.simulator.client import SimulatorConfig, run
from support.captures import NEGO_REQ, SMB_OPEN, SMB_REN

FRAMES: dict[ReaderName, Callable[[bytes], bytes]] = {
    ReaderName.PROTOBUF_LENGTH_PREFIXED: LengthPrefixedReader.frame,
    ReaderName.PROTOBUF_VARINT_DELIMITED: VarintDelimitedReader.frame,
}


def _message(payload: bytes) -> Message:
    return decode_payload(payload).message


def _handshake() -> Handshake:
    message = _message(NEGO_REQ.payload)
    assert isinstance(message, Handshake)
    return message


HANDSHAKE = _handshake()


def _notifications() -> list[ScreenRequest]:
    """The two real captured SCREEN_REQs and variations of them (new ReqIds and GenerationTimes: not duplicates)."""
    out: list[ScreenRequest] = []
    for capture in (SMB_OPEN, SMB_REN):
        request = _message(capture.payload)
        assert isinstance(request, ScreenRequest)
        out.append(request)
        for n in range(3):
            generation_time = (request.common.generation_time or 0) + 1 + n
            out.append(
                ScreenRequest(
                    req_id=request.req_id + 1000 + n,
                    req_type=request.req_type,
                    op_element=request.op_element,
                    common=dataclasses.replace(request.common, generation_time=generation_time),
                    display_path=request.display_path,
                    prot_ver=request.prot_ver,
                    target_paths=request.target_paths,
                    op_fields=(("Extra", str(n)),),
                )
            )
    return out


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    daemons: list[Daemon] = []

    async def start(name: str, **overrides: Any) -> Daemon:
        base: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "listen_port": 0,
            "data_dir": str(tmp_path / name),
            "jsonl_fsync": "never",
            "shutdown_read_grace_s": 0,
            "drain_timeout_s": 2,
        }
        if "http_enabled" in Settings.model_fields:  # the metrics endpoint is not under test here
            base["http_enabled"] = False
        base.update(overrides)
        daemon = Daemon(load_settings(overrides=base, search_default_paths=False))
        daemons.append(daemon)
        await daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        await daemon.stop()


class Client:
    """An ONTAP node in one framing (XML or either protobuf framing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: ReaderName) -> None:
        self.reader = reader
        self.writer = writer
        self.framing = framing
        self.frames: FrameReader = make_reader(framing)
        self.inbox: list[bytes] = []

    @classmethod
    async def connect(cls, port: int, framing: ReaderName) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, framing)

    def encode(self, message: Message) -> bytes:
        if self.framing is ReaderName.XML:
            return encode_message(message)
        return FRAMES[self.framing](proto_codec.encode_message(message))

    def decode(self, payload: bytes) -> Message:
        if self.framing is ReaderName.XML:
            return decode_payload(payload).message
        return proto_codec.decode_payload(payload).message

    async def send(self, *messages: Message) -> None:
        self.writer.write(b"".join(self.encode(m) for m in messages))
        await self.writer.drain()

    async def receive(self, within: float = 5.0) -> Message:
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), within)
            if not data:
                raise ConnectionError("closed by the server")
            self.inbox.extend(self.frames.feed(data))
        return self.decode(self.inbox.pop(0))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def jsonl_events(root: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted((root / "events").glob("fpolicy_events_*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


async def wait_for_events(root: Path, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        events = jsonl_events(root)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.02)


def comparable(event: dict[str, Any]) -> dict[str, Any]:
    """The event without what depends on the connection (peer address) or the receive time."""
    metadata = {k: v for k, v in event["metadata"].items() if k not in {"node", "peer", "received_at"}}
    return {**event, "metadata": metadata}


async def _session(port: int, framing: ReaderName, notifications: list[ScreenRequest]) -> HandshakeResp:
    client = await Client.connect(port, framing)
    await client.send(HANDSHAKE)
    reply = await client.receive()
    assert isinstance(reply, HandshakeResp)
    await client.send(KeepAlive(), *notifications)
    await client.close()
    return reply


@pytest.mark.parametrize("framing", [ReaderName.PROTOBUF_LENGTH_PREFIXED, ReaderName.PROTOBUF_VARINT_DELIMITED])
async def test_protobuf_session_gives_the_same_events_as_xml(
    start_daemon: Callable[..., Any], tmp_path: Path, framing: ReaderName
) -> None:
    mode = "length-prefixed" if framing is ReaderName.PROTOBUF_LENGTH_PREFIXED else "varint-delimited"
    proto = await start_daemon("proto", fpolicy_format="protobuf", protobuf_framing_mode=mode)
    xml = await start_daemon("xml")
    notifications = _notifications()
    proto_reply = await _session(proto.port, framing, notifications)
    xml_reply = await _session(xml.port, ReaderName.XML, notifications)
    assert proto_reply == xml_reply
    assert proto_reply == HandshakeResp(HANDSHAKE.vs_uuid, HANDSHAKE.policy_name, HANDSHAKE.session_id, "1.2")
    proto_events = await wait_for_events(tmp_path / "proto", len(notifications))
    xml_events = await wait_for_events(tmp_path / "xml", len(notifications))
    assert len(proto_events) == len(notifications)
    assert [comparable(e) for e in proto_events] == [comparable(e) for e in xml_events]
    assert proto.context.protocol_errors == {}


async def test_the_protobuf_handshake_is_not_wrapped_in_the_xml_prefix(start_daemon: Callable[..., Any]) -> None:
    daemon = await start_daemon("proto", fpolicy_format="protobuf", protobuf_framing_mode="LENGTH_PREFIXED")
    client = await Client.connect(daemon.port, ReaderName.PROTOBUF_LENGTH_PREFIXED)
    await client.send(HANDSHAKE)
    raw = await asyncio.wait_for(client.reader.read(65536), 5)
    assert raw[:1] != b'"'
    (payload,) = LengthPrefixedReader().feed(raw)
    assert isinstance(proto_codec.decode_payload(payload).message, HandshakeResp)
    await client.close()


async def test_sync_engine_answers_screen_requests_in_protobuf(start_daemon: Callable[..., Any]) -> None:
    daemon = await start_daemon(
        "sync", fpolicy_format="protobuf", protobuf_framing_mode="varint-delimited", engine_mode="sync"
    )
    client = await Client.connect(daemon.port, ReaderName.PROTOBUF_VARINT_DELIMITED)
    await client.send(HANDSHAKE)
    assert isinstance(await client.receive(), HandshakeResp)
    request = _notifications()[0]
    await client.send(request)
    assert await client.receive() == ScreenResponse(request.req_id, request.req_type)
    await client.close()


async def test_auto_serves_xml_and_protobuf_sessions_on_one_listener(
    start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    daemon = await start_daemon("auto", fpolicy_format="auto", capture_enabled=True)
    simulation = asyncio.create_task(
        run(SimulatorConfig(port=daemon.port, nodes=1, events=40, keep_alive_interval_s=0, duration_limit_s=30))
    )
    notifications = _notifications()
    reply = await _session(daemon.port, ReaderName.PROTOBUF_VARINT_DELIMITED, notifications)
    assert isinstance(reply, HandshakeResp)
    report = await simulation
    assert report.completed
    events = await wait_for_events(tmp_path / "auto", 40 + len(notifications))
    assert len(events) == 40 + len(notifications)
    assert {e["metadata"]["session_id"] for e in events} >= {HANDSHAKE.session_id}
    assert daemon.context.protocol_errors == {}

    captures = sorted((tmp_path / "auto" / "capture").glob("capture-*.jsonl"))
    assert len(captures) == 2
    detected = set()
    for path in captures:
        capture = read_capture(path)
        assert capture.header["reader"] == "auto"
        records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        detected.add(next(r["detected"] for r in records if r["type"] == "framing"))
        assert len(capture.stream) <= daemon.settings.capture_max_bytes_per_connection
    assert detected == {"xml", "protobuf-varint-delimited"}


async def test_an_xml_peer_on_a_protobuf_only_listener_is_refused_cleanly(start_daemon: Callable[..., Any]) -> None:
    daemon = await start_daemon("proto", fpolicy_format="protobuf", protobuf_framing_mode="length-prefixed")
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(NEGO_REQ.frame)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert daemon.context.protocol_errors == {"frame_too_large": 1}
    writer.close()
    await writer.wait_closed()


async def test_capture_of_a_daemon_session_decodes(start_daemon: Callable[..., Any], tmp_path: Path) -> None:
    daemon = await start_daemon("cap", fpolicy_format="auto", capture_enabled=True, capture_max_frames_per_connection=3)
    await _session(daemon.port, ReaderName.PROTOBUF_LENGTH_PREFIXED, _notifications())
    await wait_for_events(tmp_path / "cap", len(_notifications()))
    (path,) = (tmp_path / "cap" / "capture").glob("capture-*.jsonl")
    capture = read_capture(path)
    assert capture.records <= 3
    assert capture.end is not None
    out = io.StringIO()
    decode_capture(capture.stream, capture.header, 1 << 20, 5, out)
    assert "== reader protobuf-length-prefixed:" in out.getvalue()
    assert "raw protobuf fields (no schema):" in out.getvalue()
