"""The processing stage behind the spool: settle → (dedup, by the caller) → processed record.

Routing is not done here: the reader matches the routes as it stores an event (a pure function of the event, a
microsecond or two), so the stored event already carries ``metadata.routes`` — the verdict of the routes it was
received under — and this stage need not parse a record that only has to be deduplicated (the fast path).

Sans-IO: the caller (``server/processing.py``) reads raw records from the spool with the stage's own cursor, hands
them here, asks the dedup store about the candidates, appends what is to be delivered back to the same spool as
*processed* records and, once those are durable, tells the stage, which then says how far the stage's cursor
may be acknowledged.

Spool records are of three kinds, told apart by their first byte (``pipeline/records.py``): raw events as the
reader stored them, duplicates the reader's dedup window suppressed (skipped here), and processed events
(addressed to sinks), which this stage appends.

Restart safety. An event held by settle is still only in the spool, so the stage's cursor is never acknowledged
past the oldest held record (:meth:`ProcessingStage.floor`); after a restart the records from there on are read
again and the settle state is derived again from them (settle is deterministic and keyed on each event's own receive
time). Outputs that had already been appended durably before the restart are recognised by the sequence number
of the last input they cover (unique per output) and not appended twice; that set is persisted with the floor
(:class:`ProcessingState`). What was appended but not yet recorded there is appended again after a crash: at least
once, never lost.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fpolicyd.events import FileEvent
from fpolicyd.pipeline.records import (
    ALL_SINKS,
    DUPLICATE_TAG,
    PROCESSED_TAG,
    Record,
    encode_processed,
    processed_payload,
    sink_key,
    sink_selector,
    stored_event_id,
)
from fpolicyd.pipeline.settle import SettleInputError, SettleOutput, Settler

__all__ = [
    "ALL_SINKS",
    "Candidate",
    "Destinations",
    "ProcessingStage",
    "ProcessingState",
    "ProcessingStats",
    "encode_processed",
    "processed_payload",
    "sink_key",
    "sink_selector",
    "stored_event_id",
]


@dataclass(frozen=True, slots=True)
class Destinations:
    """Which sinks receive an event, from the routes it matched.

    A route with sinks of its own sends there; a route without sends to the default sinks; an event that matched
    no route goes to the default sinks, or only to ``unrouted_sinks`` when those are set (the audit file)."""

    default_sinks: tuple[str, ...]
    route_sinks: Mapping[str, tuple[str, ...]]
    unrouted_sinks: tuple[str, ...] | None = None
    all_sinks: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        every: dict[str, None] = dict.fromkeys(self.default_sinks)
        for sinks in self.route_sinks.values():
            every.update(dict.fromkeys(sinks))
        every.update(dict.fromkeys(self.unrouted_sinks or ()))
        object.__setattr__(self, "all_sinks", tuple(every))

    def sinks_for(self, routes: Sequence[str]) -> tuple[str, ...]:
        if not routes:
            return self.unrouted_sinks if self.unrouted_sinks is not None else self.default_sinks
        chosen: dict[str, None] = {}
        for route in routes:
            chosen.update(dict.fromkeys(self.route_sinks.get(route) or self.default_sinks))
        return tuple(chosen)

    @property
    def everything_everywhere(self) -> bool:
        """Every event goes to every sink whatever its routes (no route has sinks of its own, no audit file)."""
        return self.unrouted_sinks is None and not any(self.route_sinks.values())

    def keys_for(self, routes: Sequence[str]) -> tuple[bytes, ...] | None:
        """The destination header's keys, or None when the event goes to every sink."""
        sinks = self.sinks_for(routes)
        if len(sinks) == len(self.all_sinks):
            return None
        return tuple(sink_key(sink) for sink in sinks)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event ready to leave the stage, pending the dedup verdict: decoded (``event``), or — on the fast path,
    when nothing downstream needs more than the id — the stored JSON as it is (``line``)."""

    event_id: str
    #: Sequence numbers of the first and last spool records it covers (one, or a settled burst).
    first_seq: int
    last_seq: int
    coalesced: int = 1
    event: FileEvent | None = None
    line: bytes | None = None

    @classmethod
    def of(cls, event: FileEvent, first_seq: int, last_seq: int, coalesced: int = 1) -> Candidate:
        return cls(event.event_id, first_seq, last_seq, coalesced, event=event)


@dataclass(frozen=True, slots=True)
class ProcessingState:
    """What survives a restart: the floor and the outputs above it already appended durably."""

    floor: int = 0
    emitted: tuple[int, ...] = ()

    def to_json(self) -> bytes:
        return orjson.dumps({"version": 1, "floor": self.floor, "emitted": list(self.emitted)})

    @classmethod
    def from_json(cls, data: bytes) -> ProcessingState:
        """Raises ValueError on anything but a well-formed state (the caller then starts from the spool cursor)."""
        try:
            raw: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != 1:
            raise ValueError("unknown stage state version")
        floor, emitted = raw.get("floor"), raw.get("emitted")
        if not isinstance(floor, int) or floor < 0 or not isinstance(emitted, list):
            raise ValueError("malformed stage state")
        if not all(isinstance(seq, int) and seq > floor for seq in emitted):
            raise ValueError("malformed stage state: emitted entries must be above the floor")
        return cls(floor, tuple(sorted(set(emitted))))


@dataclass(slots=True)
class ProcessingStats:
    events_in: int = 0
    candidates: int = 0
    #: Outputs found already appended before a restart and not appended again.
    already_emitted: int = 0
    #: Raw records that are not a well-formed event: passed on unchanged, never dropped.
    undecodable: int = 0
    #: Events settle could not place in time (no receive time): passed on at once.
    unsettleable: int = 0
    #: Events received before settle's watermark (the wall clock stepped back): settled from the watermark.
    clamped: int = 0


class ProcessingStage:
    def __init__(
        self,
        *,
        settler: Settler | None,
        state: ProcessingState,
        received_at_s: Callable[[FileEvent], float],
        decode: bool = True,
        route: Callable[[str, str], tuple[str, ...]] | None = None,
    ) -> None:
        """``decode`` False is the fast path (no settle, exact or no dedup, every event to every sink, events not
        redacted): a record is handed on as stored, with its id read from the first field."""
        self._settler = settler
        self._decode = decode or settler is not None
        #: Routes a coalesced event anew: its path and operation are those of the burst (a rename commit's
        #: create of the final path, say), which no single stored event had.
        self._route = route
        self._received_at_s = received_at_s
        self._floor = state.floor
        self._emitted: list[int] = list(state.emitted)
        self._read_through = state.floor
        self.stats = ProcessingStats()
        #: Latest receive time offered to settle (epoch seconds): the watermark while working through a backlog.
        self.offered_through = float("-inf")
        #: Raw lines that could not be decoded as events, to pass on unchanged (drained by the caller).
        self.passthrough: list[tuple[int, bytes]] = []

    # ------------------------------------------------------------------------------------------ input

    def take(self, records: Iterable[Record], not_before: float = float("-inf")) -> list[Candidate]:
        """Settle the raw records (processed ones are skipped); returns what is ready now.

        ``not_before``: settle's watermark now (the caller's :class:`~fpolicyd.pipeline.settle.SettleClock`
        minus its lag, or the latest receive time while it works through a backlog). An event received "before"
        it (after the wall clock was stepped back) is placed at it: offered at its own older time it would be
        due at once and skip its quiet window."""
        out: list[Candidate] = []
        settler = self._settler
        for record in records:
            self._read_through = record.seq
            payload = record.payload
            if not payload or payload[0] == PROCESSED_TAG or payload[0] == DUPLICATE_TAG:
                continue  # a processed record is output; a duplicate the reader suppressed is never delivered
            self.stats.events_in += 1
            if not self._decode:
                event_id = stored_event_id(payload)
                if event_id is not None:
                    self._offer(out, Candidate(event_id, record.seq, record.seq, line=payload))
                    continue
            try:
                event = FileEvent.from_dict(orjson.loads(payload))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self.stats.undecodable += 1
                if record.seq not in self:
                    self.passthrough.append((record.seq, payload))
                continue
            if settler is None:
                self._offer(out, Candidate.of(event, record.seq, record.seq))
            else:
                try:
                    t = self._received_at_s(event)
                    if t < not_before:
                        t = not_before
                        self.stats.clamped += 1
                    outputs = settler.offer(event, record.seq, t)
                except SettleInputError:
                    self.stats.unsettleable += 1  # no usable receive time: delivered at once rather than held
                    self._offer(out, Candidate.of(event, record.seq, record.seq))
                    continue
                self.offered_through = max(self.offered_through, t)
                for output in outputs:
                    self._offer(out, self._candidate(output))
        return out

    def due(self, now: float) -> list[Candidate]:
        """Settled events whose quiet period ended by ``now`` (epoch seconds, like ``received_at``). ``now`` is a
        watermark: no event received before it may be taken afterwards (see :class:`Settler`)."""
        out: list[Candidate] = []
        if self._settler is not None:
            for output in self._settler.due(now):
                self._offer(out, self._candidate(output))
        return out

    def next_deadline(self) -> float | None:
        return None if self._settler is None else self._settler.next_deadline()

    def _candidate(self, output: SettleOutput) -> Candidate:
        first, last = output.seqs
        event = output.event
        if self._route is not None and output.coalesced > 1:
            event = event.with_routes(self._route(event.file_path, event.operation_type))
        return Candidate.of(event, first, last, output.coalesced)

    def _offer(self, out: list[Candidate], candidate: Candidate) -> None:
        if candidate.last_seq in self:
            self.stats.already_emitted += 1
            return
        self.stats.candidates += 1
        out.append(candidate)

    def __contains__(self, last_seq: int) -> bool:
        """Whether the output ending at ``last_seq`` was already appended (before a restart, or just now). At or
        below the floor everything was handled: the spool cursor may trail the persisted floor after a crash."""
        if last_seq <= self._floor:
            return True
        i = bisect.bisect_left(self._emitted, last_seq)
        return i < len(self._emitted) and self._emitted[i] == last_seq

    # ------------------------------------------------------------------------------------------ output

    def emitted(self, last_seqs: Iterable[int]) -> None:
        """These outputs (delivered or suppressed as duplicates) are durable: never append them again."""
        emitted = self._emitted
        for seq in last_seqs:
            if seq <= self._floor:
                continue
            if not emitted or seq > emitted[-1]:
                emitted.append(seq)
            else:
                i = bisect.bisect_left(emitted, seq)
                if i == len(emitted) or emitted[i] != seq:
                    emitted.insert(i, seq)

    def floor(self) -> int:
        """How far the stage's spool cursor may be acknowledged now: every record at or below it is handled
        and no settle still holds it. Call after :meth:`emitted` for everything handed out so far."""
        oldest = None if self._settler is None else self._settler.oldest_pending_seq()
        floor = self._read_through if oldest is None else min(self._read_through, oldest - 1)
        if floor > self._floor:
            self._floor = floor
            del self._emitted[: bisect.bisect_right(self._emitted, floor)]
        return self._floor

    def state(self) -> ProcessingState:
        return ProcessingState(self._floor, tuple(self._emitted))

    @property
    def pending(self) -> int:
        return 0 if self._settler is None else self._settler.pending_count
