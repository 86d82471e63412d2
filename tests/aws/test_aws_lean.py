"""The lean data-path client (``fpolicyd.sinks.aws.transport``) against moto, next to the SDK client it replaces.

Both clients are handed the same batches; what arrives, how per-entry and whole-call failures are classified
(``classify_sqs`` / ``error_kind``), and the exception types must be the same. The lean client also checks
MD5OfMessageBody (a damaged answer fails that entry, retriably), resolves its endpoint exactly as botocore
does (captured from aiobotocore's own request under each way of configuring it) and maps transport failures
to botocore's connection exceptions.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from fpolicyd.events import FileEvent
from fpolicyd.sinks.aws.classify import ErrorKind, Outcome, error_kind
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import deliver, send_eventbridge_batch, send_sqs_batch
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches
from fpolicyd.sinks.aws.targets import AwsDataPath, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.aws.transport import MD5_MISMATCH, LeanAwsClient
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy
from support.moto_server import MotoEndpoint, bus_with_queue_rule, create_queue, drain_queue, isolate_aws_env
from support.sqs_faults import SqsFaults

FAST = RetryPolicy(base_s=0.01, cap_s=0.05)


def make_items(count: int, tag: str = "lean") -> list[Item]:
    return [
        Item(
            FileEvent(
                event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"fpolicyd-{tag}-{n}")),
                operation_type=("create", "write", "delete", "rename")[n % 4],
                file_path=f"/projects/Ωmega/{n}/\u65e5\u672c.txt",
                previous_path=None,
                volume_name="vol1",
                svm_name=("svm-a", "svm-b")[n % 2],
                timestamp=f"2024-05-01T10:00:{n % 60:02d}.{n:06d}Z",
                file_size=n,
                client_ip="10.0.0.5",
                metadata={"routes": ["UC1", "UC16"] if n % 2 else []},
            ).to_json(),
            ref=n,
        )
        for n in range(count)
    ]


def batches(items: list[Item], target: SqsTarget | EventBridgeTarget) -> list[Batch]:
    plan = plan_batches(items, target)
    assert all(isinstance(b, Batch) for b in plan)
    return [b for b in plan if isinstance(b, Batch)]


@pytest.fixture
def aws_env(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoEndpoint:
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


def ids(received: list[dict[str, Any]], key: str | None = None) -> list[str]:
    bodies = [orjson.loads(m["Body"]) for m in received]
    return sorted((b[key] if key else b)["event_id"] for b in bodies)


def sent_ids(items: list[Item]) -> list[str]:
    return sorted(orjson.loads(i.event_json)["event_id"] for i in items)


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
async def test_lean_sqs_delivers_like_the_sdk(clients: AwsClients, fifo: bool) -> None:
    sqs = await clients.sqs()
    lean = await clients.sqs_data()
    assert isinstance(lean, LeanAwsClient)
    queue_url = await create_queue(sqs, fifo=fifo)
    target = SqsTarget(queue_url)
    items = make_items(25)
    for batch in batches(items, target):
        outcome = await send_sqs_batch(lean, target, batch)
        assert [e.item.ref for e in outcome.succeeded] == [e.item.ref for e in batch.entries]
    received = await drain_queue(sqs, queue_url, 25)
    by_id = {orjson.loads(m["Body"])["event_id"]: m for m in received}
    assert sorted(by_id) == sent_ids(items)
    for item in items:
        message = by_id[orjson.loads(item.event_json)["event_id"]]
        assert message["Body"].encode() == item.event_json  # byte for byte, non-ASCII included
        assert message["MessageAttributes"]["svm"]["StringValue"] in ("svm-a", "svm-b")
        if fifo:
            assert message["Attributes"]["MessageGroupId"] == message["MessageAttributes"]["svm"]["StringValue"]
    assert lean.pool.opened <= 4  # keep-alive: connections are reused, not one per request


async def test_lean_eventbridge_delivers_like_the_sdk(clients: AwsClients) -> None:
    bus, queue_url = await bus_with_queue_rule(clients)
    lean = await clients.events_data()
    assert isinstance(lean, LeanAwsClient)
    target = EventBridgeTarget(bus)
    items = make_items(12)
    for batch in batches(items, target):
        outcome = await send_eventbridge_batch(lean, target, batch)
        assert len(outcome.succeeded) == len(batch)
    received = await drain_queue(await clients.sqs(), queue_url, 12)
    assert ids(received, key="detail") == sent_ids(items)
    envelopes = [orjson.loads(m["Body"]) for m in received]
    # Time went as epoch seconds (as botocore sends it): the envelope's time is the event's timestamp.
    assert {e["time"] for e in envelopes} <= {f"2024-05-01T10:00:{n:02d}Z" for n in range(60)}


async def test_whole_call_errors_classify_like_the_sdk(clients: AwsClients, aws_env: MotoEndpoint) -> None:
    """A missing queue or bus: the same exception class, error code and ErrorKind from both clients."""
    (batch,) = batches(make_items(3), SqsTarget(f"{aws_env.url}/{aws_env.account_id}/no-such-queue"))
    missing_queue = SqsTarget(f"{aws_env.url}/{aws_env.account_id}/no-such-queue")
    caught: list[ClientError] = []
    for client in (await clients.sqs(), await clients.sqs_data()):
        with pytest.raises(ClientError) as info:
            await send_sqs_batch(client, missing_queue, batch)
        caught.append(info.value)
    sdk, lean = caught
    assert type(lean) is type(sdk)
    assert lean.response["Error"] == sdk.response["Error"]
    assert lean.response["ResponseMetadata"]["HTTPStatusCode"] == sdk.response["ResponseMetadata"]["HTTPStatusCode"]
    assert error_kind(lean) is error_kind(sdk) is ErrorKind.SINK
    assert str(lean).split(":")[0] == str(sdk).split(":")[0]

    missing_bus = EventBridgeTarget("no-such-bus")
    (events_batch,) = batches(make_items(2), missing_bus)
    caught = []
    for client in (await clients.events(), await clients.events_data()):
        with pytest.raises(ClientError) as info:
            await send_eventbridge_batch(client, missing_bus, events_batch)
        caught.append(info.value)
    sdk, lean = caught
    assert type(lean) is type(sdk)
    assert lean.response["Error"] == sdk.response["Error"]
    assert error_kind(lean) is error_kind(sdk) is ErrorKind.SINK


async def test_per_entry_and_request_failures_through_a_fault_proxy(
    clients: AwsClients, aws_env: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, dead_letters: DeadLetterWriter
) -> None:
    """Transient and permanent entry failures, a throttled and an HTTP 500 request, and one damaged MD5: only
    failed entries are sent again, the permanent one is dead-lettered, every other event arrives."""
    sqs = await clients.sqs()
    queue_url = await create_queue(sqs)
    items = make_items(30)
    events = [orjson.loads(i.event_json)["event_id"] for i in items]
    transient_once = {events[3], events[14]}
    permanent = events[7]
    damaged_once = {events[21]}

    def entry_rule(body: str) -> str | None:
        event_id = orjson.loads(body)["event_id"]
        if event_id == permanent:
            return "permanent"
        if event_id in transient_once:
            transient_once.discard(event_id)
            return "transient"
        return None

    def md5_rule(body: str) -> bool:
        event_id = orjson.loads(body)["event_id"]
        if event_id in damaged_once:
            damaged_once.discard(event_id)
            return True
        return False

    faults = SqsFaults(aws_env.url, entry_rule=entry_rule, md5_rule=md5_rule, request_failures=["throttle", "500"])
    proxy_url = await faults.start()
    try:
        async with AwsClients(endpoint_url=proxy_url, region_name=aws_env.region) as proxied:
            lean = await proxied.sqs_data()
            assert isinstance(lean, LeanAwsClient)
            target = SqsTarget(queue_url)
            retried: list[str] = []

            async def send(batch: Batch) -> Outcome:
                outcome = await send_sqs_batch(lean, target, batch)
                retried.extend(reason for _, reason in outcome.retry)
                return outcome

            reports = [
                await deliver(b, send, FAST, random.Random(4), dead_letters.for_sink(target.name))
                for b in batches(items, target)
            ]
    finally:
        await faults.stop()
    assert faults.request_failures == []
    assert all(r.settled for r in reports)
    assert [orjson.loads(e.item.event_json)["event_id"] for r in reports for e, _ in r.dead] == [permanent]
    assert any(reason.startswith(MD5_MISMATCH) for reason in retried)
    received = ids(await drain_queue(sqs, queue_url, 30, within=20))
    # The damaged-MD5 message was enqueued and then sent again (at least once); nothing else twice.
    assert sorted(set(received)) == sorted(set(events) - {permanent})
    assert len(received) == 29 + 1


async def test_connection_refused_and_read_timeout_are_botocore_connection_errors(
    aws_env: MotoEndpoint,
) -> None:
    (batch,) = batches(make_items(2), SqsTarget("http://127.0.0.1:1/123456789012/q"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
        port = closed.getsockname()[1]
        async with AwsClients(endpoint_url=f"http://127.0.0.1:{port}", region_name=aws_env.region) as clients:
            lean = await clients.sqs_data()
            with pytest.raises(EndpointConnectionError) as refused:
                await send_sqs_batch(lean, SqsTarget(f"http://127.0.0.1:{port}/1/q"), batch)
    assert error_kind(refused.value) is ErrorKind.RETRY

    handled = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1 << 16):  # read the request, never answer, until the client gives up
                pass
        finally:
            writer.close()
            handled.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AwsClients(
            endpoint_url=f"http://127.0.0.1:{port}", region_name=aws_env.region, read_timeout_s=0.2
        ) as clients:
            lean = await clients.sqs_data()
            started = time.monotonic()
            with pytest.raises(ReadTimeoutError) as timed_out:
                await send_sqs_batch(lean, SqsTarget(f"http://127.0.0.1:{port}/1/q"), batch)
            assert time.monotonic() - started < 3
        await asyncio.wait_for(handled.wait(), 5)  # the client closed the timed-out connection
    finally:
        server.close()
        await server.wait_closed()
    assert error_kind(timed_out.value) is ErrorKind.RETRY


class _CapturedError(Exception):
    """Raised from aiobotocore's before-send hook: the request was built and signed, never sent."""


