"""Unit tests for the JSON Lines writer: names, rotation, fsync policies, torn-tail repair, error handling."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.errors import SinkError
from fpolicyd.storage import jsonl
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings, JsonlWriter

T0 = 1714557600.0  # 2024-05-01T10:00:00Z
NAME_RE = re.compile(r"fpolicy_events_(\d{4}-\d{2}-\d{2})_(\d{6})_(\d{6})\.jsonl")


def settings(directory: Path, **kw: Any) -> JsonlSettings:
    return JsonlSettings(directory=directory, **kw)


def files(directory: Path, prefix: str = "fpolicy_events") -> list[Path]:
    return sorted(directory.glob(f"{prefix}_*.jsonl"))


def read_lines(directory: Path) -> list[bytes]:
    out: list[bytes] = []
    for p in files(directory):
        out.extend(p.read_bytes().splitlines())
    return out


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[JsonlWriter]:
    w = JsonlWriter(settings(tmp_path / "out", fsync=FsyncPolicy.never))
    w.open(T0)
    try:
        yield w
    finally:
        w.close()


class FsyncCounter:
    """Replaces os.fsync; records whether each call was on a directory or a file."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self.real = real
        self.files = 0
        self.dirs = 0
        self.fail_with: int | None = None

    def __call__(self, fd: int) -> None:
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dirs += 1
        else:
            self.files += 1
        self.real(fd)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncCounter:
    counter = FsyncCounter(os.fsync)
    monkeypatch.setattr(os, "fsync", counter)
    return counter


# -- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"prefix": ""}, "prefix"),
        ({"prefix": "a/b"}, "prefix"),
        ({"prefix": ".hidden"}, "prefix"),
        ({"max_file_bytes": 0}, "max_file_bytes"),
        ({"max_file_bytes": -5}, "max_file_bytes"),
        ({"max_file_bytes": True}, "max_file_bytes"),
        ({"max_file_age_s": 0.0}, "max_file_age_s"),
        ({"max_file_age_s": float("inf")}, "max_file_age_s"),
        ({"fsync_interval_s": -1.0}, "fsync_interval_s"),
        ({"fsync_interval_s": float("nan")}, "fsync_interval_s"),
        ({"fsync": "sometimes"}, "fsync"),
    ],
)
def test_settings_reject_bad_values(tmp_path: Path, kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        JsonlSettings(directory=tmp_path, **kw)


def test_settings_reject_str_directory() -> None:
    with pytest.raises(ValueError, match=r"^directory:"):
        JsonlSettings(directory="/tmp/x")  # type: ignore[arg-type]


def test_settings_defaults_and_policy_coercion(tmp_path: Path) -> None:
    s = JsonlSettings(directory=tmp_path, fsync="always")  # type: ignore[arg-type]
    assert s.fsync is FsyncPolicy.always
    d = JsonlSettings(directory=tmp_path)
    assert (d.prefix, d.max_file_bytes, d.max_file_age_s, d.fsync, d.fsync_interval_s) == (
        "fpolicy_events",
        128 * 1024 * 1024,
        3600.0,
        FsyncPolicy.interval,
        1.0,
    )


# -- names, permissions, lifecycle ------------------------------------------------------------------------


def test_file_name_is_utc_and_keeps_prefix(writer: JsonlWriter) -> None:
    path = writer.current_path
    assert path is not None
    m = NAME_RE.fullmatch(path.name)
    assert m is not None
    assert m.group(1, 2) == ("2024-05-01", "100000")


def test_custom_prefix(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path, prefix="svm1", fsync=FsyncPolicy.never)) as w:
        w.open(T0 + 3661.5)
        w.write_batch([b"{}"], T0 + 3661.5)
        path = w.current_path
    assert path is not None
    assert re.fullmatch(r"svm1_2024-05-01_110101_\d{6}\.jsonl", path.name)


def test_seq_bumps_past_existing_files_of_same_second(tmp_path: Path) -> None:
    tmp_path.joinpath("fpolicy_events_2024-05-01_100000_000500.jsonl").write_bytes(b"{}\n")
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"{}"], T0)
        path = w.current_path
    assert path is not None
    m = NAME_RE.fullmatch(path.name)
    assert m is not None
    assert int(m.group(3)) > 500
    assert files(tmp_path)[-1] == path  # sorts after the older file


def test_name_collision_bumps_seq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file that appears after the directory scan (another writer) still cannot be clobbered.
    taken = tmp_path / "x"
    real_open = os.open

    def racing_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        p = Path(path)
        if flags & os.O_EXCL and not taken.exists():
            p.write_bytes(b"{}\n")
            taken.write_bytes(b"")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", racing_open)
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"[1]"], T0)
    contents = [p.read_bytes() for p in files(tmp_path)]
    assert contents == [b"{}\n", b"[1]\n"]


