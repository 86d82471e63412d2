"""``fpolicyd replay-test`` verified at SQS and EventBridge on a moto server the tests start themselves.

The daemon delivers to a queue (``--sink sqs:URL``) or to a bus whose rule targets a queue (``--sink
eventbridge:BUS --verify-queue URL``); replay-test drains the queue and verifies by event_id. The checker is
checked too: a fake server that drops every 97th notification on its way to SQS must be reported with exactly
that loss, and messages this run did not produce must be counted as unexpected or bad, not as delivered.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.events import EventBuilder, NameMaps
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.session import FileNotification, Reply, Session
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.replaytest.config import ReplayTestConfig, RestartMode
from fpolicyd.replaytest.run import run_replay_test
from fpolicyd.replaytest.tails import QueueTail, final_drain
from fpolicyd.sinks.aws.clients import AwsClients
from support.moto_server import MotoEndpoint, bus_with_queue_rule, create_queue, isolate_aws_env

#: A storm's wait for its sink (settle_timeout_s below) ends well inside pytest's limit for these tests: a loss is
#: then reported by replay-test with its figures, not cut short by a timeout that says nothing about it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: moto's ReceiveMessage walks the whole queue on every call (~0.7 ms per queued message on this machine, with the
#: daemon sending faster than the queue is drained), so its cost grows with the square of the size: 500 keeps each
#: test well under 30 s; the real SQS has no such cost.
SIZE = 500
NODES = 3


@pytest.fixture
async def clients(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsClients]:
    # replay-test, its in-process daemon and a daemon subprocess all read this environment: dummy credentials
    # and AWS_ENDPOINT_URL = the moto server.
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as made:
        yield made


def storm(tmp_path: Path, **kw: Any) -> ReplayTestConfig:
    base: dict[str, Any] = {
        "events": SIZE,
        "nodes": NODES,
        "seed": 11,
        "outage_s": 0.3,
        "progress_s": 0.0,
        # moto's SQS scans the whole queue per ReceiveMessage: on a loaded CI box draining can take a while.
        "settle_timeout_s": 90.0,
        "data_dir": tmp_path / "data",
    }
    base.update(kw)
    return ReplayTestConfig(**base)


async def queue_depth(clients: AwsClients, queue_url: str) -> int:
    sqs = await clients.sqs()
    attributes = await sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )
    return sum(int(v) for v in attributes["Attributes"].values())


async def test_every_event_is_verified_at_sqs_and_foreign_messages_are_not_counted(
    clients: AwsClients, tmp_path: Path
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    foreign = b'{"event_id":"00000000-0000-4000-8000-000000000001","metadata":{"node":"x:1"}}'
    await sqs.send_message(QueueUrl=queue_url, MessageBody=foreign.decode())
    await sqs.send_message(QueueUrl=queue_url, MessageBody="not json")

    report = await run_replay_test(storm(tmp_path, sink=f"sqs:{queue_url}", shuffle=True), progress=io.StringIO())

    assert report["ok"], report
    assert report["config"]["verified_at"] == f"sqs:{queue_url}"
    assert (report["generated"], report["delivered"], report["lost"]) == (SIZE, SIZE, 0)
    assert report["unexpected"] == 1
    assert report["sink_bad_lines"] == 1
    # A standard queue delivers at least once: a message may be received again before its delete lands (seen once
    # in CI with the foreign message). Events are counted by id above; raw lines can only be more, never fewer.
    assert report["sink_lines"] >= SIZE + 2
    assert report["duplicates_delivered"] == 0  # no event twice with different bytes (a re-receipt is identical)
    assert (report["queue"]["delete_failures"], report["queue"]["errors"]) == (0, 0)
    assert report["flags"]["match"]
    assert report["flags"]["replayed"]["sink"] == report["backlog_events"]
    assert report["latency"]["sink"]["count"] == SIZE - report["backlog_events"]
    assert not list((tmp_path / "data").glob("events/*.jsonl"))  # the queue was the only sink
    assert await queue_depth(clients, queue_url) == 0  # drained: everything received was deleted


async def test_a_sigkill_mid_replay_loses_nothing_at_sqs(clients: AwsClients, tmp_path: Path) -> None:
    queue_url = await create_queue(await clients.sqs())
    progress = io.StringIO()
    kill = storm(tmp_path, sink=f"sqs:{queue_url}", restart_daemon=True, restart_mode=RestartMode.KILL)

    report = await run_replay_test(kill, progress=progress)

    assert "SIGKILL" in progress.getvalue()
    assert report["config"]["engine_mode"] == "sync"
    assert report["daemon"]["kills"] == 1
    assert report["resent"] > 0
    assert report["ok"]
    assert (report["generated"], report["delivered"], report["lost"], report["unexpected"]) == (SIZE, SIZE, 0, 0)
    assert report["sink_bad_lines"] == 0
    # Every message was one of this run's: first deliveries, the spool's byte-identical re-sends and requests
    # sent again by the nodes (new received_at), nothing else.
    assert report["sink_lines"] == SIZE + report["redelivered_lines"] + report["duplicates_delivered"]
    assert report["undelivered_in_spool"] == 0
    assert await queue_depth(clients, queue_url) == 0, report["queue"]


async def test_eventbridge_is_verified_through_a_rule_that_targets_a_queue(clients: AwsClients, tmp_path: Path) -> None:
    bus, queue_url = await bus_with_queue_rule(clients)
    # The default concurrency (PutEvents in flight at once). Events the daemon had acknowledged once went missing
    # here (up to 46 of 500): moto lost the rule's forwards that landed while the verifier deleted messages, a race
    # in moto's queue that support.moto_server now closes (tests/aws/test_moto_server.py).
    run = storm(tmp_path, sink=f"eventbridge:{bus}", verify_queue=queue_url, restart_daemon=True)

    report = await run_replay_test(run, progress=io.StringIO())

    assert report["config"]["verified_at"] == f"sqs:{queue_url}"
    assert report["daemon"]["restarts"] == 1  # graceful, in-process
    figures = {key: report[key] for key in ("generated", "delivered", "lost", "unexpected", "undelivered_in_spool")}
    assert figures == {"generated": SIZE, "delivered": SIZE, "lost": 0, "unexpected": 0, "undelivered_in_spool": 0}, (
        report["queue"]
    )
    assert report["ok"]
    assert report["sink_bad_lines"] == 0
    assert report["flags"]["match"]


async def test_the_final_drain_waits_for_a_message_still_in_flight(clients: AwsClients) -> None:
    """A message another receive took and did not delete (a standard queue may hand a message to two receives,
    and a delete with the older receipt handle may leave it) is drained once it is visible again."""
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    await sqs.send_message(QueueUrl=queue_url, MessageBody='{"event_id":"00000000-0000-4000-8000-000000000002"}')
    taken = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, VisibilityTimeout=4)
    assert len(taken["Messages"]) == 1
    tail = QueueTail(clients, queue_url, envelope=False)

    await final_drain(tail, 30.0)

    assert tail.lines == 1
    assert await queue_depth(clients, queue_url) == 0


class LossyForwarder:
    """A fake FPolicy server: real handshake, every notification normalized and sent to SQS, except that every
    ``drop_every``-th one is silently dropped."""

    def __init__(self, clients: AwsClients, queue_url: str, drop_every: int) -> None:
        self.clients = clients
        self.queue_url = queue_url
        self.drop_every = drop_every
        self.received = 0
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sqs = await self.clients.sqs()
        loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        session = Session(SessionConfig(), peer=f"{peer[0]}:{peer[1]}", now=loop.time())
        frames = XmlFrameReader()
        while data := await reader.read(65536):
            bodies: list[str] = []
            for payload in frames.feed(data):
                for out in session.receive(payload, loop.time()):
                    if isinstance(out, Reply):
                        writer.write(out.data)
                    elif isinstance(out, FileNotification):
                        assert session.context is not None
                        self.received += 1
                        if self.received % self.drop_every == 0:
                            self.dropped += 1
                            continue
                        event, _ = EventBuilder(session.context, NameMaps()).build(out.fields, 0)
                        bodies.append(orjson.dumps(event).decode())
            for start in range(0, len(bodies), 10):
                entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])]
                response = await sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
                assert not response.get("Failed")
        writer.close()


async def test_a_lossy_server_in_front_of_sqs_is_reported_with_its_exact_loss(
    clients: AwsClients, tmp_path: Path
) -> None:
    queue_url = await create_queue(await clients.sqs())
    lossy = LossyForwarder(clients, queue_url, drop_every=97)
    server = await asyncio.start_server(lossy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        run = ReplayTestConfig(
            events=400,
            nodes=2,
            outage_s=0.2,
            progress_s=0.0,
            settle_timeout_s=2.0,
            target=("127.0.0.1", port),
            sink=f"sqs:{queue_url}",
        )
        report = await run_replay_test(run, progress=io.StringIO())
    finally:
        server.close()
        await server.wait_closed()
    assert lossy.dropped > 0
    assert not report["ok"]
    assert report["lost"] == lossy.dropped
    assert report["delivered"] == 400 - lossy.dropped
    assert report["unexpected"] == 0
