"""One ONTAP control channel as a sans-IO state machine (``docs/protocol.md`` §3, §5–§7).

The session never reads a clock or touches a socket: the connection passes ``now`` (monotonic seconds) and
the payloads it framed, and gets back what to do — replies to write, file notifications to hand on, notices
to log and count, or an order to close. Timers are expressed as a deadline the connection asks for.

Rules it enforces:
- the first message must be NEGO_REQ, within ``handshake_timeout_s`` of the connection opening;
- NEGO_RESP echoes VsUUID, PolicyName and SessionId and picks a version *from the offer*, by preference;
- liveness: nothing received for ``idle_timeout_s`` (≥ 3 × the keep-alive interval, never equal to it) ⇒ close;
- synchronous engines get SCREEN_RESP allow for every SCREEN_REQ (the caller decides *when* to send it, and says so
  with :meth:`Session.answered`); a STATUS_QUERY_REQ is answered from the requests still outstanding — received, not
  yet answered, not cancelled (:class:`OutstandingRequests`): 1 "in progress" for those, 2 "request lost" for any
  other, so that ONTAP re-sends at once instead of waiting out its cancel timeout; asynchronous engines get nothing
  but NEGO_RESP;
- ALERT_MSG is surfaced with its severity (FATAL ⇒ ONTAP is about to close); unknown types are ignored;
- a protocol error closes this connection only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Final, NamedTuple

from fpolicyd.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import (
    ALLOW,
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    Alert,
    BackPressure,
    Handshake,
    HandshakeResp,
    KeepAlive,
    Message,
    Outage,
    ScreenCancel,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    UnknownMessage,
    VolumeNotification,
)
from fpolicyd.protocol.session_config import EngineMode, SessionConfig
from fpolicyd.protocol.xml_codec import Decoded, FastScreen, decode_payload, encode_message, fast_screen_reads_xml
from fpolicyd.protocol.xml_fast import ScreenFields, fields_of

#: How a STATUS_QUERY_RESP ``Resp`` code reads in logs and metrics.
STATUS_ANSWERS: Final[dict[int, str]] = {STATUS_IN_PROGRESS: "in_progress", STATUS_REQUEST_LOST: "lost"}


class SessionState(Enum):
    AWAITING_NEGO = "awaiting_nego"
    ACTIVE = "active"
    CLOSED = "closed"


class NoticeKind(StrEnum):
    """Things worth a log line and a counter that need no reply."""

    HANDSHAKE = "handshake"
    KEEP_ALIVE = "keep_alive"
    ALERT = "alert"
    CANCEL = "cancel"
    STATUS_QUERY = "status_query"
    VOLUME = "volume_notification"
    #: A synchronous session went over ``max_outstanding``: its oldest outstanding request is no longer tracked.
    UNTRACKED = "untracked_requests"
    OUTAGE = "outage"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_DIRECTION = "unexpected_direction"
    CONTENT_LEN_MISMATCH = "content_len_mismatch"
    STATE = "state"


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to write to the peer now."""

    data: bytes


class PendingAnswer(NamedTuple):
    """A synchronous engine's SCREEN_RESP (``data``, framed), to write once its event is durable; then
    :meth:`Session.answered` with it, and the request is no longer outstanding. (Immutable like the frozen
    dataclasses here, and made once per synchronous event: a NamedTuple is built in about half the time.)"""

    data: bytes
    req_id: int
    #: Which copy of ``req_id`` this answers (ONTAP may send a request again; only the newest copy's answer counts).
    ticket: int


@dataclass(frozen=True, slots=True)
class FileNotification:
    """A SCREEN_REQ to hand on, as the decoder's flat fields (whichever decoder read it). ``response`` (sync
    engines only) is to be written once the event is safe."""

    fields: ScreenFields
    response: PendingAnswer | None


@dataclass(frozen=True, slots=True)
class Close:
    reason: str
    detail: str = ""


Output = FileNotification | Reply | Notice | Close


