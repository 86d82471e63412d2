"""The JSON Lines sender's send: a batch is written as blocks that each fit a file, and a failed block hands back
exactly the records not written yet (so that a retry never writes a line twice)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.errors import SinkError
from fpolicyd.pipeline.records import Record
from fpolicyd.sinks.local import JsonlSender, _block
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings


def lines_written(directory: Path) -> list[list[bytes]]:
    """The lines of every file, file by file, in write order (names sort in write order)."""
    return [path.read_bytes().split(b"\n") for path in sorted(directory.glob("*.jsonl"))]


def last_error(sender: JsonlSender) -> SinkError | None:
    return sender.last_error


def records(count: int, width: int = 10) -> list[Record]:
    return [Record(seq, b'{"n":%0*d}' % (width, seq)) for seq in range(1, count + 1)]


def test_block_is_each_payload_and_a_newline() -> None:
    assert _block(records(3)) == b'{"n":0000000001}\n{"n":0000000002}\n{"n":0000000003}\n'
    assert _block([Record(7, b"x")]) == b"x\n"
    assert _block([]) == b"\n"  # as it always was (the sink workers never send an empty batch)


@pytest.mark.parametrize("fsync", [FsyncPolicy.never, FsyncPolicy.always])
async def test_a_batch_that_fits_a_file_is_one_file(tmp_path: Path, fsync: FsyncPolicy) -> None:
    sender = JsonlSender(JsonlSettings(directory=tmp_path, fsync=fsync), max_bytes=1 << 20)
    await sender.start()
    batch = records(50)
    assert await sender.send(batch) == ()
    await sender.close()
    assert lines_written(tmp_path) == [[r.payload for r in batch] + [b""]]


async def test_a_batch_larger_than_a_file_is_cut_at_line_boundaries(tmp_path: Path) -> None:
    # Each line is 17 bytes with its newline: 3 fit in 60 bytes, the 4th would not.
    settings = JsonlSettings(directory=tmp_path, fsync=FsyncPolicy.never, max_file_bytes=60)
    sender = JsonlSender(settings, max_bytes=1 << 20)
    await sender.start()
    batch = records(10)
    assert await sender.send(batch) == ()
    await sender.close()
    payloads = [r.payload for r in batch]
    assert lines_written(tmp_path) == [
        [*payloads[0:3], b""],
        [*payloads[3:6], b""],
        [*payloads[6:9], b""],
        [payloads[9], b""],
    ]


async def test_a_failed_block_hands_back_the_records_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = JsonlSettings(directory=tmp_path, fsync=FsyncPolicy.never, max_file_bytes=60)
    sender = JsonlSender(settings, max_bytes=1 << 20)
    await sender.start()
    real_write = os.write
    blocks = 0

    def write(fd: int, data: Any) -> int:
        nonlocal blocks
        if fd == sender.writer._fd:
            blocks += 1
            if blocks == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    batch = records(10)
    left = await sender.send(batch)
    assert list(left) == batch[6:]
    assert "No space left on device" in str(last_error(sender))
    # The retry of what came back writes the rest, once.
    assert await sender.send(left) == ()
    assert last_error(sender) is None
    await sender.close()
    written = [line for lines in lines_written(tmp_path) for line in lines if line]
    assert written == [r.payload for r in batch]


async def test_a_failed_single_block_hands_back_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = JsonlSender(JsonlSettings(directory=tmp_path, fsync=FsyncPolicy.never), max_bytes=1 << 20)
    await sender.start()
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if fd == sender.writer._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    batch = records(5)
    assert list(await sender.send(batch)) == batch
    monkeypatch.setattr(os, "write", real_write)
    await sender.close()
    assert [line for lines in lines_written(tmp_path) for line in lines if line] == []
