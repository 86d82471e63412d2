"""SQS and EventBridge delivery against a moto server the tests start themselves (never the real AWS).

What is proved here: bodies arrive byte-for-byte equal to the event JSON with their attributes and FIFO ids;
EventBridge delivers ``detail`` equal to the event through a rule on ``source = fsxn.fpolicy``; health checks
fail clearly for a missing queue or bus; with crafted partial failures only the failed entries are re-sent and
the rejected ones are dead-lettered; an endpoint that refuses connections is classified retriable and nothing
is lost within a bounded deadline.
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.errors import SinkError
from fpolicyd.events import FileEvent
from fpolicyd.sinks.aws.classify import Outcome, classify_eventbridge, classify_exception, classify_sqs
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import (
    DeliveryReport,
    check_eventbridge,
    check_sqs,
    deliver,
    send_eventbridge_batch,
    send_sqs_batch,
)
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches
from fpolicyd.sinks.aws.targets import EventBridgeTarget, SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy
from support.moto_server import (
    MotoEndpoint,
    bus_with_queue_rule,
    create_queue,
    drain_queue,
    isolate_aws_env,
    unique,
)

FAST = RetryPolicy(base_s=0.01, cap_s=0.05)


def make_event(n: int, svm: str = "svm-a") -> FileEvent:
    return FileEvent(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"fpolicyd-aws-test-{n}")),
        operation_type=("create", "write", "delete", "rename")[n % 4],
        file_path=f"/legal/report-{n}-é.pdf",
        previous_path="/legal/old.pdf" if n % 4 == 3 else None,
        volume_name="vol1",
        svm_name=svm,
        timestamp=f"2024-05-01T10:00:{n % 60:02d}.{n:06d}Z",
        file_size=n,
        client_ip="10.0.0.5",
        metadata={"vs_uuid": "a1b2c3d4-0000-1111-2222-333344445555", "routes": ["UC1", "UC16"] if n % 2 else []},
    )


def make_items(count: int, *, svms: tuple[str, ...] = ("svm-a",)) -> list[Item]:
    return [Item(make_event(n, svms[n % len(svms)]).to_json(), ref=n) for n in range(count)]


def batches(items: list[Item], target: SqsTarget | EventBridgeTarget) -> list[Batch]:
    plan = plan_batches(items, target)
    out = [b for b in plan if isinstance(b, Batch)]
    assert len(out) == len(plan)
    return out


@pytest.fixture
def aws_env(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoEndpoint:
    """Dummy credentials and region for this test only, no shared config, no instance metadata."""
    isolate_aws_env(monkeypatch, tmp_path, moto)
    return moto


@pytest.fixture
async def clients(aws_env: MotoEndpoint) -> AsyncIterator[AwsClients]:
    async with AwsClients(endpoint_url=aws_env.url, region_name=aws_env.region, max_pool_connections=4) as made:
        yield made


@pytest.fixture
def dead_letters(tmp_path: Path) -> Iterator[DeadLetterWriter]:
    with DeadLetterWriter(tmp_path / "dead-letter.jsonl") as writer:
        yield writer


async def deliver_all(
    items: list[Item], target: SqsTarget | EventBridgeTarget, send: Any, dead: DeadLetterWriter, **kw: Any
) -> list[DeliveryReport]:
    rng = random.Random(5)
    return [await deliver(b, send, FAST, rng, dead.for_sink(target.name), **kw) for b in batches(items, target)]


# ----------------------------------------------------------------------------------------------- SQS


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
async def test_sqs_delivers_every_event_with_attributes(
    clients: AwsClients, dead_letters: DeadLetterWriter, fifo: bool
) -> None:
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs, fifo=fifo)
    target = SqsTarget(queue_url)
    assert target.fifo is fifo
    info = await check_sqs(sqs, target)
    assert info.fifo is fifo
    assert info.arn.endswith(queue_url.rsplit("/", 1)[1])

    items = make_items(25, svms=("svm-a", "svm-b"))

    async def send(batch: Batch) -> Outcome:
        return await send_sqs_batch(sqs, target, batch)

    reports = await deliver_all(items, target, send, dead_letters)
    assert [len(r.delivered) for r in reports] == [10, 10, 5]
    assert all(r.settled and r.requests == 1 and r.error is None for r in reports)
    assert dead_letters.written == 0

    received = await drain_queue(sqs, queue_url, 25)
    sent = {orjson.loads(i.event_json)["event_id"]: i.event_json for i in items}
    by_id = {orjson.loads(m["Body"])["event_id"]: m for m in received}
    assert len(received) == 25
    assert by_id.keys() == sent.keys()
    for event_id, message in by_id.items():
        body = sent[event_id]
        assert message["Body"].encode() == body
        event = orjson.loads(body)
        attributes = {k: v["StringValue"] for k, v in message["MessageAttributes"].items()}
        expected = {"operation": event["operation_type"], "svm": event["svm_name"]}
        if event["metadata"]["routes"]:
            expected["routes"] = ",".join(event["metadata"]["routes"])
        assert attributes == expected
        if fifo:
            assert message["Attributes"]["MessageGroupId"] == event["svm_name"]
            assert message["Attributes"]["MessageDeduplicationId"] == event_id


async def test_sqs_fifo_keeps_order_within_a_group(clients: AwsClients, dead_letters: DeadLetterWriter) -> None:
    sqs = await clients.sqs()
    target = SqsTarget(await create_queue(sqs, fifo=True))
    items = make_items(12)

    async def send(batch: Batch) -> Outcome:
        return await send_sqs_batch(sqs, target, batch)

    await deliver_all(items, target, send, dead_letters)
    received = await drain_queue(sqs, target.queue_url, 12)
    assert [m["Body"].encode() for m in received] == [i.event_json for i in items]


async def test_sqs_honours_aws_endpoint_url(
    moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No endpoint or region passed: both come from the standard AWS environment."""
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients() as env_clients:
        sqs = await env_clients.sqs()
        queue_url = await create_queue(sqs)
        assert queue_url.startswith(moto.url)
        await check_sqs(sqs, SqsTarget(queue_url))
        events = await env_clients.events()
        bus = unique("bus")
        await events.create_event_bus(Name=bus)
        assert (await check_eventbridge(events, EventBridgeTarget(bus))).endswith(f"event-bus/{bus}")


