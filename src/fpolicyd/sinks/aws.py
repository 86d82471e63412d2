"""SQS and EventBridge: encoding, batching, response classification, retries and the thin async senders.

Everything above the "async" section is pure (no I/O, no clock) and tested without AWS:

- :func:`encode_sqs_entry` / :func:`encode_eventbridge_entry` turn one event (the JSON bytes of
  :meth:`FileEvent.to_json`) into one request entry, and :func:`sqs_entry_size` / :func:`eventbridge_entry_size`
  measure an entry the way the service does (rules and sources next to each function).
- :func:`plan_batches` cuts a run of :class:`Item` into :class:`Batch` es within the service limits, and sets
  aside as :class:`Oversize` what can never be sent.
- :func:`classify_sqs` / :func:`classify_eventbridge` split a response into an :class:`Outcome`;
  :func:`error_kind` / :func:`classify_exception` classify a whole-call exception.

The async part is deliberately thin: :class:`AwsClients` (one session, long-lived clients, no SDK retries),
:func:`send_sqs_batch` / :func:`send_eventbridge_batch` (one request, then classify), the health checks
:func:`check_sqs` / :func:`check_eventbridge`, and :func:`deliver`, the retry loop that settles every entry of a
batch as delivered, dead-lettered or still pending: an entry is never dropped.

What "failed" means, in four kinds (one per bucket of :class:`Outcome`):

- *retry*: transient (throttling, 5xx, InternalFailure, connection errors): re-send only those entries after a
  capped, fully jittered backoff;
- *dead*: the service rejected this entry for its content and will again (SQS ``SenderFault=true``, EventBridge
  ``MalformedDetail``/``InvalidArgument``): hand it to the dead-letter callback with the reason;
- *blocked*: the sink itself is unusable (access denied, queue/bus or KMS key missing): nothing about the entry
  is wrong, so it is **not** dead-lettered; :func:`deliver` stops and returns it as pending with a
  non-retriable :class:`SinkError` so the events stay in the spool until an operator fixes the sink;
- a whole request refused for its content (``ValidationException``, ``BatchRequestTooLong``...) is split into
  single-entry requests so that only the offending entry is dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Self

import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import ClientError as AiohttpClientError
from botocore import exceptions as bx
from botocore.exceptions import BotoCoreError, ClientError

from fpolicyd.config import AwsDataPath
from fpolicyd.errors import SinkError
from fpolicyd.events import format_rfc3339_us
from fpolicyd.obs.log import get_logger
from fpolicyd.sinks.aws_transport import LeanUnsupportedError, build_lean_client
from fpolicyd.sinks.runner import RetryPolicy

__all__ = [
    "AWS_RETRY",
    "DEFAULT_EVENTBRIDGE_DETAIL_TYPE",
    "DEFAULT_EVENTBRIDGE_SOURCE",
    "MAX_BATCH_ENTRIES",
    "AwsClients",
    "AwsTarget",
    "Batch",
    "DeadLetter",
    "DeadLetterWriter",
    "DeliveryReport",
    "Entry",
    "ErrorKind",
    "EventBridgeTarget",
    "Item",
    "Outcome",
    "Oversize",
    "RetryPolicy",
    "SendBatch",
    "SqsQueueInfo",
    "SqsTarget",
    "check_eventbridge",
    "check_sqs",
    "classify_eventbridge",
    "classify_exception",
    "classify_sqs",
    "deliver",
    "encode_eventbridge_entry",
    "encode_sqs_entry",
    "error_kind",
    "eventbridge_entry_size",
    "items_of",
    "plan_batches",
    "send_eventbridge_batch",
    "send_sqs_batch",
    "sqs_entry_size",
]

log = get_logger("fpolicyd.sink.aws")

KIB: Final = 1024
MIB: Final = 1024 * 1024
#: SendMessageBatch and PutEvents both take at most 10 entries per request.
MAX_BATCH_ENTRIES: Final = 10
DEFAULT_EVENTBRIDGE_SOURCE: Final = "fsxn.fpolicy"
DEFAULT_EVENTBRIDGE_DETAIL_TYPE: Final = "FPolicy File Operation"
#: Backoff for AWS requests (the runner's RetryPolicy shape; AWS guidance is a longer cap than a local file's).
AWS_RETRY: Final = RetryPolicy(base_s=0.1, cap_s=20.0)

# ------------------------------------------------------------------------------------------ targets


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive number of bytes, got {value!r}")


def _entries_limit(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_ENTRIES:
        raise ValueError(f"max_entries: must be 1..{MAX_BATCH_ENTRIES}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SqsTarget:
    """``sqs:QUEUE_URL``. FIFO is derived from the URL (AWS requires FIFO queue names to end in ``.fifo``).

    ``group_id_field``: the event field whose value is a FIFO message's MessageGroupId (a dotted path such as
    ``metadata.vs_uuid`` reaches into objects); missing or empty falls back to ``svm_name``. Ordering is per
    group, so the default keeps one SVM's events in order while SVMs proceed in parallel.
    """

    queue_url: str
    group_id_field: str = "svm_name"
    max_batch_bytes: int = MIB
    max_message_bytes: int = MIB
    max_entries: int = MAX_BATCH_ENTRIES

    def __post_init__(self) -> None:
        if not self.queue_url or not self.queue_url.strip():
            raise ValueError("queue_url: must not be empty")
        if not self.group_id_field or any(not part for part in self.group_id_field.split(".")):
            raise ValueError(f"group_id_field: expected a field name or dotted path, got {self.group_id_field!r}")
        _positive("max_batch_bytes", self.max_batch_bytes)
        _positive("max_message_bytes", self.max_message_bytes)
        _entries_limit(self.max_entries)

    @property
    def fifo(self) -> bool:
        return self.queue_url.endswith(".fifo")

    @property
    def name(self) -> str:
        return f"sqs:{self.queue_url}"

    @property
    def entry_limit(self) -> int:
        """The largest entry that can be sent: one message alone must also fit a batch."""
        return min(self.max_message_bytes, self.max_batch_bytes)


@dataclass(frozen=True, slots=True)
class EventBridgeTarget:
    """``eventbridge:BUS`` (a bus name or ARN). Source and detail-type default to the reference pipeline's, which
    its rules match on. ``max_entry_bytes`` defaults to 256 KiB, the limit every region had until 2026 (AWS has
    since raised event buses to 1 MiB; raise it when all your buses and their targets take that)."""

    bus_name: str
    source: str = DEFAULT_EVENTBRIDGE_SOURCE
    detail_type: str = DEFAULT_EVENTBRIDGE_DETAIL_TYPE
    max_batch_bytes: int = MIB
    max_entry_bytes: int = 256 * KIB
    max_entries: int = MAX_BATCH_ENTRIES
    #: Set the entry's Time from the event's timestamp (EventBridge keeps whole seconds; ``detail`` keeps µs).
    use_event_time: bool = True

    def __post_init__(self) -> None:
        if not self.bus_name or not self.bus_name.strip():
            raise ValueError("bus_name: must not be empty")
        # PutEventsRequestEntry: Source 1..256 chars, not "aws."-prefixed; DetailType 1..128 chars.
        if not 1 <= len(self.source) <= 256 or self.source.startswith("aws."):
            raise ValueError(f"source: must be 1-256 characters and not start with 'aws.', got {self.source!r}")
        if not 1 <= len(self.detail_type) <= 128:
            raise ValueError(f"detail_type: must be 1-128 characters, got {self.detail_type!r}")
        _positive("max_batch_bytes", self.max_batch_bytes)
        _positive("max_entry_bytes", self.max_entry_bytes)
        _entries_limit(self.max_entries)

    @property
    def name(self) -> str:
        return f"eventbridge:{self.bus_name}"

    @property
    def entry_limit(self) -> int:
        """The largest entry that can be sent: one entry alone must also fit a batch."""
        return min(self.max_entry_bytes, self.max_batch_bytes)


AwsTarget = SqsTarget | EventBridgeTarget

# ------------------------------------------------------------------------------------ items, batches


@dataclass(frozen=True, slots=True)
class Item:
    """One event to send: its JSON (``FileEvent.to_json()``) and the caller's handle for it (e.g. a spool
    position), which is never sent and comes back in every report."""

    event_json: bytes
    ref: object = None


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """An item encoded for one service: ``request`` is the SendMessageBatchRequestEntry (with its batch-local
    ``Id``) or the PutEventsRequestEntry; ``size`` is what the service counts against its limits."""

    item: Item
    request: dict[str, Any]
    size: int


@dataclass(frozen=True, slots=True)
class Batch:
    """At most ``max_entries`` entries, at most ``max_batch_bytes`` in total: one request."""

    entries: tuple[Entry, ...]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class Oversize:
    """An item that can never be sent (over the per-entry limit, or not an event JSON object): dead-letter it."""

    item: Item
    reason: str
    size: int


# ------------------------------------------------------------------------------------------ encoding

# SQS accepts only these characters in a message body and in String attribute values (the XML 1.0 set):
# #x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF (API_SendMessageBatch); anything else is an
# InvalidMessageContents rejection. orjson escapes C0 controls and valid UTF-8 has no surrogates, so the only
# offenders a JSON body can hold are U+FFFE and U+FFFF, and only inside strings, where the \u escape is the same
# JSON value. Attribute values are not JSON, so there they become U+FFFD.
_SQS_BODY_ESCAPES: Final = {"\ufffe": "\\ufffe", "\uffff": "\\uffff"}
_SQS_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# MessageGroupId: 1-128 characters from a-z A-Z 0-9 and ASCII punctuation (API_SendMessageBatchRequestEntry).
_GROUP_ID_OK = re.compile(r"[!-~]{1,128}")


def _sqs_body(event_json: bytes) -> tuple[str, int]:
    """The message body (the event JSON, as text) and its UTF-8 size."""
    text = event_json.decode("utf-8")
    size = len(event_json)
    if "\ufffe" in text or "\uffff" in text:
        for raw, escaped in _SQS_BODY_ESCAPES.items():
            count = text.count(raw)
            if count:
                text = text.replace(raw, escaped)
                size += count * (len(escaped) - len(raw.encode("utf-8")))
    return text, size


def _load_event(event_json: bytes) -> dict[str, Any]:
    event = orjson.loads(event_json)
    if not isinstance(event, dict):
        raise ValueError(f"an event must be a JSON object, got {type(event).__name__}")
    return event


def _field(event: Mapping[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _text(value: Any) -> str:
    if value is None or isinstance(value, bool | dict | list):
        return ""
    return str(value)


def _group_id(event: Mapping[str, Any], path: str) -> str:
    value = _text(_field(event, path)) or _text(event.get("svm_name")) or "default"
    if _GROUP_ID_OK.fullmatch(value):
        return value
    # Not a valid group id (too long, spaces, non-ASCII): a stable stand-in, so one value is still one group.
    return "sha256-" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def _attribute(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": _SQS_INVALID.sub("\ufffd", value)}


def _encode_sqs(
    target: SqsTarget, event_json: bytes, event: Mapping[str, Any], entry_id: str
) -> tuple[dict[str, Any], int]:
    body, size = _sqs_body(event_json)
    attributes: dict[str, dict[str, str]] = {}
    # Empty attribute values are not allowed ("Name, type, value and the message body must not be empty").
    operation = _text(event.get("operation_type"))
    if operation:
        attributes["operation"] = _attribute(operation)
    svm = _text(event.get("svm_name"))
    if svm:
        attributes["svm"] = _attribute(svm)
    routes = _field(event, "metadata.routes")
    if isinstance(routes, list | tuple):
        joined = ",".join(str(r) for r in routes if r is not None and str(r))
        if joined:
            attributes["routes"] = _attribute(joined)
    entry: dict[str, Any] = {"Id": entry_id, "MessageBody": body}
    if attributes:
        entry["MessageAttributes"] = attributes
        size += _attributes_size(attributes)
    if target.fifo:
        entry["MessageGroupId"] = _group_id(event, target.group_id_field)
        event_id = _text(event.get("event_id"))
        entry["MessageDeduplicationId"] = (
            event_id if _GROUP_ID_OK.fullmatch(event_id) else hashlib.sha256(event_json).hexdigest()
        )
    return entry, size


def _attributes_size(attributes: Mapping[str, Mapping[str, Any]]) -> int:
    size = 0
    for name, value in attributes.items():
        size += len(name.encode("utf-8")) + len(str(value.get("DataType", "")).encode("utf-8"))
        if "StringValue" in value:
            size += len(str(value["StringValue"]).encode("utf-8"))
        if "BinaryValue" in value:
            size += len(value["BinaryValue"])
    return size


def encode_sqs_entry(target: SqsTarget, event_json: bytes, entry_id: str) -> dict[str, Any]:
    """One SendMessageBatchRequestEntry.

    ``MessageBody`` is the event JSON exactly as given (the body reference consumers parse), decoded as UTF-8
    text; the one exception is U+FFFE/U+FFFF inside a string, which SQS refuses and which are sent as their
    equivalent ``\\u`` escapes. ``MessageAttributes`` (String): ``operation`` (operation_type), ``svm``
    (svm_name), ``routes`` (``metadata.routes`` comma-joined); each is omitted when empty. FIFO queues also get
    ``MessageGroupId`` (see :class:`SqsTarget`) and ``MessageDeduplicationId`` = ``event_id`` (stable across
    redeliveries, so SQS drops a resend within its 5-minute deduplication interval).
    Raises ``ValueError`` when ``event_json`` is not a UTF-8 JSON object.
    """
    return _encode_sqs(target, event_json, _load_event(event_json), entry_id)[0]


def sqs_entry_size(entry: Mapping[str, Any]) -> int:
    """What SQS counts against the message (and batch) size limit: the body plus, for every message attribute,
    its name, data type and value, in UTF-8 bytes ("All parts of the message attribute, including Name, Type,
    and Value, are part of the message size restriction (1 MiB or 1,048,576 bytes)": SQS API reference,
    MessageAttributeValue; the batch limit is "the sum of the individual lengths of all of the batched
    messages": API_SendMessageBatch). Id, MessageGroupId and MessageDeduplicationId do not count."""
    size = len(str(entry["MessageBody"]).encode("utf-8"))
    return size + _attributes_size(entry.get("MessageAttributes") or {})


def _event_time(event: Mapping[str, Any]) -> datetime | None:
    """The event's ``timestamp`` as an aware datetime, or None when it is not RFC 3339 with a UTC offset."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.astimezone(UTC)


# EventBridge's PutEventsRequestEntry size: "If specified, the Time parameter is 14 bytes. The Source and
# DetailType parameters are the number of bytes for their UTF-8 encoded forms. If specified, the Detail
# parameter is the number of bytes for its UTF-8 encoded form. If specified, each entry of the Resources
# parameter is the number of bytes for its UTF-8 encoded forms." (EventBridge User Guide, "Calculating
# Amazon EventBridge PutEvents event entry size", eb-putevent-size.html). EventBusName does not count.
_EB_TIME_BYTES: Final = 14


def _encode_eventbridge(
    target: EventBridgeTarget, event_json: bytes, event: Mapping[str, Any]
) -> tuple[dict[str, Any], int]:
    entry: dict[str, Any] = {}
    size = 0
    when = _event_time(event) if target.use_event_time else None
    if when is not None:
        entry["Time"] = when
        size += _EB_TIME_BYTES
    entry["Source"] = target.source
    entry["DetailType"] = target.detail_type
    entry["Detail"] = event_json.decode("utf-8")
    entry["EventBusName"] = target.bus_name
    entry["Resources"] = []
    size += len(target.source.encode("utf-8")) + len(target.detail_type.encode("utf-8")) + len(event_json)
    return entry, size


def encode_eventbridge_entry(target: EventBridgeTarget, event_json: bytes) -> dict[str, Any]:
    """One PutEventsRequestEntry: ``Detail`` = the event JSON (so rules match ``detail.operation_type``,
    ``detail.file_path`` as in the reference pipeline), ``Source``/``DetailType`` from the target,
    ``EventBusName``, empty ``Resources``, and ``Time`` = the event's timestamp when it parses (the envelope's
    ``time`` then says when the file operation happened, not when it was forwarded; EventBridge keeps whole
    seconds, ``detail.timestamp`` keeps the microseconds). Raises ``ValueError`` for a non-object."""
    return _encode_eventbridge(target, event_json, _load_event(event_json))[0]


def eventbridge_entry_size(entry: Mapping[str, Any]) -> int:
    """PutEventsRequestEntry size by EventBridge's documented rule (see ``_EB_TIME_BYTES``)."""
    size = _EB_TIME_BYTES if entry.get("Time") is not None else 0
    size += len(str(entry["Source"]).encode("utf-8")) + len(str(entry["DetailType"]).encode("utf-8"))
    if entry.get("Detail") is not None:
        size += len(str(entry["Detail"]).encode("utf-8"))
    for resource in entry.get("Resources") or ():
        if resource is not None:
            size += len(str(resource).encode("utf-8"))
    return size


