"""One connection to an FPolicy server, speaking as an ONTAP node.

:class:`OntapPeer` is the connection every simulated node uses (``fpolicyd simulate``'s nodes, ``replay-test``'s
nodes and the tests' peers): connect over TCP or TLS, from a chosen source address if asked; the NEGO exchange
(NEGO_REQ out, the first frame back); framed payloads out with the transport's flow control; the server's frames
in, split by :class:`~fpolicyd.protocol.framing.XmlFrameReader` and decoded on demand; half-close, close and abort.
What a caller makes of the server's messages (a strict checker, a load driver, a test) stays with the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import uuid
from collections.abc import Sequence
from typing import Final

from fpolicyd.errors import FpolicydError, RemoteProtocolError
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import Handshake
from fpolicyd.protocol.xml_codec import Decoded, decode_payload, encode_handshake

__all__ = [
    "DEFAULT_VERSIONS",
    "OntapPeer",
    "PeerClosedError",
    "PeerError",
    "PeerResetError",
    "handshake",
]

#: The offer of ONTAP 9.13/9.14 (SPL-CAP).
DEFAULT_VERSIONS: Final = ("1.0", "1.1", "1.2", "2.0")

_READ_SIZE: Final = 1 << 16


class PeerError(FpolicydError):
    """The NEGO exchange failed: the connection broke, or the server sent something unreadable or nothing."""


class PeerResetError(PeerError):
    """The connection was reset before the NEGO_REQ could be written."""


class PeerClosedError(PeerError):
    """The server closed the connection before its first message."""


def handshake(
    *,
    seed: int,
    node: int,
    policy_name: str,
    vs_uuid: str,
    versions: Sequence[str] = DEFAULT_VERSIONS,
    target: int = 0,
) -> Handshake:
    """The NEGO_REQ node ``node`` sends to its ``target``-th server (one session per server, as ONTAP opens);
    ``SessionId`` is a deterministic v1-looking UUID like ONTAP's, the same as before targets for target 0."""
    key = f"fpolicyd-sim:session:{seed}:{node}" + (f":{target}" if target else "")
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    session_id = str(uuid.UUID(bytes=digest, version=1))
    return Handshake(vs_uuid=vs_uuid, policy_name=policy_name, session_id=session_id, versions=tuple(versions))


class OntapPeer:
    """One connection as an ONTAP node: frames out, frames in.

    ``inbox`` holds the payloads read and not yet taken, oldest first; ``reader`` and ``writer`` are the stream
    pair, for what a caller needs beyond these methods (TLS details, the transport)."""

    __slots__ = ("frames", "inbox", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = XmlFrameReader()
        self.inbox: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        source: str | None = None,
        timeout_s: float | None = None,
    ) -> OntapPeer:
        """Connect (TLS with ``tls``; from address ``source``, any port, if given). Raises ``OSError``, and
        ``TimeoutError`` after ``timeout_s``."""
        opening = asyncio.open_connection(host, port, ssl=tls, local_addr=(source, 0) if source else None)
        reader, writer = await (opening if timeout_s is None else asyncio.wait_for(opening, timeout_s))
        return cls(reader, writer)

    # -- receiving

    async def read_some(self) -> bool:
        """Read once and add the complete frames to ``inbox``; False on EOF. Raises ``OSError`` on a broken
        connection and :class:`~fpolicyd.errors.RemoteProtocolError` on a bad frame."""
        data = await self.reader.read(_READ_SIZE)
        if not data:
            return False
        self.inbox.extend(self.frames.feed(data))
        return True

    def take(self) -> list[bytes]:
        """Every payload in ``inbox``, which is left empty."""
        taken, self.inbox = self.inbox, []
        return taken

    async def receive(self, within: float = 5.0) -> bytes:
        """The next payload, read within ``within`` seconds (``TimeoutError``); ``ConnectionError`` on EOF."""
        while not self.inbox:
            if not await asyncio.wait_for(self.read_some(), within):
                raise ConnectionError("closed by the server")
        return self.inbox.pop(0)

    @staticmethod
    def decode(payload: bytes) -> Decoded:
        """A payload decoded (header and message); raises :class:`~fpolicyd.errors.RemoteProtocolError`."""
        return decode_payload(payload)

    async def closed_by_server(self, within: float = 5.0) -> bool:
        """Whether the server closes the connection within ``within`` seconds of silence (data is discarded)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(_READ_SIZE), within)
                if not data:
                    return True
        except (ConnectionError, TimeoutError):
            return False

    # -- the NEGO exchange

    async def handshake(self, hello: Handshake, timeout_s: float) -> bytes:
        """Send NEGO_REQ and read until the server's first frame, within ``timeout_s``; return its payload (what
        came with it stays in ``inbox``). The caller checks that it is a NEGO_RESP that fits ``hello``. Raises
        :class:`PeerResetError`, :class:`PeerClosedError` or :class:`PeerError`."""
        try:
            self.writer.write(encode_handshake(hello))
        except (OSError, RuntimeError) as exc:
            # uvloop raises RuntimeError once the transport is closed by a reset. A connect can succeed and be
            # reset at once: the kernel takes it into the backlog of a process that is stopped and resets it when
            # the process dies.
            raise PeerResetError(f"reset before NEGO_REQ: {exc}") from exc
        try:
            async with asyncio.timeout(timeout_s):
                await self.writer.drain()
                while not self.inbox:
                    if not await self.read_checked():
                        raise PeerClosedError("server closed the connection before NEGO_RESP")
        except TimeoutError:
            raise PeerError(f"no NEGO_RESP within {timeout_s} s") from None
        except OSError as exc:
            raise PeerError(f"connection error during the handshake: {exc}") from exc
        return self.inbox.pop(0)

    async def read_checked(self) -> bool:
        """:meth:`read_some`, its errors as :class:`PeerError` (what a checker reports as the server's fault)."""
        try:
            return await self.read_some()
        except OSError as exc:
            raise PeerError(f"connection error: {exc}") from exc
        except RemoteProtocolError as exc:
            raise PeerError(f"bad frame from the server: {exc}") from exc

    # -- sending

    def write(self, data: bytes) -> None:
        """Queue bytes (whole frames) on the transport; :meth:`drain` waits for room."""
        self.writer.write(data)

    async def drain(self) -> None:
        """Flow control: wait until the transport's buffer is below its high-water mark."""
        await self.writer.drain()

    async def send(self, *frames: bytes) -> None:
        """Write the frames in one go and wait for room."""
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    # -- ending

    def half_close(self) -> None:
        """Send EOF (the server reads to the end, then closes too). Raises ``OSError``."""
        self.writer.write_eof()

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    async def close(self) -> None:
        """Close and wait until closed; a reset while closing is ignored."""
        self.writer.close()
        with contextlib.suppress(OSError):  # the peer reset a connection we are closing anyway
            await self.writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (RST), without flushing what is buffered."""
        self.writer.transport.abort()
