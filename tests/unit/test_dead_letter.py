"""The dead-letter files' cap: placement, rotation, what an earlier run left, pre-handshake samples, failed writes,
the rate-limited log lines and the metrics (property tests: tests/property/test_dead_letter_props.py)."""

from __future__ import annotations

import base64
import errno
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.core import Metric
from structlog.testing import capture_logs

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.obs.metrics import DROP_REASONS, DeadLetterFigures, Metrics
from fpolicyd.server.metric_labels import METRIC_LABELS
from fpolicyd.sinks.dead_letter import (
    REASON_MAX_CHARS,
    DeadLetterLimits,
    DeadLetterWriter,
    DropReason,
    LogThrottle,
    Placement,
    plan_append,
    sample_of,
)

#: 4 files of 4096 bytes.
SMALL = DeadLetterLimits(max_bytes=16384, max_files=4, pre_handshake_sample_bytes=16, log_interval_s=10.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def writer(tmp_path: Path, limits: DeadLetterLimits = SMALL, clock: Clock | None = None) -> DeadLetterWriter:
    return DeadLetterWriter(
        tmp_path / "dead-letter" / "dead-letter.jsonl", limits=limits, monotonic=clock or Clock()
    ).open()


def event(n: int, pad: int = 0) -> bytes:
    return orjson.dumps({"event_id": f"e{n}", "pad": "x" * pad})


def lines(w: DeadLetterWriter) -> list[dict[str, Any]]:
    """Every record of every file, oldest file first; fails on a torn line."""
    out: list[dict[str, Any]] = []
    for path in reversed(w.files()):
        if path.exists():
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), path
            out.extend(orjson.loads(line) for line in data.splitlines())
    return out


def dropped(w: DeadLetterWriter, source: str, reason: DropReason) -> int:
    return w.figures().dropped.get(source, {}).get(reason.value, 0)


# ------------------------------------------------------------------------------------------- pure parts


def test_plan_appends_rotates_and_evicts_oldest_first() -> None:
    assert plan_append([0, 0, 0, 0], 100, SMALL).placement is Placement.APPEND
    assert plan_append([4000, 0, 0, 0], 96, SMALL).placement is Placement.APPEND  # exactly 4096
    rotate = plan_append([4000, 4000, 4000, 4000], 97, SMALL)
    assert rotate.placement is Placement.ROTATE
    assert rotate.evict == ()  # the rotation dropped the oldest: 0 + 4000 * 3 + 97 fits
    assert plan_append([0, 0, 0, 0], 4097, SMALL).placement is Placement.DROP
    # Left by an earlier run: rotated files over the cap go, the oldest first, until the record fits.
    legacy = plan_append([10, 9000, 5000, 3000], 2500, SMALL)
    assert legacy.placement is Placement.APPEND
    assert legacy.evict == (3, 2)
    # One file: the active file is the oldest; a rotation empties it.
    one = DeadLetterLimits(max_bytes=8192, max_files=1)
    assert plan_append([8000], 500, one).placement is Placement.ROTATE


def test_limits_refuse_a_share_too_small_to_hold_a_record() -> None:
    with pytest.raises(ConfigError, match="less than 4096 bytes per file"):
        DeadLetterLimits(max_bytes=16384, max_files=5)
    with pytest.raises(ConfigError, match="at least 1"):
        DeadLetterLimits(max_files=0)
    with pytest.raises(ConfigError, match="dead_letter_max_bytes"):
        load_settings(
            overrides={"dead_letter_max_bytes": 16384, "dead_letter_max_files": 8}, search_default_paths=False
        )
    settings = load_settings(overrides={"dead_letter_max_bytes": 1 << 20}, search_default_paths=False)
    assert settings.dead_letter_limits().file_bytes == (1 << 20) // 4


def test_sample_of() -> None:
    assert sample_of(b"abc", 3) == (b"abc", False)
    assert sample_of(b"abcd", 3) == (b"abc", True)
    assert sample_of(b"abcd", 0) == (b"", True)


