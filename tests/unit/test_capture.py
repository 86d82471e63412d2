"""Wire capture: capped JSON Lines files, the path-mask hook, and `fpolicyd capture decode`."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from fpolicyd.cli.capture import decode_capture
from fpolicyd.cli.main import main
from fpolicyd.protocol import proto_codec
from fpolicyd.protocol.messages import Handshake, ScreenRequest
from fpolicyd.protocol.readers import LengthPrefixedReader, make_reader
from fpolicyd.protocol.xml_codec import decode_payload
from fpolicyd.server.capture import CaptureLimits, CaptureRecorder, mask_xml_payload, read_capture
from support.captures import KEEP_ALIVE, NEGO_REQ, SMB_OPEN, SMB_REN

XML_STREAM = NEGO_REQ.frame + KEEP_ALIVE.frame + SMB_OPEN.frame + SMB_REN.frame


def fake_mask(path: str) -> str:
    """Stands in for the data-classification hash: keeps the length, hides the name."""
    return f"masked-{len(path)}"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def _recorder(tmp_path: Path, **limits: int) -> CaptureRecorder:
    defaults = {"max_bytes_per_connection": 1 << 20, "max_frames_per_connection": 100, "max_total_bytes": 1 << 20}
    defaults.update(limits)
    return CaptureRecorder(
        tmp_path / "capture",
        CaptureLimits(**defaults),
        max_frame_bytes=1 << 20,
        mask=fake_mask,
        monotonic=Clock(),
        wall=Clock(),
    )


def _records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_xml_is_recorded_frame_by_frame_with_paths_masked(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    capture = recorder.open("10.0.0.1:40000", "auto")
    assert capture is not None
    for index in range(0, len(XML_STREAM), 7):  # split across reads, as TCP does
        capture.received(XML_STREAM[index : index + 7])
    capture.close()
    records = _records(capture.path)
    assert records[0]["type"] == "connection"
    assert records[0]["peer"] == "10.0.0.1:40000"
    assert records[0]["masked"] == "xml path elements"
    assert records[1] == {"type": "framing", "detected": "xml", "mono": records[1]["mono"], "wall": records[1]["wall"]}
    frames = [r for r in records if r["type"] == "frame"]
    assert len(frames) == 4
    assert all(isinstance(r["mono"], float) and isinstance(r["wall"], str) for r in frames)
    assert records[-1]["type"] == "end"
    stream = read_capture(capture.path).stream
    payloads = make_reader("xml").feed(stream)
    renamed = decode_payload(payloads[3])
    assert renamed.header.content_len == renamed.body_length  # ContentLen recomputed after masking
    request = renamed.message
    assert isinstance(request, ScreenRequest)
    original = decode_payload(SMB_REN.payload).message
    assert isinstance(original, ScreenRequest)
    assert [p.name for p in request.common.access_paths] == [fake_mask(p.name) for p in original.common.access_paths]
    assert [p.name for p in request.target_paths] == [fake_mask(p.name) for p in original.target_paths]
    assert request.display_path == fake_mask(original.display_path or "")
    assert b"renamed" not in stream


def test_mask_escapes_what_it_returns() -> None:
    payload = SMB_REN.payload
    masked = mask_xml_payload(payload, lambda path: "<&>")
    request = decode_payload(masked).message
    assert isinstance(request, ScreenRequest)
    assert {p.name for p in request.common.access_paths} == {"<&>"}


def test_protobuf_is_recorded_raw_and_decode_shows_fields(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path)
    capture = recorder.open("10.0.0.2:1", "auto")
    assert capture is not None
    stream = LengthPrefixedReader.frame(proto_codec.encode_message(Handshake("vs", "pol", "sid", ("1.0",))))
    capture.received(stream[:3])
    capture.received(stream[3:])
    capture.close()
    records = _records(capture.path)
    assert [r["type"] for r in records] == ["connection", "framing", "chunk", "end"]
    assert records[1]["detected"] == "protobuf-length-prefixed"
    read = read_capture(capture.path)
    assert read.stream == stream
    out = io.StringIO()
    decode_capture(read.stream, read.header, 1 << 20, 10, out)
    text = out.getvalue()
    assert "== reader protobuf-length-prefixed: 1 frame(s)" in text
    assert "== reader auto -> protobuf-length-prefixed: 1 frame(s)" in text
    assert "== reader xml: 0 frame(s), framing error bad_marker" in text
    assert "4: len[3] '1.0'" in text
    assert "Handshake(vs_uuid='vs'" in text


def test_bytes_no_framing_fits_are_recorded_raw(tmp_path: Path) -> None:
    capture = _recorder(tmp_path).open("p", "xml")
    assert capture is not None
    capture.received(b"GET / HTTP/1.1\r\n\r\n\x00")
    capture.close()
    assert read_capture(capture.path).stream == b"GET / HTTP/1.1\r\n\r\n\x00"


def test_limits_per_connection_and_in_total(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path, max_bytes_per_connection=10)
    capture = recorder.open("p", "auto")
    assert capture is not None
    capture.received(b"\x00\x00\x00\x20\x0a" + b"x" * 40)
    assert not capture.active
    records = _records(capture.path)
    assert records[2]["truncated"] is True
    assert len(bytes.fromhex(str(records[2]["hex"]))) == 10
    assert records[-1]["reason"] == "bytes_limit"

    recorder = _recorder(tmp_path / "frames", max_frames_per_connection=2)
    capture = recorder.open("p", "xml")
    assert capture is not None
    capture.received(XML_STREAM)
    assert [r["type"] for r in _records(capture.path)].count("frame") == 2
    assert _records(capture.path)[-1]["reason"] == "frames_limit"

    recorder = _recorder(tmp_path / "total", max_total_bytes=2048)
    first = recorder.open("a", "xml")
    assert first is not None
    first.received(XML_STREAM)
    assert _records(first.path)[-1]["reason"] == "total_bytes_limit"
    assert recorder.open("b", "xml") is None
    files = list((tmp_path / "total" / "capture").iterdir())
    assert len(files) == 1
    assert files[0].stat().st_size <= 2048 + 4096  # the limit is checked per record; one record may cross it


def test_capture_decode_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = _recorder(tmp_path)
    capture = recorder.open("10.0.0.1:40000", "xml")
    assert capture is not None
    capture.received(XML_STREAM)
    capture.close()
    assert main(["capture", "decode", str(capture.path)]) == 0
    out = capsys.readouterr().out
    assert "== reader xml: 4 frame(s)" in out
    assert "== reader auto -> xml: 4 frame(s)" in out
    assert "KeepAlive()" in out
    assert "protobuf-length-prefixed: 0 frame(s), framing error" in out


def test_capture_decode_of_a_non_capture_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "x.jsonl"
    bogus.write_text('{"hello": 1}\n')
    assert main(["capture", "decode", str(bogus)]) == 2
    assert "not a capture" in capsys.readouterr().err
