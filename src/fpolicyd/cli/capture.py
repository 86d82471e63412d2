"""``fpolicyd capture decode FILE``: what each frame reader makes of a wire capture (see
:mod:`fpolicyd.server.capture`).

For every reader (xml, protobuf-length-prefixed, protobuf-varint-delimited, auto) it prints the frames found
and where framing failed; for each frame the message the codec decodes (XML, or protobuf on the provisional
schema) and, for protobuf, a raw field dump made without any schema (field number, wire type, value, nested
messages tried recursively). That dump is what confirms or corrects ``proto/fpolicy.proto``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fpolicyd.errors import ConfigError, RemoteProtocolError
from fpolicyd.protocol import proto_codec, xml_codec
from fpolicyd.protocol.framing import DEFAULT_MAX_FRAME_BYTES
from fpolicyd.protocol.readers import ReaderName, make_reader, resolved_reader
from fpolicyd.server.capture import read_capture

#: Frames shown per reader unless --max-frames says otherwise (a capture holds at most a few hundred).
DEFAULT_SHOWN_FRAMES = 50


def add_capture_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "capture",
        help="inspect wire captures (capture_enabled = true records them)",
        description="Inspect a wire capture written by fpolicyd (capture_enabled = true). `decode FILE` shows "
        "what every frame reader makes of it, with a schema-less protobuf field dump.",
    )
    actions = parser.add_subparsers(dest="capture_action", required=True)
    decode = actions.add_parser("decode", help="show frames and messages each reader finds in FILE")
    decode.add_argument("file", type=Path, help="a capture-*.jsonl file from <capture_dir>")
    decode.add_argument(
        "--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES, help="largest frame the readers accept"
    )
    decode.add_argument(
        "--max-frames", type=int, default=DEFAULT_SHOWN_FRAMES, help="frames shown per reader (default 50)"
    )
    return parser


def run_capture(ns: argparse.Namespace) -> int:
    """Raises ConfigError for a file that cannot be read as a capture (exit 2)."""
    try:
        capture = read_capture(ns.file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"capture decode: {exc}") from None
    decode_capture(capture.stream, capture.header, ns.max_frame_bytes, ns.max_frames, sys.stdout)
    if capture.truncated:
        sys.stdout.write("note: the capture was truncated at its byte limit; the last frame may be incomplete\n")
    if capture.end is not None:
        sys.stdout.write(f"capture ended: {capture.end.get('reason')}\n")
    return 0


def decode_capture(stream: bytes, header: dict[str, Any], max_frame_bytes: int, max_frames: int, out: TextIO) -> None:
    out.write(
        f"capture of {header.get('peer')} (configured reader {header.get('reader')}), {len(stream)} bytes received\n"
        f"first bytes: {stream[:32].hex(' ')}\n"
    )
    for name in ReaderName:
        reader = make_reader(name, max_frame_bytes)
        error: RemoteProtocolError | None = None
        try:
            frames = reader.feed(stream)
        except RemoteProtocolError as exc:
            frames, error = [], exc
        resolved = resolved_reader(reader)
        label = f"{name.value}" + (f" -> {resolved.value}" if name is ReaderName.AUTO and resolved else "")
        out.write(f"\n== reader {label}: {len(frames)} frame(s)")
        if error is not None:
            out.write(f", framing error {error.reason}: {error.detail}")
        elif reader.buffered:
            out.write(f", {reader.buffered} byte(s) left incomplete")
        out.write("\n")
        is_xml = resolved is ReaderName.XML
        for index, payload in enumerate(frames[:max_frames]):
            out.write(f"-- frame {index}: {len(payload)} bytes\n")
            for line in _describe(payload, is_xml):
                out.write(f"   {line}\n")
        if len(frames) > max_frames:
            out.write(f"   ... {len(frames) - max_frames} more frame(s)\n")


def _describe(payload: bytes, is_xml: bool) -> list[str]:
    decode: Callable[[bytes], xml_codec.Decoded] = xml_codec.decode_payload if is_xml else proto_codec.decode_payload
    lines: list[str] = []
    try:
        decoded = decode(payload)
        lines.append(f"decoded ({'XML' if is_xml else 'provisional protobuf schema'}): {decoded.message!r}")
    except RemoteProtocolError as exc:
        lines.append(f"not decoded ({exc.reason}): {exc.detail}")
    if not is_xml:
        try:
            fields = proto_codec.walk_fields(payload)
        except proto_codec.WireFormatError as exc:
            lines.append(f"raw protobuf fields: not a protobuf message ({exc}); hex {payload[:64].hex(' ')}")
        else:
            lines.append("raw protobuf fields (no schema):")
            lines.extend(f"  {line}" for line in proto_codec.dump_fields(fields))
    return lines