def _encode(target: AwsTarget, item: Item, entry_id: str) -> tuple[dict[str, Any], int]:
    event = _load_event(item.event_json)
    if isinstance(target, SqsTarget):
        return _encode_sqs(target, item.event_json, event, entry_id)
    return _encode_eventbridge(target, item.event_json, event)


def plan_batches(items: Iterable[Item], target: AwsTarget) -> list[Batch | Oversize]:
    """Cut ``items`` into batches: each at most ``target.max_entries`` entries and ``target.max_batch_bytes``
    (sum of entry sizes). An item over ``target.entry_limit``, or one that is not a UTF-8 JSON object, comes
    back in its place as :class:`Oversize` and is never sent. Strictly order-preserving (the plan, flattened, is
    ``items``): greedy, a batch is closed when the next entry would not fit or an :class:`Oversize` comes
    between. SQS entry ids are the position in the batch (unique within it, as SendMessageBatch requires, even
    if one event repeats)."""
    plan: list[Batch | Oversize] = []
    current: list[Entry] = []
    current_bytes = 0
    entry_limit = target.entry_limit

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            plan.append(Batch(tuple(current)))
            current, current_bytes = [], 0

    for item in items:
        try:
            request, size = _encode(target, item, "0")
        except ValueError as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
            close()
            plan.append(Oversize(item, f"not an event JSON object: {exc}", len(item.event_json)))
            continue
        if size > entry_limit:
            close()
            plan.append(
                Oversize(item, f"entry is {size} bytes, over the {entry_limit}-byte limit of {target.name}", size)
            )
            continue
        if len(current) >= target.max_entries or current_bytes + size > target.max_batch_bytes:
            close()
        if isinstance(target, SqsTarget):
            request["Id"] = str(len(current))
        current.append(Entry(item, request, size))
        current_bytes += size
    close()
    return plan


