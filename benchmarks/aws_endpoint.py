"""A local SQS + EventBridge endpoint for throughput work: answers like AWS, costs almost nothing per request.

    python benchmarks/aws_endpoint.py [--port 0] [--record FILE [--record-times]] [--queue NAME]... [--bus NAME]...
        [--tls-cert PEM --tls-key PEM]

prints one JSON line (``{"url": ..., "queues": {name: url}, "buses": [...], "region": ..., "pid": ...}``) on
stdout, then serves until SIGTERM/SIGINT and prints the final counts as one more JSON line. moto (the test AWS)
takes ~35 ms per request and is for correctness; this endpoint is for measuring the client.

What it speaks: the AWS JSON protocol over HTTP/1.1 keep-alive (``asyncio.Protocol``, uvloop when installed),
dispatched on ``X-Amz-Target``:

- SQS (JSON 1.0, ``AmazonSQS.*``): GetQueueUrl, GetQueueAttributes (QueueArn, MaximumMessageSize, FifoQueue for
  ``.fifo`` names, ...), SendMessageBatch (MessageId, MD5OfMessageBody of the UTF-8 body, SequenceNumber for
  FIFO queues; the batch checks SQS makes on the whole call: empty, more than 10, Ids not distinct, over 1 MiB);
- EventBridge (JSON 1.1, ``AWSEvents.*``): DescribeEventBus, PutEvents (one EventId per entry,
  FailedEntryCount; an entry without Source, DetailType or Detail is answered InvalidArgument as EventBridge
  does);
- a missing queue or bus, an unknown operation, a malformed body: a 400 AWS JSON error (``__type`` + ``message``,
  and ``x-amzn-query-error`` for SQS, which botocore turns into the ``AWS.SimpleQueueService.*`` codes);
- ``GET /_stats``: the counts as JSON (not an AWS path; flushes the record file first, so every counted entry is
  on disk when the answer arrives).

Queues and buses exist when named at start (``default`` bus always). Every acknowledged entry is counted per
queue/bus; with ``record`` each acknowledged MessageBody / Detail is also appended to a file, one per line, so
a benchmark can check event ids end to end (a raw line break inside a body, which in JSON can only be
whitespace between tokens, is written as a space). With ``record_times`` each line starts with the moment its
request was handled, ``time.monotonic_ns()`` (CLOCK_MONOTONIC: comparable across processes on one host), and a
space: a benchmark matches it to the time the event's frame was sent.

What SQS carries and bills is counted per queue too (``sqs_events``, ``sqs_billed``): a message holds one event,
or the ``fpolicyd-count`` of a packed one (fpolicyd's packed envelope, ``fpolicyd.sinks.sqs_envelope``); a
SendMessageBatch is billed one request per started 64 KiB of its payload, the messages' bodies plus their
attributes' names, types and values (``BILLED_CHUNK_BYTES``, from the SQS pricing page).

Fault injection (:class:`Faults`), all by counters (deterministic, O(1)): every Nth data request refused whole
(throttled or HTTP 500), every Nth entry failed transiently, every Nth SQS entry answered with a wrong
MD5OfMessageBody (the message is still enqueued, as when a reply is damaged in transit).

Binds 127.0.0.1 (port 0 by default: the kernel picks). Not an AWS emulator: no receive, no signatures checked
(an ``Authorization`` header is required, so an unsigned client is noticed), no persistence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Self, cast

import orjson

REGION: Final = "us-east-1"
ACCOUNT_ID: Final = "123456789012"
DEFAULT_QUEUES: Final = ("fpolicy-bench", "fpolicy-bench.fifo")
DEFAULT_BUSES: Final = ("fpolicy-bench",)

#: Longest request head (request line + headers) accepted; botocore's are well under 2 KiB.
MAX_HEAD_BYTES: Final = 64 * 1024
#: Largest request body accepted: a 1 MiB SendMessageBatch / PutEvents plus JSON escaping (up to 6 bytes for
#: one control character) stays under it; anything larger is no AWS request and is refused with 413.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: SendMessageBatch / PutEvents: at most 10 entries; SQS: at most 1 MiB of message bodies in one batch.
MAX_ENTRIES: Final = 10
MAX_SQS_BATCH_BYTES: Final = 1024 * 1024
#: What GetQueueAttributes reports as MaximumMessageSize (the SQS default and maximum).
MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Buffered bytes of the record file before a write reaches the kernel (flushed on /_stats and at stop).
RECORD_BUFFER_BYTES: Final = 1024 * 1024
#: "Each 64 KB chunk of a payload is billed as 1 request" (https://aws.amazon.com/sqs/pricing/); 256 KB = 4.
BILLED_CHUNK_BYTES: Final = 64 * 1024
#: The message attribute of a packed message that says how many events it holds (fpolicyd.sinks.sqs_envelope).
COUNT_ATTRIBUTE: Final = "fpolicyd-count"

SQS_JSON: Final = b"application/x-amz-json-1.0"
EVENTS_JSON: Final = b"application/x-amz-json-1.1"
_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    411: b"Length Required",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


@dataclass(frozen=True, slots=True)
class Faults:
    """Cheap, deterministic fault injection (0 = off). Counted over SendMessageBatch + PutEvents requests and
    over their entries, in arrival order."""

    #: Every Nth data request is refused whole, with ``request_error``.
    request_every: int = 0
    #: ``throttle`` (400 ThrottlingException, retriable) or ``500`` (HTTP 500 InternalFailure).
    request_error: str = "throttle"
    #: Every Nth entry fails transiently: SQS ``Failed[]`` InternalError with SenderFault false, EventBridge
    #: ErrorCode InternalFailure. Not recorded, not counted (it was not acknowledged).
    entry_every: int = 0
    #: Every Nth SQS entry is acknowledged with a wrong MD5OfMessageBody (recorded and counted: it was enqueued).
    md5_every: int = 0

    def __post_init__(self) -> None:
        for name in ("request_every", "entry_every", "md5_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a count >= 0, got {value!r}")
        if self.request_error not in ("throttle", "500"):
            raise ValueError(f"request_error: expected 'throttle' or '500', got {self.request_error!r}")


@dataclass(slots=True)
class Stats:
    """What the endpoint acknowledged and refused so far."""

    #: Acknowledged messages per queue name / events per bus name.
    messages: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    #: Events the acknowledged SQS messages carry per queue (1 per message, ``fpolicyd-count`` when packed), and
    #: the requests SQS would bill for them (one per started 64 KiB of each SendMessageBatch's payload).
    sqs_events: Counter[str] = field(default_factory=Counter)
    sqs_billed: Counter[str] = field(default_factory=Counter)
    #: Requests per operation (``AmazonSQS.SendMessageBatch``...), answered errors per AWS error code.
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: Entries answered as failed (fault injection or validation), and acknowledged with a wrong MD5.
    failed_entries: int = 0
    bad_md5: int = 0
    connections: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": dict(self.messages),
            "events": dict(self.events),
            "sqs_events": dict(self.sqs_events),
            "sqs_billed": dict(self.sqs_billed),
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "failed_entries": self.failed_entries,
            "bad_md5": self.bad_md5,
            "connections": self.connections,
        }


class AwsError(Exception):
    """A whole-call AWS error answer: HTTP status, ``__type`` and, for SQS, the query-protocol code."""

    def __init__(self, status: int, type_: str, message: str, query_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.query_code = query_code


def _sqs_error(type_: str, query_code: str, message: str) -> AwsError:
    return AwsError(400, f"com.amazonaws.sqs#{type_}", message, f"AWS.SimpleQueueService.{query_code}")


def _name_of(reference: object, marker: str) -> str:
    """A queue URL's or bus ARN's last part (``.../123456789012/name``, ``arn:...:event-bus/name``)."""
    text = str(reference or "")
    if marker == "/":
        return text.rstrip("/").rsplit("/", 1)[-1]
    return text.rsplit(marker, 1)[-1] if marker in text else text


def _attributes_size(entry: object) -> int:
    """What a SendMessageBatch entry's MessageAttributes add to its size: every name, DataType and value."""
    attributes = entry.get("MessageAttributes") if isinstance(entry, dict) else None
    if not isinstance(attributes, dict):
        return 0
    size = 0
    for name, value in attributes.items():
        size += len(str(name).encode("utf-8"))
        if isinstance(value, dict):
            size += len(str(value.get("DataType", "")).encode("utf-8"))
            size += len(str(value.get("StringValue") or value.get("BinaryValue") or "").encode("utf-8"))
    return size


