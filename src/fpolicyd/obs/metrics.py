"""Prometheus metrics: one registry per :class:`~fpolicyd.app.Daemon`, read at scrape time.

Most figures already exist as plain counters on the objects that own them (the server context, the spooler,
the spool, the sink workers and senders); :class:`FpolicydCollector` reads them when ``/metrics`` is scraped,
so the reader's per-event loop pays nothing for metrics except one dict increment per event (events by
operation). Distributions that need a per-event observation (end-to-end and ingestion latency) are observed
by the sink worker once per acknowledged batch (:meth:`SinkInstruments.settled`: one lock per batch, at most
``LATENCY_SAMPLES`` records read per batch), never in the reader.

Conventions: names start with ``fpolicyd_``, base units (seconds, bytes), counters end in
``_total``, and no label ever carries a path, user, client address or session: labels are closed sets
(operation, frame type, parse-error reason, sink URI from the configuration, retryable true/false).

The scrape runs on the HTTP server's thread while the event loop mutates these objects: the collector only
reads ints and copies dicts/sets with one C-level call (``dict(d)``, ``list(s)``) before iterating them.

Figures owned by other subsystems (replay tracking, dedup, settle, the event-loop probe) are read through the hooks
of :class:`Metrics` (``replay``, ``watch_processing``/``dedup_hits_source``, ``settle_pending_source``,
``event_loop``).

obs is a leaf: this module imports nothing of fpolicyd but its version. It reads the other packages' objects
through the :class:`typing.Protocol` classes below (``ServerFigures``, ``SpoolerFigures``, ``ProcessingFigures``,
``ReplayFigures``), and the closed label sets it exports before anything happens (the members of their enums)
are passed in as :class:`MetricLabels` (``fpolicyd.server.metric_labels.METRIC_LABELS``).
"""

from __future__ import annotations

import platform
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from fpolicyd import __version__

PREFIX: Final = "fpolicyd_"

#: End-to-end and ingestion latency (seconds). 5 s is the reference ingestion SLO; the tail reaches an hour
#: because replayed events (held by ONTAP's persistent store during an outage) are legitimately that old.
LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
#: One sink request or send (seconds).
REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Records per sink batch.
BATCH_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0, 25000.0, 100000.0)
#: The spool's commit times: an fsync takes ~0.3 ms on a local SSD and milliseconds on network storage; a commit's
#: latency is the group-commit window (5 ms by default) plus the fsync, and the frame → durable goal is 20 ms.
COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
#: How late the event loop ran a timer (seconds): the commit buckets' resolution, to set the two side by side, up to
#: the stalls that fail /healthz (health_loop_stall_s, 10 s by default); 0.5 s is the default stall warning.
EVENT_LOOP_LAG_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: The reference pipeline's success SLO (``docs/reference-pipeline.md`` §7); the time targets are
#: settings (slo_ingestion_latency_s, slo_reconnect_s, slo_replay_completion_s).
SLO_SUCCESS_RATIO: Final = 0.995

#: Close reasons that are timers, not malformed input.
_TIMEOUT_REASONS: Final = frozenset({"handshake_timeout", "idle_timeout", "write_stall"})


#: A histogram's per-bucket counts (last: +Inf) and sum, as sent between processes.
HistogramState = tuple[tuple[int, ...], float]


class Histogram:
    """A cumulative histogram that is cheap to feed from the event loop and safe to read from another thread.

    ``observe_many`` takes one lock per batch; bucket bounds are upper bounds (``le``), as in Prometheus."""

    __slots__ = ("_counts", "_lock", "_sum", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be strictly increasing and not empty, got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def observe_many(self, values: Sequence[float], weights: Sequence[int] | None = None) -> None:
        """Observe ``values``; with ``weights``, value ``i`` stands for ``weights[i]`` observations."""
        if not values:
            return
        bounds = self.bounds
        indexes = [bisect_left(bounds, v) for v in values]
        if weights is None:
            total = sum(values)
            with self._lock:
                counts = self._counts
                for index in indexes:
                    counts[index] += 1
                self._sum += total
            return
        total = sum(v * w for v, w in zip(values, weights, strict=True))
        with self._lock:
            counts = self._counts
            for index, weight in zip(indexes, weights, strict=True):
                counts[index] += weight
            self._sum += total

    def state(self) -> HistogramState:
        """Per-bucket counts (the last one is ``+Inf``) and the sum: what another process needs to rebuild it."""
        with self._lock:
            return tuple(self._counts), self._sum

    @classmethod
    def from_state(cls, bounds: Sequence[float], state: HistogramState) -> Histogram:
        histogram = cls(bounds)
        counts, total = state
        if len(counts) != len(histogram._counts):
            raise ValueError(f"histogram state has {len(counts)} buckets, the bounds need {len(histogram._counts)}")
        histogram._counts = [int(c) for c in counts]
        histogram._sum = float(total)
        return histogram

    def snapshot(self) -> tuple[list[tuple[str, float]], float, int]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, the sum, the count."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else _float_text(bound), float(running)))
        return cumulative, total, running

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)


def _float_text(value: float) -> str:
    return repr(float(value))


# ------------------------------------------------------------------------------------ event timestamps

_RECEIVED_KEY: Final = b'"received_at":"'
_GENERATION_KEY: Final = b'"generation_time":'
_SECOND_CACHE_MAX: Final = 4096
_DIGITS: Final = re.compile(rb"[0-9]+")
_US: Final = 1_000_000


