"""Liveness (``/healthz``) and readiness (``/readyz``).

Both are answered on the HTTP server's own thread, so they keep answering when the event loop does not:

- liveness = the process answers and the event loop ran its heartbeat within ``health_loop_stall_s``. A wedged
  loop (a blocking call, a CPU-bound bug) stops the heartbeat and fails it, which is what a container health
  check must restart;
- readiness = liveness, plus the FPolicy listener is bound, the spooler can still make events durable, no
  writer is in a disk-full episode (check ``disk``: the writers named, reading is paused meanwhile), no sink is
  failing and the spool is under its hard limit. A load balancer or an operator reads which check
  failed from the JSON body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from fpolicyd.errors import ConfigError

# ------------------------------------------------------------- what readiness reads (obs imports none of them)


class ProcessingHealth(Protocol):
    """The processing stage as readiness sees it (``fpolicyd.server.processing.ProcessingWorker``)."""

    @property
    def last_error(self) -> BaseException | None: ...


class SpoolSize(Protocol):
    """The spool as readiness sees it (the ``Spool``)."""

    @property
    def size_bytes(self) -> int: ...


class DiskEpisode(Protocol):
    """One writer's disk-full episode (an ``Episode``)."""

    @property
    def error(self) -> str: ...


class DiskEpisodes(Protocol):
    """The writers now in a disk-full episode (``DiskFull``)."""

    @property
    def active(self) -> Mapping[str, DiskEpisode]: ...


class DiskWatch(Protocol):
    """The writers' disk-full episodes (``fpolicyd.server.disk_monitor.DiskMonitor``)."""

    @property
    def state(self) -> DiskEpisodes: ...


class LedgerHealth(Protocol):
    """The audit ledger of suppressed duplicates (``fpolicyd.storage.duplicate_ledger.DuplicateLedger``)."""

    @property
    def pending(self) -> int: ...
    @property
    def last_error(self) -> BaseException | None: ...


class SinkHealth(Protocol):
    """A sink, wherever it runs (``fpolicyd.sinks.runner.SinkHandle``)."""

    @property
    def name(self) -> str: ...
    @property
    def lag(self) -> int: ...
    @property
    def last_error(self) -> BaseException | None: ...


class SpoolerHealth(Protocol):
    """The spool and the sinks as readiness sees them (``fpolicyd.server.spooler.Spooler``)."""

    @property
    def fatal(self) -> BaseException | None: ...
    @property
    def spool(self) -> SpoolSize: ...
    @property
    def disk(self) -> DiskWatch: ...
    @property
    def duplicates(self) -> LedgerHealth | None: ...
    @property
    def workers(self) -> Sequence[SinkHealth]: ...


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def status(self) -> int:
        """The HTTP status to answer with: 200 or 503."""
        return 200 if self.ok else 503

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "status": "ok" if self.ok else "fail",
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            }
        )


class Heartbeat:
    """The event loop stamps the time every ``interval_s``; any thread can ask how old the stamp is."""

    def __init__(self, *, interval_s: float, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= interval_s:
            raise ConfigError(
                f"health_loop_stall_s ({stall_s}) must exceed health_heartbeat_interval_s ({interval_s}): "
                "otherwise a healthy loop fails /healthz between two beats"
            )
        self.interval_s = interval_s
        self.stall_s = stall_s
        self._clock = clock
        self._last = clock()
        self._handle: asyncio.TimerHandle | None = None
        #: Housekeeping that must run on the loop thread once per beat (e.g. closing a quiet replay episode).
        self.on_beat: list[Callable[[], None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beat_on(loop)

    def _beat_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last = self._clock()
        for task in self.on_beat:
            task()
        self._handle = loop.call_later(self.interval_s, self._beat_on, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def age_s(self) -> float:
        return max(0.0, self._clock() - self._last)

    def check(self) -> Check:
        age = self.age_s
        if age > self.stall_s:
            return Check("event_loop", False, f"no heartbeat for {age:.1f} s (limit {self.stall_s:g} s): loop stalled")
        return Check("event_loop", True, f"heartbeat {age:.2f} s ago")

    def liveness(self) -> HealthReport:
        return HealthReport((self.check(),))


def readiness(
    heartbeat: Heartbeat,
    *,
    listening: str | None,
    spooler: SpoolerHealth | None,
    spool_limit_bytes: int,
    processing: ProcessingHealth | None = None,
) -> HealthReport:
    """``listening``: where the FPolicy listener is bound, or None while it is not (starting, stopping);
    ``processing``: the processing stage (route, settle, dedup) when it runs."""
    checks: list[Check] = [heartbeat.check()]
    checks.append(
        Check("listener", True, f"listening on {listening}")
        if listening is not None
        else Check("listener", False, "the FPolicy listener is not bound (starting or stopping)")
    )
    if spooler is None:
        checks.append(Check("pipeline", False, "the spool and sinks are not open yet"))
    else:
        checks.extend(_spooler_checks(spooler, spool_limit_bytes))
    if processing is not None:
        error = processing.last_error
        checks.append(
            Check("processor", True, "routing, settle and dedup proceed")
            if error is None
            else Check("processor", False, f"blocked (the dedup store or the ledger does not answer): {error}")
        )
    return HealthReport(tuple(checks))


def _spooler_checks(spooler: SpoolerHealth, spool_limit_bytes: int) -> Sequence[Check]:
    checks: list[Check] = []
    fatal = spooler.fatal
    checks.append(
        Check("pipeline", True, "events are made durable")
        if fatal is None
        else Check("pipeline", False, f"the spool failed and the daemon is stopping: {fatal}")
    )
    size = spooler.spool.size_bytes
    checks.append(Check("spool", size < spool_limit_bytes, f"{size} of {spool_limit_bytes} bytes (spool_max_bytes)"))
    full = spooler.disk.state.active
    checks.append(
        Check("disk", True, "every writer writes")
        if not full
        else Check(
            "disk",
            False,
            "disk full, reading paused until space frees: "
            + "; ".join(f"{writer}: {episode.error}" for writer, episode in sorted(full.items())),
        )
    )
    duplicates = spooler.duplicates
    if duplicates is not None:
        ledger_error = duplicates.last_error
        checks.append(
            Check("ledger", True, f"{duplicates.pending} suppressed duplicates waiting for their audit record")
            if ledger_error is None
            else Check("ledger", False, f"the dedup audit ledger cannot be written: {ledger_error}")
        )
    for worker in spooler.workers:
        error = worker.last_error
        checks.append(
            Check(f"sink:{worker.name}", True, f"{worker.lag} events pending")
            if error is None
            else Check(f"sink:{worker.name}", False, str(error))
        )
    return checks
