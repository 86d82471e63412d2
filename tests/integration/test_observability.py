"""/metrics, /healthz and /readyz of an in-process daemon over loopback HTTP, driven by the ONTAP simulator.

Metric values are compared with independent counts: what the simulator says it sent, the requests it generated
(operations), frames written by hand; the replay figures with the tracker's own snapshot."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from prometheus_client.samples import Sample
from structlog.testing import capture_logs

from fpolicyd.app import Daemon
from fpolicyd.events import NameMaps, normalize
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol import framing
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.req_types import parse_req_type
from fpolicyd.server.processing import CURSOR as PROCESSING_CURSOR
from fpolicyd.server.processing import ProcessingWorker
from fpolicyd.simulator.client import SimulatorConfig, expected_requests, run
from fpolicyd.storage.duplicate_ledger import LEDGER_CURSOR
from fpolicyd.storage.routes_file import load_routes
from support.daemon import AS_DEPLOYED, make_settings
from support.moto_server import isolate_aws_env
from support.observability import REQUIRED_FAMILIES, get, http_get, one, scrape

#: Any session: an event's path and operation, all routing looks at, do not depend on it.
SESSION = SessionContext(vs_uuid="vs", policy_name="p", session_id="s", protocol_version="1.2", peer="127.0.0.1:1")

#: The ``daemon`` fixture (tests/conftest.py) as deployed: what it reports is what this file checks.
pytestmark = pytest.mark.settings(**AS_DEPLOYED)


async def settle(daemon: Daemon, events: int, within: float = 20.0) -> None:
    """Until every connection closed and every sink acknowledged ``events`` (bounded)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        workers = daemon.spooler.workers
        delivered = [w.figures().delivered for w in workers]
        if not daemon.context.connections and all(d >= events for d in delivered) and not any(w.lag for w in workers):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not settled: {daemon.spooler.sink_stats()}, {len(daemon.context.connections)} open")


def decoders(families: dict[str, list[Sample]]) -> dict[str, float]:
    family = families["fpolicyd_notifications_decoded"]
    return {s.labels["decoder"]: s.value for s in family if s.name.endswith("_total")}


