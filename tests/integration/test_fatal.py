"""The fatal path, end to end: `fpolicyd serve` (a real subprocess) whose spool fsync fails with EIO stops on its
own with exit 1 and says why; started again on the same data directory, it delivers every event it had answered
exactly once, and nothing twice.

The failure is injected through the seam production code carries for this (storage/faults.py: the spool's
``sync`` itself raises, the rest — pipeline, daemon, CLI — is the code that runs in production)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import ScreenResponse
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from fpolicyd.replaytest.daemons import loopback_serve_argv
from fpolicyd.simulator.generate import generate_requests
from fpolicyd.simulator.peer import handshake
from fpolicyd.storage.faults import FSYNC_EIO_AFTER_ENV
from support.serve import read_events, start_serve, stop

pytestmark = pytest.mark.slow

REQUESTS = 3000
#: Syncs that succeed before the injected EIO: enough that some requests were answered first.
SYNCS_BEFORE_EIO = 3


REQUEST_LIST = list(generate_requests(seed=2, node=0, count=REQUESTS, base_time_us=1_700_000_000_000_000))
SENT = {request.req_id for request in REQUEST_LIST}


async def _send_until_closed(port: int) -> tuple[set[int], bool]:
    """One ONTAP node of a synchronous engine: sends the requests in paced chunks (some groups commit and are
    answered before the fault, the rest arrive after it) and reads every answer until the daemon closes the
    session. Returns the req_ids answered and whether the handshake was answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = handshake(seed=2, node=0, policy_name="p", vs_uuid="11111111-2222-11ee-8888-000c29000001")
    writer.write(encode_message(hello))
    frames = XmlFrameReader()
    answered: set[int] = set()
    negotiated = False

    async def send() -> None:
        for start in range(0, REQUESTS, 100):
            if writer.is_closing():
                return
            writer.write(b"".join(encode_message(request) for request in REQUEST_LIST[start : start + 100]))
            await asyncio.sleep(0.005)

    sender = asyncio.create_task(send())
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 30)
            except ConnectionResetError:
                break
            if not data:
                break
            for payload in frames.feed(data):
                message = decode_payload(payload).message
                if isinstance(message, ScreenResponse):
                    assert message.req_id not in answered, "a request was answered twice"
                    answered.add(message.req_id)
                else:
                    negotiated = True
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return answered, negotiated


def _timestamp(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


def _lines(log_lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in log_lines if line.get("event") == event]


#: The ways a record reaches the sink: the default (the reader's exact dedup, its claims journaled next to the
#: spool), the processing stage between raw and processed records (window dedup with a zero window: exact, in
#: the stage), and no dedup at all.
PATHS = {
    "reader-dedup": (),
    "stage": ("--dedup-mode", "window", "--dedup-window-minutes", "0"),
    "plain": ("--dedup-mode", "off"),
    # The sinks in the daemon's own process (the others run them in the delivery process: this machine has 2 CPUs).
    "in-process-sinks": ("--delivery-process", "off", "--dedup-mode", "window", "--dedup-window-minutes", "0"),
}
#: Paths with the processing stage (see the known limit at the end of the test).
STAGE_PATHS = {"stage", "in-process-sinks"}
#: A stop after the failure must not wait out the drain budget for records that can never become durable.
DRAIN_TIMEOUT_S = 20.0


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_failed_fsync_stops_serve_with_exit_1_and_the_next_start_delivers_what_was_answered(
    tmp_path: Path, path: str
) -> None:
    flags = (
        "--engine-mode",
        "sync",
        "--spool-group-commit-s",
        "0.01",
        "--drain-timeout-s",
        str(DRAIN_TIMEOUT_S),
        *PATHS[path],
    )
    daemon, log_reader = await start_serve(tmp_path, *flags, environment={FSYNC_EIO_AFTER_ENV: str(SYNCS_BEFORE_EIO)})
    try:
        answered, negotiated = await _send_until_closed(daemon.port)
        assert await asyncio.wait_for(daemon.process.wait(), 60) == 1
    finally:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()
        await log_reader
    assert negotiated
    assert answered, "nothing was answered before the injected failure"
    assert len(answered) < REQUESTS, "the injected failure never happened"

    logs = daemon.log_lines
    (armed,) = _lines(logs, "fault_injection_armed")
    assert armed["level"] == "error"
    (failed,) = _lines(logs, "spool_failed")
    assert failed["level"] == "critical"
    assert "EIO" in failed["error"]
    assert FSYNC_EIO_AFTER_ENV in failed["error"], "an injected failure must say so"
    (stopped,) = _lines(logs, "stopped")
    assert stopped["failure"] == failed["error"]
    assert not _lines(logs, "delivery_process_stop_timeout")
    took = _timestamp(stopped) - _timestamp(failed)
    assert took < DRAIN_TIMEOUT_S / 2, f"the stop after the failure took {took:.1f} s: it waited for the impossible"
    first_run = read_events(tmp_path)
    assert {event["metadata"]["req_id"] for event in first_run} <= answered, "a sink read a record never fsynced"

    # Start again on the same data directory, without the fault: the spool recovers and delivers the rest.
    again, again_log = await start_serve(tmp_path, *flags)
    assert await stop(again) == 0
    await again_log
    (opened,) = _lines(again.log_lines, "spool_opened")
    assert opened["records_lost"] == 0
    assert not _lines(again.log_lines, "fault_injection_armed")
    (stopped_again,) = _lines(again.log_lines, "stopped")
    assert stopped_again["failure"] is None
    assert stopped_again["undelivered"] == 0

    events = read_events(tmp_path)
    delivered = Counter(event["metadata"]["req_id"] for event in events)
    assert len(delivered) == len({event["event_id"] for event in events})
    assert set(delivered) <= SENT
    missing = answered - set(delivered)
    assert not missing, f"{len(missing)} answered events were lost, e.g. {sorted(missing)[:5]}"
    twice = {req_id for req_id, count in delivered.items() if count > 1}
    if path in STAGE_PATHS:
        # Known limit (not fixed here): the stage's output records reached the disk (written, not fsynced) but
        # its cursor only moves once they are durable, so the next start delivers them and processes their input
        # again. At least once, never more than twice, and only events that were answered.
        assert max(delivered.values()) <= 2
        assert twice <= answered
    else:
        assert not twice, f"{len(twice)} events were delivered twice, e.g. {sorted(twice)[:5]}"


async def test_a_malformed_fault_variable_stops_the_start_with_its_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_")}
    env[FSYNC_EIO_AFTER_ENV] = "soon"
    process = await asyncio.create_subprocess_exec(
        *loopback_serve_argv(tmp_path),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert f"{FSYNC_EIO_AFTER_ENV}: must be a whole number >= 0, got 'soon'" in stderr.decode()
    assert not (tmp_path / "spool").exists(), "nothing may start with a malformed fault variable"
