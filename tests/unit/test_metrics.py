"""Metrics, health and dashboards without a network: collector output for hand-set inputs, naming conventions,
the event-timestamp reader, the heartbeat and readiness rules, and the metric names the dashboards use."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.core import Metric

from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.events import NameMaps, format_rfc3339_us
from fpolicyd.obs.health import Heartbeat, readiness
from fpolicyd.obs.http import ObservabilityServer
from fpolicyd.obs.metrics import (
    LATENCY_BUCKETS,
    LATENCY_SAMPLES,
    EventClock,
    Histogram,
    Metrics,
    ReplayFigures,
    SinkInstruments,
)
from fpolicyd.pipeline.backpressure import Pressure, Watermarks
from fpolicyd.pipeline.ingest import Ingest, IngestCounters
from fpolicyd.pipeline.records import Record
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.protocol.messages import NotfType
from fpolicyd.protocol.req_types import Operation
from fpolicyd.protocol.session import STATUS_ANSWERS, NoticeKind
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.server.budget import Refusal
from fpolicyd.server.connection import LiveConnections, ServerContext
from fpolicyd.server.metric_labels import METRIC_LABELS
from fpolicyd.server.spooler import Spooler
from fpolicyd.server.tls_failures import TlsFailure
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.sender import AwsSender
from fpolicyd.sinks.aws.targets import SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy
from fpolicyd.storage.disk import Writer, sink_writer
from fpolicyd.storage.spool import Spool, SpoolFsync, SpoolSettings
from support.observability import REQUIRED_FAMILIES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "fpolicyd-dashboard.json"
CLOUDWATCH = ROOT / "deploy" / "cloudwatch" / "fpolicyd-slo-alarms.json"

#: Label names that would carry per-event identities (unbounded cardinality, classified data).
FORBIDDEN_LABELS = {"path", "file_path", "previous_path", "user", "uid", "sid", "client_ip", "ip", "peer", "session",
                    "session_id", "event_id", "node", "req_id"}  # fmt: skip


class FakeSender:
    """A Sender that is never started: the collector only reads its name."""

    max_records = 100
    max_bytes = 1 << 20
    max_in_flight = 1
    linger_s = 0.0
    linger_records = 100

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:
        return None

    async def send(self, records: Sequence[Record]) -> Sequence[Record]:
        return ()

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class FakeReplay:
    reconnects: int = 3
    last_reconnect_s: float = 4.5
    max_reconnect_s: float = 12.0
    total_reconnect_s: float = 20.0
    replayed_events: int = 40
    out_of_order_events: int = 7
    max_out_of_order_lag_us: int = 2_500_000
    duplicates: int = 2
    replay_active: bool = True
    replay_episodes: int = 1
    replay_duration_s: float = 31.0
    replay_episode_events: int = 40
    replay_throughput_eps: float = 1.29
    max_replay_duration_s: float = 31.0


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool.open(
        SpoolSettings(directory=tmp_path / "spool", segment_bytes=1 << 20, max_bytes=8 << 20, fsync=SpoolFsync.never),
        ["jsonl:/data/events", "sqs:https://sqs.eu-west-1.amazonaws.com/1/q"],
    )
    yield opened
    opened.close()


def build(
    spool: Spool, tmp_path: Path, replay: Callable[[], ReplayFigures] | None = None
) -> tuple[Metrics, ServerContext, Spooler, AwsSender]:
    sqs = AwsSender(
        SqsTarget(queue_url="https://sqs.eu-west-1.amazonaws.com/1/q"),
        AwsClients(region_name="eu-west-1"),
        DeadLetterWriter(tmp_path / "dead-letter.jsonl"),
        max_in_flight=1,
        retry=RetryPolicy(),
        linger_s=0.0,
    )
    connections = LiveConnections()
    spooler = Spooler(
        spool,
        [FakeSender("jsonl:/data/events"), sqs],
        Watermarks(low_bytes=2 << 20, high_bytes=4 << 20, hard_bytes=6 << 20),
        checkpoint_interval_s=1.0,
        broadcast_back_pressure=connections.broadcast_back_pressure,
    )
    ctx = ServerContext(
        session_config=SessionConfig(),
        ingest=Ingest(names=NameMaps(), counters=IngestCounters(), replay=ReplayTracker()),
        spooler=spooler,
        connections=connections,
        max_frame_bytes=1 << 20,
        max_connections=8,
    )
    metrics = Metrics(labels=METRIC_LABELS, ingestion_slo_s=5.0, process_metrics=False, replay=replay)
    metrics.attach(ctx, spooler)
    return metrics, ctx, spooler, sqs


def families(metrics: Metrics) -> dict[str, Metric]:
    return {family.name: family for family in metrics.registry.collect()}


def value(family: Metric, sample: str | None = None, **labels: str) -> float:
    name = sample or family.name + ("_total" if family.type == "counter" else "")
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]


# ------------------------------------------------------------------------------------------- histogram


def test_histogram_is_cumulative_with_le_bounds() -> None:
    h = Histogram([1.0, 5.0])
    h.observe(1.0)  # le="1.0" includes the bound itself
    h.observe_many([0.5, 3.0, 7.0])
    buckets, total, count = h.snapshot()
    assert buckets == [("1.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert total == pytest.approx(11.5)
    assert count == 4 == h.count


@pytest.mark.parametrize("bounds", [[], [2.0, 1.0], [1.0, 1.0]])
def test_histogram_refuses_bad_bounds(bounds: list[float]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(bounds)


@given(st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), max_size=50))
def test_histogram_counts_every_value_once(values: list[float]) -> None:
    h = Histogram(LATENCY_BUCKETS)
    h.observe_many(values)
    buckets, total, count = h.snapshot()
    assert count == len(values) == buckets[-1][1]
    assert [c for _, c in buckets] == sorted(c for _, c in buckets)
    for le, cumulative in buckets[:-1]:
        assert cumulative == sum(1 for v in values if v <= float(le))
    assert total == pytest.approx(sum(values))


# -------------------------------------------------------------------------------------- event clock


def event_json(received_us: int, generation_us: int | None) -> bytes:
    return orjson.dumps(
        {
            "event_id": "x",
            "file_path": '/odd "received_at":"1999-01-01T00:00:00.000000Z" name',
            "metadata": {"received_at": format_rfc3339_us(received_us), "generation_time": generation_us},
        }
    )


@given(
    received=st.integers(min_value=0, max_value=253_402_300_799_999_999),
    generated=st.none() | st.integers(min_value=0, max_value=2**62),
)
def test_event_clock_reads_what_normalize_wrote(received: int, generated: int | None) -> None:
    clock = EventClock()
    payload = event_json(received, generated)
    # A file name that contains the key text is escaped by JSON, so only the real field matches.
    assert clock.received_at_us(payload) == received
    assert clock.generation_time_us(payload) == generated


@pytest.mark.parametrize(
    "payload",
    [b"{}", b'{"metadata":{"received_at":"not a time"}}', b'{"metadata":{"received_at":"2024-13-40T99:00:00.1Z"}}'],
)
def test_event_clock_skips_what_it_cannot_read(payload: bytes) -> None:
    assert EventClock().received_at_us(payload) is None
    assert EventClock.generation_time_us(payload) is None


def test_settled_observes_latency_per_record_and_counts_slo_breaches() -> None:
    now_us = 1_700_000_100_000_000
    inst = SinkInstruments(ingestion_slo_s=5.0, wall_clock_us=lambda: now_us)
    records = [
        Record(1, event_json(now_us - 200_000, now_us - 1_000_000)),  # 0.2 s end to end, 1 s ingestion
        Record(2, event_json(now_us - 300_000, now_us - 9_000_000)),  # ingestion 9 s: a breach
        Record(3, event_json(now_us - 100_000, None)),  # no GenerationTime: ingestion = end to end
        Record(4, b"{}"),  # unreadable: skipped, not guessed
    ]
    inst.settled(records)
    _, e2e_sum, e2e_count = inst.end_to_end_seconds.snapshot()
    _, ingestion_sum, ingestion_count = inst.ingestion_seconds.snapshot()
    assert (e2e_count, ingestion_count) == (3, 3)
    assert e2e_sum == pytest.approx(0.6)
    assert ingestion_sum == pytest.approx(1.0 + 9.0 + 0.1)
    assert inst.ingestion_slo_breaches == 1


@given(size=st.integers(min_value=1, max_value=3 * LATENCY_SAMPLES + 7), slow_from=st.integers(min_value=0))
def test_large_batches_are_sampled_but_every_record_is_counted(size: int, slow_from: int) -> None:
    """Above LATENCY_SAMPLES records, evenly spaced records stand for their neighbours: the counts stay exact
    and a batch whose events are all slow (or all fast) is measured exactly."""
    now_us = 1_700_000_100_000_000
    slow_from %= size + 1
    inst = SinkInstruments(ingestion_slo_s=5.0, wall_clock_us=lambda: now_us)
    records = [
        Record(i, event_json(now_us - 100_000, now_us - (9_000_000 if i >= slow_from else 1_000_000)))
        for i in range(size)
    ]
    inst.settled(records)
    assert inst.end_to_end_seconds.count == size
    assert inst.ingestion_seconds.count == size
    _, e2e_sum, _ = inst.end_to_end_seconds.snapshot()
    assert e2e_sum == pytest.approx(0.1 * size)
    slow = size - slow_from
    if size <= LATENCY_SAMPLES or slow in (0, size):
        assert inst.ingestion_slo_breaches == slow
    else:  # each sample stands for at most ceil(size / LATENCY_SAMPLES) records
        assert abs(inst.ingestion_slo_breaches - slow) <= -(-size // LATENCY_SAMPLES)


def test_weighted_observations() -> None:
    h = Histogram([1.0, 5.0])
    h.observe_many([0.5, 7.0], [3, 2])
    assert h.snapshot() == ([("1.0", 3.0), ("5.0", 3.0), ("+Inf", 5.0)], 15.5, 5)


def test_send_failures_are_counted_by_retryability() -> None:
    inst = SinkInstruments()
    inst.send_failed(4, retryable=True)
    inst.send_failed(1, retryable=False)
    assert (inst.entries_failed_retryable, inst.entries_failed_permanent, inst.retries) == (4, 1, 2)


# --------------------------------------------------------------------------------------- collector


def test_collector_reads_hand_set_counters(spool: Spool, tmp_path: Path) -> None:
    metrics, ctx, spooler, sqs = build(spool, tmp_path, FakeReplay)
    ctx.ingest.counters.events = 10
    ctx.ingest.counters.paths_truncated = 7
    ctx.sessions_opened = 3
    ctx.notices = {NoticeKind.HANDSHAKE: 3, NoticeKind.KEEP_ALIVE: 5, NoticeKind.STATE: 3, NoticeKind.ALERT: 1}
    ctx.ingest.counters.operations = {"create": 6, "rename": 4}
    ctx.protocol_errors = {"bad_marker": 2, "idle_timeout": 1}
    jsonl, cloud = spooler.local_workers
    jsonl.stats.delivered = 10
    jsonl.instruments.send_failed(3, retryable=True)
    jsonl.last_error = SinkError("disk full", retriable=True)
    cloud.stats.delivered = 8
    sqs.dead_lettered = 2
    sqs.entries_failed_permanent = 2
    sqs.entries_failed_retryable = 5
    sqs.retry_requests = 4
    sqs.requests = 9
    metrics.count_dedup_hits(2)
    metrics.settle_pending_source = lambda: 6

    got = families(metrics)
    frames = got["fpolicyd_frames_received"]
    assert value(frames, type="SCREEN_REQ") == 10
    assert value(frames, type="NEGO_REQ") == 3
    assert value(frames, type="KEEP_ALIVE") == 5
    assert value(frames, type="ALERT_MSG") == 1
    assert sum(s.value for s in frames.samples) == 19  # STATE is not a frame
    ops = got["fpolicyd_events_received"]
    assert value(ops, operation="create") == 6
    assert value(ops, operation="delete") == 0  # every operation is exported from the start
    assert {s.labels["operation"] for s in ops.samples} == {o.value for o in Operation}
    assert value(got["fpolicyd_parse_errors"], reason="bad_marker") == 2
    assert value(got["fpolicyd_session_timeouts"], reason="idle_timeout") == 1
    assert [s.labels for s in got["fpolicyd_parse_errors"].samples] == [{"reason": "bad_marker"}]
    assert value(got["fpolicyd_sessions_opened"]) == 3
    assert value(got["fpolicyd_paths_truncated"]) == 7

    j, c = "jsonl:/data/events", sqs.name
    assert value(got["fpolicyd_sink_up"], sink=j) == 0
    assert value(got["fpolicyd_sink_up"], sink=c) == 1
    failed = got["fpolicyd_sink_entries_failed"]
    assert value(failed, sink=j, retryable="true") == 3
    assert value(failed, sink=c, retryable="true") == 5
    assert value(failed, sink=c, retryable="false") == 2
    assert value(got["fpolicyd_sink_retries"], sink=j) == 1
    assert value(got["fpolicyd_sink_retries"], sink=c) == 4
    assert value(got["fpolicyd_sink_requests"], sink=c) == 9
    assert value(got["fpolicyd_sink_dead_lettered"], sink=c) == 2
    assert value(got["fpolicyd_processing_success_ratio"], sink=c) == pytest.approx(6 / 8)
    assert value(got["fpolicyd_processing_success_ratio"], sink=j) == 1.0
    assert value(got["fpolicyd_backpressure_state"], state="normal") == 1
    assert value(got["fpolicyd_spool_limit_bytes"]) == 8 << 20

    assert value(got["fpolicyd_dedup_hits"]) == 2
    assert value(got["fpolicyd_settle_pending"]) == 6
    assert value(got["fpolicyd_reconnects"]) == 3
    reconnect = got["fpolicyd_reconnect_duration_seconds"]
    assert value(reconnect, "fpolicyd_reconnect_duration_seconds_sum") == 20.0
    assert value(reconnect, "fpolicyd_reconnect_duration_seconds_count") == 3
    assert value(got["fpolicyd_out_of_order_max_displacement_seconds"]) == 2.5
    assert value(got["fpolicyd_replay_duration_seconds"]) == 31.0
    assert value(got["fpolicyd_replay_active"]) == 1
    assert value(got["fpolicyd_duplicate_events"]) == 2


def test_every_family_follows_the_naming_rules(spool: Spool, tmp_path: Path) -> None:
    metrics, ctx, _spooler, _sqs = build(spool, tmp_path, FakeReplay)
    ctx.protocol_errors = {"bad_marker": 1}
    got = families(metrics)
    assert set(got) >= REQUIRED_FAMILIES
    for name, family in got.items():
        assert name.startswith("fpolicyd_"), name
        assert family.documentation, name
        for sample in family.samples:
            assert not set(sample.labels) & FORBIDDEN_LABELS, (name, sample.labels)
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
        if family.type != "counter" and any(word in name for word in ("latency", "duration")):
            assert name.endswith("_seconds"), f"{name}: durations are in seconds"
        assert not re.search(r"_(ms|milliseconds|us|kb|mb|kib|mib)(_|$)", name), f"{name}: base units only"


def test_every_member_of_the_label_enums_is_exported_before_it_is_seen(spool: Spool, tmp_path: Path) -> None:
    """obs imports none of these enums: the daemon passes their members in (METRIC_LABELS), each a zero series."""
    metrics, _ctx, spooler, sqs = build(spool, tmp_path)
    got = families(metrics)

    def labels(family: str, label: str) -> list[str]:
        return [s.labels[label] for s in got[family].samples if s.name == family + "_total" or s.name == family]

    assert labels("fpolicyd_connections_rejected", "reason") == ["not_allowed", *(r.value for r in Refusal)]
    assert labels("fpolicyd_tls_handshake_failures", "reason") == [f.value for f in TlsFailure]
    assert labels("fpolicyd_status_queries", "answer") == list(STATUS_ANSWERS.values())
    assert labels("fpolicyd_backpressure_state", "state") == [p.value for p in Pressure]
    assert labels("fpolicyd_events_received", "operation") == [o.value for o in Operation]
    frames = labels("fpolicyd_frames_received", "type")
    assert frames[0] == NotfType.SCREEN_REQ
    assert {NotfType.NEGO_REQ, NotfType.KEEP_ALIVE, NotfType.ALERT_MSG, "unknown", "unexpected"} <= set(frames)
    sinks = [sink_writer(worker.name) for worker in spooler.workers]
    assert sink_writer(sqs.name) in sinks
    for family in ("fpolicyd_disk_full", "fpolicyd_disk_full_episodes", "fpolicyd_disk_full_errors"):
        assert labels(family, "writer") == [*(w.value for w in Writer), *sinks]
    unseen = ("fpolicyd_connections_rejected", "fpolicyd_tls_handshake_failures", "fpolicyd_disk_full")
    assert {s.value for name in got if name.startswith(unseen) for s in got[name].samples} == {0}


def test_families_exist_before_the_daemon_started() -> None:
    """The HTTP server starts first (spool recovery can take a while): nothing is read, nothing is missing."""
    got = families(Metrics(labels=METRIC_LABELS, process_metrics=False))
    assert set(got) >= REQUIRED_FAMILIES
    assert got["fpolicyd_sessions"].samples == []


def test_registries_are_per_daemon() -> None:
    # would raise "Duplicated timeseries" on a shared registry
    first, second = Metrics(labels=METRIC_LABELS), Metrics(labels=METRIC_LABELS)
    first.count_dedup_hits(5)
    assert value(families(second)["fpolicyd_dedup_hits"]) == 0


# ------------------------------------------------------------------------------------------- health


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_fails_liveness_once_stale() -> None:
    clock = FakeClock()
    heartbeat = Heartbeat(interval_s=1.0, stall_s=10.0, clock=clock)
    clock.now += 9.5
    assert heartbeat.liveness().status == 200
    clock.now += 1.0
    report = heartbeat.liveness()
    assert report.status == 503
    body = orjson.loads(report.to_json())
    assert body["status"] == "fail"
    assert body["checks"][0]["name"] == "event_loop"
    assert "stalled" in body["checks"][0]["detail"]


def test_heartbeat_stall_must_exceed_interval() -> None:
    with pytest.raises(ConfigError, match="health_loop_stall_s"):
        Heartbeat(interval_s=5.0, stall_s=5.0)


def test_readiness_lists_each_failing_check(spool: Spool, tmp_path: Path) -> None:
    _metrics, _ctx, spooler, _sqs = build(spool, tmp_path)
    heartbeat = Heartbeat(interval_s=1.0, stall_s=10.0, clock=FakeClock())
    ready = readiness(heartbeat, listening="127.0.0.1:9898", spooler=spooler, spool_limit_bytes=8 << 20)
    assert ready.status == 200
    assert [c.name for c in ready.checks] == [
        "event_loop",
        "listener",
        "pipeline",
        "spool",
        "disk",
        "sink:jsonl:/data/events",
        f"sink:{spooler.workers[1].name}",
    ]
    spooler.local_workers[1].last_error = SinkError("connection refused", retriable=True)
    spooler.fatal = OSError("fsync failed")
    report = readiness(heartbeat, listening=None, spooler=spooler, spool_limit_bytes=spool.size_bytes)
    failing = {c.name: c.detail for c in report.checks if not c.ok}
    assert report.status == 503
    assert set(failing) == {"listener", "pipeline", "spool", f"sink:{spooler.workers[1].name}"}
    assert "connection refused" in failing[f"sink:{spooler.workers[1].name}"]
    assert readiness(heartbeat, listening=None, spooler=None, spool_limit_bytes=1).status == 503


def test_http_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        heartbeat = Heartbeat(interval_s=1.0, stall_s=10.0)
        server = ObservabilityServer(
            "127.0.0.1",
            port,
            registry=Metrics(labels=METRIC_LABELS).registry,
            liveness=heartbeat.liveness,
            readiness=heartbeat.liveness,
        )
        with pytest.raises(ConfigError, match="cannot listen"):
            server.start()


# ---------------------------------------------------------------------------------------- dashboards


def exported_series() -> set[str]:
    """Every series name /metrics can contain (histograms: _bucket/_sum/_count; counters: _total)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    for family in Metrics(labels=METRIC_LABELS).registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


