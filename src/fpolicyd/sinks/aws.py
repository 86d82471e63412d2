"""SQS and EventBridge: encoding, batching, response classification, retries and the thin async senders.

Everything above the "async" section is pure (no I/O, no clock) and tested without AWS:

- :func:`encode_sqs_entry` / :func:`encode_eventbridge_entry` turn one event (the JSON bytes of
  :meth:`FileEvent.to_json`) into one request entry, and :func:`sqs_entry_size` / :func:`eventbridge_entry_size`
  measure an entry the way the service does (rules and sources next to each function).
- :func:`plan_batches` cuts a run of :class:`Item` into :class:`Batch` es within the service limits, and sets
  aside as :class:`Oversize` what can never be sent; with ``SqsTarget.pack_bytes`` it first packs many events
  into each SQS message (:func:`pack_sqs_entries`, envelope in :mod:`fpolicyd.sinks.sqs_envelope`).
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
import bisect
import contextlib
import hashlib
import itertools
import random
import re
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Self

import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import ClientError as AiohttpClientError
from botocore import exceptions as bx
from botocore.exceptions import BotoCoreError, ClientError

from fpolicyd.config import AwsDataPath
from fpolicyd.errors import SinkError
from fpolicyd.obs.log import get_logger
from fpolicyd.sinks.aws_transport import LeanUnsupportedError, build_lean_client
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.runner import RetryPolicy
from fpolicyd.sinks.sqs_envelope import PackCompression, pack_attributes

__all__ = [
    "AWS_RETRY",
    "DEFAULT_EVENTBRIDGE_DETAIL_TYPE",
    "DEFAULT_EVENTBRIDGE_SOURCE",
    "MAX_BATCH_ENTRIES",
    "PACK_GZIP_LEVEL",
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
    "batch_entries",
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
    "pack_sqs_entries",
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
#: zlib level of gzip-packed SQS messages. Measured on simulator events (benchmarks/bench_sqs_pack.py): level 1
#: gives ~180 bytes of base64 per ~1 KB event, ~0.0027 billed requests per event; level 6 ~0.0020 for ~7 µs
#: more CPU per event. Both are far under the 0.01 goal, so the CPU decides.
PACK_GZIP_LEVEL: Final = 1
#: First guess, per packing plan, of base64-of-gzip bytes per byte of event JSON; each message then sizes the
#: next by what it measured. Level 1 measures ~0.18 on simulator events; the guess is pessimistic, so a first
#: message that compresses as expected is refilled once (``PACK_GZIP_REFILL``) rather than found too big.
PACK_GZIP_FIRST_RATIO: Final = 0.25
#: Share of the pack limit a gzip message is planned to fill from that estimate: the ratio varies a few percent
#: between messages; a message found over the limit costs a second compression, an unused 5 % costs nothing
#: (billing rounds whole requests, not messages, up to 64 KiB).
PACK_GZIP_FILL: Final = 0.95
#: A gzip message that fits but fills less than this share of the limit, with more events waiting, is planned
#: once more with the measured ratio (at most once per message, so a message costs at most ~2 compressions
#: unless it overflows).
PACK_GZIP_REFILL: Final = 0.8
#: Compressions tried for one message by ratio estimates before falling back to halving the candidate (which
#: bounds the work on data whose compression varies wildly).
PACK_GZIP_ESTIMATES: Final = 4
#: zlib's wbits for a gzip stream (header and CRC-32 trailer) with a 32 KiB window: 16 + MAX_WBITS.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS

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

    ``pack_bytes``: 0 = one event per message; otherwise several events go into one packed message (see
    :mod:`fpolicyd.sinks.sqs_envelope`) of at most :attr:`pack_limit` bytes, its array carried as
    ``pack_compression`` says, gzip at ``pack_gzip_level``.
    """

    queue_url: str
    group_id_field: str = "svm_name"
    max_batch_bytes: int = MIB
    max_message_bytes: int = MIB
    max_entries: int = MAX_BATCH_ENTRIES
    pack_bytes: int = 0
    pack_compression: PackCompression = PackCompression.GZIP
    pack_gzip_level: int = PACK_GZIP_LEVEL

    def __post_init__(self) -> None:
        if not self.queue_url or not self.queue_url.strip():
            raise ValueError("queue_url: must not be empty")
        if not self.group_id_field or any(not part for part in self.group_id_field.split(".")):
            raise ValueError(f"group_id_field: expected a field name or dotted path, got {self.group_id_field!r}")
        _positive("max_batch_bytes", self.max_batch_bytes)
        _positive("max_message_bytes", self.max_message_bytes)
        _entries_limit(self.max_entries)
        if self.pack_bytes:
            _positive("pack_bytes", self.pack_bytes)
        if not isinstance(self.pack_compression, PackCompression):
            raise ValueError(f"pack_compression: expected one of {[c.value for c in PackCompression]}")
        if not 1 <= self.pack_gzip_level <= 9:  # zlib's levels
            raise ValueError(f"pack_gzip_level: must be 1..9, got {self.pack_gzip_level!r}")

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

    @property
    def packing(self) -> bool:
        return self.pack_bytes > 0

    @property
    def pack_limit(self) -> int:
        """The largest packed message: ``pack_bytes``, within what any message may be."""
        return min(self.pack_bytes, self.entry_limit)


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
    ``Id``) or the PutEventsRequestEntry; ``size`` is what the service counts against its limits.

    A packed SQS message carries several items: ``packed`` holds them all, in order (``item`` is the first);
    it is empty for a one-event entry. :attr:`items` is what the entry carries either way."""

    item: Item
    request: dict[str, Any]
    size: int
    packed: tuple[Item, ...] = ()

    @property
    def items(self) -> tuple[Item, ...]:
        return self.packed or (self.item,)


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


def _single(target: AwsTarget, item: Item, event: dict[str, Any] | None = None) -> Entry | Oversize:
    """``item`` as a one-event entry, or :class:`Oversize` when it is not a JSON object or over the entry limit."""
    try:
        if event is None:
            event = _load_event(item.event_json)
        if isinstance(target, SqsTarget):
            request, size = _encode_sqs(target, item.event_json, event, "0")
        else:
            request, size = _encode_eventbridge(target, item.event_json, event)
    except ValueError as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Oversize(item, f"not an event JSON object: {exc}", len(item.event_json))
    limit = target.entry_limit
    if size > limit:
        return Oversize(item, f"entry is {size} bytes, over the {limit}-byte limit of {target.name}", size)
    return Entry(item, request, size)


def plan_batches(items: Iterable[Item], target: AwsTarget) -> list[Batch | Oversize]:
    """Cut ``items`` into batches: each at most ``target.max_entries`` entries and ``target.max_batch_bytes``
    (sum of entry sizes). An item over ``target.entry_limit``, or one that is not a UTF-8 JSON object, comes
    back in its place as :class:`Oversize` and is never sent. Strictly order-preserving (the plan, flattened, is
    ``items``): greedy, a batch is closed when the next entry would not fit or an :class:`Oversize` comes
    between. SQS entry ids are the position in the batch (unique within it, as SendMessageBatch requires, even
    if one event repeats).

    An SQS target with ``pack_bytes`` first packs the items into messages (:func:`pack_sqs_entries`); then the
    flattened plan is ``items`` on a standard queue, and on a FIFO queue each message group's items in order."""
    if isinstance(target, SqsTarget) and target.packing:
        return batch_entries(pack_sqs_entries(items, target), target)
    return batch_entries((_single(target, item) for item in items), target)


