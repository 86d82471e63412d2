"""benchmarks/aws_endpoint.py, the local SQS/EventBridge endpoint of the throughput benchmarks, driven by the
project's real aiobotocore path (``AwsClients``, ``check_sqs``, ``send_sqs_batch``, ``check_eventbridge``,
``send_eventbridge_batch``) and by the lean client: botocore accepts its answers, it counts and records every
acknowledged entry, its errors and injected faults classify as the real services' do.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import trustme
from botocore.exceptions import ClientError, SSLError

from aws_endpoint import AwsEndpoint, Faults, endpoint_process, self_issued_certificate
from fpolicyd.app import Daemon
from fpolicyd.errors import SinkError
from fpolicyd.events import FileEvent
from fpolicyd.pipeline.records import Record
from fpolicyd.simulator.client import SimulatorConfig
from fpolicyd.simulator.client import run as run_simulation
from fpolicyd.sinks.aws import sender as sender_module
from fpolicyd.sinks.aws.classify import ErrorKind, Outcome, error_kind
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import check_eventbridge, check_sqs, deliver, send_eventbridge_batch, send_sqs_batch
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches
from fpolicyd.sinks.aws.sender import AwsSender
from fpolicyd.sinks.aws.targets import AwsDataPath, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.aws.transport import LeanAwsClient
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy
from support.daemon import make_settings
from support.moto_server import isolate_aws_env

FAST = RetryPolicy(base_s=0.001, cap_s=0.005)


def make_items(count: int, *, svms: tuple[str, ...] = ("svm-a",)) -> list[Item]:
    return [
        Item(
            FileEvent(
                event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"fpolicyd-endpoint-test-{n}")),
                operation_type=("create", "write", "delete", "rename")[n % 4],
                file_path=f"/legal/report-{n}-é.pdf",
                previous_path=None,
                volume_name="vol1",
                svm_name=svms[n % len(svms)],
                timestamp=f"2024-05-01T10:00:{n % 60:02d}.{n:06d}Z",
                file_size=n,
                client_ip="10.0.0.5",
                metadata={"routes": ["UC1"] if n % 2 else []},
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
async def endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsEndpoint]:
    isolate_aws_env(monkeypatch, tmp_path)
    async with AwsEndpoint(queues=("q", "q.fifo"), buses=("bus",), record=tmp_path / "record.jsonl") as made:
        yield made


def event_ids(lines: list[bytes]) -> list[str]:
    return [orjson.loads(line)["event_id"] for line in lines]


@pytest.mark.parametrize("data_path", list(AwsDataPath))
async def test_botocore_accepts_every_answer(endpoint: AwsEndpoint, tmp_path: Path, data_path: AwsDataPath) -> None:
    async with AwsClients(endpoint_url=endpoint.url, region_name="us-east-1", data_path=data_path) as clients:
        sqs, events = await clients.sqs(), await clients.events()
        sqs_data, events_data = await clients.sqs_data(), await clients.events_data()
        assert isinstance(sqs_data, LeanAwsClient) is (data_path is AwsDataPath.LEAN)
        items = make_items(25, svms=("svm-a", "svm-b"))
        for name, fifo in (("q", False), ("q.fifo", True)):
            target = SqsTarget(endpoint.queue_url(name))
            info = await check_sqs(sqs, target)
            assert info.fifo is fifo
            assert info.arn == f"arn:aws:sqs:us-east-1:123456789012:{name}"
            assert info.max_message_bytes == 1024 * 1024
            for batch in batches(items, target):
                outcome = await send_sqs_batch(sqs_data, target, batch)
                assert len(outcome.succeeded) == len(batch)
                assert outcome.retry == outcome.dead == outcome.blocked == ()
        bus = EventBridgeTarget("bus")
        assert await check_eventbridge(events, bus) == "arn:aws:events:us-east-1:123456789012:event-bus/bus"
        for batch in batches(items, bus):
            outcome = await send_eventbridge_batch(events_data, bus, batch)
            assert len(outcome.succeeded) == len(batch)
        # The raw SDK answer has what botocore models: MessageId, MD5OfMessageBody (the body's), SequenceNumber.
        (first, *_) = batches(items[:2], SqsTarget(endpoint.queue_url("q.fifo")))
        raw = await sqs.send_message_batch(
            QueueUrl=endpoint.queue_url("q.fifo"), Entries=[e.request for e in first.entries]
        )
        for ok, entry in zip(raw["Successful"], first.entries, strict=True):
            body = entry.request["MessageBody"].encode()
            assert ok["MD5OfMessageBody"] == hashlib.md5(body, usedforsecurity=False).hexdigest()
            assert ok["MessageId"]
            assert ok["SequenceNumber"].isdigit()
    assert endpoint.stats.messages == {"q": 25, "q.fifo": 27}
    assert endpoint.stats.events == {"bus": 25}
    await endpoint.close()
    lines = (tmp_path / "record.jsonl").read_bytes().splitlines()
    sent = event_ids([i.event_json for i in items])
    assert sorted(event_ids(lines)) == sorted(sent * 3 + sent[:2])


async def test_errors_are_aws_errors(endpoint: AwsEndpoint) -> None:
    async with AwsClients(endpoint_url=endpoint.url, region_name="us-east-1") as clients:
        sqs, events = await clients.sqs(), await clients.events()
        with pytest.raises(SinkError, match="queue does not exist") as missing:
            await check_sqs(sqs, SqsTarget(endpoint.queue_url("nope")))
        assert not missing.value.retriable
        with pytest.raises(SinkError, match="event bus does not exist"):
            await check_eventbridge(events, EventBridgeTarget("nope"))
        with pytest.raises(ClientError) as unknown:
            await sqs.list_queues()
        assert unknown.value.response["Error"]["Code"] == "UnknownOperationException"
        assert error_kind(unknown.value) is ErrorKind.REQUEST
        (batch,) = batches(make_items(3), SqsTarget(endpoint.queue_url("nope")))
        for client in (sqs, await clients.sqs_data()):
            with pytest.raises(ClientError) as sent:
                await send_sqs_batch(client, SqsTarget(endpoint.queue_url("nope")), batch)
            assert type(sent.value).__name__ == "QueueDoesNotExist"
            assert sent.value.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
            assert error_kind(sent.value) is ErrorKind.SINK
        too_many = [{"Id": str(i), "MessageBody": "x"} for i in range(11)]
        with pytest.raises(ClientError) as refused:
            await sqs.send_message_batch(QueueUrl=endpoint.queue_url("q"), Entries=too_many)
        assert refused.value.response["Error"]["Code"] == "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
        assert error_kind(refused.value) is ErrorKind.REQUEST


@pytest.mark.parametrize("data_path", list(AwsDataPath))
async def test_injected_faults_are_retried_and_nothing_is_lost(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_path: AwsDataPath
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    faults = Faults(request_every=3, entry_every=7, md5_every=5 if data_path is AwsDataPath.LEAN else 0)
    items = make_items(40)
    async with (
        AwsEndpoint(queues=("q",), faults=faults, record=tmp_path / "record.jsonl") as endpoint,
        AwsClients(endpoint_url=endpoint.url, region_name="us-east-1", data_path=data_path) as clients,
    ):
        target = SqsTarget(endpoint.queue_url("q"))
        data = await clients.sqs_data()

        async def send(batch: Batch) -> Outcome:
            return await send_sqs_batch(data, target, batch)

        with DeadLetterWriter(tmp_path / "dead.jsonl") as dead:
            reports = [
                await deliver(b, send, FAST, random.Random(3), dead.for_sink(target.name))
                for b in batches(items, target)
            ]
        assert all(r.settled for r in reports)
        assert sum(len(r.delivered) for r in reports) == 40
        assert sum(r.retried_entries for r in reports) > 0
        assert endpoint.stats.errors["ThrottlingException"] > 0
        assert endpoint.stats.failed_entries > 0
        assert (endpoint.stats.bad_md5 > 0) is (data_path is AwsDataPath.LEAN)
    # At least once: every event recorded; an entry whose MD5 came back wrong was enqueued and is sent again.
    recorded = event_ids((tmp_path / "record.jsonl").read_bytes().splitlines())
    assert set(recorded) == set(event_ids([i.event_json for i in items]))
    assert len(recorded) == 40 + endpoint.stats.bad_md5


async def test_http_500_fault_is_retriable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    async with (
        AwsEndpoint(buses=("bus",), faults=Faults(request_every=1, request_error="500")) as endpoint,
        AwsClients(endpoint_url=endpoint.url, region_name="us-east-1") as clients,
    ):
        (batch,) = batches(make_items(2), EventBridgeTarget("bus"))
        with pytest.raises(ClientError) as failed:
            await send_eventbridge_batch(await clients.events_data(), EventBridgeTarget("bus"), batch)
        assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
        assert error_kind(failed.value) is ErrorKind.RETRY


async def test_endpoint_as_a_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``python benchmarks/aws_endpoint.py`` prints its URL, serves, flushes the record on /_stats, stops on
    SIGTERM."""
    isolate_aws_env(monkeypatch, tmp_path)
    record = tmp_path / "record.jsonl"
    with endpoint_process(queues=("q",), buses=("bus",), record=record) as endpoint:
        assert endpoint.url.startswith("http://127.0.0.1:")
        async with AwsClients(endpoint_url=endpoint.url, region_name=endpoint.region) as clients:
            target = SqsTarget(endpoint.queues["q"])
            await check_sqs(await clients.sqs(), target)
            for batch in batches(make_items(12), target):
                await send_sqs_batch(await clients.sqs_data(), target, batch)
        stats = endpoint.stats()
        assert stats["messages"] == {"q": 12}
        assert len(record.read_bytes().splitlines()) == 12


