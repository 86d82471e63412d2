"""Process-wide runtime tuning shared by the daemon and its delivery process, and the daemon's event-loop probe."""

from __future__ import annotations

import asyncio
import gc

from fpolicyd.obs.log import get_logger
from fpolicyd.obs.looplag import STALL_EVENT, LoopLag

log = get_logger("fpolicyd.runtime")


def tune_garbage_collector(young_threshold: int) -> None:
    """Every event allocates a few dozen short-lived objects; with CPython's default (a young collection every
    700 allocations) the collector ran thousands of times a second. Measured with bench_ingest.py (50,000
    events, default settings): 10,000 cut server CPU per event by ~7 %, memory unchanged. What exists before the
    daemon starts (modules, settings) is frozen: never scanned again."""
    if young_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)
    gc.freeze()


class EventLoopProbe:
    """Runs :class:`~fpolicyd.obs.looplag.LoopLag` on a loop: a timer ``lag.interval_s`` after the previous one ran
    (one timer pending at a time, so a stall is one late probe, not a burst of catching-up ones), its lag measured
    on the loop's clock against the timer's own due time; stall warnings are written here."""

    __slots__ = ("_handle", "_loop", "lag")

    def __init__(self, lag: LoopLag) -> None:
        self.lag = lag
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            raise RuntimeError("the event-loop probe is already running")
        self._loop = loop
        self._arm(loop)

    def stop(self) -> None:
        """Cancel the pending probe (nothing is left scheduled on the loop)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        handle = loop.call_later(self.lag.interval_s, self._fire)
        self.lag.armed(handle.when())
        self._handle = handle

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None  # stop() cancels the handle before it forgets the loop
        now = loop.time()
        stall = self.lag.fired(now)
        self._arm(loop)
        threshold = self.lag.stall_warn_s
        if stall is not None:
            log.warning(STALL_EVENT, lag_s=round(stall.lag_s, 4), threshold_s=threshold, suppressed=stall.suppressed)
        left_out = self.lag.summary(now)
        if left_out:
            log.warning(STALL_EVENT, threshold_s=threshold, suppressed=left_out, summary=True)