def batch_entries(steps: Iterable[Entry | Oversize], target: AwsTarget) -> list[Batch | Oversize]:
    """Greedy batching of already encoded entries, in order (see :func:`plan_batches`); an :class:`Oversize`
    closes the batch before it and stays in its place. Sets each SQS entry's ``Id`` to its batch position."""
    plan: list[Batch | Oversize] = []
    current: list[Entry] = []
    current_bytes = 0
    sqs = isinstance(target, SqsTarget)
    for step in steps:
        if isinstance(step, Oversize):
            if current:
                plan.append(Batch(tuple(current)))
                current, current_bytes = [], 0
            plan.append(step)
            continue
        if current and (len(current) >= target.max_entries or current_bytes + step.size > target.max_batch_bytes):
            plan.append(Batch(tuple(current)))
            current, current_bytes = [], 0
        if sqs:
            step.request["Id"] = str(len(current))
        current.append(step)
        current_bytes += step.size
    if current:
        plan.append(Batch(tuple(current)))
    return plan


# ----------------------------------------------------------------------------------- packed SQS messages

#: The array's "[" and "]".
_PACK_FRAME: Final = 2


#: What a packed message's attributes count, but for the digits of fpolicyd-count (computed once: this is
#: asked for every event added to a message).
_PACK_ATTRIBUTES_BYTES: Final = {c: _attributes_size(pack_attributes(0, c)) - 1 for c in PackCompression}


