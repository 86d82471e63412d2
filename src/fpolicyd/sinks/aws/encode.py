"""Events → request entries → batches, all pure (no I/O, no clock) and tested without AWS.

- :func:`encode_sqs_entry` / :func:`encode_eventbridge_entry` turn one event (the JSON bytes of
  :meth:`FileEvent.to_json`) into one request entry, and :func:`sqs_entry_size` / :func:`eventbridge_entry_size`
  measure an entry the way the service does (rules and sources next to each function).
- :func:`plan_batches` cuts a run of :class:`Item` into :class:`Batch` es within the service limits, and sets
  aside as :class:`Oversize` what can never be sent; with ``SqsTarget.pack_bytes`` it first packs many events
  into each SQS message (:func:`pack_sqs_entries`, envelope in :mod:`fpolicyd.sinks.sqs_envelope`).
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import itertools
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import orjson
from isal import isal_zlib

from fpolicyd.sinks.aws.targets import AwsTarget, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.sqs_envelope import PackCompression, pack_attributes

__all__ = [
    "PACK_GZIP_ESTIMATES",
    "PACK_GZIP_FILL",
    "PACK_GZIP_FIRST_RATIO",
    "PACK_GZIP_REFILL",
    "Batch",
    "Entry",
    "Item",
    "Oversize",
    "batch_entries",
    "encode_eventbridge_entry",
    "encode_sqs_entry",
    "eventbridge_entry_size",
    "gzip_compress",
    "items_of",
    "pack_sqs_entries",
    "plan_batches",
    "sqs_entry_size",
]

#: First guess, per packing plan, of base64-of-gzip bytes per byte of event JSON; each message then sizes the
#: next by what it measured. Level 1 measures ~0.16 on simulator events; the guess is pessimistic, so a first
#: message that compresses as expected is refilled (``PACK_GZIP_REFILL``) rather than found too big.
PACK_GZIP_FIRST_RATIO: Final = 0.25
#: Share of the pack limit a gzip message is planned to fill from that estimate: the ratio varies a few percent
#: between messages; a message found over the limit costs a second compression, an unused 5 % costs nothing
#: (billing rounds whole requests, not messages, up to 64 KiB).
PACK_GZIP_FILL: Final = 0.95
#: A gzip message that fits but fills less than this share of the limit, with more events waiting, is planned
#: again with the measured ratio, within ``PACK_GZIP_ESTIMATES`` compressions. Where the ratio is steady only a
#: plan's first message is refilled; the ratio also improves as a message grows (more repeats in its window),
#: so a first guess far off may take two refills.
PACK_GZIP_REFILL: Final = 0.8
#: Compressions tried for one message by ratio estimates before falling back to halving the candidate (which
#: bounds the work on data whose compression varies wildly).
PACK_GZIP_ESTIMATES: Final = 4
#: zlib's wbits for a gzip stream (header and CRC-32 trailer) with a 32 KiB window: 16 + MAX_WBITS.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
#: The ISA-L level that stands for zlib's level 1 (:func:`gzip_compress`): ISA-L has levels 0-3; 1 is its fastest
#: that still compresses better than zlib's 1 (level 0 leaves ~24 % more bytes).
_ISAL_FASTEST: Final = 1


def gzip_compress(data: bytes, level: int) -> bytes:
    """``data`` as one gzip member (RFC 1952: what ``gzip.decompress`` and every runtime's gunzip read), at zlib's
    ``level`` (1..9). Level 1, the packer's default, is ISA-L's fast deflate (python-isal): on fpolicyd's events ~6x
    less CPU than zlib's level 1 for ~8 % fewer bytes (benchmarks/bench_sqs_pack.py); 2..9 are zlib's own levels,
    for smaller messages at several times the CPU (ISA-L reaches no further than zlib's ~2)."""
    if level == 1:
        return isal_zlib.compress(data, _ISAL_FASTEST, wbits=_GZIP_WBITS)
    return zlib.compress(data, level, wbits=_GZIP_WBITS)


# ------------------------------------------------------------------------------------ items, batches


# The per-event records below are frozen msgspec Structs rather than frozen dataclasses: the same immutable
# record, built in C (0.06 against 0.59 µs per object with five fields: a frozen dataclass sets each field through
# object.__setattr__), which the delivery process does several times per event.


class Item(msgspec.Struct, frozen=True):
    """One event to send: its JSON (``FileEvent.to_json()``) and the caller's handle for it (e.g. a spool
    position), which is never sent and comes back in every report."""

    event_json: bytes
    ref: object = None


class Entry(msgspec.Struct, frozen=True, eq=False):
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


def _sqs_body(text: str, size: int) -> tuple[str, int]:
    """The message body of an event (its JSON as text, ``size`` UTF-8 bytes) and the body's UTF-8 size."""
    if not text.isascii() and ("\ufffe" in text or "\uffff" in text):  # isascii: O(1) on str
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


class _Fields(msgspec.Struct, frozen=True, gc=False):
    """What a one-event entry reads of an event: its JSON as text, and four members as JSON values (None when
    absent). ``routes`` is ``metadata.routes`` (None when ``metadata`` is not an object)."""

    text: str
    operation_type: object
    svm_name: object
    routes: object
    timestamp: object

    @staticmethod
    def of(event_json: bytes, event: Mapping[str, Any]) -> _Fields:
        metadata = event.get("metadata")
        return _Fields(
            event_json.decode("utf-8"),
            event.get("operation_type"),
            event.get("svm_name"),
            metadata.get("routes") if isinstance(metadata, Mapping) else None,
            event.get("timestamp"),
        )


class _Metadata(msgspec.Struct):
    routes: list[str] | None = None


class _Members(msgspec.Struct):
    """The members :class:`_Fields` reads, typed as fpolicyd writes them: anything else (a number where text is
    expected, a ``metadata`` that is not an object) is a validation error, and the caller reads the whole event."""

    operation_type: str | None = None
    svm_name: str | None = None
    timestamp: str | None = None
    metadata: _Metadata | None = None


_MEMBERS: Final = msgspec.json.Decoder(_Members)


def _read_fields(event_json: bytes) -> _Fields:
    """:class:`_Fields` of an event; ``ValueError`` when it is not a UTF-8 JSON object.

    Fast path: a typed msgspec decoder that builds only these members and skips the rest (0.85 against 4.2 µs
    for orjson's whole parse of a simulator event). It checks the whole document's JSON syntax but, unlike
    orjson, neither the UTF-8 of strings it skips (checked here by decoding the text, which the entry needs
    anyway) nor the range of numbers it skips: an event with a number beyond a double's range in a member no
    sink reads is sent as stored instead of set aside. fpolicyd never writes one (its events come from its own
    JSON encoder); RFC 8259 leaves number range to implementations. Anything the fast path does not take —
    invalid JSON, another type in a member it reads, nesting past Python's recursion limit — is decided by
    orjson (:func:`_load_event`). tests/property/test_aws_fields_props.py holds the two paths equal."""
    try:
        members = _MEMBERS.decode(event_json)
        text = event_json.decode("utf-8")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return _Fields.of(event_json, _load_event(event_json))
    metadata = members.metadata
    return _Fields(
        text,
        members.operation_type,
        members.svm_name,
        None if metadata is None else metadata.routes,
        members.timestamp,
    )


class _AnyObject(msgspec.Struct):
    """A JSON object, every member skipped."""


_OBJECT: Final = msgspec.json.Decoder(_AnyObject)


def _check_event(event_json: bytes) -> None:
    """``ValueError`` unless ``event_json`` is a UTF-8 JSON object: all a gzip-packed message needs of an event,
    whose bytes go into the array as they are. The fast path of :func:`_read_fields` without its members (0.66
    against 1.85 µs for a simulator event): msgspec checks the syntax and skips every member, the UTF-8 is checked
    only when the text is not ASCII; orjson decides what it refuses. Its one difference from orjson is
    :func:`_read_fields`'s, in any member (this reads none): a number beyond a double's range is sent as stored.
    tests/property/test_aws_fields_props.py holds it to :func:`_read_fields`."""
    try:
        _OBJECT.decode(event_json)
        if not event_json.isascii():
            event_json.decode("utf-8")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        _load_event(event_json)


def _field(event: Mapping[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _text(value: Any) -> str:
    if type(value) is str:  # the usual case, first
        return value
    if value is None or isinstance(value, bool | dict | list):
        return ""
    return str(value)


def _group_id(event: Mapping[str, Any], path: str) -> str:
    value = _text(_field(event, path)) or _text(event.get("svm_name")) or "default"
    if _GROUP_ID_OK.fullmatch(value):
        return value
    # Not a valid group id (too long, spaces, non-ASCII): a stable stand-in, so one value is still one group.
    return "sha256-" + hashlib.sha256(value.encode("utf-8")).hexdigest()


#: What a String attribute's name and data type count (:func:`_attributes_size`), per attribute we set.
_ATTRIBUTE_OVERHEAD: Final = {name: len(name) + len("String") for name in ("operation", "svm", "routes")}


def _add_attribute(attributes: dict[str, dict[str, str]], name: str, value: str) -> int:
    """Set String attribute ``name`` (a non-empty value, characters SQS refuses replaced) and return what it
    counts against the message size (as :func:`_attributes_size`)."""
    if value.isascii() and value.isprintable():  # printable ASCII is all allowed: nothing to replace
        attributes[name] = {"DataType": "String", "StringValue": value}
        return _ATTRIBUTE_OVERHEAD[name] + len(value)
    safe = _SQS_INVALID.sub("\ufffd", value)
    attributes[name] = {"DataType": "String", "StringValue": safe}
    return _ATTRIBUTE_OVERHEAD[name] + len(safe.encode("utf-8"))


#: Attribute sets kept built by :func:`_message_attributes`. Events of one cluster share few (operation, SVM,
#: routes) combinations; a stream with more distinct ones only builds them again (~1.5 µs an event).
ATTRIBUTE_SETS_CACHED: Final = 4096


@functools.lru_cache(maxsize=ATTRIBUTE_SETS_CACHED)
def _message_attributes(operation: str, svm: str, routes: str) -> tuple[dict[str, dict[str, str]] | None, int]:
    """The MessageAttributes of an event with these values (None when all are empty: an empty attribute is not
    allowed, "Name, type, value and the message body must not be empty") and what they count against the
    message size. Built once per distinct set and shared by every entry that has it: never modify the result
    (orjson and botocore's serializer only read it)."""
    attributes: dict[str, dict[str, str]] = {}
    size = 0
    if operation:
        size += _add_attribute(attributes, "operation", operation)
    if svm:
        size += _add_attribute(attributes, "svm", svm)
    if routes:
        size += _add_attribute(attributes, "routes", routes)
    return attributes or None, size


def _routes_text(routes: Any) -> str:
    """``metadata.routes`` comma-joined (empty and null members left out); "" for anything but a list."""
    if not routes or not isinstance(routes, list | tuple):
        return ""
    try:
        joined = ",".join(routes)  # what the router writes: names (orjson gives exact str, never a subclass)
    except TypeError:  # a member that is not text
        return ",".join(str(r) for r in routes if r is not None and str(r))
    return ",".join(filter(None, routes)) if "" in routes else joined


def _encode_sqs(
    target: SqsTarget,
    event_json: bytes,
    fields: _Fields,
    entry_id: str,
    *,
    fifo: bool | None = None,
    event: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """The entry and its size (``fifo``: the target's, when the caller already knows it; ``event``: the parsed
    event, when the caller has it — a FIFO queue's ids read members :class:`_Fields` does not hold)."""
    body, size = _sqs_body(fields.text, len(event_json))
    attributes, attributes_size = _message_attributes(
        _text(fields.operation_type), _text(fields.svm_name), _routes_text(fields.routes)
    )
    entry: dict[str, Any] = {"Id": entry_id, "MessageBody": body}
    if attributes is not None:
        entry["MessageAttributes"] = attributes
        size += attributes_size
    if target.fifo if fifo is None else fifo:
        if event is None:
            event = _load_event(event_json)
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
    event = _load_event(event_json)
    return _encode_sqs(target, event_json, _Fields.of(event_json, event), entry_id, event=event)[0]


def sqs_entry_size(entry: Mapping[str, Any]) -> int:
    """What SQS counts against the message (and batch) size limit: the body plus, for every message attribute,
    its name, data type and value, in UTF-8 bytes ("All parts of the message attribute, including Name, Type,
    and Value, are part of the message size restriction (1 MiB or 1,048,576 bytes)": SQS API reference,
    MessageAttributeValue; the batch limit is "the sum of the individual lengths of all of the batched
    messages": API_SendMessageBatch). Id, MessageGroupId and MessageDeduplicationId do not count."""
    size = len(str(entry["MessageBody"]).encode("utf-8"))
    return size + _attributes_size(entry.get("MessageAttributes") or {})


def _event_time(stamp: object) -> datetime | None:
    """An event's ``timestamp`` as an aware datetime, or None when it is not RFC 3339 with a UTC offset."""
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


def _eventbridge_fixed_bytes(target: EventBridgeTarget) -> int:
    """What every entry of ``target`` counts for its Source and DetailType."""
    return len(target.source.encode("utf-8")) + len(target.detail_type.encode("utf-8"))


def _encode_eventbridge(
    target: EventBridgeTarget, event_json: bytes, fields: _Fields, fixed_bytes: int | None = None
) -> tuple[dict[str, Any], int]:
    """The entry and its size (``fixed_bytes``: :func:`_eventbridge_fixed_bytes`, when the caller has it)."""
    entry: dict[str, Any] = {}
    size = len(event_json) + (_eventbridge_fixed_bytes(target) if fixed_bytes is None else fixed_bytes)
    when = _event_time(fields.timestamp) if target.use_event_time else None
    if when is not None:
        entry["Time"] = when
        size += _EB_TIME_BYTES
    entry["Source"] = target.source
    entry["DetailType"] = target.detail_type
    entry["Detail"] = fields.text
    entry["EventBusName"] = target.bus_name
    entry["Resources"] = []
    return entry, size


def encode_eventbridge_entry(target: EventBridgeTarget, event_json: bytes) -> dict[str, Any]:
    """One PutEventsRequestEntry: ``Detail`` = the event JSON (so rules match ``detail.operation_type``,
    ``detail.file_path`` as in the reference pipeline), ``Source``/``DetailType`` from the target,
    ``EventBusName``, empty ``Resources``, and ``Time`` = the event's timestamp when it parses (the envelope's
    ``time`` then says when the file operation happened, not when it was forwarded; EventBridge keeps whole
    seconds, ``detail.timestamp`` keeps the microseconds). Raises ``ValueError`` for a non-object."""
    return _encode_eventbridge(target, event_json, _Fields.of(event_json, _load_event(event_json)))[0]


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
    """``item`` as a one-event entry, or :class:`Oversize` when it is not a JSON object or over the entry limit
    (``event``: the parsed event, when the caller has it)."""
    return _single_within(target, item, event, _PlanConstants.of(target))


@dataclass(frozen=True, slots=True)
class _PlanConstants:
    """What every entry of one plan shares, worked out once per plan rather than per event."""

    limit: int
    fifo: bool
    #: EventBridge: :func:`_eventbridge_fixed_bytes` (0 for SQS).
    fixed_bytes: int

    @staticmethod
    def of(target: AwsTarget) -> _PlanConstants:
        if isinstance(target, SqsTarget):
            return _PlanConstants(target.entry_limit, target.fifo, 0)
        return _PlanConstants(target.entry_limit, False, _eventbridge_fixed_bytes(target))


def _single_within(
    target: AwsTarget, item: Item, event: dict[str, Any] | None, constants: _PlanConstants
) -> Entry | Oversize:
    """:func:`_single` with the plan's constants."""
    limit = constants.limit
    event_json = item.event_json
    try:
        if event is not None:
            fields = _Fields.of(event_json, event)
        elif constants.fifo:  # the group and deduplication ids read any member: the whole event
            event = _load_event(event_json)
            fields = _Fields.of(event_json, event)
        else:
            fields = _read_fields(event_json)
        if isinstance(target, SqsTarget):
            request, size = _encode_sqs(target, event_json, fields, "0", fifo=constants.fifo, event=event)
        else:
            request, size = _encode_eventbridge(target, event_json, fields, constants.fixed_bytes)
    except ValueError as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Oversize(item, f"not an event JSON object: {exc}", len(item.event_json))
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
    constants = _PlanConstants.of(target)
    return batch_entries((_single_within(target, item, None, constants) for item in items), target)


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


class _Piece(msgspec.Struct, frozen=True):
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
        event_json = item.event_json
        try:
            # A FIFO queue groups by any member: the whole event. Otherwise a gzip array needs only the event's
            # validity (its bytes go in as they are), a plain one its text too.
            event = _load_event(event_json) if target.fifo else None
            if gzip:
                if event is None:
                    _check_event(event_json)
                text, size = "", len(event_json)
            else:
                fields = _Fields.of(event_json, event) if event is not None else _read_fields(event_json)
                text, size = _sqs_body(fields.text, len(event_json))
        except ValueError as exc:
            key = None if target.fifo else ""
            runs.setdefault(key, []).append(Oversize(item, f"not an event JSON object: {exc}", len(event_json)))
            continue
        key = _group_id(event, target.group_id_field) if event is not None else ""
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
        tries = 0
        end = self._estimate(ends, start)
        while True:
            array = b"[" + b",".join(raws[start:end]) + b"]"
            if end - start == 1:
                return end, array, ""
            body = base64.b64encode(gzip_compress(array, self.target.pack_gzip_level)).decode()
            tries += 1
            self.ratio = len(body) / len(array)
            size = len(body) + _pack_attributes_size(end - start, PackCompression.GZIP)
            if size <= self.limit:
                best = (end, array, body)
                full = size >= self.limit * PACK_GZIP_REFILL
                if full or tries >= PACK_GZIP_ESTIMATES or end >= total or end + 1 >= over:
                    return best
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


def items_of(entries: Sequence[Entry]) -> list[Item]:
    """The items behind ``entries``, every event of a packed message included (e.g. a report's ``pending``, to
    plan them again later)."""
    return [item for e in entries for item in e.items]
