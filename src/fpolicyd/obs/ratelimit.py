"""At most one log line per key per interval, each carrying how many were left out since the previous one.

A hostile or broken peer can make the daemon refuse thousands of connections a second; one warning per
refusal once wrote 17 MB of log in 25 s. The counters (``/metrics``) stay exact; only the lines are thinned.
Sans-IO: the caller passes ``now`` (any monotonic clock) and writes the line itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _KeyState:
    #: When the last line for this key was written.
    logged_at: float
    #: Occurrences since then that wrote no line.
    suppressed: int = 0


class LogRateLimiter:
    """Per key (a log event and its reason: a closed set), the first occurrence writes a line at once; later
    ones within ``interval_s`` of the last line only count. The next line — the next occurrence after the
    interval, or :meth:`due` when none comes — carries that count. ``interval_s`` 0 writes every line."""

    __slots__ = ("_keys", "interval_s")

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key: str, now: float) -> int | None:
        """None: write no line (counted). Otherwise write one, reporting the returned number of occurrences
        left out since the previous line for ``key``."""
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _KeyState(logged_at=now)
            return 0
        if now - state.logged_at >= self.interval_s:
            suppressed = state.suppressed
            state.logged_at = now
            state.suppressed = 0
            return suppressed
        state.suppressed += 1
        return None

    def due(self, now: float) -> list[tuple[str, int]]:
        """Keys whose interval has passed with occurrences left out and no line since: write one summary line
        for each (``(key, suppressed)``). Keys with nothing pending and a passed interval are forgotten."""
        out: list[tuple[str, int]] = []
        for key, state in list(self._keys.items()):
            if now - state.logged_at < self.interval_s:
                continue
            if state.suppressed:
                out.append((key, state.suppressed))
                state.logged_at = now
                state.suppressed = 0
            else:
                del self._keys[key]
        return out

    def pending(self, key: str) -> int:
        """Occurrences of ``key`` left out and not reported yet."""
        state = self._keys.get(key)
        return state.suppressed if state is not None else 0