def _pack_attributes_size(count: int, compression: PackCompression) -> int:
    return _PACK_ATTRIBUTES_BYTES[compression] + len(str(count))


@dataclass(frozen=True, slots=True)
class _Piece:
    """An event that may share a message: its item, its message group (FIFO queues; "" otherwise) and what it
    adds to the array, without the comma: ``size`` bytes, the SQS-safe JSON ``text`` for an uncompressed array,
    the event JSON itself for gzip. The parsed event is not kept: holding thousands of parsed events alive made
    the garbage collector's passes cost more than the parse (measured: 4 µs per event parsed, 10 µs kept)."""

    item: Item
    group: str
    text: str
    size: int


def pack_sqs_entries(items: Iterable[Item], target: SqsTarget) -> Iterator[Entry | Oversize]:
    """The SQS entries of ``items`` with several events per message (``target.pack_bytes`` > 0).

    Consecutive events share a message while it stays within ``target.pack_limit`` (body plus attributes, as
    :func:`sqs_entry_size` counts). An event is never split: one whose JSON alone does not fit a packed message
    is sent alone as a one-event message (:class:`Oversize` if even that is over ``entry_limit``), and so is an
    event that ends up alone in a message. On a FIFO queue a message holds events of one message group only:
    the items are taken group by group (groups in order of first appearance, each group's events in order).
    The envelope is described in :mod:`fpolicyd.sinks.sqs_envelope`; a packed FIFO message's
    MessageDeduplicationId is the SHA-256 of its uncompressed array, so a resend of the same message is
    deduplicated by SQS.
    """
    compression = target.pack_compression
    gzip = compression is PackCompression.GZIP
    # The largest event that still fits a packed message with no other event.
    room = target.pack_limit - _PACK_FRAME - _pack_attributes_size(1, compression)
    runs: dict[str | None, list[_Piece | Entry | Oversize]] = {}
    for item in items:
        try:
            event = _load_event(item.event_json)
            text, size = ("", len(item.event_json)) if gzip else _sqs_body(item.event_json)
        except ValueError as exc:
            key = None if target.fifo else ""
            runs.setdefault(key, []).append(Oversize(item, f"not an event JSON object: {exc}", len(item.event_json)))
            continue
        key = _group_id(event, target.group_id_field) if target.fifo else ""
        step = _Piece(item, key, text, size) if size <= room else _single(target, item, event)
        runs.setdefault(key, []).append(step)
    packer = _GzipPacker(target) if gzip else None
    for run in runs.values():
        segment: list[_Piece] = []
        for step in run:
            if isinstance(step, _Piece):
                segment.append(step)
                continue
            if segment:
                yield from packer.pack(segment) if packer else _pack_plain(segment, target)
                segment = []
            yield step
        if segment:
            yield from packer.pack(segment) if packer else _pack_plain(segment, target)


def _packed_entry(target: SqsTarget, pieces: Sequence[_Piece], body: str, body_size: int, array: bytes) -> Entry:
    attributes = pack_attributes(len(pieces), target.pack_compression)
    request: dict[str, Any] = {"Id": "0", "MessageBody": body, "MessageAttributes": attributes}
    if target.fifo:
        request["MessageGroupId"] = pieces[0].group
        request["MessageDeduplicationId"] = hashlib.sha256(array).hexdigest()
    size = body_size + _attributes_size(attributes)
    return Entry(pieces[0].item, request, size, packed=tuple(p.item for p in pieces))


def _raw_array(pieces: Sequence[_Piece]) -> bytes:
    return b"[" + b",".join(p.item.event_json for p in pieces) + b"]"


def _pack_plain(segment: Sequence[_Piece], target: SqsTarget) -> Iterator[Entry | Oversize]:
    """Uncompressed: the body is the array itself, so its size is known exactly as events are added."""
    limit = target.pack_limit
    start = 0
    size = _PACK_FRAME + segment[0].size
    for index in range(1, len(segment)):
        grown = size + 1 + segment[index].size
        if grown + _pack_attributes_size(index - start + 1, PackCompression.NONE) > limit:
            yield _close_plain(segment[start:index], target, size)
            start, grown = index, _PACK_FRAME + segment[index].size
        size = grown
    yield _close_plain(segment[start:], target, size)


