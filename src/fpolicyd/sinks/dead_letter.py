"""The dead-letter files: what could not be delivered or decoded, kept with its reason, within a size cap.

Two kinds of writer share them (``<data_dir>/dead-letter/dead-letter.jsonl``): the AWS sinks (events SQS or
EventBridge rejected for good, or too large for them; they may run in the delivery process) and the reader
(payloads that could not be decoded, :meth:`DeadLetterWriter.quarantine`). Each record is one JSON line
``{"time", "sink", "reason", "event" | "event_raw_b64", ...}``; ``sink`` names the writer (the sink's name, or
``decoder``): it is the ``source`` label of the metrics.

Bounded, with rotation. The active file takes at most ``max_bytes // max_files`` bytes; the record that would
overflow it first rotates it (``dead-letter.jsonl`` → ``.1`` → … → ``.<max_files-1>``; the oldest is removed), and
before every append the oldest rotated files go until the active file, the rotated ones and the new record fit
in ``max_bytes``. So the newest records are kept: an incident that is going on now is what an operator looks for,
and the files recover on their own once a flood stops (a stop-at-the-cap policy would refuse every later
record until someone cleared the directory). Nothing goes silently: the records of a removed file are counted
by source (``evicted``), as are records larger than one file's share (``too_large``, never written) and
records the disk refused that nobody will retry (``write_failed``); a rate-limited error line says so.

Before the handshake (a peer that never sent a valid NEGO_REQ: anyone who can reach the port) only the first
``pre_handshake_sample_bytes`` of a payload are kept, with ``"sample": true`` and ``"original_bytes"``: enough to
see what it was, not enough to fill a disk. Payloads of a negotiated session are ONTAP's notifications, which an
asynchronous engine counts as delivered: they are kept whole (within the cap).

Several processes may write the same files (the daemon's reader and the delivery process's sinks): every
append (and rotation) holds an exclusive ``flock`` on ``dead-letter.jsonl.lock`` and re-reads the sizes, and a
writer whose file was rotated by the other process reopens the path. The placement decision is the pure
:func:`plan_append`; the I/O is :class:`DeadLetterWriter`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Final, Protocol, Self

import orjson

from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.events import format_rfc3339_us
from fpolicyd.obs.log import get_logger
from fpolicyd.obs.metrics import DECODER_SOURCE, DeadLetterFigures

__all__ = [
    "DECODER",
    "DEFAULT_LOG_INTERVAL_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES",
    "DEFAULT_SAMPLE_BYTES",
    "FILE_NAME",
    "MIN_FILE_BYTES",
    "REASON_MAX_CHARS",
    "DeadLetterLimits",
    "DeadLetterWriter",
    "DropReason",
    "LogThrottle",
    "Placement",
    "plan_append",
    "sample_of",
]

log = get_logger("fpolicyd.dead_letter")

#: The active file's name in the dead-letter directory; rotated files add ``.1`` … ``.<max_files-1>``.
FILE_NAME: Final = "dead-letter.jsonl"
#: The ``sink`` (source) of the records the reader keeps.
DECODER: Final = DECODER_SOURCE
DEFAULT_MAX_BYTES: Final = 64 << 20
DEFAULT_MAX_FILES: Final = 4
DEFAULT_SAMPLE_BYTES: Final = 256
DEFAULT_LOG_INTERVAL_S: Final = 10.0
#: The smallest share of the cap one file may have: room for a sample record and its reason.
MIN_FILE_BYTES: Final = 4096
#: A decoder's reason is cut to this many characters: its detail may quote the peer's input (an element name of
#: any length), which must not bring back, through the reason, the bytes a sample leaves out.
REASON_MAX_CHARS: Final = 512

#: ``{"time":"…","sink":"<source>"`` at the start of every record (orjson keeps the key order).
_PLAIN_SOURCE: Final = re.compile(rb'\{"time":"[^"]*","sink":"([^"\\]*)"')
_SOURCE: Final = re.compile(rb'\{"time":"[^"]*","sink":"((?:[^"\\]|\\.)*)"')
_UNKNOWN_SOURCE: Final = "unknown"
#: Block size when a file to remove is read to count its records.
_EVICT_READ_BYTES: Final = 4 << 20


class _Carries(Protocol):
    """What a sink hands over (:class:`fpolicyd.sinks.aws.encode.Item`): the event's JSON bytes."""

    @property
    def event_json(self) -> bytes: ...