# ------------------------------------------------------------------------------------ classification


class ErrorKind(StrEnum):
    """What a failure says about what to do next (see the module docstring)."""

    RETRY = "retry"  # transient: send again later
    REQUEST = "request"  # this request's content was refused: isolate and dead-letter the culprit
    SINK = "sink"  # the sink is unusable (auth, missing queue/bus): keep the events, report, stop


# Throttling and transient codes: botocore's standard retry mode lists (botocore/retries/standard.py) plus the
# SQS, KMS and EventBridge codes documented as retryable.
_RETRY_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "InternalServiceError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "KmsThrottled",
        "KMS.ThrottlingException",
        # botocore refreshes temporary credentials; the next attempt signs with fresh ones.
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
    }
)
# Errors about the sink, not the entry: no resend of the same request will work until someone fixes the set-up,
# and dead-lettering would only empty the spool into a file.
_SINK_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "NonExistentQueue",
        "QueueDoesNotExist",
        "ResourceNotFoundException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
        "IncompleteSignature",
        "OptInRequired",
        "NotAuthorized",
        "KmsAccessDenied",
        "KmsDisabled",
        "KmsNotFound",
        "KmsInvalidState",
        "KmsOptInRequired",
        "KmsInvalidKeyUsage",
        "NotAuthorizedForSourceException",
        "NotAuthorizedForDetailTypeException",
        "InvalidAccountIdException",
        "UnsupportedOperation",
    }
)
_SQS_CODE_PREFIX: Final = "AWS.SimpleQueueService."