async def test_endpoint_process_over_https(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--tls-cert``/``--tls-key`` (what ``bench_delivery.py --tls`` runs): the process serves HTTPS only, the
    lean client trusts it through ``AWS_CA_BUNDLE`` and delivers, and a client that does not trust it is refused."""
    isolate_aws_env(monkeypatch, tmp_path)
    chain, key, bundle = self_issued_certificate(tmp_path)
    with endpoint_process(queues=("q",), buses=("bus",), tls=(chain, key)) as endpoint:
        assert endpoint.url.startswith("https://127.0.0.1:")
        target = SqsTarget(endpoint.queues["q"])
        (batch,) = batches(make_items(3), target)
        async with AwsClients(endpoint_url=endpoint.url, region_name=endpoint.region) as untrusted:
            with pytest.raises(SSLError):
                await send_sqs_batch(await untrusted.sqs_data(), target, batch)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
        async with AwsClients(endpoint_url=endpoint.url, region_name=endpoint.region) as clients:
            lean = await clients.sqs_data()
            assert isinstance(lean, LeanAwsClient)
            for batch in batches(make_items(12), target):
                assert len((await send_sqs_batch(lean, target, batch)).succeeded) == len(batch)
        assert endpoint.stats()["messages"] == {"q": 12}


async def test_sender_sends_after_a_retriable_health_check_failure(
    endpoint: AwsEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon keeps a sink whose health check failed retriably (endpoint down at start) and sends to it
    later: the sender must have its data-path client even then."""

    async def unreachable(client: object, target: SqsTarget) -> None:
        raise SinkError("GetQueueAttributes failed: endpoint unreachable (injected)", retriable=True)

    monkeypatch.setattr(sender_module, "check_sqs", unreachable)
    async with (
        AwsClients(endpoint_url=endpoint.url, region_name="us-east-1") as clients,
    ):
        with DeadLetterWriter(tmp_path / "dead.jsonl") as dead:
            sender = AwsSender(
                SqsTarget(endpoint.queue_url("q")), clients, dead, max_in_flight=1, retry=FAST, linger_s=0.0
            )
            with pytest.raises(SinkError) as failed:
                await sender.start()
            assert failed.value.retriable
            records = [Record(n, item.event_json) for n, item in enumerate(make_items(12))]
            assert await sender.send(records) == []
    assert endpoint.stats.messages == {"q": 12}


async def test_tls_endpoint_with_the_session_ca_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HTTPS, as with real AWS: the lean client verifies the server with the SDK's own TLS settings
    (``AWS_CA_BUNDLE`` here), over the same keep-alive pool, and refuses a server it cannot verify."""
    isolate_aws_env(monkeypatch, tmp_path)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    async with AwsEndpoint(queues=("q",), buses=("bus",), ssl_context=server_context) as endpoint:
        assert endpoint.url.startswith("https://127.0.0.1:")
        async with AwsClients(endpoint_url=endpoint.url, region_name="us-east-1") as untrusted:
            lean = await untrusted.sqs_data()
            (batch,) = batches(make_items(3), SqsTarget(endpoint.queue_url("q")))
            with pytest.raises(SSLError) as refused:
                await send_sqs_batch(lean, SqsTarget(endpoint.queue_url("q")), batch)
            assert error_kind(refused.value) is ErrorKind.RETRY
        monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
        async with AwsClients(endpoint_url=endpoint.url, region_name="us-east-1") as clients:
            target = SqsTarget(endpoint.queue_url("q"))
            await check_sqs(await clients.sqs(), target)
            lean = await clients.sqs_data()
            assert isinstance(lean, LeanAwsClient)
            for batch in batches(make_items(30), target):
                assert len((await send_sqs_batch(lean, target, batch)).succeeded) == len(batch)
            bus = EventBridgeTarget("bus")
            for batch in batches(make_items(10), bus):
                outcome = await send_eventbridge_batch(await clients.events_data(), bus, batch)
                assert len(outcome.succeeded) == len(batch)
            assert lean.pool.opened == 1
        assert endpoint.stats.messages == {"q": 30}
        assert endpoint.stats.events == {"bus": 10}


async def test_lean_pool_is_bounded_and_keeps_connections_alive(endpoint: AwsEndpoint) -> None:
    async with AwsClients(endpoint_url=endpoint.url, region_name="us-east-1", max_pool_connections=2) as clients:
        lean = await clients.sqs_data()
        assert isinstance(lean, LeanAwsClient)
        target = SqsTarget(endpoint.queue_url("q"))
        planned = batches(make_items(80), target)
        outcomes = await asyncio.gather(*(send_sqs_batch(lean, target, b) for b in planned))
        assert [len(o.succeeded) for o in outcomes] == [len(b) for b in planned]
        assert lean.pool.opened == 2  # 8 requests at once, never more than 2 connections, each reused
        assert endpoint.stats.connections == 2
        # Closing while a request is in flight: it completes or fails, and no connection is left open.
        in_flight = asyncio.ensure_future(send_sqs_batch(lean, target, planned[0]))
        await asyncio.sleep(0)
        await lean.close()
        await asyncio.gather(in_flight, return_exceptions=True)
    assert endpoint.stats.messages["q"] >= 80


async def test_counts_packed_events_billed_chunks_and_records_arrival_times(tmp_path: Path) -> None:
    """What the throughput benchmark reads: events carried (a packed message counts its ``fpolicyd-count``), the
    64 KiB chunks SQS bills per SendMessageBatch (bodies plus attribute names, types and values), and with
    ``record_times`` each recorded entry's arrival (``time.monotonic_ns()``) before its body."""
    record = tmp_path / "record"
    single = '{"event_id":"e-1"}'
    packed = "x" * (64 * 1024)  # alone a full chunk: with its attributes, the batch needs a second one
    count = {"DataType": "Number", "StringValue": "7"}
    async with AwsEndpoint(queues=("q",), record=record, record_times=True) as endpoint:
        body = orjson.dumps(
            {
                "QueueUrl": endpoint.queue_url("q"),
                "Entries": [
                    {"Id": "a", "MessageBody": single},
                    {"Id": "b", "MessageBody": packed, "MessageAttributes": {"fpolicyd-count": count}},
                ],
            }
        )
        before = time.monotonic_ns()
        status, _, _ = endpoint.handle(b"POST", b"/", "AmazonSQS.SendMessageBatch", body)
        after = time.monotonic_ns()
        small = orjson.dumps({"QueueUrl": endpoint.queue_url("q"), "Entries": [{"Id": "c", "MessageBody": single}]})
        assert endpoint.handle(b"POST", b"/", "AmazonSQS.SendMessageBatch", small)[0] == 200
    assert status == 200
    assert endpoint.stats.messages == {"q": 3}
    assert endpoint.stats.sqs_events == {"q": 1 + 7 + 1}
    assert endpoint.stats.sqs_billed == {"q": 2 + 1}  # a request under 64 KiB is still one billed request
    lines = record.read_bytes().splitlines()
    stamps = [int(line.split(b" ", 1)[0]) for line in lines]
    assert [line.split(b" ", 1)[1] for line in lines] == [single.encode(), packed.encode(), single.encode()]
    assert before <= stamps[0] == stamps[1] <= after <= stamps[2]


@pytest.mark.parametrize("in_flight", [4, 16])
async def test_eventbridge_at_4_to_16_in_flight_every_event_is_acknowledged_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_flight: int
) -> None:
    """Issue 14, defect 7, without moto: the daemon's EventBridge sink at 4 and 16 PutEvents in flight, against an
    endpoint that records every entry it acknowledges. Every event is acknowledged exactly once: the events once
    missing behind moto were moto's (its queue lost the rule's forwards, tests/aws/test_moto_server.py)."""
    isolate_aws_env(monkeypatch, tmp_path)
    record = tmp_path / "record.jsonl"
    async with AwsEndpoint(buses=("bus",), record=record) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
        settings = make_settings(tmp_path / "data", event_bus_name="bus", sink_max_in_flight=in_flight)
        daemon = Daemon(settings)
        await daemon.start()
        try:
            report = await run_simulation(SimulatorConfig(port=daemon.port, nodes=3, events=500, seed=14))
        finally:
            stopped = await daemon.stop()
        endpoint.flush()
        assert report.completed
        assert stopped.undelivered == 0
        assert endpoint.stats.events["bus"] == 1500
        assert endpoint.stats.requests["AWSEvents.PutEvents"] >= 150  # at most 10 entries per PutEvents
    recorded = event_ids(record.read_bytes().splitlines())
    assert len(recorded) == len(set(recorded)) == 1500
