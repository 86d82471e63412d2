"""``fpolicyd replay-test`` end to end: the in-process daemon, a restart mid-storm, and a lossy server it must catch.

Every figure of the report is checked against counts made here, independently, from the sink's files: the
event ids are recomputed from each event (tests/support/event_ids.py), completeness is checked per node by
ReqId (each node numbers its notifications 1..n), displacement is recomputed by its definition.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from fpolicyd.cli.main import build_parser
from fpolicyd.cli.replaytest import config_from_args
from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError
from fpolicyd.events import CORE_OPERATIONS, EventBuilder, NameMaps, load_event_schema, load_reference_schema
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.session import FileNotification, Reply, Session
from fpolicyd.protocol.session_config import EngineMode, SessionConfig
from fpolicyd.replaytest.config import ReplayTestConfig, RestartMode
from fpolicyd.replaytest.run import progress_line, run_replay_test
from fpolicyd.replaytest.summary import summary_text
from support.event_ids import recompute_event_id

pytestmark = pytest.mark.slow

SIZE = 2000
NODES = 3
SVG = "{http://www.w3.org/2000/svg}"


def sink_lines(directory: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in sorted(directory.glob("fpolicy_events_*.jsonl")):
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} ends with a torn line"
        lines.extend(data.splitlines())
    return lines


def independent_counts(lines: list[bytes]) -> dict[str, Any]:
    events = [orjson.loads(line) for line in lines]
    distinct = set(lines)
    distinct_events = [orjson.loads(line) for line in distinct]
    ids = [e["event_id"] for e in events]
    req_ids: dict[str, set[int]] = defaultdict(set)
    arrivals: dict[str, list[int]] = defaultdict(list)
    first_seen: set[str] = set()
    for event in events:
        assert recompute_event_id(event) == event["event_id"]
        meta = event["metadata"]
        node = meta["node"].rpartition(":")[0]
        req_ids[node].add(meta["req_id"])
        if event["event_id"] not in first_seen:
            first_seen.add(event["event_id"])
            arrivals[node].append(meta["generation_time"])
    displacement = 0
    for times in arrivals.values():
        ranked = sorted(range(len(times)), key=lambda i: (times[i], i))
        displacement = max([displacement, *(index - rank for rank, index in enumerate(ranked))])
    return {
        "lines": len(lines),
        "distinct_lines": len(distinct),
        "unique_ids": len(set(ids)),
        "req_ids": req_ids,
        "replayed": sum(1 for e in distinct_events if e["metadata"].get("replayed")),
        "out_of_order": sum(1 for e in distinct_events if e["metadata"].get("out_of_order")),
        "duplicate": sum(1 for e in distinct_events if e["metadata"].get("duplicate")),
        "max_lag_us": max((e["metadata"].get("ooo_lag_us", 0) for e in distinct_events), default=0),
        "displacement": displacement,
        "plain_events": [e for e in distinct_events if not set(e["metadata"]) & {"replayed", "out_of_order"}],
    }


def assert_every_notification_once_per_node(counts: dict[str, Any], nodes: int, size: int) -> None:
    per_node = [size // nodes + (1 if i < size % nodes else 0) for i in range(nodes)]
    assert sorted(len(r) for r in counts["req_ids"].values()) == sorted(per_node)
    for node_req_ids in counts["req_ids"].values():
        assert node_req_ids == set(range(1, len(node_req_ids) + 1))


def config(tmp_path: Path, **kw: Any) -> ReplayTestConfig:
    base: dict[str, Any] = {
        "events": SIZE,
        "nodes": NODES,
        "seed": 7,
        "outage_s": 0.4,
        "progress_s": 0.0,
        "data_dir": tmp_path / "data",
        "daemon_settings": (("jsonl_fsync", "never"),),
    }
    base.update(kw)
    return ReplayTestConfig(**base)


#: The daemon's own duplicate suppression (exact dedup on event_id), when this build has it: switched off here so
#: that the injected duplicates reach the sink and their flags can be counted.
NO_DEDUP = (("dedup_mode", "off"),) if "dedup_mode" in Settings.model_fields else ()


async def test_a_storm_with_duplicates_and_shuffle_loses_nothing_and_reports_true_figures(tmp_path: Path) -> None:
    storm = config(tmp_path, duplicates=0.1, shuffle=True, daemon_settings=(("jsonl_fsync", "never"), *NO_DEDUP))
    report = await run_replay_test(storm, progress=io.StringIO())
    lines = sink_lines(tmp_path / "data" / "events")
    counts = independent_counts(lines)

    assert report["ok"]
    assert (report["generated"], report["delivered"], report["lost"], report["unexpected"]) == (SIZE, SIZE, 0, 0)
    assert counts["unique_ids"] == SIZE
    assert_every_notification_once_per_node(counts, NODES, SIZE)
    assert report["sink_lines"] == counts["lines"] == report["sent_frames"]
    assert report["duplicates_injected"] > 0
    assert report["duplicates_delivered"] == counts["lines"] - counts["unique_ids"] == report["duplicates_injected"]
    assert report["redelivered_lines"] == 0
    assert report["backlog_events"] == sum(round(n * 0.3) for n in (667, 667, 666))
    assert report["max_out_of_order_displacement"] == counts["displacement"] > 0

    flags = report["flags"]
    assert flags["match"]
    assert flags["replayed"]["sink"] == counts["replayed"] == report["backlog_events"] + report["duplicates_injected"]
    assert flags["out_of_order"]["sink"] == counts["out_of_order"]
    assert flags["duplicate"]["sink"] == counts["duplicate"] == report["duplicates_injected"]
    assert flags["max_ooo_lag_us"]["sink"] == counts["max_lag_us"] > 0
    assert all("replayed" not in e["metadata"] for e in counts["plain_events"])
    flagged = [orjson.loads(line) for line in lines if b'"replayed":true' in line or b'"duplicate":true' in line]
    assert flagged
    checker = jsonschema.FormatChecker()
    own = jsonschema.Draft202012Validator(load_event_schema(), format_checker=checker)
    reference = jsonschema.Draft7Validator(load_reference_schema(), format_checker=checker)
    for event in flagged:
        own.validate(event)
        if event["operation_type"] in CORE_OPERATIONS:
            reference.validate(event)

    (instance,) = report["daemon"]["instances"]
    daemon = instance["replay"]
    assert daemon["events"] == counts["lines"]
    assert daemon["replayed_events"] == counts["replayed"]
    assert daemon["out_of_order_events"] == counts["out_of_order"]
    assert daemon["duplicates"] == counts["duplicate"]
    assert daemon["max_out_of_order_lag_us"] == counts["max_lag_us"]
    assert daemon["reconnects"] == report["node_reconnect_s"]["count"] == NODES
    assert daemon["max_reconnect_s"] >= 0.4  # the outage itself
    assert daemon["replay_episode_events"] == counts["replayed"]
    assert report["daemon"]["totals"]["replayed_events"] == counts["replayed"]
    assert report["latency"]["ingest"]["count"] == SIZE - report["backlog_events"]
    # The nodes' replay figures: the backlog counted once (the injected duplicates apart), never above its total.
    assert report["replay"]["frames_sent"] == counts["replayed"]
    assert report["replay"]["backlog_sent"] == report["backlog_events"]
    assert report["replay"]["frames_sent"] - report["replay"]["backlog_sent"] == report["duplicates_injected"]
    # No clock readings of the daemon's process in the report.
    assert not {"replay_started_at", "replay_ended_at"} & set(daemon)
    totals = report["daemon"]["totals"]
    assert totals["max_session_gap_s"] >= 0.4 > report["node_reconnect_s"]["max"] >= 0  # the outage is the gap

    text = summary_text(report)
    assert text.startswith("fpolicyd replay-test: PASS: nothing lost\n")
    assert f"delivered      {SIZE:,} (100%)" in text
    assert f"replayed {counts['replayed']:,} (expected {counts['replayed']:,}) ✓" in text
    assert "✗" not in text
    assert f"{report['duplicates_injected']:,} injected, {report['duplicates_injected']:,} delivered" in text
    assert "p50" in text
    assert "p99" in text
    assert "ev/s (daemon:" in text
    assert "outage in" in text
    assert "outage over → new session" in text


async def test_a_daemon_restart_in_the_middle_of_the_replay_loses_nothing(tmp_path: Path) -> None:
    progress = io.StringIO()
    report = await run_replay_test(config(tmp_path, restart_daemon=True, duplicates=0.05), progress=progress)
    lines = sink_lines(tmp_path / "data" / "events")
    counts = independent_counts(lines)

    assert "stopping the daemon mid-replay" in progress.getvalue()
    assert report["daemon"]["restarts"] == 1
    first, second = report["daemon"]["instances"]
    assert first["replay"]["replayed_events"] > 0
    assert second["replay"]["replayed_events"] > 0  # the rest of the backlog went to the restarted daemon
    assert report["ok"]
    assert (report["delivered"], report["lost"]) == (SIZE, 0)
    assert counts["unique_ids"] == SIZE
    assert_every_notification_once_per_node(counts, NODES, SIZE)
    assert report["sink_lines"] == counts["lines"]
    assert report["redelivered_lines"] == counts["lines"] - counts["distinct_lines"]
    assert report["duplicates_delivered"] == counts["distinct_lines"] - counts["unique_ids"]
    assert report["flags"]["exact_expectation"]
    assert report["flags"]["match"]
    assert report["flags"]["replayed"]["sink"] == counts["replayed"]
    # Every frame sent was read by one of the two daemons (a graceful stop reads what is in flight).
    assert first["stop"]["events"] + second["stop"]["events"] == report["sent_frames"]
    assert counts["distinct_lines"] <= report["sent_frames"]


class LossyServer:
    """A fake FPolicy server: real handshake, every SCREEN_REQ normalized to a JSON Lines file, except that
    every ``drop_every``-th notification is silently dropped."""

    def __init__(self, sink_dir: Path, drop_every: int) -> None:
        self.sink_dir = sink_dir
        self.drop_every = drop_every
        self.received = 0
        self.dropped = 0
        sink_dir.mkdir(parents=True)
        self._out = (sink_dir / "fpolicy_events_fake.jsonl").open("ab")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        session = Session(SessionConfig(), peer=f"{peer[0]}:{peer[1]}", now=loop.time())
        frames = XmlFrameReader()
        while data := await reader.read(65536):
            for payload in frames.feed(data):
                for out in session.receive(payload, loop.time()):
                    if isinstance(out, Reply):
                        writer.write(out.data)
                    elif isinstance(out, FileNotification):
                        assert session.context is not None
                        self.received += 1
                        if self.received % self.drop_every == 0:
                            self.dropped += 1
                            continue
                        event, _ = EventBuilder(session.context, NameMaps()).build(out.fields, 0)
                        self._out.write(orjson.dumps(event) + b"\n")
            self._out.flush()
        writer.close()

    def close(self) -> None:
        self._out.close()


async def test_a_lossy_server_makes_replay_test_exit_non_zero_and_count_the_loss(tmp_path: Path) -> None:
    lossy = LossyServer(tmp_path / "sink", drop_every=97)
    server = await asyncio.start_server(lossy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    report_path = tmp_path / "report.json"
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fpolicyd",
            "replay-test",
            "--target",
            f"127.0.0.1:{port}",
            "--sink-dir",
            str(tmp_path / "sink"),
            "--events",
            "600",
            "--nodes",
            "2",
            "--outage-s",
            "0.2",
            "--settle-timeout-s",
            "1",
            "--progress-s",
            "0",
            "--report",
            str(report_path),
            "--plot",
            str(tmp_path / "lossy.html"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        server.close()
        await server.wait_closed()
        lossy.close()
    assert process.returncode == 1, stderr.decode()
    report = orjson.loads(report_path.read_bytes())
    assert lossy.dropped > 0
    assert not report["ok"]
    assert report["lost"] == lossy.dropped
    assert report["delivered"] == 600 - lossy.dropped
    assert f"{lossy.dropped} of 600 notifications lost" in stderr.decode()
    # The plot is written when something was lost (when it is most useful), with the verdict.
    page = (tmp_path / "lossy.html").read_text()
    assert f"{lossy.dropped} lost ✗" in page
    assert len(ET.fromstring(page).findall(".//" + SVG + "svg")) == 3
    assert sum(point["sent"] for point in report["timeline"]) == report["sent_frames"]


async def test_deleting_one_line_of_the_sink_is_reported_as_one_loss(tmp_path: Path) -> None:
    def delete_one_line(sink_dir: Path) -> None:
        path = sorted(sink_dir.glob("fpolicy_events_*.jsonl"))[0]
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1]))

    small = config(tmp_path, events=300, nodes=2, outage_s=0.1)
    report = await run_replay_test(small, progress=io.StringIO(), before_verify=delete_one_line)
    assert not report["ok"]
    assert report["lost"] == 1


async def test_a_sigkill_in_the_middle_of_the_replay_loses_nothing_in_sync_mode(tmp_path: Path) -> None:
    progress = io.StringIO()
    storm = config(tmp_path, restart_daemon=True, restart_mode=RestartMode.KILL, duplicates=0.05, shuffle=True)
    report = await run_replay_test(storm, progress=progress)
    lines = sink_lines(tmp_path / "data" / "events")
    counts = independent_counts(lines)

    assert "killing the daemon mid-replay (SIGSTOP, then SIGKILL)" in progress.getvalue()
    assert report["config"]["daemon"] == "subprocess"
    assert report["config"]["engine_mode"] == "sync"
    killed, restarted = report["daemon"]["instances"]
    assert (killed["signal"], killed["exit_code"]) == ("SIGKILL", -9)
    assert (restarted["signal"], restarted["exit_code"]) == ("SIGTERM", 0)
    assert restarted["stop"]["undelivered"] == 0
    # The kill landed with requests in flight: the nodes sent again what the dead daemon had not answered.
    assert report["resent"] > 0
    assert report["answered"] == SIZE + report["duplicates_injected"]
    assert report["sent_frames"] == SIZE + report["duplicates_injected"] + report["resent"]
    assert report["ok"]
    assert (report["generated"], report["delivered"], report["lost"], report["unexpected"]) == (SIZE, SIZE, 0, 0)
    assert counts["unique_ids"] == SIZE
    assert_every_notification_once_per_node(counts, NODES, SIZE)
    assert report["sink_lines"] == counts["lines"]
    assert report["redelivered_lines"] == counts["lines"] - counts["distinct_lines"]
    assert report["duplicates_delivered"] == counts["distinct_lines"] - counts["unique_ids"]
    assert report["max_out_of_order_displacement"] == counts["displacement"]
    assert not report["flags"]["exact_expectation"]  # what the killed daemon had read is unknowable here
    assert report["flags"]["replayed"]["sink"] == counts["replayed"]


async def test_sync_mode_without_a_restart_is_answered_in_full_and_exact(tmp_path: Path) -> None:
    report = await run_replay_test(
        config(tmp_path, engine_mode=EngineMode.SYNC, sync_window=50), progress=io.StringIO()
    )
    counts = independent_counts(sink_lines(tmp_path / "data" / "events"))
    assert report["ok"]
    assert report["config"]["daemon"] == "in-process"
    assert (report["lost"], report["resent"], report["answered"]) == (0, 0, SIZE)
    assert counts["unique_ids"] == counts["lines"] == SIZE
    assert report["flags"]["exact_expectation"]
    assert report["flags"]["match"]


def test_a_kill_restart_in_async_mode_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="needs the sync engine mode"):
        ReplayTestConfig(restart_daemon=True, restart_mode=RestartMode.KILL, engine_mode=EngineMode.ASYNC)
    assert ReplayTestConfig(restart_daemon=True, restart_mode=RestartMode.KILL).sync
    assert ReplayTestConfig(restart_daemon=True, restart_mode=RestartMode.KILL).in_subprocess
    with pytest.raises(ConfigError, match="need a daemon run by replay-test"):
        ReplayTestConfig(target=("127.0.0.1", 9), sink_dir=Path("x"), restart_daemon=True)
    with pytest.raises(ConfigError, match="needs --verify-queue"):
        ReplayTestConfig(sink="eventbridge:bus")
    with pytest.raises(ConfigError, match="sqs:QUEUE_URL or eventbridge:BUS"):
        ReplayTestConfig(sink="jsonl:/tmp/x")


def test_the_command_line_maps_restart_mode_kill_and_the_queue_sinks() -> None:
    parse = build_parser().parse_args
    kill = config_from_args(parse(["replay-test", "--restart-mode", "kill", "--sink", "sqs:http://q/1/a"]))
    assert (kill.restart_daemon, kill.restart_mode, kill.sync, kill.in_subprocess) == (
        True,
        RestartMode.KILL,
        True,
        True,
    )
    assert kill.queue_url == "http://q/1/a"
    graceful = config_from_args(parse(["replay-test", "--restart-daemon"]))
    assert (graceful.restart_mode, graceful.sync, graceful.in_subprocess) == (RestartMode.GRACEFUL, False, False)
    bus = config_from_args(parse(["replay-test", "--sink", "eventbridge:b", "--verify-queue", "http://q/1/t"]))
    assert bus.queue_url == "http://q/1/t"
    sync = config_from_args(parse(["replay-test", "--engine-mode", "sync", "--sync-window", "7", "--subprocess"]))
    assert (sync.sync, sync.sync_window, sync.in_subprocess, sync.restart_daemon) == (True, 7, True, False)


def test_progress_lines_show_bars_that_never_pass_their_total() -> None:
    line = progress_line(elapsed_s=12.34, phase="replay", events=10_000, counts=(3_000, 6_000, 7_500), rate=1234.5)
    assert "backlog [##########----------]  50% 3,000/6,000" in line
    assert "delivered [###############-----]  75% 7,500/10,000" in line
    assert line.endswith("sink 1,234 ev/s\n")
    assert "12.3s" in line
    full = progress_line(elapsed_s=1, phase="verify", events=10, counts=(0, 0, 10), rate=0)
    assert "backlog [####################] 100% 0/0" in full


def run_cli(workdir: Path, *extra: str) -> tuple[int, str, str]:
    """``fpolicyd replay-test`` as a subprocess with its in-process daemon's data in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "fpolicyd", "replay-test", "--events", "300", "--nodes", "2", "--outage-s", "0.3",
         "--data-dir", str(workdir / "data"), "--daemon-setting", "jsonl_fsync=never", *extra],
        capture_output=True, text=True, timeout=120, cwd=workdir, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_the_command_prints_a_summary_writes_the_json_report_and_prints_json_on_request(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(tmp_path / "summary", "--progress-s", "0.1", "--report", str(report_path))
    assert code == 0, err
    report = orjson.loads(report_path.read_bytes())
    assert (report["ok"], report["delivered"], report["lost"]) == (True, 300, 0)
    assert "timeline" not in report  # only with --plot
    assert out == summary_text(report)
    assert out.startswith("fpolicyd replay-test: PASS: nothing lost")
    assert "{" not in out
    assert "delivered [" in err
    assert "backlog [" in err

    code, out, err = run_cli(tmp_path / "json", "--json", "--progress-s", "0")
    assert code == 0, err
    as_json = orjson.loads(out)
    assert (as_json["ok"], as_json["delivered"], as_json["lost"]) == (True, 300, 0)
    assert err == ""


def test_the_plot_has_three_charts_and_the_timeline_adds_up_to_the_run(tmp_path: Path) -> None:
    workdir = tmp_path / "plot"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fpolicyd", "replay-test", "--events", "2000", "--nodes", "2", "--outage-s", "0.5",
         "--progress-s", "0", "--daemon-setting", "jsonl_fsync=never", "--data-dir", str(workdir / "data"),
         "--plot", "out.html", "--report", "report.json"],
        capture_output=True, text=True, timeout=120, cwd=workdir, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = orjson.loads((workdir / "report.json").read_bytes())
    timeline = report["timeline"]
    assert report["generated"] == 2000
    assert sum(point["sent"] for point in timeline) == report["generated"]
    assert sum(point["delivered"] for point in timeline) == report["generated"]
    assert timeline[-1]["sent_total"] == timeline[-1]["delivered_total"] == 2000
    assert len(timeline) >= 10  # a second-long run still gets a finer period (~20+ points unloaded; slack if busy)
    assert {point["phase"] for point in timeline} >= {"outage", "replay", "settle"}
    assert all(a["end_s"] == b["start_s"] for a, b in itertools.pairwise(timeline))
    page = (workdir / "out.html").read_text()
    charts = ET.fromstring(page).findall(".//" + SVG + "svg")
    assert [chart.findtext(SVG + "text") for chart in charts] == [
        "send rate and sink arrival rate",
        "cumulative sent and delivered",
        "sink-arrival latency (live notifications)",
    ]
    assert "lost = 0 ✓" in page
    assert "2,000 notifications over 2 nodes" in page


def test_an_unwritable_plot_path_is_refused_before_the_run(tmp_path: Path) -> None:
    code, out, err = run_cli(tmp_path / "bad", "--plot", str(tmp_path / "missing" / "out.html"))
    assert code == 2
    assert err.startswith("fpolicyd: --plot ")
    assert "No such file or directory" in err
    assert out == ""
    assert not (tmp_path / "bad" / "data").exists()  # no daemon was started
    code, _, err = run_cli(tmp_path / "interval", "--plot-interval-s", "0.5")
    assert code == 2
    assert "--plot-interval-s needs --plot" in err
    code, _, err = run_cli(tmp_path / "zero", "--plot", "p.html", "--plot-interval-s", "0")
    assert code == 2
    assert "--plot-interval-s: 0 is not a number > 0" in err
