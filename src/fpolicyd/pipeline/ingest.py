"""The reader's per-event work as one pure step: payloads of one socket read → spool records and replies.

For each framed payload of a connection, :meth:`IngestSession.feed` runs the session state machine (the fast
canonical SCREEN_REQ path first, :meth:`~fpolicyd.protocol.session.Session.screen`, else the full decoder),
builds the event straight from the decoder's flat fields (:class:`~fpolicyd.events.EventBuilder`), flags replays,
matches the routes, claims the event's key in the exact-dedup window, redacts, and encodes the spool record.

Where the C accelerator is built (:mod:`fpolicyd.pipeline.speedups`) and nothing redacts, a canonical SCREEN_REQ takes
one C call instead of the fast path, the builder and the encoder: it returns the record's JSON around
``metadata["routes"]``, the session takes the request (:meth:`~fpolicyd.protocol.session.Session.screened`),
and the replay flags, routes and dedup claim are done here as for any event. Whatever it leaves (None) takes the
Python path, which makes the same bytes (``tests/property/test_speedups.py``).
It touches no socket, reads no clock (``now`` and ``received_at_us`` are arguments) and awaits nothing; the
asyncio connection only feeds bytes, appends :attr:`IngestBatch.records` to the spool and writes replies.

Records are raw events (``{…}``), or duplicates the window suppressed, kept with the duplicate tag so that what
was read is never lost and the audit ledger can say what was suppressed (``pipeline/records.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fpolicyd.events import EventBuilder, FileEvent, NameMaps
from fpolicyd.pipeline import speedups
from fpolicyd.pipeline.dedup_window import DedupWindow, key_of_digest
from fpolicyd.pipeline.records import encode_duplicate
from fpolicyd.pipeline.replay import ReplaySession, ReplayTracker
from fpolicyd.protocol.session import Close, FileNotification, Notice, NoticeKind, PendingAnswer, Reply, Session

__all__ = ["Ingest", "IngestBatch", "IngestCounters", "IngestSession"]


@dataclass(slots=True)
class IngestCounters:
    """Figures of every session, read by the metrics collector at scrape time (plain ints and dicts)."""

    events: int = 0
    #: Events by ``operation_type`` (a closed set).
    operations: dict[str, int] = field(default_factory=dict)
    #: Events by matched route (fan-out counts an event once per route), and events no route took.
    route_matches: dict[str, int] = field(default_factory=dict)
    unrouted: int = 0
    #: Notifications the exact-dedup window suppressed.
    duplicates: int = 0
    #: SCREEN_REQs read and built by the C accelerator, by the Python canonical fast path, and by the full decoder
    #: (a layout ONTAP never sends, or a format fpolicyd does not know yet: a rising count is worth a look).
    accelerated: int = 0
    fast_decoded: int = 0
    full_decoded: int = 0
    #: Synchronous engines: outstanding requests forgotten because a session held more than its bound
    #: (``sync_max_outstanding_requests``); a STATUS_QUERY for one answers "lost".
    untracked_requests: int = 0
    #: Events with a path cut to ``path_max_chars`` (only the Python path cuts: the accelerator leaves them to it).
    paths_truncated: int = 0


@dataclass(frozen=True, slots=True)
class Ingest:
    """What every session's ingest step shares: names, the router, the dedup window, redaction, the counters."""

    names: NameMaps
    counters: IngestCounters
    replay: ReplayTracker
    #: The use-case router (file_path, operation_type) → route names; None: routing is off.
    route: Callable[[str, str], tuple[str, ...]] | None = None
    #: Exact dedup in the reader; None: off (or done behind the spool by the processing stage).
    window: DedupWindow | None = None
    #: Data classification applied to each event before it is stored; None: events are stored as built.
    redact: Callable[[FileEvent], FileEvent] | None = None
    #: Build events with the C accelerator where it is built and nothing redacts; False: the Python path only
    #: (the ``pure_python`` setting; the connections' frame readers then split without it too).
    accelerate: bool = True
    #: Paths longer than this many characters are cut as events are built (``path_max_chars``; 0: kept whole).
    path_max_chars: int = 0

    def session(self, session: Session) -> IngestSession:
        return IngestSession(self, session)

    @property
    def accelerator(self) -> speedups.AcceleratorStatus:
        """Which path builds the events, and why."""
        return speedups.accelerator_status(enabled=self.accelerate, redacting=self.redact is not None)


