"""Protobuf base-128 varints (pure): the one decoder and the one encoder.

:func:`decode_varint` is the only varint decoder; its users bound the length differently and raise their own
errors: the schema-less walker (:func:`fpolicyd.protocol.proto_codec.walk_fields`, up to 10 bytes and 64 bits),
auto-detection (:func:`fpolicyd.protocol.readers.classify`, up to 5 bytes) and the varint-delimited frame
reader. That reader's per-frame prefix parse keeps the same loop inline, since a call per frame is measurably
slower on its hot path; ``tests/property/test_varint_props.py`` checks that every entry point agrees with
:func:`decode_varint` on every input.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

#: Bytes of the longest varint protobuf writes (a 64-bit value).
MAX_VARINT_LEN: Final = 10


class VarintEnd(IntEnum):
    """The position :func:`decode_varint` returns when the varint did not end (negative: never a position)."""

    #: The data ended before a byte without the continuation bit.
    TRUNCATED = -1
    #: ``max_len`` bytes all had the continuation bit.
    TOO_LONG = -2


def decode_varint(data: bytes | bytearray, pos: int, max_len: int = MAX_VARINT_LEN) -> tuple[int, int]:
    """(value, position after it) of the varint of at most ``max_len`` bytes at ``pos``.

    When it does not end there the position is a :class:`VarintEnd` and the value is that of the bytes read
    (all ``max_len`` of them for :attr:`VarintEnd.TOO_LONG`), so a caller can refuse a length that is already
    too large before the rest of it arrives.
    """
    value = 0
    end = len(data)
    for shift in range(0, 7 * max_len, 7):
        if pos >= end:
            return value, VarintEnd.TRUNCATED
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    return value, VarintEnd.TOO_LONG


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
