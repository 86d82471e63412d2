"""Idempotency: which events are duplicates, decided by claims in a store (the sans-IO rule; no store here).

Modes (:class:`DedupMode`):

- ``exact`` (default): the key is the ``event_id``. The same ONTAP notification received twice (a redelivery
  after a reconnect, a spool replay) has the same id; a genuine second write to a file has a different
  GenerationTime, hence a different id, and is never suppressed. A claim lives ``dedup_exact_ttl_s``.
- ``window`` (HYBRID deployments, per use case): the reference key ``pk = "{use_case}#{file_path}"``,
  ``sk = "{operation_type}"``, judged on the event's own time (GenerationTime, the same across replays). A
  claim covers ``[event_time, event_time + window)``: a later event of the same key inside it is a duplicate;
  one at or after its end takes the claim over. So, unlike the reference's tumbling 5-minute buckets, two
  events 1 s apart across a bucket boundary are caught and one 5 min + 1 s later is not suppressed. An event
  that arrives late and lies a full window or more *before* the current claim is not near any claimed event:
  it is delivered and leaves the (newer) claim in place. A window of 0 for a use case means exact mode for it.
- ``off``: no requests, everything is delivered.

The rule (:func:`judge`), in order: no claim, a claim past its retention (a store may keep it a while: DynamoDB
TTL deletion lags by up to days), or a claim by the **same claimant** (the integrator passes
``"{instance_id}:{spool_seq}"``: our own earlier claim for the same spool record, re-processed after a crash)
→ ``first`` and the claim is (re)written; a claim whose ``expires_at`` has passed (``now`` in exact mode, the
event's time in window mode) → ``first``, taken over; otherwise ``duplicate`` (or, in window mode, ``first``
without a write for a late event a window or more older than the claim). A store that cannot answer returns
``error_open`` (deliver) or ``error_closed`` (retry later; neither deliver nor drop) per ``dedup_failure_mode``.
Losing dedup memory can only cause duplicates, never loss, which decides every failure path here.

The embedded store (:mod:`fpolicyd.storage.dedup_store`: SQLite) applies :func:`judge` per request; building the
request (:meth:`DedupPolicy.exact_request`) costs ~1 µs.
The DynamoDB store (:mod:`fpolicyd.sinks.dedup_dynamodb`) applies the same :func:`judge` as a conditional put.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from fpolicyd.errors import FpolicydError

if TYPE_CHECKING:
    from fpolicyd.events import FileEvent

__all__ = [
    "EXACT_SORT_KEY",
    "MAX_PARTITION_KEY_BYTES",
    "AsyncDedupStore",
    "Claim",
    "Decision",
    "DedupBackend",
    "DedupFailureMode",
    "DedupKey",
    "DedupMode",
    "DedupPolicy",
    "DedupRequest",
    "DedupResult",
    "DedupStore",
    "DedupStoreError",
    "Judgement",
    "error_decision",
    "error_result",
    "event_time_s",
    "exact_key",
    "judge",
    "result_of",
    "window_key",
]


class DedupMode(StrEnum):
    off = "off"
    exact = "exact"
    window = "window"


class DedupBackend(StrEnum):
    embedded = "embedded"
    dynamodb = "dynamodb"


class DedupFailureMode(StrEnum):
    """What a failed check means: ``open`` delivers (duplicates possible), ``closed`` holds the event back."""

    open = "open"
    closed = "closed"


class Decision(StrEnum):
    first = "first"
    duplicate = "duplicate"
    #: The store failed; fail-open: deliver the event.
    error_open = "error_open"
    #: The store failed; fail-closed: the caller must retry later and must neither drop nor deliver the event.
    error_closed = "error_closed"


class DedupStoreError(FpolicydError):
    """The embedded store cannot be opened (a path problem an operator must fix)."""


#: Sort key of every exact-mode claim (window sort keys are operation names, never this).
EXACT_SORT_KEY: Final = "exact"


@dataclass(frozen=True, slots=True)
class DedupKey:
    """Partition and sort key of one claim (the DynamoDB item key; the embedded store's primary key)."""

    pk: str
    sk: str

    def __post_init__(self) -> None:
        for name in ("pk", "sk"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: must be a non-empty string, got {value!r}")

    def __str__(self) -> str:
        return f"{self.pk}|{self.sk}"


def exact_key(event_id: str) -> DedupKey:
    return DedupKey(event_id, EXACT_SORT_KEY)


#: DynamoDB's limit on a partition key (UTF-8 bytes); a longer window key names its path by its SHA-256.
MAX_PARTITION_KEY_BYTES: Final = 2048


def window_key(use_case: str, file_path: str, operation: str) -> DedupKey:
    """The reference pipeline's key without its time bucket: ``{use_case}#{file_path}`` / ``{operation}``.

    A key over :data:`MAX_PARTITION_KEY_BYTES` (a long path: paths are unbounded unless ``path_max_chars`` is
    set) becomes ``{use_case}#sha256:{hex of the path}``, in both backends, so that DynamoDB can store it."""
    pk = f"{use_case}#{file_path}"
    if len(pk) * 4 > MAX_PARTITION_KEY_BYTES and len(pk.encode("utf-8", "surrogatepass")) > MAX_PARTITION_KEY_BYTES:
        digest = hashlib.sha256(file_path.encode("utf-8", "surrogatepass")).hexdigest()
        pk = f"{use_case}#sha256:{digest}"
    return DedupKey(pk, operation)


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class DedupRequest:
    """One check: may ``event_id`` (under ``key``) be delivered by ``claimant``?

    ``event_time``: the event's timestamp, epoch seconds. ``expires_at``: end of the claim this request would
    make, on the axis the mode judges on (exact: ``now + ttl``; window: ``event_time + window``).
    ``retain_until``: wall-clock time after which a store may forget the claim (default ``expires_at``; in
    window mode longer, so that late replays still meet it). ``use_case`` is for the audit ledger.
    """

    key: DedupKey
    event_id: str
    claimant: str
    event_time: float
    expires_at: float
    mode: DedupMode = DedupMode.exact
    retain_until: float | None = None
    use_case: str | None = None

    def __post_init__(self) -> None:
        if self.mode is DedupMode.off or not isinstance(self.mode, DedupMode):
            raise ValueError(f"mode: a request is exact or window, got {self.mode!r}")
        if not self.event_id or not self.claimant:
            raise ValueError("event_id and claimant must be non-empty")
        _finite("event_time", self.event_time)
        _finite("expires_at", self.expires_at)
        if self.retain_until is None:
            object.__setattr__(self, "retain_until", self.expires_at)
        else:
            _finite("retain_until", self.retain_until)
        if self.mode is DedupMode.window and self.expires_at <= self.event_time:
            raise ValueError("window mode: expires_at must be after event_time")

    @property
    def retention(self) -> float:
        """``retain_until`` (always set after construction)."""
        assert self.retain_until is not None
        return self.retain_until

    @property
    def window_s(self) -> float:
        return self.expires_at - self.event_time

    def judged_at(self, now: float) -> float:
        """The instant compared with a claim's ``expires_at``: wall clock (exact) or the event's time (window)."""
        return now if self.mode is DedupMode.exact else self.event_time


@dataclass(frozen=True, slots=True)
class Claim:
    """What a store keeps per key: the first-seen event, who claimed it, and until when."""

    event_id: str
    claimant: str
    event_time: float
    expires_at: float
    retain_until: float

    @classmethod
    def of(cls, request: DedupRequest) -> Claim:
        return cls(request.event_id, request.claimant, request.event_time, request.expires_at, request.retention)


@dataclass(frozen=True, slots=True)
class DedupResult:
    """The answer to one request. ``claimant`` is the request's; ``first_seen_id``/``first_claimant`` name the
    claim that made it a duplicate (for ``first``: the request itself; for errors: ``None``)."""

    decision: Decision
    key: DedupKey
    first_seen_id: str | None
    claimant: str
    first_claimant: str | None = None

    @property
    def deliver(self) -> bool:
        return self.decision in (Decision.first, Decision.error_open)


class Judgement(NamedTuple):
    decision: Decision
    #: Whether the request's claim replaces what the store holds.
    write: bool


def judge(existing: Claim | None, request: DedupRequest, now: float) -> Judgement:
    """The dedup rule (module docstring). The DynamoDB condition expression is this ``write`` predicate."""
    if existing is None or existing.retain_until <= now or existing.claimant == request.claimant:
        return Judgement(Decision.first, True)
    if existing.expires_at <= request.judged_at(now):
        return Judgement(Decision.first, True)
    if request.mode is DedupMode.window and request.event_time <= existing.event_time - request.window_s:
        return Judgement(Decision.first, False)
    return Judgement(Decision.duplicate, False)


def result_of(request: DedupRequest, judgement: Judgement, existing: Claim | None) -> DedupResult:
    if judgement.decision is Decision.duplicate:
        assert existing is not None
        return DedupResult(Decision.duplicate, request.key, existing.event_id, request.claimant, existing.claimant)
    return DedupResult(Decision.first, request.key, request.event_id, request.claimant, request.claimant)


# Hot-path builders (one request and one result per event): the frozen dataclass ``__init__`` goes through
# ``object.__setattr__`` per field (and DedupKey/DedupRequest validate); setting the slot descriptors directly
# builds the identical object in about half the time.
_new_object = object.__new__
_isfinite = math.isfinite
_set_pk, _set_sk = (DedupKey.__dict__[f.name].__set__ for f in fields(DedupKey))
(
    _set_request_key,
    _set_event_id,
    _set_request_claimant,
    _set_event_time,
    _set_expires_at,
    _set_mode,
    _set_retain_until,
    _set_use_case,
) = (DedupRequest.__dict__[f.name].__set__ for f in fields(DedupRequest))


def _exact_request(
    event_id: str, claimant: str, event_time: float, expires_at: float, use_case: str | None
) -> DedupRequest:
    """``DedupRequest(exact_key(event_id), event_id, claimant, event_time, expires_at, use_case=use_case)``, built
    through the slot descriptors when the values plainly pass its validation (non-empty strings, finite floats:
    what the processing stage always passes), through the validating constructors otherwise (same errors)."""
    if not (
        type(event_id) is str
        and event_id
        and type(claimant) is str
        and claimant
        and type(event_time) is float
        and type(expires_at) is float
        and _isfinite(event_time)
        and _isfinite(expires_at)
    ):
        return DedupRequest(exact_key(event_id), event_id, claimant, event_time, expires_at, use_case=use_case)
    key: DedupKey = _new_object(DedupKey)
    _set_pk(key, event_id)
    _set_sk(key, EXACT_SORT_KEY)
    request: DedupRequest = _new_object(DedupRequest)
    _set_request_key(request, key)
    _set_event_id(request, event_id)
    _set_request_claimant(request, claimant)
    _set_event_time(request, event_time)
    _set_expires_at(request, expires_at)
    _set_mode(request, DedupMode.exact)
    _set_retain_until(request, expires_at)
    _set_use_case(request, use_case)
    return request


def error_decision(failure_mode: DedupFailureMode) -> Decision:
    return Decision.error_open if failure_mode is DedupFailureMode.open else Decision.error_closed


def error_result(request: DedupRequest, failure_mode: DedupFailureMode) -> DedupResult:
    return DedupResult(error_decision(failure_mode), request.key, None, request.claimant)


# ------------------------------------------------------------------------------------------- policy


def event_time_s(event: FileEvent) -> float:
    """The event's timestamp (GenerationTime, or receive time when ONTAP sent none) as epoch seconds."""
    return datetime.fromisoformat(event.timestamp).timestamp()


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """Turns events into requests (settings: ``dedup_mode``, ``dedup_exact_ttl_s``, ``dedup_window_minutes``,
    ``dedup_window_overrides``). Window lengths are in seconds here."""

    mode: DedupMode = DedupMode.exact
    exact_ttl_s: float = 7 * 86400.0
    window_s: float = 300.0
    window_overrides_s: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exact_ttl_s) and self.exact_ttl_s > 0):
            raise ValueError(f"exact_ttl_s: must be a positive number of seconds, got {self.exact_ttl_s}")
        for name, value in (("window_s", self.window_s), *self.window_overrides_s.items()):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"window {name!r}: must be a number of seconds >= 0, got {value}")
        object.__setattr__(self, "window_overrides_s", MappingProxyType(dict(self.window_overrides_s)))

    def window_for(self, use_case: str) -> float:
        return self.window_overrides_s.get(use_case, self.window_s)

    def exact_request(
        self, event_id: str, claimant: str, event_time: float, now: float, use_case: str | None = None
    ) -> DedupRequest:
        return _exact_request(event_id, claimant, event_time, now + self.exact_ttl_s, use_case)

    def requests_for(
        self,
        *,
        event_id: str,
        claimant: str,
        event_time: float,
        file_path: str,
        operation: str,
        use_cases: Iterable[str],
        now: float,
    ) -> list[DedupRequest]:
        """No request in ``off`` mode; one exact request in ``exact`` mode; in ``window`` mode one request per
        use case (an unrouted event is judged under use case ``""`` with the default window), or an exact
        request for a use case whose window is 0."""
        if self.mode is DedupMode.off:
            return []
        if self.mode is DedupMode.exact:
            return [self.exact_request(event_id, claimant, event_time, now)]
        out: list[DedupRequest] = []
        for use_case in dict.fromkeys(use_cases or ("",)):
            window = self.window_for(use_case)
            if window <= 0:
                out.append(self.exact_request(event_id, claimant, event_time, now, use_case))
                continue
            out.append(
                DedupRequest(
                    window_key(use_case, file_path, operation),
                    event_id,
                    claimant,
                    event_time,
                    event_time + window,
                    mode=DedupMode.window,
                    retain_until=now + max(self.exact_ttl_s, window),
                    use_case=use_case,
                )
            )
        return out

    def requests_for_event(self, event: FileEvent, claimant: str, now: float) -> list[DedupRequest]:
        """:meth:`requests_for` with the event's fields; use cases from ``metadata["routes"]``."""
        routes = event.metadata.get("routes") or ()
        return self.requests_for(
            event_id=event.event_id,
            claimant=claimant,
            event_time=event_time_s(event),
            file_path=event.file_path,
            operation=event.operation_type,
            use_cases=[str(r) for r in routes],
            now=now,
        )


class DedupStore(Protocol):
    """A synchronous store (the embedded one). Results are in request order, one per request."""

    def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]: ...


class AsyncDedupStore(Protocol):
    """The same contract, awaited (DynamoDB)."""

    async def check_many(self, requests: Sequence[DedupRequest], now: float) -> list[DedupResult]: ...
