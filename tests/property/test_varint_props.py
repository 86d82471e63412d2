"""Hypothesis: :func:`~fpolicyd.protocol.varint.decode_varint` against a plain reading of the varint rule, and
every varint entry point (the schema-less walker ``walk_fields``, auto-detection's ``classify``, the
varint-delimited reader's inline prefix parse) against ``decode_varint`` on every input: complete, truncated,
longer than 5 or 10 bytes, over 64 bits."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import proto_codec
from fpolicyd.protocol.framing import MARKER
from fpolicyd.protocol.proto_codec import RawField
from fpolicyd.protocol.readers import (
    AUTO_DETECT_MAX_BYTES,
    MAX_VARINT_PREFIX_LEN,
    Detection,
    VarintDelimitedReader,
    _valid_tag,
    classify,
)
from fpolicyd.protocol.varint import MAX_VARINT_LEN, VarintEnd, decode_varint, encode_varint

U64 = 1 << 64

#: Varint-shaped bytes: encodings of any value up to 2**80 (so 11- and 12-byte ones too), cut anywhere, runs
#: of continuation bytes, and arbitrary bytes; each with arbitrary bytes after it.
varint_bytes = st.one_of(
    st.integers(0, 1 << 80).map(encode_varint),
    st.tuples(st.integers(0, 1 << 80).map(encode_varint), st.integers(0, 12)).map(lambda t: t[0][: t[1]]),
    st.binary(max_size=13).map(lambda b: bytes(x | 0x80 for x in b)),
    st.binary(max_size=13),
)
inputs = st.tuples(st.binary(max_size=3), varint_bytes, st.binary(max_size=4)).map(
    lambda t: (t[0] + t[1] + t[2], len(t[0]))
)
max_lens = st.sampled_from([1, MAX_VARINT_PREFIX_LEN, MAX_VARINT_LEN, 12])


def spec(data: bytes, pos: int, max_len: int) -> tuple[int, int]:
    """The varint rule read plainly: little-endian 7-bit groups up to the first byte under 0x80."""
    groups: list[int] = []
    for byte in data[pos : pos + max_len]:
        groups.append(byte & 0x7F)
        if byte < 0x80:
            return sum(g << (7 * i) for i, g in enumerate(groups)), pos + len(groups)
    value = sum(g << (7 * i) for i, g in enumerate(groups))
    return value, VarintEnd.TOO_LONG if len(groups) == max_len else VarintEnd.TRUNCATED


@settings(max_examples=1000)
@given(inputs, max_lens)
@example((b"\x80" * 10 + b"\x01", 0), MAX_VARINT_LEN)
@example((b"\xff" * 9 + b"\x7f", 0), MAX_VARINT_LEN)
@example((b"", 0), MAX_VARINT_LEN)
def test_decode_varint_follows_the_rule(data_pos: tuple[bytes, int], max_len: int) -> None:
    data, pos = data_pos
    assert decode_varint(data, pos, max_len) == spec(data, pos, max_len)
    assert decode_varint(bytearray(data), pos, max_len) == spec(data, pos, max_len)


@settings(max_examples=1000)
@given(st.integers(0, 1 << 80), st.binary(max_size=4))
def test_decode_varint_reads_what_encode_varint_wrote(value: int, tail: bytes) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded + tail, 0, len(encoded)) == (value, len(encoded))
    if len(encoded) > 1:
        assert decode_varint(encoded[:-1], 0, len(encoded))[1] == VarintEnd.TRUNCATED
        assert decode_varint(encoded, 0, len(encoded) - 1)[1] == VarintEnd.TOO_LONG


WALK_ERRORS: dict[int, str] = {
    VarintEnd.TRUNCATED: "truncated varint",
    VarintEnd.TOO_LONG: f"varint longer than {MAX_VARINT_LEN} bytes",
}


@settings(max_examples=1000)
@given(varint_bytes, st.sampled_from([b"", b"\x08", b"\x12"]))
@example(b"\x80" * 10 + b"\x01", b"")  # 11 bytes
@example(b"\xff" * 9 + b"\x01", b"\x08")  # 2**64 - 1: the largest accepted
@example(b"\x80" * 9 + b"\x02", b"\x08")  # 2**64: over 64 bits
@example(b"\xff" * 9 + b"\x7f", b"")  # 10 bytes, 70 bits
@example(b"\xff" * 3, b"\x12")  # truncated
def test_walk_fields_reads_varints_as_decode_varint_does(varint: bytes, before: bytes) -> None:
    """The walker's three varints: a field key (nothing ``before``), a varint field's value (after key
    ``08``, field 1 varint) and a LEN field's length (after key ``12``, field 2 len)."""
    data = before + varint
    value, end = decode_varint(data, len(before))
    if not data:
        assert proto_codec.walk_fields(data) == ()  # no field, so no key to read
    elif end < 0 or value >= U64:
        with pytest.raises(proto_codec.WireFormatError) as raised:
            proto_codec.walk_fields(data)
        assert str(raised.value) == WALK_ERRORS.get(end, "varint over 64 bits")
    elif before == b"\x08":
        assert proto_codec.walk_fields(data[:end]) == (RawField(1, 0, value),)
    elif before == b"\x12" and value == 0:
        assert proto_codec.walk_fields(data[:end]) == (RawField(2, 2, b""),)
    elif before == b"\x12":
        with pytest.raises(proto_codec.WireFormatError, match=f"field 2: length {value} runs past the end"):
            proto_codec.walk_fields(data[:end])