def test_permissions(tmp_path: Path, umask022: None) -> None:
    directory = tmp_path / "a" / "b"
    with JsonlWriter(settings(directory, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"{}"], T0)
        path = w.current_path
    assert path is not None
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_close_is_idempotent_and_write_after_close_fails(tmp_path: Path) -> None:
    w = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.interval))
    w.open(T0)
    w.write_batch([b"{}"], T0)
    w.close()
    w.close()
    assert w.current_path is None
    with pytest.raises(RuntimeError, match="not open"):
        w.write_batch([b"{}"], T0)
    assert read_lines(tmp_path) == [b"{}"]


def test_write_before_open_and_double_open(tmp_path: Path) -> None:
    w = JsonlWriter(settings(tmp_path))
    with pytest.raises(RuntimeError, match="not open"):
        w.write_batch([b"{}"], T0)
    w.open(T0)
    with pytest.raises(RuntimeError, match="already open"):
        w.open(T0)
    w.close()


def test_empty_file_is_removed_on_close(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path)) as w:
        w.open(T0)
        assert w.current_path is not None
        assert w.current_path.exists()
    assert files(tmp_path) == []
    assert w.files_written == 0


def test_reopen_after_close_appends_new_file(tmp_path: Path) -> None:
    w = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never))
    w.open(T0)
    w.write_batch([b"1"], T0)
    w.close()
    w.open(T0)
    w.write_batch([b"2"], T0)
    w.close()
    assert len(files(tmp_path)) == 2
    assert read_lines(tmp_path) == [b"1", b"2"]


def test_counters_and_return_value(writer: JsonlWriter) -> None:
    assert writer.write_batch([b'{"a":1}', b"[]"], T0) == 11
    assert writer.write_batch([], T0) == 0
    assert (writer.bytes_written, writer.files_written) == (11, 1)


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b'{"a":\n1}', b"", b"\n"])
def test_bad_line_rejects_whole_batch(writer: JsonlWriter, bad: bytes) -> None:
    writer.write_batch([b"{}"], T0)
    with pytest.raises(ValueError, match="line 1"):
        writer.write_batch([b"[1]", bad, b"[2]"], T0)
    assert writer.current_path is not None
    assert writer.current_path.read_bytes() == b"{}\n"
    assert writer.bytes_written == 3


# -- rotation ---------------------------------------------------------------------------------------------


def test_rotation_by_size(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path, max_file_bytes=10, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"1234"], T0)  # 5 bytes
        w.write_batch([b"5678"], T0)  # 10 bytes: exactly at the limit, same file
        w.write_batch([b"9"], T0)  # would be 12: new file
    assert [p.read_bytes() for p in files(tmp_path)] == [b"1234\n5678\n", b"9\n"]
    assert w.files_written == 2


def test_oversized_batch_gets_its_own_file(tmp_path: Path) -> None:
    big = [b"x" * 30, b"y" * 30]
    with JsonlWriter(settings(tmp_path, max_file_bytes=10, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"a"], T0)
        w.write_batch(big, T0)
        w.write_batch([b"b"], T0)
    contents = [p.read_bytes() for p in files(tmp_path)]
    assert contents == [b"a\n", b"x" * 30 + b"\n" + b"y" * 30 + b"\n", b"b\n"]


def test_oversized_first_batch_uses_fresh_file(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path, max_file_bytes=4, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        first = w.current_path
        w.write_batch([b"0123456789"], T0)
        assert w.current_path == first
    assert len(files(tmp_path)) == 1


def test_rotation_by_age(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path, max_file_age_s=60.0, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"1"], T0 + 10)
        w.write_batch([b"2"], T0 + 59.9)
        first = w.current_path
        w.write_batch([b"3"], T0 + 60)
        second = w.current_path
    assert first != second
    assert second is not None
    assert second.name.startswith("fpolicy_events_2024-05-01_100100_")
    assert [p.read_bytes() for p in files(tmp_path)] == [b"1\n2\n", b"3\n"]


def test_rotation_by_utc_date(tmp_path: Path) -> None:
    before_midnight = 1714607999.5  # 2024-05-01T23:59:59.5Z
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(before_midnight)
        w.write_batch([b"1"], before_midnight)
        w.write_batch([b"2"], before_midnight + 0.5)
    names = [p.name for p in files(tmp_path)]
    assert len(names) == 2
    assert names[0].startswith("fpolicy_events_2024-05-01_235959_")
    assert names[1].startswith("fpolicy_events_2024-05-02_000000_")