class IngestBatch:
    """What one :meth:`IngestSession.feed` produced, in order."""

    __slots__ = (
        "abandoned",
        "claims",
        "close",
        "durable_replies",
        "events",
        "frames",
        "notices",
        "records",
        "rejected",
        "replies",
    )

    def __init__(self) -> None:
        #: Spool records, in arrival order.
        self.records: list[bytes] = []
        #: ``(index into records, key)`` of each event the dedup window claimed (for the dedup journal).
        self.claims: list[tuple[int, int]] = []
        #: ``(index into records, answer)``: a synchronous engine's SCREEN_RESP, to write once that record is durable
        #: (then :meth:`~fpolicyd.protocol.session.Session.answered`).
        self.durable_replies: list[tuple[int, PendingAnswer]] = []
        #: Replies to write now (NEGO_RESP, STATUS_QUERY_RESP).
        self.replies: list[bytes] = []
        self.notices: list[Notice] = []
        #: Set when the session must close; ``rejected`` is the payload that broke it and ``abandoned`` the framed
        #: payloads of the same read after it, which the closing session will not handle. Both were read from
        #: ONTAP (an async engine counts them delivered): the caller keeps them (the dead-letter file).
        self.close: Close | None = None
        self.rejected: bytes | None = None
        self.abandoned: list[bytes] = []
        self.events = 0
        self.frames = 0


