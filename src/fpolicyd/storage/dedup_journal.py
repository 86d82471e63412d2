"""The dedup journal: every claim of the reader's dedup window, on disk, so the window survives a restart.

The reader claims an event's key in memory (:class:`~fpolicyd.pipeline.dedup_window.DedupWindow`) and stores the
event in the spool; the pipeline then hands the claim — the key and the spool sequence number of its record — to
this journal, which is written and fsynced with the spool's own group commit (:meth:`flush` on the loop,
:meth:`sync` on the commit thread). At start the window is rebuilt from the journal (:meth:`DedupJournal.open`
returns the claims, newest last) and from the spool records after the journal's last claim: a crash between the
spool's fsync and the journal's loses nothing, because those records are still in the spool (the pipeline never
lets the spool remove a record whose claim is not durable in the journal — :attr:`durable_seq`).

Format: segment files ``claims-<number of the first claim, 20 digits>.log``; a 16-byte header (``FPDCLAIM``,
version u32, crc32 of the first 12 bytes), then blocks ``u32 count | u32 crc32(rest) | f64 claimed at (epoch s) |
count × (u64 seq | 16-byte key)``, little endian, one block per socket read. A torn or corrupt block ends its
segment (the segment is cut there; later segments are still read). A segment is removed once none of its claims
can still be in the window: more than ``max_entries`` claims came after it, or its newest claim is older than
the time to live.

Single owner (the event loop) for :meth:`append`/:meth:`flush`/:meth:`retire`; :meth:`sync` may run on a worker
thread meanwhile (it fsyncs a dup'ed descriptor taken under a lock, as the spool does).

A full disk (ENOSPC/EDQUOT) never loses a claim: :meth:`append` only buffers (a new segment is named there but its
file is created by the next :meth:`flush`), and a :meth:`flush` the disk refuses raises a retriable
:class:`JournalError` with every unwritten byte still buffered, so the same flush can be tried again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fpolicyd.errors import DISK_FULL_ERRNOS, FpolicydError

__all__ = ["CLAIM_BYTES", "DedupJournal", "JournalError", "JournalRecovery"]

_MAGIC: Final = b"FPDCLAIM"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sI")
_HEADER_BYTES: Final = _HEADER.size + 4
_BLOCK: Final = struct.Struct("<IId")
_CLAIM: Final = struct.Struct("<Q16s")
#: Bytes per claim on disk (seq + key).
CLAIM_BYTES: Final = _CLAIM.size
_NAME: Final = re.compile(r"claims-(\d{20})\.log")
#: A block larger than this is corrupt (a socket read never holds a million notifications).
_MAX_BLOCK_CLAIMS: Final = 1_000_000


class JournalError(FpolicydError):
    """The journal could not be written. ``retriable``: a full disk (try again once space frees); else fatal."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable
        #: Retriable journal errors are exactly the full-disk ones.
        self.disk_full = retriable


def _error(action: str, exc: OSError) -> JournalError:
    return JournalError(f"dedup journal {action}: {exc.strerror or exc}", retriable=exc.errno in DISK_FULL_ERRNOS)


@dataclass(frozen=True, slots=True)
class JournalRecovery:
    #: Claims read back, oldest first: (spool seq, key, claimed at).
    claims: tuple[tuple[int, int, float], ...]
    #: Bytes cut from segments (a torn tail after a crash, or corruption).
    cut_bytes: int
    segments: int


@dataclass(slots=True)
class _Segment:
    path: Path
    first_claim: int
    claims: int = 0
    newest_at: float = 0.0


def _header() -> bytes:
    head = _HEADER.pack(_MAGIC, _VERSION)
    return head + struct.pack("<I", zlib.crc32(head))


