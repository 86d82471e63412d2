"""Wire capture: the first bytes/frames of each connection as JSON Lines, and a decoder for such files.

Off by default (``capture_enabled``). It exists so that a user on ONTAP 9.15.1+ can hand over what ONTAP really
sends in protobuf mode, whose framing and schema are unpublished (``docs/protocol.md`` §9), and so that any
connection problem can be looked at byte by byte. Every limit is a named setting: bytes and frames per
connection, and total bytes written by the process; once a limit is reached that connection (or all of them)
stops recording and an ``end`` record says why.

One file per connection, ``<capture_dir>/capture-<UTC time>-<seq>-<peer>.jsonl``::

    {"type": "connection", "peer": ..., "reader": <configured reader>, "wall": ..., "mono": ..., "limits": {...}}
    {"type": "framing", "detected": "xml" | "protobuf-length-prefixed" | "protobuf-varint-delimited"}
    {"type": "frame" | "chunk", "seq": n, "mono": ..., "wall": ..., "hex": "...", "truncated": false}
    {"type": "end", "reason": ...}

XML-framed streams are recorded frame by frame, with the text of every ``PathName``, ``DisplayPath`` and
``FilePath`` element passed through the ``mask`` hook (:data:`PathMask`; the default keeps paths as they are,
a data-classification policy plugs in a hash) and the frame length and ``ContentLen`` recomputed, so the
recorded stream is still valid XML framing. Everything else (protobuf, or bytes no framing fits) is recorded
as received, chunk by chunk: where paths sit in a protobuf message is exactly what is not known yet, so a
protobuf capture contains paths in clear; it is meant to be handed over deliberately.

The recorder writes with plain blocking file I/O on the event loop thread: records are small, capped, and
capture is a diagnostic mode, not the production path.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from xml.sax.saxutils import unescape

import orjson

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.obs.log import get_logger
from fpolicyd.protocol.framing import HEADER_BODY_SEPARATOR, XmlFrameReader
from fpolicyd.protocol.readers import AUTO_DETECT_MAX_BYTES, Detection, classify
from fpolicyd.protocol.xml_codec import escape

_log = get_logger("fpolicyd.capture")

if TYPE_CHECKING:
    from fpolicyd.config import Settings

#: Turns one path (entity-decoded text of a path element) into what the capture may keep.
PathMask = Callable[[str], str]


def identity_mask(path: str) -> str:
    """The default :data:`PathMask`: paths are recorded as they are."""
    return path


_PATH_ELEMENT: Final = re.compile(rb"<(PathName|DisplayPath|FilePath)>([^<]*)</\1>")
_CONTENT_LEN: Final = re.compile(rb"<ContentLen>\d+</ContentLen>")
_UNESCAPES: Final = {"&quot;": '"', "&apos;": "'", "&#13;": "\r"}


@dataclass(frozen=True, slots=True)
class CaptureLimits:
    max_bytes_per_connection: int
    max_frames_per_connection: int
    max_total_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_bytes_per_connection", "max_frames_per_connection", "max_total_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"capture {name} must be at least 1")


def mask_xml_payload(payload: bytes, mask: PathMask) -> bytes:
    """``payload`` with every path element's text replaced by ``mask(text)`` and ``ContentLen`` fixed up."""

    def replace(match: re.Match[bytes]) -> bytes:
        text = unescape(match.group(2).decode("utf-8", "replace"), _UNESCAPES)
        tag = match.group(1)
        return b"<" + tag + b">" + escape(mask(text)).encode("utf-8") + b"</" + tag + b">"

    masked = _PATH_ELEMENT.sub(replace, payload)
    if masked == payload:
        return payload
    cut = masked.find(HEADER_BODY_SEPARATOR)
    if cut < 0:
        return masked
    header, body = masked[:cut], masked[cut + len(HEADER_BODY_SEPARATOR) :]
    body_len = len(body) - 1 if body.endswith(b"\x00") else len(body)
    header = _CONTENT_LEN.sub(b"<ContentLen>%d</ContentLen>" % body_len, header, count=1)
    return header + HEADER_BODY_SEPARATOR + body


def _xml_frame(payload: bytes) -> bytes:
    return b'"' + len(payload).to_bytes(4, "big") + b'"' + payload


