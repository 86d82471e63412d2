"""Frame readers by name, auto-detection, and the per-connection codec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import proto_codec
from fpolicyd.protocol.framing import FrameReader, XmlFrameReader, encode_frame
from fpolicyd.protocol.messages import Handshake, HandshakeResp, KeepAlive, ScreenRequest, ScreenResponse
from fpolicyd.protocol.readers import (
    AUTO_DETECT_MAX_BYTES,
    AutoReader,
    ConnectionCodec,
    Detection,
    LengthPrefixedReader,
    ReaderName,
    VarintDelimitedReader,
    WireFormat,
    classify,
    make_reader,
    resolved_reader,
)
from fpolicyd.protocol.varint import encode_varint
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from support.captures import CAPTURES, NEGO_REQ, SMB_OPEN, SMB_REN

#: Every capture file in tests/data (the repository's own copies of the public captures, docs/protocol.md §13),
#: including any added later that ``support.captures`` does not load by name.
DATA_CAPTURES = Path(__file__).resolve().parents[1] / "data"

HANDSHAKE = Handshake(
    "11111111-2222-11ee-8888-000c29000001", "policy-test", "aaaaaaaa-bbbb-11ee-8888-000c29000002", ("1.0", "1.2")
)


def _screen_request() -> ScreenRequest:
    message = decode_payload(SMB_REN.payload).message
    assert isinstance(message, ScreenRequest)
    return message


def _proto_payloads() -> list[bytes]:
    return [proto_codec.encode_message(m) for m in (HANDSHAKE, _screen_request(), KeepAlive())]


def _stream(name: ReaderName) -> tuple[bytes, list[bytes]]:
    """A stream in ``name``'s framing and the payloads it holds."""
    if name is ReaderName.XML:
        frames = [NEGO_REQ.frame, SMB_OPEN.frame, SMB_REN.frame]
        return b"".join(frames), [f[6:] for f in frames]
    payloads = _proto_payloads()
    frame = LengthPrefixedReader.frame if name is ReaderName.PROTOBUF_LENGTH_PREFIXED else VarintDelimitedReader.frame
    return b"".join(frame(p) for p in payloads), payloads


CONCRETE = (ReaderName.XML, ReaderName.PROTOBUF_LENGTH_PREFIXED, ReaderName.PROTOBUF_VARINT_DELIMITED)