def _normal_code(code: object) -> str:
    text = str(code or "")
    return text.removeprefix(_SQS_CODE_PREFIX)


def _client_error_kind(response: Mapping[str, Any]) -> ErrorKind:
    error = response.get("Error") or {}
    code = _normal_code(error.get("Code"))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _RETRY_CODES:
        return ErrorKind.RETRY
    if code in _SINK_CODES:
        return ErrorKind.SINK
    if isinstance(status, int) and (status >= 500 or status == 429):
        return ErrorKind.RETRY
    if status in (401, 403):
        return ErrorKind.SINK
    return ErrorKind.REQUEST


def error_kind(exc: BaseException) -> ErrorKind:
    """Classify an exception raised by one SQS/EventBridge call.

    botocore ``ClientError``: throttling/transient codes, HTTP 5xx and 429 → RETRY; access and missing-resource
    codes (AccessDenied, NonExistentQueue, ResourceNotFoundException, KMS key problems...) → SINK; any other
    4xx (ValidationException, InvalidParameterValue, BatchRequestTooLong, ...) → REQUEST. Transport failures
    (botocore's ConnectionError/HTTPClientError family: EndpointConnectionError, ConnectionClosedError,
    ReadTimeoutError, ...), aiohttp errors, timeouts and ``OSError`` → RETRY. Credential look-up failures:
    ``CredentialRetrievalError`` → RETRY (a metadata endpoint hiccup), ``NoCredentialsError``/``NoRegionError``
    → SINK. ``ParamValidationError`` (botocore refused the request before sending) → REQUEST. Anything else is
    not an AWS failure: SINK, so that :func:`deliver` stops and keeps the events rather than guessing.
    """
    if isinstance(exc, bx.ClientError):
        return _client_error_kind(exc.response)
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.CredentialRetrievalError):
        return ErrorKind.RETRY
    if isinstance(exc, bx.ParamValidationError):
        return ErrorKind.REQUEST
    if isinstance(exc, bx.NoCredentialsError | bx.NoRegionError | bx.PartialCredentialsError):
        return ErrorKind.SINK
    if isinstance(exc, AiohttpClientError | TimeoutError | OSError):
        return ErrorKind.RETRY
    return ErrorKind.SINK


