"""One ONTAP connection: asyncio Protocol glue around the sans-IO framer and the ingest step.

Per read: split frames (the reader), hand the payloads to the pure ingest step (``pipeline/ingest.py``: session,
decode, event, replay flags, routes, dedup claim, JSON), append its records to the spool, write its replies.
Nothing here awaits; replies produced by one read are written with one ``writelines`` (a synchronous engine's
SCREEN_RESP waits until its event is durable). While the pipeline asks for it (spool over its pause
watermark), the transport stops reading and TCP pushes back to ONTAP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from fpolicyd.capture import CaptureRecorder, ConnectionCapture
from fpolicyd.errors import RemoteProtocolError
from fpolicyd.obs.log import get_logger
from fpolicyd.pipeline.ingest import Ingest, IngestSession
from fpolicyd.protocol.readers import ReaderName, codec_for, fast_screen_for, make_reader
from fpolicyd.protocol.session import Notice, NoticeKind, Session, SessionConfig
from fpolicyd.server.allowlist import PeerAllowlist
from fpolicyd.server.pipeline import EventPipeline
from fpolicyd.server.tls import peer_certificate_subject

log = get_logger("fpolicyd.connection")


@dataclass(slots=True)
class ConnectionStats:
    frames: int = 0
    events: int = 0
    bytes_received: int = 0


class ServerContext:
    """What every connection shares: settings, the pipeline, counters, the set of live connections."""

    def __init__(
        self,
        *,
        session_config: SessionConfig,
        ingest: Ingest,
        pipeline: EventPipeline,
        max_frame_bytes: int,
        max_connections: int,
        wall_clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        quarantine: Callable[[bytes, str, bool], None] = lambda payload, reason, negotiated: None,
        allowlist: PeerAllowlist | None = None,
        frame_reader: str = ReaderName.XML,
        capture: CaptureRecorder | None = None,
    ) -> None:
        self.session_config = session_config
        #: The per-event work every session shares (names, routes, dedup window, redaction, counters).
        self.ingest = ingest
        self.pipeline = pipeline
        pipeline.broadcast_back_pressure = self.broadcast_back_pressure
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.wall_clock_us = wall_clock_us
        #: Where a payload that broke the protocol goes (the dead-letter file), with the reason and whether the
        #: session had completed the handshake (before it, only a sample of the bytes is kept).
        self.quarantine = quarantine
        self.connections: set[FPolicyConnection] = set()
        #: Peers that may connect (empty = any).
        self.allowlist = allowlist if allowlist is not None else PeerAllowlist()
        #: The listener's frame reader (:class:`ReaderName`: xml, protobuf-*, auto) and the optional wire capture.
        self.frame_reader = ReaderName(frame_reader)
        self.capture = capture
        #: Connections closed at once, by reason (``not_allowed``, ``max_connections``).
        self.rejections: dict[str, int] = {}
        self.protocol_errors: dict[str, int] = {}
        self.notices: dict[str, int] = {}
        self.sessions_opened = 0

    def reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    @property
    def rejected_connections(self) -> int:
        return sum(self.rejections.values())

    def broadcast_back_pressure(self, apply: bool) -> None:
        """BACK_PRESSURE_APPLY (or _REM) to every negotiated session."""
        for conn in list(self.connections):
            conn.send_back_pressure(apply)


class FPolicyConnection(asyncio.Protocol):
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = make_reader(ctx.frame_reader, ctx.max_frame_bytes)
        self._capture: ConnectionCapture | None = None
        self._session: Session | None = None
        self._ingest: IngestSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._paused = False
        self._yielding = False
        self.peer = "?"
        self.last_data_at = self._loop.time()
        self.stats = ConnectionStats()
        self.closed = asyncio.Event()

    # ------------------------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peername: Any = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        ctx = self._ctx
        host = peername[0] if isinstance(peername, tuple) else ""
        if not ctx.allowlist.allows(host):
            ctx.reject("not_allowed")
            log.warning("connection_rejected", peer=self.peer, reason="not_allowed")
            transport.abort()
            return
        if len(ctx.connections) >= ctx.max_connections:
            ctx.reject("max_connections")
            log.warning("connection_rejected", peer=self.peer, reason="max_connections", limit=ctx.max_connections)
            transport.abort()
            return
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
        log.info("connection_opened", peer=self.peer, connections=len(ctx.connections), **tls)
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
        pipeline = ctx.pipeline
        write = self._write
        pipeline.submit_many(
            batch.records, [(index, partial(write, reply)) for index, reply in batch.durable_replies], batch.claims
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
        if pipeline.reading_paused and not self._paused:
            self._pause()
        elif not self._paused:
            self._yield()
        deadline = ingest.session.deadline()
        if deadline is not None and deadline < self._timer_at:
            self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ctx.connections.discard(self)
        if self._capture is not None:
            self._capture.close()
        self._ctx.pipeline.forget(id(self))
        if self._timer is not None:
            self._timer.cancel()
        if self._ingest is not None:
            self._ingest.closed(self._loop.time())
        session = self._session
        if session is not None:
            session.closed()
            log.info(
                "connection_closed",
                peer=self.peer,
                error=str(exc) if exc else None,
                expected=session.fatal_alert,
                frames=self.stats.frames,
                events=self.stats.events,
                session_id=session.context.session_id if session.context else None,
            )
        self.closed.set()

    def pause_writing(self) -> None:
        """ONTAP is not reading our replies; nothing to do but note it (replies are tiny)."""
        log.warning("peer_not_reading", peer=self.peer)

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
        if not self._paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _pause(self) -> None:
        assert self._transport is not None
        self._paused = True
        self._transport.pause_reading()
        self._ctx.pipeline.park(id(self), self._resume)

    def _resume(self) -> None:
        self._paused = False
        if not self._yielding and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _notice(self, notice: Notice) -> None:
        kind = notice.kind
        ctx = self._ctx
        ctx.notices[kind] = ctx.notices.get(kind, 0) + 1
        if kind is NoticeKind.KEEP_ALIVE:
            return
        if kind is NoticeKind.HANDSHAKE and ctx.pipeline.back_pressure_applied:
            self.send_back_pressure(True)
        if kind is NoticeKind.ALERT:
            severity = str(notice.fields.get("severity", ""))
            emit = log.error if severity.upper() == "FATAL" else log.warning
            emit("ontap_alert", peer=self.peer, **notice.fields)
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

    def _close(self, reason: str, detail: str) -> None:
        ctx = self._ctx
        ctx.protocol_errors[reason] = ctx.protocol_errors.get(reason, 0) + 1
        log.warning("connection_closing", peer=self.peer, reason=reason, detail=detail)
        if self._session is not None:
            self._session.closed()
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

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
    def quiet_for(self) -> float:
        """Seconds since this connection last received anything."""
        return self._loop.time() - self.last_data_at

    def shutdown(self) -> None:
        """Close on daemon stop (no goodbye exists in the protocol; ONTAP reconnects elsewhere)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