class DropReason(StrEnum):
    #: Written, then removed with the oldest file when the cap needed the room.
    EVICTED = "evicted"
    #: Larger than one file's share of the cap (``max_bytes // max_files``): never written.
    TOO_LARGE = "too_large"
    #: The disk refused it (no space, I/O error) and its writer keeps no copy (the reader's payloads; a sink's
    #: event stays in the spool instead and is sent again).
    WRITE_FAILED = "write_failed"


@dataclass(frozen=True, slots=True)
class DeadLetterLimits:
    """The cap and the pre-handshake sample (the ``dead_letter_*`` settings)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    pre_handshake_sample_bytes: int = DEFAULT_SAMPLE_BYTES
    log_interval_s: float = DEFAULT_LOG_INTERVAL_S

    def __post_init__(self) -> None:
        if self.max_files < 1:
            raise ConfigError(f"dead_letter_max_files must be at least 1, got {self.max_files}")
        if self.max_bytes // self.max_files < MIN_FILE_BYTES:
            raise ConfigError(
                f"dead_letter_max_bytes ({self.max_bytes}) / dead_letter_max_files ({self.max_files}) leaves "
                f"less than {MIN_FILE_BYTES} bytes per file"
            )
        if self.pre_handshake_sample_bytes < 0:
            raise ConfigError("dead_letter_pre_handshake_sample_bytes must be >= 0")
        if self.log_interval_s <= 0:
            raise ConfigError("dead_letter_log_interval_s must be > 0")

    @property
    def file_bytes(self) -> int:
        """The most one file holds (the active file rotates before it would exceed this)."""
        return self.max_bytes // self.max_files


class Placement(Enum):
    APPEND = "append"
    #: Rotate the active file first, then append to the new, empty one.
    ROTATE = "rotate"
    #: Larger than a file's share: drop it (counted ``too_large``).
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class AppendPlan:
    placement: Placement
    #: Indexes of the rotated files to remove (1 = ``.1``), as numbered *after* the rotation, oldest first.
    evict: tuple[int, ...] = ()


def plan_append(sizes: Sequence[int], line_bytes: int, limits: DeadLetterLimits) -> AppendPlan:
    """Where a record of ``line_bytes`` goes, given ``sizes`` (bytes of the active file, then ``.1`` …
    ``.<max_files-1>``; 0 for a missing one). Pure.

    The active file rotates when the record would take it past ``file_bytes`` (a rotation drops the oldest,
    ``.<max_files-1>``, and shifts the others up; with one file, the active file itself is the oldest). Then the
    oldest rotated files are removed until everything, the record included, fits in ``max_bytes``. The active
    file, once rotated, is empty and the record is at most ``file_bytes``, so this always ends within the cap."""
    if line_bytes > limits.file_bytes:
        return AppendPlan(Placement.DROP)
    files = limits.max_files
    current = list(sizes[:files]) + [0] * max(0, files - len(sizes))
    placement = Placement.APPEND
    if current[0] and current[0] + line_bytes > limits.file_bytes:
        placement = Placement.ROTATE
        current = [0, *current[: files - 1]] if files > 1 else [0]
    evict: list[int] = []
    total = sum(current) + line_bytes
    for index in range(files - 1, 0, -1):
        if total <= limits.max_bytes:
            break
        if current[index]:
            total -= current[index]
            current[index] = 0
            evict.append(index)
    return AppendPlan(placement, tuple(evict))


def sample_of(payload: bytes, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of ``payload``, and whether that is less than all of it."""
    if len(payload) <= limit:
        return payload, False
    return payload[:limit], True


