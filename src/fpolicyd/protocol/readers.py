"""Frame readers by name, auto-detection, and the per-connection codec that goes with the chosen reader. Sans-IO.

Four readers behind :class:`~fpolicyd.protocol.framing.FrameReader`:

- ``xml``: ONTAP's XML framing, ``"`` + u32 BE length + ``"`` (:class:`~fpolicyd.protocol.framing.XmlFrameReader`);
- ``protobuf-length-prefixed``: u32 big-endian length + payload;
- ``protobuf-varint-delimited``: protobuf varint length + payload (Java's ``writeDelimitedTo``);
- ``auto``: decides from the first bytes of the connection (:func:`classify`), then behaves as that reader.

Neither protobuf framing is confirmed for ONTAP (``docs/protocol.md`` §9); both are what a protobuf peer
would plausibly use. Every reader checks the length against the maximum *before* buffering the frame, refuses a
zero length (an FPolicy message always says what it is), never scans forward to resynchronise, and is poisoned
after a peer error (every later ``feed`` raises the same :class:`RemoteProtocolError`).

Why auto never mistakes one for the other (``max_frame_bytes`` ≤ 64 MiB < 2**26):
- XML framing starts ``22 00|01|02|03`` (``"`` then the high byte of a length < 2**26). As a varint-delimited
  stream that would be a 34-byte message whose first tag byte is < 8, i.e. field number 0, which protobuf
  forbids; as a length-prefixed one it would be a length ≥ 0x22000000, far over any maximum. XML is only
  chosen on the whole 11-byte signature ``"`` + length in 1..max + ``"`` + ``<?xml``.
- A length-prefixed stream starts ``00`` (lengths < 16 MiB), which as a varint length is 0 (refused) and is
  not ``"``. Length-prefixed frames of 16 MiB or more cannot be auto-detected; name the reader explicitly.
- Anything else is a varint-delimited candidate; it is chosen when the varint is a length in 1..max followed by
  a valid protobuf tag (field number ≥ 1, wire type 0, 1, 2 or 5).
So the decision needs at most :data:`AUTO_DETECT_MAX_BYTES` bytes; bytes that fit none of the three close the
connection with ``RemoteProtocolError("unknown_framing")``, and fewer bytes than needed just wait (the
session's handshake timeout bounds that wait).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import proto_codec, xml_codec
from fpolicyd.protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    MARKER,
    BufferedFrameReader,
    FrameReader,
    XmlFrameReader,
)
from fpolicyd.protocol.messages import Message
from fpolicyd.protocol.varint import VarintEnd, decode_varint, encode_varint


class ReaderName(StrEnum):
    XML = "xml"
    PROTOBUF_LENGTH_PREFIXED = "protobuf-length-prefixed"
    PROTOBUF_VARINT_DELIMITED = "protobuf-varint-delimited"
    AUTO = "auto"


class WireFormat(StrEnum):
    """What a connection's payloads are, once known (the setting, which may say ``auto``, is
    :class:`fpolicyd.config.EngineFormat`)."""

    XML = "xml"
    PROTOBUF = "protobuf"


#: Bytes auto-detection may need: ``"`` + 4-byte length + ``"`` + ``<?xml``.
AUTO_DETECT_MAX_BYTES: Final = 11
XML_SIGNATURE: Final = b"<?xml"
LENGTH_PREFIX_LEN: Final = 4
#: A varint length never needs more bytes than this for a length < 2**35 (far above any maximum).
MAX_VARINT_PREFIX_LEN: Final = 5
_VALID_WIRE_TYPES: Final = frozenset({0, 1, 2, 5})


def _check_length(length: int, max_frame_bytes: int) -> None:
    if length > max_frame_bytes:
        raise RemoteProtocolError("frame_too_large", f"frame length {length} exceeds the maximum {max_frame_bytes}")
    if length == 0:
        raise RemoteProtocolError("empty_frame", "frame length 0")


class _PrefixedReader(ABC, BufferedFrameReader):
    """Shared splitting for the two protobuf framings; subclasses parse the length prefix."""

    __slots__ = ()

    @abstractmethod
    def _prefix(self, data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
        """(payload length, payload start) of the frame at ``pos``, None if the prefix is incomplete."""

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        frames: list[bytes] = []
        buf = self._buf
        buf += data
        pos = 0
        try:
            while True:
                prefix = self._prefix(buf, pos)
                if prefix is None:
                    break
                length, start = prefix
                if len(buf) - start < length:
                    break
                frames.append(bytes(buf[start : start + length]))
                pos = start + length
        except RemoteProtocolError as exc:
            self._poison(exc)
            raise
        del buf[:pos]
        return frames


class LengthPrefixedReader(_PrefixedReader):
    """Protobuf payloads each preceded by a u32 big-endian length."""

    __slots__ = ()

    def _prefix(self, data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
        if len(data) - pos < LENGTH_PREFIX_LEN:
            return None
        length = int.from_bytes(data[pos : pos + LENGTH_PREFIX_LEN], "big")
        _check_length(length, self._max)
        return length, pos + LENGTH_PREFIX_LEN

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return len(payload).to_bytes(LENGTH_PREFIX_LEN, "big") + payload


class VarintDelimitedReader(_PrefixedReader):
    """Protobuf payloads each preceded by a base-128 varint length (``writeDelimitedTo``)."""

    __slots__ = ()

    def _prefix(self, data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
        # decode_varint(data, pos, MAX_VARINT_PREFIX_LEN), inline: a call per frame is measurably slower here
        # (tests/property/test_varint_props.py checks that both read every input alike).
        length = 0
        end = len(data)
        for index in range(MAX_VARINT_PREFIX_LEN):
            if pos + index >= end:
                # Refuse an oversized length as soon as its bytes so far prove it, not after buffering it.
                if length > self._max:
                    _check_length(length, self._max)
                return None
            byte = data[pos + index]
            length |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                _check_length(length, self._max)
                return length, pos + index + 1
        raise RemoteProtocolError("frame_too_large", f"varint length longer than {MAX_VARINT_PREFIX_LEN} bytes")

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return encode_varint(len(payload)) + payload


# --------------------------------------------------------------------------------------------- auto-detect


class Detection(StrEnum):
    NEED_MORE = "need_more"
    XML = ReaderName.XML.value
    LENGTH_PREFIXED = ReaderName.PROTOBUF_LENGTH_PREFIXED.value
    VARINT_DELIMITED = ReaderName.PROTOBUF_VARINT_DELIMITED.value


def _valid_tag(byte: int) -> bool:
    """Whether ``byte`` can be the first byte of a protobuf field key (field ≥ 1, a wire type proto3 uses)."""
    return byte >> 3 != 0 and (byte & 7) in _VALID_WIRE_TYPES


def _unknown(head: bytes, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        "unknown_framing",
        f"first bytes {head[:AUTO_DETECT_MAX_BYTES].hex(' ')} fit neither XML framing ('\"' + length + '\"' + "
        f"'<?xml') nor protobuf length-prefixed / varint-delimited framing: {why}",
    )


def classify(head: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Detection:
    """Decide the framing of a connection from its first bytes (see the module docstring for the rules).

    Returns :attr:`Detection.NEED_MORE` while ``head`` is too short to decide (never for more than
    :data:`AUTO_DETECT_MAX_BYTES` bytes); raises ``RemoteProtocolError("unknown_framing")`` when no framing fits.
    """
    if not head:
        return Detection.NEED_MORE
    first = head[0]
    if first == MARKER and (len(head) < 2 or not _valid_tag(head[1])):
        if len(head) < AUTO_DETECT_MAX_BYTES:
            return Detection.NEED_MORE
        length = int.from_bytes(head[1:5], "big")
        if head[5] != MARKER:
            raise _unknown(head, "byte 5 is not '\"'")
        if not 1 <= length <= max_frame_bytes:
            raise _unknown(head, f"XML frame length {length} outside 1..{max_frame_bytes}")
        if head[6:AUTO_DETECT_MAX_BYTES] != XML_SIGNATURE:
            raise _unknown(head, "XML payload does not start with '<?xml'")
        return Detection.XML
    if first == 0:
        if len(head) < LENGTH_PREFIX_LEN + 1:
            return Detection.NEED_MORE
        length = int.from_bytes(head[:LENGTH_PREFIX_LEN], "big")
        if not 1 <= length <= max_frame_bytes:
            raise _unknown(head, f"length-prefixed frame length {length} outside 1..{max_frame_bytes}")
        if not _valid_tag(head[LENGTH_PREFIX_LEN]):
            raise _unknown(head, f"byte {LENGTH_PREFIX_LEN} is not a protobuf field key")
        return Detection.LENGTH_PREFIXED
    length, end = decode_varint(head, 0, MAX_VARINT_PREFIX_LEN)
    if end == VarintEnd.TRUNCATED:
        return Detection.NEED_MORE
    if end == VarintEnd.TOO_LONG:
        raise _unknown(head, f"varint length longer than {MAX_VARINT_PREFIX_LEN} bytes")
    if not 1 <= length <= max_frame_bytes:
        raise _unknown(head, f"varint frame length {length} outside 1..{max_frame_bytes}")
    if end >= len(head):
        return Detection.NEED_MORE
    if not _valid_tag(head[end]):
        raise _unknown(head, f"byte {end} is not a protobuf field key")
    return Detection.VARINT_DELIMITED


class AutoReader:
    """Buffers the first bytes until :func:`classify` decides, then hands everything to the chosen reader."""

    __slots__ = ("_accelerate", "_chosen", "_error", "_head", "_max", "_reader")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, accelerate: bool = True) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._max = max_frame_bytes
        self._accelerate = accelerate
        self._head = b""
        self._reader: FrameReader | None = None
        self._chosen: ReaderName | None = None
        self._error: RemoteProtocolError | None = None

    @property
    def chosen(self) -> ReaderName | None:
        """The reader auto-detection picked, None while undecided."""
        return self._chosen

    @property
    def buffered(self) -> int:
        return self._reader.buffered if self._reader is not None else len(self._head)

    def feed(self, data: bytes) -> list[bytes]:
        if self._reader is not None:
            return self._reader.feed(data)
        if self._error is not None:
            raise self._error
        head = self._head + data
        try:
            detection = classify(head[:AUTO_DETECT_MAX_BYTES], self._max)
        except RemoteProtocolError as exc:
            self._error = exc
            self._head = b""
            raise
        if detection is Detection.NEED_MORE:
            self._head = head
            return []
        self._chosen = ReaderName(detection.value)
        self._reader = make_reader(self._chosen, self._max, accelerate=self._accelerate)
        self._head = b""
        return self._reader.feed(head)


def make_reader(
    name: ReaderName | str, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, accelerate: bool = True
) -> FrameReader:
    """A new reader by name; a name that is not a :class:`ReaderName` raises ValueError listing the names.
    ``accelerate=False``: the XML reader (also when auto-detection picks it) splits without the C accelerator."""
    try:
        reader_name = ReaderName(name)
    except ValueError:
        raise ValueError(f"unknown frame reader {name!r}; one of {', '.join(r.value for r in ReaderName)}") from None
    if reader_name is ReaderName.XML:
        return XmlFrameReader(max_frame_bytes, accelerate=accelerate)
    if reader_name is ReaderName.AUTO:
        return AutoReader(max_frame_bytes, accelerate=accelerate)
    factory: dict[ReaderName, Callable[[int], FrameReader]] = {
        ReaderName.PROTOBUF_LENGTH_PREFIXED: LengthPrefixedReader,
        ReaderName.PROTOBUF_VARINT_DELIMITED: VarintDelimitedReader,
    }
    return factory[reader_name](max_frame_bytes)


def resolved_reader(reader: FrameReader) -> ReaderName | None:
    """The concrete framing a reader uses: its own, or what an :class:`AutoReader` detected (None: not yet)."""
    if isinstance(reader, AutoReader):
        return reader.chosen
    if isinstance(reader, LengthPrefixedReader):
        return ReaderName.PROTOBUF_LENGTH_PREFIXED
    if isinstance(reader, VarintDelimitedReader):
        return ReaderName.PROTOBUF_VARINT_DELIMITED
    return ReaderName.XML


# --------------------------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class ConnectionCodec:
    """Decode and encode in the format of one connection's reader (for :class:`~fpolicyd.protocol.session.Session`).

    With ``auto`` the format is only known once the first bytes arrived; the session decodes nothing before
    that and encodes only replies to what it decoded, so asking the reader at each call is always answered.
    """

    reader: FrameReader

    def wire_format(self) -> WireFormat:
        name = resolved_reader(self.reader)
        if name is None:
            raise RemoteProtocolError("unknown_framing", "no framing detected yet")
        return WireFormat.XML if name is ReaderName.XML else WireFormat.PROTOBUF

    def decode(self, payload: bytes) -> xml_codec.Decoded:
        if self.wire_format() is WireFormat.XML:
            return xml_codec.decode_payload(payload)
        return proto_codec.decode_payload(payload)

    def encode(self, msg: Message) -> bytes:
        """One framed message, ready to write."""
        name = resolved_reader(self.reader)
        if name is ReaderName.PROTOBUF_LENGTH_PREFIXED:
            return LengthPrefixedReader.frame(proto_codec.encode_message(msg))
        if name is ReaderName.PROTOBUF_VARINT_DELIMITED:
            return VarintDelimitedReader.frame(proto_codec.encode_message(msg))
        return xml_codec.encode_message(msg)


def codec_for(reader: FrameReader) -> tuple[Callable[[bytes], xml_codec.Decoded], Callable[[Message], bytes]]:
    """(decode, encode) for a session on a connection read by ``reader``."""
    codec = ConnectionCodec(reader)
    return codec.decode, codec.encode


def fast_screen_for(reader: FrameReader) -> xml_codec.FastScreen | None:
    """The session's fast SCREEN_REQ reader for a connection read by ``reader`` (XML only; None for protobuf).
    With ``auto`` the format is checked at each call, as :meth:`ConnectionCodec.decode` does."""
    if isinstance(reader, XmlFrameReader):
        return xml_codec.fast_screen
    if isinstance(reader, AutoReader):
        return xml_codec.SwitchedFastScreen(lambda: resolved_reader(reader) is ReaderName.XML)
    return None
