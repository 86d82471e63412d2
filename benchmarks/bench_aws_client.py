"""Client CPU per SendMessageBatch / PutEvents: the SDK path against the lean ones.

    python benchmarks/bench_aws_client.py [--requests 3000] [--sdk-requests 600] [--in-flight 4] [--max-seconds 30]

Each request carries 10 entries of ~1.2 KB event JSON (SQS: one event per message, with the message attributes
fpolicyd sets). The endpoint (benchmarks/aws_endpoint.py) runs in its own process, so the CPU counted
(``time.process_time()`` of this process) is the client's alone: building, signing, sending the request and
reading the answer. Variants:

(a) ``sdk``: ``AwsClients`` + ``send_sqs_batch`` / ``send_eventbridge_batch`` on aiobotocore, as before;
(b) ``botocore-ser+aiohttp``: botocore's serializer, botocore's SigV4Auth, aiohttp keep-alive pool;
(c) ``orjson+aiohttp``: the same with the body by orjson;
    ``lean``: what fpolicyd now uses (``fpolicyd.sinks.aws.transport.LeanAwsClient``): orjson body, botocore's
    SigV4Auth on a plain-dict request, its own HTTP/1.1 keep-alive pool, MD5OfMessageBody checked;
    ``lean, stock AWSRequest``: the same signing an unmodified ``AWSRequest`` (botocore's email-based
    headers); ``lean x16``: the same as ``lean`` with 16 requests in flight;
    ``lean, unsigned``: the lean transport and body without SigV4 (not a usable client: the floor, so the
    signer's share is visible).

One table per service: requests/s (wall clock, both processes share this box's cores), client CPU µs per
request (and the kernel's part of it: on loopback the sender's ``send()`` also runs the receiver's TCP stack)
and per event, and both as ratios to (a). Every answer is checked (all entries succeeded) and the
endpoint's counts must equal what was sent. Bounded: ``--requests`` per variant (``--sdk-requests`` for the
slow SDK row), each variant stopped after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import uvloop
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.serialize import create_serializer

from aws_endpoint import EndpointProcess, endpoint_process
from fpolicyd.events import FileEvent
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import send_eventbridge_batch, send_sqs_batch
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches
from fpolicyd.sinks.aws.targets import AwsDataPath, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.aws.transport import LeanAwsClient, encode_body

ENTRIES = 10
WARMUP = 50


def event_json(n: int) -> bytes:
    """A ~1.2 KB event, shaped like fpolicyd's (long SMB path, routes, session metadata)."""
    return FileEvent(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-aws-{n}")),
        operation_type=("create", "write", "rename", "delete")[n % 4],
        file_path=f"/finance/reports/2026/quarterly-close/department-{n % 37:02d}/working-papers/"
        f"reconciliation-{n:08d}-draft-v{n % 9}-reviewed-by-controller-and-external-auditors.xlsx",
        previous_path=f"/finance/reports/2026/quarterly-close/department-{n % 37:02d}/working-papers/~$tmp{n}.xlsx"
        if n % 4 == 2
        else None,
        volume_name="vol_finance_01",
        svm_name="svm-prod-finance",
        timestamp=f"2026-05-01T10:{n % 60:02d}:{n % 60:02d}.{n % 1_000_000:06d}Z",
        file_size=1_000_000 + n,
        client_ip="10.20.30.40",
        metadata={
            "vs_uuid": "a1b2c3d4-0000-1111-2222-333344445555",
            "node": "cluster-01-node-02",
            "policy": "fpolicy_finance_audit",
            "protocol": "cifs",
            "user_sid": "S-1-5-21-3623811015-3361044348-30300820-1013",
            "user_name": "CORP\\j.doe-controller",
            "session_id": f"{n * 7919:016x}",
            "share": "finance$",
            "routes": ["UC1", "UC16", "audit-archive"],
            "volume_msid": 2_154_806_219,
            "open_mode": "read-write",
            "notes": "x" * 160,
        },
    ).to_json()