async def sdk_request(client: Any, call: str, params: dict[str, Any]) -> tuple[str, str]:
    """(URL, Authorization) of the request aiobotocore would send, without sending it."""
    seen: list[tuple[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append((str(request.url), str(request.headers["Authorization"])))
        raise _CapturedError

    client.meta.events.register_first("before-send.*", capture)
    try:
        with pytest.raises(_CapturedError):
            await getattr(client, call)(**params)
    finally:
        client.meta.events.unregister("before-send.*", capture)
    return seen[0]


@pytest.mark.parametrize(
    ("env", "explicit"),
    [
        ({"AWS_REGION": "eu-west-3"}, None),
        ({"AWS_REGION": "us-east-1", "AWS_USE_FIPS_ENDPOINT": "true"}, None),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:4566"}, None),
        (
            {
                "AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
                "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4577",
                "AWS_ENDPOINT_URL_EVENTBRIDGE": "http://localhost:4588/events-prefix",
            },
            None,
        ),
        ({"AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:4577"}, "http://127.0.0.1:9999"),
    ],
    ids=["region", "fips", "endpoint-url", "per-service", "explicit"],
)
async def test_endpoint_resolution_is_botocores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], explicit: str | None
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    async with AwsClients(endpoint_url=explicit) as clients:
        for service, call, params in (
            ("sqs", "send_message_batch", {"QueueUrl": "https://x/1/q", "Entries": [{"Id": "0", "MessageBody": "b"}]}),
            ("events", "put_events", {"Entries": [{"Source": "s", "DetailType": "d", "Detail": "{}"}]}),
        ):
            sdk = await clients.client(service)
            lean = await clients.data_client(service)
            assert isinstance(lean, LeanAwsClient)
            url, authorization = await sdk_request(sdk, call, params)
            assert lean.endpoint_url == url
            scope = authorization.split("Credential=", 1)[1].split(",", 1)[0].split("/")
            assert (scope[3], scope[2]) == lean.signing


async def test_sdk_data_path_hands_out_the_sdk_client(aws_env: MotoEndpoint) -> None:
    async with AwsClients(endpoint_url=aws_env.url, region_name=aws_env.region, data_path=AwsDataPath.SDK) as sdk:
        assert await sdk.sqs_data() is await sdk.sqs()
        assert await sdk.events_data() is await sdk.events()


async def test_a_proxy_falls_back_to_the_sdk(aws_env: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean transport speaks to the endpoint directly; with a proxy configured the SDK client is used."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with AwsClients(endpoint_url="http://sqs.example.invalid", region_name=aws_env.region) as clients:
        assert await clients.sqs_data() is await clients.sqs()
