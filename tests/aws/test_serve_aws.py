"""simulator → `fpolicyd serve` (subprocess) → SQS / EventBridge on a moto server the tests start themselves."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from fpolicyd.events import load_event_schema
from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.sinks.aws.clients import AwsClients
from support.moto_server import (
    MotoEndpoint,
    bus_with_queue_rule,
    create_queue,
    drain_queue,
    isolate_aws_env,
)
from support.readme_lambda import load_lambda_consumer, record_of_received
from support.serve import read_events, start_serve, stop
from support.sqs_faults import SqsFaults
from support.tcp_proxy import Proxy

pytestmark = pytest.mark.slow


@pytest.fixture
async def clients(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsClients]:
    # The daemon subprocess inherits this environment: dummy credentials and AWS_ENDPOINT_URL = moto.
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as made:
        yield made


def event_ids(messages: list[dict[str, Any]], *, key: str | None = None) -> list[str]:
    out = []
    for message in messages:
        body = orjson.loads(message["Body"])
        event = body[key] if key else body
        jsonschema.validate(event, load_event_schema())
        out.append(event["event_id"])
    return out


async def test_every_event_reaches_sqs_exactly_once(clients: AwsClients, tmp_path: Path) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    daemon, log_reader = await start_serve(tmp_path, "--sinks", f"sqs:{queue_url},jsonl:{tmp_path / 'events'}")
    report = await run(SimulatorConfig(port=daemon.port, nodes=2, events=150, seed=21))
    assert report.completed
    assert await stop(daemon) == 0
    await log_reader
    messages = await drain_queue(sqs, queue_url, 300, within=30)
    ids = event_ids(messages)
    assert len(ids) == len(set(ids)) == 300
    assert set(ids) == {event["event_id"] for event in read_events(tmp_path)}
    attributes = messages[0]["MessageAttributes"]
    assert {"operation", "svm"} <= set(attributes)
    stopped = next(line for line in daemon.log_lines if line.get("event") == "stopped")
    assert stopped["undelivered"] == 0


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
async def test_packed_messages_carry_every_event_exactly_once(clients: AwsClients, tmp_path: Path, fifo: bool) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs, fifo=fifo)
    daemon, log_reader = await start_serve(
        tmp_path,
        "--sinks",
        f"sqs:{queue_url},jsonl:{tmp_path / 'events'}",
        "--sqs-pack-bytes",
        "16384",
        "--sink-linger-s",
        "0.2",
    )
    assert (await run(SimulatorConfig(port=daemon.port, nodes=2, events=300, seed=26))).completed
    assert await stop(daemon) == 0
    await log_reader
    stopped = next(line for line in daemon.log_lines if line.get("event") == "stopped")
    assert stopped["undelivered"] == 0
    attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    count = int(attributes["Attributes"]["ApproximateNumberOfMessages"])
    messages = await drain_queue(sqs, queue_url, count, within=30)
    assert len(messages) == count
    packed = [m for m in messages if "fpolicyd-format" in m.get("MessageAttributes", {})]
    assert packed
    assert count < 600 / 10  # 600 events; a 16 KiB gzip message holds about a hundred
    assert {m["MessageAttributes"]["content-encoding"]["StringValue"] for m in packed} == {"gzip"}
    # The README's Lambda consumer unpacks them: every event exactly once, each a valid event.
    handled: list[dict[str, Any]] = []
    handler = load_lambda_consumer(handled.append)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{queue_url.rsplit('/', 1)[1]}"
    for start in range(0, len(messages), 10):  # an SQS trigger's batch: at most 10 messages
        records = [record_of_received(m, queue_arn=arn) for m in messages[start : start + 10]]
        assert handler({"Records": records}, None) == {"batchItemFailures": []}
    for event in handled:
        jsonschema.validate(event, load_event_schema())
    ids = [event["event_id"] for event in handled]
    stored = [event["event_id"] for event in read_events(tmp_path)]
    assert len(ids) == len(set(ids)) == 600
    assert set(ids) == set(stored)
    if fifo:  # one message group per SVM, and each group's events in the order they were spooled
        groups = {m["Attributes"]["MessageGroupId"] for m in messages}
        assert groups == {event["svm_name"] for event in handled}
        for group in groups:
            assert [e["event_id"] for e in handled if e["svm_name"] == group] == [
                e["event_id"] for e in read_events(tmp_path) if e["svm_name"] == group
            ]


async def test_eventbridge_rule_routes_every_event_to_its_target(clients: AwsClients, tmp_path: Path) -> None:
    bus, queue_url = await bus_with_queue_rule(clients)
    daemon, log_reader = await start_serve(tmp_path, "--sinks", f"eventbridge:{bus}")
    assert (await run(SimulatorConfig(port=daemon.port, nodes=1, events=120, seed=22))).completed
    assert await stop(daemon) == 0
    await log_reader
    messages = await drain_queue(await clients.sqs(), queue_url, 120, within=30)
    envelopes = [orjson.loads(m["Body"]) for m in messages]
    assert {e["source"] for e in envelopes} == {"fsxn.fpolicy"}
    assert {e["detail-type"] for e in envelopes} == {"FPolicy File Operation"}
    ids = event_ids(messages, key="detail")
    assert len(ids) == len(set(ids)) == 120


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_sink_outage_keeps_events_in_the_spool_until_the_endpoint_is_back(
    clients: AwsClients, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto: MotoEndpoint
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    # First run: the endpoint refuses connections; the daemon starts anyway, spools, and keeps the backlog.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    daemon, log_reader = await start_serve(tmp_path, "--sinks", f"sqs:{queue_url}", "--drain-timeout-s", "1")
    assert (await run(SimulatorConfig(port=daemon.port, nodes=1, events=200, seed=23))).completed
    assert await stop(daemon) == 0
    await log_reader
    assert any(line.get("event") == "sink_unavailable_at_start" for line in daemon.log_lines)
    stopped = next(line for line in daemon.log_lines if line.get("event") == "stopped")
    assert stopped["undelivered"] == 200
    # Second run: the endpoint is back; the spooled events go out.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    again, again_log = await start_serve(tmp_path, "--sinks", f"sqs:{queue_url}")
    assert await stop(again) == 0
    await again_log
    ids = event_ids(await drain_queue(sqs, queue_url, 200, within=30))
    assert len(ids) == len(set(ids)) == 200


async def test_endpoint_goes_away_mid_stream_and_comes_back_nothing_lost(
    clients: AwsClients, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto: MotoEndpoint
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    host, port = moto.url.removeprefix("http://").split(":")
    async with Proxy(host, int(port)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        daemon, log_reader = await start_serve(tmp_path, "--sinks", f"sqs:{queue_url}")
        simulation = asyncio.create_task(run(SimulatorConfig(port=daemon.port, nodes=1, events=400, seed=24, rate=400)))
        await asyncio.sleep(0.4)
        await proxy.cut()  # the endpoint disappears while events keep coming
        await asyncio.sleep(2.0)
        await proxy.restore()
        assert (await simulation).completed
        # At least once: a batch whose response was cut is sent again, so duplicates may arrive; keep receiving
        # until every distinct event is there (bounded).
        ids: list[str] = []
        for _ in range(5):
            ids += event_ids(await drain_queue(sqs, queue_url, 400 - len(set(ids)), within=30))
            if len(set(ids)) >= 400:
                break
        assert await stop(daemon) == 0
        await log_reader
    assert len(set(ids)) == 400, f"{400 - len(set(ids))} events missing"  # duplicates allowed: at least once
    stats = next(line for line in daemon.log_lines if line.get("event") == "sink_stats")["sinks"][f"sqs:{queue_url}"]
    # 400 events need at least 40 SendMessageBatch calls; the outage shows up as retried requests.
    assert stats["requests"] > 40
    assert stats["lag"] == 0


async def test_a_missing_queue_stops_the_start_with_a_clear_message(
    clients: AwsClients, tmp_path: Path, moto: MotoEndpoint
) -> None:
    missing = f"{moto.url}/{moto.account_id}/no-such-queue"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fpolicyd", "serve", "--listen-host", "127.0.0.1", "--listen-port", "0",
        "--http-port", "0", "--data-dir", str(tmp_path), "--sinks", f"sqs:{missing}",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"does not exist" in err


async def test_injected_sqs_failures_retry_only_what_failed_and_dead_letter_the_permanent(
    clients: AwsClients, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto: MotoEndpoint
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    seen_transient: set[str] = set()

    def rule(body: str) -> str | None:
        event = orjson.loads(body)
        if event["operation_type"] == "symlink":
            return "permanent"  # SenderFault=true: never retried, dead-lettered with the reason
        if event["metadata"]["req_id"] % 7 == 0 and event["event_id"] not in seen_transient:
            seen_transient.add(event["event_id"])
            return "transient"  # SenderFault=false: only this entry is sent again
        return None

    faults = SqsFaults(moto.url, entry_rule=rule, request_failures=["500", "throttle"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", await faults.start())
    try:
        daemon, log_reader = await start_serve(
            tmp_path, "--sinks", f"sqs:{queue_url},jsonl:{tmp_path / 'events'}", "--sink-max-in-flight", "1"
        )
        assert (await run(SimulatorConfig(port=daemon.port, nodes=1, events=300, seed=25))).completed
        assert await stop(daemon) == 0
        await log_reader
    finally:
        await faults.stop()
    assert faults.request_failures == []  # the HTTP 500 and the throttled request were both answered and retried
    everything = read_events(tmp_path)
    permanent = {e["event_id"] for e in everything if e["operation_type"] == "symlink"}
    assert permanent
    assert seen_transient
    received = event_ids(await drain_queue(sqs, queue_url, len(everything) - len(permanent), within=30))
    assert len(received) == len(set(received))  # only failed entries were re-sent: no duplicates
    assert set(received) == {e["event_id"] for e in everything} - permanent
    dead = [orjson.loads(line) for line in (tmp_path / "dead-letter" / "dead-letter.jsonl").read_bytes().splitlines()]
    assert {record["event"]["event_id"] for record in dead} == permanent
    assert all("InvalidParameterValue" in record["reason"] for record in dead)
    stats = next(line for line in daemon.log_lines if line.get("event") == "sink_stats")["sinks"][f"sqs:{queue_url}"]
    assert stats["dead_lettered"] == len(permanent)
    assert stats["lag"] == 0