def _feed_all(reader: FrameReader, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


@pytest.mark.parametrize("framing", CONCRETE)
@pytest.mark.parametrize("reader_name", [None, ReaderName.AUTO])
def test_whole_byte_by_byte_and_trailing_bytes_give_the_same_frames(
    framing: ReaderName, reader_name: ReaderName | None
) -> None:
    stream, payloads = _stream(framing)
    name = reader_name or framing
    assert make_reader(name).feed(stream) == payloads
    assert _feed_all(make_reader(name), [stream[i : i + 1] for i in range(len(stream))]) == payloads
    reader = make_reader(name)
    partial_next = stream[:3]
    assert reader.feed(stream + partial_next) == payloads
    assert reader.buffered == 3
    assert resolved_reader(reader) is framing


@pytest.mark.parametrize(
    ("reader", "prefix"),
    [
        (LengthPrefixedReader(1024), (1025).to_bytes(4, "big")),
        (VarintDelimitedReader(1024), encode_varint(1025)),
        (VarintDelimitedReader(1024), b"\xff\xff"),  # incomplete varint already over the maximum
        (AutoReader(1024), b"\x00\x00\x04\x01"),  # length-prefixed candidate over the maximum: undecidable
    ],
)
def test_max_frame_size_is_enforced_before_buffering(reader: FrameReader, prefix: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(prefix + b"\x0a")
    assert info.value.reason in {"frame_too_large", "unknown_framing"}


@pytest.mark.parametrize("name", [ReaderName.PROTOBUF_LENGTH_PREFIXED, ReaderName.PROTOBUF_VARINT_DELIMITED])
def test_zero_length_frames_are_refused_and_the_reader_is_poisoned(name: ReaderName) -> None:
    reader = make_reader(name)
    empty = b"\x00\x00\x00\x00" if name is ReaderName.PROTOBUF_LENGTH_PREFIXED else b"\x00"
    with pytest.raises(RemoteProtocolError, match="empty_frame"):
        reader.feed(empty)
    stream, _ = _stream(name)
    with pytest.raises(RemoteProtocolError, match="empty_frame"):
        reader.feed(stream)


def test_auto_reader_is_poisoned_after_unknown_framing() -> None:
    reader = AutoReader()
    with pytest.raises(RemoteProtocolError, match="unknown_framing"):
        reader.feed(b'"\x00\x00\x00\x10"<html>')
    with pytest.raises(RemoteProtocolError, match="unknown_framing"):
        reader.feed(NEGO_REQ.frame)


def test_varint_longer_than_five_bytes_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="frame_too_large"):
        VarintDelimitedReader(64 << 20).feed(b"\x80\x80\x80\x80\x80\x01")


def test_unknown_reader_name() -> None:
    with pytest.raises(ValueError, match="protobuf-varint-delimited"):
        make_reader("frameless")


def test_every_real_xml_capture_is_classified_xml() -> None:
    frames = [c.frame for c in CAPTURES]
    for item in sorted(DATA_CAPTURES.glob("*.json")):
        for record in json.loads(item.read_text(encoding="utf-8")):
            body = record["body"].encode() if record["body"] is not None else None
            frames.append(encode_frame(record["header"].encode(), body))
    assert len(frames) >= len(CAPTURES)
    for frame in frames:
        for cut in range(1, AUTO_DETECT_MAX_BYTES + 1):
            expected = Detection.XML if cut == AUTO_DETECT_MAX_BYTES else Detection.NEED_MORE
            assert classify(frame[:cut]) is expected


def test_the_public_wire_observation_is_not_xml() -> None:
    """``22 03 31 2E 30`` (field 4 = "1.0", docs/protocol.md §9) is no XML prefix: 0x03 as a length byte leads
    to no '"' at 5."""
    with pytest.raises(RemoteProtocolError, match="unknown_framing"):
        classify(b"\x22\x03\x31\x2e\x30" + b"\x00" * 6)


def test_a_handshake_request_puts_field_4_after_the_first_0x22() -> None:
    """What a reader that skipped to the first 0x22 saw: ``03 '1' '.' '0'`` (the 53554736 "length")."""
    data = proto_codec.to_protobuf(HANDSHAKE).handshake_request.SerializeToString()
    first = data.index(0x22)
    assert data[first + 1 : first + 5] == b"\x03\x31\x2e\x30"
    assert int.from_bytes(data[first + 1 : first + 5], "big") == 53554736


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"", Detection.NEED_MORE),
        (b"\x00\x00\x01", Detection.NEED_MORE),
        (b"\x00\x00\x01\x00\x0a", Detection.LENGTH_PREFIXED),
        (b"\x22\x0a", Detection.VARINT_DELIMITED),  # a 34-byte protobuf message: 0x0a is a valid tag
        (b"\x85\x01\x0a", Detection.VARINT_DELIMITED),
        (b"\x85", Detection.NEED_MORE),
    ],
)
def test_classify_examples(head: bytes, expected: Detection) -> None:
    assert classify(head) is expected


@pytest.mark.parametrize(
    "head",
    [
        b"\x00\x00\x00\x00\x0a",  # zero length
        b"\x00\x00\x00\x05\x00",  # field 0
        b"\x05\x07",  # wire type 7
        b'"\x00\x00\x00\x10"<?XML',  # not the prolog
        b'"\x00\x00\x00\x00"<?xml',  # zero length
        b"\xff\xff\xff\xff\xff\xff",  # varint too long
    ],
)
def test_classify_refuses_what_fits_no_framing(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown_framing"):
        classify(head)


@pytest.mark.parametrize("framing", CONCRETE)
def test_connection_codec_speaks_the_detected_format(framing: ReaderName) -> None:
    reader = AutoReader()
    codec = ConnectionCodec(reader)
    with pytest.raises(RemoteProtocolError, match="unknown_framing"):
        codec.wire_format()
    stream, payloads = _stream(framing)
    frames = reader.feed(stream)
    assert frames == payloads
    assert codec.wire_format() is (WireFormat.XML if framing is ReaderName.XML else WireFormat.PROTOBUF)
    first = codec.decode(frames[0]).message
    assert isinstance(first, Handshake)
    reply = codec.encode(HandshakeResp(first.vs_uuid, first.policy_name, first.session_id, "1.2"))
    check = make_reader(framing)
    (payload,) = check.feed(reply)
    assert ConnectionCodec(check).decode(payload).message == HandshakeResp(
        first.vs_uuid, first.policy_name, first.session_id, "1.2"
    )
    if framing is ReaderName.XML:
        assert reply == encode_message(HandshakeResp(first.vs_uuid, first.policy_name, first.session_id, "1.2"))
    response = codec.encode(ScreenResponse(7, "SMB_OPEN"))
    assert ConnectionCodec(check).decode(check.feed(response)[0]).message == ScreenResponse(7, "SMB_OPEN")


def test_xml_reader_by_name_is_the_existing_reader() -> None:
    assert isinstance(make_reader("xml", 4096), XmlFrameReader)
