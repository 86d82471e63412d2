"""File readiness ("settle", sans-IO): a per-path debounce in place of the reference's blocking 5 s sleep.

The reference server "waited for writes to finish" by sleeping ``WRITE_COMPLETE_DELAY_SEC`` per event in the
reader. Here the events of one path are *held* instead, and one event goes out when the path is ready:

- ``quiet``: when the path has had no held event for ``window_s`` (every event pushes the deadline);
- ``rename_commit``: when a rename moves the path somewhere else (write ``X.tmp``, rename to ``X``): one event
  for the new path coalesces what was held for the old one;
- ``marker``: when a marker file is created (``X.done`` releases ``X``; ``_SUCCESS`` releases everything held
  under its directory, at any depth). A marker name that starts with ``.`` is a file suffix, any other is a
  directory marker; a file whose whole name is a marker name is a directory marker.

Under every strategy a burst is released at the latest ``max_hold_s`` after its first event, so a path that
never goes quiet (or never gets its commit) cannot hold the spool cursor forever.

The burst → event rule: operation ``create`` if the burst began with a create, else the operation all its
events share, else ``write``; the event id, timestamp, size, client and metadata are those of the **last**
event (the one that completed the file), with ``metadata["routes"]`` the union of the routes of the burst and
``metadata["settle"]`` saying what was coalesced (count, strategy, reason, the first event's id and receive
time, the first :data:`SETTLE_MAX_IDS` ids). The last event's id rather than the first's: after a restart,
:meth:`Settler.oldest_pending_seq` can fall inside a burst that was already emitted (one that started before it
and closed after it); replaying from there rebuilds that burst's tail, which ends at the same last event and
therefore carries the same id and the same last seq (its count and first-event fields differ), so the stage
and exact-mode dedup recognise it as the duplicate it is.

Other events:
- ``delete`` of a held path: with ``cancel_on_delete`` the burst is dropped and only the delete goes out, its
  ``metadata["settle"]`` listing what it cancelled (count, operation, ids, first receive time); nothing is lost
  from view, but consumers are not told to process a file that no longer exists. Without it the burst goes out
  first (reason ``superseded``), then the delete.
- a ``rename`` is never held; it releases what is held for its new path (``superseded``) and, unless it commits
  it, for its old path, so each path's content events keep their spool order.
- Any other event that is not held releases its path's burst first (``superseded``), unless it leaves the
  file unchanged (``read``, ``open``, ``close``, ``getattr``, ``lookup``), so each path's changes keep their
  spool order. A burst follows the policy of its latest event (operations and routes may differ).

Restarts: the integrator must not advance its spool cursor past :meth:`Settler.oldest_pending_seq`. After a
crash it re-offers the spool from there to a fresh settler; as the state is a function of the offered events,
their seqs and their receive times only, the outputs still to come are reproduced exactly (the ones already
emitted may come again, with the same ids). Two documented exceptions, both still at-least-once: a burst that
straddles the cursor *and* was cut by ``max_hold_s`` (its replay starts later, so its hold ends later), and
``max_pending`` evictions (they depend on how many bursts were pending, which a replay sees fewer of).

For that, ``t`` (the receive time of the event, from ``metadata["received_at"]``: :func:`received_at_s`) is
the only clock of :meth:`Settler.offer`, which first releases everything due at ``t``; :meth:`Settler.due`'s
``now`` must be a watermark: no event with an earlier receive time is offered afterwards (the wall clock when
the reader has caught up with the spool, the last offered ``t`` while it works through a backlog).

Scale: bursts are found by path in a dict; deadlines sit in a heap of ``(deadline, generation, burst)`` whose
live entry is never late (a new event moves a burst's deadline later without touching the heap; the entry is
re-pushed with the real deadline when it comes up; only a policy change that brings it earlier pushes a new
entry), closed bursts and superseded entries are skipped lazily, and the heap is rebuilt when dead entries
outnumber live ones. Bursts start in seq order, so a FIFO gives the oldest pending seq. Offer is O(log n)
(plus the directories of a marker-held path, and what a marker releases); :meth:`Settler.due` with nothing
due is O(1) (``benchmarks/bench_settle.py``).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField

from fpolicyd.errors import ConfigError, FpolicydError
from fpolicyd.events import FileEvent, Operation

__all__ = [
    "DEFAULT_MARKER_NAMES",
    "DEFAULT_SETTLE_OPERATIONS",
    "SETTLE_MAX_IDS",
    "SettleClock",
    "SettleConfig",
    "SettleInputError",
    "SettleOutput",
    "SettleOverride",
    "SettlePolicy",
    "SettleReason",
    "SettleStats",
    "SettleStrategy",
    "Settler",
    "parse_override_key",
    "received_at_s",
]

#: How many event ids ``metadata["settle"]["ids"]`` (and ``cancelled_ids``) lists at most; the count is exact.
SETTLE_MAX_IDS: Final = 16
DEFAULT_MARKER_NAMES: Final = (".done", "_SUCCESS")
DEFAULT_SETTLE_OPERATIONS: Final = (Operation.CREATE.value, Operation.WRITE.value)
#: Operations with a meaning of their own for a held path; never held themselves.
_NEVER_HELD: Final = frozenset({Operation.DELETE.value, Operation.RENAME.value})
_KNOWN_OPERATIONS: Final = frozenset(op.value for op in Operation)
#: ``policy_for`` answers cached per (routes, operation); bounded because route combinations are data.
_POLICY_CACHE_MAX: Final = 4096
#: Dead heap/FIFO entries tolerated beyond the live ones before a rebuild (amortised O(1) per close).
_COMPACT_SLACK: Final = 1024
_ANY: Final = "*"
#: Operations that do not change the file: when not held themselves they leave a held burst alone.
#: Plain strings on the hot path: reading ``Enum.value`` costs about a microsecond on CPython 3.11.
_CREATE: Final = Operation.CREATE.value
_WRITE: Final = Operation.WRITE.value
_READ_ONLY: Final = frozenset(
    op.value for op in (Operation.READ, Operation.OPEN, Operation.CLOSE, Operation.GETATTR, Operation.LOOKUP)
)


class SettleInputError(FpolicydError, ValueError):
    """The integrator offered something the settler cannot order: a seq that does not increase, a time that
    is not finite, an event without ``metadata["received_at"]``."""


class SettleStrategy(StrEnum):
    QUIET = "quiet"
    RENAME_COMMIT = "rename_commit"
    MARKER = "marker"


class SettleReason(StrEnum):
    """Why an output was emitted (``metadata["settle"]["reason"]``, and a metric label)."""

    #: Not held: no policy, or an operation the policy does not hold.
    NOT_HELD = "not_held"
    QUIET = "quiet"
    MAX_HOLD = "max_hold"
    RENAME_COMMIT = "rename_commit"
    MARKER = "marker"
    #: A delete that cancelled a held burst (the output is the delete).
    CANCELLED = "cancelled"
    #: Released early because a delete or rename touched the path (keeps per-path order).
    SUPERSEDED = "superseded"
    #: Released early because more than ``max_pending`` paths were held.
    MAX_PENDING = "max_pending"
    FLUSH = "flush"


_REASON_TEXT: Final = {reason: reason.value for reason in SettleReason}
_STRATEGY_TEXT: Final = {strategy: strategy.value for strategy in SettleStrategy}


# ------------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True, slots=True)
class SettlePolicy:
    """How one event's path is settled. ``window_s == 0`` switches settle off (the event passes through).

    ``window_s`` is the quiet period of the ``quiet`` strategy; ``rename_commit`` and ``marker`` hold until
    their commit and use ``window_s`` only as the on/off switch. ``operations`` are the operation types held.
    """

    window_s: float = 5.0
    max_hold_s: float = 300.0
    strategy: SettleStrategy = SettleStrategy.QUIET
    marker_names: tuple[str, ...] = DEFAULT_MARKER_NAMES
    cancel_on_delete: bool = True
    operations: frozenset[str] = frozenset(DEFAULT_SETTLE_OPERATIONS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", SettleStrategy(self.strategy))
        object.__setattr__(self, "marker_names", tuple(self.marker_names))
        object.__setattr__(self, "operations", frozenset(self.operations))
        if not (math.isfinite(self.window_s) and self.window_s >= 0):
            raise ConfigError(f"settle window must be a finite number >= 0 seconds, not {self.window_s!r}")
        if not (math.isfinite(self.max_hold_s) and self.max_hold_s > 0):
            raise ConfigError(f"settle max hold must be a finite number > 0 seconds, not {self.max_hold_s!r}")
        if self.max_hold_s < self.window_s:
            raise ConfigError(
                f"settle max hold ({self.max_hold_s} s) is shorter than the window ({self.window_s} s): "
                "a burst would always be cut by the hold"
            )
        unknown = sorted(self.operations - _KNOWN_OPERATIONS)
        if unknown:
            raise ConfigError(f"settle operations: unknown {unknown}; known: {sorted(_KNOWN_OPERATIONS)}")
        special = sorted(self.operations & _NEVER_HELD)
        if special:
            raise ConfigError(
                f"settle operations cannot hold {special}: a delete cancels or releases a held path, a rename "
                "commits or releases it"
            )
        for name in self.marker_names:
            if not name or "/" in name or name == ".":
                raise ConfigError(f"settle marker name {name!r}: a file name (no '/'), e.g. '.done' or '_SUCCESS'")
        if self.strategy is SettleStrategy.MARKER and not self.marker_names:
            raise ConfigError("settle strategy marker needs at least one marker name")

    @property
    def active(self) -> bool:
        return self.window_s > 0

    def holds(self, operation: str) -> bool:
        return self.window_s > 0 and operation in self.operations

    def _patience(self) -> tuple[Any, ...]:
        """Total order used when an event's routes ask for different policies: the most patient one wins."""
        rank = (
            0
            if not self.active
            else {SettleStrategy.QUIET: 1, SettleStrategy.RENAME_COMMIT: 2, SettleStrategy.MARKER: 3}[self.strategy]
        )
        return (
            rank,
            self.max_hold_s,
            self.window_s,
            not self.cancel_on_delete,
            len(self.operations),
            tuple(sorted(self.operations)),
            self.marker_names,
        )