def _close_plain(pieces: Sequence[_Piece], target: SqsTarget, body_size: int) -> Entry | Oversize:
    if len(pieces) == 1:
        return _single(target, pieces[0].item)
    body = "[" + ",".join(p.text for p in pieces) + "]"
    return _packed_entry(target, pieces, body, body_size, _raw_array(pieces) if target.fifo else b"")


class _GzipPacker:
    """gzip packing for one plan. The compressed size of a set of events is only known by compressing it, so
    each message is sized from the ratio the previous one measured (``PACK_GZIP_*``), compressed once, and
    re-planned only when it came out over the limit or well under it; the limit is always checked on the real
    body. Keeps the ratio from message to message: the only state, which is why this is a class."""

    def __init__(self, target: SqsTarget) -> None:
        self.target = target
        self.limit = target.pack_limit
        self.ratio = PACK_GZIP_FIRST_RATIO

    def pack(self, segment: Sequence[_Piece]) -> Iterator[Entry | Oversize]:
        raws = [p.item.event_json for p in segment]
        # ends[k] = bytes of the first k events, each with its separator: the array of events i..j-1 is
        # 1 + ends[j] - ends[i] bytes ("[" + events and commas + "]").
        ends = list(itertools.accumulate((len(raw) + 1 for raw in raws), initial=0))
        start = 0
        while start < len(segment):
            end, array, body = self._fit(raws, ends, start)
            if end - start == 1:
                yield _single(self.target, segment[start].item)
            else:
                pieces = segment[start:end]
                yield _packed_entry(self.target, pieces, body, len(body), array)
            start = end

    def _estimate(self, ends: Sequence[int], start: int) -> int:
        """The end of the longest run from ``start`` whose body the current ratio puts within the fill target."""
        count_bound = len(ends) - 1 - start
        budget = (self.limit - _pack_attributes_size(count_bound, PackCompression.GZIP)) * PACK_GZIP_FILL
        raw_budget = budget / self.ratio
        end = bisect.bisect_right(ends, raw_budget - 1 + ends[start], lo=start + 1) - 1
        # At least two events when there are two: a pessimistic ratio must be able to learn better.
        return max(end, min(start + 2, len(ends) - 1))

    def _fit(self, raws: Sequence[bytes], ends: Sequence[int], start: int) -> tuple[int, bytes, str]:
        """(end, array, body) of the message that starts at ``start``: events start..end-1, ``body`` their
        gzip+base64 array within the limit; a lone event (end = start + 1) comes back uncompressed."""
        total = len(raws)
        best: tuple[int, bytes, str] | None = None
        over = total + 1  # the smallest end known to be too big
        refilled = False
        tries = 0
        end = self._estimate(ends, start)
        while True:
            array = b"[" + b",".join(raws[start:end]) + b"]"
            if end - start == 1:
                return end, array, ""
            body = base64.b64encode(zlib.compress(array, self.target.pack_gzip_level, wbits=_GZIP_WBITS)).decode()
            tries += 1
            self.ratio = len(body) / len(array)
            size = len(body) + _pack_attributes_size(end - start, PackCompression.GZIP)
            if size <= self.limit:
                best = (end, array, body)
                if refilled or end >= total or end + 1 >= over or size >= self.limit * PACK_GZIP_REFILL:
                    return best
                refilled = True
                following = min(self._estimate(ends, start), over - 1)
                if following <= end:
                    return best
            else:
                over = end
                following = self._estimate(ends, start) if tries < PACK_GZIP_ESTIMATES else (start + end) // 2
                following = max(start + 1, min(following, end - 1))
                if best is not None and following <= best[0]:
                    return best
            end = following


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
        """Dead-letter what ``entry`` carries: every event of a packed message gets its own record, its reason
        saying which message it was in. If the file fails midway the whole entry stays pending (the events
        already written may then be written again: at least once, never lost)."""
        items = entry.items
        try:
            if len(items) == 1:
                self.dead_letter(items[0], reason)
            else:
                for index, item in enumerate(items, 1):
                    self.dead_letter(item, f"{reason} (packed message, event {index} of {len(items)})")
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
    """The items behind ``entries``, every event of a packed message included (e.g. a report's ``pending``, to
    plan them again later)."""
    return [item for e in entries for item in e.items]
