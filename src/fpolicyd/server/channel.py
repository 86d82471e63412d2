"""A message channel between the daemon and its delivery process: length-prefixed JSON over a socketpair.

Frames are ``u32 big-endian length | JSON object`` (orjson). Both ends run one :class:`Channel` (an asyncio
protocol) on their half of the pair; a frame larger than :data:`MAX_MESSAGE_BYTES` or one that is not a JSON
object is a bug of the other side and closes the channel (:class:`ChannelError`). Nothing here knows what the
messages mean (``server/delivery.py`` and ``server/delivery_child.py`` do).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, cast

import orjson

from fpolicyd.errors import FpolicydError

__all__ = ["MAX_MESSAGE_BYTES", "Channel", "ChannelError", "open_channel"]

#: Largest message either side sends: the hello with the settings and the per-sink figures are a few KiB.
MAX_MESSAGE_BYTES: Final = 16 << 20
_LENGTH: Final = struct.Struct(">I")

Message = dict[str, Any]


class ChannelError(FpolicydError):
    """The other side sent something that is not a message (a bug there): the channel closes."""


class Channel(asyncio.Protocol):
    """One end. ``on_message`` is called for every message in order; ``on_closed`` once, when the other side is
    gone (its process exited or closed its end) or a frame was malformed (with the error)."""

    def __init__(self, on_message: Callable[[Message], None], on_closed: Callable[[Exception | None], None]) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > MAX_MESSAGE_BYTES:
                self._fail(ChannelError(f"message of {length} bytes (limit {MAX_MESSAGE_BYTES})"))
                return
            end = _LENGTH.size + length
            if len(buffer) < end:
                return
            try:
                message = orjson.loads(bytes(buffer[_LENGTH.size : end]))
            except orjson.JSONDecodeError as exc:
                self._fail(ChannelError(f"message is not JSON: {exc}"))
                return
            del buffer[:end]
            if not isinstance(message, dict):
                self._fail(ChannelError("message is not a JSON object"))
                return
            self._on_message(message)
            if self._closed:
                return

    def send(self, message: Message) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        data = orjson.dumps(message)
        transport.write(_LENGTH.pack(len(data)) + data)

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and not self._closed

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: ChannelError) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._report(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._report(exc)

    def _report(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._on_closed(exc)


async def open_channel(
    sock: socket.socket, on_message: Callable[[Message], None], on_closed: Callable[[Exception | None], None]
) -> Channel:
    """Run a :class:`Channel` on ``sock`` (one end of a ``socket.socketpair()``)."""
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(on_message, on_closed), sock=sock)
    return channel