class CaptureRecorder:
    """Creates one :class:`ConnectionCapture` per connection and enforces the process-wide byte limit."""

    def __init__(
        self,
        directory: Path,
        limits: CaptureLimits,
        *,
        max_frame_bytes: int,
        mask: PathMask = identity_mask,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.limits = limits
        self.max_frame_bytes = max_frame_bytes
        self.mask = mask
        self.monotonic = monotonic
        self.wall = wall
        self.total_bytes = 0
        self._seq = 0

    @property
    def exhausted(self) -> bool:
        return self.total_bytes >= self.limits.max_total_bytes

    def open(self, peer: str, reader: str) -> ConnectionCapture | None:
        """Start recording a new connection; None once the total limit is reached, or when the file cannot be
        created (a full disk: a capture is a diagnostic, it never holds up or closes the connection)."""
        if self.exhausted:
            return None
        self._seq += 1
        stamp = datetime.fromtimestamp(self.wall(), UTC).strftime("%Y%m%dT%H%M%S")
        safe_peer = re.sub(r"[^0-9A-Za-z.]+", "_", peer)
        path = self.directory / f"capture-{stamp}-{self._seq:06d}-{safe_peer}.jsonl"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            capture = ConnectionCapture(self, path, peer)
        except OSError as exc:
            _log.error("capture_not_started", file=str(path), error=str(exc), detail="the connection is not recorded")
            return None
        capture.write(
            {
                "type": "connection",
                "peer": peer,
                "reader": reader,
                "limits": {
                    "max_bytes_per_connection": self.limits.max_bytes_per_connection,
                    "max_frames_per_connection": self.limits.max_frames_per_connection,
                    "max_total_bytes": self.limits.max_total_bytes,
                },
                "masked": "xml path elements" if self.mask is not identity_mask else "nothing",
            }
        )
        return capture


class ConnectionCapture:
    """Records what one connection received until a limit is reached or it closes."""

    def __init__(self, recorder: CaptureRecorder, path: Path, peer: str) -> None:
        self.path = path
        self.peer = peer
        self._recorder = recorder
        self._file: IO[bytes] | None = path.open("xb")
        self._head = b""
        self._decided = False
        self._xml: XmlFrameReader | None = None
        self.bytes_recorded = 0
        self.records = 0

    @property
    def active(self) -> bool:
        return self._file is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        recorder = self._recorder
        record.setdefault("mono", round(recorder.monotonic(), 6))
        record.setdefault("wall", datetime.fromtimestamp(recorder.wall(), UTC).isoformat(timespec="microseconds"))
        line = orjson.dumps(record) + b"\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:  # a full disk: stop recording this connection, never disturb it
            _log.error("capture_stopped", file=str(self.path), error=str(exc), detail="the rest is not recorded")
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            return
        recorder.total_bytes += len(line)

    def received(self, data: bytes) -> None:
        """Record ``data`` (what one read returned), masked and split as the module docstring says."""
        if self._file is None or not data:
            return
        if not self._decided:
            self._head += data
            try:
                detection: Detection | None = classify(
                    self._head[:AUTO_DETECT_MAX_BYTES], self._recorder.max_frame_bytes
                )
            except RemoteProtocolError:
                detection = None  # fits no framing: recorded raw, as received
            if detection is Detection.NEED_MORE:
                return
            self.write({"type": "framing", "detected": detection.value if detection is not None else None})
            self._decided = True
            data, self._head = self._head, b""
            if detection is Detection.XML:
                self._xml = XmlFrameReader(self._recorder.max_frame_bytes)
        if self._xml is None:
            self._record("chunk", data)
            return
        try:
            payloads = self._xml.feed(data)
        except RemoteProtocolError as exc:
            self.close(f"xml_framing_error: {exc}")
            return
        for payload in payloads:
            if not self.active:
                return
            self._record("frame", _xml_frame(mask_xml_payload(payload, self._recorder.mask)))

    def _record(self, kind: str, data: bytes) -> None:
        limits = self._recorder.limits
        room = limits.max_bytes_per_connection - self.bytes_recorded
        truncated = len(data) > room
        data = data[:room]
        self.write({"type": kind, "seq": self.records, "hex": data.hex(), "truncated": truncated})
        self.records += 1
        self.bytes_recorded += len(data)
        if self.bytes_recorded >= limits.max_bytes_per_connection:
            self.close("bytes_limit")
        elif self.records >= limits.max_frames_per_connection:
            self.close("frames_limit")
        elif self._recorder.exhausted:
            self.close("total_bytes_limit")

    def close(self, reason: str = "connection_closed") -> None:
        if self._file is None:
            return
        self.write({"type": "end", "reason": reason, "records": self.records, "bytes": self.bytes_recorded})
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class CaptureFile:
    """A capture read back: its header record and the received byte stream it holds."""

    header: dict[str, Any]
    stream: bytes
    records: int
    truncated: bool
    end: dict[str, Any] | None


def read_capture(path: Path) -> CaptureFile:
    """Read one capture file; raises ValueError naming the line when it is not a capture."""
    header: dict[str, Any] = {}
    parts: list[bytes] = []
    truncated = False
    end: dict[str, Any] | None = None
    records = 0
    for number, line in enumerate(_lines(path), start=1):
        try:
            record = orjson.loads(line)
            kind = record["type"]
            if kind == "connection":
                header = record
            elif kind in ("frame", "chunk"):
                parts.append(bytes.fromhex(record["hex"]))
                truncated = truncated or bool(record.get("truncated"))
                records += 1
            elif kind == "end":
                end = record
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a capture record: {exc}") from None
    if not header:
        raise ValueError(f"{path}: no connection record; not a capture file")
    return CaptureFile(header, b"".join(parts), records, truncated, end)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield line


def capture_recorder(settings: Settings, mask: PathMask = identity_mask) -> CaptureRecorder | None:
    """The daemon's recorder when ``capture_enabled``, else None.

    ``mask`` is the hook for data classification: a function from a path to what the capture may keep
    (e.g. a keyed hash); the default records paths as they are.
    """
    if not settings.capture_enabled:
        return None
    limits = CaptureLimits(
        max_bytes_per_connection=settings.capture_max_bytes_per_connection,
        max_frames_per_connection=settings.capture_max_frames_per_connection,
        max_total_bytes=settings.capture_max_total_bytes,
    )
    return CaptureRecorder(settings.effective_capture_dir, limits, max_frame_bytes=settings.max_frame_bytes, mask=mask)
