"""SIGTERM with a backlog and a slow SQS: `fpolicyd serve` (a subprocess) closes its listener at once — ONTAP
sends to its other servers — and delivers the whole spool before it exits, within ``drain_timeout_s``. This is
what the Fargate template relies on (issue 14, defect 10): the spool lives on task storage, so what the drain
does not deliver is gone with the task."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.sinks.aws.clients import AwsClients
from support.moto_server import MotoEndpoint, create_queue, drain_queue, isolate_aws_env
from support.serve import start_serve
from support.sqs_faults import SqsFaults

pytestmark = pytest.mark.slow

EVENTS = 400
#: Each SendMessageBatch (10 events) waits this long, one batch at a time: ~40 x 0.1 s of backlog at the stop.
SQS_DELAY_S = 0.1
DRAIN_TIMEOUT_S = 60.0


@pytest.fixture
async def clients(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsClients]:
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as made:
        yield made


async def _log_line(log_lines: list[dict[str, Any]], event: str, within_s: float) -> dict[str, Any]:
    for _ in range(int(within_s / 0.01)):
        for line in log_lines:
            if line.get("event") == event:
                return line
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {event!r} log line within {within_s} s")


async def test_sigterm_drains_a_slow_sink_to_empty_before_exit(
    clients: AwsClients, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto: MotoEndpoint
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    slow = SqsFaults(target=moto.url, delay_s=SQS_DELAY_S)
    monkeypatch.setenv("AWS_ENDPOINT_URL", await slow.start())
    try:
        daemon, log_reader = await start_serve(
            tmp_path,
            "--sinks",
            f"sqs:{queue_url}",
            "--sink-max-in-flight",
            "1",
            "--sink-linger-s",
            "0",
            "--drain-timeout-s",
            str(DRAIN_TIMEOUT_S),
            "--shutdown-read-grace-s",
            "0.5",
        )
        try:
            assert (await run(SimulatorConfig(port=daemon.port, nodes=1, events=EVENTS, seed=31))).completed
            daemon.process.send_signal(signal.SIGTERM)
            started = await _log_line(daemon.log_lines, "sink_drain_started", 10)
            assert started["backlog"] > 0, "nothing left to drain at the stop: the test proves nothing"
            assert started["budget_s"] == DRAIN_TIMEOUT_S
            # Draining, and no longer accepting: an ONTAP node that reconnects now goes to another server.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", daemon.port)
            assert daemon.process.returncode is None
            assert await asyncio.wait_for(daemon.process.wait(), DRAIN_TIMEOUT_S + 30) == 0
        finally:
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()
            await log_reader
    finally:
        await slow.stop()
    finished = next(line for line in daemon.log_lines if line.get("event") == "sink_drain_finished")
    assert finished["undelivered"] == 0
    assert finished["took_s"] <= DRAIN_TIMEOUT_S
    stopped = next(line for line in daemon.log_lines if line.get("event") == "stopped")
    assert stopped["undelivered"] == 0
    assert stopped["failure"] is None
    assert not [line for line in daemon.log_lines if line.get("event") == "sink_drain_incomplete"]
    # Every event reached SQS, once.
    messages = await drain_queue(sqs, queue_url, EVENTS, within=30)
    ids = [orjson.loads(message["Body"])["event_id"] for message in messages]
    assert len(ids) == len(set(ids)) == EVENTS
    assert slow.batches >= EVENTS // 10