def classify_exception(exc: BaseException) -> bool:
    """Whether a whole-call failure is worth retrying (see :func:`error_kind`)."""
    return error_kind(exc) is ErrorKind.RETRY


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return f"{error.get('Code', 'Unknown')}: {error.get('Message', '')} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request went, entry by entry. Every entry of the request is in exactly one bucket; each failure
    carries its reason (service code and message)."""

    succeeded: tuple[Entry, ...] = ()
    retry: tuple[tuple[Entry, str], ...] = ()
    dead: tuple[tuple[Entry, str], ...] = ()
    blocked: tuple[tuple[Entry, str], ...] = ()


def _entry_failure(code: str, message: str) -> str:
    return f"{code}: {message}" if message else code


def classify_sqs(response: Mapping[str, Any], batch: Batch) -> Outcome:
    """SendMessageBatch response → :class:`Outcome`, matched by entry Id.

    ``Successful[]`` → succeeded. ``Failed[]``: a retryable code (throttling, internal errors) or
    ``SenderFault=false`` → retry; a sink-level code (KMS key or access problems) → blocked; any other
    ``SenderFault=true`` → dead with ``"Code: Message"``. An entry in neither list → retry (defensive: the
    service did not say, so send it again; at-least-once).
    """
    by_id = {str(e.request["Id"]): e for e in batch.entries}
    settled: set[str] = set()
    succeeded: list[Entry] = []
    retry: list[tuple[Entry, str]] = []
    dead: list[tuple[Entry, str]] = []
    blocked: list[tuple[Entry, str]] = []
    for ok in response.get("Successful") or ():
        entry_id = str(ok.get("Id"))
        entry = by_id.get(entry_id)
        if entry is not None and entry_id not in settled:
            settled.add(entry_id)
            succeeded.append(entry)
    for failed in response.get("Failed") or ():
        entry_id = str(failed.get("Id"))
        entry = by_id.get(entry_id)
        if entry is None or entry_id in settled:
            continue
        settled.add(entry_id)
        code = _normal_code(failed.get("Code"))
        reason = _entry_failure(code or "Unknown", str(failed.get("Message") or ""))
        if code in _RETRY_CODES or not failed.get("SenderFault", False):
            retry.append((entry, reason))
        elif code in _SINK_CODES:
            blocked.append((entry, reason))
        else:
            dead.append((entry, reason))
    for entry_id, entry in by_id.items():
        if entry_id not in settled:
            retry.append((entry, "missing from the SendMessageBatch response"))
    return Outcome(tuple(succeeded), tuple(retry), tuple(dead), tuple(blocked))


def classify_eventbridge(response: Mapping[str, Any], batch: Batch) -> Outcome:
    """PutEvents response → :class:`Outcome`. ``Entries[i]`` answers request entry ``i`` (EventBridge: "the
    response Entries array always includes the same number of entries as the request array").

    ``EventId`` without ``ErrorCode`` → succeeded; ``InternalFailure``/``ThrottlingException`` (the documented
    retryable codes) → retry; access codes (``AccessDeniedException``, ``NotAuthorizedForSourceException``,
    ``NotAuthorizedForDetailTypeException``, ``InvalidAccountIdException``) → blocked; any other code
    (``InvalidArgument``, ``MalformedDetail``, ...) → dead. A response whose length does not match the request
    cannot be aligned: every entry is retried (duplicates are possible; loss is not).
    """
    results = list(response.get("Entries") or ())
    if len(results) != len(batch.entries):
        reason = f"PutEvents answered {len(results)} entries for {len(batch.entries)} sent"
        return Outcome(retry=tuple((e, reason) for e in batch.entries))
    succeeded: list[Entry] = []
    retry: list[tuple[Entry, str]] = []
    dead: list[tuple[Entry, str]] = []
    blocked: list[tuple[Entry, str]] = []
    for entry, result in zip(batch.entries, results, strict=True):
        code = str(result.get("ErrorCode") or "")
        if not code:
            if result.get("EventId"):
                succeeded.append(entry)
            else:
                retry.append((entry, "neither EventId nor ErrorCode in the PutEvents response"))
            continue
        reason = _entry_failure(code, str(result.get("ErrorMessage") or ""))
        if code in _RETRY_CODES:
            retry.append((entry, reason))
        elif code in _SINK_CODES:
            blocked.append((entry, reason))
        else:
            dead.append((entry, reason))
    return Outcome(tuple(succeeded), tuple(retry), tuple(dead), tuple(blocked))


# ---------------------------------------------------------------------------------------- dead letter


class DeadLetterWriter:
    """Appends one JSON line per permanently failed event: ``{"time", "sink", "reason", "event"}``.

    ``event`` is the event object itself (or ``event_raw_b64`` when the bytes are not JSON). The file is opened
    with ``O_APPEND`` and each record goes out in one ``write`` (writers never interleave within a line); a
    write that fails midway (disk full) is cut back, so the file never holds a torn line (the cut assumes one
    process per file, as with every fpolicyd data file). Data reaches the kernel
    before :meth:`write` returns; :meth:`close` fsyncs. Every record is logged (event id and reason, not the
    path: paths may be confidential) and counted in :attr:`written`. Thread-safe.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.written = 0

    def open(self) -> Self:
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, event_json: bytes, *, sink: str, reason: str) -> None:
        """Append one record. Raises ``SinkError`` (retriable) when the file cannot take it."""
        record: dict[str, Any] = {
            "time": format_rfc3339_us(int(self._clock() * 1_000_000)),
            "sink": sink,
            "reason": reason,
        }
        event_id: object = None
        try:
            event = orjson.loads(event_json)
            record["event"] = event
            if isinstance(event, dict):
                event_id = event.get("event_id")
        except orjson.JSONDecodeError:
            record["event_raw_b64"] = base64.b64encode(event_json).decode("ascii")
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            if self._fd is None:
                raise SinkError(f"dead-letter file {self.path} is not open", retriable=False)
            self._append(self._fd, line)
            self.written += 1
        log.warning("event_dead_lettered", sink=sink, reason=reason, event_id=event_id, file=str(self.path))

    def _append(self, fd: int, line: bytes) -> None:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise SinkError(f"dead-letter file {self.path}: {exc}", retriable=True) from exc

    def for_sink(self, sink: str) -> Callable[[Item, str], None]:
        """The ``dead_letter`` callback :func:`deliver` takes, for one sink."""

        def dead_letter(item: Item, reason: str) -> None:
            self.write(item.event_json, sink=sink, reason=reason)

        return dead_letter

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------------------------- async


