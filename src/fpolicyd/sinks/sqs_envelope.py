"""The packed SQS message envelope (opt-in ``sqs_pack_bytes``): its names, and the reference decoder.

A packed message carries several events in one SQS message. It is recognised by its message attributes, never
by guessing from the body:

- ``fpolicyd-format`` (String) = ``packed-v1``: present on packed messages only. A message without it is one
  event, exactly as when packing is off (body = the event JSON, attributes ``operation``/``svm``/``routes``).
- ``fpolicyd-count`` (Number): how many events the message holds (≥ 2).
- ``content-encoding`` (String) = ``gzip``: the body is the standard, padded base64 text of a gzip stream
  (RFC 1952) of the array below. Absent: the body is the array itself.

The array is a JSON array of the event objects, in the order fpolicyd read them, each exactly the object the
event JSON is (the same one a single-event message's body holds). This module is imported by the settings, so
it stays free of botocore; the encoder lives with the other SQS encoders in :mod:`fpolicyd.sinks.aws.encode`.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

import orjson

from fpolicyd.errors import FpolicydError

__all__ = [
    "COUNT_ATTRIBUTE",
    "ENCODING_ATTRIBUTE",
    "FORMAT_ATTRIBUTE",
    "GZIP_ENCODING",
    "PACKED_FORMAT",
    "SQS_MAX_MESSAGE_BYTES",
    "PackCompression",
    "PackedMessageError",
    "decode_message",
    "pack_attributes",
]

#: The SQS API's limit on one message (body plus attributes) and on a whole SendMessageBatch: 1 MiB
#: (API_SendMessage, "MessageBody"; a queue's MaximumMessageSize can only lower it).
SQS_MAX_MESSAGE_BYTES: Final = 1024 * 1024

FORMAT_ATTRIBUTE: Final = "fpolicyd-format"
PACKED_FORMAT: Final = "packed-v1"
COUNT_ATTRIBUTE: Final = "fpolicyd-count"
ENCODING_ATTRIBUTE: Final = "content-encoding"
GZIP_ENCODING: Final = "gzip"


class PackCompression(StrEnum):
    """How a packed message's array is carried: as the body itself, or gzip-compressed and base64-encoded."""

    NONE = "none"
    GZIP = "gzip"


class PackedMessageError(FpolicydError, ValueError):
    """A message claims to be packed but is not a valid packed message (consumer side: never retry it)."""


def pack_attributes(count: int, compression: PackCompression) -> dict[str, dict[str, str]]:
    """The MessageAttributes of a packed message of ``count`` events."""
    attributes = {
        FORMAT_ATTRIBUTE: {"DataType": "String", "StringValue": PACKED_FORMAT},
        COUNT_ATTRIBUTE: {"DataType": "Number", "StringValue": str(count)},
    }
    if compression is PackCompression.GZIP:
        attributes[ENCODING_ATTRIBUTE] = {"DataType": "String", "StringValue": GZIP_ENCODING}
    return attributes


def decode_message(body: str, attributes: Mapping[str, str]) -> list[Any]:
    """The events one received message holds, in order: the reference consumer (the README's Lambda handler does
    the same without fpolicyd installed). ``attributes`` maps attribute names to their string values.

    Raises :class:`PackedMessageError` for an unknown ``fpolicyd-format`` or ``content-encoding``, a body that
    does not decode, or a count that does not match the attribute; ``orjson.JSONDecodeError`` for a
    single-event body that is not JSON.
    """
    fmt = attributes.get(FORMAT_ATTRIBUTE)
    if fmt is None:
        return [orjson.loads(body)]
    if fmt != PACKED_FORMAT:
        raise PackedMessageError(f"unknown {FORMAT_ATTRIBUTE} {fmt!r}")
    encoding = attributes.get(ENCODING_ATTRIBUTE)
    try:
        if encoding is None:
            data: bytes | str = body
        elif encoding == GZIP_ENCODING:
            # wbits 16 + MAX_WBITS: a gzip stream (header and CRC-32 trailer checked).
            data = zlib.decompress(base64.b64decode(body, validate=True), 16 + zlib.MAX_WBITS)
        else:
            raise PackedMessageError(f"unknown {ENCODING_ATTRIBUTE} {encoding!r}")
        events = orjson.loads(data)
    except (binascii.Error, zlib.error, orjson.JSONDecodeError) as exc:
        raise PackedMessageError(f"packed message body does not decode: {exc}") from exc
    if not isinstance(events, list):
        raise PackedMessageError(f"packed message body is a JSON {type(events).__name__}, not an array")
    count = attributes.get(COUNT_ATTRIBUTE)
    if count != str(len(events)):
        raise PackedMessageError(f"packed message holds {len(events)} events, {COUNT_ATTRIBUTE} says {count!r}")
    return events