class EventClock:
    """Reads ``metadata.received_at`` (RFC 3339, µs) and ``metadata.generation_time`` (epoch µs) straight from
    an event's JSON bytes, without parsing the document (a full ``orjson.loads`` costs several µs per event).

    The keys are searched with their quotes: a path or user name containing the same text is JSON-escaped
    (``\\"``), so only the real key matches. ``received_at`` is searched from the end (metadata is the last
    member), ``generation_time`` right after it (normalize writes it a few members later), so both reads scan a
    few hundred bytes. Seconds prefixes are cached (the events of one second share one)."""

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        self._seconds: dict[bytes, int] = {}

    def times_us(self, payload: bytes) -> tuple[int, int | None] | None:
        """``(received_at, generation_time or None)`` in epoch µs, or None when ``received_at`` is unreadable."""
        start = payload.rfind(_RECEIVED_KEY)
        if start < 0:
            return None
        start += len(_RECEIVED_KEY)
        received = self._parse_stamp(payload, start)
        if received is None:
            return None
        return received, self._generation_after(payload, start)

    def received_at_us(self, payload: bytes) -> int | None:
        start = payload.rfind(_RECEIVED_KEY)
        return None if start < 0 else self._parse_stamp(payload, start + len(_RECEIVED_KEY))

    @staticmethod
    def generation_time_us(payload: bytes) -> int | None:
        return EventClock._generation_after(payload, 0)

    def _parse_stamp(self, payload: bytes, start: int) -> int | None:
        # 2024-02-09T15:28:52.045224Z: the seconds prefix, then the fraction.
        end = payload.find(b'"', start)
        stamp = payload[start:end]
        if len(stamp) < 20 or stamp[-1:] != b"Z":
            return None
        prefix = stamp[:19]
        seconds = self._seconds.get(prefix)
        if seconds is None:
            try:
                seconds = int(datetime.fromisoformat(prefix.decode()).replace(tzinfo=UTC).timestamp())
            except ValueError:
                return None
            if len(self._seconds) >= _SECOND_CACHE_MAX:
                self._seconds.clear()
            self._seconds[prefix] = seconds
        fraction = stamp[20:-1]
        if not fraction.isdigit():
            return seconds * _US
        return seconds * _US + int(fraction[:6].ljust(6, b"0"))

    @staticmethod
    def _generation_after(payload: bytes, start: int) -> int | None:
        found = payload.find(_GENERATION_KEY, start)
        if found < 0:
            found = payload.find(_GENERATION_KEY)
            if found < 0:
                return None
        digits = _DIGITS.match(payload, found + len(_GENERATION_KEY))
        return int(digits.group()) if digits is not None else None


# ------------------------------------------------------------------------------------------- sinks


class SpooledRecord(Protocol):
    """An acknowledged record as the sink instruments read it (``Record`` of the spool: its JSON bytes)."""

    @property
    def payload(self) -> bytes: ...


#: Records of one acknowledged batch whose latency is read (the rest are represented by them, see ``settled``).
#: Reading the two timestamps costs ~1-3 µs per record on this project's machine (benchmarks/bench_metrics.py).
#: An AWS sink's read is 40 records: at 32 samples that was ~2.5 µs of an SQS event's ~33 µs of delivery work; at
#: 8 (each standing for its 5 neighbours of one read, acked together) SQS delivery costs ~3 µs less per event
#: (benchmarks/bench_delivery.py, interleaved). Every record is still read at low rates (batches of up to 8).
LATENCY_SAMPLES: Final = 8


