"""Hypothesis: every reader splits generated streams of its framing however they are cut; auto-detection
classifies every generated XML and protobuf stream correctly; arbitrary bytes parse or raise
RemoteProtocolError, never anything else."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import proto_codec, xml_codec
from fpolicyd.protocol.framing import FrameReader
from fpolicyd.protocol.messages import Message
from fpolicyd.protocol.readers import (
    AutoReader,
    ConnectionCodec,
    Detection,
    LengthPrefixedReader,
    ReaderName,
    VarintDelimitedReader,
    classify,
    make_reader,
    resolved_reader,
)
from support import strategies

FRAMERS: dict[ReaderName, Callable[[Message], bytes]] = {
    ReaderName.XML: xml_codec.encode_message,
    ReaderName.PROTOBUF_LENGTH_PREFIXED: lambda m: LengthPrefixedReader.frame(proto_codec.encode_message(m)),
    ReaderName.PROTOBUF_VARINT_DELIMITED: lambda m: VarintDelimitedReader.frame(proto_codec.encode_message(m)),
}
PREFIX_LEN = {ReaderName.XML: 6, ReaderName.PROTOBUF_LENGTH_PREFIXED: 4}

message_lists = st.lists(strategies.messages, min_size=1, max_size=6)
framings = st.sampled_from(list(FRAMERS))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _feed(reader: FrameReader, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


def _payload(framing: ReaderName, frame: bytes) -> bytes:
    if framing is ReaderName.PROTOBUF_VARINT_DELIMITED:
        _, start = _varint_end(frame)
        return frame[start:]
    return frame[PREFIX_LEN[framing] :]


def _varint_end(frame: bytes) -> tuple[int, int]:
    value = 0
    for index, byte in enumerate(frame):
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise AssertionError("no varint")


@settings(max_examples=300)
@given(framing=framings, messages=message_lists, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_every_reader_splits_its_framing_however_it_is_cut(
    framing: ReaderName, messages: list[Message], cuts: list[int]
) -> None:
    frames = [FRAMERS[framing](m) for m in messages]
    stream = b"".join(frames)
    expected = [_payload(framing, f) for f in frames]
    chunks = _split(stream, cuts)
    for name in (framing, ReaderName.AUTO):
        reader = make_reader(name)
        assert _feed(reader, chunks) == expected
        assert reader.buffered == 0
        assert resolved_reader(reader) is framing


@settings(max_examples=300)
@given(framing=framings, message=strategies.messages)
def test_auto_detection_classifies_every_generated_stream(framing: ReaderName, message: Message) -> None:
    frame = FRAMERS[framing](message)
    decisions = [classify(frame[:cut]) for cut in range(min(len(frame), 11) + 1)]
    decided = [d for d in decisions if d is not Detection.NEED_MORE]
    assert decided
    assert {d.value for d in decided} == {framing.value}
    assert decisions.index(decided[0]) <= 11


@settings(max_examples=300)
@given(
    framing=st.sampled_from([ReaderName.PROTOBUF_LENGTH_PREFIXED, ReaderName.PROTOBUF_VARINT_DELIMITED]),
    messages=message_lists,
)
def test_auto_detected_protobuf_streams_decode_to_the_messages_sent(
    framing: ReaderName, messages: list[Message]
) -> None:
    reader = AutoReader()
    codec = ConnectionCodec(reader)
    payloads = reader.feed(b"".join(FRAMERS[framing](m) for m in messages))
    assert [codec.decode(p).message for p in payloads] == messages


@settings(max_examples=500)
@given(
    name=st.sampled_from(list(ReaderName)),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
    max_frame=st.sampled_from([1, 16, 1024, 1 << 20]),
)
def test_arbitrary_bytes_parse_or_raise_remote_protocol_error(
    name: ReaderName, data: bytes, cuts: list[int], max_frame: int
) -> None:
    whole = make_reader(name, max_frame)
    split = make_reader(name, max_frame)
    try:
        expected: list[bytes] | None = whole.feed(data)
    except RemoteProtocolError:
        expected = None
    try:
        got: list[bytes] | None = _feed(split, _split(data, cuts))
    except RemoteProtocolError:
        got = None
    if expected is not None and got is not None:
        assert got == expected
    for payload in expected or []:
        assert 0 < len(payload) <= max_frame


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_protobuf_decode_of_arbitrary_bytes_only_raises_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        proto_codec.decode_payload(data)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_walk_fields_of_arbitrary_bytes_only_raises_wire_format_error(data: bytes) -> None:
    try:
        fields = proto_codec.walk_fields(data)
    except proto_codec.WireFormatError:
        return
    proto_codec.dump_fields(fields)


@settings(max_examples=200)
@given(strategies.messages)
def test_walk_fields_reads_every_encoded_message(message: Message) -> None:
    fields = proto_codec.walk_fields(proto_codec.encode_message(message))
    assert fields
    assert fields[0].number == 1  # the header comes first
