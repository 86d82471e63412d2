from __future__ import annotations

import pytest

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import framing
from fpolicyd.protocol.framing import XmlFrameReader, encode_frame, split_payload
from fpolicyd.protocol.readers import ReaderName, make_reader
from support.captures import CAPTURES, KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN

ALL_FRAMES = [c.frame for c in CAPTURES]


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda c: c.notf_type)
def test_frame_length_matches_the_capture(capture: object) -> None:
    from support.captures import Capture

    assert isinstance(capture, Capture)
    frame = capture.frame
    assert frame[0] == 0x22
    assert frame[5] == 0x22
    assert int.from_bytes(frame[1:5], "big") == capture.frame_length
    assert frame.endswith(b"\x00")
    assert len(frame) == 6 + capture.frame_length


def test_keep_alive_prefix_is_the_captured_bytes() -> None:
    assert KEEP_ALIVE.frame[:6] == b'"\x00\x00\x00\x7c"'
    assert len(KEEP_ALIVE.header) == 123


def test_nego_resp_length_is_346_plus_policy_name() -> None:
    assert NEGO_RESP.frame_length == 346 + len("policy-test-flo")


def test_whole_stream_in_one_read() -> None:
    reader = XmlFrameReader()
    assert reader.feed(b"".join(ALL_FRAMES)) == [f[6:] for f in ALL_FRAMES]
    assert reader.buffered == 0


def test_byte_by_byte() -> None:
    reader = XmlFrameReader()
    out: list[bytes] = []
    for byte in b"".join(ALL_FRAMES):
        out.extend(reader.feed(bytes([byte])))
    assert out == [f[6:] for f in ALL_FRAMES]
    assert reader.buffered == 0


def test_trailing_partial_frame_is_kept_for_the_next_read() -> None:
    reader = XmlFrameReader()
    stream = SMB_OPEN.frame + SMB_REN.frame[:100]
    assert reader.feed(stream) == [SMB_OPEN.payload]
    assert reader.buffered == 100
    assert reader.feed(SMB_REN.frame[100:]) == [SMB_REN.payload]
    assert reader.buffered == 0


@pytest.mark.parametrize("cut", [1, 3, 5, 6, 7, 50, len(NEGO_REQ.frame) - 1])
def test_split_at_every_interesting_place(cut: int) -> None:
    reader = XmlFrameReader()
    stream = NEGO_REQ.frame + KEEP_ALIVE.frame
    first = reader.feed(stream[:cut])
    rest = reader.feed(stream[cut:])
    assert first + rest == [NEGO_REQ.payload, KEEP_ALIVE.payload]


@pytest.mark.parametrize("bad", [b'X\x00\x00\x00\x10"', b'"\x00\x00\x00\x10X', b"\x00\x00\x00\x10<?"])
def test_bad_marker_closes_without_resync(bad: bytes) -> None:
    reader = XmlFrameReader()
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(bad + b"x" * 16)
    assert info.value.reason == "bad_marker"
    assert info.value.close
    with pytest.raises(RemoteProtocolError):
        reader.feed(KEEP_ALIVE.frame)  # poisoned: never reads garbage as a frame afterwards


def test_protobuf_looking_stream_is_refused_not_misread() -> None:
    """YOS's symptom: protobuf bytes `22 03 31 2E 30` must not become a 53554736-byte length."""
    reader = XmlFrameReader()
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(b"\x0a\x10\x22\x031.0\x22\x031.2")
    assert info.value.reason == "bad_marker"


def test_oversized_length_refused_from_the_prefix_alone() -> None:
    reader = XmlFrameReader(max_frame_bytes=4096)
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(b'"' + (4097).to_bytes(4, "big") + b'"')
    assert info.value.reason == "frame_too_large"
    assert reader.buffered == 0


def test_frame_at_the_maximum_is_accepted() -> None:
    reader = XmlFrameReader(max_frame_bytes=10)
    assert reader.feed(b'"' + (10).to_bytes(4, "big") + b'"' + b"a" * 10) == [b"a" * 10]


def test_zero_length_frame_is_an_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        XmlFrameReader().feed(b'"\x00\x00\x00\x00"')
    assert info.value.reason == "empty_frame"


def test_reader_rejects_a_nonsense_maximum() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        XmlFrameReader(max_frame_bytes=0)


def test_split_payload_forms() -> None:
    assert split_payload(b"<h/>\n\n<b/>\x00") == (b"<h/>", b"<b/>")
    assert split_payload(b"<h/>\n\n<b/>") == (b"<h/>", b"<b/>")  # NUL omitted (SPL style): accepted
    assert split_payload(b"<h/>\x00") == (b"<h/>", None)
    assert split_payload(b"<h/>\n\n<b>\n\nx</b>\x00") == (b"<h/>", b"<b>\n\nx</b>")


def test_encode_frame_counts_the_nul() -> None:
    frame = encode_frame(b"<h/>", b"<b/>")
    assert frame == b'"\x00\x00\x00\x0b"<h/>\n\n<b/>\x00'
    assert encode_frame(b"<h/>", None) == b'"\x00\x00\x00\x05"<h/>\x00'


@pytest.mark.parametrize("name", [ReaderName.XML, ReaderName.AUTO])
def test_a_reader_built_without_the_accelerator_never_calls_it(
    name: ReaderName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``accelerate=False`` (the ``pure_python`` setting) splits in Python only, also when auto-detection picks XML;
    with it, the same reader hands its reads to the accelerator's splitter (a stand-in here, so this runs whether
    or not the module is built)."""
    calls: list[int] = []

    def splitter(data: bytes, frames: list[bytes], maximum: int) -> int:
        calls.append(len(data))
        return 0  # takes nothing: the Python loop does it all

    monkeypatch.setattr(framing, "_split_frames", splitter)
    stream = b"".join(ALL_FRAMES)
    expected = [c.frame[6:] for c in CAPTURES]
    assert make_reader(name, accelerate=False).feed(stream) == expected
    assert calls == []
    assert make_reader(name).feed(stream) == expected
    assert calls == [len(stream)]