def test_idle_rotation_leaves_no_empty_file(tmp_path: Path) -> None:
    with JsonlWriter(settings(tmp_path, max_file_age_s=60.0, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"1"], T0 + 7200)
    assert [p.read_bytes() for p in files(tmp_path)] == [b"1\n"]


# -- fsync policies ---------------------------------------------------------------------------------------


def test_fsync_always(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.always)) as w:
        w.open(T0)
        assert (fsyncs.files, fsyncs.dirs) == (0, 1)  # the new directory entry
        for i in range(3):
            w.write_batch([b"{}"], T0 + i * 0.001)
        assert fsyncs.files == 3
        assert not w.maybe_sync(T0 + 100)
    assert fsyncs.files == 3  # nothing pending at close


def test_fsync_interval(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.interval, fsync_interval_s=1.0)) as w:
        w.open(T0)
        w.write_batch([b"{}"], T0 + 0.1)
        w.write_batch([b"{}"], T0 + 0.5)
        assert fsyncs.files == 0
        assert not w.maybe_sync(T0 + 0.9)
        assert w.maybe_sync(T0 + 1.0)
        assert fsyncs.files == 1
        assert not w.maybe_sync(T0 + 5.0)  # nothing pending
        w.write_batch([b"{}"], T0 + 1.5)
        assert fsyncs.files == 1
        w.write_batch([b"{}"], T0 + 2.0)  # an interval since the last fsync: synced on write
        assert fsyncs.files == 2
        w.write_batch([b"{}"], T0 + 2.1)
    assert fsyncs.files == 3  # close syncs the pending batch
    assert fsyncs.dirs == 1


def test_fsync_interval_on_rotation(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, max_file_bytes=3, fsync_interval_s=100.0)) as w:
        w.open(T0)
        w.write_batch([b"ab"], T0)
        w.write_batch([b"cd"], T0)  # rotates: the first file is synced before close
        assert (fsyncs.files, fsyncs.dirs) == (1, 2)


def test_fsync_never(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, max_file_bytes=3, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        for i in range(5):
            w.write_batch([b"ab"], T0 + i * 10)
            assert w.current_path is not None
            assert w.current_path.read_bytes() == b"ab\n"  # in the kernel without flush or fsync
        assert not w.maybe_sync(T0 + 100)
    assert (fsyncs.files, fsyncs.dirs) == (0, 0)


def test_fsync_failure_drops_batch_and_moves_to_new_file(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.always)) as w:
        w.open(T0)
        w.write_batch([b"1"], T0)
        first = w.current_path
        fsyncs.fail_with = errno.EIO
        with pytest.raises(SinkError) as info:
            w.write_batch([b"2"], T0 + 1)
        assert info.value.retriable
        assert w.current_path is None
        fsyncs.fail_with = None
        w.write_batch([b"2"], T0 + 2)
        assert w.current_path != first
    assert [p.read_bytes() for p in files(tmp_path)] == [b"1\n", b"2\n"]


def test_maybe_sync_failure_raises(tmp_path: Path, fsyncs: FsyncCounter) -> None:
    with JsonlWriter(settings(tmp_path, fsync_interval_s=10.0)) as w:
        w.open(T0)
        w.write_batch([b"1"], T0)
        fsyncs.fail_with = errno.EIO
        with pytest.raises(SinkError):
            w.maybe_sync(T0 + 10)
        fsyncs.fail_with = None
        w.write_batch([b"2"], T0 + 11)
    assert read_lines(tmp_path) == [b"1", b"2"]


# -- write errors -----------------------------------------------------------------------------------------


def half_then_fail(real: Callable[[int, Any], int], code: int) -> Callable[[int, Any], int]:
    def fake_write(fd: int, data: Any) -> int:
        real(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(code, os.strerror(code))

    return fake_write


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        (errno.ENOSPC, True),
        (errno.EIO, True),
        (errno.EDQUOT, True),
        (errno.EACCES, False),
        (errno.EROFS, False),
        (errno.ENAMETOOLONG, False),
    ],
)
def test_write_error_restores_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, retriable: bool) -> None:
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b'{"n":1}'], T0)
        path = w.current_path
        assert path is not None
        real_write = os.write
        monkeypatch.setattr(os, "write", half_then_fail(real_write, code))
        with pytest.raises(SinkError) as info:
            w.write_batch([b'{"n":2}', b'{"n":3}'], T0)
        assert info.value.retriable is retriable
        assert errno.errorcode[code] in str(info.value)
        assert path.read_bytes() == b'{"n":1}\n'
        assert w.bytes_written == 8
        monkeypatch.setattr(os, "write", real_write)
        w.write_batch([b'{"n":2}', b'{"n":3}'], T0)
        assert w.current_path == path
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data)[:3])

    monkeypatch.setattr(os, "write", short_write)
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        assert w.write_batch([b"abcdef", b"ghij"], T0) == 12
    assert calls == [12, 9, 6, 3]
    assert read_lines(tmp_path) == [b"abcdef", b"ghij"]