def test_log_throttle_counts_what_each_line_stands_for() -> None:
    throttle = LogThrottle(10.0)
    assert throttle.admit("a", 0.0) == 1
    assert throttle.admit("a", 1.0) == 0
    assert throttle.admit("a", 2.0, 5) == 0
    assert throttle.admit("b", 2.0) == 1  # keys are independent
    assert throttle.admit("a", 10.0) == 7
    assert throttle.admit("a", 11.0) == 0
    assert throttle.pending() == {"a": 1}
    assert throttle.pending() == {}


def test_the_drop_reasons_the_metrics_export_are_the_writers() -> None:
    assert tuple(reason.value for reason in DropReason) == DROP_REASONS


# ------------------------------------------------------------------------------------------ rotation


def test_rotation_keeps_the_newest_within_the_cap_and_counts_the_evicted(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for n in range(120):
        assert w.write(event(n, pad=300), sink="sqs-a" if n % 2 else "sqs-b", reason=f"r{n}")
    names = sorted(p.name for p in w.path.parent.iterdir())
    assert names == [
        "dead-letter.jsonl",
        "dead-letter.jsonl.1",
        "dead-letter.jsonl.2",
        "dead-letter.jsonl.3",
        "dead-letter.jsonl.lock",
    ]
    assert w.disk_bytes() <= SMALL.max_bytes
    assert all(p.stat().st_size <= SMALL.file_bytes for p in w.files())
    kept = lines(w)
    # The newest are kept, in order, and every record is either in a file or counted as evicted.
    assert [record["reason"] for record in kept] == [f"r{n}" for n in range(120 - len(kept), 120)]
    evicted = dropped(w, "sqs-a", DropReason.EVICTED) + dropped(w, "sqs-b", DropReason.EVICTED)
    assert evicted == 120 - len(kept) > 0
    figures = w.figures()
    assert figures.written == {"sqs-a": 60, "sqs-b": 60}
    assert w.written == 120
    w.close()


def test_a_record_larger_than_a_files_share_is_counted_never_written(tmp_path: Path) -> None:
    clock = Clock()
    w = writer(tmp_path, clock=clock)
    assert w.write(event(0), sink="s", reason="small")
    with capture_logs() as logs:
        assert not w.write(event(1, pad=5000), sink="s", reason="big")
        assert not w.write(event(2, pad=5000), sink="s", reason="big")
    assert [record["reason"] for record in lines(w)] == ["small"]
    assert dropped(w, "s", DropReason.TOO_LARGE) == 2
    errors = [entry for entry in logs if entry["event"] == "dead_letter_dropped"]
    assert len(errors) == 1  # rate-limited: the second drop comes within the interval
    assert errors[0]["reason"] == "too_large"
    assert errors[0]["log_level"] == "error"
    with capture_logs() as logs:
        w.close()  # a last line for what the interval held back
    assert [(e["event"], e["count"]) for e in logs] == [("dead_letter_dropped", 1)]


def test_one_file_rotates_by_emptying_itself(tmp_path: Path) -> None:
    one = DeadLetterLimits(max_bytes=8192, max_files=1)
    w = writer(tmp_path, one)
    for n in range(40):
        w.write(event(n, pad=300), sink="s", reason=f"r{n}")
    assert w.disk_bytes() <= 8192
    kept = lines(w)
    assert dropped(w, "s", DropReason.EVICTED) == 40 - len(kept) > 0
    assert not (w.path.parent / "dead-letter.jsonl.1").exists()


def test_open_brings_what_an_earlier_run_left_within_the_cap(tmp_path: Path) -> None:
    directory = tmp_path / "dead-letter"
    directory.mkdir()
    record = orjson.dumps({"time": "2024-01-01T00:00:00Z", "sink": "old", "reason": "r"}) + b"\n"
    (directory / "dead-letter.jsonl").write_bytes(record * 400)  # an unbounded file of the old version
    (directory / "dead-letter.jsonl.2").write_bytes(record * 3)
    (directory / "dead-letter.jsonl.9").write_bytes(record * 5)  # beyond max_files (a smaller setting now)
    (directory / "unrelated.txt").write_bytes(b"kept")
    w = writer(tmp_path)
    assert w.disk_bytes() <= SMALL.max_bytes
    assert not (directory / "dead-letter.jsonl.9").exists()
    assert (directory / "unrelated.txt").read_bytes() == b"kept"
    assert dropped(w, "old", DropReason.EVICTED) == 408 - len(lines(w))
    assert w.write(event(1), sink="s", reason="new")
    assert lines(w)[-1]["reason"] == "new"
    w.close()


def test_evicted_records_are_counted_by_their_source_whatever_its_spelling(tmp_path: Path) -> None:
    directory = tmp_path / "dead-letter"
    directory.mkdir()
    odd = 'sqs:we"ird\\name'
    record = orjson.dumps({"time": "2024-01-01T00:00:00Z", "sink": odd, "reason": "r"}) + b"\n"
    (directory / "dead-letter.jsonl.3").write_bytes(record * 2 + b"not a record\n" + record + b"torn tail")
    w = writer(tmp_path)
    for n in range(40):  # enough to rotate .3 out
        w.write(event(n, pad=300), sink="s", reason="r")
    assert dropped(w, odd, DropReason.EVICTED) == 3
    assert dropped(w, "unknown", DropReason.EVICTED) == 2
    w.close()


def test_writers_of_two_processes_share_the_cap(tmp_path: Path) -> None:
    """Two writers (the daemon's and the delivery process's) append concurrently: each follows the other's
    rotations, the files stay within the cap and hold whole lines, and every record is kept or counted."""
    first, second = writer(tmp_path), writer(tmp_path)

    def run(w: DeadLetterWriter, source: str) -> None:
        for n in range(150):
            w.write(event(n, pad=n % 250), sink=source, reason=f"{source}{n}")

    threads = [threading.Thread(target=run, args=(w, s)) for w, s in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert first.disk_bytes() <= SMALL.max_bytes
    kept = lines(first)
    total = DeadLetterFigures.total([first.figures(), second.figures()])
    assert total.written == {"a": 150, "b": 150}
    for source in ("a", "b"):
        evicted = total.dropped.get(source, {}).get("evicted", 0)
        assert sum(1 for record in kept if record["sink"] == source) + evicted == 150
        mine = [int(record["reason"][1:]) for record in kept if record["sink"] == source]
        assert mine == sorted(mine)
    first.close()
    second.close()


# ----------------------------------------------------------------------------------------- quarantine


def test_a_pre_handshake_payload_is_kept_as_a_sample_a_negotiated_one_whole(tmp_path: Path) -> None:
    w = writer(tmp_path)
    payload = bytes(range(256)) * 4
    assert w.quarantine(payload, reason="bad_xml: junk", negotiated=False)
    assert w.quarantine(payload, reason="bad_xml: broken notification", negotiated=True)
    assert w.quarantine(b"tiny", reason="expected_nego: first message was X", negotiated=False)
    sample, whole, tiny = lines(w)
    assert sample["sink"] == "decoder"
    assert sample["sample"] is True
    assert sample["handshake"] is False
    assert sample["original_bytes"] == 1024
    assert base64.b64decode(sample["event_raw_b64"]) == payload[:16]
    assert "sample" not in whole
    assert base64.b64decode(whole["event_raw_b64"]) == payload
    assert "sample" not in tiny  # short enough to be whole
    assert base64.b64decode(tiny["event_raw_b64"]) == b"tiny"
    assert w.figures().written == {"decoder": 3}
    assert w.figures().sampled == {"decoder": 1}


def test_a_reason_quoting_the_input_is_cut(tmp_path: Path) -> None:
    w = writer(tmp_path)
    assert w.quarantine(
        b"<x/>", reason="unexpected_body: expected <Handshake>, got <" + "A" * 3000 + ">", negotiated=False
    )
    (record,) = lines(w)
    assert len(record["reason"]) < REASON_MAX_CHARS + 40
    assert record["reason"].endswith("... (3045 characters)")


def test_the_sample_can_be_nothing_but_the_reason_and_length(tmp_path: Path) -> None:
    w = writer(tmp_path, DeadLetterLimits(max_bytes=16384, pre_handshake_sample_bytes=0))
    assert w.quarantine(b"x" * 5000, reason="bad_marker", negotiated=False)
    (record,) = lines(w)
    assert record["original_bytes"] == 5000
    assert record["event_raw_b64"] == ""


def enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", refuse)


def test_a_full_disk_crashes_nothing_counts_and_logs_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    w = writer(tmp_path, clock=clock)
    assert w.quarantine(b"before", reason="r", negotiated=True)
    before = w.path.read_bytes()
    with capture_logs() as logs:
        enospc(monkeypatch)
        for _ in range(50):
            assert not w.quarantine(b"lost", reason="r", negotiated=True)  # never raises
        with pytest.raises(SinkError) as info:  # a sink is told, keeps its event and retries
            w.write(event(1), sink="sqs-a", reason="rejected")
        clock.now += 10.0
        assert not w.quarantine(b"lost", reason="r", negotiated=True)
        monkeypatch.undo()
    assert info.value.retriable
    assert w.path.read_bytes() == before
    figures = w.figures()
    assert figures.write_errors == {"decoder": 51, "sqs-a": 1}
    assert figures.dropped == {"decoder": {"write_failed": 51}}  # the sink's event is not lost: not dropped
    failed = [e for e in logs if e["event"] == "dead_letter_write_failed"]
    assert [(e["source"], e["count"], e["errno"]) for e in failed] == [
        ("decoder", 1, "ENOSPC"),
        ("sqs-a", 1, "ENOSPC"),
        ("decoder", 50, "ENOSPC"),  # the 49 held back and this one
    ]
    assert len([e for e in logs if e["event"] == "dead_letter_dropped"]) == 2
    assert w.quarantine(b"after", reason="r", negotiated=True)
    w.close()


# -------------------------------------------------------------------------------------------- metrics


def families(metrics: Metrics) -> dict[str, Metric]:
    return {family.name: family for family in metrics.registry.collect()}


def value(family: Metric, suffix: str = "_total", **labels: str) -> float:
    found = [s.value for s in family.samples if s.name == family.name + suffix and s.labels == labels]
    assert len(found) == 1, (labels, family.samples)
    return found[0]


def test_metrics_sum_the_writers_of_both_processes(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for n in range(60):
        w.write(event(n, pad=300), sink="sqs-a", reason="r")
    w.quarantine(b"x" * 100, reason="bad_xml", negotiated=False)
    w.write(event(0, pad=5000), sink="sqs-a", reason="too big")
    remote = DeadLetterFigures.from_dict(
        orjson.loads(
            orjson.dumps(
                DeadLetterFigures(
                    written={"sqs-b": 3}, dropped={"sqs-b": {"evicted": 2}}, write_errors={"sqs-b": 1}
                ).to_dict()
            )
        )
    )
    metrics = Metrics(labels=METRIC_LABELS, process_metrics=False)
    metrics.watch_dead_letter([w.figures, lambda: remote], size=w.disk_bytes, limit_bytes=SMALL.max_bytes)
    got = families(metrics)
    records = got["fpolicyd_dead_letter_records"]
    assert value(records, source="sqs-a") == 60
    assert value(records, source="sqs-b") == 3
    assert value(records, source="decoder") == 1
    assert value(got["fpolicyd_dead_letter_sampled_records"], source="decoder") == 1
    drops = got["fpolicyd_dead_letter_dropped"]
    assert value(drops, source="sqs-a", reason="evicted") == dropped(w, "sqs-a", DropReason.EVICTED) > 0
    assert value(drops, source="sqs-a", reason="too_large") == 1
    assert value(drops, source="sqs-b", reason="evicted") == 2
    assert value(drops, source="decoder", reason="write_failed") == 0
    assert value(got["fpolicyd_dead_letter_write_errors"], source="sqs-b") == 1
    assert value(got["fpolicyd_dead_letter_size_bytes"], "") == w.disk_bytes() > 0
    assert value(got["fpolicyd_dead_letter_limit_bytes"], "") == SMALL.max_bytes
    with pytest.raises(ValueError, match="malformed dead-letter figures"):
        DeadLetterFigures.from_dict({"written": {"a": "many"}})
    w.close()
