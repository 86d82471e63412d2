"""Exactly-once at the sink across instances (issue 12): three ``fpolicyd serve`` as ONTAP's primary servers in the
synchronous engine mode, one SQS queue as their sink (moto), and a storm from ``fpolicyd simulate`` in which every
tenth notification is sent a second time with a new ReqId (as ONTAP does after a timeout; the copy goes to the
next server in the rotation, another daemon). One daemon is SIGKILLed mid-storm: the simulator sends what it left
unanswered to the others; restarted on its data directory, it delivers what it had answered but not sent yet.

With the DynamoDB dedup backend (one claim table shared by the three) every generated event_id reaches the queue,
and never from two daemons: exactly once across instances. What can still arrive twice is a sink batch of the
killed daemon that went out before the SIGKILL and, its ack not yet on disk, again after the restart: the same
record (same session, byte for byte). Dedup cannot hold that back (the claim is the record's own, so that
re-processing after a crash is never taken for a duplicate) and a standard queue has no deduplication: at the sink
a crash is at least once; those re-sends are counted and reported. With the embedded backend each daemon only
knows its own events: every event_id arrives at least once, and the copies that reached another daemon arrive
again (the count is reported, not asserted: at least once is all that backend promises across instances).

The SQS sink packs (gzip, ~100 events a message; the README's Lambda consumer unpacks them): one-event messages
took moto half a minute to hand back for a thousand events on a loaded two-core machine."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.simulator.peer import handshake
from fpolicyd.sinks.aws.clients import AwsClients
from support.moto_server import MotoEndpoint, create_dedup_table, create_queue, drain_queue, isolate_aws_env
from support.readme_lambda import load_lambda_consumer, record_of_received
from support.serve import Served, expected_event_ids, start_serve, stop

pytestmark = pytest.mark.slow

DAEMONS = 3
#: Every tenth notification of a node is sent twice.
DUPLICATE_EVERY = 10


@pytest.fixture
async def clients(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsClients]:
    # The daemon subprocesses inherit this environment: dummy credentials and AWS_ENDPOINT_URL = moto.
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as made:
        yield made


def stopped_line(daemon: Served) -> dict[str, Any]:
    return next(line for line in daemon.log_lines if line.get("event") == "stopped")


@dataclass(frozen=True)
class Outcome:
    """What the queue received in one run of the scenario, and what was generated."""

    #: Every event the queue carried, in the order received (a repeated one as often as it came).
    received: list[dict[str, Any]]
    #: The event_id of every notification generated (the injected copies and re-sends have their original's).
    expected: set[str]
    #: The SessionIds of the killed daemon's sessions (one per node) and of every session.
    killed_sessions: set[str]
    sessions: set[str]

    def arrivals(self) -> dict[str, list[dict[str, Any]]]:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for event in self.received:
            by_id.setdefault(event["event_id"], []).append(event)
        return by_id

    def cross_instance_duplicates(self) -> int:
        """Arrivals of an event_id beyond the first from a daemon other than its first one: what a dedup shared
        by the instances would have held back (a session is one node's with one daemon)."""
        return sum(len({e["metadata"]["session_id"] for e in events}) - 1 for events in self.arrivals().values())

    def resends_of_the_same_record(self) -> int:
        """Arrivals of an event_id again from the same session: a sink batch sent again."""
        return len(self.received) - len(self.arrivals()) - self.cross_instance_duplicates()


async def storm_with_a_kill(tmp_path: Path, clients: AwsClients, dedup: list[str], *, seed: int) -> Outcome:
    """Run the scenario; return what the queue received."""
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    # Packed messages (see the module's docstring).
    flags = [
        "--engine-mode", "sync", "--sinks", f"sqs:{queue_url}", "--sqs-pack-bytes", "16384", "--sink-linger-s", "0.2",
        "--dedup-mode", "exact", *dedup,
    ]  # fmt: skip
    dirs = [tmp_path / f"daemon{i}" for i in range(DAEMONS)]
    for path in dirs:
        path.mkdir()
    started = await asyncio.gather(*(start_serve(path, *flags) for path in dirs), return_exceptions=True)
    daemons = [item[0] for item in started if not isinstance(item, BaseException)]
    logs = [item[1] for item in started if not isinstance(item, BaseException)]
    try:
        for item in started:
            if isinstance(item, BaseException):
                raise item
        config = SimulatorConfig(
            targets=tuple(f"127.0.0.1:{d.port}" for d in daemons),
            nodes=DAEMONS,
            events=300,
            duplicate_every=DUPLICATE_EVERY,
            seed=seed,
            sync=True,
            max_outstanding=32,
            rate=400.0,  # ~0.8 s per node: the kill lands mid-storm
            keep_alive_interval_s=0,
            duration_limit_s=30.0,
        )
        simulation = asyncio.create_task(run(config))
        await asyncio.sleep(0.35)
        assert not simulation.done()
        killed = daemons[1]
        # Frozen first, so that it surely holds unanswered requests when it dies (the simulator's window fills
        # with what it sends there meanwhile), then killed.
        killed.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.1)
        killed.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(killed.process.wait(), 10)
        report = await asyncio.wait_for(simulation, 40)
        # Restarted on its data directory: what it answered before the kill but had not sent goes out now.
        again, again_log = await start_serve(dirs[1], *flags)
        daemons.append(again)
        logs.append(again_log)
        survivors = (daemons[0], daemons[2], again)
        assert await asyncio.gather(*(stop(daemon) for daemon in survivors)) == [0] * DAEMONS
        assert [stopped_line(daemon)["undelivered"] for daemon in survivors] == [0] * DAEMONS
    finally:
        for daemon in daemons:
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()
        await asyncio.wait_for(asyncio.gather(*logs, return_exceptions=True), 10)
    assert report.completed
    copies = DAEMONS * (300 // DUPLICATE_EVERY)
    assert report.sent == report.responses == DAEMONS * 300 + copies
    assert report.targets[1].resent_after_failover > 0  # the kill left requests unanswered: sent elsewhere
    # Every daemon has stopped and delivered everything: the queue holds all there will ever be.
    attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    count = int(attributes["Attributes"]["ApproximateNumberOfMessages"])
    messages = await drain_queue(sqs, queue_url, count, within=30)
    assert len(messages) == count
    assert not (await sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)).get("Messages")
    # Unpacked by the README's Lambda consumer, an SQS trigger's batch (at most 10 messages) at a time.
    handled: list[dict[str, Any]] = []
    handler = load_lambda_consumer(handled.append)
    arn = f"arn:aws:sqs:us-east-1:123456789012:{queue_url.rsplit('/', 1)[1]}"
    for first in range(0, len(messages), 10):
        records = [record_of_received(m, queue_arn=arn) for m in messages[first : first + 10]]
        assert handler({"Records": records}, None) == {"batchItemFailures": []}
    sessions = {
        target: {
            handshake(
                seed=seed, node=node, policy_name=config.policy_name, vs_uuid=config.vs_uuid, target=target
            ).session_id
            for node in range(DAEMONS)
        }
        for target in range(DAEMONS)
    }
    outcome = Outcome(handled, expected_event_ids(config), sessions[1], set().union(*sessions.values()))
    assert {event["metadata"]["session_id"] for event in handled} <= outcome.sessions
    return outcome


