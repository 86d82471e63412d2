"""Data classification through a running daemon: what reaches the sink and what reaches the log."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import orjson
import pytest

from fpolicyd.app import Daemon
from fpolicyd.obs.log import configure_logging
from fpolicyd.pipeline.redaction import Redactor
from support.captures import NEGO_REQ, NEGO_RESP, SMB_REN
from support.daemon import make_settings
from support.peer import loopback_peer, wait_for_events


def sha16(path: str) -> str:
    return "/" + hashlib.sha256(path.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("level", "classify", "hashed"),
    [("regulated", True, True), ("regulated", False, False), ("prod", True, False), ("dev", True, False)],
)
async def test_events_at_the_sink(tmp_path: Path, level: str, classify: bool, hashed: bool) -> None:
    daemon = Daemon(make_settings(tmp_path, data_classification=level, classify_events=classify))
    await daemon.start()
    try:
        peer = await loopback_peer(daemon.port)
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
        await peer.send(SMB_REN.frame)
        [event] = await wait_for_events(tmp_path, 1)
        await peer.close()
    finally:
        await daemon.stop()
    clear = "/renamed66.txt"
    assert event["file_path"] == (sha16(clear) if hashed else clear)
    assert event["previous_path"] == (sha16("/renamed6.txt") if hashed else "/renamed6.txt")
    identities = {"uid", "sid"} & set(event["metadata"]["user"])
    assert bool(identities) is (not classify or level == "dev")


async def test_no_event_is_logged_at_info(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, redactor=Redactor())
    try:
        daemon = Daemon(make_settings(tmp_path))
        await daemon.start()
        try:
            peer = await loopback_peer(daemon.port)
            await peer.send(NEGO_REQ.frame)
            await peer.receive()
            await peer.send(*([SMB_REN.frame] * 50))
            await wait_for_events(tmp_path, 50)
            await peer.close()
        finally:
            await daemon.stop()
    finally:
        configure_logging(redactor=Redactor())
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert lines, "the daemon logged nothing at all"
    assert len(lines) < 50, "a log line per event"
    assert not any("renamed66" in orjson.dumps(line).decode() for line in lines)


@pytest.mark.parametrize(("level", "clear"), [("prod", False), ("dev", True)])
async def test_wire_capture_masks_paths_per_classification(tmp_path: Path, level: str, clear: bool) -> None:
    daemon = Daemon(make_settings(tmp_path, data_classification=level, capture_enabled=True))
    await daemon.start()
    try:
        peer = await loopback_peer(daemon.port)
        await peer.send(NEGO_REQ.frame)
        await peer.receive()
        await peer.send(SMB_REN.frame)
        await wait_for_events(tmp_path, 1)
        await peer.close()
    finally:
        await daemon.stop()
    captured = b"".join(
        bytes.fromhex(record["hex"])
        for path in (tmp_path / "capture").glob("*.jsonl")
        for record in map(orjson.loads, path.read_bytes().splitlines())
        if "hex" in record
    )
    assert b"<SmbRenReq>" in captured
    assert (b"renamed66.txt" in captured) is clear
    assert (sha16("/renamed66.txt").encode() in captured) is not clear
