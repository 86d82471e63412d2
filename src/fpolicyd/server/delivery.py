"""Fan-out of encoded events to every sink runner, with flow control that bounds memory.

``over_limit`` turns true when the largest sink backlog reaches ``max_pending_events``; every connection then
pauses reading (its socket buffer fills and TCP pushes back to ONTAP). Reading resumes when the backlog is back
under half the limit, so a slow sink produces a few long pauses rather than a pause per event.
"""

from __future__ import annotations

from collections.abc import Callable

from fpolicyd.sinks.runner import SinkRunner


class Delivery:
    def __init__(self, max_pending_events: int) -> None:
        self.runners: list[SinkRunner] = []
        self._high = max_pending_events
        self._low = max_pending_events // 2
        self._paused: dict[int, Callable[[], None]] = {}
        self.accepted = 0
        self.pauses = 0

    def add(self, runner: SinkRunner) -> None:
        self.runners.append(runner)

    def submit(self, line: bytes) -> None:
        self.accepted += 1
        for runner in self.runners:
            runner.submit(line)

    @property
    def backlog(self) -> int:
        return max((runner.pending for runner in self.runners), default=0)

    @property
    def over_limit(self) -> bool:
        return self.backlog >= self._high

    def park(self, key: int, resume: Callable[[], None]) -> None:
        """Remember a paused reader; ``resume`` is called once the backlog is low again."""
        if key not in self._paused:
            self.pauses += 1
        self._paused[key] = resume

    def forget(self, key: int) -> None:
        self._paused.pop(key, None)

    @property
    def paused_readers(self) -> int:
        return len(self._paused)

    def on_progress(self) -> None:
        """Called by a runner after each batch: wake the readers once the backlog is low enough."""
        if self._paused and self.backlog <= self._low:
            waiting = list(self._paused.values())
            self._paused.clear()
            for resume in waiting:
                resume()
