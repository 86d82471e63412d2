"""Spool: the local, checksummed, append-only write-ahead log every event goes through before it is routed.

What it stores: segment files ``spool-<first seq, 20 digits>.seg`` (a 24-byte header ``FPDSPOOL``, version, first
seq, crc32; then records ``u32 length | u32 crc32(payload) | u64 seq | payload``, little endian, one JSON event
per payload), the sinks' acked positions in ``cursors.json`` and a ``spool.lock``.

Durability contract:

- :meth:`Spool.append` / :meth:`~Spool.append_many` only buffer; :meth:`~Spool.flush` hands the buffer to the
  kernel in one write; :meth:`~Spool.sync` (on a worker thread, dup'ed descriptors, may overlap appends) makes it
  durable and advances ``durable_seq``. Under ``spool_fsync = "never"`` durable means handed to the kernel.
- :meth:`~Spool.read` returns only durable records, so no sink is handed an event an OS crash could take back.
- Acked positions are cumulative per sink and persisted by :meth:`~Spool.checkpoint` (temp file, fsync, rename,
  fsync directory); out-of-order acks are not, so after a crash they are delivered again (at least once).
- A segment is removed only once every sink has acked past it and a later record is durable: a seq any sink may
  have seen is never given to another event, across restarts too.
- :meth:`~Spool.open` recovers: a torn tail of the last segment is cut, a corrupt record in an older one cuts that
  segment only (``records_lost``), a file with an invalid header is renamed ``*.corrupt`` and left for an
  operator, and everything kept is fsynced before open returns.

Single owner and clock-free: the owner thread (the event loop) appends, flushes, reads and acks; only
:meth:`~Spool.sync` and :meth:`~Spool.checkpoint` may run on a worker thread. Measurements (why segment files and
not SQLite, throughput, per-event cost): docs/architecture.md (Storage).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import struct
import threading
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from isal import isal_zlib

from fpolicyd.errors import DISK_FULL_ERRNOS, ConfigError, FpolicydError
from fpolicyd.pipeline.records import Record
from fpolicyd.storage.closing import ClosedOnExit
from fpolicyd.storage.faults import FsyncFault
from fpolicyd.storage.shard import Shard

__all__ = [
    "ReadPosition",
    "RecoveryReport",
    "Spool",
    "SpoolCorruptError",
    "SpoolError",
    "SpoolFsync",
    "SpoolFullError",
    "SpoolIOError",
    "SpoolSettings",
    "SpoolTail",
]

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_DIR_MODE = 0o750
_FILE_MODE = 0o640
_MAGIC = b"FPDSPOOL"
_VERSION = 1
_SEG_HEADER = struct.Struct("<8sIQI")  # magic, version, first seq, crc32 of the 20 bytes before it
_REC_HEADER = struct.Struct("<IIQ")  # payload length, crc32 of the payload, seq
_SEG_HDR = _SEG_HEADER.size
_REC_HDR = _REC_HEADER.size
#: What the spool adds to each record's payload on disk (sizing: ``benchmarks/spool_sizing.py``).
RECORD_HEADER_BYTES = _REC_HDR
_SEG_RE = re.compile(r"spool-(\d{20})\.seg")
_CURSORS = "cursors.json"
_CURSORS_TMP = "cursors.json.tmp"
_LOCK = "spool.lock"
_MAX_PAYLOAD = 2**32 - 1
_MAX_SEQ = 2**64 - 1
_MIN_SEGMENT_BYTES = 64
# A (seq, offset) pair is kept every this many bytes of a segment, so finding a seq (rewind) scans at most this.
_INDEX_STRIDE = 1 * _MIB
_SCAN_CHUNK = 1 * _MIB
_READ_CHUNK = 256 * _KIB
_WRITE_OPEN = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
_READ_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
# fdatasync skips the inode timestamps; an append's new size is still flushed. macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)
#: CRC-32 (IEEE, zlib's: the same value for the same bytes and start) by ISA-L: 55 against 370 ns for a 1.2 KB event
#: (benchmarks/bench_spool.py), once when the reader stores it and once per read of it.
_crc32 = isal_zlib.crc32
#: ``Record(seq, payload)`` as ``_new_record(Record, (seq, payload))``: the same tuple without the NamedTuple's
#: Python-level ``__new__`` (a frame per record on the read loops).
_new_record = tuple.__new__

# Errors that may clear up by themselves (space freed, quota raised): the caller may retry the same call.
_RETRIABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)


class SpoolError(FpolicydError):
    """The spool could not do what was asked."""


class SpoolFullError(SpoolError):
    """Appending would take the spool past ``max_bytes``. Nothing was appended; nothing was dropped."""

    def __init__(self, needed: int, size: int, limit: int) -> None:
        self.needed = needed
        self.size = size
        self.limit = limit
        super().__init__(f"spool full: {needed} more bytes would take {size} past max_bytes={limit}")


class SpoolIOError(SpoolError):
    """A file operation failed. ``retriable`` says whether the same call may succeed later (disk space).

    A failed fsync is never retriable: the page cache may have dropped the data (Linux marks it clean), so the
    spool refuses further writes and the process should restart, which recovers from what is on disk.
    """

    def __init__(self, message: str, *, retriable: bool, disk_full: bool = False) -> None:
        self.retriable = retriable
        #: The write was refused for want of space (ENOSPC/EDQUOT).
        self.disk_full = disk_full
        super().__init__(message)


class SpoolCorruptError(SpoolError):
    """A record read back after recovery failed its checks: the disk changed under us."""


def _io_error(action: str, path: Path | str, exc: OSError, *, retriable: bool | None = None) -> SpoolIOError:
    code = errno.errorcode.get(exc.errno, "?") if exc.errno is not None else "?"
    if retriable is None:
        retriable = exc.errno in _RETRIABLE_ERRNOS
    return SpoolIOError(
        f"spool: cannot {action} {path}: [{code}] {exc.strerror or exc}",
        retriable=retriable,
        disk_full=retriable and exc.errno in DISK_FULL_ERRNOS,
    )


class SpoolFsync(StrEnum):
    """When records become durable.

    ``group``: the caller syncs ``group_commit_s`` after data became pending, covering everything flushed by
    then (one fsync for many events). ``always``: the caller syncs as soon as a flush made data pending (one
    sync at a time, so bursts still share an fsync). ``never``: no fsync at all; a record counts as durable
    once handed to the kernel (survives a process crash, not an OS crash).
    """

    group = "group"
    always = "always"
    never = "never"


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """Where the spool lives and how much it may hold. ``max_bytes`` is a hard limit: appends past it raise
    :class:`SpoolFullError` (back-pressure is meant to stop ingest well before that). ``checkpoint_interval_s``
    is how often the caller should persist cursors; the spool itself keeps no time."""

    directory: Path
    segment_bytes: int = 64 * _MIB
    max_bytes: int = 10 * _GIB
    fsync: SpoolFsync = SpoolFsync.group
    group_commit_s: float = 0.005
    checkpoint_interval_s: float = 0.2
    #: Test-only fault injection (storage/faults.py): None in production.
    fsync_fault: FsyncFault | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.directory, Path):
            raise ConfigError(f"spool.directory: expected a Path, got {type(self.directory).__name__}")
        for name in ("segment_bytes", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"spool.{name}: expected an int, got {value!r}")
        if self.segment_bytes < _MIN_SEGMENT_BYTES:
            raise ConfigError(f"spool.segment_bytes: must be at least {_MIN_SEGMENT_BYTES}, got {self.segment_bytes}")
        if self.max_bytes < self.segment_bytes:
            raise ConfigError(
                f"spool.max_bytes: must be at least segment_bytes ({self.segment_bytes}), got {self.max_bytes}"
            )
        try:
            policy = SpoolFsync(self.fsync)
        except ValueError:
            raise ConfigError(
                f"spool.fsync: must be one of {[p.value for p in SpoolFsync]}, got {self.fsync!r}"
            ) from None
        object.__setattr__(self, "fsync", policy)
        for name in ("group_commit_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"spool.{name}: must be a non-negative number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`Spool.open` found and repaired, for the caller to log and count.

    ``torn_bytes``: cut from the end of the last segment (a crash mid-write) plus files too short to hold a
    header. ``corrupt_bytes``: cut from older segments at a bad record, plus quarantined files.
    ``records_lost``: seqs known to be lost to corruption in older segments (torn tails were never durable,
    so they are not counted). ``cursors``: acked seq per configured sink after recovery.
    """

    segments_found: int
    segments_removed: int
    quarantined: tuple[str, ...]
    records_recovered: int
    torn_bytes: int
    corrupt_bytes: int
    records_lost: int
    cursors: Mapping[str, int]
    new_sinks: tuple[str, ...]
    dropped_sinks: tuple[str, ...]
    cursors_reset: bool
    next_seq: int