class OutstandingRequests:
    """The requests of a synchronous session that ONTAP is still waiting for: received, not yet answered, not
    cancelled. Pure bookkeeping (no clock, no I/O); every operation is O(1).

    - :meth:`received` a SCREEN_REQ: outstanding, and gets a ticket (a copy number). ONTAP sends a request again after
      a "request lost" answer or a cancel; a copy that arrives while an earlier one is outstanding replaces it, and
      only the newest copy's answer (:meth:`answered` with its ticket) ends it.
    - :meth:`cancelled` (SCREEN_CANCEL) ends it at once, whatever copy is pending.
    - Beyond ``limit`` outstanding requests (more than ONTAP's ``max-server-reqs`` allows it to send), the one that
      has waited longest is forgotten and counted in :attr:`untracked`: a STATUS_QUERY for it answers "lost", ONTAP
      sends it again, and the exact-dedup window recognises the copy. Memory stays bounded; no event is lost.
    """

    __slots__ = ("_by_req", "_limit", "_next_ticket", "untracked")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError("the outstanding-request limit must be >= 1")
        self._limit = limit
        #: req_id → ticket of its newest copy, oldest request first (dict order: a new copy moves to the end).
        self._by_req: dict[int, int] = {}
        self._next_ticket = 1
        #: Requests forgotten at the limit, since the session began.
        self.untracked = 0

    def received(self, req_id: int) -> int:
        """A SCREEN_REQ arrived: it is outstanding; returns the ticket its answer must carry."""
        by_req = self._by_req
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        if req_id in by_req:
            del by_req[req_id]
        by_req[req_id] = ticket
        if len(by_req) > self._limit:
            del by_req[next(iter(by_req))]
            self.untracked += 1
        return ticket

    def answered(self, req_id: int, ticket: int) -> None:
        """The SCREEN_RESP of copy ``ticket`` went out: the request is no longer outstanding, unless a newer copy
        of it is (that one still waits for its own answer)."""
        if self._by_req.get(req_id) == ticket:
            del self._by_req[req_id]

    def cancelled(self, req_id: int) -> bool:
        """ONTAP cancelled ``req_id`` (SCREEN_CANCEL); returns whether it was outstanding."""
        return self._by_req.pop(req_id, None) is not None

    @property
    def limit(self) -> int:
        return self._limit

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._by_req

    def __len__(self) -> int:
        return len(self._by_req)