class LogThrottle:
    """At most one log line per key per ``interval_s``; each line says how many occurrences it stands for.

    :meth:`admit` counts an occurrence and returns 0 (stay quiet) or the occurrences since the last line, this
    one included (log now). :meth:`pending` returns what was counted and not yet logged (for a last line at close).
    Pure: ``now`` is an argument."""

    __slots__ = ("_last", "_pending", "interval_s")

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def admit(self, key: str, now: float, count: int = 1) -> int:
        """Count ``count`` occurrences (at least 1)."""
        count += self._pending.get(key, 0)
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._pending[key] = count
            return 0
        self._last[key] = now
        self._pending[key] = 0
        return count

    def pending(self) -> dict[str, int]:
        """Occurrences counted and not logged yet, by key; resets them."""
        out = {key: count for key, count in self._pending.items() if count}
        for key in out:
            self._pending[key] = 0
        return out


class DeadLetterWriter:
    """Appends one JSON line per dead letter to the active file, within the cap (see the module).

    Each record goes out in one ``write`` on an ``O_APPEND`` descriptor; a write that fails midway is cut back,
    so no file holds a torn line. Data reaches the kernel before :meth:`write` returns; a rotated file and
    :meth:`close` are fsynced. Every record written is logged (event id and reason, never the path: paths may
    be confidential); drops and failed writes are logged at most once per ``log_interval_s`` per source and
    reason. Thread-safe, and safe with other writers of the same directory in other processes."""

    def __init__(
        self,
        path: Path,
        *,
        limits: DeadLetterLimits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.limits = limits if limits is not None else DeadLetterLimits()
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._throttle = LogThrottle(self.limits.log_interval_s)
        #: Records written (and of them, samples), dropped (by reason) and failed writes, by source.
        self._written: dict[str, int] = {}
        self._sampled: dict[str, int] = {}
        self._dropped: dict[str, dict[str, int]] = {}
        self._write_errors: dict[str, int] = {}
        self.written = 0

    # ------------------------------------------------------------------------------------------ files

    def files(self) -> list[Path]:
        """The active file, then ``.1`` … ``.<max_files-1>``."""
        return [self.path, *(self._rotated(index) for index in range(1, self.limits.max_files))]

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def disk_bytes(self) -> int:
        """Bytes the dead-letter files hold now (read on the metrics thread: ``stat`` only)."""
        total = 0
        for path in self.files():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def open(self) -> Self:
        """Open the active file; the first time, bring what an earlier run left within the cap (files beyond
        ``max_files`` and, oldest first, files past ``max_bytes`` are removed and counted ``evicted``)."""
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                if self._lock_fd is None:
                    self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
                with self._flocked():
                    self._enforce_at_open()
                    self._fd = self._open_active()
        return self

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            lock_fd, self._lock_fd = self._lock_fd, None
            pending = self._throttle.pending()
        for key, count in pending.items():
            event, source, reason = key.split("\x00")
            log.error(event, source=source, reason=reason or None, count=count, detail="since the last line")
        if lock_fd is not None:
            os.close(lock_fd)
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open_active(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _enforce_at_open(self) -> None:
        limits = self.limits
        pattern = re.compile(re.escape(self.path.name) + r"\.([0-9]+)")
        for entry in self.path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is not None and int(match.group(1)) >= limits.max_files:
                self._evict(entry)
        sizes = self._sizes()
        if sizes[0] > limits.file_bytes:
            self._rotate()
            sizes = self._sizes()
        index = limits.max_files - 1
        while sum(sizes) > limits.max_bytes and index >= 1:
            if sizes[index]:
                self._evict(self._rotated(index))
                sizes[index] = 0
            index -= 1

    def _sizes(self) -> list[int]:
        sizes: list[int] = []
        for path in self.files():
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes

    def _follow(self) -> int:
        """The descriptor of the file now at ``path`` (another process may have rotated ours away)."""
        fd = self._fd
        assert fd is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            self._fd = self._open_active()
            os.close(fd)
        assert self._fd is not None
        return self._fd

    def _rotate(self) -> None:
        """Active → ``.1`` → … ; the oldest goes (counted). With one file, the active file is the oldest."""
        files = self.limits.max_files
        if files == 1:
            self._evict(self.path)
        else:
            oldest = self._rotated(files - 1)
            if oldest.exists():
                self._evict(oldest)
            for index in range(files - 2, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    self._rotated(index).rename(self._rotated(index + 1))
            with contextlib.suppress(FileNotFoundError):
                self.path.rename(self._rotated(1))
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._fd = self._open_active()

    def _evict(self, path: Path) -> None:
        """Remove a dead-letter file, counting its records by source as ``evicted``. The file is read in blocks
        (one an older version left unbounded is never read whole) and each line's source read from its first
        bytes: ~50 ms for 16 MiB of 500-byte records on this project's machine, once per 16 MiB written."""
        raw: Counter[bytes | None] = Counter()
        try:
            with path.open("rb") as handle:
                tail = b""
                while block := handle.read(_EVICT_READ_BYTES):
                    lines = (tail + block).split(b"\n")
                    tail = lines.pop()
                    raw.update(_source_of(line) for line in lines)
                if tail:
                    raw[_source_of(tail)] += 1
        except FileNotFoundError:
            return
        path.unlink(missing_ok=True)
        counts: dict[str, int] = {}
        for name, count in raw.items():
            source = _UNKNOWN_SOURCE
            if name is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    source = str(orjson.loads(b'"' + name + b'"'))
            counts[source] = counts.get(source, 0) + count
        for source, count in counts.items():
            self._count_drop(source, DropReason.EVICTED, count)

    # ------------------------------------------------------------------------------------------ records

    def write(self, event_json: bytes, *, sink: str, reason: str) -> bool:
        """Append one record (``event`` when the bytes are JSON, else ``event_raw_b64``). Returns False when it
        was dropped at the cap (counted and logged); raises ``SinkError`` (retriable) when the disk refused it
        (counted as a failed write: the caller keeps the event and tries again)."""
        record: dict[str, Any] = {"time": self._now(), "sink": sink, "reason": reason}
        event_id: object = None
        try:
            event = orjson.loads(event_json)
            record["event"] = event
            if isinstance(event, dict):
                event_id = event.get("event_id")
        except orjson.JSONDecodeError:
            record["event_raw_b64"] = base64.b64encode(event_json).decode("ascii")
        if not self._commit(orjson.dumps(record) + b"\n", sink, sampled=False):
            return False
        log.warning("event_dead_lettered", sink=sink, reason=reason, event_id=event_id, file=str(self.path))
        return True

    def quarantine(self, payload: bytes, *, reason: str, negotiated: bool) -> bool:
        """Keep a payload the reader could not decode (raw, base64): whole from a negotiated session, else its
        first ``pre_handshake_sample_bytes`` only. Never raises: a record the disk refused is counted
        ``write_failed`` (and logged, rate-limited). Returns whether it was written."""
        if len(reason) > REASON_MAX_CHARS:
            reason = reason[:REASON_MAX_CHARS] + f"... ({len(reason)} characters)"
        record: dict[str, Any] = {"time": self._now(), "sink": DECODER, "reason": reason}
        kept, sampled = payload, False
        if not negotiated:
            kept, sampled = sample_of(payload, self.limits.pre_handshake_sample_bytes)
            record["handshake"] = False
        if sampled:
            record["sample"] = True
            record["original_bytes"] = len(payload)
        record["event_raw_b64"] = base64.b64encode(kept).decode("ascii")
        try:
            self.open()
            written = self._commit(orjson.dumps(record) + b"\n", DECODER, sampled=sampled)
        except (SinkError, OSError) as exc:
            if not isinstance(exc, SinkError):  # open() failed (the directory): _commit counted its own
                self._count_write_error(DECODER, exc)
            self._count_drop(DECODER, DropReason.WRITE_FAILED, 1)
            return False
        if written:
            log.warning(
                "payload_quarantined",
                reason=reason,
                payload_bytes=len(payload),
                sample=sampled,
                file=str(self.path),
            )
        return written

    def for_sink(self, sink: str) -> Callable[[_Carries, str], None]:
        """The ``dead_letter`` callback :func:`fpolicyd.sinks.aws.deliver.deliver` takes, for one sink."""

        def dead_letter(item: _Carries, reason: str) -> None:
            self.write(item.event_json, sink=sink, reason=reason)

        return dead_letter

    def figures(self) -> DeadLetterFigures:
        """What this writer counted (read on the metrics thread: C-level copies only)."""
        return DeadLetterFigures(
            written=dict(self._written),
            sampled=dict(self._sampled),
            dropped={source: dict(reasons) for source, reasons in list(self._dropped.items())},
            write_errors=dict(self._write_errors),
        )

    def _now(self) -> str:
        return format_rfc3339_us(int(self._clock() * 1_000_000))

    def _commit(self, line: bytes, source: str, *, sampled: bool) -> bool:
        limits = self.limits
        with self._lock:
            if self._fd is None:
                raise SinkError(f"dead-letter file {self.path} is not open", retriable=False)
            if len(line) > limits.file_bytes:
                self._count_drop(source, DropReason.TOO_LARGE, 1, record_bytes=len(line))
                return False
            try:
                with self._flocked():
                    fd = self._follow()
                    sizes = self._sizes()
                    sizes[0] = os.fstat(fd).st_size
                    plan = plan_append(sizes, len(line), limits)
                    if plan.placement is Placement.ROTATE:
                        self._rotate()
                    for index in plan.evict:
                        self._evict(self._rotated(index))
                    assert self._fd is not None
                    self._append(self._fd, line)
            except OSError as exc:
                self._count_write_error(source, exc)
                raise SinkError(f"dead-letter file {self.path}: {exc}", retriable=True) from exc
            self._written[source] = self._written.get(source, 0) + 1
            if sampled:
                self._sampled[source] = self._sampled.get(source, 0) + 1
            self.written += 1
        return True

    def _append(self, fd: int, line: bytes) -> None:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    # ------------------------------------------------------------------------------------------ accounting

    def _count_drop(self, source: str, reason: DropReason, count: int, *, record_bytes: int | None = None) -> None:
        reasons = self._dropped.get(source)
        if reasons is None:
            reasons = self._dropped[source] = {}
        reasons[reason.value] = reasons.get(reason.value, 0) + count
        shown = self._throttle.admit(f"dead_letter_dropped\x00{source}\x00{reason.value}", self._monotonic(), count)
        if shown:
            log.error(
                "dead_letter_dropped",
                source=source,
                reason=reason.value,
                count=shown,
                total=reasons[reason.value],
                record_bytes=record_bytes,
                max_bytes=self.limits.max_bytes,
                file_bytes=self.limits.file_bytes,
                detail=_DROP_DETAIL[reason],
            )

    def _count_write_error(self, source: str, exc: OSError) -> None:
        self._write_errors[source] = self._write_errors.get(source, 0) + 1
        shown = self._throttle.admit(f"dead_letter_write_failed\x00{source}\x00", self._monotonic())
        if shown:
            log.error(
                "dead_letter_write_failed",
                source=source,
                count=shown,
                total=self._write_errors[source],
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                error=str(exc),
            )


def _source_of(line: bytes) -> bytes | None:
    """The JSON-escaped ``sink`` of a record line, None when the line is not a record."""
    match = _PLAIN_SOURCE.match(line) or _SOURCE.match(line)
    return match.group(1) if match is not None else None


_DROP_DETAIL: Final = {
    DropReason.EVICTED: "the oldest dead-letter file was removed to stay within dead_letter_max_bytes",
    DropReason.TOO_LARGE: "a record larger than dead_letter_max_bytes / dead_letter_max_files was not written",
    DropReason.WRITE_FAILED: "the disk refused a record nobody keeps elsewhere",
}
