"""One ONTAP connection: asyncio Protocol glue around the sans-IO framer and the ingest step.

Per read: split frames (the reader), hand the payloads to the pure ingest step (``pipeline/ingest.py``: session,
decode, event, replay flags, routes, dedup claim, JSON), append its records to the spool, write its replies.
Nothing here awaits; replies produced by one read are written with one ``writelines`` (a synchronous engine's
SCREEN_RESP waits until its event is durable). While the spooler asks for it (spool over its pause
watermark), the transport stops reading and TCP pushes back to ONTAP. So it does while ONTAP does not read our
replies (the transport's write buffer above ``write_buffer_bytes``): a session that makes us queue replies makes
no more until it reads them, and one that stays stalled for ``write_stall_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.ratelimit import LogRateLimiter
from fpolicyd.pipeline.ingest import Ingest, IngestSession
from fpolicyd.protocol.readers import ReaderName, codec_for, fast_screen_for, make_reader
from fpolicyd.protocol.session import Notice, NoticeKind, PendingAnswer, Session
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.server.allowlist import PeerAllowlist
from fpolicyd.server.budget import BudgetLimits, ConnectionBudget, Refusal
from fpolicyd.server.capture import CaptureRecorder, ConnectionCapture
from fpolicyd.server.spooler import Spooler
from fpolicyd.server.tls import peer_certificate_subject
from fpolicyd.server.tls_failures import TlsFailure, classify_handshake_failure

log = get_logger("fpolicyd.connection")


@dataclass(slots=True)
class ConnectionStats:
    frames: int = 0
    events: int = 0
    bytes_received: int = 0


#: A refusal that is not the budget's: the peer is outside ``allowed_networks``.
NOT_ALLOWED: Final = "not_allowed"


class LiveConnections:
    """The live connections. Created before the spooler and the server context and handed to both (each needs the
    other): connections add and remove themselves through the context; the spooler calls
    :meth:`broadcast_back_pressure` when ONTAP should stop or resume sending."""

    def __init__(self) -> None:
        self._connections: set[FPolicyConnection] = set()

    def add(self, conn: FPolicyConnection) -> None:
        self._connections.add(conn)

    def discard(self, conn: FPolicyConnection) -> None:
        self._connections.discard(conn)

    def __iter__(self) -> Iterator[FPolicyConnection]:
        return iter(self._connections)

    def __len__(self) -> int:
        return len(self._connections)

    def broadcast_back_pressure(self, apply: bool) -> None:
        """BACK_PRESSURE_APPLY (or _REM) to every negotiated session."""
        for conn in list(self._connections):
            conn.send_back_pressure(apply)


class ServerContext:
    """What every connection shares: settings, the spooler, counters, the set of live connections, the
    connection budget (pending vs negotiated, ``server/budget.py``) and the rate limiter of their log lines."""

    def __init__(
        self,
        *,
        session_config: SessionConfig,
        ingest: Ingest,
        spooler: Spooler,
        connections: LiveConnections,
        max_frame_bytes: int,
        max_connections: int,
        wall_clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        quarantine: Callable[[bytes, str, bool], None] = lambda payload, reason, negotiated: None,
        allowlist: PeerAllowlist | None = None,
        frame_reader: str = ReaderName.XML,
        capture: CaptureRecorder | None = None,
        write_buffer_bytes: int = 256 << 10,
        write_stall_timeout_s: float = 30.0,
        max_pending: int = 64,
        max_per_peer: int = 0,
        log_rate_limit_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_config = session_config
        #: The per-event work every session shares (names, routes, dedup window, redaction, counters).
        self.ingest = ingest
        self.spooler = spooler
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.wall_clock_us = wall_clock_us
        #: Where a payload that broke the protocol goes (the dead-letter file), with the reason and whether the
        #: session had completed the handshake (before it, only a sample of the bytes is kept).
        self.quarantine = quarantine
        #: The live connections (the spooler broadcasts back-pressure to them).
        self.connections = connections
        #: Peers that may connect (empty = any).
        self.allowlist = allowlist if allowlist is not None else PeerAllowlist()
        #: The listener's frame reader (:class:`ReaderName`: xml, protobuf-*, auto) and the optional wire capture.
        self.frame_reader = ReaderName(frame_reader)
        self.capture = capture
        #: Replies a session may have queued unread (the transport's high watermark; it resumes at a quarter), and
        #: how long it may stay above it before it is closed.
        self.write_buffer_bytes = write_buffer_bytes
        self.write_stall_timeout_s = write_stall_timeout_s
        #: Times a session stopped being read because ONTAP did not read our replies.
        self.write_stalls = 0
        #: Connections closed by the server before or instead of a session, by reason (``not_allowed`` and the
        #: :class:`~fpolicyd.server.budget.Refusal` values).
        self.rejections: dict[str, int] = {}
        #: Pending connections (accepted, NEGO_REQ not answered yet) and negotiated sessions.
        self.budget: ConnectionBudget[FPolicyConnection] = ConnectionBudget(
            BudgetLimits(max_sessions=max_connections, max_pending=max_pending, max_per_peer=max_per_peer)
        )
        #: Failed TLS handshakes, by :class:`~fpolicyd.server.tls_failures.TlsFailure` value.
        self.tls_failures: dict[str, int] = {}
        #: One line per (event, reason) per interval for what a hostile peer can repeat at will.
        self.log_limiter = LogRateLimiter(log_rate_limit_interval_s)
        self.clock = clock
        self.protocol_errors: dict[str, int] = {}
        self.notices: dict[str, int] = {}
        #: Synchronous engines: STATUS_QUERY_RESP answers sent, by answer (``in_progress``, ``lost``).
        self.status_answers: dict[str, int] = {}
        self.sessions_opened = 0

    def reject(self, reason: str, peer: str, **fields: Any) -> None:
        """Count a connection closed by the server (every one) and log it (rate-limited)."""
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self.log_limited(log.warning, "connection_rejected", reason, peer=peer, **fields)

    def log_limited(self, emit: Callable[..., Any], event: str, reason: str, **fields: Any) -> None:
        """Write ``event`` unless a line for (event, reason) was written less than the interval ago; a written
        line carries ``suppressed``: the lines left out since the previous one."""
        suppressed = self.log_limiter.admit(f"{event}:{reason}", self.clock())
        if suppressed is not None:
            emit(event, reason=reason, suppressed=suppressed, **fields)

    def flush_log_summaries(self) -> None:
        """One summary line per (event, reason) whose lines were left out and that has been quiet for an
        interval (called on the heartbeat), so a burst's last count is not lost."""
        for key, suppressed in self.log_limiter.due(self.clock()):
            event, _, reason = key.partition(":")
            log.warning(event, reason=reason, suppressed=suppressed, summary=True)

    def admit(self, conn: FPolicyConnection) -> bool:
        """A connection was accepted (before any TLS handshake): allowlist, then the budget. Evicts the oldest
        pending connections the budget names; false when ``conn`` must be closed at once."""
        if not self.allowlist.allows(conn.host):
            self.reject(NOT_ALLOWED, conn.peer)
            return False
        admission = self.budget.open(conn, conn.host)
        for evicted in admission.evict:
            self.reject(
                Refusal.PENDING_EVICTED,
                evicted.peer,
                limit=self.budget.limits.max_pending,
                pending_for_s=round(evicted.age_s, 3),
            )
            evicted.evict()
        refused = admission.refused
        if refused is not None:
            limit = self.max_connections if refused is Refusal.MAX_CONNECTIONS else self.budget.limits.max_per_peer
            self.reject(refused, conn.peer, limit=limit)
            return False
        return True

    def tls_failed(self, conn: FPolicyConnection, exc: BaseException) -> TlsFailure:
        """A TLS handshake failed: count it by reason and log it (rate-limited)."""
        reason = classify_handshake_failure(exc)
        self.tls_failures[reason] = self.tls_failures.get(reason, 0) + 1
        self.log_limited(
            log.warning, "tls_handshake_failed", reason, peer=conn.peer, error=str(exc) or type(exc).__name__
        )
        return reason

    @property
    def rejected_connections(self) -> int:
        return sum(self.rejections.values())