def _events_in(entry: object) -> int:
    """Events one SQS message carries: its ``fpolicyd-count`` attribute when packed, else 1."""
    attributes = entry.get("MessageAttributes") if isinstance(entry, dict) else None
    count = attributes.get(COUNT_ATTRIBUTE) if isinstance(attributes, dict) else None
    if isinstance(count, dict):
        with contextlib.suppress(TypeError, ValueError):
            return max(1, int(str(count.get("StringValue"))))
    return 1


def _one_line(data: bytes) -> bytes:
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r", b" ").replace(b"\n", b" ")
    return data + b"\n"


class AwsEndpoint:
    """The endpoint's state and operations (no sockets: :meth:`handle` maps one request to one answer).

    Run it with :meth:`start` / :meth:`close` inside a running event loop, or as a process with
    :func:`endpoint_process`.
    """

    def __init__(
        self,
        *,
        queues: Sequence[str] = DEFAULT_QUEUES,
        buses: Sequence[str] = DEFAULT_BUSES,
        record: Path | None = None,
        record_times: bool = False,
        faults: Faults = Faults(),
        region: str = REGION,
        account_id: str = ACCOUNT_ID,
        ssl_context: ssl.SSLContext | None = None,
        latency_s: float = 0.0,
    ) -> None:
        if not 0 <= latency_s <= 10:
            raise ValueError(f"latency_s: expected 0..10 s, got {latency_s!r}")
        #: Every answer is written this long after its request arrived (an AWS region answers a SendMessageBatch
        #: in ~10-30 ms; this endpoint otherwise in well under one): O(1), a timer, no CPU while it waits.
        self.latency_s = latency_s
        self.queues = frozenset(queues)
        #: Serve HTTPS with this context (tests of TLS clients); plain HTTP when None.
        self.ssl_context = ssl_context
        self.buses = frozenset(buses) | {"default"}
        self.faults = faults
        self.region = region
        self.account_id = account_id
        self.stats = Stats()
        self.url = ""
        self._record_path = record
        self.record_times = record_times
        self._record: IO[bytes] | None = None
        self._server: asyncio.Server | None = None
        self.open_connections: set[_HttpConnection] = set()
        self._ids = itertools.count(1)
        self._data_requests = 0
        self._entries = 0
        self._sqs_entries = 0
        # MessageId / EventId: UUID-shaped, unique within this process, and cheap (no uuid4 per entry).
        self._id_prefix = f"{os.getpid() & 0xFFFFFFFF:08x}-{int(time.time()) & 0xFFFF:04x}-4000-8000-"
        self._operations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "AmazonSQS.GetQueueUrl": self._get_queue_url,
            "AmazonSQS.GetQueueAttributes": self._get_queue_attributes,
            "AmazonSQS.SendMessageBatch": self._send_message_batch,
            "AWSEvents.DescribeEventBus": self._describe_event_bus,
            "AWSEvents.PutEvents": self._put_events,
        }

    # ---------------------------------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (port 0: any free port) and return the base URL."""
        if self._record_path is not None and self._record is None:
            self._record = open(self._record_path, "ab", buffering=RECORD_BUFFER_BYTES)  # noqa: ASYNC230, SIM115 - once, at start; closed in close()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpConnection(self), host, port, backlog=1024, ssl=self.ssl_context
        )
        bound = self._server.sockets[0].getsockname()
        self.url = f"{'https' if self.ssl_context else 'http'}://{bound[0]}:{bound[1]}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Keep-alive connections stay open until their clients close them: close them here.
            for connection in list(self.open_connections):
                connection.close()
            await self._server.wait_closed()
            self._server = None
        if self._record is not None:
            self._record.close()
            self._record = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def flush(self) -> None:
        if self._record is not None:
            self._record.flush()

    def queue_url(self, name: str) -> str:
        return f"{self.url}/{self.account_id}/{name}"

    def bus_arn(self, name: str) -> str:
        return f"arn:aws:events:{self.region}:{self.account_id}:event-bus/{name}"

    def describe(self) -> dict[str, Any]:
        """The start-up line: where to send what."""
        return {
            "url": self.url,
            "region": self.region,
            "account_id": self.account_id,
            "queues": {name: self.queue_url(name) for name in sorted(self.queues)},
            "buses": sorted(self.buses),
            "pid": os.getpid(),
        }

    # --------------------------------------------------------------------------------------- dispatching

    def handle(
        self, method: bytes, path: bytes, target: str, body: bytes, *, signed: bool = True
    ) -> tuple[int, list[bytes], bytes]:
        """One request → (status, extra header lines, body). ``signed``: it had an Authorization header."""
        if method == b"GET" and path == b"/_stats":
            self.flush()
            return 200, [b"Content-Type: application/json"], orjson.dumps(self.stats.as_dict())
        content_type = EVENTS_JSON if target.startswith("AWSEvents.") else SQS_JSON
        headers = [b"Content-Type: " + content_type, b"x-amzn-RequestId: " + self._new_id().encode()]
        self.stats.requests[target or "(none)"] += 1
        try:
            if not signed:
                raise AwsError(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
            operation = self._operations.get(target)
            if method != b"POST" or operation is None:
                raise AwsError(
                    400,
                    "com.amazon.coral.service#UnknownOperationException",
                    f"unknown operation {target!r} ({method.decode('latin-1')} {path.decode('latin-1')})",
                )
            try:
                request = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError as exc:
                raise AwsError(400, "SerializationException", f"malformed JSON body: {exc}") from exc
            if not isinstance(request, dict):
                raise AwsError(400, "SerializationException", "the body must be a JSON object")
            return 200, headers, orjson.dumps(operation(request))
        except AwsError as error:
            self.stats.errors[error.query_code or error.type.rsplit("#", 1)[-1]] += 1
            if error.query_code is not None:
                headers.append(f"x-amzn-query-error: {error.query_code};Sender".encode())
            return error.status, headers, orjson.dumps({"__type": error.type, "message": error.message})

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    def _data_request(self) -> None:
        """Count one SendMessageBatch / PutEvents and refuse it when the faults say so."""
        self._data_requests += 1
        every = self.faults.request_every
        if every and self._data_requests % every == 0:
            if self.faults.request_error == "500":
                raise AwsError(500, "InternalFailure", "injected: internal failure")
            raise AwsError(400, "ThrottlingException", "injected: rate exceeded")

    def _entry_fails(self) -> bool:
        self._entries += 1
        every = self.faults.entry_every
        return bool(every) and self._entries % every == 0

    # ----------------------------------------------------------------------------------------------- SQS

    def _queue(self, request: dict[str, Any]) -> str:
        name = _name_of(request.get("QueueUrl"), "/")
        if name not in self.queues:
            raise _sqs_error("QueueDoesNotExist", "NonExistentQueue", "The specified queue does not exist.")
        return name

    def _get_queue_url(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request.get("QueueName") or "")
        if name not in self.queues:
            raise _sqs_error("QueueDoesNotExist", "NonExistentQueue", "The specified queue does not exist.")
        return {"QueueUrl": self.queue_url(name)}

    def _get_queue_attributes(self, request: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(request)
        fifo = name.endswith(".fifo")
        known: dict[str, str] = {
            "QueueArn": f"arn:aws:sqs:{self.region}:{self.account_id}:{name}",
            "MaximumMessageSize": str(MAX_MESSAGE_BYTES),
            "MessageRetentionPeriod": "345600",
            "VisibilityTimeout": "30",
            "DelaySeconds": "0",
            "ReceiveMessageWaitTimeSeconds": "0",
            "ApproximateNumberOfMessages": str(self.stats.messages[name]),
        }
        if fifo:  # SQS reports these only for FIFO queues
            known["FifoQueue"] = "true"
            known["ContentBasedDeduplication"] = "false"
        wanted = request.get("AttributeNames") or []
        if "All" in wanted:
            return {"Attributes": known}
        return {"Attributes": {k: known[k] for k in wanted if k in known}}

    def _send_message_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(request)
        entries = request.get("Entries")
        if not isinstance(entries, list) or not entries:
            raise _sqs_error("EmptyBatchRequest", "EmptyBatchRequest", "There should be at least one entry.")
        if len(entries) > MAX_ENTRIES:
            raise _sqs_error(
                "TooManyEntriesInBatchRequest", "TooManyEntriesInBatchRequest", f"Maximum is {MAX_ENTRIES} entries."
            )
        ids = [str(e.get("Id", "")) if isinstance(e, dict) else "" for e in entries]
        if len(set(ids)) != len(ids):
            raise _sqs_error("BatchEntryIdsNotDistinct", "BatchEntryIdsNotDistinct", "Ids must be distinct.")
        bodies = [str(e.get("MessageBody") or "").encode("utf-8") for e in entries]
        total = sum(len(b) for b in bodies)
        if total > MAX_SQS_BATCH_BYTES:
            raise _sqs_error(
                "BatchRequestTooLong",
                "BatchRequestTooLong",
                f"Batch requests cannot be longer than {MAX_SQS_BATCH_BYTES} bytes ({total}).",
            )
        self._data_request()
        fifo = name.endswith(".fifo")
        successful: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        record = self._record
        stamp = b"%d " % time.monotonic_ns() if self.record_times else b""
        payload = total + sum(_attributes_size(e) for e in entries)
        self.stats.sqs_billed[name] += max(1, -(-payload // BILLED_CHUNK_BYTES))
        carried = 0
        for entry, entry_id, body in zip(entries, ids, bodies, strict=True):
            if not body:
                failed.append(
                    {"Id": entry_id, "SenderFault": True, "Code": "InvalidParameterValue", "Message": "empty body"}
                )
                continue
            if self._entry_fails():
                failed.append({"Id": entry_id, "SenderFault": False, "Code": "InternalError", "Message": "injected"})
                continue
            message_id = self._new_id()
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            self._sqs_entries += 1
            if self.faults.md5_every and self._sqs_entries % self.faults.md5_every == 0:
                md5 = md5[::-1]
                self.stats.bad_md5 += 1
            ok = {"Id": entry_id, "MessageId": message_id, "MD5OfMessageBody": md5}
            if fifo:
                ok["SequenceNumber"] = f"{next(self._ids):020d}"
            successful.append(ok)
            carried += _events_in(entry)
            if record is not None:
                record.write(stamp + _one_line(body))
        self.stats.messages[name] += len(successful)
        self.stats.sqs_events[name] += carried
        self.stats.failed_entries += len(failed)
        return {"Successful": successful, "Failed": failed}

    # --------------------------------------------------------------------------------------- EventBridge

    def _bus(self, reference: object) -> str:
        name = _name_of(reference or "default", "event-bus/")
        if name not in self.buses:
            raise AwsError(400, "ResourceNotFoundException", f"Event bus {name} does not exist.")
        return name

    def _describe_event_bus(self, request: dict[str, Any]) -> dict[str, Any]:
        name = self._bus(request.get("Name"))
        return {"Name": name, "Arn": self.bus_arn(name)}

    def _put_events(self, request: dict[str, Any]) -> dict[str, Any]:
        entries = request.get("Entries")
        if not isinstance(entries, list) or not entries or len(entries) > MAX_ENTRIES:
            count = len(entries) if isinstance(entries, list) else 0
            raise AwsError(
                400,
                "ValidationException",
                f"1 validation error detected: 'entries' must have 1 to {MAX_ENTRIES} members, got {count}",
            )
        buses = [self._bus(e.get("EventBusName") if isinstance(e, dict) else None) for e in entries]
        self._data_request()
        answers: list[dict[str, Any]] = []
        failed = 0
        record = self._record
        stamp = b"%d " % time.monotonic_ns() if self.record_times else b""
        for entry, bus in zip(entries, buses, strict=True):
            if not isinstance(entry, dict) or not (entry.get("Source") and entry.get("DetailType")):
                answers.append({"ErrorCode": "InvalidArgument", "ErrorMessage": "Source and DetailType are required."})
                failed += 1
                continue
            detail = entry.get("Detail")
            if not detail:
                answers.append({"ErrorCode": "InvalidArgument", "ErrorMessage": "Detail is a required argument."})
                failed += 1
                continue
            if self._entry_fails():
                answers.append({"ErrorCode": "InternalFailure", "ErrorMessage": "injected"})
                failed += 1
                continue
            answers.append({"EventId": self._new_id()})
            self.stats.events[bus] += 1
            if record is not None:
                record.write(stamp + _one_line(str(detail).encode("utf-8")))
        self.stats.failed_entries += failed
        return {"FailedEntryCount": failed, "Entries": answers}


# ------------------------------------------------------------------------------------------------- HTTP


class _HttpConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, requests with a Content-Length body (what botocore and aiohttp send; chunked
    requests are refused with 411). Pipelined requests are answered in order."""

    def __init__(self, endpoint: AwsEndpoint) -> None:
        self._endpoint = endpoint
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        #: A delayed answer will close the connection: nothing after its request is read.
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._endpoint.stats.connections += 1
        self._endpoint.open_connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without it every small answer waits for the client's delayed ACK (up to 40 ms on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._endpoint.open_connections.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None and not self._closing and self._answer_one():
            pass

    def _fail(self, status: int, message: str) -> None:
        assert self._transport is not None
        body = message.encode()
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(body), body)
        )
        self._transport.close()
        self._transport = None

    def _answer_one(self) -> bool:
        """Answer the first complete request in the buffer; False when it needs more data (or closed)."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._fail(431, "request head too large")
            return False
        lines = bytes(buffer[:end]).split(b"\r\n")
        try:
            method, path, version = lines[0].split(b" ", 2)
        except ValueError:
            self._fail(400, "malformed request line")
            return False
        length = 0
        target = ""
        signed = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    self._fail(400, "bad Content-Length")
                    return False
            elif key == b"x-amz-target":
                target = value.strip().decode("latin-1")
            elif key == b"authorization":
                signed = True
            elif key == b"connection":
                token = value.strip().lower()
                keep_alive = token != b"close" if version == b"HTTP/1.1" else token == b"keep-alive"
            elif key == b"transfer-encoding":
                self._fail(411, "chunked requests are not supported: send a Content-Length")
                return False
        if length < 0 or length > MAX_BODY_BYTES:
            self._fail(413, f"body over {MAX_BODY_BYTES} bytes")
            return False
        start = end + 4
        if len(buffer) < start + length:
            return False
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        status, headers, payload = self._endpoint.handle(method, path.split(b"?", 1)[0], target, body, signed=signed)
        head = b"HTTP/1.1 %d %s\r\n%s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            _REASONS.get(status, b"Error"),
            b"\r\n".join(headers),
            len(payload),
            b"" if keep_alive else b"Connection: close\r\n",
        )
        assert self._transport is not None
        delay = self._endpoint.latency_s
        if delay:
            # Answers keep their order: one delay for all, and timers due at the same time run in order.
            asyncio.get_running_loop().call_later(delay, self._write, head + payload, keep_alive)
            if not keep_alive:
                self._closing = True
            return keep_alive
        self._write(head + payload, keep_alive)
        return keep_alive

    def _write(self, answer: bytes, keep_alive: bool) -> None:
        if self._transport is None:  # the client went away meanwhile
            return
        self._transport.write(answer)
        if not keep_alive:
            self._transport.close()
            self._transport = None


# -------------------------------------------------------------------------------------- as a process


@dataclass(frozen=True, slots=True)
class EndpointProcess:
    """A running ``aws_endpoint.py`` subprocess (see :func:`endpoint_process`)."""

    url: str
    region: str
    queues: dict[str, str]
    buses: tuple[str, ...]
    pid: int

    def stats(self) -> dict[str, Any]:
        """The counts so far (``GET /_stats``; the record file is flushed before the answer)."""
        # The benchmark's own endpoint on loopback: its self-issued certificate is not checked for this call.
        context = None
        if self.url.startswith("https:"):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10, context=context) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data


#: How long a subprocess endpoint may take to print its URL, and to exit after SIGTERM.
PROCESS_START_TIMEOUT_S: Final = 30.0
PROCESS_STOP_TIMEOUT_S: Final = 10.0


def self_issued_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(certificate chain, private key, CA bundle) PEM files for 127.0.0.1, from a throw-away CA (trustme, a test
    dependency), written to ``directory``: for ``endpoint_process(tls=...)`` and ``AWS_CA_BUNDLE``."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    chain, key, bundle = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(chain))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(chain), append=True)
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    return chain, key, bundle


@contextlib.contextmanager
def endpoint_process(
    *,
    queues: Sequence[str] = DEFAULT_QUEUES,
    buses: Sequence[str] = DEFAULT_BUSES,
    record: Path | None = None,
    record_times: bool = False,
    faults: Faults = Faults(),
    env: dict[str, str] | None = None,
    latency_s: float = 0.0,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[EndpointProcess]:
    """Run the endpoint in its own process (so its CPU is not the caller's) on 127.0.0.1, port 0; stop it with
    SIGTERM on exit. ``tls``: (certificate chain, private key) PEM files: serve HTTPS (the client must trust the
    certificate, e.g. ``AWS_CA_BUNDLE``); :meth:`EndpointProcess.stats` then does not verify it."""
    command = [sys.executable, str(Path(__file__).resolve())]
    for name in queues:
        command += ["--queue", name]
    for name in buses:
        command += ["--bus", name]
    if record is not None:
        command += ["--record", str(record)]
        if record_times:
            command.append("--record-times")
    command += [
        "--request-fault-every",
        str(faults.request_every),
        "--request-fault",
        faults.request_error,
        "--entry-fault-every",
        str(faults.entry_every),
        "--md5-fault-every",
        str(faults.md5_every),
        "--latency-ms",
        str(latency_s * 1000),
    ]
    if tls is not None:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert process.stdout is not None
        line = _read_line(process.stdout, PROCESS_START_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"aws_endpoint.py exited without printing its URL (code {process.poll()})")
        info = json.loads(line)
        yield EndpointProcess(
            url=info["url"], region=info["region"], queues=info["queues"], buses=tuple(info["buses"]), pid=process.pid
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _read_line(stream: IO[str], timeout_s: float) -> str:
    """One line from a child's stdout, waiting at most ``timeout_s`` (a reader thread: pipes have no timeout)."""
    import threading

    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not got:
        raise TimeoutError(f"aws_endpoint.py printed nothing within {timeout_s} s")
    return got[0]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # the plain asyncio loop also works, only slower
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _serve(endpoint: AwsEndpoint, port: int) -> None:
    await endpoint.start("127.0.0.1", port)
    print(json.dumps(endpoint.describe()), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await endpoint.close()
    print(json.dumps({"stopped": True, **endpoint.stats.as_dict()}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--record", type=Path, help="append every acknowledged body/detail to this file")
    parser.add_argument(
        "--record-times", action="store_true", help="start each recorded line with its arrival, monotonic ns"
    )
    parser.add_argument("--queue", action="append", help=f"a queue that exists (default: {DEFAULT_QUEUES})")
    parser.add_argument("--bus", action="append", help=f"an event bus that exists (default: {DEFAULT_BUSES})")
    parser.add_argument("--request-fault-every", type=int, default=0, help="refuse every Nth data request")
    parser.add_argument("--request-fault", choices=("throttle", "500"), default="throttle")
    parser.add_argument("--entry-fault-every", type=int, default=0, help="fail every Nth entry transiently")
    parser.add_argument("--md5-fault-every", type=int, default=0, help="wrong MD5OfMessageBody every Nth message")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="answer every request this long after it arrived (0..10000)"
    )
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    context: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    faults = Faults(
        request_every=args.request_fault_every,
        request_error=args.request_fault,
        entry_every=args.entry_fault_every,
        md5_every=args.md5_fault_every,
    )
    endpoint = AwsEndpoint(
        queues=args.queue or DEFAULT_QUEUES,
        buses=args.bus or DEFAULT_BUSES,
        record=args.record,
        record_times=args.record_times,
        faults=faults,
        latency_s=args.latency_ms / 1000,
        ssl_context=context,
    )
    loop = _new_loop()
    try:
        loop.run_until_complete(_serve(endpoint, args.port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