class IngestSession:
    """The ingest step of one connection: owns its :class:`Session` and the event builder of its handshake."""

    __slots__ = ("_accelerate", "_builder", "_encode", "_ingest", "_replay", "_untracked", "session")

    def __init__(self, ingest: Ingest, session: Session) -> None:
        self._ingest = ingest
        self.session = session
        self._builder: EventBuilder | None = None
        self._replay: ReplaySession | None = None
        self._accelerate = ingest.accelerator.path == "c"
        #: The accelerator's encoder for the negotiated session (None before the handshake or without it).
        self._encode: speedups.Encode | None = None
        #: ``session.outstanding.untracked`` as last counted.
        self._untracked = 0

    def feed(self, payloads: Sequence[bytes], now: float, received_at_us: int, wall_s: float) -> IngestBatch:
        """Handle the payloads of one read. ``now``: monotonic seconds (timers, replay episodes);
        ``received_at_us``: wall clock in epoch µs stamped on the events; ``wall_s``: the same in seconds (dedup
        window ages)."""
        batch = IngestBatch()
        session = self.session
        screen = session.screen
        counters = self._ingest.counters
        # Only the general path (receive) changes the session's state, so this holds until the next receive.
        encode = self._encode if self._encode is not None and session.fast_ready() else None
        position = 0
        count = len(payloads)
        while position < count:
            if encode is not None:
                # The accelerated run: every payload the encoder takes, up to the first it leaves (or the end).
                position = self._accelerated(
                    payloads, position, encode, batch, now=now, received_at_us=received_at_us, wall_s=wall_s
                )
                if position == count:
                    break
            payload = payloads[position]
            position += 1
            batch.frames += 1
            out = screen(payload, now)
            if out is not None:
                counters.fast_decoded += 1
                self._event(out, batch, now, received_at_us, wall_s)
                continue
            for output in session.receive(payload, now):
                if type(output) is FileNotification:
                    counters.full_decoded += 1
                    self._event(output, batch, now, received_at_us, wall_s)
                elif type(output) is Reply:
                    batch.replies.append(output.data)
                elif type(output) is Notice:
                    if output.kind is NoticeKind.HANDSHAKE and session.context is not None:
                        self._handshake(now, received_at_us)
                    batch.notices.append(output)
                elif type(output) is Close:
                    batch.close = output
                    batch.rejected = payload
                    batch.abandoned = list(payloads[position:])
                    return self._finish(batch)
            encode = self._encode if self._encode is not None and session.fast_ready() else None
        return self._finish(batch)

    def _finish(self, batch: IngestBatch) -> IngestBatch:
        """Count the requests a synchronous session stopped tracking in this read (at its bound); the first time,
        a notice too (one log line per session; the counter has every one)."""
        untracked = self.session.outstanding.untracked
        if untracked == self._untracked:
            return batch
        self._ingest.counters.untracked_requests += untracked - self._untracked
        if not self._untracked:
            limit = self.session.outstanding.limit
            batch.notices.append(Notice(NoticeKind.UNTRACKED, {"untracked": untracked, "limit": limit}))
        self._untracked = untracked
        return batch

    def closed(self, now: float) -> None:
        """The connection is gone (replay tracking ends the session)."""
        if self._replay is not None:
            self._ingest.replay.session_ended(self._replay, now)

    def _handshake(self, now: float, received_at_us: int) -> None:
        context = self.session.context
        assert context is not None
        ingest = self._ingest
        self._builder = EventBuilder(context, ingest.names, path_max_chars=ingest.path_max_chars)
        if self._accelerate:
            self._encode = speedups.session_encoder(context, ingest.names, path_max_chars=ingest.path_max_chars)
        self._replay = self._ingest.replay.session_started(context, now, received_at_us, self._replay)

    def _event(self, out: FileNotification, batch: IngestBatch, now: float, received_at_us: int, wall_s: float) -> None:
        builder = self._builder
        replay = self._replay
        # A FileNotification only exists on an active session, i.e. after the handshake that set both.
        assert builder is not None
        assert replay is not None
        ingest = self._ingest
        counters = ingest.counters
        fields = out.fields
        event, digest = builder.build(fields, received_at_us)
        operation: str = event["operation_type"]
        operations = counters.operations
        operations[operation] = operations.get(operation, 0) + 1
        metadata: dict[str, Any] = event["metadata"]
        if "path_truncated" in metadata:
            counters.paths_truncated += 1
        flags = replay.observe(fields.generation_time, event["event_id"], now)
        if flags is not None:
            metadata.update(flags)
        route = ingest.route
        if route is not None:
            routes = route(event["file_path"], operation)
            metadata["routes"] = list(routes)  # stored with the event: see pipeline/processing.py
            if routes:
                matches = counters.route_matches
                for name in routes:
                    matches[name] = matches.get(name, 0) + 1
            else:
                counters.unrouted += 1
        window = ingest.window
        first = True
        if window is not None:
            key = key_of_digest(digest)
            first = window.claim(key, wall_s)
            if first:
                batch.claims.append((len(batch.records), key))
            else:
                counters.duplicates += 1
        redact = ingest.redact
        line = orjson.dumps(event) if redact is None else redact(FileEvent.from_dict(event)).to_json()
        if out.response is not None:
            # A synchronous engine is answered only once the record is durable (a duplicate's too: it is kept).
            batch.durable_replies.append((len(batch.records), out.response))
        batch.records.append(line if first else encode_duplicate(line))
        batch.events += 1
        counters.events += 1

    def _accelerated(
        self,
        payloads: Sequence[bytes],
        start: int,
        encode: speedups.Encode,
        batch: IngestBatch,
        *,
        now: float,
        received_at_us: int,
        wall_s: float,
    ) -> int:
        """:meth:`_event` for each payload from ``start`` on that the accelerator reads, up to the first it leaves
        (the Python path's then): the same counters, flags, routes, claim and record. Returns the position of the
        first payload not taken. Everything per read is looked up once; the counters are added as events end."""
        replay = self._replay
        assert replay is not None  # an encoder exists only after the handshake that set it
        observe = replay.observe
        session = self.session
        # An asynchronous engine's requests are taken once for the run (they answer nothing).
        screened = session.screened if session.answers_screen_requests else None
        ingest = self._ingest
        counters = ingest.counters
        operations = counters.operations
        route = ingest.route
        matches = counters.route_matches
        window = ingest.window
        claims = batch.claims
        durable_replies = batch.durable_replies
        records = batch.records
        routes_json = speedups.routes_json
        event_record = speedups.event_record
        position = start
        count = len(payloads)
        taken = done = unrouted = duplicates = 0
        try:
            while position < count:
                encoded = encode(payloads[position], received_at_us)
                if encoded is None:
                    break
                position += 1
                taken += 1
                head, tail, event_id, key, file_path, operation, generation_time, req_id, req_type = encoded
                response = None if screened is None else screened(req_id, req_type, now)
                operations[operation] = operations.get(operation, 0) + 1
                flags = observe(generation_time, event_id, now)
                if route is None:
                    routes = speedups.NO_ROUTES
                else:
                    names = route(file_path, operation)
                    routes = routes_json(names)
                    if names:
                        for name in names:
                            matches[name] = matches.get(name, 0) + 1
                    else:
                        unrouted += 1
                first = True
                if window is not None:
                    first = window.claim(key, wall_s)
                    if first:
                        claims.append((len(records), key))
                    else:
                        duplicates += 1
                line = event_record(head, routes, tail, flags)
                if response is not None:
                    durable_replies.append((len(records), response))
                records.append(line if first else encode_duplicate(line))
                done += 1
        finally:
            if taken and screened is None:
                session.screened_unanswered(now)
            batch.frames += taken
            counters.accelerated += taken
            counters.unrouted += unrouted
            counters.duplicates += duplicates
            batch.events += done
            counters.events += done
        return position
