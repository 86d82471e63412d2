"""A moto server for AWS tests: started by the tests themselves on 127.0.0.1 (an ephemeral port), never the real
AWS. aiobotocore only works with moto in server mode (it speaks HTTP through aiohttp), so tests talk to it over
loopback like to any endpoint.

``moto_server()`` starts one and yields a :class:`MotoEndpoint`; ``isolate_aws_env`` points the standard AWS
environment of one test at it (dummy credentials, region, no shared config files, no instance metadata), so
even code that builds its clients from the environment alone cannot reach a real account.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from moto.server import ThreadedMotoServer
from moto.sqs.models import Queue, SQSBackend

from fpolicyd.sinks.aws.clients import AwsClients

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
#: Dummy credentials moto accepts; they would be refused by AWS.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"

# Every variable that could steer botocore towards a real account or a real endpoint.
_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_EVENTBRIDGE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@dataclass(frozen=True, slots=True)
class MotoEndpoint:
    url: str
    region: str = REGION
    account_id: str = ACCOUNT_ID

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


_unlocked_delete = Queue.delete_message


def _locked_delete(self: Any, receipt_handle: str) -> None:
    with self._messages_lock:
        _unlocked_delete(self, receipt_handle)


def _per_queue(method: Callable[..., Any]) -> Callable[..., Any]:
    """``SQSBackend.<method>(queue_name, ...)`` run under that queue's own lock (a re-entrant ``Condition``; a long
    poll's wait releases it, so a receive that waits does not hold sends back)."""

    @functools.wraps(method)
    def locked(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        with self.get_queue(queue_name)._messages_lock:
            return method(self, queue_name, *args, **kwargs)

    return locked


_SERIALISED = ("send_message", "receive_message", "delete_message", "change_message_visibility")
_ORIGINALS = {name: getattr(SQSBackend, name) for name in _SERIALISED}


def serialise_sqs_queues() -> None:
    """Run moto's SQS operations on one queue one at a time, as the real service behaves for a client.

    moto 5.2's threaded server runs requests concurrently, and its SQS queue is not thread-safe:
    ``Queue.delete_message`` rebuilds the message list and assigns it back without the lock ``add_message`` takes
    (a message sent meanwhile is lost, two concurrent deletes resurrect each other's messages), and
    ``receive_message`` iterates sets that other requests change ("Set changed size during iteration"). In this
    suite that lost events moto had acknowledged (replay-test over SQS and EventBridge, under load) and left one
    receive batch in flight after a drain. ``tests/aws/test_moto_server.py`` shows the delete race on moto's own
    method and proves this patch. The real SQS has no such races; these tests check fpolicyd, not moto."""
    Queue.delete_message = _locked_delete  # type: ignore[method-assign]
    for name, method in _ORIGINALS.items():
        setattr(SQSBackend, name, _per_queue(method))


serialise_sqs_queues()  # on import: every moto server of the tests, whoever starts it


@contextlib.contextmanager
def moto_server() -> Iterator[MotoEndpoint]:
    """Start ``ThreadedMotoServer`` on 127.0.0.1, port 0 (the kernel picks a free port), yield its endpoint,
    stop it. ``start()`` returns once the socket is bound; ``get_host_and_port()`` reads the bound port."""
    # werkzeug logs every request at INFO on stderr; keep test output to what the tests say.
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield MotoEndpoint(url=f"http://{host}:{port}")
    finally:
        server.stop()
        werkzeug_log.setLevel(level)


def isolate_aws_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: MotoEndpoint | None = None, *, via_env: bool = False
) -> None:
    """Give this test dummy credentials and a region, hide shared config/credential files and instance metadata,
    and clear anything else that names an account or endpoint. With ``via_env`` also set ``AWS_ENDPOINT_URL`` to
    the moto server (to test that clients honour the standard environment)."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if via_env:
        if endpoint is None:
            raise ValueError("via_env needs an endpoint")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_queue(sqs: Any, *, fifo: bool = False, **attributes: str) -> str:
    name = unique("fpolicy") + (".fifo" if fifo else "")
    if fifo:
        attributes["FifoQueue"] = "true"
    response = await sqs.create_queue(QueueName=name, Attributes=attributes)
    return str(response["QueueUrl"])


async def drain_queue(sqs: Any, queue_url: str, expected: int, *, within: float = 10.0) -> list[dict[str, Any]]:
    """Receive (and delete) until ``expected`` messages arrived or ``within`` seconds passed (bounded)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while len(got) < expected and time.monotonic() < deadline:
        response = await sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            WaitTimeSeconds=0,
        )
        messages = response.get("Messages", [])
        if not messages:
            await asyncio.sleep(0.05)
            continue
        got.extend(messages)
        await sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
    return got


async def bus_with_queue_rule(clients: AwsClients, source: str = "fsxn.fpolicy") -> tuple[str, str]:
    """A custom bus, a standard queue, and a rule (source + detail-type, as the reference pipeline's) sending
    matching events to the queue."""
    events = await clients.events()
    sqs = await clients.sqs()
    bus = unique("fsxn-fpolicy-events")
    await events.create_event_bus(Name=bus)
    queue_url = await create_queue(sqs)
    arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    pattern = {"source": [source], "detail-type": ["FPolicy File Operation"]}
    await events.put_rule(Name="all-file-operations", EventBusName=bus, EventPattern=orjson.dumps(pattern).decode())
    await events.put_targets(Rule="all-file-operations", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
    return bus, queue_url


async def create_dedup_table(dynamodb: Any, name: str | None = None) -> str:
    """A dedup claim table as fpolicyd expects it: string keys pk (HASH) and sk (RANGE), on-demand, TTL on ``ttl``."""
    table = name or unique("fpolicyd-dedup")
    await dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    await dynamodb.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"}
    )
    return table
