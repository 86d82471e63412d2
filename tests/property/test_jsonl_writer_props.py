"""Property tests for the JSON Lines writer: what is read back is exactly what was written, never torn."""

from __future__ import annotations

import errno
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.errors import SinkError
from fpolicyd.storage.jsonl import FsyncPolicy, JsonlSettings, JsonlWriter

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
lines = json_values.map(orjson.dumps)
batches = st.lists(st.lists(lines, max_size=6), min_size=1, max_size=15)
# Start somewhere within a day of a UTC midnight so date rotation is exercised.
starts = st.floats(min_value=1714607999.0 - 86400, max_value=1714607999.0 + 5)
steps = st.floats(min_value=0.0, max_value=900.0)
PROP_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_back(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}_*.jsonl"))


@PROP_SETTINGS
@given(
    batches=batches,
    start=starts,
    steps=st.lists(steps, min_size=15, max_size=15),
    limits=st.tuples(
        st.integers(min_value=1, max_value=200),  # max_file_bytes
        st.floats(min_value=1.0, max_value=3600.0),  # max_file_age_s
        st.sampled_from(list(FsyncPolicy)),
    ),
)
def test_read_back_equals_written(
    batches: list[list[bytes]], start: float, steps: list[float], limits: tuple[int, float, FsyncPolicy]
) -> None:
    max_file_bytes, max_file_age_s, policy = limits
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "out"
        cfg = JsonlSettings(
            directory=directory,
            max_file_bytes=max_file_bytes,
            max_file_age_s=max_file_age_s,
            fsync=policy,
            fsync_interval_s=0.5,
        )
        batches_in: dict[Path, int] = defaultdict(int)
        now = start
        total = 0
        with JsonlWriter(cfg) as writer:
            assert writer.open(now) == 0
            for batch, step in zip(batches, steps, strict=False):
                now += step
                n = writer.write_batch(batch, now)
                assert n == sum(len(line) + 1 for line in batch)
                total += n
                if batch:
                    assert writer.current_path is not None
                    batches_in[writer.current_path] += 1
                writer.maybe_sync(now)

        written = [line for batch in batches for line in batch]
        paths = read_back(directory, cfg.prefix)
        assert set(paths) == set(batches_in)
        read: list[bytes] = []
        for path in paths:
            data = path.read_bytes()
            assert data.endswith(b"\n")
            assert len(data) <= max_file_bytes or batches_in[path] == 1
            read.extend(data.split(b"\n")[:-1])
        assert read == written
        assert [orjson.loads(line) for line in read] == [orjson.loads(line) for line in written]
        assert writer.bytes_written == total == sum(p.stat().st_size for p in paths)
        assert writer.files_written == len(paths)


@PROP_SETTINGS
@given(
    batches=st.lists(st.lists(lines, min_size=1, max_size=5), min_size=1, max_size=12),
    failures=st.lists(st.booleans(), min_size=12, max_size=12),
    max_file_bytes=st.integers(min_value=1, max_value=120),
    code=st.sampled_from([errno.ENOSPC, errno.EIO]),
)
def test_failed_writes_never_tear_lines(
    batches: list[list[bytes]], failures: list[bool], max_file_bytes: int, code: int
) -> None:
    real_write = os.write
    fail_next = [False]

    def flaky_write(fd: int, data: Any) -> int:
        if fail_next[0]:
            fail_next[0] = False
            real_write(fd, bytes(data)[: max(1, len(data) // 2)])
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        cfg = JsonlSettings(directory=directory, max_file_bytes=max_file_bytes, fsync=FsyncPolicy.never)
        now = 1714557600.0
        with mock.patch.object(os, "write", flaky_write), JsonlWriter(cfg) as writer:
            writer.open(now)
            for batch, fail in zip(batches, failures, strict=False):
                now += 1.0
                fail_next[0] = fail
                error: SinkError | None = None
                try:
                    writer.write_batch(batch, now)
                except SinkError as exc:
                    error = exc
                assert (error is not None) == fail
                if error is not None:
                    assert error.retriable
                    writer.write_batch(batch, now)  # the retry succeeds (fail_next was consumed)
        written = [line for batch in batches for line in batch]
        read: list[bytes] = []
        for path in read_back(directory, cfg.prefix):
            data = path.read_bytes()
            assert data.endswith(b"\n")
            read.extend(data.split(b"\n")[:-1])
        assert read == written