class SettleOverride(BaseModel):
    """A per-route / per-operation override (``settle_overrides``); unset fields inherit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: Annotated[float, PydanticField(ge=0, allow_inf_nan=False)] | None = None
    max_hold_s: Annotated[float, PydanticField(gt=0, allow_inf_nan=False)] | None = None
    strategy: SettleStrategy | None = None
    marker_names: tuple[str, ...] | None = None
    cancel_on_delete: bool | None = None
    operations: tuple[str, ...] | None = None

    def apply(self, policy: SettlePolicy) -> SettlePolicy:
        changes: dict[str, Any] = {
            name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None
        }
        if "operations" in changes:
            changes["operations"] = frozenset(changes["operations"])
        return replace(policy, **changes) if changes else policy


def parse_override_key(key: str) -> tuple[str, str]:
    """``"ROUTE"`` → (ROUTE, ``*``); ``"ROUTE:OP"`` → (ROUTE, OP); ``"*:OP"`` → (``*``, OP)."""
    route, sep, op = key.partition(":")
    route = route.strip()
    op = op.strip() if sep else _ANY
    if not route or (sep and not op):
        raise ConfigError(f"settle_overrides key {key!r}: expected ROUTE, ROUTE:OPERATION or *:OPERATION")
    if route == _ANY and op == _ANY:
        raise ConfigError(f"settle_overrides key {key!r}: the default policy is set by the settle_* settings")
    if op != _ANY and op not in _KNOWN_OPERATIONS:
        raise ConfigError(f"settle_overrides key {key!r}: unknown operation {op!r}; known: {sorted(_KNOWN_OPERATIONS)}")
    return route, op


@dataclass(frozen=True, slots=True)
class SettleConfig:
    """Policies by (route, operation), with one default.

    Precedence for one route and operation, each layer overriding the fields it sets: the default (the
    ``settle_*`` settings, window ``write_complete_delay_s``) < ``*:OP`` < ``ROUTE`` < ``ROUTE:OP``. An event
    without routes gets the default and ``*:OP``. An event emitted once for several routes must satisfy all of
    them, so when its routes resolve to different policies the most patient one wins (off < quiet <
    rename_commit < marker, then the longer max hold, the longer window, no cancel before cancel).
    """

    default: SettlePolicy
    overrides: Mapping[tuple[str, str], SettleOverride] = field(default_factory=lambda: MappingProxyType({}))
    _cache: dict[tuple[tuple[str, ...], str], SettlePolicy | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        for route, op in self.overrides:
            for operation in sorted(_KNOWN_OPERATIONS) if op == _ANY else (op,):
                try:
                    self._layered(None if route == _ANY else route, operation)
                except ConfigError as exc:
                    label = route if op == _ANY else f"{route}:{op}"
                    raise ConfigError(f"settle_overrides[{label!r}] (operation {operation}): {exc}") from None

    @property
    def enabled(self) -> bool:
        """False when no route and no operation can be held (the stage can be skipped)."""
        if self.default.active:
            return True
        return any(o.window_s is not None and o.window_s > 0 for o in self.overrides.values())

    def _layered(self, route: str | None, op: str) -> SettlePolicy:
        policy = self.default
        layers = [(_ANY, op)] if route is None else [(_ANY, op), (route, _ANY), (route, op)]
        for key in layers:
            override = self.overrides.get(key)
            if override is not None:
                policy = override.apply(policy)
        return policy

    def resolve(self, routes: Sequence[str], operation: str) -> SettlePolicy | None:
        """The policy of an event with these routes and this operation; None when settle is off for it."""
        cache_key = (tuple(routes), operation)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        if routes:
            policy = max((self._layered(r, operation) for r in dict.fromkeys(routes)), key=SettlePolicy._patience)
        else:
            policy = self._layered(None, operation)
        result = policy if policy.active else None
        if len(self._cache) >= _POLICY_CACHE_MAX:
            self._cache.clear()
        self._cache[cache_key] = result
        return result

    def policy_for(self, event: FileEvent) -> SettlePolicy | None:
        return self.resolve(event.metadata.get("routes") or (), event.operation_type)


def received_at_s(event: FileEvent) -> float:
    """The event's receive time in epoch seconds (``metadata["received_at"]``), the ``t`` of :meth:`Settler.offer`."""
    value = event.metadata.get("received_at")
    if not isinstance(value, str):
        raise SettleInputError(f"event {event.event_id}: metadata.received_at is missing or not a string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SettleInputError(f"event {event.event_id}: metadata.received_at {value!r} is not RFC 3339 with a zone")
    return moment.timestamp()


# ------------------------------------------------------------------------------------------------ clock


class SettleClock:
    """Settle's idea of "now" when the stage has caught up: the wall clock (the axis of ``received_at``) made
    steady by the monotonic clock. Sans-IO: :meth:`now` takes both readings.

    ``now(wall, mono) = max(wall, previous + (mono - previous mono))``: it never goes back and never advances
    slower than real time. A wall clock stepped *back* (an NTP correction, a VM restore) would otherwise freeze
    settle's watermark until the wall clock caught up again: every burst held at the step would wait out the
    step (an hour for an hour's step), far past ``max_hold_s``, holding the spool cursor with it. Stepped
    *forward*, the value follows the wall clock (events received after the step carry its times): bursts held
    at the step come due at once, their quiet period cut short (nothing is lost; they go out with reason
    ``quiet`` or ``max_hold``). After a backward step it stays ahead of the wall clock by the step (until the
    next start); events received meanwhile are placed at it (:meth:`fpolicyd.pipeline.processing.ProcessingStage.take`'s
    ``not_before``), so they still settle for their window."""

    __slots__ = ("_mono", "_value")

    def __init__(self) -> None:
        self._value: float | None = None
        self._mono = 0.0

    def now(self, wall: float, mono: float) -> float:
        if not (math.isfinite(wall) and math.isfinite(mono)):
            raise ValueError(f"settle clock: readings must be finite, got wall={wall!r} mono={mono!r}")
        value = self._value
        if value is None:
            value = wall
        else:
            steady = value + max(0.0, mono - self._mono)
            value = wall if wall > steady else steady
        self._value, self._mono = value, mono
        return value


# ------------------------------------------------------------------------------------------------ settler


@dataclass(frozen=True, slots=True)
class SettleOutput:
    """One event to emit. ``seqs`` = first and last spool seq it accounts for; ``coalesced`` = how many offered
    events it accounts for (itself, those it coalesced, those it cancelled)."""

    event: FileEvent
    seqs: tuple[int, int]
    coalesced: int
    reason: SettleReason


@dataclass(slots=True)
class SettleStats:
    """Counters since the settler was made (for metrics)."""

    offered: int = 0
    passed: int = 0
    #: Bursts started (paths that began to be held).
    held: int = 0
    #: Events that joined a burst already held.
    coalesced: int = 0
    emitted: int = 0
    cancelled: int = 0
    hold_expired: int = 0
    commits: int = 0
    marker_released: int = 0
    superseded: int = 0
    evicted: int = 0


_PathKey = tuple[str, str, str]


class _Burst:
    """The held events of one path (what the output needs of them, not the events themselves)."""

    __slots__ = (
        "alive",
        "count",
        "first_id",
        "first_op",
        "first_received_at",
        "first_seq",
        "first_t",
        "gen",
        "hold_until",
        "ids",
        "key",
        "last_event",
        "last_seq",
        "last_t",
        "marker_dirs",
        "policy",
        "quiet",
        "routes",
        "routes_owned",
        "same_op",
        "scheduled",
        "strategy_name",
        "window",
    )

    def __init__(self, key: _PathKey, gen: int, policy: SettlePolicy, *, event: FileEvent, seq: int, t: float) -> None:
        self.key = key
        self.gen = gen
        self.alive = True
        self.count = 1
        self.first_seq = seq
        self.last_seq = seq
        self.first_t = t
        self.last_t = t
        self.set_policy(policy)
        #: The deadline of this burst's live heap entry (always <= the real deadline).
        self.scheduled = self.deadline()
        self.first_id = event.event_id
        self.first_op = event.operation_type
        self.first_received_at = event.metadata.get("received_at")
        self.same_op = True
        self.last_event = event
        #: Ids from the second event on (None while there is one): fewer allocations per held path.
        self.ids: list[str] | None = None
        #: The first event's routes list itself until another event adds a route (then a copy): never mutated.
        self.routes: list[str] | None = event.metadata.get("routes")
        self.routes_owned = False
        self.marker_dirs: tuple[_PathKey, ...] = ()

    def set_policy(self, policy: SettlePolicy) -> None:
        """A burst follows the policy of its latest event (so a replay that starts inside it agrees from there)."""
        self.policy = policy
        self.quiet = policy.strategy is SettleStrategy.QUIET
        self.strategy_name = _STRATEGY_TEXT[policy.strategy]
        self.window = policy.window_s
        self.hold_until = self.first_t + policy.max_hold_s

    def deadline(self) -> float:
        if self.quiet:
            quiet_end = self.last_t + self.window
            return quiet_end if quiet_end < self.hold_until else self.hold_until
        return self.hold_until

    def add(self, event: FileEvent, seq: int, t: float, max_ids: int) -> None:
        self.count += 1
        self.last_seq = seq
        self.last_t = max(self.last_t, t)
        if event.operation_type != self.first_op:
            self.same_op = False
        self.last_event = event
        if self.ids is None:
            self.ids = [self.first_id]
        if len(self.ids) < max_ids:
            self.ids.append(event.event_id)
        routes = event.metadata.get("routes")
        if routes is not None and routes != self.routes:
            if self.routes is None:
                self.routes = routes
            elif any(route not in self.routes for route in routes):
                if not self.routes_owned:
                    self.routes = list(self.routes)
                    self.routes_owned = True
                for route in routes:
                    if route not in self.routes:
                        self.routes.append(route)

    def operation(self, extra_op: str | None = None) -> str:
        if self.first_op == _CREATE:
            return _CREATE
        if self.same_op and (extra_op is None or extra_op == self.first_op):
            return self.first_op
        return _WRITE


def _split(path: str) -> tuple[str, str]:
    """``"/a/b/c"`` → (``"/a/b"``, ``"c"``); ``"/c"`` → (``"/"``, ``"c"``)."""
    cut = path.rfind("/")
    return (path[:cut] or "/", path[cut + 1 :])


def _ancestors(path: str) -> Iterator[str]:
    directory = _split(path)[0]
    while True:
        yield directory
        if directory == "/":
            return
        directory = _split(directory)[0]


def _is_marker(name: str, policy: SettlePolicy) -> bool:
    return any(name == m or (m[0] == "." and name.endswith(m) and len(name) > len(m)) for m in policy.marker_names)


class Settler:
    """The settle stage. See the module docstring for the rules; every method is O(log n) or better."""

    __slots__ = ("_by_age", "_gen", "_heap", "_last_seq", "_marker_dirs", "_max_ids", "_max_pending", "_pending",
                 "_policy_for", "stats")  # fmt: skip

    def __init__(
        self,
        policy_for: Callable[[FileEvent], SettlePolicy | None],
        *,
        max_pending: int,
        max_ids: int = SETTLE_MAX_IDS,
    ) -> None:
        if max_pending < 1:
            raise ConfigError(f"settle max pending must be >= 1, not {max_pending}")
        if max_ids < 1:
            raise ConfigError(f"settle max ids must be >= 1, not {max_ids}")
        self._policy_for = policy_for
        self._max_pending = max_pending
        self._max_ids = max_ids
        self._pending: dict[_PathKey, _Burst] = {}
        self._heap: list[tuple[float, int, _Burst]] = []
        self._by_age: deque[_Burst] = deque()
        self._marker_dirs: dict[_PathKey, dict[_Burst, None]] = {}
        self._gen = 0
        self._last_seq: int | None = None
        self.stats = SettleStats()

    # ---------------------------------------------------------------------------------------- queries

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def oldest_pending_seq(self) -> int | None:
        """The first seq of the oldest held burst: the spool cursor must not pass it. None when nothing is held."""
        by_age = self._by_age
        while by_age and not by_age[0].alive:
            by_age.popleft()
        return by_age[0].first_seq if by_age else None

    def next_deadline(self) -> float | None:
        """When :meth:`due` will next have something to emit (exact), or None when nothing is held."""
        heap = self._heap
        while heap:
            scheduled, gen, burst = heap[0]
            if not burst.alive or scheduled != burst.scheduled:
                heapq.heappop(heap)
                continue
            actual = burst.deadline()
            if actual > scheduled:
                burst.scheduled = actual
                heapq.heapreplace(heap, (actual, gen, burst))
                continue
            return scheduled
        return None

    # ---------------------------------------------------------------------------------------- inputs

    def offer(self, event: FileEvent, seq: int, t: float) -> list[SettleOutput]:
        """Take the event at spool ``seq``, received at ``t`` (epoch seconds); return what to emit now, in
        order: what was due by ``t``, then what this event releases, then the event itself if not held."""
        if self._last_seq is not None and seq <= self._last_seq:
            raise SettleInputError(f"settle: seq {seq} offered after {self._last_seq}; seqs must increase")
        if not math.isfinite(t):
            raise SettleInputError(f"settle: receive time {t!r} of seq {seq} is not finite")
        self._last_seq = seq
        self.stats.offered += 1
        out = self.due(t) if self._heap and self._heap[0][0] <= t else []
        op = event.operation_type
        key = (event.svm_name, event.volume_name, event.file_path)
        policy = self._policy_for(event)
        if op == "delete":
            self._on_delete(event, seq, key, out)
        elif op == "rename":
            self._on_rename(event, seq, key, policy, out)
        else:
            if op == "create":
                self._release_markers(event, out)
            burst = self._pending.get(key)
            if (
                policy is not None
                and policy.holds(op)
                and not (policy.strategy is SettleStrategy.MARKER and _is_marker(_split(event.file_path)[1], policy))
            ):
                if burst is None:
                    self._start(key, policy, event, seq=seq, t=t, out=out)
                else:
                    self._join(burst, policy, event, seq=seq, t=t)
            else:
                if burst is not None and op not in _READ_ONLY:
                    self.stats.superseded += 1
                    self._close(burst, SettleReason.SUPERSEDED, out)
                self._pass(event, seq, out)
        if (
            len(self._heap) > 2 * len(self._pending) + _COMPACT_SLACK
            or len(self._by_age) > 2 * len(self._pending) + _COMPACT_SLACK
        ):
            self._compact()
        return out

    def due(self, now: float) -> list[SettleOutput]:
        """Everything whose deadline is ``<= now``, in deadline order (ties: the burst that started first).
        ``now`` is a watermark: no event received before it may be offered later (module docstring)."""
        out: list[SettleOutput] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            scheduled, gen, burst = heapq.heappop(heap)
            if not burst.alive or scheduled != burst.scheduled:
                continue
            actual = burst.deadline()
            if actual > scheduled:
                burst.scheduled = actual
                heapq.heappush(heap, (actual, gen, burst))
                continue
            held_out = burst.quiet is False or burst.last_t + burst.window > burst.hold_until
            if held_out:
                self.stats.hold_expired += 1
            self._close(burst, SettleReason.MAX_HOLD if held_out else SettleReason.QUIET, out)
        return out

    def flush_all(self) -> list[SettleOutput]:
        """Emit everything held, oldest first (reason ``flush``); for shutdown paths and tests. The daemon
        need not call it: what is held is rebuilt from the spool on the next start."""
        out: list[SettleOutput] = []
        for burst in list(self._by_age):
            if burst.alive:
                self._close(burst, SettleReason.FLUSH, out)
        self._heap.clear()
        self._by_age.clear()
        return out

    # ---------------------------------------------------------------------------------------- internals

    def _pass(self, event: FileEvent, seq: int, out: list[SettleOutput]) -> None:
        self.stats.passed += 1
        self.stats.emitted += 1
        out.append(SettleOutput(event, (seq, seq), 1, SettleReason.NOT_HELD))

    def _start(
        self, key: _PathKey, policy: SettlePolicy, event: FileEvent, *, seq: int, t: float, out: list[SettleOutput]
    ) -> None:
        self._gen += 1
        burst = _Burst(key, self._gen, policy, event=event, seq=seq, t=t)
        self._pending[key] = burst
        heapq.heappush(self._heap, (burst.scheduled, burst.gen, burst))
        self._by_age.append(burst)
        self.stats.held += 1
        if policy.strategy is SettleStrategy.MARKER:
            self._register_marker(burst)
        while len(self._pending) > self._max_pending:
            oldest = self._by_age.popleft()
            if oldest.alive:
                self.stats.evicted += 1
                self._close(oldest, SettleReason.MAX_PENDING, out)

    def _join(self, burst: _Burst, policy: SettlePolicy, event: FileEvent, *, seq: int, t: float) -> None:
        self.stats.coalesced += 1
        burst.add(event, seq, t, self._max_ids)
        if policy is not burst.policy:
            was_marker = burst.policy.strategy is SettleStrategy.MARKER
            burst.set_policy(policy)
            is_marker = policy.strategy is SettleStrategy.MARKER
            if was_marker and not is_marker:
                self._unregister_marker(burst)
            elif is_marker and not was_marker:
                self._register_marker(burst)
            deadline = burst.deadline()
            if deadline < burst.scheduled:
                burst.scheduled = deadline
                heapq.heappush(self._heap, (deadline, burst.gen, burst))

    def _register_marker(self, burst: _Burst) -> None:
        svm, volume, path = burst.key
        burst.marker_dirs = tuple((svm, volume, d) for d in _ancestors(path))
        for d in burst.marker_dirs:
            self._marker_dirs.setdefault(d, {})[burst] = None

    def _unregister_marker(self, burst: _Burst) -> None:
        for d in burst.marker_dirs:
            members = self._marker_dirs.get(d)
            if members is not None:
                members.pop(burst, None)
                if not members:
                    del self._marker_dirs[d]
        burst.marker_dirs = ()

    def _close(
        self,
        burst: _Burst,
        reason: SettleReason,
        out: list[SettleOutput],
        *,
        commit: FileEvent | None = None,
        commit_seq: int = 0,
        marker: str | None = None,
    ) -> None:
        """Retire ``burst`` and append its output."""
        self._retire(burst)
        self.stats.emitted += 1
        out.append(self._output(burst, reason, commit, commit_seq, marker))

    def _retire(self, burst: _Burst) -> None:
        """Forget ``burst``; its heap and FIFO entries die lazily (skipped when they come up, or compacted)."""
        burst.alive = False
        if self._pending.get(burst.key) is burst:
            del self._pending[burst.key]
        if burst.marker_dirs:
            self._unregister_marker(burst)

    def _output(
        self, burst: _Burst, reason: SettleReason, commit: FileEvent | None, commit_seq: int, marker: str | None
    ) -> SettleOutput:
        last = commit if commit is not None else burst.last_event
        count = burst.count
        ids = [burst.first_id] if burst.ids is None else list(burst.ids)
        routes = burst.routes
        if commit is not None:
            count += 1
            if len(ids) < self._max_ids:
                ids.append(commit.event_id)
            commit_routes = commit.metadata.get("routes")
            if commit_routes is not None:
                routes = list(dict.fromkeys([*(routes or ()), *commit_routes]))
        settle: dict[str, Any] = {
            "coalesced": count,
            "strategy": burst.strategy_name,
            "reason": _REASON_TEXT[reason],
            "first_event_id": burst.first_id,
            "first_received_at": burst.first_received_at,
            "ids": ids,
        }
        metadata = dict(last.metadata)
        if routes is not None:
            metadata["routes"] = list(routes)
        if commit is not None:
            settle["renamed_from"] = commit.previous_path
        if marker is not None:
            settle["marker"] = marker
        metadata["settle"] = settle
        size = last.file_size
        if commit is not None and not size:
            size = burst.last_event.file_size
        event = FileEvent(
            event_id=last.event_id,
            operation_type=burst.operation(None if commit is None else commit.operation_type),
            file_path=last.file_path,
            previous_path=None if commit is not None else last.previous_path,
            volume_name=last.volume_name,
            svm_name=last.svm_name,
            timestamp=last.timestamp,
            file_size=size,
            client_ip=last.client_ip,
            metadata=metadata,
        )
        last_seq = commit_seq if commit is not None else burst.last_seq
        return SettleOutput(event, (burst.first_seq, last_seq), count, reason)

    def _on_delete(self, event: FileEvent, seq: int, key: _PathKey, out: list[SettleOutput]) -> None:
        burst = self._pending.get(key)
        if burst is None:
            self._pass(event, seq, out)
            return
        if not burst.policy.cancel_on_delete:
            self.stats.superseded += 1
            self._close(burst, SettleReason.SUPERSEDED, out)
            self._pass(event, seq, out)
            return
        self._retire(burst)
        self.stats.cancelled += burst.count
        self.stats.emitted += 1
        metadata = dict(event.metadata)
        metadata["settle"] = {
            "reason": _REASON_TEXT[SettleReason.CANCELLED],
            "strategy": burst.strategy_name,
            "cancelled": burst.count,
            "cancelled_operation": burst.operation(),
            "cancelled_first_event_id": burst.first_id,
            "cancelled_first_received_at": burst.first_received_at,
            "cancelled_ids": [burst.first_id] if burst.ids is None else list(burst.ids),
            "cancelled_routes": list(burst.routes or ()),
        }
        out.append(
            SettleOutput(
                replace(event, metadata=metadata), (burst.first_seq, seq), burst.count + 1, SettleReason.CANCELLED
            )
        )

    def _on_rename(
        self, event: FileEvent, seq: int, key: _PathKey, policy: SettlePolicy | None, out: list[SettleOutput]
    ) -> None:
        target = self._pending.get(key)
        if target is not None:
            self.stats.superseded += 1
            self._close(target, SettleReason.SUPERSEDED, out)
        source = None
        if event.previous_path is not None and event.previous_path != event.file_path:
            source = self._pending.get((event.svm_name, event.volume_name, event.previous_path))
        commit = source is not None and (
            source.policy.strategy is SettleStrategy.RENAME_COMMIT
            or (policy is not None and policy.active and policy.strategy is SettleStrategy.RENAME_COMMIT)
        )
        if source is not None and commit:
            self.stats.commits += 1
            self._close(source, SettleReason.RENAME_COMMIT, out, commit=event, commit_seq=seq)
        elif source is not None:
            self.stats.superseded += 1
            self._close(source, SettleReason.SUPERSEDED, out)
        self._release_markers(event, out)
        if not commit:
            self._pass(event, seq, out)

    def _release_markers(self, event: FileEvent, out: list[SettleOutput]) -> None:
        """Release what the file ``event`` creates (or renames into) marks as complete."""
        if not self._marker_dirs:
            return
        directory, name = _split(event.file_path)
        svm, volume = event.svm_name, event.volume_name
        released: dict[_Burst, None] = {}
        members = self._marker_dirs.get((svm, volume, directory))
        if members is not None:
            for burst in members:
                if name in burst.policy.marker_names:
                    released[burst] = None
        dot = name.find(".", 1)
        while dot > 0:
            candidate = self._pending.get((svm, volume, f"{directory.rstrip('/')}/{name[:dot]}"))
            if (
                candidate is not None
                and candidate.policy.strategy is SettleStrategy.MARKER
                and name[dot:] in candidate.policy.marker_names
            ):
                released[candidate] = None
            dot = name.find(".", dot + 1)
        for burst in sorted(released, key=lambda b: b.first_seq):
            self.stats.marker_released += 1
            self._close(burst, SettleReason.MARKER, out, marker=event.file_path)

    def _compact(self) -> None:
        live = len(self._pending)
        if len(self._heap) > 2 * live + _COMPACT_SLACK:
            for b in self._pending.values():
                b.scheduled = b.deadline()
            self._heap = [(b.scheduled, b.gen, b) for b in self._pending.values()]
            heapq.heapify(self._heap)
        if len(self._by_age) > 2 * live + _COMPACT_SLACK:
            self._by_age = deque(b for b in self._by_age if b.alive)
