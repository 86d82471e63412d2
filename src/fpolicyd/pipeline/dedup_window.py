"""Exact dedup in the reader: an in-memory window of recent event-id keys, bounded by count and age (sans-IO).

An event's key is its ``event_id`` (a UUIDv5) as a 128-bit int, so two different ids never share a key. (A
64-bit key would, with 1 M keys held, wrongly suppress a genuine event about once in 3·10¹² events — a silent
loss a regulated user must never see; the extra 64 bits cost 8 bytes per key.)

:meth:`DedupWindow.claim` is one set lookup (and one insert for a new key), cheap enough for the reader, which
asks it for every notification before the event is stored: a key already held is a duplicate. Keys leave in
the order they came (first seen first out) when they are older than ``ttl_s`` or when more than
``max_entries`` are held. A duplicate never extends its key's life: the window is exactly "claims made in the
last ``ttl_s``, at most ``max_entries`` of them", the rule of the embedded store it replaces.

Restart safety is the caller's: every claim is written to the dedup journal (``storage/dedup_journal.py``)
with the spool sequence number of its record, and the window is rebuilt at start from the journal and the
spool records after it (:meth:`load`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fpolicyd.errors import ConfigError

__all__ = ["KEY_BYTES", "DedupWindow", "WindowStats", "key_of_digest", "key_of_event_id"]

#: Bytes of a key (128 bits of the event id).
KEY_BYTES: Final = 16


def key_of_event_id(event_id: str) -> int:
    """The key of an event: its ``event_id`` UUID as a 128-bit int."""
    return int(event_id.replace("-", ""), 16)


#: The UUIDv5 layout applied to the first 128 bits of a SHA-1 digest: version nibble 5, variant bits 10.
_VERSION_CLEAR: Final = ~(0xF << 76)
_VERSION_5: Final = 0x5 << 76
_VARIANT_CLEAR: Final = ~(0x3 << 62)
_VARIANT_RFC4122: Final = 0x2 << 62


def key_of_digest(hex_digest: str) -> int:
    """The same key from the SHA-1 hex digest the id was made of (:class:`~fpolicyd.events.EventBuilder`),
    without formatting and re-parsing the id: ``key_of_digest(d) == key_of_event_id(id made of d)``."""
    return (int(hex_digest[:32], 16) & _VERSION_CLEAR | _VERSION_5) & _VARIANT_CLEAR | _VARIANT_RFC4122


@dataclass(frozen=True, slots=True)
class WindowStats:
    held: int
    claims: int
    duplicates: int
    expired: int
    evicted: int


class DedupWindow:
    """Recent keys, first seen first out. Not thread-safe: one owner (the event loop)."""

    __slots__ = ("_held", "_keys", "_marks", "claims", "duplicates", "evicted", "expired", "max_entries", "ttl_s")

    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        if max_entries < 1:
            raise ConfigError("the dedup window must hold at least 1 key")
        if ttl_s <= 0:
            raise ConfigError("the dedup window's time to live must be > 0 s")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._held: set[int] = set()
        #: Keys in claim order, and per claim batch ``[claimed at (s), keys in it]`` (a batch shares its time).
        self._keys: deque[int] = deque()
        self._marks: deque[list[float]] = deque()
        self.claims = 0
        self.duplicates = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return key in self._held

    def claim(self, key: int, now_s: float) -> bool:
        """True: the key was not held and now is (first seen). False: a duplicate (nothing changes)."""
        held = self._held
        if key in held:
            self.duplicates += 1
            return False
        held.add(key)
        self._keys.append(key)
        marks = self._marks
        if marks and marks[-1][0] == now_s:
            marks[-1][1] += 1
        else:
            marks.append([now_s, 1])
        self.claims += 1
        if len(held) > self.max_entries:
            self._evict(len(held) - self.max_entries)
        return True

    def release(self, key: int) -> None:
        """Forget the newest claim, ``key`` (its event could not be stored after all: claim it again later)."""
        if self._keys and self._keys[-1] == key:
            self._keys.pop()
            self._held.discard(key)
            self.claims -= 1
            mark = self._marks[-1]
            mark[1] -= 1
            if mark[1] <= 0:
                self._marks.pop()

    def expire(self, now_s: float) -> int:
        """Drop the keys claimed more than ``ttl_s`` ago; how many."""
        cutoff = now_s - self.ttl_s
        marks = self._marks
        dropped = 0
        while marks and marks[0][0] < cutoff:
            _, count = marks.popleft()
            dropped += self._pop(int(count))
        self.expired += dropped
        return dropped

    def _evict(self, n: int) -> None:
        marks = self._marks
        left = n
        while left > 0 and marks:
            head = marks[0]
            take = min(left, int(head[1]))
            head[1] -= take
            if head[1] <= 0:
                marks.popleft()
            self._pop(take)
            left -= take
        self.evicted += n

    def _pop(self, n: int) -> int:
        keys, held = self._keys, self._held
        for _ in range(n):
            held.discard(keys.popleft())
        return n

    def load(self, claims: Iterable[tuple[int, float]], now_s: float) -> None:
        """Rebuild from stored claims ``(key, claimed at)`` in claim order (journal, then spool tail); claims
        older than the time to live are skipped, and at most ``max_entries`` of the newest are kept."""
        cutoff = now_s - self.ttl_s
        for key, at in claims:
            if at < cutoff or key in self._held:
                continue
            self._held.add(key)
            self._keys.append(key)
            marks = self._marks
            if marks and marks[-1][0] == at:
                marks[-1][1] += 1
            else:
                marks.append([at, 1])
            if len(self._held) > self.max_entries:
                self._evict(len(self._held) - self.max_entries)
        self.evicted = 0

    def stats(self) -> WindowStats:
        return WindowStats(len(self._keys), self.claims, self.duplicates, self.expired, self.evicted)