class AwsClients:
    """One aiobotocore session and one long-lived client per service, created on first use.

    By default everything comes from the standard AWS environment: region (``AWS_REGION``/
    ``AWS_DEFAULT_REGION``/profile), the credential chain (env, profile, ECS task role, EC2 instance profile)
    and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_SQS``/``AWS_ENDPOINT_URL_EVENTBRIDGE`` (botocore reads these
    itself). ``endpoint_url``/``region_name`` override them (tests, VPC endpoints).

    SDK retries are off (``total_max_attempts=1``): :func:`deliver` retries, and only the entries that failed,
    within the caller's deadline and with every attempt counted. botocore's own retries would re-send whole
    batches invisibly (3 attempts by default, multiplied by ours), hide throttling from the metrics and stretch a
    drain past its budget.

    :meth:`data_client` hands out the client for the data path (SendMessageBatch, PutEvents): with ``data_path``
    lean (the default) a :class:`~fpolicyd.sinks.aws_transport.LeanAwsClient` built from the SDK client (same
    endpoint, credentials, timeouts, pool size; 6-8x less CPU per request), with ``sdk`` the SDK client itself.
    If the lean path cannot serve this set-up (a proxy, SigV4a...) the SDK client is used and a warning logged.
    Control calls (:meth:`client`) are always the SDK's.
    """

    def __init__(
        self,
        *,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        max_pool_connections: int = 10,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        data_path: AwsDataPath = AwsDataPath.LEAN,
    ) -> None:
        self._session = get_session()
        self._region_name = region_name
        self._endpoint_url = endpoint_url
        self._max_pool_connections = max_pool_connections
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self.data_path = AwsDataPath(data_path)
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[str, Any] = {}
        self._data_clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _config(self) -> Any:
        return AioConfig(
            max_pool_connections=self._max_pool_connections,
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )

    async def client(self, service: str) -> Any:
        """The process-wide client for ``service`` (``"sqs"`` or ``"events"``)."""
        found = self._clients.get(service)
        if found is not None:
            return found
        async with self._lock:
            found = self._clients.get(service)
            if found is not None:
                return found
            if self._closed:
                raise SinkError("AWS clients are closed", retriable=False)
            kwargs: dict[str, Any] = {"config": self._config()}
            if self._region_name:
                kwargs["region_name"] = self._region_name
            if self._endpoint_url:
                kwargs["endpoint_url"] = self._endpoint_url
            try:
                made = await self._stack.enter_async_context(self._session.create_client(service, **kwargs))
            except BotoCoreError as exc:  # NoRegionError, bad endpoint URL, ...
                raise SinkError(f"cannot create the {service} client: {exc}", retriable=False) from exc
            self._clients[service] = made
            return made

    async def credentials(self) -> Any:
        """The session's credentials: the object every SDK client of this session signs with (refreshable when
        they come from a task role or instance profile), or None when the chain found none."""
        try:
            return await self._session.get_credentials()
        except BotoCoreError as exc:
            raise SinkError(f"cannot load AWS credentials: {exc}", retriable=True) from exc

    async def data_client(self, service: str) -> Any:
        """The client for ``service``'s data-path calls (``send_message_batch`` for ``"sqs"``, ``put_events``
        for ``"events"``): lean or SDK, see the class docstring."""
        found = self._data_clients.get(service)
        if found is not None:
            return found
        sdk = await self.client(service)
        if self.data_path is AwsDataPath.SDK:
            self._data_clients[service] = sdk
            return sdk
        credentials = await self.credentials()
        async with self._lock:
            found = self._data_clients.get(service)
            if found is not None:
                return found
            if self._closed:
                raise SinkError("AWS clients are closed", retriable=False)
            try:
                lean = await build_lean_client(
                    sdk,
                    credentials,
                    user_agent=f"{self._session.user_agent()} fpolicyd-lean",
                    max_connections=self._max_pool_connections,
                    connect_timeout_s=self._connect_timeout_s,
                    read_timeout_s=self._read_timeout_s,
                )
            except LeanUnsupportedError as exc:
                log.warning("aws_lean_data_path_unavailable", service=service, reason=str(exc), using="sdk")
                self._data_clients[service] = sdk
                return sdk
            except BotoCoreError as exc:  # NoRegionError, an endpoint the ruleset refuses, ...
                raise SinkError(f"cannot set up the {service} data path: {exc}", retriable=False) from exc
            self._stack.push_async_callback(lean.close)
            self._data_clients[service] = lean
            return lean

    async def sqs(self) -> Any:
        return await self.client("sqs")

    async def events(self) -> Any:
        return await self.client("events")

    async def sqs_data(self) -> Any:
        return await self.data_client("sqs")

    async def events_data(self) -> Any:
        return await self.data_client("events")

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            self._clients.clear()
            self._data_clients.clear()
            await self._stack.aclose()