def count_frame_splits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the daemon's reads the C accelerator's frame splitter is given from now on: reads that carry a
    SCREEN_REQ (the simulator's own reader, in this process too, reads only answers). Readers take the splitter when
    they are built, so this counts for every connection opened after it."""
    if framing._split_frames is None:
        pytest.skip("the C accelerator is not built here (tests/unit/test_speedups_build.py says why)")
    real = framing._split_frames
    calls: list[int] = []

    def spy(data: bytes, frames: list[bytes], maximum: int) -> int:
        if b">SCREEN_REQ<" in data:
            calls.append(len(data))
        return real(data, frames, maximum)

    monkeypatch.setattr(framing, "_split_frames", spy)
    return calls


@pytest.mark.settings(pure_python=True)
async def test_pure_python_runs_when_asked(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiled code on the reader's path: events built in Python, frames split in Python."""
    assert daemon.context.ingest.accelerator.path == "python"
    splits = count_frame_splits(monkeypatch)
    report = await run(SimulatorConfig(port=daemon.port, nodes=1, events=40, seed=3, keep_alive_interval_s=0))
    await settle(daemon, report.sent)
    after = await scrape(daemon)
    assert one(after, "fpolicyd_ingest_accelerated") == 0
    assert decoders(after) == {"accelerated": 0, "fast": report.sent, "full": 0}
    assert splits == []


async def test_the_accelerator_splits_frames_by_default(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = count_frame_splits(monkeypatch)
    report = await run(SimulatorConfig(port=daemon.port, nodes=1, events=40, seed=3, keep_alive_interval_s=0))
    await settle(daemon, report.sent)
    assert daemon.context.ingest.accelerator.path == "c"
    assert splits, "the frame reader did not use the accelerator's splitter"


async def test_metrics_exist_before_traffic_and_count_exactly_what_was_sent(daemon: Daemon, tmp_path: Path) -> None:
    before = await scrape(daemon)
    assert set(before) >= REQUIRED_FAMILIES, sorted(REQUIRED_FAMILIES - set(before))
    assert one(before, "fpolicyd_sessions_opened", "fpolicyd_sessions_opened_total") == 0
    assert sum(s.value for s in before["fpolicyd_events_received"]) == 0
    sink = f"jsonl:{tmp_path / 'events'}"
    assert one(before, "fpolicyd_sink_up", sink=sink) == 1

    config = SimulatorConfig(port=daemon.port, nodes=2, events=300, seed=11, keep_alive_interval_s=0.005, rate=3000.0)
    report = await run(config)
    assert report.completed
    # A node that comes back: the replay tracker sees a reconnect of the same node/policy.
    comeback = SimulatorConfig(port=daemon.port, nodes=1, events=20, seed=12, keep_alive_interval_s=0)
    again = await run(comeback)
    # The same 20 notifications once more (as ONTAP retries after a LIF migration): dedup suppresses them.
    duplicated = await run(comeback)
    sent = report.sent + again.sent + duplicated.sent
    delivered = sent - duplicated.sent
    # Exact dedup is on by default, checked by the reader: no processing stage runs.
    assert daemon.processing is None
    assert daemon.context.ingest.window is not None
    # A malformed frame (bad marker byte) closes its connection and is counted by reason.
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(b"X\x00\x00\x00\x05hello")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()
    await settle(daemon, delivered)

    after = await scrape(daemon)
    frames = "fpolicyd_frames_received"
    assert one(after, frames, f"{frames}_total", type="SCREEN_REQ") == sent
    assert one(after, frames, f"{frames}_total", type="NEGO_REQ") == 4
    keep_alives = report.keep_alives + again.keep_alives + duplicated.keep_alives
    assert one(after, frames, f"{frames}_total", type="KEEP_ALIVE") == keep_alives
    operations = Counter(
        parse_req_type(request.req_type).operation.value
        for cfg in (config, comeback, comeback)
        for _node, request in expected_requests(cfg)
    )
    events = {s.labels["operation"]: s.value for s in after["fpolicyd_events_received"]}
    assert events == {op: float(operations.get(op, 0)) for op in events}
    assert sum(events.values()) == sent
    assert one(after, "fpolicyd_parse_errors", "fpolicyd_parse_errors_total", reason="bad_marker") == 1
    assert one(after, "fpolicyd_sessions_opened", "fpolicyd_sessions_opened_total") == 5
    assert one(after, "fpolicyd_sessions") == 0
    # Every notification once: as an event, or as a duplicate the reader's window suppressed (kept for the ledger).
    appended = one(after, "fpolicyd_spool_appended_records", "fpolicyd_spool_appended_records_total")
    assert appended == daemon.spooler.spool.last_seq == sent
    # The spool's group commits: each fsync timed, and each commit's latency at least its window (pending → durable).
    fsync, commit = "fpolicyd_spool_fsync_duration_seconds", "fpolicyd_spool_commit_latency_seconds"
    fsyncs, commits = one(after, fsync, f"{fsync}_count"), one(after, commit, f"{commit}_count")
    assert 1 <= commits <= fsyncs <= appended
    window = daemon.spooler.spool.settings.group_commit_s
    assert one(after, commit, f"{commit}_sum") >= commits * window * 0.5  # timers may fire up to 1 ms early
    assert one(after, commit, f"{commit}_bucket", le="+Inf") == commits
    # Each suppressed duplicate has its audit record (written by the daemon once the duplicate was durable).
    duplicates = daemon.spooler.duplicates
    assert duplicates is not None
    for _ in range(200):  # up to 10 s
        if duplicates.written >= duplicated.sent:
            break
        await asyncio.sleep(0.05)
    assert (duplicates.written, duplicates.pending) == (duplicated.sent, 0)
    assert daemon.spooler.spool.acked_seq(LEDGER_CURSOR) == daemon.spooler.spool.durable_seq
    assert one(after, "fpolicyd_dedup_hits", "fpolicyd_dedup_hits_total") == duplicated.sent
    assert one(after, "fpolicyd_dedup_errors", "fpolicyd_dedup_errors_total", mode="open") == 0
    assert one(after, "fpolicyd_processor_lag_records") == 0
    assert one(after, "fpolicyd_connections_rejected", "fpolicyd_connections_rejected_total", reason="not_allowed") == 0
    # Routing, counted independently: the packaged routes over what the simulator sent (duplicates included,
    # since the reader routes every notification it stores).
    router = Router(load_routes(None))
    expected_routes: Counter[str] = Counter()
    unrouted = 0
    for run_config, times in ((config, 1), (comeback, 2)):
        for _, request in expected_requests(run_config):
            for _ in range(times):
                event = normalize(request, SESSION, NameMaps(), 0)
                matched = router.match(event.file_path, event.operation_type)
                expected_routes.update(matched)
                unrouted += not matched
    routed = {s.labels["route"]: s.value for s in after["fpolicyd_events_routed"] if s.name.endswith("_total")}
    assert routed == expected_routes
    assert one(after, "fpolicyd_events_unrouted", "fpolicyd_events_unrouted_total") == unrouted
    # Every notification of the simulator is canonical: the accelerator reads all of them where it is built.
    decoded = decoders(after)
    assert sum(decoded.values()) == sent
    accelerated = one(after, "fpolicyd_ingest_accelerated")
    assert accelerated == (daemon.context.ingest.accelerator.path == "c")
    assert decoded["accelerated"] == (sent if accelerated else 0)
    assert one(after, "fpolicyd_settle_pending") == 0
    assert one(after, "fpolicyd_spool_size_bytes") > 0
    assert one(after, "fpolicyd_spool_records") == 0
    assert one(after, "fpolicyd_backpressure_state", state="normal") == 1

    assert one(after, "fpolicyd_sink_settled_events", "fpolicyd_sink_settled_events_total", sink=sink) == delivered
    assert one(after, "fpolicyd_sink_lag_records", sink=sink) == 0
    batches = "fpolicyd_sink_batch_records"
    sends = one(after, "fpolicyd_sink_sends", "fpolicyd_sink_sends_total", sink=sink)
    assert one(after, batches, f"{batches}_sum", sink=sink) == delivered
    assert one(after, batches, f"{batches}_count", sink=sink) == sends > 0
    send_time = "fpolicyd_sink_send_duration_seconds"
    assert one(after, send_time, f"{send_time}_count", sink=sink) == sends
    for latency in ("fpolicyd_end_to_end_latency_seconds", "fpolicyd_ingestion_latency_seconds"):
        assert one(after, latency, f"{latency}_count", sink=sink) == delivered
        assert one(after, latency, f"{latency}_bucket", sink=sink, le="+Inf") == delivered
    # The simulator's GenerationTimes start in November 2023: every event is far older than the 5 s target.
    breaches = "fpolicyd_ingestion_latency_slo_breaches"
    assert one(after, breaches, f"{breaches}_total", sink=sink) == delivered
    assert one(after, "fpolicyd_processing_success_ratio", sink=sink) == 1.0

    stats = daemon.context.ingest.replay.stats()
    assert stats.reconnects > 0
    assert stats.replayed_events > 0
    assert one(after, "fpolicyd_reconnects", "fpolicyd_reconnects_total") == stats.reconnects
    reconnect = "fpolicyd_reconnect_duration_seconds"
    assert one(after, reconnect, f"{reconnect}_count") == stats.reconnects
    assert one(after, reconnect, f"{reconnect}_sum") == pytest.approx(stats.total_reconnect_s)
    assert one(after, "fpolicyd_replayed_events", "fpolicyd_replayed_events_total") == stats.replayed_events
    assert one(after, "fpolicyd_out_of_order_events", "fpolicyd_out_of_order_events_total") == (
        stats.out_of_order_events
    )
    assert one(after, "fpolicyd_duplicate_events", "fpolicyd_duplicate_events_total") == stats.duplicates
    assert stats.duplicates == duplicated.sent
    assert one(after, "fpolicyd_replay_episode_events") == stats.replay_episode_events


@pytest.mark.settings(write_complete_delay_s=60.0)
async def test_settle_pending_shows_what_settle_holds(daemon: Daemon) -> None:
    report = await run(SimulatorConfig(port=daemon.port, nodes=1, events=50, seed=5, keep_alive_interval_s=0))
    processor = daemon.processing
    assert isinstance(processor, ProcessingWorker)
    spool = daemon.spooler.spool
    for _ in range(400):  # until the stage has read every record (its own processed ones too); bounded: ~20 s
        if spool.read_seq(PROCESSING_CURSOR) > spool.last_seq:
            break
        await asyncio.sleep(0.05)
    metrics = await scrape(daemon)
    held = one(metrics, "fpolicyd_settle_pending")
    assert 0 < held <= report.sent
    assert held == processor.stage.pending


@pytest.mark.settings(health_heartbeat_interval_s=0.05, health_loop_stall_s=0.5)
async def test_healthz_fails_while_the_event_loop_is_wedged(daemon: Daemon) -> None:
    status, body = await get(daemon, "/healthz")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"
    port = daemon.http_port
    assert port is not None
    seen: dict[str, tuple[int, bytes]] = {}
    unwedge = threading.Event()

    def probe() -> None:
        """From another thread, while the loop is blocked: poll until /healthz fails (bounded)."""
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                status, body = http_get(port, "/healthz")
                if status != 200:
                    seen["healthz"] = (status, body)
                    seen["readyz"] = http_get(port, "/readyz")
                    return
                time.sleep(0.05)
        finally:
            unwedge.set()

    prober = threading.Thread(target=probe)
    prober.start()
    # A callback that blocks the event loop (as a blocking call or a CPU-bound bug would) until the probe is done.
    asyncio.get_running_loop().call_soon(unwedge.wait, 30)
    await asyncio.sleep(0.01)
    await asyncio.to_thread(prober.join)

    status, body = seen["healthz"]
    assert status == 503
    report = orjson.loads(body)
    assert report["status"] == "fail"
    assert report["checks"][0]["name"] == "event_loop"
    assert not report["checks"][0]["ok"]
    assert seen["readyz"][0] == 503
    # The loop runs again: the next heartbeat makes the process healthy again.
    for _ in range(200):
        status, _body = await get(daemon, "/healthz")
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


async def test_event_loop_lag_is_exported_and_grows_with_each_probe(tmp_path: Path) -> None:
    """fpolicyd_event_loop_lag_seconds of a running daemon: one observation per probe; a loop blocked on purpose is
    one probe late by as long and one event_loop_stalled warning; the probe is gone once the daemon stopped."""
    settings = make_settings(tmp_path, **AS_DEPLOYED, event_loop_probe_interval_s=0.01, event_loop_stall_warn_s=0.15)
    daemon = Daemon(settings)
    lag = "fpolicyd_event_loop_lag_seconds"
    await daemon.start()
    try:
        assert daemon.loop_probe.running
        first = one(await scrape(daemon), lag, f"{lag}_count")
        with capture_logs() as logs:
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)
            for _ in range(200):  # up to 10 s
                await asyncio.sleep(0.05)
                if any(line["event"] == "event_loop_stalled" for line in logs):
                    break
        after = await scrape(daemon)
        count = one(after, lag, f"{lag}_count")
        assert count > first
        assert one(after, lag, f"{lag}_bucket", le="+Inf") == count
        assert count - one(after, lag, f"{lag}_bucket", le="0.25") >= 1
        assert one(after, lag, f"{lag}_sum") >= 0.25
        (stalled,) = [line for line in logs if line["event"] == "event_loop_stalled"]
        assert stalled["log_level"] == "warning"
        assert (stalled["threshold_s"], stalled["suppressed"]) == (0.15, 0)
        assert 0.25 <= stalled["lag_s"] < 10
        await asyncio.sleep(0.1)  # ~10 probes more
        assert count < one(await scrape(daemon), lag, f"{lag}_count")
    finally:
        await daemon.stop()
    assert not daemon.loop_probe.running


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_readyz_fails_while_a_sink_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    queue = f"sqs:http://127.0.0.1:{port}/123456789012/fpolicy-events"
    daemon = Daemon(make_settings(tmp_path, **AS_DEPLOYED, sinks=f"jsonl:{tmp_path / 'events'},{queue}"))
    await daemon.start()
    try:
        status, body = await get(daemon, "/readyz")
        assert status == 503, body
        checks = {c["name"]: c for c in orjson.loads(body)["checks"]}
        assert not checks[f"sink:{queue}"]["ok"]
        assert checks[f"sink:{queue}"]["detail"]
        failing = {name for name, check in checks.items() if not check["ok"]}
        assert failing == {f"sink:{queue}"}
        assert {"event_loop", "listener", "pipeline", "spool", f"sink:jsonl:{tmp_path / 'events'}"} <= set(checks)
        assert (await get(daemon, "/healthz"))[0] == 200  # alive, just not ready
        metrics = await scrape(daemon)
        assert one(metrics, "fpolicyd_sink_up", sink=queue) == 0
        assert one(metrics, "fpolicyd_sink_up", sink=f"jsonl:{tmp_path / 'events'}") == 1
    finally:
        await daemon.stop()


async def test_readyz_is_ok_when_everything_is(daemon: Daemon) -> None:
    status, body = await get(daemon, "/readyz")
    assert status == 200
    assert all(check["ok"] for check in orjson.loads(body)["checks"])
    assert (await get(daemon, "/nowhere"))[0] == 404


@pytest.mark.settings(http_enabled=False)
async def test_http_can_be_disabled(daemon: Daemon) -> None:
    assert daemon.http_port is None
