"""Disk-full episodes of the daemon's local writers (sans-IO: every call takes ``now``; it stores nothing).

Durability contract of every writer in this package when the disk is full: nothing already written is lost and
nothing is half-written; the refused write is kept (in memory or in the spool) and tried again.

A writer that meets ENOSPC/EDQUOT keeps what it could not write (in memory or in the spool), reports
:meth:`DiskFull.full` and tries the same write again later (:class:`DiskRetry`); once a write goes through it
reports :meth:`DiskFull.freed`. While any writer is full the daemon stops reading its sockets (TCP back-pressure
to ONTAP, as at a full spool) and ``/readyz`` fails with the writers named. An *episode* is the time from a
writer's first refused write to its next successful one: it is logged once when it starts and once when it ends,
whatever the number of retries in between.

Writers are a closed set (:class:`Writer`) plus one per file-writing sink (:func:`sink_writer`): the metric label
``writer`` never carries anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

__all__ = ["SINK_PREFIX", "DiskFull", "DiskRetry", "Episode", "Writer", "sink_writer"]


class Writer(StrEnum):
    """The daemon's own writers (a sink's writer is :func:`sink_writer`)."""

    #: Spool segments (buffer flush, segment roll).
    spool = "spool"
    #: The spool's cursor checkpoint (``cursors.json``).
    spool_cursors = "spool_cursors"
    #: The reader's exact-dedup journal.
    dedup_journal = "dedup_journal"
    #: The embedded SQLite dedup store (window mode).
    dedup_store = "dedup_store"
    #: The dedup audit ledger (the stage's and the reader's).
    ledger = "ledger"
    #: The processing stage's state file.
    processor_state = "processor_state"


SINK_PREFIX: Final = "sink:"


def sink_writer(sink: str) -> str:
    """The writer name of a sink (its configured name, e.g. ``jsonl:/data/events``)."""
    return f"{SINK_PREFIX}{sink}"


@dataclass(frozen=True, slots=True)
class Episode:
    """One writer's current disk-full episode: since when, and the error that started it."""

    writer: str
    since: float
    error: str


@dataclass(frozen=True, slots=True)
class DiskRetry:
    """How long a writer waits before trying a refused write again: ``initial_s`` doubling per attempt up to
    ``max_s`` (no jitter: one local disk, no herd to spread)."""

    initial_s: float = 0.1
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial_s) and self.initial_s > 0):
            raise ValueError(f"initial_s: must be a positive number of seconds, got {self.initial_s}")
        if not (math.isfinite(self.max_s) and self.max_s >= self.initial_s):
            raise ValueError(f"max_s: must be a number of seconds >= initial_s ({self.initial_s}), got {self.max_s}")

    def delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th refused write in a row (0 = the first)."""
        if attempt < 0:
            raise ValueError(f"attempt: must be >= 0, got {attempt}")
        if attempt >= 64:
            return self.max_s
        return min(self.max_s, self.initial_s * (2.0**attempt))


class DiskFull:
    """Which writers are in a disk-full episode, and what they counted. Single owner (the event loop); the
    counters and :attr:`active` may be read from another thread (one C-level dict copy)."""

    def __init__(self) -> None:
        self._active: dict[str, Episode] = {}
        #: Writes refused for want of space, by writer (every refused attempt).
        self.errors: dict[str, int] = {}
        #: Episodes started, by writer.
        self.episodes: dict[str, int] = {}
        #: Seconds spent in finished episodes, by writer.
        self.full_seconds: dict[str, float] = {}

    @property
    def active(self) -> Mapping[str, Episode]:
        """The writers now full (a snapshot)."""
        return MappingProxyType(dict(self._active))

    @property
    def any(self) -> bool:
        return bool(self._active)

    def is_full(self, writer: str) -> bool:
        return writer in self._active

    def full(self, writer: str, error: str, now: float) -> Episode | None:
        """``writer`` was refused a write; returns the episode if this starts one (None: it goes on)."""
        self.errors[writer] = self.errors.get(writer, 0) + 1
        if writer in self._active:
            return None
        episode = Episode(writer, now, error)
        self._active[writer] = episode
        self.episodes[writer] = self.episodes.get(writer, 0) + 1
        return episode

    def freed(self, writer: str, now: float) -> tuple[Episode, float] | None:
        """A write of ``writer`` went through; returns the episode it ends and its length (None: none was on)."""
        episode = self._active.pop(writer, None)
        if episode is None:
            return None
        lasted = max(0.0, now - episode.since)
        self.full_seconds[writer] = self.full_seconds.get(writer, 0.0) + lasted
        return episode, lasted