class Session:
    """State of one ONTAP connection. Not thread-safe; one per connection."""

    __slots__ = (
        "_config",
        "_deadline_base",
        "_decode",
        "_encode",
        "_fast",
        "_sync",
        "context",
        "fatal_alert",
        "last_received",
        "outstanding",
        "peer",
        "state",
    )

    def __init__(
        self,
        config: SessionConfig,
        *,
        peer: str,
        now: float,
        decode: Callable[[bytes], Decoded] = decode_payload,
        encode: Callable[[Message], bytes] = encode_message,
        fast: FastScreen | None = None,
    ) -> None:
        """``decode``/``encode`` are the connection's wire format (XML by default; protobuf mode passes
        :func:`fpolicyd.protocol.readers.codec_for`): payload → message, and message → framed bytes. ``fast``
        (XML mode) reads a SCREEN_REQ in ONTAP's canonical layout without the full decoder; see :meth:`screen`."""
        self._config = config
        self._decode = decode
        self._encode = encode
        self._fast = fast
        self._sync = config.engine_mode is EngineMode.SYNC
        self.peer = peer
        self.state = SessionState.AWAITING_NEGO
        self.context: SessionContext | None = None
        self.last_received = now
        self._deadline_base = now
        #: Set when ONTAP announced a FATAL alert: the close that follows is expected, not a failure.
        self.fatal_alert = False
        #: Synchronous engines: the requests ONTAP still waits for (what a STATUS_QUERY is answered from).
        self.outstanding = OutstandingRequests(config.max_outstanding)

    # ------------------------------------------------------------------------------------------ timers

    def deadline(self) -> float | None:
        """When :meth:`check_timers` next has something to decide (monotonic seconds), or None."""
        if self.state is SessionState.AWAITING_NEGO:
            return self._deadline_base + self._config.handshake_timeout_s
        if self.state is SessionState.ACTIVE and self._config.idle_timeout_s:
            return self.last_received + self._config.idle_timeout_s
        return None

    def check_timers(self, now: float) -> Close | None:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        if self.state is SessionState.AWAITING_NEGO:
            self.state = SessionState.CLOSED
            return Close("handshake_timeout", f"no NEGO_REQ within {self._config.handshake_timeout_s:g} s")
        self.state = SessionState.CLOSED
        return Close(
            "idle_timeout",
            f"nothing received for {now - self.last_received:.1f} s (limit {self._config.idle_timeout_s:g} s)",
        )

    # ------------------------------------------------------------------------------------------ input

    def screen(self, payload: bytes, now: float) -> FileNotification | None:
        """The common case in one call: a SCREEN_REQ in ONTAP's canonical layout on an active session becomes a
        :class:`FileNotification` exactly as :meth:`receive` would make it. None means "not that case, nothing
        happened": hand the payload to :meth:`receive`. Only when ``ContentLen`` agrees with the body; a mismatch
        takes the general path, which reports it."""
        fast = self._fast
        if fast is None or self.state is not SessionState.ACTIVE:
            return None
        fields = fast(payload)
        if fields is None:
            return None
        return FileNotification(fields, self._screened(fields.req_id, fields.req_type, now))

    def fast_ready(self) -> bool:
        """Whether a payload may be read outside the session by a reader of the same canonical SCREEN_REQ layout
        as :meth:`screen`'s (the C accelerator, :mod:`fpolicyd.pipeline.speedups`) and handed to :meth:`screened`: the
        session is active and its fast reader reads XML now (a protobuf connection has none, an auto-detecting
        one only once it is known to be XML). It stays true until the session closes."""
        return self.state is SessionState.ACTIVE and fast_screen_reads_xml(self._fast)

    def screened(self, req_id: int, req_type: str, now: float) -> PendingAnswer | None:
        """A SCREEN_REQ that such a reader accepted while :meth:`fast_ready` — canonical header, ``ContentLen``
        equal to the body's length, canonical body, exactly what :meth:`screen` accepts: the session takes it as
        :meth:`screen` would. Returns the SCREEN_RESP of a synchronous engine (to write once the event is safe, then
        :meth:`answered`), None for an asynchronous one."""
        if self.state is not SessionState.ACTIVE:
            raise LocalProtocolError("screened() on a session that is not active")
        return self._screened(req_id, req_type, now)

    @property
    def answers_screen_requests(self) -> bool:
        """A synchronous engine: each SCREEN_REQ taken gets a SCREEN_RESP (what :meth:`screened` returns)."""
        return self._sync

    def screened_unanswered(self, now: float) -> None:
        """:meth:`screened` of any number of SCREEN_REQs of an asynchronous engine, all read at ``now``: taking one
        answers nothing, it only marks the session as heard from (one call for a read's worth of them)."""
        if self.state is not SessionState.ACTIVE:
            raise LocalProtocolError("screened_unanswered() on a session that is not active")
        if self._sync:
            raise LocalProtocolError("screened_unanswered() on a synchronous session: each request is answered")
        self.last_received = now

    def _screened(self, req_id: int, req_type: str, now: float) -> PendingAnswer | None:
        self.last_received = now
        if not self._sync:
            return None
        ticket = self.outstanding.received(req_id)
        return PendingAnswer(self._encode(ScreenResponse(req_id, req_type, ALLOW)), req_id, ticket)

    def answered(self, answer: PendingAnswer) -> None:
        """``answer`` (a SCREEN_RESP this session made) was written: its request is no longer outstanding."""
        self.outstanding.answered(answer.req_id, answer.ticket)

    def receive(self, payload: bytes, now: float) -> Sequence[Output]:
        """Handle one framed payload. A :class:`RemoteProtocolError` becomes a :class:`Close`."""
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError("receive() on a closed session")
        self.last_received = now
        try:
            decoded = self._decode(payload)
            return self._handle(decoded)
        except RemoteProtocolError as exc:
            self.state = SessionState.CLOSED
            return (Close(exc.reason, exc.detail),)

    def _handle(self, decoded: Decoded) -> Sequence[Output]:
        msg = decoded.message
        if type(msg) is ScreenRequest and self.state is SessionState.ACTIVE:
            out = FileNotification(fields_of(msg), self._screened(msg.req_id, msg.req_type, self.last_received))
            if decoded.header.content_len != decoded.body_length:
                return (out, self._length_mismatch(decoded))
            return (out,)
        outputs: list[Output] = []
        if decoded.header.content_len != decoded.body_length:
            outputs.append(self._length_mismatch(decoded))
        if self.state is SessionState.AWAITING_NEGO:
            if not isinstance(msg, Handshake):
                raise RemoteProtocolError("expected_nego", f"first message was {decoded.header.notf_type}")
            outputs.extend(self._negotiate(msg))
            return outputs
        outputs.extend(self._handle_active(msg, decoded.header.notf_type))
        return outputs

    def _length_mismatch(self, decoded: Decoded) -> Notice:
        return Notice(
            NoticeKind.CONTENT_LEN_MISMATCH,
            {
                "notf_type": decoded.header.notf_type,
                "content_len": decoded.header.content_len,
                "body_length": decoded.body_length,
            },
        )

    def _negotiate(self, msg: Handshake) -> list[Output]:
        version = self._choose_version(msg.versions)
        previous = self.context
        self.context = SessionContext(
            vs_uuid=msg.vs_uuid,
            policy_name=msg.policy_name,
            session_id=msg.session_id,
            protocol_version=version,
            peer=self.peer,
        )
        reply = self._encode(HandshakeResp(msg.vs_uuid, msg.policy_name, msg.session_id, version))
        outputs: list[Output] = [
            Reply(reply),
            Notice(
                NoticeKind.HANDSHAKE,
                {
                    "vs_uuid": msg.vs_uuid,
                    "policy_name": msg.policy_name,
                    "session_id": msg.session_id,
                    "offered": list(msg.versions),
                    "version": version,
                    "renegotiated": previous is not None,
                },
            ),
        ]
        if self.state is not SessionState.ACTIVE:
            self.state = SessionState.ACTIVE
            outputs.append(Notice(NoticeKind.STATE, {"state": SessionState.ACTIVE.value}))
        return outputs

    def _choose_version(self, offered: Sequence[str]) -> str:
        for version in self._config.preferred_versions:
            if version in offered:
                return version
        raise RemoteProtocolError(
            "no_common_version",
            f"offered {list(offered)}, supported {list(self._config.preferred_versions)}",
        )

    def _handle_active(self, msg: object, notf_type: str) -> list[Output]:
        if isinstance(msg, Handshake):
            # ONTAP resends NEGO_REQ when our reply was late; answering again is harmless (it keeps the
            # first valid one) and a new SessionId after a quick reconnect is simply adopted.
            return self._negotiate(msg)
        if isinstance(msg, KeepAlive):
            return [Notice(NoticeKind.KEEP_ALIVE)]
        if isinstance(msg, ScreenCancel):
            fields: dict[str, Any] = {
                "req_id": msg.req_id,
                "req_type": msg.req_type,
                "cancel_reason": msg.cancel_reason,
            }
            if self._sync:
                fields["outstanding"] = self.outstanding.cancelled(msg.req_id)
            return [Notice(NoticeKind.CANCEL, fields)]
        if isinstance(msg, StatusQuery):
            if not self._sync:
                return [Notice(NoticeKind.STATUS_QUERY, {"req_id": msg.req_id, "req_type": msg.req_type})]
            resp = STATUS_IN_PROGRESS if msg.req_id in self.outstanding else STATUS_REQUEST_LOST
            return [
                Notice(
                    NoticeKind.STATUS_QUERY,
                    {"req_id": msg.req_id, "req_type": msg.req_type, "answer": STATUS_ANSWERS[resp]},
                ),
                Reply(self._encode(StatusQueryResp(msg.req_id, msg.req_type, resp))),
            ]
        if isinstance(msg, Alert):
            self.fatal_alert = self.fatal_alert or msg.is_fatal
            return [
                Notice(
                    NoticeKind.ALERT,
                    {"severity": msg.severity, "alert": msg.message, "alert_session_id": msg.session_id},
                )
            ]
        if isinstance(msg, VolumeNotification):
            return [
                Notice(
                    NoticeKind.VOLUME,
                    {"volume_msid": msg.vol_msid, "action": msg.action, "is_active": msg.is_active},
                )
            ]
        if isinstance(msg, Outage):
            return [Notice(NoticeKind.OUTAGE, {"outage_file": msg.file_path, "status": msg.status})]
        if isinstance(msg, UnknownMessage):
            return [Notice(NoticeKind.UNKNOWN_TYPE, {"notf_type": msg.notf_type})]
        return [Notice(NoticeKind.UNEXPECTED_DIRECTION, {"notf_type": notf_type})]

    # ------------------------------------------------------------------------------------------ output

    def back_pressure(self, apply: bool) -> bytes:
        """The BACK_PRESSURE_APPLY/REM frame for this session (only once the handshake is done)."""
        if self.context is None:
            raise LocalProtocolError("back pressure before the handshake")
        return self._encode(BackPressure(self.context.session_id, apply))

    def closed(self) -> None:
        self.state = SessionState.CLOSED