def test_single_write_call_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = []

    def counting_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"1", b"22", b"333"], T0)
    assert calls == [9]


def test_failed_truncate_abandons_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never)) as w:
        w.open(T0)
        w.write_batch([b"1"], T0)
        first = w.current_path
        real_write = os.write
        monkeypatch.setattr(os, "write", half_then_fail(real_write, errno.EIO))

        def broken_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "nope")

        monkeypatch.setattr(os, "ftruncate", broken_truncate)
        with pytest.raises(SinkError):
            w.write_batch([b"2222"], T0)
        monkeypatch.undo()
        w.write_batch([b"2222"], T0)
        assert w.current_path != first
    # The torn file is repaired by the next open.
    w2 = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never))
    assert w2.open(T0 + 1) == 2
    w2.close()
    assert read_lines(tmp_path) == [b"1", b"2222"]


def test_create_error_is_sink_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"")
    w = JsonlWriter(settings(target / "sub"))
    with pytest.raises(SinkError) as info:
        w.open(T0)
    assert not info.value.retriable  # ENOTDIR: needs a human


def test_retriable_set_is_explicit() -> None:
    assert errno.ENOSPC in jsonl._RETRIABLE_ERRNOS
    assert errno.EACCES not in jsonl._RETRIABLE_ERRNOS


# -- torn-tail repair -------------------------------------------------------------------------------------


def test_repair_torn_tail(tmp_path: Path) -> None:
    torn = tmp_path / "fpolicy_events_2024-04-30_120000_000001.jsonl"
    torn.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    no_newline = tmp_path / "fpolicy_events_old.jsonl"  # reference pipeline names match the glob too
    no_newline.write_bytes(b'{"partial"')
    clean = tmp_path / "fpolicy_events_2024-04-30_130000_000002.jsonl"
    clean.write_bytes(b"{}\n")
    empty = tmp_path / "fpolicy_events_2024-04-30_140000_000003.jsonl"
    empty.write_bytes(b"")
    other = tmp_path / "other_2024-04-30_120000_000001.jsonl"
    other.write_bytes(b"torn")
    not_jsonl = tmp_path / "fpolicy_events_notes.txt"
    not_jsonl.write_bytes(b"torn")

    w = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.always))
    assert w.open(T0) == 5 + 10
    w.close()
    assert w.repaired_bytes == 15
    assert torn.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert no_newline.read_bytes() == b""
    assert clean.read_bytes() == b"{}\n"
    assert empty.read_bytes() == b""
    assert other.read_bytes() == b"torn"
    assert not_jsonl.read_bytes() == b"torn"


def test_repair_long_torn_line(tmp_path: Path) -> None:
    torn = tmp_path / "fpolicy_events_x.jsonl"
    tail = b"y" * (3 * jsonl._TAIL_CHUNK + 17)
    torn.write_bytes(b"[1]\n" + tail)
    w = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never))
    assert w.open(T0) == len(tail)
    w.close()
    assert torn.read_bytes() == b"[1]\n"


def test_repair_skips_symlinks_and_directories(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"torn")
    out = tmp_path / "out"
    out.mkdir()
    (out / "fpolicy_events_link.jsonl").symlink_to(outside)
    (out / "fpolicy_events_dir.jsonl").mkdir()
    w = JsonlWriter(settings(out, fsync=FsyncPolicy.never))
    assert w.open(T0) == 0
    w.close()
    assert outside.read_bytes() == b"torn"


def test_repair_counter_accumulates_over_reopen(tmp_path: Path) -> None:
    w = JsonlWriter(settings(tmp_path, fsync=FsyncPolicy.never))
    (tmp_path / "fpolicy_events_a.jsonl").write_bytes(b"ab")
    assert w.open(T0) == 2
    w.close()
    (tmp_path / "fpolicy_events_b.jsonl").write_bytes(b"[]\nabc")
    assert w.open(T0) == 3
    w.close()
    assert w.repaired_bytes == 5