class FPolicyConnection(asyncio.Protocol):
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = make_reader(ctx.frame_reader, ctx.max_frame_bytes, accelerate=ctx.ingest.accelerate)
        self._capture: ConnectionCapture | None = None
        self._session: Session | None = None
        self._ingest: IngestSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._paused = False
        self._yielding = False
        #: ONTAP is not reading our replies (above the write buffer's high watermark); the stall timer closes it.
        self._write_blocked = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        #: The peer's address without the port (what the allowlist and the per-peer limit look at).
        self.host = ""
        self.accepted_at = self._loop.time()
        self.last_data_at = self.accepted_at
        self.stats = ConnectionStats()
        self.closed = asyncio.Event()
        #: Admitted by the budget (at accept: by connection_made, or by the TLS listener before the handshake).
        self._admitted = False
        #: Pending: accepted, its NEGO_REQ not answered yet (it holds a pending slot, not a session slot).
        self._pending = False
        #: Closed by the server to make room for a newer pending connection.
        self.evicted = False
        #: TLS: the accepted socket while its handshake runs (no transport reaches this protocol before).
        self._socket: socket.socket | None = None

    # ------------------------------------------------------------------------------------ admission

    def admit(self, peername: object) -> bool:
        """Called once, at accept: the allowlist and the connection budget. False: close the connection."""
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        self.host = str(peername[0]) if isinstance(peername, tuple) else ""
        self._admitted = True
        self._pending = self._ctx.admit(self)
        return self._pending

    def attach_socket(self, sock: socket.socket) -> None:
        """TLS: the socket whose handshake is running, so that an eviction can end it."""
        self._socket = sock

    def handshake_failed(self, exc: BaseException) -> None:
        """TLS: the handshake failed (connection_made and connection_lost are never called): release the slot,
        and count and log the failure unless the server itself ended it."""
        self._socket = None
        self._ctx.budget.discard(self)
        if not self.evicted:
            self._ctx.tls_failed(self, exc)
        self.closed.set()

    @property
    def age_s(self) -> float:
        """Seconds since the connection was accepted."""
        return self._loop.time() - self.accepted_at

    def evict(self) -> None:
        """Close a pending connection to make room for a newer one (already counted and released)."""
        self.evicted = True
        self._pending = False
        transport = self._transport
        if transport is not None:
            transport.abort()
            return
        sock = self._socket
        if sock is not None:
            # The handshake's transport owns the descriptor: end the connection, let the transport close it
            # (the handshake then fails and handshake_failed runs).
            with contextlib.suppress(OSError):  # already closed by its transport
                sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._socket = None
        ctx = self._ctx
        if not self._admitted:
            if not self.admit(transport.get_extra_info("peername")):
                transport.abort()
                return
        elif self.evicted:  # evicted while its TLS handshake finished
            transport.abort()
            return
        transport.set_write_buffer_limits(high=ctx.write_buffer_bytes, low=ctx.write_buffer_bytes // 4)
        ctx.connections.add(self)
        ctx.sessions_opened += 1
        decode, encode = codec_for(self._reader)
        self._session = Session(
            ctx.session_config,
            peer=self.peer,
            now=self._loop.time(),
            decode=decode,
            encode=encode,
            fast=fast_screen_for(self._reader),
        )
        self._ingest = ctx.ingest.session(self._session)
        if ctx.capture is not None:
            self._capture = ctx.capture.open(self.peer, ctx.frame_reader.value)
        subject = peer_certificate_subject(transport.get_extra_info("peercert"))
        tls = {"client_certificate": subject} if subject is not None else {}
        # Rate-limited: connections that never negotiate can arrive by the thousand; a node that negotiates
        # always gets its session_handshake line.
        ctx.log_limited(
            log.info,
            "connection_opened",
            "accepted",
            peer=self.peer,
            pending=ctx.budget.pending,
            sessions=ctx.budget.sessions,
            **tls,
        )
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        ingest = self._ingest
        transport = self._transport
        if ingest is None or transport is None or transport.is_closing():
            return
        self.stats.bytes_received += len(data)
        if self._capture is not None:
            self._capture.received(data)
        self.last_data_at = self._loop.time()
        try:
            payloads = self._reader.feed(data)
        except RemoteProtocolError as exc:
            self._close(exc.reason, exc.detail)
            return
        if not payloads:
            return
        ctx = self._ctx
        received_at_us = ctx.wall_clock_us()
        batch = ingest.feed(payloads, self._loop.time(), received_at_us, received_at_us / 1_000_000)
        spooler = ctx.spooler
        answer = self._answer
        if self._pending and batch.notices and not self._negotiated(batch.notices):
            # Refused at NEGO (max_connections sessions open): NEGO_REQ goes unanswered. Whatever came with it
            # is still kept (ONTAP sends nothing before NEGO_RESP, so normally nothing).
            spooler.submit_many(batch.records, [], batch.claims)
            self._close_quietly()
            return
        spooler.submit_many(
            batch.records, [(index, partial(answer, reply)) for index, reply in batch.durable_replies], batch.claims
        )
        if batch.replies:
            transport.writelines(batch.replies)
        for notice in batch.notices:
            self._notice(notice)
        self.stats.events += batch.events
        self.stats.frames += batch.frames
        close = batch.close
        if close is not None:
            # A session that completed the handshake talks to ONTAP; before it, the peer may be anyone.
            negotiated = ingest.session.context is not None
            if batch.rejected is not None:
                # Keep the frame that could not be decoded (raw, base64 in the dead-letter file): an
                # undecodable notification is still a notification ONTAP considers delivered. So are the frames
                # that came with it in the same read, which the closing session will not decode.
                ctx.quarantine(batch.rejected, f"{close.reason}: {close.detail}", negotiated)
            for abandoned in batch.abandoned:
                ctx.quarantine(
                    abandoned, f"read after a frame that closed the session ({close.reason}); not decoded", negotiated
                )
            self._close(close.reason, close.detail)
            return
        if spooler.reading_paused and not self._paused:
            self._pause()
        elif not self._paused:
            self._yield()
        deadline = ingest.session.deadline()
        if deadline is not None and deadline < self._timer_at:
            self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ctx.connections.discard(self)
        self._pending = False
        self._ctx.budget.discard(self)
        if self._capture is not None:
            self._capture.close()
        self._ctx.spooler.forget(id(self))
        if self._timer is not None:
            self._timer.cancel()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if self._ingest is not None:
            self._ingest.closed(self._loop.time())
        session = self._session
        if session is not None:
            session.closed()
            error = str(exc) if exc else None
            if session.context is None:
                # Never negotiated: as repeatable by a hostile peer as a refusal, so rate-limited.
                self._ctx.log_limited(
                    log.info, "connection_closed", "not_negotiated", peer=self.peer, error=error, evicted=self.evicted
                )
            else:
                log.info(
                    "connection_closed",
                    peer=self.peer,
                    error=error,
                    expected=session.fatal_alert,
                    frames=self.stats.frames,
                    events=self.stats.events,
                    session_id=session.context.session_id,
                )
        self.closed.set()

    def pause_writing(self) -> None:
        """ONTAP is not reading our replies: read nothing more from it (every request read makes another reply),
        until it does; close it if it does not within ``write_stall_timeout_s``."""
        ctx = self._ctx
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._write_blocked = True
        ctx.write_stalls += 1
        transport.pause_reading()
        self._stall_timer = self._loop.call_later(ctx.write_stall_timeout_s, self._write_stalled)
        log.warning(
            "peer_not_reading",
            peer=self.peer,
            queued_bytes=transport.get_write_buffer_size(),
            limit=ctx.write_buffer_bytes,
            detail=f"reading paused until ONTAP reads our replies; closed after {ctx.write_stall_timeout_s:g} s",
        )

    def resume_writing(self) -> None:
        self._write_blocked = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        log.info("peer_reading_again", peer=self.peer)
        self._resume_reading()

    def _write_stalled(self) -> None:
        self._stall_timer = None
        transport = self._transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        self._close(
            "write_stall",
            f"{queued} bytes of replies still unread by ONTAP after {self._ctx.write_stall_timeout_s:g} s",
            abort=True,  # close() would wait for ONTAP to read them
        )

    # ------------------------------------------------------------------------------------ helpers

    def _yield(self) -> None:
        """Stop reading until the next loop iteration.

        libuv reads a busy socket up to 32 times in one go; at ~50 µs per event that starved the sink task,
        the timers and every other connection for most of a second. One read per connection per iteration
        keeps them all moving (measured: the sink backlog went from 50k events to one batch)."""
        if self._yielding:
            return
        assert self._transport is not None
        self._yielding = True
        self._transport.pause_reading()
        self._loop.call_soon(self._end_yield)

    def _end_yield(self) -> None:
        self._yielding = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again, unless something else still holds reading: the spooler (``_paused``), this loop
        iteration's yield, or replies ONTAP has not read."""
        if self._paused or self._yielding or self._write_blocked:
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _pause(self) -> None:
        assert self._transport is not None
        self._paused = True
        self._transport.pause_reading()
        self._ctx.spooler.park(id(self), self._resume)

    def _resume(self) -> None:
        self._paused = False
        self._resume_reading()

    def _notice(self, notice: Notice) -> None:
        kind = notice.kind
        ctx = self._ctx
        ctx.notices[kind] = ctx.notices.get(kind, 0) + 1
        if kind is NoticeKind.KEEP_ALIVE:
            return
        if kind is NoticeKind.HANDSHAKE and ctx.spooler.back_pressure_applied:
            self.send_back_pressure(True)
        if kind is NoticeKind.ALERT:
            severity = str(notice.fields.get("severity", ""))
            emit = log.error if severity.upper() == "FATAL" else log.warning
            # A negotiated peer can send alerts at will (a fuzz run logged 10,167 FATAL lines): one line per
            # (severity, peer address) per interval, carrying the count left out; every ONTAP node keeps its own.
            suppressed = ctx.log_limiter.admit(f"ontap_alert:{severity.upper()}:{self.host}", ctx.clock())
            if suppressed is not None:
                emit("ontap_alert", peer=self.peer, suppressed=suppressed, **notice.fields)
        elif kind is NoticeKind.STATUS_QUERY:
            answer = notice.fields.get("answer")
            if answer is not None:
                ctx.status_answers[answer] = ctx.status_answers.get(answer, 0) + 1
            # "in progress" is the daemon holding the request (a slow spool says why elsewhere); "lost" and a query
            # to an asynchronous engine are worth a look.
            emit = log.info if answer == "in_progress" else log.warning
            emit("session_status_query", peer=self.peer, **notice.fields)
        elif kind is NoticeKind.UNTRACKED:
            log.warning(
                "session_untracked_requests",
                peer=self.peer,
                **notice.fields,
                detail="more requests outstanding than sync_max_outstanding_requests; the oldest are no longer "
                "tracked (a STATUS_QUERY for one answers 'lost' and ONTAP sends it again): set it to at least "
                "ONTAP's max-server-reqs",
            )
        elif kind in (NoticeKind.HANDSHAKE, NoticeKind.STATE, NoticeKind.OUTAGE, NoticeKind.VOLUME):
            log.info(f"session_{kind.value}", peer=self.peer, **notice.fields)
        else:
            log.warning(f"session_{kind.value}", peer=self.peer, **notice.fields)

    def _arm_timer(self) -> None:
        """Schedule one timer at the session's deadline. Activity only moves a deadline later, so the timer is
        re-armed when it fires early (cheap) and, after each read, only if the deadline moved earlier."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        session = self._session
        if session is None:
            return
        deadline = session.deadline()
        if deadline is not None:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        session = self._session
        if session is None or self._transport is None or self._transport.is_closing():
            return
        close = session.check_timers(self._loop.time())
        if close is not None:
            self._close(close.reason, close.detail)
        else:
            self._arm_timer()

    def _negotiated(self, notices: list[Notice]) -> bool:
        """Whether this read may go on: true unless it completed NEGO and no session slot is free."""
        if not any(notice.kind is NoticeKind.HANDSHAKE for notice in notices):
            return True
        ctx = self._ctx
        if ctx.budget.promote(self):
            self._pending = False
            return True
        ctx.reject(Refusal.MAX_CONNECTIONS, self.peer, limit=ctx.max_connections, at="nego")
        return False

    def _close_quietly(self) -> None:
        """Close a connection the server refused (already counted and logged)."""
        self._ctx.budget.discard(self)
        self._pending = False
        if self._session is not None:
            self._session.closed()
        if self._transport is not None:
            self._transport.abort()

    def _close(self, reason: str, detail: str, *, abort: bool = False) -> None:
        ctx = self._ctx
        ctx.protocol_errors[reason] = ctx.protocol_errors.get(reason, 0) + 1
        if self._pending:  # before NEGO (e.g. handshake_timeout): as repeatable by a hostile peer as a refusal
            ctx.log_limited(log.warning, "connection_closing", reason, peer=self.peer, detail=detail)
        else:
            log.warning("connection_closing", peer=self.peer, reason=reason, detail=detail)
        if self._session is not None:
            self._session.closed()
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _answer(self, answer: PendingAnswer) -> None:
        """A synchronous engine's SCREEN_RESP, once its event is durable: write it; the request is answered."""
        self._write(answer.data)
        if self._session is not None:
            self._session.answered(answer)

    def send_back_pressure(self, apply: bool) -> None:
        session = self._session
        if session is not None and session.context is not None:
            self._write(session.back_pressure(apply))

    def begin_shutdown(self) -> None:
        """First step of a daemon stop: ask ONTAP to stop sending (BACK_PRESSURE_APPLY) and keep reading.

        In async mode ONTAP counts a notification as delivered once its socket accepted it, so whatever is
        already in the kernel's buffers must be read before the connection is closed, not thrown away."""
        session = self._session
        transport = self._transport
        if session is None or transport is None or transport.is_closing() or session.context is None:
            return
        transport.write(session.back_pressure(True))
        log.info("back_pressure_applied", peer=self.peer, reason="shutdown", session_id=session.context.session_id)

    @property
    def outstanding(self) -> int:
        """Synchronous engines: this session's requests not yet answered or cancelled."""
        return 0 if self._session is None else len(self._session.outstanding)

    @property
    def quiet_for(self) -> float:
        """Seconds since this connection last received anything."""
        return self._loop.time() - self.last_data_at

    def shutdown(self) -> None:
        """Close on daemon stop (no goodbye exists in the protocol; ONTAP reconnects elsewhere). A session whose
        replies ONTAP is not reading is aborted: a close would wait for them to be read."""
        transport = self._transport
        if transport is not None and self._write_blocked:
            transport.abort()
        elif transport is not None and not transport.is_closing():
            transport.close()

    @property
    def pending(self) -> bool:
        """Accepted, NEGO_REQ not answered yet."""
        return self._pending