class SinkInstruments:
    """What a sink worker measures per batch; the collector reads it at scrape time.

    ``settled`` is called once per acknowledged batch (delivered or dead-lettered): it observes end-to-end
    latency (``received_at`` → now) and ingestion latency (ONTAP's GenerationTime → now, ``received_at`` when
    the event has no GenerationTime) and counts ingestion-SLO breaches — of every record in batches of up to
    ``LATENCY_SAMPLES`` records, of evenly spaced records weighted by the records they stand for above that."""

    __slots__ = (
        "_clock",
        "batch_records",
        "end_to_end_seconds",
        "entries_failed_permanent",
        "entries_failed_retryable",
        "ingestion_seconds",
        "ingestion_slo_breaches",
        "ingestion_slo_s",
        "retries",
        "send_seconds",
        "wall_clock_us",
    )

    def __init__(
        self, *, ingestion_slo_s: float = 5.0, wall_clock_us: Callable[[], int] = lambda: time.time_ns() // 1000
    ) -> None:
        self.batch_records = Histogram(BATCH_BUCKETS)
        self.send_seconds = Histogram(REQUEST_BUCKETS)
        self.end_to_end_seconds = Histogram(LATENCY_BUCKETS)
        self.ingestion_seconds = Histogram(LATENCY_BUCKETS)
        self.ingestion_slo_s = ingestion_slo_s
        self.ingestion_slo_breaches = 0
        self.entries_failed_retryable = 0
        self.entries_failed_permanent = 0
        self.retries = 0
        self.wall_clock_us = wall_clock_us
        self._clock = EventClock()

    def send_failed(self, entries: int, *, retryable: bool) -> None:
        """A send left ``entries`` unsettled; the worker will retry them."""
        self.retries += 1
        if retryable:
            self.entries_failed_retryable += entries
        else:
            self.entries_failed_permanent += entries

    def settled(self, records: Sequence[SpooledRecord]) -> None:
        now_us = self.wall_clock_us()
        count = len(records)
        weights: list[int] | None = None
        if count > LATENCY_SAMPLES:
            # Stratified: evenly spaced records, each standing for the records up to the next one. Neighbours
            # in a batch were read and acked together, so their latencies differ little; counts stay exact.
            picks = [index * count // LATENCY_SAMPLES for index in range(LATENCY_SAMPLES)]
            weights = [after - index for index, after in zip(picks, [*picks[1:], count], strict=True)]
            records = [records[index] for index in picks]
        times_us = self._clock.times_us
        end_to_end: list[float] = []
        ingestion: list[float] = []
        kept: list[int] = []
        for position, record in enumerate(records):
            times = times_us(record.payload)
            if times is None:
                continue
            received, generated = times
            end_to_end.append(max(0, now_us - received) / _US)
            ingestion.append(max(0, now_us - (received if generated is None else generated)) / _US)
            kept.append(position)
        limit = self.ingestion_slo_s
        if weights is None:
            self.end_to_end_seconds.observe_many(end_to_end)
            self.ingestion_seconds.observe_many(ingestion)
            self.ingestion_slo_breaches += sum(1 for value in ingestion if value > limit)
            return
        kept_weights = [weights[position] for position in kept]
        self.end_to_end_seconds.observe_many(end_to_end, kept_weights)
        self.ingestion_seconds.observe_many(ingestion, kept_weights)
        self.ingestion_slo_breaches += sum(w for value, w in zip(ingestion, kept_weights, strict=True) if value > limit)


# --------------------------------------------------------------------------------- daemon-wide figures


class ReplayFigures(Protocol):
    """What the collector reads from the replay tracker (``fpolicyd.pipeline.replay.ReplayStats`` has these)."""

    @property
    def reconnects(self) -> int: ...
    @property
    def last_reconnect_s(self) -> float: ...
    @property
    def max_reconnect_s(self) -> float: ...
    @property
    def total_reconnect_s(self) -> float: ...
    @property
    def replayed_events(self) -> int: ...
    @property
    def out_of_order_events(self) -> int: ...
    @property
    def max_out_of_order_lag_us(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def replay_active(self) -> bool: ...
    @property
    def replay_episodes(self) -> int: ...
    @property
    def replay_duration_s(self) -> float: ...
    @property
    def replay_episode_events(self) -> int: ...
    @property
    def replay_throughput_eps(self) -> float: ...
    @property
    def max_replay_duration_s(self) -> float: ...


# ------------------------------------------------------ server, spooler and processing figures (read-only)


class IngestCounterFigures(Protocol):
    """The readers' per-event counters (``fpolicyd.pipeline.ingest.IngestCounters``)."""

    @property
    def events(self) -> int: ...
    @property
    def operations(self) -> Mapping[str, int]: ...
    @property
    def route_matches(self) -> Mapping[str, int]: ...
    @property
    def unrouted(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def accelerated(self) -> int: ...
    @property
    def fast_decoded(self) -> int: ...
    @property
    def full_decoded(self) -> int: ...
    @property
    def untracked_requests(self) -> int: ...
    @property
    def paths_truncated(self) -> int: ...


class AcceleratorFigures(Protocol):
    """Which path builds the events (``fpolicyd.pipeline.speedups.AcceleratorStatus``): ``"c"`` or ``"python"``."""

    @property
    def path(self) -> str: ...


class IngestFigures(Protocol):
    """What every session's ingest step shares (``fpolicyd.pipeline.ingest.Ingest``)."""

    @property
    def counters(self) -> IngestCounterFigures: ...
    @property
    def accelerator(self) -> AcceleratorFigures: ...


class BudgetFigures(Protocol):
    """Pending connections and negotiated sessions (``fpolicyd.server.budget.ConnectionBudget``)."""

    @property
    def sessions(self) -> int: ...
    @property
    def pending(self) -> int: ...


class ConnectionFigures(Protocol):
    """One live connection (``fpolicyd.server.connection.FPolicyConnection``)."""

    @property
    def outstanding(self) -> int: ...


class ServerFigures(Protocol):
    """What the collector reads of the server (``fpolicyd.server.connection.ServerContext``); the mappings are
    copied with one ``dict()`` before they are iterated."""

    @property
    def ingest(self) -> IngestFigures: ...
    @property
    def budget(self) -> BudgetFigures: ...
    @property
    def connections(self) -> Iterable[ConnectionFigures]: ...
    @property
    def sessions_opened(self) -> int: ...
    @property
    def write_stalls(self) -> int: ...
    @property
    def rejections(self) -> Mapping[str, int]: ...
    @property
    def tls_failures(self) -> Mapping[str, int]: ...
    @property
    def notices(self) -> Mapping[str, int]: ...
    @property
    def protocol_errors(self) -> Mapping[str, int]: ...
    @property
    def status_answers(self) -> Mapping[str, int]: ...


class SpoolLimitFigures(Protocol):
    """The spool's settings (``SpoolSettings``): its hard size limit."""

    @property
    def max_bytes(self) -> int: ...


class SpoolFigures(Protocol):
    """The spool (``Spool``): its size, limit, sinks and what each sink has not acknowledged."""

    @property
    def size_bytes(self) -> int: ...
    @property
    def settings(self) -> SpoolLimitFigures: ...
    @property
    def sinks(self) -> Iterable[str]: ...
    def records_pending(self, sink: str) -> int: ...


class PressureFigures(Protocol):
    """The back-pressure state machine (``fpolicyd.pipeline.backpressure``): its state, an enum member whose
    value is one of :attr:`MetricLabels.pressures`."""

    @property
    def state(self) -> Enum: ...


class DiskStateFigures(Protocol):
    """Which writers are in a disk-full episode, and what they counted (``DiskFull``)."""

    @property
    def active(self) -> Mapping[str, object]: ...
    @property
    def episodes(self) -> Mapping[str, int]: ...
    @property
    def errors(self) -> Mapping[str, int]: ...


class DiskFigures(Protocol):
    """The writers' disk-full episodes (``fpolicyd.server.disk_monitor.DiskMonitor``)."""

    @property
    def state(self) -> DiskStateFigures: ...


class SinkWorkerFigures(Protocol):
    """A sink, wherever it runs (``fpolicyd.sinks.runner.SinkHandle``)."""

    @property
    def name(self) -> str: ...
    @property
    def lag(self) -> int: ...
    def figures(self) -> SinkFigures: ...


class SpoolerFigures(Protocol):
    """What the collector reads of the spooler (``fpolicyd.server.spooler.Spooler``)."""

    @property
    def spool(self) -> SpoolFigures: ...
    @property
    def accepted(self) -> int: ...
    @property
    def pressure(self) -> PressureFigures: ...
    @property
    def reading_paused(self) -> bool: ...
    @property
    def pauses(self) -> int: ...
    @property
    def held_total(self) -> int: ...
    @property
    def fatal(self) -> BaseException | None: ...
    @property
    def disk(self) -> DiskFigures: ...
    @property
    def fsync_seconds(self) -> Histogram: ...
    @property
    def commit_latency_seconds(self) -> Histogram: ...
    @property
    def workers(self) -> Sequence[SinkWorkerFigures]: ...


class EventLoopFigures(Protocol):
    """The daemon's event-loop probe (``fpolicyd.obs.looplag.LoopLag``)."""

    @property
    def lag_seconds(self) -> Histogram: ...


class ProcessingStatsFigures(Protocol):
    """The processing stage's counters (``fpolicyd.server.processing.ProcessingWorkerStats``)."""

    @property
    def duplicates(self) -> int: ...
    @property
    def dedup_errors_open(self) -> int: ...
    @property
    def dedup_errors_closed(self) -> int: ...
    @property
    def room_waits(self) -> int: ...


class SettleFigures(Protocol):
    """The route/settle/dedup stage (``fpolicyd.pipeline.processing.ProcessingStage``): the events settle holds."""

    @property
    def pending(self) -> int: ...


class DedupStoreState(Protocol):
    """The dedup store's state (``fpolicyd.server.processing.DedupStoreFigures``)."""

    @property
    def up(self) -> bool: ...
    @property
    def retries(self) -> int: ...
    @property
    def throttled(self) -> int: ...
    @property
    def short_circuited(self) -> int: ...


class ProcessingFigures(Protocol):
    """What the collector reads of the processing stage (``fpolicyd.server.processing.ProcessingWorker``)."""

    @property
    def stats(self) -> ProcessingStatsFigures: ...
    @property
    def stage(self) -> SettleFigures: ...
    @property
    def lag(self) -> int: ...
    def dedup_figures(self) -> DedupStoreState: ...


@dataclass(frozen=True, slots=True)
class MetricLabels:
    """The closed label sets exported before anything happens (each series zero until seen, so that rate() works
    from the start and no series appears late): the members of enums that the packages owning them define. The
    daemon passes them in (``fpolicyd.server.metric_labels.METRIC_LABELS``); obs imports none of those packages."""

    #: ``connections_rejected{reason}``: the connection budget's refusals (after the listener's ``not_allowed``).
    refusals: tuple[str, ...]
    #: ``tls_handshake_failures{reason}``.
    tls_failures: tuple[str, ...]
    #: ``events_received{operation}``: every ``operation_type`` (others seen are exported after them).
    operations: tuple[str, ...]
    #: ``frames_received{type}``: the frame type of a SCREEN_REQ (counted from the events), then the frame type
    #: of each session notice that is exactly one received frame (notice kind → frame type, in export order).
    screen_request: str
    frame_notices: Mapping[str, str]
    #: ``status_queries{answer}``.
    status_answers: tuple[str, ...]
    #: ``backpressure_state{state}``.
    pressures: tuple[str, ...]
    #: ``disk_full*{writer}``: the daemon's own writers, and the writer name of a sink (from its name).
    writers: tuple[str, ...]
    sink_writer: Callable[[str], str]

    @property
    def inbound_frame_types(self) -> tuple[str, ...]:
        """Frame types ONTAP sends to a server."""
        return (self.screen_request, *dict.fromkeys(self.frame_notices.values()))


class Metrics:
    """A daemon's registry, and the hooks through which subsystems outside the server and sinks feed it.

    - replay tracking: ``Metrics(replay=tracker.stats)`` (a :class:`ReplayFigures`, read at scrape
      time, on the HTTP thread: it must only read attributes);
    - dedup: the reader's exact-dedup window is read from the server context; the processing stage's suppressed
      duplicates through :meth:`watch_processing`, or ``count_dedup_hits(n)``;
    - settle: ``settle_pending_source = lambda: <events waiting to settle>``;
    - event-loop lag: ``Metrics(event_loop=probe)`` (an :class:`EventLoopFigures`: its histogram is read at scrape
      time).
    """

    def __init__(
        self,
        *,
        labels: MetricLabels,
        ingestion_slo_s: float = 5.0,
        reconnect_slo_s: float = 30.0,
        replay_slo_s: float = 300.0,
        process_metrics: bool = True,
        replay: Callable[[], ReplayFigures] | None = None,
        event_loop: EventLoopFigures | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = labels
        self.ingestion_slo_s = ingestion_slo_s
        self.reconnect_slo_s = reconnect_slo_s
        self.replay_slo_s = replay_slo_s
        self._dedup_hits = 0
        self.dedup_hits_source: Callable[[], int] = lambda: self._dedup_hits
        self.settle_pending_source: Callable[[], int] = lambda: 0
        #: The processing stage, when it runs (dedup failures, its backlog).
        self.processing: ProcessingFigures | None = None
        self.replay_source = replay
        self.context: ServerFigures | None = None
        self.spooler: SpoolerFigures | None = None
        #: The daemon's event-loop probe (``fpolicyd_event_loop_lag_seconds``).
        self.event_loop = event_loop
        #: The dead-letter writers' figures (this process's, the delivery process's), the files' size, the cap.
        self.dead_letter_sources: tuple[Callable[[], DeadLetterFigures], ...] = ()
        self.dead_letter_size: Callable[[], int] | None = None
        self.dead_letter_limit_bytes: int | None = None
        self.registry.register(FpolicydCollector(self))
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def attach(self, context: ServerFigures, spooler: SpoolerFigures) -> None:
        """Start reading the server's and the pipeline's counters (the sink workers count ingestion-SLO breaches
        against the target their spooler was built with: ``slo_ingestion_latency_s``)."""
        self.context = context
        self.spooler = spooler

    def watch_dead_letter(
        self, sources: Sequence[Callable[[], DeadLetterFigures]], *, size: Callable[[], int], limit_bytes: int
    ) -> None:
        """Read the dead-letter writers' figures (summed), the files' size (``stat``) and the cap at scrape time."""
        self.dead_letter_sources = tuple(sources)
        self.dead_letter_size = size
        self.dead_letter_limit_bytes = limit_bytes

    def count_dedup_hits(self, n: int = 1) -> None:
        self._dedup_hits += n

    def watch_processing(self, processing: ProcessingFigures) -> None:
        """Read dedup hits (suppressed duplicates) and settle's held events from the processing stage at scrape
        time."""
        stats = processing.stats
        stage = processing.stage
        self.dedup_hits_source = lambda: stats.duplicates
        self.settle_pending_source = lambda: stage.pending
        self.processing = processing


# ------------------------------------------------------------------------------------------ collector


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def _histogram(name: str, doc: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    return HistogramMetricFamily(PREFIX + name, doc, labels=list(labels))


def _add_histogram(
    family: HistogramMetricFamily, labels: Sequence[str], bounds: Sequence[float], state: HistogramState
) -> None:
    counts, total = state
    if not counts:
        counts = (0,) * (len(bounds) + 1)
    buckets, total, _count = Histogram.from_state(bounds, (counts, total)).snapshot()
    family.add_metric(list(labels), buckets, total)


class FpolicydCollector(Collector):
    """Every ``fpolicyd_`` family, read from the live objects at scrape time. Families are always present
    (with zero or no samples before ``attach``), so dashboards and alarms never see a metric vanish."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Names only (the registry checks for clashes); no live object is read.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield from self._build_info()
        yield from self._server(metrics.context, metrics.labels)
        yield from self._spooler(metrics.spooler, metrics.labels)
        yield from self._event_loop(metrics.event_loop)
        yield from self._sinks(metrics.spooler)
        yield from self._replay(metrics)
        yield from self._routing(metrics)
        yield from self._dead_letter(metrics)
        yield from self._slo(metrics)

    @staticmethod
    def _build_info() -> Iterator[Metric]:
        info = _gauge("build_info", "Build information (value 1).", ["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info

    @staticmethod
    def _server(ctx: ServerFigures | None, labels: MetricLabels) -> Iterator[Metric]:
        sessions = _gauge("sessions", "Negotiated ONTAP sessions open now (NEGO_REQ answered).")
        pending = _gauge(
            "pending_connections",
            "Connections accepted whose NEGO_REQ is not answered yet, TLS handshakes included "
            "(limit: max_pending_handshakes).",
        )
        opened = _counter("sessions_opened", "ONTAP connections accepted (TLS: after a successful handshake).")
        status_answers = _counter(
            "status_queries",
            "STATUS_QUERY_REQs answered (synchronous engines), by answer: in_progress (the request is outstanding) "
            "or lost (never received, already answered or cancelled: ONTAP sends it again at once).",
            ["answer"],
        )
        write_stalls = _counter(
            "peer_write_stalls",
            "Times a session stopped being read because ONTAP left more than peer_write_buffer_bytes of our "
            "replies unread (closed after peer_write_stall_timeout_s: session_timeouts_total{reason=write_stall}).",
        )
        outstanding = _gauge(
            "sync_outstanding_requests",
            "SCREEN_REQs of synchronous engines received and not yet answered or cancelled, over all sessions.",
        )
        untracked = _counter(
            "sync_untracked_requests",
            "Outstanding requests a session stopped tracking because it held more than "
            "sync_max_outstanding_requests (a STATUS_QUERY for one answers lost).",
        )
        rejected = _counter(
            "connections_rejected",
            "Connections closed by the server before or instead of a session, by reason: not_allowed "
            "(allowed_networks), max_connections (sessions full, at accept or at NEGO), max_per_peer "
            "(max_connections_per_peer), pending_evicted (the oldest pending connection, closed to make room for a "
            "new one: max_pending_handshakes).",
            ["reason"],
        )
        tls_failures = _counter(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason: plain_tcp (not TLS), protocol_version (below tls_min_version), "
            "certificate, handshake_timeout, peer_closed, other.",
            ["reason"],
        )
        frames = _counter("frames_received", "Frames received from ONTAP, by NotfType.", ["type"])
        events = _counter("events_received", "Notifications turned into events, by operation_type.", ["operation"])
        parse_errors = _counter("parse_errors", "Malformed input that closed a connection, by reason.", ["reason"])
        timeouts = _counter("session_timeouts", "Connections closed by a session timer, by reason.", ["reason"])
        decoded = _counter(
            "notifications_decoded",
            "SCREEN_REQs by decoder: accelerated (the C accelerator), fast (ONTAP's canonical layout, in Python) or "
            "full (the hardened XML parser, or protobuf); a rising full count means a layout the fast paths do not "
            "know.",
            ["decoder"],
        )
        accelerated = _gauge(
            "ingest_accelerated", "1 when the readers build events with the C accelerator, 0 on the pure-Python path."
        )
        truncated = _counter(
            "paths_truncated",
            "Events whose file_path or previous_path was longer than path_max_chars and was cut "
            "(metadata.path_truncated); event_id stays the full path's.",
        )
        if ctx is not None:
            truncated.add_metric([], ctx.ingest.counters.paths_truncated)
            decoded.add_metric(["accelerated"], ctx.ingest.counters.accelerated)
            decoded.add_metric(["fast"], ctx.ingest.counters.fast_decoded)
            decoded.add_metric(["full"], ctx.ingest.counters.full_decoded)
            accelerated.add_metric([], 1.0 if ctx.ingest.accelerator.path == "c" else 0.0)
            sessions.add_metric([], ctx.budget.sessions)
            pending.add_metric([], ctx.budget.pending)
            opened.add_metric([], ctx.sessions_opened)
            rejections = dict(ctx.rejections)
            for reason in ("not_allowed", *labels.refusals):
                rejected.add_metric([reason], rejections.get(reason, 0))
            failures = dict(ctx.tls_failures)
            for failure in labels.tls_failures:
                tls_failures.add_metric([failure], failures.get(failure, 0))
            notices = dict(ctx.notices)
            by_type: dict[str, int] = dict.fromkeys(labels.inbound_frame_types, 0)
            counters = ctx.ingest.counters
            by_type[labels.screen_request] = counters.events
            frame_notices = labels.frame_notices
            for kind, count in notices.items():
                frame_type = frame_notices.get(kind)
                if frame_type is not None:
                    by_type[frame_type] += count
            for frame_type, count in by_type.items():
                frames.add_metric([str(frame_type)], count)
            operations = dict(counters.operations)
            for operation in labels.operations:
                events.add_metric([operation], operations.pop(operation, 0))
            for operation_name, count in sorted(operations.items()):
                events.add_metric([operation_name], count)
            for reason, count in sorted(dict(ctx.protocol_errors).items()):
                (timeouts if reason in _TIMEOUT_REASONS else parse_errors).add_metric([reason], count)
            for answer in labels.status_answers:
                status_answers.add_metric([answer], ctx.status_answers.get(answer, 0))
            outstanding.add_metric([], sum(conn.outstanding for conn in list(ctx.connections)))
            untracked.add_metric([], counters.untracked_requests)
            write_stalls.add_metric([], ctx.write_stalls)
        yield from (sessions, pending, opened, rejected, tls_failures, frames, events, parse_errors, timeouts)
        yield from (decoded, accelerated, truncated, status_answers, outstanding, untracked, write_stalls)

    @staticmethod
    def _spooler(spooler: SpoolerFigures | None, labels: MetricLabels) -> Iterator[Metric]:
        spool_bytes = _gauge("spool_size_bytes", "Bytes the spool holds (segments plus write buffer).")
        spool_limit = _gauge("spool_limit_bytes", "The spool's hard size limit (spool_max_bytes).")
        spool_records = _gauge("spool_records", "Records in the spool that some sink has not acknowledged yet.")
        appended = _counter(
            "spool_appended_records",
            "Records appended to the spool (raw events; processed ones too when routing/dedup/settle run).",
        )
        state = _gauge(
            "backpressure_state", "Back-pressure state (1 for the current one): normal, applied, paused.", ["state"]
        )
        paused = _gauge(
            "reading_paused", "1 while the sockets are not read (spool at its pause watermark or full, or a disk full)."
        )
        pauses = _counter("reader_pauses", "Times a connection's reading was paused by the pipeline.")
        held = _counter("spool_full_held_events", "Events held in memory because the spool was full.")
        fatal = _gauge("pipeline_fatal", "1 once the spool can no longer make events durable (the daemon stops).")
        disk_full = _gauge(
            "disk_full",
            "1 while the writer's writes are refused for want of space (ENOSPC/EDQUOT); reading is paused meanwhile.",
            ["writer"],
        )
        disk_episodes = _counter(
            "disk_full_episodes",
            "Disk-full episodes by writer (first refused write to the next write that passed).",
            ["writer"],
        )
        disk_errors = _counter(
            "disk_full_errors",
            "Writes refused for want of space, by writer (each retry counts; a sink's count its episodes).",
            ["writer"],
        )
        if spooler is not None:
            spool = spooler.spool
            spool_bytes.add_metric([], spool.size_bytes)
            spool_limit.add_metric([], spool.settings.max_bytes)
            spool_records.add_metric([], max((spool.records_pending(name) for name in spool.sinks), default=0))
            appended.add_metric([], spooler.accepted)
            current = spooler.pressure.state.value
            for value in labels.pressures:
                state.add_metric([value], 1.0 if value == current else 0.0)
            paused.add_metric([], 1.0 if spooler.reading_paused else 0.0)
            pauses.add_metric([], spooler.pauses)
            held.add_metric([], spooler.held_total)
            fatal.add_metric([], 0.0 if spooler.fatal is None else 1.0)
            disk = spooler.disk.state
            active, episodes, errors = disk.active, dict(disk.episodes), dict(disk.errors)
            writers = dict.fromkeys([*labels.writers, *(labels.sink_writer(w.name) for w in spooler.workers)])
            writers.update(dict.fromkeys([*episodes, *errors]))
            for writer in writers:
                disk_full.add_metric([writer], 1.0 if writer in active else 0.0)
                disk_episodes.add_metric([writer], episodes.get(writer, 0))
                disk_errors.add_metric([writer], errors.get(writer, 0))
        yield from (spool_bytes, spool_limit, spool_records, appended, state, paused, pauses, held, fatal)
        yield from (disk_full, disk_episodes, disk_errors)
        fsync = _histogram("spool_fsync_duration_seconds", "Duration of each fsync of the spool's data (group commit).")
        commit = _histogram(
            "spool_commit_latency_seconds",
            "Per group commit that synced records: from its first write (a record or a dedup claim) handed to the "
            "kernel to durable (the group-commit window plus the fsync): at most what its events waited to be durable.",
        )
        _add_histogram(fsync, (), COMMIT_BUCKETS, spooler.fsync_seconds.state() if spooler is not None else ((), 0.0))
        _add_histogram(
            commit, (), COMMIT_BUCKETS, spooler.commit_latency_seconds.state() if spooler is not None else ((), 0.0)
        )
        yield from (fsync, commit)

    @staticmethod
    def _event_loop(event_loop: EventLoopFigures | None) -> Iterator[Metric]:
        lag = _histogram(
            "event_loop_lag_seconds",
            "How late the daemon's event loop ran a probe timer it had scheduled (one every "
            "event_loop_probe_interval_s): time the loop was busy elsewhere, which every frame's answer waits too.",
        )
        _add_histogram(
            lag, (), EVENT_LOOP_LAG_BUCKETS, event_loop.lag_seconds.state() if event_loop is not None else ((), 0.0)
        )
        yield lag

    @staticmethod
    def _sinks(spooler: SpoolerFigures | None) -> Iterator[Metric]:
        labels = ["sink"]
        lag = _gauge("sink_lag_records", "Records appended to the spool and not yet acknowledged by the sink.", labels)
        up = _gauge("sink_up", "0 while the sink's last send failed (readiness), 1 otherwise.", labels)
        settled = _counter(
            "sink_settled_events", "Events acknowledged by the sink (delivered or dead-lettered).", labels
        )
        sends = _counter("sink_sends", "Send calls (batches handed to the sink, retries included).", labels)
        requests = _counter("sink_requests", "AWS API requests (SendMessageBatch, PutEvents).", labels)
        retries = _counter("sink_retries", "Sends and requests repeated after a retriable failure.", labels)
        failed = _counter("sink_entries_failed", "Entry failures, by whether they are retried.", [*labels, "retryable"])
        dead = _counter("sink_dead_lettered", "Events written to the dead-letter file instead of the sink.", labels)
        batch = _histogram("sink_batch_records", "Records per batch read from the spool for the sink.", labels)
        send_time = _histogram("sink_send_duration_seconds", "Duration of one send call (write, fsync, HTTP).", labels)
        request_time = _histogram("sink_request_duration_seconds", "Duration of one AWS API request.", labels)
        end_to_end = _histogram(
            "end_to_end_latency_seconds", "Event received by fpolicyd → acknowledged by the sink.", labels
        )
        ingestion = _histogram(
            "ingestion_latency_seconds",
            "ONTAP GenerationTime → acknowledged by the sink (SLO: p99 < slo_ingestion_latency_s).",
            labels,
        )
        breaches = _counter(
            "ingestion_latency_slo_breaches",
            "Acknowledged events whose ingestion latency exceeded slo_ingestion_latency_s.",
            labels,
        )
        success = _gauge(
            "processing_success_ratio",
            "Share of settled events delivered rather than dead-lettered, since start (SLO > 0.995).",
            labels,
        )
        for worker in spooler.workers if spooler is not None else ():
            name = [worker.name]
            figures = worker.figures()
            lag.add_metric(name, worker.lag)
            up.add_metric(name, 1.0 if figures.last_error is None else 0.0)
            settled.add_metric(name, figures.delivered)
            sends.add_metric(name, figures.sends)
            requests.add_metric(name, figures.requests)
            retries.add_metric(name, figures.retries)
            failed.add_metric([*name, "true"], figures.entries_failed_retryable)
            failed.add_metric([*name, "false"], figures.entries_failed_permanent)
            dead.add_metric(name, figures.dead_lettered)
            _add_histogram(batch, name, BATCH_BUCKETS, figures.batch_records)
            _add_histogram(send_time, name, REQUEST_BUCKETS, figures.send_seconds)
            if figures.request_seconds is not None:
                _add_histogram(request_time, name, REQUEST_BUCKETS, figures.request_seconds)
            _add_histogram(end_to_end, name, LATENCY_BUCKETS, figures.end_to_end_seconds)
            _add_histogram(ingestion, name, LATENCY_BUCKETS, figures.ingestion_seconds)
            breaches.add_metric(name, figures.ingestion_slo_breaches)
            total = figures.delivered
            success.add_metric(name, 1.0 if total == 0 else max(0, total - figures.dead_lettered) / total)
        yield from (lag, up, settled, sends, requests, retries, failed, dead, batch, send_time, request_time)
        yield from (end_to_end, ingestion, breaches, success)

    @staticmethod
    def _routing(metrics: Metrics) -> Iterator[Metric]:
        routed = _counter("events_routed", "Events a use-case route took, by route (fan-out counts each).", ["route"])
        unrouted = _counter("events_unrouted", "Events no route took (routing on).")
        errors = _counter(
            "dedup_errors",
            "Dedup judgements the store could not make, by failure mode: open (the event was delivered unchecked, "
            "once) or closed (the event waits and is asked about again: every attempt counts, so an outage counts "
            "each held event once per retry).",
            ["mode"],
        )
        backlog = _gauge("processor_lag_records", "Spool records the processing stage has not handled yet.")
        room_waits = _counter(
            "processor_room_waits",
            "Times the processing stage stopped appending because the spool was within an eighth of "
            "(spool_max_bytes - backpressure_pause_bytes) of spool_max_bytes (it resumes as the sinks free space).",
        )
        store_up = _gauge(
            "dedup_store_up",
            "1 while the dedup store answers (its last batch was judged in full), 0 while it fails (fail-open: "
            "events go out unchecked; fail-closed: they wait in the spool).",
        )
        store_retries = _counter(
            "dedup_store_retries", "DynamoDB dedup requests sent again after a throttling or transient failure."
        )
        store_throttled = _counter(
            "dedup_store_throttled", "DynamoDB dedup requests answered with a throttling error (before any retry)."
        )
        store_skipped = _counter(
            "dedup_store_short_circuited",
            "DynamoDB dedup requests not sent because another request of their batch had failed after its retries "
            "(they took the failure mode at once).",
        )
        ctx = metrics.context
        if ctx is not None:
            counters = ctx.ingest.counters
            for route, count in sorted(dict(counters.route_matches).items()):
                routed.add_metric([route], count)
            unrouted.add_metric([], counters.unrouted)
        processing = metrics.processing
        # Without a stage (the reader's exact dedup cannot fail open or closed: it is in memory) the series are 0.
        errors.add_metric(["open"], processing.stats.dedup_errors_open if processing is not None else 0)
        errors.add_metric(["closed"], processing.stats.dedup_errors_closed if processing is not None else 0)
        backlog.add_metric([], processing.lag if processing is not None else 0)
        figures = processing.dedup_figures() if processing is not None else None
        store_up.add_metric([], 1.0 if figures is None or figures.up else 0.0)
        store_retries.add_metric([], figures.retries if figures is not None else 0)
        store_throttled.add_metric([], figures.throttled if figures is not None else 0)
        store_skipped.add_metric([], figures.short_circuited if figures is not None else 0)
        room_waits.add_metric([], processing.stats.room_waits if processing is not None else 0)
        yield from (routed, unrouted, errors, backlog, room_waits, store_up, store_retries, store_throttled)
        yield from (store_skipped,)

    @staticmethod
    def _replay(metrics: Metrics) -> Iterator[Metric]:
        dedup = _counter("dedup_hits", "Events suppressed as duplicates by dedup.")
        reader_hits = metrics.context.ingest.counters.duplicates if metrics.context is not None else 0
        dedup.add_metric([], reader_hits + metrics.dedup_hits_source())
        settle = _gauge("settle_pending", "Events waiting for their file to settle before emission.")
        settle.add_metric([], metrics.settle_pending_source())
        reconnects = _counter("reconnects", "Handshakes of a node/policy that had lost its previous session.")
        reconnect_time = SummaryMetricFamily(
            PREFIX + "reconnect_duration_seconds", "Session lost → next NEGO_REQ of the same node and policy."
        )
        last_reconnect = _gauge(
            "reconnect_last_duration_seconds", "The most recent reconnect time (SLO: slo_reconnect_s)."
        )
        max_reconnect = _gauge("reconnect_max_duration_seconds", "The longest reconnect time since start.")
        replayed = _counter("replayed_events", "Events generated while their node had no session (persistent store).")
        out_of_order = _counter("out_of_order_events", "Events older than what their node/policy already delivered.")
        displacement = _gauge(
            "out_of_order_max_displacement_seconds",
            "Largest out-of-order distance since start (GenerationTime behind the newest already seen).",
        )
        duplicates = _counter("duplicate_events", "Notifications received again (an event_id seen recently).")
        active = _gauge("replay_active", "1 while a replay episode is running.")
        episodes = _counter("replay_episodes", "Replay episodes that ended.")
        duration = _gauge(
            "replay_duration_seconds",
            "First → last replayed event of the current replay (so far), else of the last one "
            "(SLO: slo_replay_completion_s).",
        )
        max_duration = _gauge("replay_max_duration_seconds", "The longest replay since start.")
        episode_events = _gauge("replay_episode_events", "Replayed events of the current, else the last, replay.")
        throughput = _gauge("replay_throughput_events_per_second", "Replayed events per second of that replay.")
        source = metrics.replay_source
        if source is not None:
            figures = source()
            reconnects.add_metric([], figures.reconnects)
            reconnect_time.add_metric([], figures.reconnects, figures.total_reconnect_s)
            last_reconnect.add_metric([], figures.last_reconnect_s)
            max_reconnect.add_metric([], figures.max_reconnect_s)
            replayed.add_metric([], figures.replayed_events)
            out_of_order.add_metric([], figures.out_of_order_events)
            displacement.add_metric([], figures.max_out_of_order_lag_us / _US)
            duplicates.add_metric([], figures.duplicates)
            active.add_metric([], 1.0 if figures.replay_active else 0.0)
            episodes.add_metric([], figures.replay_episodes)
            duration.add_metric([], figures.replay_duration_s)
            max_duration.add_metric([], figures.max_replay_duration_s)
            episode_events.add_metric([], figures.replay_episode_events)
            throughput.add_metric([], figures.replay_throughput_eps)
        yield from (dedup, settle, reconnects, reconnect_time, last_reconnect, max_reconnect, replayed)
        yield from (out_of_order, displacement, duplicates, active, episodes, duration, max_duration)
        yield from (episode_events, throughput)

    @staticmethod
    def _dead_letter(metrics: Metrics) -> Iterator[Metric]:
        labels = ["source"]
        written = _counter(
            "dead_letter_records", "Records written to the dead-letter files, by source (sink name, decoder).", labels
        )
        sampled = _counter(
            "dead_letter_sampled_records",
            "Of those, records that keep only the first dead_letter_pre_handshake_sample_bytes of a payload "
            "(received before the handshake).",
            labels,
        )
        dropped = _counter(
            "dead_letter_dropped",
            "Dead-letter records lost to the cap or the disk, by source and reason (evicted: removed with the "
            "oldest file; too_large: over a file's share of the cap; write_failed: the disk refused it).",
            [*labels, "reason"],
        )
        errors = _counter(
            "dead_letter_write_errors",
            "Dead-letter writes the disk refused (no space, I/O error), by source; a sink keeps its event and retries.",
            labels,
        )
        size = _gauge("dead_letter_size_bytes", "Bytes the dead-letter files hold (the active and rotated files).")
        limit = _gauge("dead_letter_limit_bytes", "The dead-letter files' cap (dead_letter_max_bytes).")
        figures = DeadLetterFigures.total(source() for source in metrics.dead_letter_sources)
        if metrics.dead_letter_sources:
            for source, count in sorted({DECODER_SOURCE: 0, **figures.written}.items()):
                written.add_metric([source], count)
            for source, count in sorted({DECODER_SOURCE: 0, **figures.sampled}.items()):
                sampled.add_metric([source], count)
            for source, reasons in sorted({DECODER_SOURCE: {}, **figures.dropped}.items()):
                for reason, count in sorted({**dict.fromkeys(DROP_REASONS, 0), **reasons}.items()):
                    dropped.add_metric([source, reason], count)
            for source, count in sorted({DECODER_SOURCE: 0, **figures.write_errors}.items()):
                errors.add_metric([source], count)
        if metrics.dead_letter_size is not None:
            size.add_metric([], metrics.dead_letter_size())
        if metrics.dead_letter_limit_bytes is not None:
            limit.add_metric([], metrics.dead_letter_limit_bytes)
        yield from (written, sampled, dropped, errors, size, limit)

    @staticmethod
    def _slo(metrics: Metrics) -> Iterator[Metric]:
        targets = _gauge("slo_target", "The reference pipeline's SLO targets (seconds; a ratio for success).", ["slo"])
        targets.add_metric(["ingestion_latency_seconds"], metrics.ingestion_slo_s)
        targets.add_metric(["processing_success_ratio"], SLO_SUCCESS_RATIO)
        targets.add_metric(["reconnect_seconds"], metrics.reconnect_slo_s)
        targets.add_metric(["replay_completion_seconds"], metrics.replay_slo_s)
        yield targets


@dataclass(frozen=True, slots=True)
class SinkFigures:
    """One sink's figures at one moment: what the collector and the readiness check read, whether the sink's worker
    runs in this process (:meth:`fpolicyd.sinks.runner.SinkWorker.figures`) or in the delivery process (sent over
    as :meth:`to_dict`)."""

    name: str
    delivered: int = 0
    sends: int = 0
    failures: int = 0
    #: The last send's error while the sink is failing (readiness), None once a send succeeds again.
    last_error: str | None = None
    last_error_retriable: bool = True
    #: The last error was a write refused for want of space (ENOSPC/EDQUOT): the daemon pauses reading.
    last_error_disk_full: bool = False
    requests: int = 0
    retries: int = 0
    entries_failed_retryable: int = 0
    entries_failed_permanent: int = 0
    dead_lettered: int = 0
    ingestion_slo_breaches: int = 0
    batch_records: HistogramState = ((), 0.0)
    send_seconds: HistogramState = ((), 0.0)
    end_to_end_seconds: HistogramState = ((), 0.0)
    ingestion_seconds: HistogramState = ((), 0.0)
    #: Per AWS request (None: the sink makes no API requests).
    request_seconds: HistogramState | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SinkFigures:
        """Inverse of :meth:`to_dict` after a JSON round trip (lists back to tuples). Raises ValueError."""
        try:
            values = dict(data)
            for key in ("batch_records", "send_seconds", "end_to_end_seconds", "ingestion_seconds", "request_seconds"):
                state = values.get(key)
                if state is not None:
                    counts, total = state
                    values[key] = (tuple(int(c) for c in counts), float(total))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed sink figures: {exc}") from None

    @classmethod
    def total(cls, name: str, parts: Sequence[SinkFigures]) -> SinkFigures:
        """One sink's figures over the delivery processes that share it: counts and histograms added up; the
        sink is failing while any part of it is (the first such part's error)."""
        failing = next((part for part in parts if part.last_error is not None), None)
        requests = [part.request_seconds for part in parts if part.request_seconds is not None]
        return cls(
            name=name,
            delivered=sum(part.delivered for part in parts),
            sends=sum(part.sends for part in parts),
            failures=sum(part.failures for part in parts),
            last_error=None if failing is None else failing.last_error,
            last_error_retriable=True if failing is None else failing.last_error_retriable,
            last_error_disk_full=failing is not None and failing.last_error_disk_full,
            requests=sum(part.requests for part in parts),
            retries=sum(part.retries for part in parts),
            entries_failed_retryable=sum(part.entries_failed_retryable for part in parts),
            entries_failed_permanent=sum(part.entries_failed_permanent for part in parts),
            dead_lettered=sum(part.dead_lettered for part in parts),
            ingestion_slo_breaches=sum(part.ingestion_slo_breaches for part in parts),
            batch_records=_state_total(part.batch_records for part in parts),
            send_seconds=_state_total(part.send_seconds for part in parts),
            end_to_end_seconds=_state_total(part.end_to_end_seconds for part in parts),
            ingestion_seconds=_state_total(part.ingestion_seconds for part in parts),
            request_seconds=_state_total(requests) if requests else None,
        )


def _state_total(states: Iterable[HistogramState]) -> HistogramState:
    """The sum of histogram states of the same bounds (an empty state, ``((), 0.0)``, adds nothing)."""
    counts: list[int] = []
    total = 0.0
    for part, part_sum in states:
        if not part:
            continue
        if not counts:
            counts = list(part)
        elif len(part) != len(counts):
            raise ValueError(f"histogram states of {len(counts)} and {len(part)} buckets cannot be added")
        else:
            counts = [a + b for a, b in zip(counts, part, strict=True)]
        total += part_sum
    return tuple(counts), total


#: The dead-letter source of the reader's undecodable payloads, and the reasons a record is dropped
#: (``fpolicyd.sinks.dead_letter.DropReason``): always exported, zero until they happen.
DECODER_SOURCE: Final = "decoder"
DROP_REASONS: Final = ("evicted", "too_large", "write_failed")


@dataclass(frozen=True, slots=True)
class DeadLetterFigures:
    """What a dead-letter writer counted, by source (:meth:`fpolicyd.sinks.dead_letter.DeadLetterWriter.figures`):
    read here, or sent over by the delivery process as :meth:`to_dict`."""

    #: Records written, and of them, samples.
    written: dict[str, int] = field(default_factory=dict)
    sampled: dict[str, int] = field(default_factory=dict)
    #: Records dropped: source → reason → count.
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Writes the disk refused.
    write_errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "sampled": self.sampled,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeadLetterFigures:
        """Inverse of :meth:`to_dict` after a JSON round trip. Raises ValueError."""
        try:
            return cls(
                written={str(k): int(v) for k, v in data["written"].items()},
                sampled={str(k): int(v) for k, v in data["sampled"].items()},
                dropped={
                    str(source): {str(r): int(n) for r, n in reasons.items()}
                    for source, reasons in data["dropped"].items()
                },
                write_errors={str(k): int(v) for k, v in data["write_errors"].items()},
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed dead-letter figures: {exc!r}") from None

    @classmethod
    def total(cls, parts: Iterable[DeadLetterFigures]) -> DeadLetterFigures:
        """The sum of several writers' figures (the daemon's and the delivery process's)."""
        out = cls()
        for part in parts:
            for mine, theirs in ((out.written, part.written), (out.sampled, part.sampled)):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            for key, value in part.write_errors.items():
                out.write_errors[key] = out.write_errors.get(key, 0) + value
            for source, reasons in part.dropped.items():
                into = out.dropped.setdefault(source, {})
                for reason, count in reasons.items():
                    into[reason] = into.get(reason, 0) + count
        return out
