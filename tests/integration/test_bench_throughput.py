"""benchmarks/bench_throughput.py (``make bench``) keeps working: a ``--quick`` run with a few hundred events
through every row (bare splitter, JSON Lines, SQS, packed SQS, EventBridge) and both latency probes. Nothing here
asserts a speed: only that every figure was measured, every event arrived and the accounting adds up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bench_throughput
from proctree import tree, tree_cpu_seconds

pytestmark = pytest.mark.slow

EVENTS = 300


def test_quick_run_measures_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = bench_throughput.main(
        # One run of each sink's defaults (the dedup-off rows differ by one flag), the latency probes at the goal's
        # rate only: every row starts a daemon (~2 s of imports on a loaded box).
        [
            *("--quick", "--events", str(EVENTS), "--no-dedup-off", "--no-half-rate", "--delivery-processes", "1"),
            *("--latency-seconds", "0.02", "--json", str(out)),
        ]
    )
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    failed = {key: [r.get("error") for r in runs] for key, runs in document["rows"].items()}
    assert code == 0, (failed, [r.get("error") for r in document["latency"]])
    assert set(document["rows"]) == {"splitter", "jsonl", "sqs", "sqs-packed", "eventbridge"}
    for key, runs in document["rows"].items():
        (row,) = runs
        assert row["events"] == EVENTS
        assert row["events_per_s"] > 0
        assert row["server_cpu_us_per_event"] >= 0
        assert row["peak_rss_mib"] > 0
        assert row["loadgen"]["sent"] == EVENTS
        assert row["loadgen"]["completed"]
        if key in ("sqs", "sqs-packed", "eventbridge"):
            assert row["requests_per_event"] > 0
            assert "endpoint_cpu_us_per_event" in row
            assert row["daemon_stop"]["exit_code"] == 0
    assert document["rows"]["sqs"][0]["requests_per_event"] >= 0.1  # at most 10 messages per SendMessageBatch
    assert document["rows"]["sqs"][0]["billed_per_event"] >= document["rows"]["sqs"][0]["requests_per_event"]
    packed = document["rows"]["sqs-packed"][0]
    assert packed["messages"] < EVENTS  # many events per message
    # Every SCREEN_RESP timed (sync engine: frame -> durable), every SQS entry matched to its frame by event id.
    latency = document["latency"]
    assert [(r["target"], r["basis"]) for r in latency] == [("latency/durable", "goal"), ("latency/sqs", "goal")]
    for row in latency:
        assert row["latency_ms"]["count"] == row["events"] == max(4, round(row["rate"] * 0.02))
        # CPU clocks tick every 10 ms: a 0.02 s probe may read 0.
        assert row["server_cpu_us_per_event"] >= 0
        assert row["server_cpu_cores"] >= 0
    assert latency[1]["endpoint_cpu_us_per_event"] >= 0  # the SQS probe's endpoint, reported apart
    assert "endpoint_cpu_us_per_event" not in latency[0]  # no endpoint in the JSON Lines probe
    assert document["machine"]["accelerator"]
    # One table, with the header describing the machine and the goals under it.
    assert "compiled accelerator" in printed
    assert "| bare frame splitter (ceiling) |" in printed
    assert "| goal (issue 11) |" in printed
    assert "| server CPU, cores |" in printed


def test_rows_with_several_delivery_processes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--events", str(EVENTS), "--rows", "sqs", "--no-dedup-off", "--no-latency"]
    assert bench_throughput.main([*argv, "--delivery-processes", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"sqs", "sqs/processes-2"}
    (shared,) = rows["sqs/processes-2"]
    assert shared["loadgen"]["sent"] == EVENTS
    assert shared["daemon_stop"]["exit_code"] == 0


def test_process_tree_cpu_counts_children_that_already_exited(tmp_path: Path) -> None:
    """The server's CPU is its whole tree's: a child that burned CPU and was reaped is still counted."""
    burn_s = 0.2
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import time\\nwhile time.process_time() < {burn_s}: pass"])
        child.wait()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        print("ready", sleeper.pid, flush=True)
        sys.stdin.readline()
        sleeper.kill()
        sleeper.wait()
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdin is not None
        line = parent.stdout.readline().split()
        assert line[0] == "ready"
        sleeper = int(line[1])
        deadline = time.monotonic() + 10
        while sleeper not in tree(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sleeper in tree(parent.pid)
        # The reaped child's CPU is in the parent's cutime (clock ticks: allow one tick of rounding).
        assert tree_cpu_seconds(parent.pid) >= burn_s - 0.02
        parent.stdin.write("\n")
        parent.stdin.flush()
    finally:
        parent.wait(30)
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()


def test_replay_storm_reports_wall_time_and_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``make bench-replay`` runs issue 11's replay-test command; here with 2,000 events instead of a million."""
    out = tmp_path / "replay.json"
    assert bench_throughput.main(["--replay-only", "--replay-events", "2000", "--json", str(out)]) == 0
    replay = json.loads(out.read_text())["replay"]
    assert replay["command"] == "fpolicyd replay-test --events 2000 --nodes 4 --duplicates 0.01 --shuffle --subprocess"
    assert replay["exit_code"] == 0
    assert replay["lost"] == 0
    assert replay["delivered"] == 2000
    assert replay["wall_s"] > 0
    assert "replay storm (fpolicyd replay-test --events 2000" in capsys.readouterr().out
