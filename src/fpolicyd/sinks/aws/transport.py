"""The lean AWS data path: SendMessageBatch and PutEvents without the SDK's per-call machinery.

aiobotocore spends 1-2 ms of CPU on one SendMessageBatch (event hooks, parameter validation, botocore's shape
walking serializer, response parsing, aiohttp); at 50,000 events/s that is more than the box has.
:class:`LeanAwsClient` does the same call with only what it needs, and ``benchmarks/bench_aws_client.py``
measures each part:

- **what to send where** comes from the SDK client it is built from: the endpoint URL, extra headers and the
  signing name/region from botocore's endpoint ruleset resolver (the same call, with the same inputs, that
  botocore makes before each request, so ``endpoint_url``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_SQS``/
  ``_EVENTBRIDGE``, region, FIPS and dual-stack settings all apply), the X-Amz-Target / Content-Type /
  query-mode headers from botocore's serializer, the URL from botocore's ``prepare_request_dict``;
- **the body** is the operation's parameters as JSON, by orjson (~20x faster than botocore's serializer,
  which walks the shape model entry by entry; the same JSON value, checked by a differential test);
- **signing** is botocore's own ``SigV4Auth`` with credentials from botocore's credential chain, frozen per
  request (refreshable ECS / instance-profile credentials renew themselves; a frozen copy costs ~1 µs), on a
  plain-dict request instead of botocore's ``email.message``-based one (:class:`_SigV4Auth`: ~1/3 of the
  cost, byte-identical signatures, checked by a differential test);
- **transport** is a bounded pool of HTTP/1.1 keep-alive connections (TLS for https) with a small response
  parser (:class:`ResponseParser`): its share of a request costs ~2.5x less CPU than aiohttp's client, whose
  per-request bookkeeping (tracing hooks, cookies, multidicts, streams) we do not need;
- **answers** are parsed with orjson on success; errors with botocore's own parser and raised as the SDK client
  would raise them (its modeled ``ClientError`` subclass, from its ``exceptions`` factory), transport failures
  as botocore's connection exceptions, so :func:`fpolicyd.sinks.aws.classify.error_kind` classifies both paths alike.
  For SendMessageBatch each acknowledged entry's ``MD5OfMessageBody`` is checked against what was sent; a
  mismatch moves that entry to ``Failed`` (``SenderFault`` false: sent again, never lost).

No SDK retries, like :class:`~fpolicyd.sinks.aws.clients.AwsClients`: the caller retries failed entries only.
Control calls (GetQueueAttributes, DescribeEventBus, DynamoDB...) stay on aiobotocore.

Not supported, and then :func:`build_lean_client` raises :class:`LeanUnsupportedError` so that the caller keeps the
SDK client: proxies (``HTTPS_PROXY``...), endpoints that need another signature than SigV4 (SigV4a for
EventBridge global endpoints), client certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import orjson
from botocore import exceptions as bx
from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.awsrequest import AWSRequest, prepare_request_dict
from botocore.parsers import create_parser
from botocore.serialize import create_serializer
from botocore.utils import get_environ_proxies

from fpolicyd.errors import FpolicydError
from fpolicyd.obs.log import get_logger

__all__ = [
    "MAX_RESPONSE_BODY_BYTES",
    "MAX_RESPONSE_HEAD_BYTES",
    "ConnectionPool",
    "HttpProtocolError",
    "HttpResponse",
    "LeanAwsClient",
    "LeanUnsupportedError",
    "ResponseParser",
    "build_lean_client",
    "encode_body",
]

log = get_logger("fpolicyd.sink.aws")


class LeanUnsupportedError(FpolicydError):
    """This client's set-up needs something the lean path does not do (proxy, SigV4a...): use the SDK."""


class HttpProtocolError(FpolicydError):
    """The server's bytes are not an HTTP/1.1 response (or exceed our limits): the connection is dropped."""


# ------------------------------------------------------------------------------------- response parser

#: Longest response head (status line + headers) accepted. AWS answers have well under 2 KiB of headers.
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
#: Largest response body accepted. A SendMessageBatch / PutEvents answer for 10 entries is under 4 KiB, an
#: error a few hundred bytes; anything near this is not an AWS answer.
MAX_RESPONSE_BODY_BYTES: Final = 8 * 1024 * 1024
#: Longest chunk-size line of a chunked body (hex size plus extensions).
_MAX_CHUNK_LINE: Final = 4096


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    #: Header names lower-cased; a repeated header's values joined with ", " (RFC 9110 §5.3).
    headers: dict[str, str]
    body: bytes
    #: Whether the connection can carry another request (HTTP/1.1 without ``Connection: close``).
    keep_alive: bool


