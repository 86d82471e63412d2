"""Kill -9 and restart: in sync mode every event ONTAP got a SCREEN_RESP for is delivered after the restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import ScreenResponse
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from fpolicyd.simulator.generate import generate_requests
from fpolicyd.simulator.peer import handshake
from support.serve import read_events, start_serve, stop

pytestmark = pytest.mark.slow


async def test_sigkill_in_sync_mode_loses_nothing_that_was_answered(tmp_path: Path) -> None:
    daemon, log_reader = await start_serve(tmp_path, "--engine-mode", "sync")
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    hello = handshake(seed=1, node=0, policy_name="p", vs_uuid="11111111-2222-11ee-8888-000c29000001")
    writer.write(encode_message(hello))
    requests = list(generate_requests(seed=1, node=0, count=3000, base_time_us=1_700_000_000_000_000))
    writer.write(b"".join(encode_message(request) for request in requests))
    frames = XmlFrameReader()
    answered: set[int] = set()
    negotiated = False
    while len(answered) < 800:
        data = await asyncio.wait_for(reader.read(65536), 20)
        assert data, "closed before enough answers arrived"
        for payload in frames.feed(data):
            message = decode_payload(payload).message
            if isinstance(message, ScreenResponse):
                answered.add(message.req_id)
            else:
                negotiated = True
    assert negotiated
    daemon.process.send_signal(signal.SIGKILL)  # no drain, no checkpoint, no flush
    await daemon.process.wait()
    await log_reader
    writer.close()
    # Restart on the same data directory: the spool recovers and delivers what was durable.
    again, again_log = await start_serve(tmp_path)
    assert await stop(again) == 0
    await again_log
    recovered = [line for line in again.log_lines if line.get("event") == "spool_opened"]
    assert recovered
    assert recovered[0]["records_recovered"] >= len(answered)
    delivered = {event["metadata"]["req_id"] for event in read_events(tmp_path)}
    missing = answered - delivered
    assert not missing, f"{len(missing)} answered events were lost, e.g. {sorted(missing)[:5]}"