#: PromQL keywords that look like identifiers (functions are recognised by the parenthesis that follows them).
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                    "offset", "le", "Inf", "NaN"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    expr = re.sub(r"label_values\(\s*([^,)]+)(,[^)]*)?\)", r"\1", expr)  # Grafana: label_values(metric, label)
    expr = re.sub(r'"[^"]*"', "", expr)  # label values, strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables ($__rate_interval, $sink)
    expr = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", expr)  # numbers, 1e-9 included
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\(|[A-Za-z0-9_:])", expr)
    return {t for t in tokens if t not in _PROMQL_KEYWORDS}


def test_promql_metric_names_finds_metrics_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, sink) (rate(fpolicyd_x_bucket{sink=~"$sink"}[$__rate_interval]))) '
        "/ clamp_min(sum(rate(fpolicyd_y_total[5m])), 1e-9) and on (instance) process_cpu_seconds_total"
    )
    assert promql_metric_names(expr) == {"fpolicyd_x_bucket", "fpolicyd_y_total", "process_cpu_seconds_total"}
    assert promql_metric_names("label_values(fpolicyd_build_info, instance)") == {"fpolicyd_build_info"}


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []
    panels = list(board["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        exprs.extend(target["expr"] for target in panel.get("targets", []))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"]
    assert board["panels"]
    assert board["schemaVersion"] >= 30
    exprs = dashboard_expressions()
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        used |= names
    exported = exported_series()
    assert used <= exported, sorted(used - exported)
    # The dashboard shows the four SLOs and the health of every stage.
    for needed in (
        "fpolicyd_ingestion_latency_seconds_bucket",
        "fpolicyd_processing_success_ratio",
        "fpolicyd_reconnect_last_duration_seconds",
        "fpolicyd_replay_duration_seconds",
        "fpolicyd_end_to_end_latency_seconds_bucket",
        "fpolicyd_events_received_total",
        "fpolicyd_sink_lag_records",
    ):
        assert needed in used, needed


#: Metric families the dashboard does not show, and why (every other family must be on it).
NOT_ON_DASHBOARD: dict[str, str] = {
    "python_info": "the interpreter's version: fpolicyd_build_info (shown) carries it",
    "process_virtual_memory_bytes": "address space, not memory use: resident memory is shown",
    "process_start_time_seconds": "a restart shows as a gap in every panel",
    "process_open_fds": "a host concern (node exporter); fpolicyd's own limits are max_connections and the spool",
    "process_max_fds": "as process_open_fds",
    "fpolicyd_ingest_accelerated": "build detail (1 when the compiled decoder is in use), not an operating figure",
    "fpolicyd_sink_sends": "send calls per sink: the requests per event and the batch size panels show the same",
    "fpolicyd_replay_max_duration_seconds": "the replay-duration panels show the current and last replay",
}


def exported_families() -> dict[str, set[str]]:
    """Every metric family of the collector → the series names it exports."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    return {
        family.name: {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        for family in Metrics(labels=METRIC_LABELS).registry.collect()
    }


def test_every_metric_family_is_on_the_dashboard_or_listed_as_not_shown() -> None:
    used: set[str] = set()
    for expr in dashboard_expressions():
        used |= promql_metric_names(expr)
    families = exported_families()
    shown = {name for name, series in families.items() if series & used}
    assert set(NOT_ON_DASHBOARD) <= set(families), sorted(set(NOT_ON_DASHBOARD) - set(families))
    assert not shown & set(NOT_ON_DASHBOARD), (
        f"on the dashboard, yet listed as not shown: {shown & set(NOT_ON_DASHBOARD)}"
    )
    missing = set(families) - shown - set(NOT_ON_DASHBOARD)
    assert not missing, f"metric families neither on the dashboard nor in NOT_ON_DASHBOARD: {sorted(missing)}"
    # Issue 15: a stalled processing stage, the disk, the server's limits and the dead letters are visible.
    for needed in (
        "fpolicyd_events_routed", "fpolicyd_events_unrouted", "fpolicyd_processor_lag_records",
        "fpolicyd_dedup_errors", "fpolicyd_dedup_store_up", "fpolicyd_disk_full", "fpolicyd_status_queries",
        "fpolicyd_peer_write_stalls", "fpolicyd_tls_handshake_failures", "fpolicyd_pending_connections",
        "fpolicyd_dead_letter_dropped", "fpolicyd_processor_room_waits",
    ):  # fmt: skip
        assert needed in shown, needed


def dashboard_panels() -> list[dict[str, Any]]:
    board = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    pending = list(board["panels"])
    while pending:
        panel = pending.pop(0)
        pending.extend(panel.get("panels", []))
        panels.append(panel)
    return panels


def test_slo_thresholds_come_from_the_slo_target_metric() -> None:
    """Each SLO stat takes its threshold from fpolicyd_slo_target (Grafana's "config from query results"), not a
    number typed into the dashboard; the exporter publishes each of those slo values."""
    targets = {
        "fpolicyd_ingestion_latency_seconds_bucket": "ingestion_latency_seconds",
        "fpolicyd_processing_success_ratio": "processing_success_ratio",
        "fpolicyd_reconnect_last_duration_seconds": "reconnect_seconds",
        "fpolicyd_replay_duration_seconds": "replay_completion_seconds",
    }
    seen: set[str] = set()
    for panel in dashboard_panels():
        if panel["type"] != "stat":
            continue
        names = {n for t in panel["targets"] for n in promql_metric_names(t["expr"])}
        slo = next((targets[n] for n in names if n in targets), None)
        if slo is None or "fpolicyd_slo_target" not in names:
            continue
        (config_query,) = [t for t in panel["targets"] if "fpolicyd_slo_target" in t["expr"]]
        assert f'slo="{slo}"' in config_query["expr"], panel["title"]
        (transform,) = [t for t in panel.get("transformations", []) if t["id"] == "configFromData"]
        assert transform["options"]["configRefId"] == config_query["refId"]
        mapping = {"fieldName": config_query["legendFormat"], "handlerKey": "threshold1"}
        assert mapping in transform["options"]["mappings"]
        seen.add(slo)
    assert seen == set(targets.values())
    exported = {
        s.labels["slo"]
        for f in Metrics(labels=METRIC_LABELS).registry.collect()
        if f.name == "fpolicyd_slo_target"
        for s in f.samples
    }
    assert seen <= exported


def series_kind(expr: str) -> str:
    """What a PromQL expression's values are: seconds, a rate (per second), a count per interval, or a level."""
    if "_seconds" in expr and "process_cpu_seconds_total" not in expr:
        return "seconds"
    if "histogram_quantile(" in expr or "/ clamp_min(" in expr:
        return "level"  # a quantile or mean of records, a ratio
    if "increase(" in expr:
        return "level"  # a count per interval, like a gauge of things
    if "rate(" in expr:
        return "rate"
    return "level"


def test_no_timeseries_panel_draws_seconds_counts_and_rates_on_one_axis() -> None:
    """The series a panel draws on its default axis are of one kind; a series of another kind has an override
    (by query) that gives it its own unit."""
    for panel in dashboard_panels():
        if panel["type"] != "timeseries":
            continue
        own_unit = {
            override["matcher"]["options"]
            for override in panel["fieldConfig"]["overrides"]
            if override["matcher"]["id"] == "byFrameRefID" and any(p["id"] == "unit" for p in override["properties"])
        }
        kinds = {series_kind(t["expr"]) for t in panel["targets"] if t["refId"] not in own_unit}
        assert len(kinds) == 1, (panel["title"], kinds)


def test_sink_legends_use_a_short_name_without_the_account_or_path() -> None:
    """The dashboard keeps the ``sink`` label (the full URI: the $sink variable, alarms, tests) and derives a short
    ``sink_name`` for legends with label_replace; its regex (RE2, anchored) applied to the sink URIs fpolicyd uses."""
    replaces = {
        match.groups()
        for expr in dashboard_expressions()
        for match in re.finditer(r'label_replace\(.*, "sink_name", "([^"]*)", "sink", "([^"]*)"\)$', expr)
    }
    ((replacement, pattern),) = replaces  # one recipe everywhere
    with_sink = [e for e in dashboard_expressions() if re.search(r"by \([^)]*\bsink\b", e)]
    assert with_sink
    assert all("label_replace(" in e for e in with_sink)
    regex = re.compile(pattern.replace("\\\\", "\\"))
    samples = {
        "jsonl:/var/lib/fpolicyd/events": "jsonl:events",
        "jsonl:/data/events/": "jsonl:events",
        "sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/fpolicy-events.fifo": "sqs:fpolicy-events.fifo",
        "eventbridge:arn:aws:events:eu-west-1:123456789012:event-bus/audit": "eventbridge:audit",
        "eventbridge:default": "eventbridge:default",
    }
    for sink, short in samples.items():
        match = regex.fullmatch(sink)
        assert match is not None, sink
        assert match.expand(replacement.replace("$", "\\")) == short, sink


def cloudwatch_metric_names(template: dict[str, object]) -> set[str]:
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "MetricName" in node and isinstance(node["MetricName"], str):
                names.add(node["MetricName"])
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(template)
    return names


def test_cloudwatch_alarms_use_published_metrics() -> None:
    template = json.loads(CLOUDWATCH.read_text())
    resources = template["Resources"]
    assert isinstance(resources, dict)
    alarms = {name for name, res in resources.items() if res["Type"] == "AWS::CloudWatch::Alarm"}
    assert {"IngestionLatencySlo", "ProcessingSuccessSlo", "ReconnectSlo", "ReplayCompletionSlo"} <= alarms
    used = cloudwatch_metric_names(template)
    assert used, "no MetricName in the template"
    exported = exported_series()
    assert used <= exported, sorted(used - exported)
    # The agent drops histograms: alarms must use counters, gauges and summary sums/counts only.
    assert not {n for n in used if n.endswith("_bucket")}
    # The agent configuration embedded in the template selects every metric an alarm uses.
    value = resources["CloudWatchAgentConfig"]["Properties"]["Value"]
    agent = json.loads(value["Fn::Sub"] if isinstance(value, dict) else value)
    declarations = agent["logs"]["metrics_collected"]["prometheus"]["emf_processor"]["metric_declaration"]
    selectors = [re.compile(s) for d in declarations for s in d["metric_selectors"]]
    for name in used:
        assert any(s.search(name) for s in selectors), f"{name} is not published by the agent configuration"


def test_cloudwatch_template_passes_cfn_lint() -> None:
    from cfnlint.api import lint_file  # type: ignore[import-untyped]  # dev dependency without type hints

    matches = lint_file(CLOUDWATCH)
    assert [str(m) for m in matches] == []


def test_all_instances_row_sums_rates_and_shows_lag_and_spool_per_instance() -> None:
    """Issue 12: with several instances behind one engine, one row shows them all whatever the Instance filter:
    summed event rates, and each instance's sink lag and spool size (by the ``instance`` label)."""
    board = json.loads(DASHBOARD.read_text())
    rows = [panel for panel in board["panels"] if panel["type"] == "row"]
    (row,) = [panel for panel in rows if panel["title"].startswith("All instances")]
    top = row["gridPos"]["y"]
    below = [panel for panel in rows if panel["gridPos"]["y"] > top]
    end = min((panel["gridPos"]["y"] for panel in below), default=10**6)
    exprs = [
        target["expr"]
        for panel in board["panels"]
        if panel["type"] != "row" and top < panel["gridPos"]["y"] < end
        for target in panel["targets"]
    ]
    assert exprs
    assert not [e for e in exprs if "$instance" in e], "the row is every instance, not the filtered ones"
    assert "sum(rate(fpolicyd_events_received_total[$__rate_interval]))" in exprs
    assert "sum(rate(fpolicyd_sink_settled_events_total[$__rate_interval]))" in exprs
    per_instance = {name for e in exprs if re.search(r"\bby \(instance\)", e) for name in promql_metric_names(e)}
    assert {"fpolicyd_sink_lag_records", "fpolicyd_spool_size_bytes"} <= per_instance
