"""Local senders: ``jsonl:DIR`` and ``stdout:``."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from fpolicyd.errors import SinkError
from fpolicyd.pipeline.records import Record
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings, JsonlWriter, lines_block


def _block(records: Sequence[Record]) -> bytes:
    return lines_block([r.payload for r in records])


class JsonlSender:
    """Writes to the page cache on the loop (a fraction of a millisecond per batch) and, unless the policy is
    ``never``, fsyncs on its own thread before the batch is acknowledged, so the readers never wait for the
    disk and the spool never forgets an event the file could still lose. One batch at a time, in order."""

    max_in_flight = 1
    linger_s = 0.0
    linger_records = 1

    def __init__(self, settings: JsonlSettings, *, max_bytes: int) -> None:
        self.name = f"jsonl:{settings.directory}"
        self.writer = JsonlWriter(settings)
        self.max_bytes = max_bytes
        self.max_records = 100_000
        # A block never spans two files, so blocks are cut to fit one (a single longer line goes alone).
        self._file_bytes = settings.max_file_bytes
        self._durable_acks = settings.fsync is not FsyncPolicy.never
        self.last_error: SinkError | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jsonl-fsync")

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        self.writer.open(time.time())  # the writer is clock-free; this edge reads the wall clock

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        """Write whole lines in chunks that fit a file; on a failed write, hand back what is not written (so a
        retry never duplicates a line that is already in a file). ``last_error``: why this send left records."""
        self.last_error = None
        now = time.time()
        lines = [record.payload for record in records]
        limit = self._file_bytes
        start = 0
        if sum(map(len, lines)) + len(lines) > limit:  # else (the usual case) the batch is one chunk
            size = 0
            for index, line in enumerate(lines):
                length = len(line) + 1
                if size and size + length > limit:
                    if not self._write(lines[start:index], now):
                        return records[start:]
                    start, size = index, 0
                size += length
            lines = lines[start:]
        if not self._write(lines, now):
            return records[start:]
        if self._durable_acks:
            # The spool forgets these events once they are acked, so they must be on disk in the file first:
            # otherwise an OS crash could take the file's tail while the spool no longer holds it.
            await asyncio.get_running_loop().run_in_executor(self._executor, self.writer.sync, now)
        return ()

    def _write(self, lines: list[bytes], now: float) -> bool:
        try:
            self.writer.write_block(lines_block(lines), now, sync=False)
        except SinkError as exc:
            self.last_error = exc
            return False
        return True

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.writer.close)
        self._executor.shutdown(wait=True)


class StdoutSender:
    """One JSON document per line on standard output, written on a thread (the reader may be slow)."""

    max_in_flight = 1
    linger_s = 0.0
    linger_records = 1
    max_records = 10_000
    max_bytes = 1 << 20

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.name = "stdout:"
        self._stream = stream or sys.stdout.buffer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stdout")

    async def start(self) -> None:
        return None

    def _write(self, block: bytes) -> None:
        try:
            self._stream.write(block)
            self._stream.flush()
        except BrokenPipeError as exc:
            raise SinkError(f"stdout closed: {exc}", retriable=False) from exc
        except OSError as exc:
            raise SinkError(f"stdout: {exc}", retriable=True) from exc

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, _block(records))
        return ()

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