async def test_sqs_health_check_fails_clearly_for_a_missing_queue(clients: AwsClients, moto: MotoEndpoint) -> None:
    sqs = await clients.sqs()
    target = SqsTarget(f"{moto.url}/{moto.account_id}/no-such-queue")
    with pytest.raises(SinkError, match="queue does not exist") as info:
        await check_sqs(sqs, target)
    assert not info.value.retriable
    assert "no-such-queue" in str(info.value)


async def test_sqs_whole_request_refused_dead_letters_only_the_culprit(
    clients: AwsClients, dead_letters: DeadLetterWriter
) -> None:
    """A queue whose MaximumMessageSize is 1 KiB refuses the whole batch (moto: InvalidParameterValue) when one
    message is bigger: the batch is split, the big one is dead-lettered, the rest arrive."""
    sqs = await clients.sqs()
    target = SqsTarget(await create_queue(sqs, MaximumMessageSize="1024"))
    info = await check_sqs(sqs, target)
    assert info.max_message_bytes == 1024
    items = make_items(4)
    big = Item(
        FileEvent.from_json(items[2].event_json).with_routes(["UC" + "9" * 1200]).to_json(), ref="big"
    )  # body over 1 KiB
    items[2] = big

    async def send(batch: Batch) -> Outcome:
        return await send_sqs_batch(sqs, target, batch)

    (report,) = await deliver_all(items, target, send, dead_letters)
    assert [e.item.ref for e in report.delivered] == [0, 1, 3]
    assert [(e.item.ref, reason.split(":")[0]) for e, reason in report.dead] == [("big", "InvalidParameterValue")]
    assert report.requests == 5
    assert dead_letters.written == 1
    received = await drain_queue(sqs, target.queue_url, 3)
    assert sorted(m["Body"].encode() for m in received) == sorted(items[i].event_json for i in (0, 1, 3))


