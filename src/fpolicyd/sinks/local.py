"""Local sinks behind :class:`~fpolicyd.sinks.runner.SinkRunner`: ``jsonl:DIR`` and ``stdout:``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.sinks.jsonl import JsonlSettings, JsonlWriter
from fpolicyd.sinks.runner import LocalSink


class JsonlSink:
    """Writes to the page cache inline; fsync (policy ``always``/``interval``) runs on the runner's thread."""

    blocking_writes = False

    def __init__(self, settings: JsonlSettings) -> None:
        self.name = f"jsonl:{settings.directory}"
        self.writer = JsonlWriter(settings)
        # A batch never spans two files, so a batch larger than a file would overshoot the size limit.
        self.max_batch_bytes: int | None = settings.max_file_bytes

    def open(self, now: float) -> None:
        self.writer.open(now)

    def write(self, block: memoryview, lines: int, now: float) -> None:
        self.writer.write_block(block, now, sync=False)

    def sync_due(self, now: float) -> bool:
        return self.writer.sync_due(now)

    def sync(self, now: float) -> None:
        self.writer.sync(now)

    def close(self) -> None:
        self.writer.close()


class StdoutSink:
    """One JSON document per line on standard output (for piping into another tool, which may be slow)."""

    blocking_writes = True
    max_batch_bytes: int | None = None

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.name = "stdout:"
        self._stream = stream or sys.stdout.buffer

    def open(self, now: float) -> None:
        return None

    def write(self, block: memoryview, lines: int, now: float) -> None:
        try:
            self._stream.write(block)
            self._stream.flush()
        except BrokenPipeError as exc:
            raise SinkError(f"stdout closed: {exc}", retriable=False) from exc
        except OSError as exc:
            raise SinkError(f"stdout: {exc}", retriable=True) from exc

    def sync_due(self, now: float) -> bool:
        return False

    def sync(self, now: float) -> None:
        return None

    def close(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            return


def build_sink(uri: str, settings: Settings) -> LocalSink:
    scheme, _, target = uri.partition(":")
    if scheme == "jsonl":
        if not target:
            raise ConfigError(f"sink {uri!r}: jsonl needs a directory, e.g. jsonl:/var/log/fpolicy")
        return JsonlSink(
            JsonlSettings(
                directory=Path(os.path.expanduser(target)),
                max_file_bytes=settings.jsonl_max_file_bytes,
                max_file_age_s=settings.jsonl_max_file_age_s,
                fsync=settings.jsonl_fsync,
                fsync_interval_s=settings.jsonl_fsync_interval_s,
            )
        )
    if scheme == "stdout":
        return StdoutSink()
    raise ConfigError(f"sink {uri!r}: this build delivers to jsonl: and stdout: only")
