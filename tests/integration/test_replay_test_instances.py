"""``fpolicyd replay-test --instances N``: the nodes round-robin over N daemons, verification is over the union of
their sinks, and each instance's figures are checked against its own JSON Lines directory, read here."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from fpolicyd.cli.main import build_parser
from fpolicyd.cli.replaytest import config_from_args
from fpolicyd.errors import ConfigError
from fpolicyd.replaytest.config import ReplayTestConfig
from fpolicyd.replaytest.run import run_replay_test
from fpolicyd.replaytest.summary import summary_text

pytestmark = pytest.mark.slow

SIZE = 3000
NODES = 3
INSTANCES = 3


def instance_events(directory: Path) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for path in sorted(directory.glob("fpolicy_events_*.jsonl")):
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} ends with a torn line"
        events.extend(orjson.loads(line) for line in data.splitlines())
    return events


async def test_three_instances_share_the_storm_and_lose_nothing(tmp_path: Path) -> None:
    storm = ReplayTestConfig(
        events=SIZE,
        nodes=NODES,
        instances=INSTANCES,
        seed=3,
        outage_s=0.3,
        duplicates=0.05,
        progress_s=0.0,
        data_dir=tmp_path / "data",
        daemon_settings=(("jsonl_fsync", "never"),),
    )
    report = await run_replay_test(storm, progress=io.StringIO())

    per_instance = [instance_events(tmp_path / "data" / f"instance-{i}" / "events") for i in range(INSTANCES)]
    ids_per_instance = [{str(e["event_id"]) for e in events} for events in per_instance]
    union = set().union(*ids_per_instance)
    on_several = sum(1 for n in Counter(i for ids in ids_per_instance for i in ids).values() if n > 1)

    assert report["ok"]
    assert (report["generated"], report["delivered"], report["lost"], report["unexpected"]) == (SIZE, SIZE, 0, 0)
    assert len(union) == SIZE
    instances = report["instances"]
    assert [i["instance"] for i in instances] == list(range(INSTANCES))
    assert [i["delivered"] for i in instances] == [len(ids) for ids in ids_per_instance]
    assert all(i["delivered"] > 0 for i in instances)
    # Each instance delivered its own share; an id delivered by two instances is a duplicate, counted once.
    assert report["delivered_by_several_instances"] == on_several
    assert sum(i["delivered"] for i in instances) - on_several == report["delivered"] == SIZE
    assert report["duplicates_delivered"] >= on_several
    assert (
        report["sink_lines"]
        == sum(len(events) for events in per_instance)
        == report["sent_frames"]
        - (
            report["duplicates_injected"] - report["duplicates_delivered"]  # what the daemons suppressed
        )
    )
    for instance, events in zip(instances, per_instance, strict=True):
        assert instance["sink_lines"] == len(events)
        # What the daemon read: its sink lines and the duplicates it suppressed.
        assert instance["replay"]["events"] >= len(events)
        # Every node reconnected to every instance once, after the outage.
        assert instance["node_reconnects"] == NODES
        assert instance["replay"]["reconnects"] == NODES
    assert report["node_reconnect_s"]["count"] == NODES * INSTANCES
    # Every frame sent was read by exactly one instance.
    assert (
        sum(i["replay"]["events"] for i in instances) == report["daemon"]["totals"]["events"] == report["sent_frames"]
    )
    assert report["flags"]["match"]
    assert report["config"]["instances"] == INSTANCES

    text = summary_text(report)
    assert text.startswith("fpolicyd replay-test: PASS: nothing lost\n")
    assert "  instances      #0 127.0.0.1:" in text
    assert all(f"#{i} 127.0.0.1:" in text for i in range(INSTANCES))
    assert "✗" not in text


def test_instances_on_the_command_line_and_the_combinations_refused(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    assert config_from_args(parse(["replay-test"])).instances == 1
    assert config_from_args(parse(["replay-test", "--instances", "3", "--subprocess"])).instances == 3
    for extra, why in (
        (["--instances", "0"], "must be in 1..16"),
        (["--instances", "17"], "must be in 1..16"),
        (["--instances", "2", "--target", "127.0.0.1:9", "--sink-dir", "x"], "not with --target, --sink"),
        (["--instances", "2", "--sink-dir", "x"], "not with --target, --sink or --sink-dir"),
        (["--instances", "2", "--restart-daemon"], "does not support --restart-daemon"),
        (["--instances", "2", "--restart-mode", "kill"], "does not support --restart-daemon"),
        (["--instances", "2", "--engine-mode", "sync"], "does not support --restart-daemon"),
    ):
        with pytest.raises(ConfigError, match=why):
            config_from_args(parse(["replay-test", *extra]))
    done = subprocess.run(
        [sys.executable, "-m", "fpolicyd", "replay-test", "--instances", "2", "--restart-daemon"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--instances > 1 does not support --restart-daemon" in done.stderr
    assert done.stdout == ""