async def test_sqs_partial_failure_retries_only_failed_entries(
    clients: AwsClients, dead_letters: DeadLetterWriter
) -> None:
    """First request: the real queue takes all but entries 1, 3 (SenderFault=false) and 5 (SenderFault=true),
    which are reported in a crafted ``Failed[]``; later requests go to the queue untouched."""
    sqs = await clients.sqs()
    target = SqsTarget(await create_queue(sqs))
    items = make_items(10)
    requests: list[list[str]] = []
    crafted = {
        "1": {"SenderFault": False, "Code": "InternalError", "Message": "try again"},
        "3": {"SenderFault": False, "Code": "ServiceUnavailable", "Message": "busy"},
        "5": {"SenderFault": True, "Code": "InvalidMessageContents", "Message": "bad characters"},
    }

    async def send(batch: Batch) -> Outcome:
        requests.append([e.request["Id"] for e in batch.entries])
        if len(requests) > 1:
            return await send_sqs_batch(sqs, target, batch)
        passing = [e.request for e in batch.entries if e.request["Id"] not in crafted]
        response = await sqs.send_message_batch(QueueUrl=target.queue_url, Entries=passing)
        response["Failed"] = [{"Id": i, **f} for i, f in crafted.items()]
        return classify_sqs(response, batch)

    (report,) = await deliver_all(items, target, send, dead_letters)
    assert requests == [[str(i) for i in range(10)], ["1", "3"]]
    assert sorted(e.item.ref for e in report.delivered) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # type: ignore[type-var]
    assert [(e.item.ref, r) for e, r in report.dead] == [(5, "InvalidMessageContents: bad characters")]
    assert report.settled
    assert report.retried_entries == 2
    dead_letters.close()
    (line,) = dead_letters.path.read_bytes().splitlines()
    record = orjson.loads(line)
    assert record["sink"] == target.name
    assert record["reason"] == "InvalidMessageContents: bad characters"
    assert record["event"] == orjson.loads(items[5].event_json)

    received = await drain_queue(sqs, target.queue_url, 9)
    bodies = sorted(m["Body"].encode() for m in received)
    assert bodies == sorted(items[i].event_json for i in range(10) if i != 5)  # each exactly once


async def test_refused_connections_are_retriable_and_nothing_is_lost(
    clients: AwsClients, aws_env: MotoEndpoint, dead_letters: DeadLetterWriter
) -> None:
    """An endpoint that refuses connections: every attempt fails retriably until the deadline, all entries
    come back pending; delivered later to a working endpoint, every one arrives."""
    sqs = await clients.sqs()
    target = SqsTarget(await create_queue(sqs))
    items = make_items(7)
    (batch,) = batches(items, target)
    errors: list[BaseException] = []

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
        port = closed.getsockname()[1]
        async with AwsClients(
            endpoint_url=f"http://127.0.0.1:{port}", region_name=aws_env.region, connect_timeout_s=1.0
        ) as dead_end:
            refusing = await dead_end.sqs()

            async def send_refused(b: Batch) -> Outcome:
                try:
                    return await send_sqs_batch(refusing, target, b)
                except Exception as exc:
                    errors.append(exc)
                    raise

            started = time.monotonic()
            report = await deliver(
                batch, send_refused, FAST, random.Random(1), dead_letters.for_sink(target.name), deadline=started + 0.5
            )
            assert time.monotonic() - started < 3.0

    assert report.delivered == ()
    assert report.dead == ()
    assert [e.item.ref for e in report.pending] == list(range(7))
    assert report.error is not None
    assert report.error.retriable
    assert report.requests >= 2
    assert errors
    assert all(classify_exception(e) for e in errors)
    assert type(errors[0]).__name__ == "EndpointConnectionError"

    async def send(b: Batch) -> Outcome:
        return await send_sqs_batch(sqs, target, b)

    later = await deliver(Batch(report.pending), send, FAST, random.Random(2), dead_letters.for_sink(target.name))
    assert later.settled
    received = await drain_queue(sqs, target.queue_url, 7)
    assert sorted(m["Body"].encode() for m in received) == sorted(i.event_json for i in items)
    assert dead_letters.written == 0


# ------------------------------------------------------------------------------------------- EventBridge