class DedupJournal:
    """Append-only claims of the dedup window, in segment files under ``directory``."""

    def __init__(self, directory: Path, *, segment_claims: int, max_entries: int, ttl_s: float) -> None:
        self.directory = directory
        self.segment_claims = segment_claims
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._segments: list[_Segment] = []
        #: The descriptor of :attr:`_open` (the newest segment that has a file), or -1.
        self._fd = -1
        self._open: _Segment | None = None
        #: Blocks not yet handed to the kernel, per segment, oldest first.
        self._chunks: list[tuple[_Segment, bytearray]] = []
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        #: Descriptors of rolled segments not yet fsynced (closed by the next sync).
        self._retired_fds: list[int] = []
        self._claims_total = 0
        #: Highest spool seq handed to :meth:`append`, written to the kernel (:meth:`flush`), made durable.
        self._appended_seq = 0
        self._written_seq = 0
        self._durable_seq = 0
        self._sync_target = 0

    # ---------------------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls, directory: Path, *, segment_claims: int, max_entries: int, ttl_s: float
    ) -> tuple[DedupJournal, JournalRecovery]:
        journal = cls(directory, segment_claims=segment_claims, max_entries=max_entries, ttl_s=ttl_s)
        return journal, journal._recover()

    def _recover(self) -> JournalRecovery:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            names = sorted(
                (p, int(m.group(1))) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name)) is not None
            )
        except OSError as exc:
            raise JournalError(f"dedup journal {self.directory}: {exc.strerror or exc}", retriable=False) from exc
        claims: list[tuple[int, int, float]] = []
        cut = 0
        for path, first in names:
            segment = _Segment(path, max(first, self._claims_total))
            data = path.read_bytes()
            good = self._read_segment(data, segment, claims)
            if good < len(data):
                cut += len(data) - good
                if good < _HEADER_BYTES:
                    path.unlink()
                    continue
                with open(path, "r+b") as handle:
                    handle.truncate(good)
                    os.fsync(handle.fileno())
            self._segments.append(segment)
            self._claims_total = segment.first_claim + segment.claims
        if self._segments:
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._open = last
        if claims:
            self._appended_seq = self._written_seq = self._durable_seq = max(seq for seq, _, _ in claims)
        return JournalRecovery(tuple(claims), cut, len(self._segments))

    @staticmethod
    def _read_segment(data: bytes, segment: _Segment, out: list[tuple[int, int, float]]) -> int:
        """Append the segment's valid claims to ``out``; the length of its valid prefix."""
        if len(data) < _HEADER_BYTES or data[:_HEADER_BYTES] != _header():
            return 0
        pos = _HEADER_BYTES
        end = len(data)
        while pos + _BLOCK.size <= end:
            count, crc, at = _BLOCK.unpack_from(data, pos)
            body_start = pos + _BLOCK.size
            body_end = body_start + count * CLAIM_BYTES
            if count == 0 or count > _MAX_BLOCK_CLAIMS or body_end > end:
                break
            if zlib.crc32(data[pos + 8 : body_end]) != crc:
                break
            for offset in range(body_start, body_end, CLAIM_BYTES):
                seq, key = _CLAIM.unpack_from(data, offset)
                out.append((seq, int.from_bytes(key, "big"), at))
            segment.claims += count
            segment.newest_at = max(segment.newest_at, at)
            pos = body_end
        return pos

    # ---------------------------------------------------------------------------------------- write

    def append(self, claimed_at: float, claims: Sequence[tuple[int, int]]) -> None:
        """Claims ``(spool seq, key)`` of one read, all made at ``claimed_at`` (epoch seconds). In memory only
        (never raises for the disk: a new segment's file is created by the next :meth:`flush`)."""
        if not claims:
            return
        if not self._segments or self._segments[-1].claims >= self.segment_claims:
            first = self._claims_total
            self._segments.append(_Segment(self.directory / f"claims-{first:020d}.log", first))
        segment = self._segments[-1]
        body = b"".join([_CLAIM.pack(seq, key.to_bytes(16, "big")) for seq, key in claims])
        head = struct.pack("<d", claimed_at) + body
        block = struct.pack("<II", len(claims), zlib.crc32(head)) + head
        chunks = self._chunks
        if chunks and chunks[-1][0] is segment:
            chunks[-1][1].extend(block)
        else:
            chunks.append((segment, bytearray(block)))
        self._appended_seq = max(self._appended_seq, claims[-1][0])
        self._claims_total += len(claims)
        segment.claims += len(claims)
        segment.newest_at = claimed_at

    def _open_segment(self, segment: _Segment) -> None:
        """Create ``segment``'s file with its header; it becomes the one written (the previous descriptor goes to
        the next sync). On failure nothing is left behind and the same call can be made again."""
        path = segment.path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _error(f"create {path}", exc) from exc
        try:
            DedupJournal._write(fd, bytearray(_header()))
        except JournalError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with self._lock:
            if self._fd >= 0:
                self._retired_fds.append(self._fd)
            self._fd = fd
        self._open = segment

    def flush(self) -> None:
        """Hand the buffer to the kernel (once per loop iteration, with the spool's flush). Raises
        :class:`JournalError` (retriable for a full disk) with what was not written still buffered."""
        chunks = self._chunks
        while chunks:
            segment, data = chunks[0]
            if segment is not self._open:
                self._open_segment(segment)
            self._write(self._fd, data)
            chunks.pop(0)
        self._written_seq = self._appended_seq

    @staticmethod
    def _write(fd: int, data: bytearray) -> None:
        """Write ``data``, consuming it as it goes: on failure what was written stays (blocks are checksummed; a
        partial block is cut at the next open) and the rest is left in ``data`` to be written again."""
        try:
            while data:
                written = os.write(fd, data)
                if written <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                del data[:written]
        except OSError as exc:
            raise _error("write", exc) from exc

    def sync(self) -> None:
        """fsync what :meth:`flush` wrote (may run on a worker thread)."""
        with self._sync_lock:
            with self._lock:
                target = self._written_seq
                if target <= self._durable_seq and not self._retired_fds:
                    return
                fds = [os.dup(self._fd)] if self._fd >= 0 else []
                retired, self._retired_fds = self._retired_fds, []
            try:
                for fd in [*retired, *fds]:
                    os.fsync(fd)
            except OSError as exc:
                raise JournalError(f"dedup journal fsync: {exc.strerror or exc}", retriable=False) from exc
            finally:
                for fd in [*retired, *fds]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._durable_seq = max(self._durable_seq, target)

    @property
    def durable_seq(self) -> int:
        """Every claim of a spool record up to this seq is durable here (the spool may forget those records)."""
        return self._durable_seq

    @property
    def buffered(self) -> bool:
        return bool(self._chunks)

    @property
    def sync_pending(self) -> bool:
        """Claims written to the kernel and not yet fsynced."""
        return self._written_seq > self._durable_seq or bool(self._retired_fds)

    def retire(self, now_s: float) -> int:
        """Remove segments none of whose claims can still be in the window; how many."""
        removed = 0
        cutoff = now_s - self.ttl_s
        while len(self._segments) > 1:
            oldest = self._segments[0]
            if any(segment is oldest for segment, _ in self._chunks) or oldest is self._open:
                break  # still being written
            after = self._claims_total - (oldest.first_claim + oldest.claims)
            if after < self.max_entries and oldest.newest_at >= cutoff:
                break
            with contextlib.suppress(FileNotFoundError):
                oldest.path.unlink()
            self._segments.pop(0)
            removed += 1
        return removed

    @property
    def segments(self) -> int:
        return len(self._segments)

    def close(self) -> None:
        with self._lock:
            fds = [*self._retired_fds, *([self._fd] if self._fd >= 0 else [])]
            self._retired_fds = []
            self._fd = -1
            self._open = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