def one_batch(target: SqsTarget | EventBridgeTarget) -> Batch:
    plan = plan_batches([Item(event_json(n), ref=n) for n in range(ENTRIES)], target)
    assert len(plan) == 1
    assert isinstance(plan[0], Batch)
    return plan[0]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    requests: int
    wall_s: float
    cpu_s: float
    #: Of cpu_s, the kernel's share (on loopback the sender's send() also runs the receiving TCP stack).
    sys_s: float

    @property
    def per_second(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6


async def measure(
    name: str, send: Callable[[], Awaitable[None]], requests: int, in_flight: int, max_seconds: float
) -> Row:
    for _ in range(WARMUP):
        await send()
    left = requests
    done = 0
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal left, done
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            await send()
            done += 1

    started, cpu, before = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Row(name, done, time.perf_counter() - started, time.process_time() - cpu, after.ru_stime - before.ru_stime)


def expect_all_ok(response: dict[str, Any]) -> None:
    if response.get("Failed") or response.get("FailedEntryCount"):
        raise AssertionError(f"entries failed: {response}")


class SignedAiohttp:
    """Variants (b) and (c): botocore's SigV4Auth over an aiohttp keep-alive pool; body by botocore's
    serializer or by orjson."""

    def __init__(self, lean: LeanAwsClient, http: aiohttp.ClientSession, credentials: Any, *, orjson_body: bool):
        operation = next(iter(lean._operations.values()))
        self._op = operation
        self._http = http
        self._credentials = credentials
        self._signing = lean.signing
        self._orjson = orjson_body
        self._serializer = create_serializer("json", include_validation=False)

    async def call(self, params: dict[str, Any]) -> dict[str, Any]:
        op = self._op
        if self._orjson:
            body = encode_body(params)
        else:
            body = self._serializer.serialize_to_request(params, self._model(op.name))["body"]
        frozen = await self._credentials.get_frozen_credentials()
        request = AWSRequest(method="POST", url=op.url, headers=dict(op.headers), data=body)
        SigV4Auth(frozen, *self._signing).add_auth(request)
        async with self._http.post(op.url, data=body, headers=dict(request.headers)) as response:
            data = await response.read()
            if response.status != 200:
                raise AssertionError(f"HTTP {response.status}: {data[:200]!r}")
            parsed: dict[str, Any] = orjson.loads(data)
            return parsed

    _models: dict[str, Any] = {}  # noqa: RUF012 - a cache shared by instances

    def _model(self, name: str) -> Any:
        model = self._models.get(name)
        if model is None:
            import botocore.session

            service = "sqs" if name == "SendMessageBatch" else "events"
            model = botocore.session.get_session().get_service_model(service).operation_model(name)
            self._models[name] = model
        return model


class StockSignerLean(LeanAwsClient):
    """The lean client signing with an unmodified ``AWSRequest`` + ``SigV4Auth`` (what :class:`LeanAwsClient`
    does with a plain-dict request instead): the cost of botocore's email-based header containers."""

    def sign(self, frozen: Any, operation: Any, body: bytes) -> list[tuple[str, str]]:
        request = AWSRequest(method="POST", url=operation.url, headers=dict(operation.headers), data=body)
        SigV4Auth(frozen, *self.signing).add_auth(request)
        return list(request.headers.items())


def stock_signer_copy(lean: LeanAwsClient) -> StockSignerLean:
    copy = StockSignerLean.__new__(StockSignerLean)
    copy.__dict__.update(lean.__dict__)
    return copy


def unsigned_sender(lean: LeanAwsClient, params: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    """The lean transport and body with a constant, unsigned head: what the request costs without SigV4."""
    operation = next(iter(lean._operations.values()))
    head_lines = [
        "POST / HTTP/1.1",
        *(f"{k}: {v}" for k, v in operation.headers),
        "Authorization: unsigned",
        "User-Agent: bench",
    ]

    async def send() -> None:
        body = encode_body(params)
        head = ("\r\n".join([*head_lines, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode("latin-1")
        response = await lean.pool.request(head + body)
        expect_all_ok(orjson.loads(response.body))

    return send


async def bench_service(service: str, endpoint: EndpointProcess, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if service == "sqs":
        target: SqsTarget | EventBridgeTarget = SqsTarget(endpoint.queues["fpolicy-bench"])
    else:
        target = EventBridgeTarget("fpolicy-bench")
    batch = one_batch(target)
    entries = [e.request for e in batch.entries]
    if isinstance(target, SqsTarget):
        params: dict[str, Any] = {"QueueUrl": target.queue_url, "Entries": entries}
    else:
        params = {"Entries": entries}
    body_bytes = len(encode_body(params))
    print(f"\n{service}: {ENTRIES} entries, {body_bytes} request bytes (orjson)")
    async with AwsClients(endpoint_url=endpoint.url, region_name=endpoint.region, max_pool_connections=32) as clients:
        sdk = await clients.client(service)
        lean = await clients.data_client(service)
        assert isinstance(lean, LeanAwsClient)
        credentials = await clients.credentials()

        async def via(client: Any) -> None:
            if isinstance(target, SqsTarget):
                outcome = await send_sqs_batch(client, target, batch)
            else:
                outcome = await send_eventbridge_batch(client, target, batch)
            if len(outcome.succeeded) != ENTRIES:
                raise AssertionError(f"not all entries succeeded: {outcome}")

        rows.append(await measure("(a) sdk", lambda: via(sdk), args.sdk_requests, args.in_flight, args.max_seconds))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32), timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=15)
        ) as http:
            for name, use_orjson in (("(b) botocore-ser+aiohttp", False), ("(c) orjson+aiohttp", True)):
                signed = SignedAiohttp(lean, http, credentials, orjson_body=use_orjson)

                async def send_signed(signed: SignedAiohttp = signed) -> None:
                    expect_all_ok(await signed.call(params))

                rows.append(await measure(name, send_signed, args.requests, args.in_flight, args.max_seconds))
        stock = stock_signer_copy(lean)
        rows.append(
            await measure(
                "(c) lean, stock AWSRequest", lambda: via(stock), args.requests, args.in_flight, args.max_seconds
            )
        )
        rows.append(await measure("(c) lean", lambda: via(lean), args.requests, args.in_flight, args.max_seconds))
        rows.append(await measure("(c) lean x16", lambda: via(lean), args.requests, 16, args.max_seconds))
        rows.append(
            await measure(
                "    lean, unsigned (floor)",
                unsigned_sender(lean, params),
                args.requests,
                args.in_flight,
                args.max_seconds,
            )
        )
    return rows


async def credentials_cost(rounds: int = 20_000) -> float:
    """µs per ``await get_frozen_credentials()`` (what the lean client does per request)."""
    async with AwsClients(region_name="us-east-1") as clients:
        credentials = await clients.credentials()
        assert credentials is not None
        started = time.perf_counter()
        for _ in range(rounds):
            await credentials.get_frozen_credentials()
        return (time.perf_counter() - started) / rounds * 1e6


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    header = (
        f"{'variant':28s} {'requests':>8s} {'req/s':>8s} {'CPU µs/req':>11s} {'of it sys':>10s} {'µs/event':>9s}"
        f" {'req/s ×':>8s} {'CPU ×':>7s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:28s} {row.requests:8d} {row.per_second:8.0f} {row.cpu_us:11.1f}"
            f" {row.sys_s / row.requests * 1e6:10.1f} {row.cpu_us / ENTRIES:9.1f}"
            f" {row.per_second / base.per_second:8.2f} {row.cpu_us / base.cpu_us:7.3f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per lean variant")
    parser.add_argument("--sdk-requests", type=int, default=600, help="requests for the SDK row")
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight (fpolicyd's default is 4)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop a variant after this long")
    parser.add_argument("--services", default="sqs,events")
    args = parser.parse_args()
    # Dummy credentials and no shared config: the endpoint checks no signature, and nothing here may reach AWS.
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_EVENTBRIDGE", "AWS_PROFILE"):
        os.environ.pop(name, None)
    print(f"client CPU per request, endpoint in its own process; data path default: {AwsDataPath.LEAN.value}")
    print(f"await get_frozen_credentials(): {uvloop.run(credentials_cost()):.2f} µs")
    with endpoint_process() as endpoint:
        sent: dict[str, int] = {}
        for service in args.services.split(","):
            rows = uvloop.run(bench_service(service, endpoint, args))
            print_table(rows)
            sent[service] = sum(r.requests + WARMUP for r in rows) * ENTRIES
        stats = endpoint.stats()
    got = {"sqs": sum(stats["messages"].values()), "events": sum(stats["events"].values())}
    for service, count in sent.items():
        if got[service] != count:
            raise SystemExit(f"{service}: the endpoint acknowledged {got[service]} entries, {count} were sent")
    print(f"\nendpoint acknowledged every entry sent: {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
