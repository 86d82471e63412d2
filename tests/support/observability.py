"""The metric families issue 5 requires, and how tests read a daemon's /metrics."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fpolicyd.app import Daemon

#: Item 3 of issue 5 (metrics) and the four SLO figures of docs/reference-pipeline.md §7.
REQUIRED_FAMILIES: frozenset[str] = frozenset({
    "fpolicyd_sessions", "fpolicyd_sessions_opened", "fpolicyd_frames_received", "fpolicyd_events_received",
    "fpolicyd_parse_errors", "fpolicyd_spool_size_bytes", "fpolicyd_spool_records", "fpolicyd_sink_lag_records",
    "fpolicyd_sink_batch_records", "fpolicyd_sink_request_duration_seconds", "fpolicyd_sink_send_duration_seconds",
    "fpolicyd_sink_entries_failed", "fpolicyd_sink_retries", "fpolicyd_sink_dead_lettered", "fpolicyd_dedup_hits",
    "fpolicyd_settle_pending", "fpolicyd_backpressure_state", "fpolicyd_replayed_events",
    "fpolicyd_out_of_order_events", "fpolicyd_out_of_order_max_displacement_seconds", "fpolicyd_duplicate_events",
    "fpolicyd_replay_duration_seconds", "fpolicyd_reconnect_duration_seconds", "fpolicyd_end_to_end_latency_seconds",
    "fpolicyd_build_info", "fpolicyd_ingestion_latency_seconds", "fpolicyd_ingestion_latency_slo_breaches",
    "fpolicyd_processing_success_ratio", "fpolicyd_reconnect_last_duration_seconds", "fpolicyd_replay_active",
    "fpolicyd_slo_target", "fpolicyd_events_routed", "fpolicyd_events_unrouted", "fpolicyd_dedup_errors",
    "fpolicyd_processor_lag_records", "fpolicyd_connections_rejected", "fpolicyd_spool_fsync_duration_seconds",
    "fpolicyd_spool_commit_latency_seconds", "fpolicyd_event_loop_lag_seconds",
})  # fmt: skip


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(daemon: Daemon, path: str) -> tuple[int, bytes]:
    assert daemon.http_port is not None
    return await asyncio.to_thread(http_get, daemon.http_port, path)


async def scrape(daemon: Daemon) -> dict[str, list[Sample]]:
    status, body = await get(daemon, "/metrics")
    assert status == 200
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def one(samples: dict[str, list[Sample]], family: str, name: str | None = None, **labels: str) -> float:
    wanted = name or family
    found = [s.value for s in samples[family] if s.name == wanted and s.labels == labels]
    assert len(found) == 1, (wanted, labels, samples[family])
    return found[0]