class _Body(StrEnum):
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


class ResponseParser:
    """Sans-IO HTTP/1.1 response parser for one request at a time (no pipelining).

    :meth:`feed` takes bytes as they arrive and returns the response once complete; :meth:`feed_eof` says the
    peer closed (completing a close-delimited body, or raising if the response was cut). Interim 1xx answers
    are skipped. Bodies by Content-Length, chunked transfer coding (trailers skipped) or until close; none for
    204 and 304. Raises :class:`HttpProtocolError` for anything malformed or over the limits.
    """

    __slots__ = (
        "_body",
        "_buffer",
        "_chunk_left",
        "_chunks",
        "_headers",
        "_keep_alive",
        "_kind",
        "_length",
        "_max_body",
        "_max_head",
        "_status",
    )

    def __init__(
        self, *, max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES, max_body_bytes: int = MAX_RESPONSE_BODY_BYTES
    ) -> None:
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._buffer = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._status = 0  # 0: still reading the head
        self._headers: dict[str, str] = {}
        self._kind = _Body.LENGTH
        self._length = 0
        self._keep_alive = True
        self._chunks: list[bytes] = []
        self._chunk_left = -1  # -1: at a chunk-size line; -2: reading trailers
        self._body = 0

    @property
    def idle(self) -> bool:
        """No byte of a response received yet (a close now means the server dropped an idle connection)."""
        return self._status == 0 and not self._buffer

    def feed(self, data: bytes) -> HttpResponse | None:
        self._buffer += data
        while True:
            if self._status == 0 and not self._parse_head():
                return None
            if self._status >= 200:
                return self._parse_body()
            # 1xx interim answer: no body, the real one follows.
            self._reset()

    def feed_eof(self) -> HttpResponse | None:
        """The peer closed. Returns the response a close completes, None if nothing had started; raises when a
        response was cut short."""
        if self._status >= 200 and self._kind is _Body.UNTIL_CLOSE:
            body = bytes(self._buffer)
            self._buffer.clear()
            return self._done(body, keep_alive=False)
        if self.idle:
            return None
        raise HttpProtocolError("connection closed before the response was complete")

    def _parse_head(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self._max_head:
                raise HttpProtocolError(f"response head over {self._max_head} bytes")
            return False
        if end > self._max_head:
            raise HttpProtocolError(f"response head over {self._max_head} bytes")
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3:
            raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise HttpProtocolError(f"bad status code: {parts[1]!r}") from None
        if not 100 <= status <= 599:
            raise HttpProtocolError(f"bad status code: {status}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise HttpProtocolError(f"malformed header line: {line[:80]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._status = status
        self._headers = headers
        http10 = parts[0] == b"HTTP/1.0"
        connection = headers.get("connection", "").lower()
        self._keep_alive = "keep-alive" in connection if http10 else "close" not in connection
        if status < 200:
            return True
        coding = headers.get("transfer-encoding")
        if status in (204, 304):
            self._kind, self._length = _Body.LENGTH, 0
        elif coding is not None:
            if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise HttpProtocolError(f"unsupported Transfer-Encoding: {coding!r}")
            self._kind = _Body.CHUNKED
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit() or len({v.strip() for v in length.split(",")}) != 1:
                raise HttpProtocolError(f"bad Content-Length: {length!r}")
            self._kind, self._length = _Body.LENGTH, int(length)
            if self._length > self._max_body:
                raise HttpProtocolError(f"response body over {self._max_body} bytes")
        else:
            self._kind = _Body.UNTIL_CLOSE
            self._keep_alive = False
        return True

    def _parse_body(self) -> HttpResponse | None:
        buffer = self._buffer
        if self._kind is _Body.LENGTH:
            if len(buffer) < self._length:
                return None
            body = bytes(buffer[: self._length])
            del buffer[: self._length]
            return self._done(body, keep_alive=self._keep_alive)
        if self._kind is _Body.UNTIL_CLOSE:
            if len(buffer) > self._max_body:
                raise HttpProtocolError(f"response body over {self._max_body} bytes")
            return None
        return self._parse_chunks()

    def _parse_chunks(self) -> HttpResponse | None:
        buffer = self._buffer
        while True:
            if self._chunk_left == -1:  # a chunk-size line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_CHUNK_LINE:
                        raise HttpProtocolError("chunk-size line too long")
                    return None
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size: {size_text[:20]!r}") from None
                if size < 0 or not size_text.isalnum():
                    raise HttpProtocolError(f"bad chunk size: {size_text[:20]!r}")
                if size == 0:
                    self._chunk_left = -2
                    continue
                self._body += size
                if self._body > self._max_body:
                    raise HttpProtocolError(f"response body over {self._max_body} bytes")
                self._chunk_left = size
            elif self._chunk_left == -2:  # trailer lines, up to an empty one
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > self._max_head:
                        raise HttpProtocolError("chunked trailers too long")
                    return None
                del buffer[: end + 2]
                if end == 0:
                    return self._done(b"".join(self._chunks), keep_alive=self._keep_alive)
            else:  # chunk data and its CRLF
                need = self._chunk_left + 2
                if len(buffer) < need:
                    return None
                if buffer[need - 2 : need] != b"\r\n":
                    raise HttpProtocolError("chunk data not followed by CRLF")
                self._chunks.append(bytes(buffer[: self._chunk_left]))
                del buffer[:need]
                self._chunk_left = -1

    def _done(self, body: bytes, *, keep_alive: bool) -> HttpResponse:
        response = HttpResponse(self._status, self._headers, body, keep_alive)
        self._reset()
        return response

    @property
    def leftover(self) -> int:
        """Bytes received past the last complete response (unsolicited: the connection is not reused)."""
        return len(self._buffer)


# ------------------------------------------------------------------------------------------ connections


class _ConnectionClosedError(Exception):
    """The connection ended before a response (``idle``: before its first byte)."""

    def __init__(self, message: str, *, idle: bool) -> None:
        super().__init__(message)
        self.idle = idle


class _ReadTimeoutError(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.waiter: asyncio.Future[HttpResponse] | None = None
        self.closed = False
        self.last_used = loop.time()
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests are written whole; without it a small one can wait for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes, read_timeout: float) -> asyncio.Future[HttpResponse]:
        assert self.transport is not None
        assert self.waiter is None
        waiter: asyncio.Future[HttpResponse] = self._loop.create_future()
        self.waiter = waiter
        self._read_timeout = read_timeout
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + read_timeout, self._check_timeout)
        self.transport.write(data)
        return waiter

    def _check_timeout(self) -> None:
        self._timer = None
        if self.waiter is None:
            return
        due = self._last_data + self._read_timeout
        if self._loop.time() < due:  # data arrived meanwhile: the timeout counts from the last byte
            self._timer = self._loop.call_at(due, self._check_timeout)
            return
        self._fail(_ReadTimeoutError(f"no response data for {self._read_timeout} s"))
        self.close()

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        try:
            response = self.parser.feed(data)
        except HttpProtocolError as exc:
            self._fail(exc)
            self.close()
            return
        if response is None:
            return
        if self.waiter is None or self.parser.leftover:
            # Bytes nobody asked for: the connection's state is unknown.
            self._fail(HttpProtocolError("unsolicited bytes from the server"))
            self.close()
            return
        self._finish(response)

    def eof_received(self) -> bool | None:
        self._end("the server closed the connection")
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._end(f"connection lost: {exc}" if exc else "connection closed")

    def _end(self, reason: str) -> None:
        if self.waiter is None:
            self.closed = True
            return
        idle = self.parser.idle
        try:
            response = self.parser.feed_eof()
        except HttpProtocolError as exc:
            self._fail(exc)
        else:
            if response is None:
                self._fail(_ConnectionClosedError(reason, idle=idle))
            else:
                self._finish(response)
        self.closed = True

    def _finish(self, response: HttpResponse) -> None:
        waiter, self.waiter = self.waiter, None
        self._cancel_timer()
        self.last_used = self._loop.time()
        if not response.keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        self._cancel_timer()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


#: An idle keep-alive connection is closed after this long unused. AWS front ends drop idle connections after
#: some tens of seconds; a request written into one the server is closing at that moment fails. aiobotocore
#: keeps idle connections 12 s for the same reason; we use the same.
IDLE_CONNECTION_S: Final = 12.0


class ConnectionPool:
    """At most ``max_connections`` keep-alive connections to one host; requests beyond wait, in arrival order,
    until one is released (a new request may take a just-released connection first; the waiter then waits on).

    :meth:`request` writes one serialized request and returns the response. It raises ``OSError`` (connect
    refused, unreachable), ``TimeoutError`` (connect), ``_ReadTimeoutError``, ``_ConnectionClosedError`` or
    :class:`HttpProtocolError`; :class:`LeanAwsClient` turns them into botocore's exceptions.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        idle_timeout_s: float = IDLE_CONNECTION_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {max_connections}")
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self.max_connections = max_connections
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._idle_timeout = idle_timeout_s
        self._idle: list[_Connection] = []
        self._busy = 0  # connections checked out or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        #: Connections opened so far (for tests and benchmarks: reuse means this stays small).
        self.opened = 0

    async def request(self, data: bytes) -> HttpResponse:
        connection = await self._acquire()
        reusable = False
        try:
            response = await connection.send(data, self._read_timeout)
            reusable = response.keep_alive and not connection.closed
            return response
        finally:
            if not reusable:
                connection.close()
            self._release(connection if reusable else None)

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise _ConnectionClosedError("the connection pool is closed", idle=True)
            now = asyncio.get_running_loop().time()
            while self._idle:
                connection = self._idle.pop()
                if connection.closed or now - connection.last_used > self._idle_timeout:
                    connection.close()
                    continue
                self._busy += 1
                return connection
            if self._busy < self.max_connections:
                self._busy += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._release(None)
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was our turn: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, connection = await loop.create_connection(
                lambda: _Connection(loop),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        self.opened += 1
        return connection

    def _release(self, connection: _Connection | None) -> None:
        self._busy -= 1
        if connection is not None:
            if self._closed:  # a request that finished after close(): its connection goes too
                connection.close()
            else:
                self._idle.append(connection)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        # Let the transports' close callbacks run (no ResourceWarning for an unclosed transport).
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------------- encoding


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _unix_timestamp(value: datetime) -> int | float:
    """A timestamp as botocore's JSON serializer writes it (default precision): whole seconds as an int,
    otherwise seconds with microseconds, rounded once (``Serializer._timestamp_unixtimestamp``; naive values
    are UTC, as botocore's ``parse_to_aware_datetime`` takes them)."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elapsed = aware - _EPOCH  # exact; what calendar.timegm(aware.utctimetuple()) gives, at a fifth of the cost
    seconds = elapsed.days * 86_400 + elapsed.seconds
    if aware.microsecond:
        return (seconds * 10**6 + aware.microsecond) / 10**6
    return seconds


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _unix_timestamp(value)
    raise TypeError(f"cannot send a {type(value).__name__} in an AWS JSON request")


def encode_body(params: Mapping[str, Any]) -> bytes:
    """The AWS JSON request body of ``params`` (SendMessageBatch / PutEvents parameters as given to the SDK):
    the same JSON value as botocore's serializer produces for them (strings, numbers, booleans, null, lists,
    maps; datetimes as epoch seconds), UTF-8 instead of ``\\u`` escapes. Raises botocore's
    ``ParamValidationError`` for anything else (bytes, objects), before anything is sent."""
    try:
        # PASSTHROUGH_DATETIME: datetimes go to _json_default (orjson would write RFC 3339 text on its own).
        return orjson.dumps(params, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError as exc:
        raise bx.ParamValidationError(report=str(exc)) from exc


# ------------------------------------------------------------------------------------------------ client


class FrozenCredentialSource(Protocol):
    """What the signer needs of botocore's credential objects (aiobotocore's ``get_frozen_credentials`` is a
    coroutine: refreshable credentials may renew themselves first)."""

    async def get_frozen_credentials(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Operation:
    name: str
    url: str
    #: ``POST <path> HTTP/1.1``.
    request_line: str
    #: The static headers, all signed: Host, X-Amz-Target, Content-Type, query mode, endpoint headers.
    headers: tuple[tuple[str, str], ...]
    output_shape: Any


class _SignedHeaders(dict[str, str]):
    """The header map SigV4Auth signs, as a dict: lower-case names, one value each (our requests have no
    repeated header). botocore builds an ``email.message``-based ``HTTPHeaders`` here, twice per request."""

    def get_all(self, name: str, failobj: Any = None) -> Any:
        value = self.get(name)
        return failobj if value is None else [value]


#: botocore's own list of headers left out of the signature (User-Agent, Expect...), lower-case.
_UNSIGNED_HEADERS: Final = frozenset(h.lower() for h in SIGNED_HEADERS_BLACKLIST)


class _SigV4Auth(SigV4Auth):  # type: ignore[misc] # botocore ships no type hints: SigV4Auth is Any
    """botocore's SigV4Auth, unchanged but for the container of the headers to sign.

    Canonical request, string to sign, signing key, signature and the headers it adds are all botocore's code.
    Its ``HTTPHeaders`` (``email.message``) and ``AWSRequest`` cost ~60% of a signature; with a plain dict and
    :class:`_SigningRequest` one SendMessageBatch signs in ~1/3 of the time (benchmarks/bench_aws_client.py).
    tests/unit/test_aws_transport.py proves the Authorization header byte-identical to stock ``SigV4Auth`` on
    an ``AWSRequest`` (Hypothesis over URLs, headers, bodies, credentials, regions)."""

    def headers_to_sign(self, request: Any) -> _SignedHeaders:
        headers = _SignedHeaders()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower not in _UNSIGNED_HEADERS:
                headers[lower] = value
        if "host" not in headers:
            headers["host"] = super().headers_to_sign(request)["host"]
        return headers


class _SigningRequest:
    """What SigV4Auth reads and writes of a request (``AWSRequest``'s attributes), with a plain dict of
    headers. Every header name we set is spelled the way botocore looks it up, so the dict's exact-case
    lookups find what ``AWSRequest``'s case-insensitive ones would."""

    __slots__ = ("body", "context", "headers", "method", "params", "url")

    def __init__(self, url: str, headers: dict[str, str], body: bytes) -> None:
        self.method = "POST"
        self.url = url
        self.headers = headers
        self.body = body
        self.params: dict[str, str] = {}
        self.context: dict[str, Any] = {}


class LeanAwsClient:
    """``send_message_batch(QueueUrl=..., Entries=[...])`` (SQS) or ``put_events(Entries=[...])``
    (EventBridge) with the SDK client's inputs, outputs and exceptions. Build it with
    :func:`build_lean_client`; close it with :meth:`close`."""

    def __init__(
        self,
        *,
        service: str,
        operations: Mapping[str, _Operation],
        pool: ConnectionPool,
        credentials: FrozenCredentialSource | None,
        signing_name: str,
        signing_region: str,
        user_agent: str,
        exceptions: Any,
        protocol: str,
    ) -> None:
        self.service = service
        self._operations = dict(operations)
        self.pool = pool
        self._credentials = credentials
        self._signing_name = signing_name
        self._signing_region = signing_region
        self._user_agent = user_agent
        self._exceptions = exceptions
        self._parser = create_parser(protocol)

    @property
    def endpoint_url(self) -> str:
        return next(iter(self._operations.values())).url

    @property
    def signing(self) -> tuple[str, str]:
        """(signing name, signing region) of every request."""
        return self._signing_name, self._signing_region

    async def send_message_batch(self, *, QueueUrl: str, Entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:  # noqa: N803 - the SDK's parameter names
        response = await self._call("SendMessageBatch", {"QueueUrl": QueueUrl, "Entries": Entries})
        return _check_md5(response, Entries)

    async def put_events(self, *, Entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:  # noqa: N803 - the SDK's parameter names
        return await self._call("PutEvents", {"Entries": Entries})

    def sign(self, frozen: Any, operation: _Operation, body: bytes) -> list[tuple[str, str]]:
        """The request's headers, signed by botocore's SigV4Auth (see :class:`_SigV4Auth`)."""
        request = _SigningRequest(operation.url, dict(operation.headers), body)
        _SigV4Auth(frozen, self._signing_name, self._signing_region).add_auth(request)
        return list(request.headers.items())

    async def _call(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        operation = self._operations[name]
        body = encode_body(params)
        if self._credentials is None:
            raise bx.NoCredentialsError()
        frozen = await self._credentials.get_frozen_credentials()
        lines = [operation.request_line]
        lines.extend(f"{key}: {value}" for key, value in self.sign(frozen, operation, body))
        lines.append(f"User-Agent: {self._user_agent}")
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            response = await self.pool.request(head + body)
        except _ReadTimeoutError as exc:
            raise bx.ReadTimeoutError(endpoint_url=operation.url, error=exc) from exc
        except (_ConnectionClosedError, HttpProtocolError) as exc:
            raise bx.ConnectionClosedError(endpoint_url=operation.url, error=exc) from exc
        except ssl.SSLError as exc:
            raise bx.SSLError(endpoint_url=operation.url, error=exc) from exc
        except TimeoutError as exc:
            raise bx.ConnectTimeoutError(endpoint_url=operation.url, error=exc) from exc
        except OSError as exc:
            raise bx.EndpointConnectionError(endpoint_url=operation.url, error=exc) from exc
        metadata = {
            "RequestId": response.headers.get("x-amzn-requestid", ""),
            "HTTPStatusCode": response.status,
            "HTTPHeaders": response.headers,
            "RetryAttempts": 0,
        }
        if response.status < 300:
            try:
                parsed = orjson.loads(response.body) if response.body else {}
            except orjson.JSONDecodeError as exc:
                raise bx.ResponseParserError(f"{name}: the answer is not JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise bx.ResponseParserError(f"{name}: the answer is not a JSON object")
            parsed["ResponseMetadata"] = metadata
            return parsed
        error = self._parser.parse(
            {"status_code": response.status, "headers": response.headers, "body": response.body},
            operation.output_shape,
        )
        # MaxAttemptsReached: the SDK with retries off says so too ("reached max retries: 0" in the message).
        error.setdefault("ResponseMetadata", {}).update(metadata, MaxAttemptsReached=True)
        details = error.get("Error") or {}
        # SQS (JSON, query-compatible): the SDK picks the exception class by the query error code's shape name
        # (botocore's handlers._handle_sqs_compatible_error); everything else by the error code.
        code = (details.get("QueryErrorCode") if self.service == "sqs" else None) or details.get("Code")
        raise self._exceptions.from_code(code)(error, name)

    async def close(self) -> None:
        await self.pool.close()


#: The code a SendMessageBatch entry is failed with when its MD5OfMessageBody does not match what was sent.
MD5_MISMATCH: Final = "MD5OfMessageBodyMismatch"


def _check_md5(response: dict[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Move every acknowledged entry whose MD5OfMessageBody is not the MD5 of the body sent to ``Failed``
    (SenderFault false: the caller sends it again; SQS may then hold it twice, which at-least-once allows)."""
    successful = response.get("Successful")
    if not successful:
        return response
    bodies = {str(e.get("Id")): e.get("MessageBody") for e in entries}
    good: list[Any] = []
    bad: list[dict[str, Any]] = []
    for ok in successful:
        body = bodies.get(str(ok.get("Id")))
        digest = ok.get("MD5OfMessageBody")
        if (
            isinstance(body, str)
            and digest is not None
            and hashlib.md5(body.encode("utf-8"), usedforsecurity=False).hexdigest() != digest
        ):
            bad.append(
                {
                    "Id": ok.get("Id"),
                    "SenderFault": False,
                    "Code": MD5_MISMATCH,
                    "Message": f"MD5OfMessageBody {digest} is not the MD5 of the body sent",
                }
            )
        else:
            good.append(ok)
    if bad:
        log.warning("sqs_md5_mismatch", entries=len(bad), request_id=response["ResponseMetadata"]["RequestId"])
        response["Successful"] = good
        response["Failed"] = [*(response.get("Failed") or ()), *bad]
    return response


# ------------------------------------------------------------------------------------------- building it

#: The data-path operations of each service the lean client sends (anything else goes through the SDK).
OPERATIONS: Final = {"sqs": ("SendMessageBatch",), "events": ("PutEvents",)}


async def build_lean_client(
    sdk_client: Any,
    credentials: FrozenCredentialSource | None,
    *,
    user_agent: str,
    max_connections: int,
    connect_timeout_s: float,
    read_timeout_s: float,
) -> LeanAwsClient:
    """A :class:`LeanAwsClient` that sends where ``sdk_client`` (an aiobotocore ``sqs`` or ``events`` client)
    would, signed like it. ``credentials``: the session's (``await session.get_credentials()``, the object the
    SDK client signs with). Raises :class:`LeanUnsupportedError` when the client's set-up needs what the lean
    path lacks."""
    meta = sdk_client.meta
    service = meta.service_model.service_name
    if service not in OPERATIONS:
        raise LeanUnsupportedError(f"no lean data path for {service}")
    if meta.config.proxies:
        raise LeanUnsupportedError("a proxy is configured for the client")
    if meta.config.client_cert:
        raise LeanUnsupportedError("a client certificate is configured")
    serializer = create_serializer(meta.service_model.metadata["protocol"], include_validation=False)
    operations: dict[str, _Operation] = {}
    signing: tuple[str, str] | None = None
    for name in OPERATIONS[service]:
        model = meta.service_model.operation_model(name)
        url, endpoint_headers, signing_name, region = await _resolve(sdk_client, model)
        if signing is not None and signing != (signing_name, region):
            raise LeanUnsupportedError("operations of one client sign differently")
        signing = (signing_name, region)
        if get_environ_proxies(url):
            raise LeanUnsupportedError(f"a proxy applies to {url} (HTTP(S)_PROXY)")
        request_dict = serializer.serialize_to_request({}, model)
        request_dict["headers"].update(endpoint_headers)
        prepare_request_dict(request_dict, endpoint_url=url)
        full_url = request_dict["url"]
        host = SigV4Auth(None, signing_name, region).headers_to_sign(AWSRequest(method="POST", url=full_url))["host"]
        headers = (("Host", host), *((str(k), str(v)) for k, v in request_dict["headers"].items()))
        target = urlsplit(full_url)
        request_line = f"POST {target.path or '/'}{'?' + target.query if target.query else ''} HTTP/1.1"
        operations[name] = _Operation(name, full_url, request_line, headers, model.output_shape)
    assert signing is not None
    first = next(iter(operations.values())).url
    parts = urlsplit(first)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LeanUnsupportedError(f"cannot send to {first!r}")
    context: ssl.SSLContext | None = None
    if parts.scheme == "https":
        context = await _verify_context(sdk_client)
    pool = ConnectionPool(
        parts.hostname,
        parts.port or (443 if parts.scheme == "https" else 80),
        ssl_context=context,
        max_connections=max_connections,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )
    return LeanAwsClient(
        service=service,
        operations=operations,
        pool=pool,
        credentials=credentials,
        signing_name=signing[0],
        signing_region=signing[1],
        user_agent=user_agent,
        exceptions=sdk_client.exceptions,
        protocol=meta.service_model.metadata["protocol"],
    )


async def _verify_context(sdk_client: Any) -> ssl.SSLContext:
    """The TLS context of the SDK client's own HTTP session (its ``verify`` setting, ``AWS_CA_BUNDLE``,
    botocore's default CA bundle), built by that session (private, so guarded like :func:`_resolve`). Loading a
    CA bundle reads a file: done on a thread."""
    http_session = getattr(getattr(sdk_client, "_endpoint", None), "http_session", None)
    build = getattr(http_session, "_build_verify_context", None)
    if build is None:
        raise LeanUnsupportedError("this aiobotocore does not expose its TLS settings")
    context = await asyncio.to_thread(build)
    if not isinstance(context, ssl.SSLContext):
        raise LeanUnsupportedError(f"unexpected TLS context {type(context).__name__}")
    return context


async def _resolve(sdk_client: Any, model: Any) -> tuple[str, dict[str, str], str, str]:
    """(URL, endpoint headers, signing name, signing region) for ``model`` by the SDK client's own endpoint
    ruleset resolution: the method botocore calls before every request (private, so guarded: if aiobotocore
    renames it the lean path is unavailable, never wrong). No call parameter of SendMessageBatch/PutEvents
    that we send is an endpoint parameter (PutEvents' EndpointId is never set), so one resolution holds for
    every request."""
    resolve = getattr(sdk_client, "_resolve_endpoint_ruleset", None)
    if resolve is None:
        raise LeanUnsupportedError("this aiobotocore does not expose its endpoint resolver")
    meta = sdk_client.meta
    auth_type = model.resolved_auth_type
    context: dict[str, Any] = {
        "client_region": meta.region_name,
        "client_config": meta.config,
        "has_streaming_input": model.has_streaming_input,
        "auth_type": auth_type,
        "unsigned_payload": model.unsigned_payload,
        "auth_options": meta.service_model.metadata.get("auth"),
    }
    url, headers, _properties = await resolve(model, {}, context)
    auth_type = context.get("auth_type", auth_type)
    if auth_type not in (None, "v4"):
        raise LeanUnsupportedError(f"{model.name} signs with {auth_type!r}, the lean path with SigV4 only")
    signing = context.get("signing") or {}
    signing_name = signing.get("signing_name") or meta.service_model.signing_name
    region = signing.get("region") or meta.region_name
    if not region:
        raise bx.NoRegionError()
    return str(url), {str(k): str(v) for k, v in (headers or {}).items()}, str(signing_name), str(region)