async def send_sqs_batch(client: Any, target: SqsTarget, batch: Batch) -> Outcome:
    """One SendMessageBatch on ``client`` (:meth:`AwsClients.data_client`: the lean client or the SDK's; both
    take the same arguments and answer alike). Whole-call failures raise (classify them with
    :func:`error_kind`)."""
    response = await client.send_message_batch(QueueUrl=target.queue_url, Entries=[e.request for e in batch.entries])
    return classify_sqs(response, batch)


async def send_eventbridge_batch(client: Any, target: EventBridgeTarget, batch: Batch) -> Outcome:
    """One PutEvents on ``client`` (:meth:`AwsClients.data_client`, lean or SDK, as for
    :func:`send_sqs_batch`). Whole-call failures raise (classify them with :func:`error_kind`)."""
    response = await client.put_events(Entries=[e.request for e in batch.entries])
    return classify_eventbridge(response, batch)


@dataclass(frozen=True, slots=True)
class SqsQueueInfo:
    arn: str
    fifo: bool
    #: The queue's MaximumMessageSize: a message over it is rejected even within the API limit.
    max_message_bytes: int


def _check_failure(what: str, exc: Exception) -> SinkError:
    kind = error_kind(exc)
    return SinkError(f"{what}: {_describe(exc)}", retriable=kind is ErrorKind.RETRY)


async def check_sqs(client: Any, target: SqsTarget) -> SqsQueueInfo:
    """Health check at start: the queue exists and is what the URL says (FIFO or standard).
    Raises ``SinkError(retriable=False)`` for a missing queue or denied access; ``retriable=True`` when the
    endpoint could not be reached."""
    try:
        response = await client.get_queue_attributes(
            QueueUrl=target.queue_url, AttributeNames=["QueueArn", "FifoQueue", "MaximumMessageSize"]
        )
    except ClientError as exc:
        code = _normal_code((exc.response.get("Error") or {}).get("Code"))
        if code in ("QueueDoesNotExist", "NonExistentQueue"):
            raise SinkError(
                f"{target.name}: the queue does not exist (or is in another region/account): {_describe(exc)}",
                retriable=False,
            ) from exc
        raise _check_failure(f"{target.name}: GetQueueAttributes failed", exc) from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise _check_failure(f"{target.name}: GetQueueAttributes failed", exc) from exc
    attributes = response.get("Attributes") or {}
    fifo = str(attributes.get("FifoQueue", "false")).lower() == "true"
    if fifo != target.fifo:
        kind = "a FIFO" if fifo else "a standard"
        raise SinkError(f"{target.name}: the queue is {kind} queue, the URL says otherwise", retriable=False)
    return SqsQueueInfo(
        arn=str(attributes.get("QueueArn", "")),
        fifo=fifo,
        max_message_bytes=int(attributes.get("MaximumMessageSize", MIB)),
    )


async def check_eventbridge(client: Any, target: EventBridgeTarget) -> str:
    """Health check at start: the bus exists (DescribeEventBus). Returns its ARN. Raises
    ``SinkError(retriable=False)`` for a missing bus or denied access."""
    try:
        response = await client.describe_event_bus(Name=target.bus_name)
    except ClientError as exc:
        code = _normal_code((exc.response.get("Error") or {}).get("Code"))
        if code == "ResourceNotFoundException":
            raise SinkError(
                f"{target.name}: the event bus does not exist (or is in another region/account): {_describe(exc)}",
                retriable=False,
            ) from exc
        raise _check_failure(f"{target.name}: DescribeEventBus failed", exc) from exc
    except (BotoCoreError, OSError, TimeoutError) as exc:
        raise _check_failure(f"{target.name}: DescribeEventBus failed", exc) from exc
    return str(response.get("Arn", ""))


