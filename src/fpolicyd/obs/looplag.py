"""Event-loop lag: how late the daemon's event loop ran a timer it had scheduled.

A synchronous engine's requests are answered once their events are durable; between a frame's arrival and its
answer the loop may be busy elsewhere (a long socket read, a big batch), and the whole wait shows in the frame →
durable tail. A probe timer every ``event_loop_probe_interval_s`` measures it: lag = the time the loop ran the
timer - the time it was due (never negative), one observation of ``fpolicyd_event_loop_lag_seconds`` per probe.
A probe later than ``event_loop_stall_warn_s`` also asks for an ``event_loop_stalled`` warning, at most one line
per ``log_rate_limit_interval_s`` (:class:`~fpolicyd.obs.ratelimit.LogRateLimiter`).

Sans-IO: the caller schedules the timer on its loop, reports when it is due (:meth:`LoopLag.armed`) and when it
ran (:meth:`LoopLag.fired`), both on the loop's clock, and writes the log lines itself
(``fpolicyd.server.runtime.EventLoopProbe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fpolicyd.obs.metrics import EVENT_LOOP_LAG_BUCKETS, Histogram
from fpolicyd.obs.ratelimit import LogRateLimiter

#: The log event of a probe later than the stall threshold (the rate limiter's key).
STALL_EVENT: Final = "event_loop_stalled"


@dataclass(frozen=True, slots=True)
class Stall:
    """A probe later than the threshold whose warning line is due now."""

    #: How late the probe ran (seconds).
    lag_s: float
    #: Stalls whose line the rate limiter left out since the previous line.
    suppressed: int


class LoopLag:
    """The probe's arithmetic: one :attr:`lag_seconds` observation per probe, a :class:`Stall` to log when one was
    later than ``stall_warn_s`` and the rate limiter lets the line through."""

    __slots__ = ("_due", "_limiter", "interval_s", "lag_seconds", "stall_warn_s")

    def __init__(self, *, interval_s: float, stall_warn_s: float, log_interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if stall_warn_s <= 0:
            raise ValueError(f"stall_warn_s must be > 0, got {stall_warn_s}")
        self.interval_s = interval_s
        self.stall_warn_s = stall_warn_s
        #: Read at scrape time on the HTTP thread (``fpolicyd_event_loop_lag_seconds``).
        self.lag_seconds = Histogram(EVENT_LOOP_LAG_BUCKETS)
        self._limiter = LogRateLimiter(log_interval_s)
        #: When the armed probe is due (None: no probe armed).
        self._due: float | None = None

    def armed(self, due: float) -> None:
        """A probe was scheduled to run at ``due`` (the timer's own ``when()``)."""
        self._due = due

    def fired(self, now: float) -> Stall | None:
        """The armed probe ran at ``now``: observe its lag; a :class:`Stall` when a warning line is to be written."""
        due = self._due
        if due is None:
            raise RuntimeError("fired() without a probe armed")
        self._due = None
        # An asyncio loop runs a timer up to its clock's resolution early: that is no lag.
        lag = max(0.0, now - due)
        self.lag_seconds.observe(lag)
        if lag <= self.stall_warn_s:
            return None
        suppressed = self._limiter.admit(STALL_EVENT, now)
        return None if suppressed is None else Stall(lag_s=lag, suppressed=suppressed)

    def summary(self, now: float) -> int:
        """Stalls left out of the log and not reported yet, once a log interval has passed since the last line:
        write one summary line for them when not 0 (they then count as reported)."""
        return sum(suppressed for _key, suppressed in self._limiter.due(now))
