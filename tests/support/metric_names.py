"""The metric families issue 5 requires, shared by the unit and integration tests of the metrics."""

from __future__ import annotations

#: Item 3 of issue 5 (metrics) and the four SLO figures of reference-pipeline.md.
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
    "fpolicyd_slo_target",
})  # fmt: skip
