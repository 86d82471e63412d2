"""Long paths through `fpolicyd serve` (a real subprocess) to JSON Lines: a 6,007-character path and one that fills
a frame of exactly max_frame_bytes, with paths kept whole (the default) and cut for the reference schema
(``--path-max-chars 4096``); a frame one byte over max_frame_bytes is refused before it is read."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from fpolicyd.events import (
    NameMaps,
    load_event_schema,
    load_reference_schema,
    normalize,
    path_sha256,
    truncate_path,
)
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import Handshake, PathName, ScreenRequest
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from fpolicyd.simulator.peer import OntapPeer
from fpolicyd.storage.routes_file import load_routes
from support.captures import NEGO_REQ, NEGO_RESP
from support.notifications import notification
from support.peer import loopback_peer
from support.serve import Served, read_events, start_serve, stop

pytestmark = pytest.mark.slow

#: The daemon's default max_frame_bytes (Settings.max_frame_bytes).
MAX_FRAME_BYTES = 1 << 20
_CHECKER = jsonschema.FormatChecker()
EVENT_VALIDATOR = jsonschema.Draft202012Validator(load_event_schema(), format_checker=_CHECKER)
REFERENCE_VALIDATOR = jsonschema.Draft7Validator(load_reference_schema(), format_checker=_CHECKER)

#: 6,007 characters (6,015 UTF-8 bytes): a route prefix, deep directories, a non-ASCII file name with a route suffix.
LONG = "/legal/x" + "dir_/" * 1197 + "résumé_日本語.pdf"
assert len(LONG) == 6007
RENAMED = LONG[:-4] + "-v2.pdf"


def unix_only(request: ScreenRequest) -> ScreenRequest:
    """One UNIX_NAME path (not the WIN_NAME twin), so that the path alone fills the frame."""
    name = request.common.access_paths[-1].name
    return dataclasses.replace(
        request, common=dataclasses.replace(request.common, access_paths=(PathName("UNIX_NAME", name),))
    )


def frame_of_payload_size(req_id: int, size: int) -> tuple[ScreenRequest, bytes]:
    """A SMB_CREAT whose framed payload is exactly ``size`` bytes, nearly all of it the path (ASCII, then a
    non-ASCII name)."""
    filler = 0
    for _ in range(4):  # ContentLen's digits grow with the body: converges in two or three steps
        path = "/legal/" + "x" * filler + "/報告書.pdf"
        request = unix_only(notification(req_id, "SMB_CREAT", path))
        framed = encode_message(request)
        if len(framed) - 6 == size:
            return request, framed
        filler += size - (len(framed) - 6)
    raise AssertionError("no frame of that size")


@pytest.fixture(params=[pytest.param(0, id="kept-whole"), pytest.param(4096, id="cut-4096")])
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Served, int]]:
    """The daemon and its path_max_chars."""
    bound: int = request.param
    daemon, reader = await start_serve(tmp_path, *(("--path-max-chars", str(bound)) if bound else ()))
    try:
        yield daemon, bound
    finally:
        if daemon.process.returncode is None:
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.process.wait(), 30)
        await reader


async def closed_by_server(peer: OntapPeer, within: float = 10.0) -> bool:
    """The daemon closed the connection: end of stream, or a reset (it closed with our bytes still unread)."""
    try:
        while await asyncio.wait_for(peer.reader.read(65536), within):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def wait_for(data_dir: Path, count: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if len(read_events(data_dir, live=True)) >= count or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


async def test_long_paths_reach_json_lines_whole_or_cut(served: tuple[Served, int]) -> None:
    daemon, bound = served
    create = notification(1, "SMB_CREAT", LONG)
    rename = notification(2, "SMB_REN", LONG, target=RENAMED)
    huge, huge_frame = frame_of_payload_size(3, MAX_FRAME_BYTES)
    _, over_frame = frame_of_payload_size(4, MAX_FRAME_BYTES + 1)

    peer = await loopback_peer(daemon.port)
    other = await loopback_peer(daemon.port)
    try:
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
        await peer.send(encode_message(create), encode_message(rename), huge_frame)
        # Another connection sends one byte more than max_frame_bytes: closed on the length prefix, nothing read.
        await other.send(NEGO_REQ.frame)
        assert await other.receive() == NEGO_RESP.payload
        with contextlib.suppress(ConnectionError):  # the daemon may close before the whole frame is sent
            await other.send(over_frame)
        assert await closed_by_server(other)
        await wait_for(daemon.data_dir, 3)
    finally:
        await peer.close()
        with contextlib.suppress(ConnectionError):
            await other.close()
    assert await stop(daemon) == 0

    events = {event["metadata"]["req_id"]: event for event in read_events(daemon.data_dir)}
    assert sorted(events) == [1, 2, 3], "the frame over max_frame_bytes made an event"
    hello = decode_payload(NEGO_REQ.payload).message
    assert isinstance(hello, Handshake)
    context = SessionContext(hello.vs_uuid, hello.policy_name, hello.session_id, "1.2", "ignored")
    router = Router(load_routes(None))
    for req_id, request in ((1, create), (2, rename), (3, huge)):
        event = events[req_id]
        whole = normalize(request, context, NameMaps(), 0)
        EVENT_VALIDATOR.validate(event)
        assert event["event_id"] == whole.event_id  # always the full path's
        # Routed as the full path is: its prefix and its suffix are kept.
        assert event["metadata"]["routes"] == list(router.match(whole.file_path, whole.operation_type))
        assert "legal-compliance" in event["metadata"]["routes"]
        paths = {"file_path": whole.file_path, "previous_path": whole.previous_path}
        if not bound:
            assert event["file_path"] == whole.file_path
            assert event.get("previous_path") == whole.previous_path
            assert "path_truncated" not in event["metadata"]
            assert not REFERENCE_VALIDATOR.is_valid(event)  # over the reference's 4096 characters
            continue
        REFERENCE_VALIDATOR.validate(event)
        assert event["metadata"]["path_truncated"] is True
        for name, full in paths.items():
            if full is None:
                assert name not in event
                continue
            assert event[name] == truncate_path(full, 4096)
            assert len(event[name]) == 4096
            assert event["metadata"]["truncated_paths"][name] == {"chars": len(full), "sha256": path_sha256(full)}
    # The path that filled a whole frame: over 1 MiB - 2 KiB of it reached the file (kept whole), or 4096 characters.
    assert len(events[3]["file_path"]) == 4096 if bound else len(events[3]["file_path"]) > MAX_FRAME_BYTES - 2048
    refused = [line for line in daemon.log_lines if "frame_too_large" in str(line)]
    assert refused, "the refused frame was not logged"
