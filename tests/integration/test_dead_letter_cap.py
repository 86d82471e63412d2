"""The dead-letter cap through the real daemon: peers that never complete the handshake send random frames (up to
the 1 MiB frame limit) on many connections while a healthy ONTAP session streams events. The dead-letter
directory stays within ``dead_letter_max_bytes`` at every step, the garbage is kept as samples only, every event
of the healthy session arrives, and /metrics counts exactly what the cap removed."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import orjson
import pytest

from fpolicyd.app import Daemon
from fpolicyd.protocol.xml_codec import frame_message
from fpolicyd.simulator.peer import OntapPeer
from support.captures import NEGO_REQ, SMB_OPEN, SMB_REN
from support.observability import one, scrape
from support.peer import loopback_peer, wait_for_events

CAP = 64 << 10  # 4 files of 16 KiB
SAMPLE = 256
#: Garbage connections (in waves of WAVE at once), the frames each sends in one write, and the big ones.
CONNECTIONS = 240
WAVE = 24
FRAME_SIZES = (3000, 700)
BIG_FRAMES = 14  # 1 MiB each, the size that filled a 20 MB volume in ~2 s before the cap
EVENTS = 1500


#: For the ``daemon`` fixture (tests/conftest.py).
pytestmark = pytest.mark.settings(
    dead_letter_max_bytes=CAP, dead_letter_max_files=4, dead_letter_pre_handshake_sample_bytes=SAMPLE
)


def frame(payload: bytes) -> bytes:
    return b'"' + len(payload).to_bytes(4, "big") + b'"' + payload


def dead_letter_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir()) if directory.exists() else 0


def dead_letters(directory: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for path in sorted(directory.glob("dead-letter.jsonl*")):
        if path.name.endswith(".lock"):
            continue
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends with a torn line"
        out.extend(orjson.loads(line) for line in data.splitlines())
    return out


async def garbage(port: int, payloads: list[bytes]) -> None:
    peer = await loopback_peer(port)
    try:
        await peer.send(*(frame(p) for p in payloads))
        assert await peer.closed_by_server(within=20)
    finally:
        await peer.close()


async def stream(port: int, count: int) -> OntapPeer:
    peer = await loopback_peer(port)
    await peer.send(NEGO_REQ.frame)
    await peer.receive()
    for start in range(0, count, 50):
        await peer.send(*[SMB_OPEN.frame] * min(50, count - start))
        await asyncio.sleep(0.005)  # interleave with the garbage connections
    return peer


async def test_garbage_before_the_handshake_stays_within_the_cap_and_the_healthy_session_is_served(
    daemon: Daemon, tmp_path: Path
) -> None:
    directory = tmp_path / "dead-letter"
    sent: dict[bytes, int] = {}  # sample → original length (random payloads: the first bytes tell them apart)
    connections = [[os.urandom(size) for size in FRAME_SIZES] for _ in range(CONNECTIONS)]
    connections += [[os.urandom(1 << 20)] for _ in range(BIG_FRAMES)]  # last: their samples are not evicted
    for payloads in connections:
        for payload in payloads:
            sent[payload[:SAMPLE]] = len(payload)
    waves = [connections[i : i + WAVE] for i in range(0, len(connections), WAVE)]

    healthy = asyncio.create_task(stream(daemon.port, EVENTS))
    peaks: list[int] = []
    for wave in waves:
        await asyncio.wait_for(asyncio.gather(*(garbage(daemon.port, p) for p in wave)), 60)
        peaks.append(dead_letter_bytes(directory))
    peer = await asyncio.wait_for(healthy, 60)

    events = await wait_for_events(tmp_path, EVENTS, within=30)
    assert len(events) == EVENTS
    assert all(event["operation_type"] == "open" for event in events)
    assert max(peaks) <= CAP

    # The healthy session's own undecodable notification is evidence: kept whole, within the cap.
    body = SMB_REN.body
    assert body is not None
    broken = frame_message("SCREEN_REQ", body.replace(b"</FscreenReq>", b"</FscreenRe>"))
    await peer.send(broken)
    assert await peer.closed_by_server()
    await peer.close()

    assert dead_letter_bytes(directory) <= CAP
    records = dead_letters(directory)
    whole = [r for r in records if not r.get("sample")]
    assert len(whole) == 1
    assert base64.b64decode(str(whole[0]["event_raw_b64"])) == broken[6:]
    samples = [r for r in records if r.get("sample")]
    for record in samples:
        kept = base64.b64decode(str(record["event_raw_b64"]))
        assert len(kept) == SAMPLE
        assert record["sink"] == "decoder"
        assert record["handshake"] is False
        assert record["original_bytes"] == sent[kept]
    assert sum(1 for record in samples if record["original_bytes"] == 1 << 20) == BIG_FRAMES

    metrics = await scrape(daemon)
    written = one(metrics, "fpolicyd_dead_letter_records", "fpolicyd_dead_letter_records_total", source="decoder")
    sampled = one(
        metrics,
        "fpolicyd_dead_letter_sampled_records",
        "fpolicyd_dead_letter_sampled_records_total",
        source="decoder",
    )
    evicted = one(
        metrics,
        "fpolicyd_dead_letter_dropped",
        "fpolicyd_dead_letter_dropped_total",
        source="decoder",
        reason="evicted",
    )
    # Each garbage connection left its rejected frame, and the frames of the same read (not decoded), as samples.
    assert CONNECTIONS + BIG_FRAMES <= sampled <= CONNECTIONS * len(FRAME_SIZES) + BIG_FRAMES
    assert written == sampled + 1
    assert evicted > 0  # the flood reached the cap
    assert written == len(records) + evicted  # every record is in a file or counted as dropped
    for reason in ("too_large", "write_failed"):
        labels = {"source": "decoder", "reason": reason}
        assert one(metrics, "fpolicyd_dead_letter_dropped", "fpolicyd_dead_letter_dropped_total", **labels) == 0
    size = one(metrics, "fpolicyd_dead_letter_size_bytes")
    assert 0 < size <= CAP
    assert one(metrics, "fpolicyd_dead_letter_limit_bytes") == CAP
