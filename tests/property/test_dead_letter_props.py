"""Property tests for the dead-letter cap: whatever the record sizes, sources and limits, the files never exceed
``dead_letter_max_bytes``, hold only whole JSON lines, and every record is in a file or counted as dropped; the
placement rule alone keeps the cap from any starting sizes; the log throttle spaces its lines and loses no count."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.errors import SinkError
from fpolicyd.sinks.dead_letter import DeadLetterLimits, DeadLetterWriter, LogThrottle, Placement, plan_append

PROP_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

limits_st = st.builds(
    lambda files, share, sample: DeadLetterLimits(
        max_bytes=files * share + share // 3, max_files=files, pre_handshake_sample_bytes=sample
    ),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=4096, max_value=12288),
    st.integers(min_value=0, max_value=600),
)
#: (kind, source, payload size, negotiated): sink records (JSON) or reader payloads (raw), some over a file's share.
ops_st = st.lists(
    st.tuples(
        st.sampled_from(["sink", "decoder"]),
        st.sampled_from(["sqs-a", "bus-b"]),
        st.integers(min_value=0, max_value=14000),
        st.booleans(),
    ),
    min_size=1,
    max_size=80,
)


def read_records(w: DeadLetterWriter) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in w.files():
        if path.exists():
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), f"{path.name} ends with a torn line"
            out.extend(orjson.loads(line) for line in data.splitlines())  # raises on a partial line
    return out


def dir_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


@PROP_SETTINGS
@given(
    limits=limits_st,
    ops=ops_st,
    full_at=st.sets(st.integers(min_value=0, max_value=79), max_size=5),
    legacy=st.lists(st.integers(min_value=0, max_value=60), max_size=7),
)
def test_any_sequence_stays_within_the_cap_and_every_record_is_kept_or_counted(
    limits: DeadLetterLimits, ops: list[tuple[str, str, int, bool]], full_at: set[int], legacy: list[int]
) -> None:
    """``legacy``: records of 500 bytes an earlier run (unbounded, or with other limits) left in the active file,
    ``.1``, ``.2``…; ``full_at``: the writes the disk refuses (ENOSPC)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "dead-letter"
        directory.mkdir()
        old = orjson.dumps({"time": "2024-01-01T00:00:00Z", "sink": "old", "reason": "r" * 440}) + b"\n"
        for index, count in enumerate(legacy):
            name = "dead-letter.jsonl" + (f".{index}" if index else "")
            (directory / name).write_bytes(old * count)
        w = DeadLetterWriter(directory / "dead-letter.jsonl", limits=limits).open()
        assert dir_bytes(directory) <= limits.max_bytes
        submitted: Counter[str] = Counter({"old": sum(legacy)})
        kept_elsewhere: Counter[str] = Counter()  # a sink's event the disk refused stays in its spool
        for index, (kind, sink, size, negotiated) in enumerate(ops):
            source = "decoder" if kind == "decoder" else sink
            submitted[source] += 1
            refuse = mock.patch.object(os, "write", side_effect=OSError(errno.ENOSPC, "No space left on device"))
            with refuse if index in full_at else contextlib.nullcontext():
                if kind == "decoder":
                    w.quarantine(os.urandom(size), reason="bad_xml", negotiated=negotiated)
                else:
                    try:
                        w.write(orjson.dumps({"event_id": str(index), "pad": "p" * size}), sink=sink, reason="r")
                    except SinkError:
                        kept_elsewhere[source] += 1
            assert dir_bytes(directory) <= limits.max_bytes
            assert not w.path.exists() or w.path.stat().st_size <= limits.file_bytes
        records = read_records(w)
        in_files = Counter(record["sink"] for record in records)
        figures = w.figures()
        for source, count in submitted.items():
            lost = sum(figures.dropped.get(source, {}).values())
            assert in_files[source] + lost + kept_elsewhere[source] == count, source
            if source != "old":
                evicted = figures.dropped.get(source, {}).get("evicted", 0)
                assert figures.written.get(source, 0) == in_files[source] + evicted
        for record in records:
            if record.get("sample"):
                assert record["sink"] == "decoder"
                assert record["original_bytes"] > limits.pre_handshake_sample_bytes
        w.close()


sizes_st = st.lists(st.integers(min_value=0, max_value=200_000), min_size=1, max_size=6)


@PROP_SETTINGS
@given(limits=limits_st, sizes=sizes_st, line=st.integers(min_value=1, max_value=20_000))
def test_the_placement_reaches_the_cap_from_any_starting_sizes(
    limits: DeadLetterLimits, sizes: list[int], line: int
) -> None:
    """Even from files an earlier run left over the cap: after the plan, the files and the record fit."""
    plan = plan_append(sizes, line, limits)
    if line > limits.file_bytes:
        assert plan.placement is Placement.DROP
        return
    files = limits.max_files
    current = (sizes[:files] + [0] * files)[:files]
    if plan.placement is Placement.ROTATE:
        assert current[0] > 0
        current = [0, *current[: files - 1]] if files > 1 else [0]
    assert 0 not in plan.evict  # the active file is never evicted, only rotated
    assert list(plan.evict) == sorted(plan.evict, reverse=True)  # oldest first
    for index in plan.evict:
        current[index] = 0
    assert current[0] + line <= limits.file_bytes
    assert sum(current) + line <= limits.max_bytes


@PROP_SETTINGS
@given(
    interval=st.floats(min_value=0.1, max_value=60),
    events=st.lists(
        st.tuples(st.sampled_from("abc"), st.floats(min_value=0, max_value=30), st.integers(1, 5)), max_size=60
    ),
)
def test_the_throttle_spaces_its_lines_and_loses_no_count(
    interval: float, events: list[tuple[str, float, int]]
) -> None:
    throttle = LogThrottle(interval)
    now = 0.0
    shown: Counter[str] = Counter()
    admitted: Counter[str] = Counter()
    last: dict[str, float] = {}
    for key, step, count in events:
        now += step
        admitted[key] += count
        lines = throttle.admit(key, now, count)
        if lines:
            assert key not in last or now - last[key] >= interval
            last[key] = now
            shown[key] += lines
        else:
            assert key in last  # the first occurrence of a key is always logged
    for key, count in throttle.pending().items():
        shown[key] += count
    assert shown == admitted