async def test_eventbridge_delivers_detail_through_a_rule(clients: AwsClients, dead_letters: DeadLetterWriter) -> None:
    bus, queue_url = await bus_with_queue_rule(clients)
    events = await clients.events()
    target = EventBridgeTarget(bus)
    assert (await check_eventbridge(events, target)).endswith(f"event-bus/{bus}")
    items = make_items(25)

    async def send(batch: Batch) -> Outcome:
        return await send_eventbridge_batch(events, target, batch)

    reports = await deliver_all(items, target, send, dead_letters)
    assert [len(r.delivered) for r in reports] == [10, 10, 5]
    assert all(r.settled for r in reports)

    received = await drain_queue(await clients.sqs(), queue_url, 25)
    assert len(received) == 25
    envelopes = [orjson.loads(m["Body"]) for m in received]
    assert {e["source"] for e in envelopes} == {"fsxn.fpolicy"}
    assert {e["detail-type"] for e in envelopes} == {"FPolicy File Operation"}
    assert sorted((e["detail"] for e in envelopes), key=lambda d: d["event_id"]) == sorted(
        (orjson.loads(i.event_json) for i in items), key=lambda d: d["event_id"]
    )


async def test_eventbridge_rule_on_source_ignores_other_sources(
    clients: AwsClients, dead_letters: DeadLetterWriter
) -> None:
    bus, queue_url = await bus_with_queue_rule(clients)
    events = await clients.events()
    target = EventBridgeTarget(bus, source="someone.else")

    async def send(batch: Batch) -> Outcome:
        return await send_eventbridge_batch(events, target, batch)

    (report,) = await deliver_all(make_items(3), target, send, dead_letters)
    assert report.settled  # accepted by the bus...
    assert await drain_queue(await clients.sqs(), queue_url, 1) == []  # ...but no rule matched


async def test_eventbridge_health_check_fails_clearly_for_a_missing_bus(clients: AwsClients) -> None:
    events = await clients.events()
    with pytest.raises(SinkError, match="event bus does not exist") as info:
        await check_eventbridge(events, EventBridgeTarget("no-such-bus"))
    assert not info.value.retriable


async def test_eventbridge_partial_failure_retries_only_failed_entries(
    clients: AwsClients, dead_letters: DeadLetterWriter
) -> None:
    """First request: entries 2 (ThrottlingException) and 4 (InternalFailure) are reported failed without being
    sent, 6 is refused as MalformedDetail; the rest really go to the bus. Only 2 and 4 are sent again."""
    bus, queue_url = await bus_with_queue_rule(clients)
    events = await clients.events()
    target = EventBridgeTarget(bus)
    items = make_items(8)
    crafted = {
        2: {"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"},
        4: {"ErrorCode": "InternalFailure", "ErrorMessage": "oops"},
        6: {"ErrorCode": "MalformedDetail", "ErrorMessage": "Detail is malformed."},
    }
    requests: list[list[object]] = []

    async def send(batch: Batch) -> Outcome:
        requests.append([e.item.ref for e in batch.entries])
        if len(requests) > 1:
            return await send_eventbridge_batch(events, target, batch)
        passing = [e.request for i, e in enumerate(batch.entries) if i not in crafted]
        real = iter((await events.put_events(Entries=passing))["Entries"])
        answer = [crafted[i] if i in crafted else next(real) for i in range(len(batch.entries))]
        return classify_eventbridge({"Entries": answer}, batch)

    (report,) = await deliver_all(items, target, send, dead_letters)
    assert requests == [list(range(8)), [2, 4]]
    assert sorted(e.item.ref for e in report.delivered) == [0, 1, 2, 3, 4, 5, 7]  # type: ignore[type-var]
    assert [(e.item.ref, r) for e, r in report.dead] == [(6, "MalformedDetail: Detail is malformed.")]
    assert dead_letters.written == 1

    received = await drain_queue(await clients.sqs(), queue_url, 7)
    details = sorted(orjson.dumps(orjson.loads(m["Body"])["detail"]) for m in received)
    assert details == sorted(orjson.dumps(orjson.loads(items[i].event_json)) for i in (0, 1, 2, 3, 4, 5, 7))


async def test_eventbridge_missing_bus_keeps_events_pending(
    clients: AwsClients, dead_letters: DeadLetterWriter
) -> None:
    """PutEvents to a bus that does not exist: a sink problem, not the events' fault. Nothing is dead-lettered;
    everything comes back pending with a non-retriable error."""
    events = await clients.events()
    target = EventBridgeTarget("no-such-bus")

    async def send(batch: Batch) -> Outcome:
        return await send_eventbridge_batch(events, target, batch)

    (report,) = await deliver_all(make_items(3), target, send, dead_letters)
    assert [e.item.ref for e in report.pending] == [0, 1, 2]
    assert report.error is not None
    assert not report.error.retriable
    assert dead_letters.written == 0