@settings(max_examples=1000)
@given(inputs, st.sampled_from([1, 127, 128, 1 << 20, (1 << 26) - 1, 1 << 26]))
@example((b"\x80" * 5, 0), 1 << 20)  # 5 continuation bytes: longer than a prefix may be
@example((b"\x80\x80\x80\x88", 0), 1 << 20)  # truncated, but already 2**24 > the maximum
@example((b"\x81\x81", 0), 128)  # truncated, but already 129 > the maximum
@example((b"\x80" * 4, 0), 1 << 26)  # truncated at 4 bytes: wait for the fifth
@example((b"\x00", 0), 1 << 20)  # zero length
@example((b"\x81\x01", 0), 128)  # 129 > 128
def test_the_varint_reader_prefix_agrees_with_decode_varint(data_pos: tuple[bytes, int], max_frame: int) -> None:
    data, pos = data_pos
    reader = VarintDelimitedReader(max_frame)
    length, start = decode_varint(data, pos, MAX_VARINT_PREFIX_LEN)
    if start == VarintEnd.TOO_LONG or length > max_frame:
        with pytest.raises(RemoteProtocolError) as raised:
            reader._prefix(data, pos)
        assert raised.value.reason == "frame_too_large"
    elif start == VarintEnd.TRUNCATED:
        assert reader._prefix(data, pos) is None
    elif length == 0:
        with pytest.raises(RemoteProtocolError) as raised:
            reader._prefix(data, pos)
        assert raised.value.reason == "empty_frame"
    else:
        assert reader._prefix(data, pos) == (length, start)


@settings(max_examples=1000)
@given(inputs, st.sampled_from([1, 127, 128, 1 << 20, (1 << 26) - 1]))
@example((b"\x80" * 5 + b"\x08", 0), 1 << 20)
@example((b"\x81\x01", 0), 1 << 20)
@example((b"\x81\x01\x0a", 0), 1 << 20)
def test_classify_reads_a_varint_length_as_decode_varint_does(data_pos: tuple[bytes, int], max_frame: int) -> None:
    head = data_pos[0][:AUTO_DETECT_MAX_BYTES]
    if not head or head[0] == 0 or (head[0] == MARKER and (len(head) < 2 or not _valid_tag(head[1]))):
        return  # the XML and length-prefixed branches: no varint read
    length, end = decode_varint(head, 0, MAX_VARINT_PREFIX_LEN)
    if end == VarintEnd.TRUNCATED:
        assert classify(head, max_frame) is Detection.NEED_MORE
    elif end == VarintEnd.TOO_LONG or not 1 <= length <= max_frame or (end < len(head) and not _valid_tag(head[end])):
        with pytest.raises(RemoteProtocolError) as raised:
            classify(head, max_frame)
        assert raised.value.reason == "unknown_framing"
    elif end >= len(head):
        assert classify(head, max_frame) is Detection.NEED_MORE
    else:
        assert classify(head, max_frame) is Detection.VARINT_DELIMITED