async def test_dynamodb_dedup_every_event_reaches_the_queue_once_per_instance(
    tmp_path: Path, clients: AwsClients, record_property: Callable[[str, object], None]
) -> None:
    started = time.monotonic()
    table = await create_dedup_table(await clients.client("dynamodb"))
    outcome = await storm_with_a_kill(
        tmp_path, clients, ["--dedup-backend", "dynamodb", "--dedup-dynamodb-table", table], seed=31
    )
    record_property("elapsed_s", round(time.monotonic() - started, 2))
    assert len(outcome.expected) == DAEMONS * 300
    arrivals = outcome.arrivals()
    missing = outcome.expected - set(arrivals)
    assert not missing, f"{len(missing)} of {len(outcome.expected)} events never arrived"
    assert set(arrivals) == outcome.expected
    # Exactly once across instances: no event_id from two daemons, though every tenth notification and every
    # request the killed daemon left unanswered reached two of them.
    assert outcome.cross_instance_duplicates() == 0
    # What does arrive twice is a sink batch of the killed daemon that went out before the SIGKILL and, its ack not
    # on disk yet, again after the restart: the same record, byte for byte (at least once at the sink; a FIFO
    # queue's MessageDeduplicationId = event_id is what drops those).
    again = {event_id: events for event_id, events in arrivals.items() if len(events) > 1}
    for events in again.values():
        assert all(event == events[0] for event in events)
        assert events[0]["metadata"]["session_id"] in outcome.killed_sessions
    resent = outcome.resends_of_the_same_record()
    record_property("resent_by_the_killed_daemon", resent)
    print(f"dynamodb dedup across {DAEMONS} instances: {len(outcome.received)} events received, 0 duplicates across "
          f"instances, {resent} re-sent by the killed daemon after its restart")  # fmt: skip


async def test_embedded_dedup_every_event_reaches_the_queue_at_least_once(
    tmp_path: Path, clients: AwsClients, record_property: Callable[[str, object], None]
) -> None:
    started = time.monotonic()
    outcome = await storm_with_a_kill(tmp_path, clients, ["--dedup-backend", "embedded"], seed=32)
    record_property("elapsed_s", round(time.monotonic() - started, 2))
    arrivals = outcome.arrivals()
    missing = outcome.expected - set(arrivals)
    assert not missing, f"{len(missing)} of {len(outcome.expected)} events never arrived"
    assert set(arrivals) == outcome.expected
    duplicates = len(outcome.received) - len(arrivals)
    across, resent = outcome.cross_instance_duplicates(), outcome.resends_of_the_same_record()
    assert duplicates == across + resent >= 0  # at least once: how many is not guaranteed
    record_property("duplicates", duplicates)
    print(f"embedded dedup across {DAEMONS} instances: {len(outcome.received)} events received, {duplicates} "
          f"duplicates ({across} across instances, {resent} re-sent by the killed daemon)")  # fmt: skip
