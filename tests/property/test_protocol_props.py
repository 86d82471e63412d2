"""Property tests of the framer and codec, and the fuzz invariant: bytes either parse or raise the peer error."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import Message
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from support.captures import CAPTURES
from support.strategies import messages

REAL_FRAMES = [c.frame for c in CAPTURES]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(msg=messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_encode_decode_round_trip(msg: Message) -> None:
    frame = encode_message(msg)
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 6
    decoded = decode_payload(frame[6:])
    assert decoded.message == msg
    assert decoded.header.content_len == decoded.body_length
    assert encode_message(decoded.message) == frame


@given(msgs=st.lists(messages, min_size=1, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=12))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_any_tcp_split_yields_the_same_frames(msgs: list[Message], cuts: list[int]) -> None:
    frames = [encode_message(m) for m in msgs]
    stream = b"".join(frames)
    reader = XmlFrameReader()
    out: list[bytes] = []
    for piece in _split(stream, cuts):
        out.extend(reader.feed(piece))
    assert out == [f[6:] for f in frames]
    assert reader.buffered == 0
    assert [decode_payload(p).message for p in out] == msgs


def _parse_all(data: bytes, reader: XmlFrameReader) -> None:
    for payload in reader.feed(data):
        decode_payload(payload)


@given(data=st.binary(max_size=2048))
@settings(max_examples=1000)
def test_fuzz_arbitrary_bytes_parse_or_raise_the_peer_error(data: bytes) -> None:
    reader = XmlFrameReader(max_frame_bytes=4096)
    try:
        _parse_all(data, reader)
    except RemoteProtocolError:
        return


@given(data=st.binary(max_size=2048))
@settings(max_examples=1000)
def test_fuzz_arbitrary_payloads(data: bytes) -> None:
    try:
        decode_payload(data)
    except RemoteProtocolError:
        return


@given(
    index=st.integers(0, len(REAL_FRAMES) - 1),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
@settings(max_examples=1000)
def test_fuzz_mutated_real_frames(index: int, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    frame = bytearray(REAL_FRAMES[index])
    for pos, value in flips:
        frame[pos % len(frame)] = value
    reader = XmlFrameReader()
    try:
        for piece in _split(bytes(frame), cuts):
            _parse_all(piece, reader)
    except RemoteProtocolError:
        return


@given(
    body=st.text(alphabet=st.sampled_from(list("<>/&;=\"' ?!abcFscreenReqIdTypeNotfInfo0123456789\n")), max_size=300)
)
@settings(max_examples=1000)
def test_fuzz_xml_shaped_bodies(body: str) -> None:
    header = b'<?xml version="1.0"?><Header><NotfType>SCREEN_REQ</NotfType><ContentLen>0</ContentLen></Header>'
    try:
        decode_payload(header + b"\n\n" + body.encode() + b"\x00")
    except RemoteProtocolError:
        return
