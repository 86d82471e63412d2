"""Unit tests for the spool: format, write path, cursors, recovery from torn and corrupt files, limits."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.errors import ConfigError, FpolicydError
from fpolicyd.pipeline.records import Record
from fpolicyd.storage import spool as spool_mod
from fpolicyd.storage.spool import (
    Spool,
    SpoolCorruptError,
    SpoolError,
    SpoolFsync,
    SpoolFullError,
    SpoolIOError,
    SpoolSettings,
)

SEG_HDR = 24
REC_HDR = 16


def settings(directory: Path, **kw: Any) -> SpoolSettings:
    return SpoolSettings(directory=directory, **kw)


def seg_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.seg"))


def records_in(path: Path) -> list[tuple[int, int, bytes]]:
    """(offset, seq, payload) of every well-formed record of a segment file, read independently of the spool."""
    data = path.read_bytes()
    out = []
    off = SEG_HDR
    while off + REC_HDR <= len(data):
        length, crc, seq = struct.unpack_from("<IIQ", data, off)
        payload = data[off + REC_HDR : off + REC_HDR + length]
        if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
            break
        out.append((off, seq, payload))
        off += REC_HDR + length
    return out


def drain(spool: Spool, sink: str) -> list[Record]:
    out: list[Record] = []
    while batch := spool.read(sink, 7, 1 << 20):
        out.extend(batch)
    return out


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


def ev(i: int, size: int = 20) -> bytes:
    return (b'{"i":%d}' % i).ljust(size, b" ")


# Read through functions: mypy narrows a property after an assert and would call the next check unreachable.
def sync_pending(s: Spool) -> bool:
    return s.sync_pending


def oldest_unacked(s: Spool) -> int | None:
    return s.oldest_unacked_seq


def cursors_dirty(s: Spool) -> bool:
    return s.cursors_dirty


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(directory: Path) -> Iterator[Spool]:
    s = Spool.open(settings(directory), ["a", "b"])
    try:
        yield s
    finally:
        s.close()


def commit(spool: Spool) -> None:
    spool.flush()
    spool.sync()


# -- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"segment_bytes": 10}, "segment_bytes"),
        ({"segment_bytes": 1.5}, "segment_bytes"),
        ({"segment_bytes": True}, "segment_bytes"),
        ({"segment_bytes": 4096, "max_bytes": 100}, "max_bytes"),
        ({"fsync": "sometimes"}, "fsync"),
        ({"group_commit_s": -1.0}, "group_commit_s"),
        ({"group_commit_s": float("nan")}, "group_commit_s"),
        ({"checkpoint_interval_s": float("inf")}, "checkpoint_interval_s"),
    ],
)
def test_settings_name_the_bad_field(tmp_path: Path, kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"spool\.{field}:"):
        SpoolSettings(directory=tmp_path, **kw)


def test_settings_directory_must_be_a_path() -> None:
    with pytest.raises(ConfigError, match=r"spool\.directory:"):
        SpoolSettings(directory="/tmp/x")  # type: ignore[arg-type]


def test_settings_coerce_fsync_strings(tmp_path: Path) -> None:
    s = SpoolSettings(directory=tmp_path, fsync="never")  # type: ignore[arg-type]
    assert s.fsync is SpoolFsync.never
    assert SpoolSettings(directory=tmp_path).fsync is SpoolFsync.group


@pytest.mark.parametrize("sinks", [["a", "a"], ["a", ""]])
def test_bad_sink_names_are_refused(directory: Path, sinks: list[str]) -> None:
    with pytest.raises(ConfigError, match="spool sinks"):
        Spool.open(settings(directory), sinks)


def test_errors_are_fpolicyd_errors() -> None:
    assert issubclass(SpoolFullError, SpoolError)
    assert issubclass(SpoolIOError, SpoolError)
    assert issubclass(SpoolCorruptError, SpoolError)
    assert issubclass(SpoolError, FpolicydError)


# -- fresh spool, format, permissions -------------------------------------------------------------------------


@pytest.mark.usefixtures("umask022")
def test_fresh_spool_files_and_permissions(directory: Path) -> None:
    s = Spool.open(settings(directory), ["a"])
    report = s.recovery
    assert report is not None
    assert report.segments_found == 0
    assert report.next_seq == 1
    assert report.new_sinks == ("a",)
    assert report.cursors == {"a": 0}
    s.append(b"{}")
    commit(s)
    s.read("a")
    s.ack("a", 1)
    assert s.checkpoint()
    s.close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["cursors.json", "spool-00000000000000000001.seg", "spool.lock"]
    for name in names:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o640, name


def test_segment_format_is_as_documented(spool: Spool, directory: Path) -> None:
    assert spool.append_many([b'{"a":1}', b'{"b":2}']) == range(1, 3)
    spool.flush()
    data = seg_files(directory)[0].read_bytes()
    magic, version, first, crc = struct.unpack_from("<8sIQI", data)
    assert (magic, version, first) == (b"FPDSPOOL", 1, 1)
    assert crc == zlib.crc32(data[:20])
    assert records_in(seg_files(directory)[0]) == [(24, 1, b'{"a":1}'), (24 + 16 + 7, 2, b'{"b":2}')]
    assert len(data) == 24 + 2 * (16 + 7) == spool.bytes_on_disk


def test_open_twice_is_refused_until_closed(directory: Path) -> None:
    first = Spool.open(settings(directory), ["a"])
    with pytest.raises(SpoolError, match="in use"):
        Spool.open(settings(directory), ["a"])
    first.close()
    Spool.open(settings(directory), ["a"]).close()


def test_closed_spool_refuses_appends(directory: Path) -> None:
    s = Spool.open(settings(directory), ["a"])
    s.close()
    s.close()  # twice is fine
    with pytest.raises(SpoolError, match="closed"):
        s.append(b"x")


# -- write path -----------------------------------------------------------------------------------------------


def test_append_buffers_flush_writes_sync_makes_durable(spool: Spool, directory: Path) -> None:
    size0 = seg_files(directory)[0].stat().st_size
    assert spool.append(b"one") == 1
    assert spool.append_many([b"two", b"three"]) == range(2, 4)
    assert spool.last_seq == 3
    assert spool.written_seq == 0
    assert spool.buffered_bytes == 3 * REC_HDR + 11
    assert spool.size_bytes == size0 + spool.buffered_bytes
    assert seg_files(directory)[0].stat().st_size == size0  # nothing handed to the kernel yet
    spool.flush()
    assert spool.written_seq == 3
    assert spool.durable_seq == 0
    assert sync_pending(spool)
    assert spool.read("a") == []  # a sink only sees durable records
    assert spool.sync() == 3
    assert not sync_pending(spool)
    assert spool.read("a") == [Record(1, b"one"), Record(2, b"two"), Record(3, b"three")]


def test_append_many_of_nothing(spool: Spool) -> None:
    assert spool.append_many([]) == range(1, 1)
    assert spool.last_seq == 0


@pytest.mark.parametrize("bad", [[b""], [b"ok", b""]])
def test_empty_payloads_are_refused_and_nothing_is_appended(spool: Spool, bad: list[bytes]) -> None:
    with pytest.raises(ValueError, match="length"):
        spool.append_many(bad)
    assert spool.last_seq == 0
    assert spool.buffered_bytes == 0


def test_commit_delay_per_policy(directory: Path) -> None:
    for policy, delay in ((SpoolFsync.group, 0.005), (SpoolFsync.always, 0.0), (SpoolFsync.never, None)):
        with Spool.open(settings(directory, fsync=policy), ["a"]) as s:
            assert s.commit_delay == delay


def test_never_policy_is_durable_at_flush_and_never_fsyncs(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(spool_mod, "_datasync", calls.append)
    monkeypatch.setattr(os, "fsync", calls.append)
    with Spool.open(settings(directory, fsync=SpoolFsync.never, segment_bytes=64), ["a"]) as s:
        s.append_many([ev(i) for i in range(5)])
        s.flush()
        assert s.durable_seq == 5
        assert not sync_pending(s)
        assert s.sync() == 5
        assert seqs(drain(s, "a")) == [1, 2, 3, 4, 5]
        s.ack("a", 5)
    assert calls == []


def test_group_lands_in_one_segment_and_rolls_before_it(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=100), ["a"]) as s:
        s.append(ev(1))  # 24 + 36 = 60 bytes
        s.append_many([ev(2), ev(3), ev(4)])  # would pass 100: rolls first, then all three together
        s.append(ev(5))
        s.flush()
        files = seg_files(directory)
        assert [p.name for p in files] == [
            "spool-00000000000000000001.seg",
            "spool-00000000000000000002.seg",
            "spool-00000000000000000005.seg",
        ]
        assert [[seq for _, seq, _ in records_in(p)] for p in files] == [[1], [2, 3, 4], [5]]
        assert files[1].stat().st_size > 100  # a group may exceed segment_bytes; it is never split
        assert s.segments == 3
        assert s.bytes_on_disk == sum(p.stat().st_size for p in files)


def test_a_record_bigger_than_a_segment_gets_its_own(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=64), ["a"]) as s:
        big = b"x" * 500
        s.append_many([b"a", big, b"b"])
        s.append(big)
        commit(s)
        assert [len(r.payload) for r in drain(s, "a")] == [1, 500, 1, 500]
        assert len(seg_files(directory)) == 2


def test_sync_covers_rolled_segments_and_the_directory(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = spool_mod._datasync
    dir_syncs: list[int] = []
    real_fsync = os.fsync

    def datasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            dir_syncs.append(fd)
        real_fsync(fd)

    with Spool.open(settings(directory, segment_bytes=64), ["a"]) as s:
        monkeypatch.setattr(spool_mod, "_datasync", datasync)
        monkeypatch.setattr(os, "fsync", fsync)
        for i in range(3):
            s.append(ev(i, 30))  # one record per segment
        s.flush()
        assert s.sync() == 3
        assert sorted(synced) == sorted(p.stat().st_ino for p in seg_files(directory))
        assert len(dir_syncs) == 1  # the new directory entries
        synced.clear()
        assert s.sync() == 3  # nothing pending: no fsync at all
        assert synced == []


def test_sync_on_a_worker_thread_overlaps_appends_and_rolls(directory: Path) -> None:
    s = Spool.open(settings(directory, segment_bytes=4096), ["a"])
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            while not stop.is_set():
                s.sync()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=syncer)
    t.start()
    try:
        for i in range(300):
            s.append_many([ev(i * 10 + j, 100) for j in range(10)])
            s.flush()
            assert s.durable_seq <= s.written_seq
    finally:
        stop.set()
        t.join()
    assert errors == []
    s.sync()
    assert s.durable_seq == 3000
    assert s.segments >= 100
    got = drain(s, "a")
    assert seqs(got) == list(range(1, 3001))
    assert got[1233] == Record(1234, ev(1233, 100))  # seq k carries ev(k - 1)
    s.close()


def test_flush_failure_cuts_back_and_keeps_the_buffer(
    spool: Spool, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.append(b"first")
    spool.flush()
    spool.append_many([b"second", b"third"])
    real_write = os.write

    def short_then_enospc(fd: int, data: Any) -> int:
        monkeypatch.setattr(os, "write", enospc)
        return real_write(fd, bytes(data)[:7])  # a partial write, then the disk is full

    def enospc(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_enospc)
    with pytest.raises(SpoolIOError) as info:
        spool.flush()
    assert info.value.retriable
    assert seg_files(directory)[0].stat().st_size == SEG_HDR + REC_HDR + 5  # the partial write was cut off
    assert spool.written_seq == 1
    monkeypatch.setattr(os, "write", real_write)
    spool.flush()
    spool.sync()
    assert drain(spool, "a") == [Record(1, b"first"), Record(2, b"second"), Record(3, b"third")]


def test_failed_fsync_fails_the_spool(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Spool.open(settings(directory), ["a"])
    s.append(b"x")
    s.flush()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_mod, "_datasync", eio)
    with pytest.raises(SpoolIOError) as info:
        s.sync()
    assert not info.value.retriable
    assert s.durable_seq == 0
    for call in (lambda: s.append(b"y"), s.flush, s.sync):
        with pytest.raises(SpoolIOError):
            call()
    s.close()  # releases descriptors without touching the data again
    monkeypatch.undo()
    with Spool.open(settings(directory), ["a"]) as again:
        assert seqs(drain(again, "a")) == [1]  # what reached the disk is recovered at the next start


# -- reading and acking ---------------------------------------------------------------------------------------


def test_read_limits(spool: Spool) -> None:
    spool.append_many([ev(i, 100) for i in range(10)])
    commit(spool)
    assert seqs(spool.read("a", 3)) == [1, 2, 3]
    assert seqs(spool.read("a", 100, 250)) == [4, 5]
    assert seqs(spool.read("a", 100, 1)) == [6]  # at least one record, whatever max_bytes says
    assert seqs(spool.read("a")) == [7, 8, 9, 10]
    assert spool.read("a") == []
    assert seqs(spool.read("b", 1000)) == list(range(1, 11))  # each sink has its own position
    with pytest.raises(ValueError, match="positive"):
        spool.read("a", 0)
    with pytest.raises(ValueError, match="unknown sink"):
        spool.read("zzz")


def test_records_bigger_than_the_read_chunk(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        big = [os.urandom(300_000), os.urandom(700_000)]
        s.append_many([b"x", big[0], b"y", big[1]])
        commit(s)
        assert [r.payload for r in drain(s, "a")] == [b"x", big[0], b"y", big[1]]


def test_cumulative_ack_and_validation(spool: Spool) -> None:
    spool.append_many([ev(i) for i in range(5)])
    commit(spool)
    spool.read("a", 3)
    with pytest.raises(ValueError, match="only 3 was read"):
        spool.ack("a", 4)
    spool.ack("a", 2)
    spool.ack("a", 1)  # going back is a no-op
    assert spool.acked_seq("a") == 2
    assert spool.records_pending("a") == 3
    with pytest.raises(ValueError, match="empty ack range"):
        spool.ack_range("a", 3, 2)
    with pytest.raises(ValueError, match="unknown sink"):
        spool.ack("zzz", 1)


def test_batches_in_flight_ack_out_of_order(spool: Spool) -> None:
    spool.append_many([ev(i) for i in range(10)])
    commit(spool)
    b1, b2, b3 = spool.read("a", 3), spool.read("a", 3), spool.read("a", 4)
    assert (seqs(b1), seqs(b2), seqs(b3)) == ([1, 2, 3], [4, 5, 6], [7, 8, 9, 10])
    spool.ack_range("a", 7, 10)
    spool.ack_range("a", 4, 6)
    assert spool.acked_seq("a") == 0  # 1..3 is still in flight
    assert spool.records_pending("a") == 10
    spool.ack_range("a", 1, 3)
    assert spool.acked_seq("a") == 10
    assert spool.records_pending("a") == 0


def test_overlapping_and_repeated_ack_ranges(spool: Spool) -> None:
    spool.append_many([ev(i) for i in range(10)])
    commit(spool)
    drain(spool, "a")
    spool.ack_range("a", 5, 8)
    spool.ack_range("a", 3, 6)
    spool.ack_range("a", 5, 8)
    assert spool.acked_seq("a") == 0
    spool.ack_range("a", 1, 2)
    assert spool.acked_seq("a") == 8
    spool.ack_range("a", 1, 4)  # already acked
    spool.ack_range("a", 9, 10)
    assert spool.acked_seq("a") == 10


def test_rewind_redelivers_from_the_acked_position(spool: Spool) -> None:
    spool.append_many([ev(i) for i in range(6)])
    commit(spool)
    spool.read("a", 2)
    spool.read("a", 2)
    spool.ack_range("a", 1, 2)
    spool.rewind("a")
    assert seqs(drain(spool, "a")) == [3, 4, 5, 6]


def test_ack_after_rewind_moves_the_read_position_forward(spool: Spool) -> None:
    spool.append_many([ev(i) for i in range(6)])
    commit(spool)
    spool.read("a", 4)
    spool.rewind("a")
    assert spool.read_seq("a") == 1
    spool.ack("a", 4)  # a batch that was in flight before the rewind completes
    assert spool.read_seq("a") == 5
    assert seqs(drain(spool, "a")) == [5, 6]


def test_rewind_inside_a_large_segment_uses_the_index(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        n = 3500  # ~3.5 MiB in one segment: several index entries
        s.append_many([ev(i, 1000) for i in range(n)])
        commit(s)
        drain(s, "a")
        s.ack("a", 2345)
        s.rewind("a")
        got = drain(s, "a")
        assert seqs(got) == list(range(2346, n + 1))
        assert got[0].payload == ev(2345, 1000)


def test_sizes_and_lag(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=128), ["a", "b"]) as s:
        assert oldest_unacked(s) is None
        s.append_many([ev(i, 40) for i in range(6)])
        assert s.records_pending("a") == 6  # buffered records count as lag
        assert oldest_unacked(s) == 1
        commit(s)
        s.append_many([ev(i, 40) for i in range(6, 9)])
        commit(s)
        assert s.bytes_on_disk == sum(p.stat().st_size for p in seg_files(directory))
        drain(s, "a")
        drain(s, "b")
        s.ack("a", 9)
        s.ack("b", 4)
        assert (s.records_pending("a"), s.records_pending("b")) == (0, 5)
        assert oldest_unacked(s) == 5
        s.ack("b", 9)
        assert oldest_unacked(s) is None
        assert s.bytes_on_disk == sum(p.stat().st_size for p in seg_files(directory))


# -- segment removal and limits -------------------------------------------------------------------------------


def test_segments_are_removed_once_every_sink_acked_them(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=100), ["a", "b"]) as s:
        for i in range(6):
            s.append(ev(i, 50))  # one record per segment
        commit(s)
        assert len(seg_files(directory)) == 6
        drain(s, "a")
        drain(s, "b")
        s.ack("a", 6)
        assert len(seg_files(directory)) == 6  # b still needs them
        s.ack("b", 3)
        assert [p.name[-9:-4] for p in seg_files(directory)] == ["00004", "00005", "00006"]
        s.ack("b", 6)
        assert [p.name for p in seg_files(directory)] == ["spool-00000000000000000006.seg"]  # never the active one
        assert s.bytes_on_disk == seg_files(directory)[0].stat().st_size
        assert s.append(ev(7, 50)) == 7
        commit(s)
        assert seqs(drain(s, "a")) == [7]


def test_max_bytes_is_a_hard_limit(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=200, max_bytes=400), ["a"]) as s:
        for i in range(4):
            s.append(ev(i, 60))  # 24 + 4 * 76 = 328 bytes, no roll
        with pytest.raises(SpoolFullError) as info:
            s.append(ev(4, 60))
        assert info.value.limit == 400
        assert s.size_bytes + info.value.needed > 400
        assert s.size_bytes <= 400
        last = s.last_seq
        with pytest.raises(SpoolFullError):
            s.append_many([b"x", b"y", b"z"] * 5)  # all or nothing
        assert s.last_seq == last  # no seq was consumed
        commit(s)
        assert s.bytes_on_disk <= 400
        drain(s, "a")
        s.ack("a", last)  # frees every segment but the active one
        assert s.append(ev(99, 60)) == last + 1


# -- crash and recovery ---------------------------------------------------------------------------------------


def test_synced_records_survive_a_crash_and_unacked_ones_come_back(directory: Path) -> None:
    s = Spool.open(settings(directory, segment_bytes=256), ["a", "b"])
    s.append_many([ev(i) for i in range(20)])
    commit(s)
    drain(s, "a")
    s.ack("a", 12)
    s.checkpoint()
    s.ack("a", 15)  # acked, not checkpointed: comes back (at least once)
    drain(s, "b")
    s.append(b"buffered, never flushed")  # lost with the process
    s.abandon()
    with Spool.open(settings(directory, segment_bytes=256), ["a", "b"]) as again:
        report = again.recovery
        assert report is not None
        assert report.torn_bytes == 0
        assert report.records_recovered == 20
        assert report.cursors == {"a": 12, "b": 0}
        assert seqs(drain(again, "a")) == list(range(13, 21))
        assert seqs(drain(again, "b")) == list(range(1, 21))
        assert again.append(b"next") == 21


def test_clean_close_checkpoints_so_nothing_acked_comes_back(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        s.append_many([ev(i) for i in range(5)])
        commit(s)
        drain(s, "a")
        s.ack("a", 3)
    with Spool.open(settings(directory), ["a"]) as again:
        assert seqs(drain(again, "a")) == [4, 5]


def test_checkpoint_only_when_something_changed(spool: Spool, directory: Path) -> None:
    assert cursors_dirty(spool)  # new sinks: their starting point is worth persisting
    assert spool.checkpoint()
    assert not cursors_dirty(spool)
    assert not spool.checkpoint()
    spool.append(b"x")
    commit(spool)
    spool.read("a")
    spool.ack("a", 1)
    assert cursors_dirty(spool)
    assert spool.checkpoint()
    assert not spool.checkpoint()
    assert json.loads((directory / "cursors.json").read_bytes()) == {"version": 1, "acked": {"a": 1, "b": 0}}


def test_a_leftover_temp_cursor_file_is_ignored(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        s.append(b"x")
        commit(s)
        s.read("a")
        s.ack("a", 1)
    (directory / "cursors.json.tmp").write_bytes(b'{"version": 1, "acked": {"a": 0')  # a crash mid-checkpoint
    with Spool.open(settings(directory), ["a"]) as again:
        assert again.acked_seq("a") == 1
    assert not (directory / "cursors.json.tmp").exists()


@pytest.mark.parametrize(
    "content", [b"not json", b'{"version": 2, "acked": {}}', b'{"version": 1, "acked": {"a": -1}}']
)
def test_unreadable_cursors_redeliver_everything(directory: Path, content: bytes) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        s.append_many([b"1", b"2"])
        commit(s)
        drain(s, "a")
        s.ack("a", 2)
    (directory / "cursors.json").write_bytes(content)
    with Spool.open(settings(directory), ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.cursors_reset
        assert seqs(drain(again, "a")) == [1, 2]
        assert cursors_dirty(again)


def test_torn_tail_is_cut_and_counted(directory: Path) -> None:
    s = Spool.open(settings(directory), ["a"])
    s.append_many([ev(i) for i in range(5)])
    commit(s)
    s.abandon()
    path = seg_files(directory)[0]
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 10)  # the last record lost its end
    with Spool.open(settings(directory), ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.torn_bytes == REC_HDR + 20 - 10
        assert again.recovery.records_recovered == 4
        assert path.stat().st_size == size - REC_HDR - 20
        assert again.append(b"new") == 5
        commit(again)
        got = drain(again, "a")
        assert seqs(got) == [1, 2, 3, 4, 5]
        assert got[-1].payload == b"new"


@pytest.mark.parametrize(
    "tail",
    [b"\0" * 100, b"\xff" * 3, struct.pack("<IIQ", 5, 0, 6) + b"abcde", struct.pack("<IIQ", 10**6, 0, 6) + b"x"],
    ids=["zeros", "garbage", "bad-crc", "length-past-eof"],
)
def test_junk_after_the_last_record_is_cut(directory: Path, tail: bytes) -> None:
    s = Spool.open(settings(directory), ["a"])
    s.append_many([ev(i) for i in range(5)])
    commit(s)
    s.abandon()
    path = seg_files(directory)[0]
    good = path.stat().st_size
    with path.open("ab") as f:
        f.write(tail)
    with Spool.open(settings(directory), ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.torn_bytes == len(tail)
        assert path.stat().st_size == good
        assert seqs(drain(again, "a")) == [1, 2, 3, 4, 5]


def test_corruption_in_an_older_segment_cuts_it_and_keeps_later_ones(directory: Path) -> None:
    cfg = settings(directory, segment_bytes=150)
    s = Spool.open(cfg, ["a"])
    for group in range(3):
        s.append_many([ev(group * 3 + i) for i in range(3)])  # 3 records (108 bytes) per segment
    commit(s)
    s.abandon()
    first = seg_files(directory)[0]
    offset = records_in(first)[1][0]  # the second record of the first segment
    data = bytearray(first.read_bytes())
    data[offset + REC_HDR + 3] ^= 0xFF
    first.write_bytes(bytes(data))
    with Spool.open(cfg, ["a"]) as again:
        report = again.recovery
        assert report is not None
        assert report.corrupt_bytes == 2 * (REC_HDR + 20)
        assert report.torn_bytes == 0
        assert report.records_lost == 2
        assert report.records_recovered == 7
        assert first.stat().st_size == offset
        got = drain(again, "a")
        assert seqs(got) == [1, 4, 5, 6, 7, 8, 9]
        assert again.records_pending("a") == 7
        again.ack("a", 9)
        assert again.records_pending("a") == 0
        assert oldest_unacked(again) is None


def test_zero_length_and_short_segment_files_are_removed(directory: Path) -> None:
    with Spool.open(settings(directory, segment_bytes=64), ["a"]) as s:
        s.append_many([ev(1, 30)])
        s.append_many([ev(2, 30)])
        commit(s)
        s.read("a")
    s2 = Spool.open(settings(directory, segment_bytes=64), ["a"])
    s2.abandon()
    (directory / "spool-00000000000000000003.seg").write_bytes(b"")
    (directory / "spool-00000000000000000004.seg").write_bytes(b"FPDSP")
    with Spool.open(settings(directory, segment_bytes=64), ["a"]) as again:
        report = again.recovery
        assert report is not None
        assert report.segments_found == 4
        assert report.segments_removed == 2
        assert report.torn_bytes == 5
        assert [p.name[-7:-4] for p in seg_files(directory)] == ["001", "002"]
        assert again.append(b"x") == 3
        commit(again)
        assert seqs(drain(again, "a")) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["magic", "checksum", "version", "name"])
def test_a_segment_with_a_bad_header_is_quarantined(directory: Path, damage: str) -> None:
    cfg = settings(directory, segment_bytes=64)
    with Spool.open(cfg, ["a"]) as s:
        for i in range(3):
            s.append(ev(i, 30))
        commit(s)
    middle = seg_files(directory)[1]
    data = bytearray(middle.read_bytes())
    if damage == "magic":
        data[0:8] = b"XXXXXXXX"
    elif damage == "checksum":
        data[20] ^= 1
    elif damage == "version":
        data[8:12] = struct.pack("<I", 9)
        data[20:24] = struct.pack("<I", zlib.crc32(bytes(data[:20])))
    else:
        data[12:20] = struct.pack("<Q", 77)
        data[20:24] = struct.pack("<I", zlib.crc32(bytes(data[:20])))
    middle.write_bytes(bytes(data))
    with Spool.open(cfg, ["a"]) as again:
        report = again.recovery
        assert report is not None
        assert report.quarantined == (middle.name,)
        assert report.corrupt_bytes == len(data)
        assert (directory / (middle.name + ".corrupt")).exists()
        assert seqs(drain(again, "a")) == [1, 3]


def test_next_seq_stays_above_every_acked_seq(directory: Path) -> None:
    """Under ``never`` an OS crash can lose records a sink already acked: their seqs must not be reused."""
    cfg = settings(directory, fsync=SpoolFsync.never)
    s = Spool.open(cfg, ["a"])
    s.append_many([ev(i) for i in range(5)])
    s.flush()
    drain(s, "a")
    s.ack("a", 5)
    s.checkpoint()
    s.abandon()
    path = seg_files(directory)[0]
    with path.open("r+b") as f:
        f.truncate(SEG_HDR + 2 * (REC_HDR + 20))  # the OS lost records 3..5
    with Spool.open(cfg, ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.next_seq == 6
        assert again.append(b"new") == 6
        again.flush()
        assert [p.name for p in seg_files(directory)][-1] == "spool-00000000000000000006.seg"
        assert drain(again, "a") == [Record(6, b"new")]


def test_removed_sink_is_dropped_and_new_sink_starts_at_the_oldest_retained_record(directory: Path) -> None:
    cfg = settings(directory, segment_bytes=100)
    with Spool.open(cfg, ["a", "b"]) as s:
        for i in range(5):
            s.append(ev(i, 50))
        commit(s)
        drain(s, "a")
        drain(s, "b")
        s.ack("a", 5)
        s.ack("b", 2)  # segments 1 and 2 go; 3..5 stay for b
    with Spool.open(cfg, ["a", "c"]) as again:
        report = again.recovery
        assert report is not None
        assert report.dropped_sinks == ("b",)
        assert report.new_sinks == ("c",)
        assert report.cursors == {"a": 5, "c": 2}
        assert seqs(drain(again, "c")) == [3, 4, 5]
        assert drain(again, "a") == []
        assert cursors_dirty(again)
        again.checkpoint()
        assert set(json.loads((directory / "cursors.json").read_bytes())["acked"]) == {"a", "c"}
        assert len(seg_files(directory)) == 3  # b no longer holds anything back once c catches up
        again.ack("c", 5)
        assert len(seg_files(directory)) == 1


def test_cursor_behind_removed_segments_is_moved_up(directory: Path) -> None:
    cfg = settings(directory, segment_bytes=100)
    s = Spool.open(cfg, ["a"])
    for i in range(4):
        s.append(ev(i, 50))
    commit(s)
    drain(s, "a")
    s.checkpoint()
    s.ack("a", 3)  # removes segments 1..3; the checkpoint still says 0
    s.abandon()
    with Spool.open(cfg, ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.cursors == {"a": 3}
        assert seqs(drain(again, "a")) == [4]


def test_records_changed_on_disk_after_recovery_are_reported(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        s.append_many([ev(1), ev(2)])
        commit(s)
        path = seg_files(directory)[0]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(SpoolCorruptError, match="checksum"):
            drain(s, "a")


def test_ack_ranges_join_across_seqs_lost_to_corruption(directory: Path) -> None:
    cfg = settings(directory, segment_bytes=150)
    s = Spool.open(cfg, ["a"])
    for group in range(3):
        s.append_many([ev(group * 3 + i) for i in range(3)])
    commit(s)
    s.abandon()
    first = seg_files(directory)[0]
    with first.open("r+b") as f:
        f.truncate(records_in(first)[1][0] + 5)  # records 2 and 3 are gone; the seqs jump from 1 to 4
    with Spool.open(cfg, ["a"]) as again:
        assert seqs(again.read("a", 1)) == [1]
        assert seqs(again.read("a", 2)) == [4, 5]
        again.ack_range("a", 4, 5)
        assert again.acked_seq("a") == 0  # 1 is still in flight
        again.ack_range("a", 1, 1)
        assert again.acked_seq("a") == 5  # 2 and 3 do not exist: nothing is missing between 1 and 4
        assert seqs(again.read("a")) == [6, 7, 8, 9]
        again.ack_range("a", 6, 9)
        assert again.records_pending("a") == 0


def test_seqs_never_repeat_after_a_crash_even_when_everything_was_acked(directory: Path) -> None:
    cfg = settings(directory, segment_bytes=64)
    s = Spool.open(cfg, ["a"])
    s.checkpoint()
    s.append(ev(1, 30))
    commit(s)
    drain(s, "a")
    s.ack("a", 1)
    s.append(ev(2, 30))  # rolls; segment 1 stays: it holds the newest durable record
    s.flush()
    assert len(seg_files(directory)) == 2
    s.abandon()
    seg_files(directory)[-1].unlink()  # an OS crash: the unsynced new segment never reached the directory
    with Spool.open(cfg, ["a"]) as again:
        assert again.last_seq == 1
        assert again.append(b"next") == 2
        commit(again)
        assert again.acked_seq("a") == 0  # the ack of 1 was not checkpointed: 1 comes again (at least once)
        assert seqs(drain(again, "a")) == [1, 2]
        again.ack("a", 2)
        assert [p.name for p in seg_files(directory)] == ["spool-00000000000000000002.seg"]
        assert again.collect() == 0


def test_append_many_takes_any_iterable(spool: Spool) -> None:
    assert spool.append_many(iter([b"a", b"b"])) == range(1, 3)  # type: ignore[arg-type]
    commit(spool)
    assert drain(spool, "a") == [Record(1, b"a"), Record(2, b"b")]


def test_a_segment_overlapping_the_previous_one_is_quarantined(directory: Path) -> None:
    with Spool.open(settings(directory), ["a"]) as s:
        s.append_many([b"1", b"2", b"3"])
        commit(s)
    head = b"FPDSPOOL" + struct.pack("<IQ", 1, 2)
    head += struct.pack("<I", zlib.crc32(head))
    rogue = directory / "spool-00000000000000000002.seg"
    rogue.write_bytes(head + struct.pack("<IIQ", 1, zlib.crc32(b"X"), 2) + b"X")
    with Spool.open(settings(directory), ["a"]) as again:
        assert again.recovery is not None
        assert again.recovery.quarantined == (rogue.name,)
        assert seqs(drain(again, "a")) == [1, 2, 3]
        assert again.append(b"4") == 4


def test_checkpoint_on_a_worker_thread_while_acks_go_on(directory: Path) -> None:
    s = Spool.open(settings(directory), ["a"])
    s.append_many([ev(i) for i in range(2000)])
    commit(s)
    stop = threading.Event()
    errors: list[BaseException] = []

    def checkpointer() -> None:
        try:
            while not stop.is_set():
                s.checkpoint()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=checkpointer)
    t.start()
    try:
        for batch in iter(lambda: s.read("a", 10), []):
            s.ack_range("a", batch[0].seq, batch[-1].seq)
    finally:
        stop.set()
        t.join()
    assert errors == []
    s.checkpoint()
    s.abandon()
    assert json.loads((directory / "cursors.json").read_bytes())["acked"] == {"a": 2000}
