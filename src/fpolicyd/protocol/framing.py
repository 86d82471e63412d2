"""XML-mode frame reader and writer (``docs/protocol.md`` §1), sans-IO; and what every frame reader shares.

:class:`FrameReader` is what the connection needs of a reader, :class:`BufferedFrameReader` the setup and the
poison rule the XML reader and the protobuf readers (:mod:`fpolicyd.protocol.readers`) share.

A frame is ``"`` + u32 big-endian payload length + ``"`` + payload. The payload is the header XML, ``\\n\\n``,
the body XML and one NUL byte; a header-only message (KEEP_ALIVE) is the header XML and the NUL.

The reader never scans forward to resynchronise: a wrong marker byte is a peer error and the connection is
closed (that resync trick is what turned a public server's protobuf test into a 53 MB "length"). The length is
checked against the configured maximum *before* anything past the prefix is buffered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from fpolicyd.errors import RemoteProtocolError

_split_frames: Callable[[bytes, list[bytes], int], int] | None
try:
    # The loop of XmlFrameReader.feed over the complete, valid frames of a read, in C (a quarter of its CPU).
    from fpolicyd._speedups import split_frames as _split_frames
except ImportError:  # not built here: the loop below does it all
    _split_frames = None

MARKER: Final = 0x22  # ASCII '"', NetApp's "record marker"
PREFIX_LEN: Final = 6
HEADER_BODY_SEPARATOR: Final = b"\n\n"
#: No maximum is published; YHU caps at 10 MiB, real notifications are ~1–2 KiB.
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20


class FrameReader(Protocol):
    """What every frame reader offers the connection (by name: :func:`fpolicyd.protocol.readers.make_reader`)."""

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the complete payloads now available, in order."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        ...


class BufferedFrameReader:
    """What every buffering frame reader shares: its setup (maximum, buffer, error) and the poison rule.

    After a :class:`RemoteProtocolError` the reader is poisoned (:meth:`_poison`): its buffer is dropped and
    every later ``feed`` raises the same error, so a caller that forgets to close cannot read garbage as frames.
    Each subclass's ``feed`` starts with ``if self._error is not None: raise self._error`` and calls
    :meth:`_poison` when its splitting raises; the splitting stays inline in ``feed`` (one call less per read
    on the hot path).
    """

    __slots__ = ("_buf", "_error", "_max")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _poison(self, exc: RemoteProtocolError) -> None:
        """Remember the peer error for every later ``feed`` and drop what was buffered."""
        self._error = exc
        self._buf.clear()


class XmlFrameReader(BufferedFrameReader):
    """Splits a byte stream into XML-mode payloads. ``accelerate=False`` splits in Python only, even where the C
    accelerator is built (the ``pure_python`` setting)."""

    __slots__ = ("_split",)

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, accelerate: bool = True) -> None:
        super().__init__(max_frame_bytes)
        self._split = _split_frames if accelerate else None

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        frames: list[bytes] = []
        try:
            if self._buf:
                data = self._complete_pending(data, frames)
            # The accelerator takes the leading complete frames with a valid prefix; the loop takes what it left (it
            # raises for a bad prefix, keeps an incomplete frame), so the frames and errors are the loop's alone.
            split = self._split
            pos = 0 if split is None else split(data, frames, self._max)
            end = len(data)
            while end - pos >= PREFIX_LEN:
                length = self._check_prefix(data[pos : pos + PREFIX_LEN])
                start = pos + PREFIX_LEN
                if end - start < length:
                    break
                pos = start + length
                frames.append(data[start:pos])
        except RemoteProtocolError as exc:
            self._poison(exc)
            raise
        if pos < end:
            self._buf += data[pos:]
        return frames

    def _check_prefix(self, prefix: bytes | bytearray) -> int:
        if prefix[0] != MARKER or prefix[5] != MARKER:
            raise RemoteProtocolError("bad_marker", f"expected 0x22 at frame start, got {bytes(prefix)!r}")
        length = int.from_bytes(prefix[1:5], "big")
        if length > self._max:
            raise RemoteProtocolError("frame_too_large", f"frame length {length} exceeds the maximum {self._max}")
        if length == 0:
            raise RemoteProtocolError("empty_frame", "frame length 0")
        return length

    def _complete_pending(self, data: bytes, frames: list[bytes]) -> bytes:
        """Finish the frame already started in the buffer; return the bytes of ``data`` left after it.

        Only the bytes that frame needs are copied into the buffer, so the rest of a large read is split
        without going through it.
        """
        buf = self._buf
        if len(buf) < PREFIX_LEN:
            take = PREFIX_LEN - len(buf)
            buf += data[:take]
            data = data[take:]
            if len(buf) < PREFIX_LEN:
                return data
            self._check_prefix(buf)
        total = PREFIX_LEN + int.from_bytes(buf[1:5], "big")
        need = total - len(buf)
        buf += data[:need]
        if len(buf) < total:
            return b""
        frames.append(bytes(buf[PREFIX_LEN:]))
        buf.clear()
        return data[need:]


def encode_frame(header_xml: bytes, body_xml: bytes | None) -> bytes:
    """Frame one message exactly as ONTAP does: the NUL is sent and counted in the length."""
    if body_xml is None:
        payload_len = len(header_xml) + 1
        return b"".join(
            (b'"', payload_len.to_bytes(4, "big"), b'"', header_xml, b"\x00"),
        )
    payload_len = len(header_xml) + 2 + len(body_xml) + 1
    return b"".join((b'"', payload_len.to_bytes(4, "big"), b'"', header_xml, HEADER_BODY_SEPARATOR, body_xml, b"\x00"))


def split_payload(payload: bytes) -> tuple[bytes, bytes | None]:
    """Return (header XML, body XML or None) of one payload.

    One trailing NUL is stripped if present (ONTAP always sends it; some servers do not, and ONTAP accepts
    that, so we accept it too). No separator means a header-only message.
    """
    if payload.endswith(b"\x00"):
        payload = payload[:-1]
    cut = payload.find(HEADER_BODY_SEPARATOR)
    if cut < 0:
        return payload, None
    return payload[:cut], payload[cut + 2 :]
