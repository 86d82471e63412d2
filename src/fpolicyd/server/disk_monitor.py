"""The daemon's edge of :mod:`fpolicyd.storage.disk`: reads the clock, logs one line when a writer's disk-full
episode starts and one when it ends, and tells its listeners (the pipeline, which pauses or resumes reading).

Writers report from the event loop; a writer working on a thread reports once it is back on the loop."""

from __future__ import annotations

import time
from collections.abc import Callable

from fpolicyd.obs.log import get_logger
from fpolicyd.storage.disk import DiskFull, DiskRetry

log = get_logger("fpolicyd.disk")

__all__ = ["DiskMonitor"]


class DiskMonitor:
    def __init__(self, retry: DiskRetry | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = DiskFull()
        #: How long a refused writer waits before its next attempt (settings ``disk_full_retry_*``).
        self.retry = retry or DiskRetry()
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener`` runs after every episode that starts or ends."""
        self._listeners.append(listener)

    @property
    def any(self) -> bool:
        return self.state.any

    def full(self, writer: str, error: BaseException | str) -> bool:
        """``writer`` was refused a write for want of space; True if that starts an episode."""
        episode = self.state.full(writer, str(error), self._clock())
        if episode is None:
            return False
        log.error(
            "disk_full",
            writer=writer,
            error=episode.error,
            detail="reading paused; nothing read is lost; retrying until space frees",
        )
        self._changed()
        return True

    def freed(self, writer: str) -> bool:
        """A write of ``writer`` went through; True if that ends an episode."""
        ended = self.state.freed(writer, self._clock())
        if ended is None:
            return False
        _, lasted = ended
        log.info(
            "disk_space_recovered",
            writer=writer,
            full_s=round(lasted, 3),
            refused_writes=self.state.errors.get(writer, 0),
        )
        self._changed()
        return True

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()