# ----------------------------------------------------------------------------------------- delivery

SendBatch = Callable[[Batch], Awaitable[Outcome]]
DeadLetter = Callable[[Item, str], None]


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """Where every entry of a delivered batch ended up: each is in exactly one of ``delivered``, ``dead``
    (handed to the dead-letter callback, with the reason) or ``pending`` (not settled: keep it, send it later).
    ``error`` says why ``pending`` is not empty: retriable when the deadline ran out during a transient
    failure, not retriable when the sink is unusable (access, missing queue/bus) and retrying now is futile."""

    delivered: tuple[Entry, ...]
    dead: tuple[tuple[Entry, str], ...]
    pending: tuple[Entry, ...]
    requests: int
    retried_entries: int
    error: SinkError | None = None
    #: Requests that re-sent entries after a retriable failure (the retry rounds).
    retry_requests: int = 0

    @property
    def settled(self) -> bool:
        return not self.pending


@dataclass(slots=True)
class _Delivery:
    dead_letter: DeadLetter
    name: str
    delivered: list[Entry] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    parked: list[Entry] = field(default_factory=list)
    error: SinkError | None = None

    def bury(self, entry: Entry, reason: str) -> None:
        try:
            self.dead_letter(entry.item, reason)
        except (SinkError, OSError) as exc:
            # The dead-letter file could not take it: keep the entry pending rather than lose it.
            self.parked.append(entry)
            self.error = SinkError(f"{self.name}: dead-letter write failed: {exc}", retriable=True)
            log.error("dead_letter_failed", sink=self.name, reason=reason, error=str(exc))
        else:
            self.dead.append((entry, reason))


async def deliver(
    batch: Batch,
    send: SendBatch,
    policy: RetryPolicy,
    rng: random.Random,
    dead_letter: DeadLetter,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    name: str = "aws",
) -> DeliveryReport:
    """Send ``batch`` until every entry is settled or ``deadline`` (on ``clock``) passes.

    Each round sends one request and classifies it (:class:`Outcome`): succeeded entries are done, dead ones
    go to ``dead_letter(item, reason)``, retry ones are sent again (only they) after ``policy.delay(n, rng)``
    with ``n`` the number of retry rounds so far; blocked ones, or a whole-call SINK error, stop the delivery
    with a non-retriable ``error`` and leave the rest pending. A whole request refused for its content
    (REQUEST) is split into one request per entry, so only the culprit is dead-lettered. A wait that would end
    past ``deadline`` is not started: what is unsettled then comes back as ``pending``, never dropped.
    """
    state = _Delivery(dead_letter, name)
    queue: deque[Batch] = deque([batch])
    requests = retried = rounds = 0
    pending_error: SinkError | None = None
    while queue:
        current = queue.popleft()
        if deadline is not None and clock() >= deadline:
            queue.appendleft(current)
            break
        requests += 1
        try:
            outcome = await send(current)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind = error_kind(exc)
            reason = _describe(exc)
            if kind is ErrorKind.RETRY:
                outcome = Outcome(retry=tuple((e, reason) for e in current.entries))
            elif kind is ErrorKind.REQUEST and len(current.entries) > 1:
                log.warning("aws_request_refused_splitting", sink=name, entries=len(current.entries), error=reason)
                queue.extendleft(reversed([Batch((e,)) for e in current.entries]))
                continue
            elif kind is ErrorKind.REQUEST:
                outcome = Outcome(dead=((current.entries[0], reason),))
            else:
                log.error(
                    "aws_sink_unusable",
                    sink=name,
                    error=reason,
                    exc_info=not isinstance(exc, BotoCoreError | ClientError),
                )
                outcome = Outcome(blocked=tuple((e, reason) for e in current.entries))
        state.delivered.extend(outcome.succeeded)
        for entry, reason in outcome.dead:
            state.bury(entry, reason)
        if outcome.blocked:
            state.parked.extend(e for e, _ in outcome.blocked)
            state.parked.extend(e for e, _ in outcome.retry)
            state.error = SinkError(f"{name}: {outcome.blocked[0][1]}", retriable=False)
            break
        if outcome.retry:
            retry_batch = Batch(tuple(e for e, _ in outcome.retry))
            pending_error = SinkError(f"{name}: {outcome.retry[0][1]}", retriable=True)
            delay = policy.delay(rounds, rng)
            rounds += 1
            retried += len(retry_batch)
            log.warning(
                "aws_entries_retrying",
                sink=name,
                entries=len(retry_batch),
                reason=outcome.retry[0][1],
                retry_in_s=round(delay, 3),
                round=rounds,
            )
            queue.append(retry_batch)
            if deadline is not None and clock() + delay >= deadline:
                break
            await sleep(delay)
    pending = list(state.parked)
    for left in queue:
        pending.extend(left.entries)
    error = state.error
    if pending and error is None:
        error = pending_error or SinkError(f"{name}: deadline passed", retriable=True)
    return DeliveryReport(
        delivered=tuple(state.delivered),
        dead=tuple(state.dead),
        pending=tuple(pending),
        requests=requests,
        retried_entries=retried,
        error=error if pending else None,
        retry_requests=rounds,
    )


def items_of(entries: Sequence[Entry]) -> list[Item]:
    """The items behind ``entries`` (e.g. a report's ``pending``, to plan them again later)."""
    return [e.item for e in entries]
