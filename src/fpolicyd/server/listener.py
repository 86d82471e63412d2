"""The TLS listener: accepts TCP itself and runs each handshake where its outcome can be seen.

``loop.create_server(ssl=...)`` hides a TLS connection from its protocol until the handshake has succeeded: a
failed handshake (plain TCP, TLS 1.0/1.1, a bad client certificate, a timeout) only reaches a debug log of
asyncio, and handshakes in progress are counted nowhere (400 of them held 424 descriptors with
``max_connections`` 50). Here each accepted socket is admitted by the connection budget first (it is *pending*
from accept until its NEGO_REQ is answered, see ``server/budget.py``) and its handshake runs in
``loop.connect_accepted_socket(ssl=...)``, which raises what failed — uvloop and the standard loop alike.
Plain-TCP listeners stay on ``loop.create_server`` (their connections are visible from accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Sequence
from typing import Final

from fpolicyd.errors import ConfigError
from fpolicyd.obs.log import get_logger
from fpolicyd.server.connection import FPolicyConnection, ServerContext

log = get_logger("fpolicyd.listener")

#: After accept() fails for lack of descriptors or memory, wait this long before the next (as asyncio does).
ACCEPT_RETRY_S: Final = 1.0
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (as ``loop.create_server`` binds them)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_listener(host: str, port: int, backlog: int) -> list[socket.socket]:
    """:func:`bind_sockets` for the FPolicy listener: an address that cannot be bound (in use, not local, not
    permitted) is a :class:`ConfigError` naming the settings and the OS reason, raised before anything opens."""
    try:
        return bind_sockets(host, port, backlog)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        code = f"[{errno.errorcode.get(exc.errno, exc.errno)}] " if exc.errno is not None else ""
        raise ConfigError(f"listen_host/listen_port {host}:{port}: cannot listen: {code}{reason}") from None


class ServerGroup:
    """Plain-TCP servers, one per socket :func:`bind_listener` bound (a host name may resolve to several
    addresses), seen as one server by the daemon."""

    def __init__(self, servers: Sequence[asyncio.Server]) -> None:
        self._servers = tuple(servers)

    @classmethod
    async def start(cls, ctx: ServerContext, sockets: Sequence[socket.socket], backlog: int) -> ServerGroup:
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        try:
            for sock in sockets:
                servers.append(await loop.create_server(lambda: FPolicyConnection(ctx), sock=sock, backlog=backlog))
        except BaseException:
            for server in servers:
                server.close()
            raise
        return cls(servers)

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in server.sockets]

    def is_serving(self) -> bool:
        return any(server.is_serving() for server in self._servers)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


class TlsListener:
    """What the daemon needs of a server (``sockets``, ``is_serving``, ``close``, ``wait_closed``), accepting
    TLS connections into ``ctx``."""

    def __init__(
        self, ctx: ServerContext, sockets: list[socket.socket], ssl_context: ssl.SSLContext, handshake_timeout_s: float
    ) -> None:
        self._ctx = ctx
        self.sockets = sockets
        self._ssl = ssl_context
        self._timeout = handshake_timeout_s
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(sock), name="tls-accept") for sock in sockets]
        #: Handshakes in progress (never cancelled: an eviction or close ends them through their socket).
        self._handshakes: dict[asyncio.Task[None], FPolicyConnection] = {}
        self._serving = True

    def is_serving(self) -> bool:
        return self._serving

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("accept_failed", error=str(exc), retry_in_s=ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            conn = FPolicyConnection(self._ctx)
            if not conn.admit(address):
                sock.close()
                continue
            conn.attach_socket(sock)
            task = loop.create_task(self._handshake(conn, sock), name="tls-handshake")
            self._handshakes[task] = conn
            task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        del self._handshakes[task]

    async def _handshake(self, conn: FPolicyConnection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            # On success the transport calls conn.connection_made (and later connection_lost) itself.
            await loop.connect_accepted_socket(lambda: conn, sock, ssl=self._ssl, ssl_handshake_timeout=self._timeout)
        except Exception as exc:  # ssl.SSLError, ConnectionError, the timeout: all OSErrors; anything else: "other"
            conn.handshake_failed(exc)

    def close(self) -> None:
        """Stop accepting (the sockets close in :meth:`wait_closed`, once no accept waits on them); end the
        handshakes in progress."""
        self._serving = False
        for task in self._accepting:
            task.cancel()
        for conn in list(self._handshakes.values()):
            conn.evict()

    async def wait_closed(self) -> None:
        accepting = await asyncio.gather(*self._accepting, return_exceptions=True)
        for outcome in accepting:
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                log.error("accept_loop_failed", error=repr(outcome))
        for sock in self.sockets:
            sock.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._handshakes, return_exceptions=True), self._timeout + 1)