@dataclass(slots=True, eq=False)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int  # first_seq - 1 while empty; includes records still in the write buffer
    size: int  # bytes in the file (header included), i.e. flushed
    ord_base: int  # records in all earlier segments since open: makes records_pending a subtraction
    idx_seqs: list[int] = field(default_factory=list)
    idx_offs: list[int] = field(default_factory=list)
    next_idx_off: int = 0
    rfd: int | None = None
    deleted: bool = False

    def index(self, seq: int, offset: int) -> None:
        self.idx_seqs.append(seq)
        self.idx_offs.append(offset)
        self.next_idx_off = offset + _INDEX_STRIDE


@dataclass(slots=True, eq=False)
class _Cursor:
    acked: int
    acked_ord: int
    seg: _Segment
    offset: int  # read position: file offset of next_seq in seg
    next_seq: int
    hi_read: int  # highest seq ever handed out by read(): acks beyond it are a caller bug
    pending: dict[int, int] = field(default_factory=dict)  # out-of-order acked ranges, first -> last
    #: False when ``seg``/``offset`` are stale and ``next_seq`` is only where reading resumes: the position is
    #: looked up (:meth:`Spool._locate`) at the next read, not at every ack that overtakes it.
    located: bool = True


class Spool(ClosedOnExit):
    """The write-ahead log. Build it with :meth:`open`; see the module docstring for threads and guarantees."""

    def __init__(self, settings: SpoolSettings, sinks: Sequence[str]) -> None:
        names = list(sinks)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"spool sinks: a sink name must be a non-empty string, got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"spool sinks: duplicate sink name in {names}")
        self._settings = settings
        self._dir = settings.directory
        self._never = settings.fsync is SpoolFsync.never
        self._sink_names = tuple(names)
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []
        self._cursors: dict[str, _Cursor] = {}
        self._buf = bytearray()
        self._wfd = -1
        self._dirfd = -1
        self._lockfd = -1
        self._next_seq = 1
        self._written_seq = 0
        self._durable_seq = 0
        self._disk_bytes = 0
        self._total_ord = 0
        self._unsynced_fds: list[int] = []
        self._dir_dirty = False
        self._cursors_dirty = False
        self._lock = threading.Lock()  # guards the hand-over of descriptors between owner and sync thread
        self._sync_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._failed: SpoolIOError | None = None
        self._fsync_fault = settings.fsync_fault
        self._syncs = 0  # syncs that reached the disk, for the test-only fault
        #: Records above this seq stay whatever the sinks acked (:meth:`retain_above`).
        self._retain_floor: int | None = None
        self._closed = True
        self.recovery: RecoveryReport | None = None

    # -- life cycle ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: SpoolSettings, sinks: Sequence[str]) -> Spool:
        """Lock the directory, recover every segment, restore the cursors; the report is ``spool.recovery``."""
        spool = cls(settings, sinks)
        try:
            spool.recovery = spool._recover()
        except BaseException:
            spool._release()
            raise
        spool._closed = False
        return spool

    def close(self) -> None:
        """Flush, sync (unless ``never``), checkpoint, release every descriptor. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.flush()
                self.sync()
                self.checkpoint()
        finally:
            self._closed = True
            with self._sync_lock, self._ckpt_lock:
                self._release()

    def abandon(self) -> None:
        """Drop every descriptor without flushing, syncing or checkpointing: exactly what a crash leaves behind
        (the write buffer is lost). For tests, and for giving up after a failed fsync before a restart."""
        self._closed = True
        self._buf.clear()
        with self._sync_lock, self._ckpt_lock:
            self._release()

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def settings(self) -> SpoolSettings:
        return self._settings

    @property
    def sinks(self) -> tuple[str, ...]:
        return self._sink_names

    @property
    def last_seq(self) -> int:
        """Highest seq appended (buffered or not); 0 before the first record ever."""
        return self._next_seq - 1

    @property
    def written_seq(self) -> int:
        """Highest seq handed to the kernel by :meth:`flush` (survives a process crash)."""
        return self._written_seq

    @property
    def durable_seq(self) -> int:
        """Highest seq known to be fsynced (under ``never``: handed to the kernel). Sync mode answers ONTAP
        once its event's seq is at or below this."""
        return self._durable_seq

    @property
    def buffered_bytes(self) -> int:
        """Bytes appended and not yet flushed."""
        return len(self._buf)

    @property
    def bytes_on_disk(self) -> int:
        """Bytes in the segment files (headers included), flushed data only."""
        return self._disk_bytes

    @property
    def size_bytes(self) -> int:
        """What the spool holds: ``bytes_on_disk`` plus the write buffer. ``max_bytes`` applies to this, and it
        is what back-pressure watermarks should compare against."""
        return self._disk_bytes + len(self._buf)

    @property
    def segments(self) -> int:
        return len(self._segments)

    @property
    def sync_pending(self) -> bool:
        """Whether :meth:`sync` has work to do (always False under ``never``)."""
        return not self._never and (
            self._written_seq > self._durable_seq or bool(self._unsynced_fds) or self._dir_dirty
        )

    @property
    def commit_delay(self) -> float | None:
        """How long after data becomes pending the caller should run :meth:`sync`: 0 for ``always``,
        ``group_commit_s`` for ``group``, None for ``never``."""
        policy = self._settings.fsync
        if policy is SpoolFsync.never:
            return None
        return 0.0 if policy is SpoolFsync.always else self._settings.group_commit_s

    @property
    def cursors_dirty(self) -> bool:
        """Whether acked positions changed since the last :meth:`checkpoint`."""
        return self._cursors_dirty

    def acked_seq(self, sink: str) -> int:
        """The sink's cumulative acked seq (everything at or below it was delivered)."""
        return self._cursor(sink).acked

    def read_seq(self, sink: str) -> int:
        """The next seq :meth:`read` would consider for the sink."""
        return self._cursor(sink).next_seq

    @property
    def oldest_segment_last_seq(self) -> int:
        """The last seq of the oldest segment: the records every consumer must be past before any space frees."""
        return self._segments[0].last_seq if self._segments else self.last_seq

    def records_pending(self, sink: str) -> int:
        """Records appended and not yet acked by the sink (its lag), buffered ones included."""
        return self._total_ord - self._cursor(sink).acked_ord

    @property
    def oldest_unacked_seq(self) -> int | None:
        """Smallest retained seq that some sink has not acked, or None when every sink is up to date."""
        floor = min((c.acked for c in self._cursors.values()), default=self.last_seq)
        seq = self._next_existing(floor + 1)
        return seq if seq is not None and seq <= self.last_seq else None

    # -- write path ----------------------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Buffer one event (no syscall unless the segment rolls) and return its seq.

        Raises :class:`SpoolFullError` when ``max_bytes`` would be exceeded (never blocks, never drops),
        ``ValueError`` for an empty or oversized payload, :class:`SpoolIOError` if a roll fails; on any error
        nothing was appended.
        """
        return self.append_many((payload,)).start

    def append_many(self, payloads: Sequence[bytes]) -> range:
        """Buffer a group of events and return their seqs; the next :meth:`flush` writes them with one ``write``.

        All or nothing: the group is checked against ``max_bytes`` as a whole and always lands in one segment
        (a roll happens before the group, never inside it, so a segment may exceed ``segment_bytes`` by one
        group).
        """
        self._check_usable()
        if not isinstance(payloads, list | tuple):
            payloads = list(payloads)  # walked twice below: a one-shot iterable would append nothing
        group = 0
        for i, payload in enumerate(payloads):
            n = len(payload)
            if n == 0 or n > _MAX_PAYLOAD:
                raise ValueError(f"payload {i} of the group: length must be within 1..{_MAX_PAYLOAD}, got {n}")
            group += _REC_HDR + n
        seq = self._next_seq
        if group == 0:
            return range(seq, seq)
        seg = self._segments[-1]
        logical = seg.size + len(self._buf)
        roll = seg.last_seq >= seg.first_seq and logical + group > self._settings.segment_bytes
        needed = group + (_SEG_HDR if roll else 0)
        size = self.size_bytes
        if size + needed > self._settings.max_bytes:
            raise SpoolFullError(needed, size, self._settings.max_bytes)
        if roll:
            self._roll()
            seg = self._segments[-1]
            logical = seg.size + len(self._buf)
        buf = self._buf
        pack = _REC_HEADER.pack
        crc = _crc32
        next_idx = seg.next_idx_off
        first = seq
        for payload in payloads:
            if logical >= next_idx:
                seg.index(seq, logical)
                next_idx = seg.next_idx_off
            n = len(payload)
            buf += pack(n, crc(payload), seq)
            buf += payload
            logical += _REC_HDR + n
            seq += 1
        self._next_seq = seq
        seg.last_seq = seq - 1
        self._total_ord += seq - first
        return range(first, seq)

    def flush(self) -> None:
        """Hand the write buffer to the kernel with one ``write`` (no fsync). Owner thread only.

        On failure the file is cut back to where it was and the buffer is kept, so a later flush retries
        without duplication (:class:`SpoolIOError`, ``retriable`` for a full disk).
        """
        self._check_usable()
        if not self._buf:
            return
        seg = self._segments[-1]
        before = seg.size
        data = self._buf
        try:
            done = os.write(self._wfd, data)
            while done < len(data):  # rare: only the remainder is copied
                n = os.write(self._wfd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                done += n
        except OSError as exc:
            try:
                os.ftruncate(self._wfd, before)
            except OSError as cut_exc:
                self._failed = _io_error("cut back a failed write to", seg.path, cut_exc, retriable=False)
                raise self._failed from exc
            raise _io_error("write to", seg.path, exc) from exc
        seg.size = before + len(data)
        self._disk_bytes += len(data)
        data.clear()
        # Written before published: a sync that sees the new written_seq started after the write completed.
        self._written_seq = seg.last_seq
        if self._never:
            self._durable_seq = self._written_seq

    def sync(self) -> int:
        """Make everything flushed so far durable; return ``durable_seq``. May run on a worker thread (see the
        module docstring). Under ``never`` it does nothing. A failed fsync fails the spool for good."""
        with self._sync_lock:
            if self._never or self._wfd < 0:  # nothing to do, or closed/abandoned
                return self._durable_seq
            if self._failed is not None:
                raise self._failed
            with self._lock:
                target = self._written_seq
                fds, self._unsynced_fds = self._unsynced_fds, []
                if target <= self._durable_seq and not fds and not self._dir_dirty:
                    return self._durable_seq
                fds.append(os.dup(self._wfd))
                dir_dirty, self._dir_dirty = self._dir_dirty, False
            try:
                if self._fsync_fault is not None:
                    self._fsync_fault.check(self._syncs)
                for fd in fds:
                    _datasync(fd)
                if dir_dirty:
                    os.fsync(self._dirfd)
            except OSError as exc:
                self._failed = _io_error("fsync", self._dir, exc, retriable=False)
                raise self._failed from exc
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._syncs += 1
            self._durable_seq = max(self._durable_seq, target)
            return self._durable_seq

    # -- delivery ------------------------------------------------------------------------------------------

    def read(self, sink: str, max_records: int = 1000, max_bytes: int = 1 * _MIB) -> list[Record]:
        """The sink's next durable records after its read position, at most ``max_records`` and ``max_bytes``
        of payload (but at least one record when one is available). Moves the read position, not the ack."""
        if max_records < 1 or max_bytes < 1:
            raise ValueError(f"max_records and max_bytes must be positive, got {max_records} and {max_bytes}")
        return self._read(self._cursor(sink), max_records, max_bytes)

    def scan(self, after_seq: int, max_records: int = 1000, max_bytes: int = 1 * _MIB) -> list[Record]:
        """Durable records after ``after_seq`` (at most ``max_records``/``max_bytes``, at least one), read without
        any sink's cursor: for rebuilding state from what the spool holds at start (the dedup window)."""
        if max_records < 1 or max_bytes < 1:
            raise ValueError(f"max_records and max_bytes must be positive, got {max_records} and {max_bytes}")
        if after_seq >= self._durable_seq or not self._segments:
            return []
        seg, offset, next_seq = self._locate(max(after_seq + 1, self._segments[0].first_seq))
        cursor = _Cursor(after_seq, 0, seg, offset, next_seq, after_seq)
        return self._read(cursor, max_records, max_bytes)

    def _read(self, c: _Cursor, max_records: int, max_bytes: int) -> list[Record]:
        limit = self._durable_seq
        out: list[Record] = []
        total = 0
        while len(out) < max_records and c.next_seq <= limit:
            seg = c.seg
            if seg.deleted or not c.located:
                self._move(c, *self._locate(c.next_seq))
                continue
            if c.next_seq > seg.last_seq:
                i = bisect_right(self._firsts, seg.first_seq)
                if i >= len(self._segments):
                    break
                nxt = self._segments[i]
                self._move(c, nxt, _SEG_HDR, nxt.first_seq)
                continue
            end_seq = min(limit, seg.last_seq)
            fd = self._rfd(seg)
            buf = _pread(fd, min(seg.size - c.offset, _READ_CHUNK), c.offset, seg.path)
            pos = 0
            while len(out) < max_records and c.next_seq <= end_seq:
                if pos + _REC_HDR > len(buf):
                    if pos == 0:
                        raise SpoolCorruptError(f"spool: {seg.path} ends inside record {c.next_seq}")
                    break
                length, crc, seq = _REC_HEADER.unpack_from(buf, pos)
                if seq != c.next_seq or length == 0:
                    raise SpoolCorruptError(f"spool: {seg.path} offset {c.offset}: expected record {c.next_seq}")
                stop = pos + _REC_HDR + length
                if stop > len(buf):
                    if pos > 0:
                        break
                    buf = _pread(fd, _REC_HDR + length, c.offset, seg.path)  # one record bigger than a chunk
                    if len(buf) < _REC_HDR + length:
                        raise SpoolCorruptError(f"spool: {seg.path} ends inside record {c.next_seq}")
                    continue
                if out and total + length > max_bytes:
                    return self._handed_out(c, out)
                payload = buf[pos + _REC_HDR : stop]
                if _crc32(payload) != crc:
                    raise SpoolCorruptError(f"spool: {seg.path} offset {c.offset}: record {seq} fails its checksum")
                out.append(Record(seq, payload))
                total += length
                c.offset += stop - pos
                c.next_seq = seq + 1
                pos = stop
        return self._handed_out(c, out)

    def ack(self, sink: str, up_to_seq: int) -> None:
        """Cumulative ack: every record of the sink at or below ``up_to_seq`` was delivered. Idempotent."""
        c = self._cursor(sink)
        if up_to_seq > c.hi_read:
            raise ValueError(f"sink {sink!r}: cannot ack {up_to_seq}, only {c.hi_read} was read")
        if up_to_seq > c.acked:
            self._advance(c, up_to_seq)

    def ack_range(self, sink: str, first: int, last: int) -> None:
        """Ack one batch, ``first..last``, possibly out of order: the cumulative ack moves only once every
        record before ``first`` is acked too; until then the range is held (in memory only)."""
        c = self._range_cursor(sink, first, last)
        if last > c.hi_read:
            raise ValueError(f"sink {sink!r}: cannot ack {first}..{last}, only {c.hi_read} was read")
        self._ack_range(c, first, last)

    def _range_cursor(self, sink: str, first: int, last: int) -> _Cursor:
        c = self._cursor(sink)
        if first > last:
            raise ValueError(f"sink {sink!r}: empty ack range {first}..{last}")
        return c

    def _ack_range(self, c: _Cursor, first: int, last: int) -> None:
        """Move the cumulative ack over ``first..last`` if everything before it is acked, else hold the range."""
        if last <= c.acked:
            return
        nxt = self._next_existing(c.acked + 1)
        if first <= (c.acked + 1 if nxt is None else nxt):
            self._advance(c, last)
        else:
            c.pending[first] = max(last, c.pending.get(first, last))

    def position(self, sink: str) -> ReadPosition:
        """Where the sink resumes: just after its acked position (for a reader in another process)."""
        c = self._cursor(sink)
        seg, offset, seq = self._locate(c.acked + 1)
        return ReadPosition(seg.first_seq, offset, seq)

    def ack_delivered(self, sink: str, up_to_seq: int) -> None:
        """Cumulative ack of records read by another process (:class:`SpoolTail`), which can only have read durable
        records. Idempotent; an ack beyond the durable seq is a caller bug."""
        c = self._cursor(sink)
        if up_to_seq > self._durable_seq:
            raise ValueError(f"sink {sink!r}: cannot ack {up_to_seq}, only {self._durable_seq} is durable")
        c.hi_read = max(c.hi_read, up_to_seq)
        if up_to_seq > c.acked:
            self._advance(c, up_to_seq)

    def ack_delivered_range(self, sink: str, first: int, last: int) -> None:
        """Records ``first..last``, read and delivered by another process (one shard's :class:`SpoolTail`, see
        :meth:`SpoolTail.take_delivered`), are delivered: possibly out of order, held in memory like
        :meth:`ack_range` until every record before ``first`` is delivered too (not persisted: after a crash they
        are delivered again). Idempotent; a range beyond the durable seq is a caller bug."""
        c = self._range_cursor(sink, first, last)
        if last > self._durable_seq:
            raise ValueError(f"sink {sink!r}: cannot ack {first}..{last}, only {self._durable_seq} is durable")
        c.hi_read = max(c.hi_read, last)
        self._ack_range(c, first, last)

    def available(self, sink: str) -> int:
        """Durable records :meth:`read` could hand out now (approximate across seq gaps between segments)."""
        return max(0, self._durable_seq - self._cursor(sink).next_seq + 1)

    def rewind(self, sink: str) -> None:
        """Move the sink's read position back to just after its acked position (a sink restart): everything
        not acked is read again. Held out-of-order acks are kept."""
        c = self._cursor(sink)
        self._move(c, *self._locate(c.acked + 1))

    def checkpoint(self) -> bool:
        """Persist the acked positions (temp file, fsync, rename, fsync directory; no fsync under ``never``).
        May run on a worker thread. Returns False when nothing changed since the last checkpoint."""
        with self._ckpt_lock:
            if self._closed and self._dirfd < 0:
                return False
            if not self._cursors_dirty:
                return False
            self._cursors_dirty = False  # before the snapshot: an ack racing with it marks it dirty again
            acked = {name: c.acked for name, c in list(self._cursors.items())}
            data = json.dumps({"version": 1, "acked": acked}, sort_keys=True).encode() + b"\n"
            try:
                self._write_cursors(data)
            except OSError as exc:
                self._cursors_dirty = True
                raise _io_error("write", self._dir / _CURSORS, exc) from exc
            return True

    # -- internals: recovery -------------------------------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        d = self._dir
        try:
            d.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self._lockfd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise _io_error("open", d, exc) from exc
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise SpoolError(f"spool: {d} is in use by another process") from exc
        try:
            self._dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            (d / _CURSORS_TMP).unlink(missing_ok=True)
            found = sorted(
                (int(m.group(1)), entry.name)
                for entry in os.scandir(d)
                if (m := _SEG_RE.fullmatch(entry.name)) is not None and entry.is_file(follow_symlinks=False)
            )
        except OSError as exc:
            raise _io_error("list", d, exc) from exc
        torn = corrupt = lost = removed = 0
        quarantined: list[str] = []
        changed = False

        # Pass 1: headers. Short files are torn creations; full but invalid headers are quarantined.
        candidates: list[tuple[Path, int, int]] = []  # path, first seq, size
        for first, name in found:
            path = d / name
            try:
                fd = os.open(path, _READ_OPEN)
                try:
                    size = os.fstat(fd).st_size
                    head = os.pread(fd, _SEG_HDR, 0)
                finally:
                    os.close(fd)
                if size < _SEG_HDR:
                    path.unlink()
                    torn += size
                    removed += 1
                    changed = True
                    continue
                magic, version, seq, crc = _SEG_HEADER.unpack(head)
                if magic != _MAGIC or crc != _crc32(head[:-4]) or version != _VERSION or seq != first or seq < 1:
                    os.replace(path, path.with_name(name + ".corrupt"))
                    quarantined.append(name)
                    corrupt += size
                    changed = True
                    continue
            except OSError as exc:
                raise _io_error("recover", path, exc) from exc
            candidates.append((path, first, size))

        # Pass 2: records. The first bad record cuts its segment.
        ordinal = 0
        for i, (path, first, size) in enumerate(candidates):
            is_last = i == len(candidates) - 1
            prev = self._segments[-1] if self._segments else None
            if prev is not None and first <= prev.last_seq:
                try:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                except OSError as exc:
                    raise _io_error("quarantine", path, exc) from exc
                quarantined.append(path.name)
                corrupt += size
                changed = True
                continue
            seg = _Segment(path, first, first - 1, _SEG_HDR, ordinal)
            seg.index(first, _SEG_HDR)
            try:
                fd = os.open(path, _READ_OPEN)
                try:
                    good = _scan(fd, size, seg)
                finally:
                    os.close(fd)
                if good < size:
                    with _open_fd(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW) as wfd:
                        os.ftruncate(wfd, good)
                    changed = True
                    if is_last:
                        torn += size - good
                    else:
                        corrupt += size - good
                        lost += max(0, candidates[i + 1][1] - (seg.last_seq + 1))
            except OSError as exc:
                raise _io_error("recover", path, exc) from exc
            seg.size = good
            ordinal += seg.last_seq - seg.first_seq + 1
            self._segments.append(seg)
            self._firsts.append(first)
            self._disk_bytes += good

        saved, reset = self._load_cursors()
        last_in_segments = self._segments[-1].last_seq if self._segments else 0
        self._next_seq = max(last_in_segments, max(saved.values(), default=0)) + 1
        if not self._segments or self._segments[-1].last_seq + 1 != self._next_seq:
            seg, self._wfd = self._create_segment(self._next_seq, ordinal)
            changed = True
        else:
            seg = self._segments[-1]
            try:
                self._wfd = os.open(seg.path, _WRITE_OPEN | os.O_NOFOLLOW)
            except OSError as exc:
                raise _io_error("open", seg.path, exc) from exc
        self._total_ord = ordinal
        self._written_seq = self._durable_seq = self._next_seq - 1

        if not self._never:  # what a process crash left in the page cache becomes durable before we build on it
            for s in self._segments:
                try:
                    with _open_fd(s.path, _READ_OPEN) as fd:
                        _datasync(fd)
                except OSError as exc:
                    raise _io_error("fsync", s.path, exc, retriable=False) from exc
            if changed:
                try:
                    os.fsync(self._dirfd)
                except OSError as exc:
                    raise _io_error("fsync", d, exc, retriable=False) from exc
            self._dir_dirty = False

        oldest_first = self._segments[0].first_seq
        new_sinks: list[str] = []
        for name in self._sink_names:
            acked = max(saved.get(name, 0), oldest_first - 1)
            if name not in saved:
                new_sinks.append(name)
            if acked != saved.get(name):
                self._cursors_dirty = True
            seg, offset, next_seq = self._locate(acked + 1)
            self._cursors[name] = _Cursor(acked, self._ordinal(acked), seg, offset, next_seq, hi_read=acked)
        dropped = sorted(set(saved) - set(self._sink_names))
        if dropped or reset:
            self._cursors_dirty = True
        self._collect()
        return RecoveryReport(
            segments_found=len(found),
            segments_removed=removed,
            quarantined=tuple(quarantined),
            records_recovered=self._total_ord,
            torn_bytes=torn,
            corrupt_bytes=corrupt,
            records_lost=lost,
            cursors={name: c.acked for name, c in self._cursors.items()},
            new_sinks=tuple(new_sinks),
            dropped_sinks=tuple(dropped),
            cursors_reset=reset,
            next_seq=self._next_seq,
        )

    def _load_cursors(self) -> tuple[dict[str, int], bool]:
        """Saved acked positions, and whether the file was there but unreadable (then every sink starts over
        at the oldest retained record: at least once, never lost)."""
        path = self._dir / _CURSORS
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}, False
        except OSError as exc:
            raise _io_error("read", path, exc) from exc
        try:
            doc = json.loads(raw)
            acked = doc["acked"]
            if doc.get("version") != 1 or not isinstance(acked, dict):
                return {}, True
            out: dict[str, int] = {}
            for name, seq in acked.items():
                if not isinstance(name, str) or isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                    return {}, True
                out[name] = seq
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}, True
        return out, False

    def _write_cursors(self, data: bytes) -> None:
        tmp = self._dir / _CURSORS_TMP
        with _open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if not self._never:
                os.fsync(fd)
        os.replace(tmp, self._dir / _CURSORS)
        if not self._never:
            os.fsync(self._dirfd)

    # -- internals: segments -------------------------------------------------------------------------------

    def _create_segment(self, first_seq: int, ord_base: int) -> tuple[_Segment, int]:
        if first_seq > _MAX_SEQ:
            raise SpoolError(f"spool: seq space exhausted at {first_seq}")
        path = self._dir / f"spool-{first_seq:020d}.seg"
        head = _MAGIC + struct.pack("<IQ", _VERSION, first_seq)
        head += struct.pack("<I", _crc32(head))
        try:
            fd = os.open(path, _WRITE_OPEN | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
        except OSError as exc:
            raise _io_error("create", path, exc) from exc
        try:
            if os.write(fd, head) != len(head):
                raise OSError(errno.EIO, "short write of a segment header")
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise _io_error("write header of", path, exc) from exc
        seg = _Segment(path, first_seq, first_seq - 1, _SEG_HDR, ord_base)
        seg.index(first_seq, _SEG_HDR)
        self._segments.append(seg)
        self._firsts.append(first_seq)
        self._disk_bytes += _SEG_HDR
        with self._lock:
            self._dir_dirty = not self._never
        return seg, fd

    def _roll(self) -> None:
        """Start a new segment: flush the old one's buffer, hand its descriptor to the next sync."""
        self.flush()
        old = self._segments[-1]
        _, fd = self._create_segment(self._next_seq, old.ord_base + old.last_seq - old.first_seq + 1)
        with self._lock:
            previous, self._wfd = self._wfd, fd
            if not self._never:
                self._unsynced_fds.append(previous)
        if self._never:
            os.close(previous)
        # The segment just closed may be acked already (everything in it was delivered before it filled up).
        with contextlib.suppress(SpoolIOError):  # a failed unlink is retried at the next ack
            self._collect()

    def collect(self) -> int:
        """Remove the leading segments every sink has acked past, as long as a later record is durable (then a
        crash cannot take away every trace of the seqs used so far, and seqs never repeat across restarts).
        Returns how many went. Runs by itself at open, on every ack that moves and at every roll; call it on the
        owner thread after a sync completes to get the space back without waiting for the next ack."""
        before = len(self._segments)
        self._collect()
        return before - len(self._segments)

    def retain_above(self, seq: int | None) -> None:
        """Keep every record above ``seq`` whatever the sinks acked (None: no such floor). The dedup journal
        sets it to the last record whose claim it holds durably, so that a record leaves the spool only once
        its claim can be rebuilt from the journal. Takes effect at the next :meth:`collect`."""
        self._retain_floor = seq

    def _collect(self) -> None:
        floor = min(min((c.acked for c in self._cursors.values()), default=self.last_seq), self._durable_seq - 1)
        if self._retain_floor is not None:
            floor = min(floor, self._retain_floor)
        segs = self._segments
        n = 0
        while n < len(segs) - 1 and segs[n].last_seq <= floor:
            seg = segs[n]
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._drop_front(n)
                raise _io_error("remove", seg.path, exc) from exc
            n += 1
        self._drop_front(n)

    def _drop_front(self, n: int) -> None:
        for seg in self._segments[:n]:
            seg.deleted = True
            self._disk_bytes -= seg.size
            self._close_rfd(seg)
        del self._segments[:n]
        del self._firsts[:n]

    def _rfd(self, seg: _Segment) -> int:
        if seg.rfd is None:
            try:
                seg.rfd = os.open(seg.path, _READ_OPEN)
            except OSError as exc:
                raise _io_error("open", seg.path, exc) from exc
        return seg.rfd

    def _close_rfd(self, seg: _Segment) -> None:
        if seg.rfd is not None:
            with contextlib.suppress(OSError):
                os.close(seg.rfd)
            seg.rfd = None

    # -- internals: positions ------------------------------------------------------------------------------

    def _cursor(self, sink: str) -> _Cursor:
        try:
            return self._cursors[sink]
        except KeyError:
            raise ValueError(f"unknown sink {sink!r}; configured: {list(self._sink_names)}") from None

    def _handed_out(self, c: _Cursor, out: list[Record]) -> list[Record]:
        if out and out[-1].seq > c.hi_read:
            c.hi_read = out[-1].seq
        return out

    def _move(self, c: _Cursor, seg: _Segment, offset: int, next_seq: int) -> None:
        old = c.seg
        c.seg, c.offset, c.next_seq, c.located = seg, offset, next_seq, True
        if old is not seg and old is not self._segments[-1] and all(o.seg is not old for o in self._cursors.values()):
            self._close_rfd(old)  # keeps open descriptors to the segments someone is reading

    def _next_existing(self, seq: int) -> int | None:
        """Smallest retained seq at or after ``seq`` (seqs may skip between segments), or None."""
        segs = self._segments
        i = bisect_right(self._firsts, seq) - 1
        if i >= 0 and seq <= segs[i].last_seq:
            return seq
        for seg in segs[max(i + 1, 0) :]:
            if seg.last_seq >= seg.first_seq:
                return seg.first_seq
        return None

    def _ordinal(self, seq: int) -> int:
        """How many records, counted since open, have a seq at or below ``seq``."""
        segs = self._segments
        i = bisect_right(self._firsts, seq) - 1
        if i < 0:
            return segs[0].ord_base
        seg = segs[i]
        return seg.ord_base + max(0, min(seq, seg.last_seq) - seg.first_seq + 1)

    def _locate(self, seq: int) -> tuple[_Segment, int, int]:
        """Read position (segment, offset, seq) of the first retained record at or after ``seq``; ``seq`` must
        not be past the flushed data (true of every ``acked + 1``)."""
        segs = self._segments
        i = bisect_right(self._firsts, seq) - 1
        if i < 0:
            return segs[0], _SEG_HDR, segs[0].first_seq
        seg = segs[i]
        if seq > seg.last_seq:
            if i + 1 < len(segs):
                return segs[i + 1], _SEG_HDR, segs[i + 1].first_seq
            return seg, seg.size + len(self._buf), seq
        j = bisect_right(seg.idx_seqs, seq) - 1
        s, off = seg.idx_seqs[j], seg.idx_offs[j]
        fd = self._rfd(seg)
        buf = b""
        base = off
        while s < seq:
            rel = off - base
            if rel + _REC_HDR > len(buf):
                base = off
                rel = 0
                buf = _pread(fd, min(_SCAN_CHUNK, seg.size - off), off, seg.path)
                if len(buf) < _REC_HDR:
                    raise SpoolCorruptError(f"spool: {seg.path} ends before record {seq}")
            length, _, rseq = _REC_HEADER.unpack_from(buf, rel)
            if rseq != s:
                raise SpoolCorruptError(f"spool: {seg.path} offset {off}: expected record {s}")
            off += _REC_HDR + length
            s += 1
        return seg, off, seq

    def _advance(self, c: _Cursor, up_to: int) -> None:
        c.acked = max(c.acked, up_to)
        while c.pending:
            nxt = self._next_existing(c.acked + 1)
            edge = c.acked + 1 if nxt is None else nxt
            ready = [first for first in c.pending if first <= edge]
            if not ready:
                break
            for first in ready:
                c.acked = max(c.acked, c.pending.pop(first))
        c.acked_ord = self._ordinal(c.acked)
        if c.next_seq <= c.acked:
            # The ack overtook the read position: after a rewind, or always when another process reads for the
            # sink (:meth:`ack_delivered`), where walking the records to the new position at every ack cost the
            # daemon ~4 % of its CPU. The position is looked up when this spool next reads for the sink.
            c.next_seq = c.acked + 1
            c.located = False
        self._cursors_dirty = True
        self._collect()

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise SpoolError("spool is closed")

    def _release(self) -> None:
        for seg in self._segments:
            self._close_rfd(seg)
        fds = [*self._unsynced_fds, self._wfd, self._dirfd, self._lockfd]
        self._unsynced_fds = []
        self._wfd = self._dirfd = self._lockfd = -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _pread(fd: int, n: int, offset: int, path: Path) -> bytes:
    try:
        return os.pread(fd, n, offset)
    except OSError as exc:
        raise _io_error("read", path, exc) from exc


def _scan(fd: int, size: int, seg: _Segment) -> int:
    """Check the records of a segment from its header on; fill ``seg``'s last seq and index. Returns the offset
    just after the last good record."""
    off = _SEG_HDR
    seq = seg.first_seq
    buf = b""
    base = off
    while off < size:
        rel = off - base
        if rel + _REC_HDR > len(buf):
            base, rel = off, 0
            buf = os.pread(fd, min(_SCAN_CHUNK, size - off), off)
            if len(buf) < _REC_HDR:
                break
        length, crc, rseq = _REC_HEADER.unpack_from(buf, rel)
        stop = off + _REC_HDR + length
        if rseq != seq or length == 0 or stop > size:
            break
        if rel + _REC_HDR + length > len(buf):
            base, rel = off, 0
            buf = os.pread(fd, max(_SCAN_CHUNK, _REC_HDR + length), off)
            if len(buf) < _REC_HDR + length:
                break
        with memoryview(buf) as view:
            ok = _crc32(view[rel + _REC_HDR : rel + _REC_HDR + length]) == crc
        if not ok:
            break
        if off >= seg.next_idx_off:
            seg.index(seq, off)
        seg.last_seq = seq
        seq += 1
        off = stop
    return off


@contextlib.contextmanager
def _open_fd(path: Path, flags: int, mode: int = 0o777) -> Iterator[int]:
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ReadPosition:
    """Where a sink resumes reading: the first seq it has not acked, the segment that holds it (by the segment's
    first seq, i.e. its file name) and the byte offset of that record (or of the end of the flushed data)."""

    segment_first_seq: int
    offset: int
    next_seq: int


# A SpoolTail batch's state (its third item): handed out and not yet acknowledged, acknowledged, or made of
# records another shard delivers (skipped by a sharded read: acknowledged from the start, never handed out).
_BATCH_OPEN = 0
_BATCH_ACKED = 1
_BATCH_SKIPPED = 2


@dataclass(slots=True, eq=False)
class _TailCursor:
    segment_first_seq: int
    offset: int
    next_seq: int
    fd: int = -1
    #: Ranges handed out by ``read`` (or skipped, on a sharded sink), in order, with their state (``_BATCH_*``).
    batches: list[list[int]] = field(default_factory=list)
    acked: int = 0
    #: A sharded sink's share; None for an unsharded one.
    shard: Shard | None = None
    #: A sharded sink's owned batches acknowledged since the last ``take_delivered``, in ack order.
    delivered: list[tuple[int, int]] = field(default_factory=list)


class SpoolTail:
    """Read-only delivery view of a spool owned by another process (the delivery process of ``fpolicyd serve``).

    It reads segment files from given positions up to the durable seq the owner announces (:meth:`advance`) —
    never beyond, so it sees exactly what an in-process sink would — and tracks acknowledgements per sink like
    :meth:`Spool.ack_range`, reporting the cumulative position (:meth:`acked_seq`) for the owner to record. It
    never writes, truncates or removes anything: recovery, retention and cursor persistence stay with the owner.
    Records are checked like :meth:`Spool.read` does (seq, length, CRC). Single-threaded.

    A sink named in ``shards`` is sharded: this tail delivers only the blocks of seqs its :class:`Shard` owns (one
    block at most per :meth:`read`). It skips the other shards' records, counting them as acknowledged, so its
    :meth:`acked_seq` still moves over everything; what its own sink delivered is told apart by
    :meth:`take_delivered`, for the owner's :meth:`Spool.ack_delivered_range`."""

    def __init__(
        self,
        directory: Path,
        positions: Mapping[str, tuple[int, ReadPosition]],
        durable_seq: int,
        shards: Mapping[str, Shard] | None = None,
    ) -> None:
        """``positions``: per sink, its acked seq and where to read next; ``shards``: the sharded sinks' shares."""
        self._dir = Path(directory)
        self._durable_seq = durable_seq
        self._cursors = {
            name: _TailCursor(pos.segment_first_seq, pos.offset, pos.next_seq, acked=acked)
            for name, (acked, pos) in positions.items()
        }
        for name, shard in (shards or {}).items():
            if not isinstance(shard, Shard):
                raise ValueError(f"sink {name!r}: expected a Shard, got {shard!r}")
            self._cursor(name).shard = shard

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    def advance(self, durable_seq: int) -> None:
        """The owner made everything up to ``durable_seq`` durable."""
        self._durable_seq = max(self._durable_seq, durable_seq)

    def read_seq(self, sink: str) -> int:
        return self._cursor(sink).next_seq

    def acked_seq(self, sink: str) -> int:
        return self._cursor(sink).acked

    def records_pending(self, sink: str) -> int:
        """Durable records after the sink's acked position (approximate across seq gaps between segments)."""
        return max(0, self._durable_seq - self._cursor(sink).acked)

    def available(self, sink: str) -> int:
        """Records :meth:`read` could hand out now: the durable ones from the read position on (approximate across
        seq gaps between segments), on a sharded sink only those its shard owns. 0 does not mean that the read
        position is at the durable seq: a sharded sink may still have other shards' records to skip."""
        c = self._cursor(sink)
        if c.shard is not None:
            return c.shard.owned_between(c.next_seq, self._durable_seq)
        return max(0, self._durable_seq - c.next_seq + 1)

    def read(self, sink: str, max_records: int = 1000, max_bytes: int = 1 * _MIB) -> list[Record]:
        if max_records < 1 or max_bytes < 1:
            raise ValueError(f"max_records and max_bytes must be positive, got {max_records} and {max_bytes}")
        c = self._cursor(sink)
        if c.shard is None:
            return self._read_upto(c, max_records, max_bytes, self._durable_seq)
        # A sharded sink: past other shards' records up to its first own one, then its own up to their block's end.
        shard, limit = c.shard, self._durable_seq
        self._skip_others(c, shard, limit)
        out = (
            []
            if c.next_seq > limit
            else self._read_upto(c, max_records, max_bytes, min(limit, shard.block_last(c.next_seq)))
        )
        self._settle(c)
        return out

    def _read_upto(self, c: _TailCursor, max_records: int, max_bytes: int, limit: int) -> list[Record]:
        """Records from the read position up to seq ``limit``, within ``max_records``/``max_bytes`` (at least one)."""
        out: list[Record] = []
        append = out.append
        unpack_from = _REC_HEADER.unpack_from
        crc32 = _crc32
        new_record = _new_record
        total = 0
        while len(out) < max_records and c.next_seq <= limit:
            chunk = self._chunk(c)
            if chunk is None:
                continue
            path, buf = chunk
            pos = 0
            # The cursor's position in locals, written back however the loop ends (the same as per record).
            offset, next_seq = c.offset, c.next_seq
            try:
                while len(out) < max_records and next_seq <= limit and pos + _REC_HDR <= len(buf):
                    length, crc, seq = unpack_from(buf, pos)
                    if seq != next_seq or length == 0:
                        raise SpoolCorruptError(f"spool: {path} offset {offset}: expected record {next_seq}")
                    stop = pos + _REC_HDR + length
                    if stop > len(buf):
                        if pos > 0:
                            break
                        buf = _pread(c.fd, _REC_HDR + length, offset, path)  # one record bigger than a chunk
                        if len(buf) < _REC_HDR + length:
                            raise SpoolCorruptError(f"spool: {path} ends inside record {next_seq}")
                        continue
                    if out and total + length > max_bytes:
                        return self._handed_out(c, out)
                    payload = buf[pos + _REC_HDR : stop]
                    if crc32(payload) != crc:
                        raise SpoolCorruptError(f"spool: {path} offset {offset}: record {seq} fails its checksum")
                    append(new_record(Record, (seq, payload)))
                    total += length
                    offset += stop - pos
                    next_seq = seq + 1
                    pos = stop
            finally:
                c.offset, c.next_seq = offset, next_seq
            if out and total >= max_bytes:
                break
        return self._handed_out(c, out)

    def _chunk(self, c: _TailCursor) -> tuple[Path, bytes] | None:
        """The segment file at the read position and a chunk of it from there; None after moving to the next
        segment (the caller checks its limits again)."""
        path = self._dir / f"spool-{c.segment_first_seq:020d}.seg"
        if c.fd < 0:
            try:
                c.fd = os.open(path, _READ_OPEN)
            except FileNotFoundError as exc:
                # On a sharded sink the owner may remove a segment this tail has not opened yet: every record in it
                # was delivered by its shard (the others' delivered, and this one's acked by an earlier reader).
                if c.shard is None or not self._next_segment(c):
                    raise _io_error("open", path, exc) from exc
                return None
            except OSError as exc:
                raise _io_error("open", path, exc) from exc
        buf = _pread(c.fd, _READ_CHUNK, c.offset, path)
        if len(buf) < _REC_HDR:
            if not self._next_segment(c):
                raise SpoolCorruptError(f"spool: record {c.next_seq} is durable but in no segment file")
            return None
        return path, buf

    def _skip_others(self, c: _TailCursor, shard: Shard, limit: int) -> None:
        """Move a sharded sink's read position over other shards' records (seq and length checked, not the CRC)
        up to its first own record or past ``limit``, and record what it passed as a batch already acknowledged."""
        unpack_from = _REC_HEADER.unpack_from
        skip_first = skip_last = 0  # the records passed (0: none)
        block_end = 0  # the last seq of the block of the record before (0: none yet)
        try:
            while c.next_seq <= limit:
                chunk = self._chunk(c)
                if chunk is None:
                    continue
                path, buf = chunk
                pos = 0
                offset, next_seq = c.offset, c.next_seq
                try:
                    while next_seq <= limit and pos + _REC_HDR <= len(buf):
                        length, _crc, seq = unpack_from(buf, pos)
                        if seq != next_seq or length == 0:
                            raise SpoolCorruptError(f"spool: {path} offset {offset}: expected record {next_seq}")
                        if seq > block_end:  # a new block (seqs may skip whole blocks between segments)
                            if shard.owns(seq):
                                return
                            block_end = shard.block_last(seq)
                        stop = pos + _REC_HDR + length
                        # Past the chunk: its last byte must be in the file (read before the next record's header).
                        if stop > len(buf) and not _pread(c.fd, 1, offset + stop - pos - 1, path):
                            raise SpoolCorruptError(f"spool: {path} ends inside record {seq}")
                        skip_first = skip_first or seq
                        skip_last = seq
                        offset += stop - pos
                        next_seq = seq + 1
                        pos = stop
                finally:
                    c.offset, c.next_seq = offset, next_seq
        finally:
            if skip_first:
                c.batches.append([skip_first, skip_last, _BATCH_SKIPPED])

    def _next_segment(self, c: _TailCursor) -> bool:
        """Move to the segment after the current one (seqs may skip between segments); False if there is none."""
        try:
            firsts = sorted(
                int(m.group(1)) for name in os.listdir(self._dir) if (m := _SEG_RE.fullmatch(name)) is not None
            )
        except OSError as exc:
            raise _io_error("list", self._dir, exc) from exc
        later = [first for first in firsts if first > c.segment_first_seq]
        if not later:
            return False
        self._close(c)
        c.segment_first_seq = later[0]
        c.offset = _SEG_HDR
        c.next_seq = max(c.next_seq, later[0])
        return True

    @staticmethod
    def _handed_out(c: _TailCursor, out: list[Record]) -> list[Record]:
        if out:
            c.batches.append([out[0].seq, out[-1].seq, 0])
        return out

    def ack_range(self, sink: str, first: int, last: int) -> None:
        """One batch handed out by :meth:`read` is delivered; the cumulative position moves over every leading
        batch that is delivered (batches may complete out of order)."""
        c = self._cursor(sink)
        for batch in c.batches:
            if batch[0] == first and batch[1] == last and batch[2] != _BATCH_SKIPPED:
                if c.shard is not None and batch[2] == _BATCH_OPEN:
                    c.delivered.append((first, last))
                batch[2] = _BATCH_ACKED
                break
        else:
            raise ValueError(f"sink {sink!r}: {first}..{last} is not a batch that was read")
        self._settle(c)

    def ack(self, sink: str, up_to_seq: int) -> None:
        """Every batch read up to ``up_to_seq`` is delivered."""
        c = self._cursor(sink)
        for batch in c.batches:
            if batch[1] > up_to_seq:
                break
            if batch[2] == _BATCH_OPEN:
                if c.shard is not None:
                    c.delivered.append((batch[0], batch[1]))
                batch[2] = _BATCH_ACKED
        self._settle(c)

    @staticmethod
    def _settle(c: _TailCursor) -> None:
        """Move the cumulative position over every leading batch that is acknowledged (or skipped)."""
        while c.batches and c.batches[0][2]:
            c.acked = max(c.acked, c.batches.pop(0)[1])

    def take_delivered(self, sink: str) -> list[tuple[int, int]]:
        """A sharded sink's owned batches acknowledged since the last call, in the order they were acknowledged
        (for the owner's :meth:`Spool.ack_delivered_range`); clears them. ValueError for an unsharded sink."""
        c = self._cursor(sink)
        if c.shard is None:
            raise ValueError(f"sink {sink!r} is not sharded")
        delivered, c.delivered = c.delivered, []
        return delivered

    def _cursor(self, sink: str) -> _TailCursor:
        try:
            return self._cursors[sink]
        except KeyError:
            raise ValueError(f"unknown sink {sink!r}; configured: {list(self._cursors)}") from None

    @staticmethod
    def _close(c: _TailCursor) -> None:
        if c.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(c.fd)
            c.fd = -1

    def close(self) -> None:
        for c in self._cursors.values():
            self._close(c)
