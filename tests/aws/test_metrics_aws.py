"""The sink metrics of an SQS sink against a moto server behind the fault-injecting proxy, compared with what the
proxy itself counted (requests, failed requests and their entries, transient and permanent entry failures)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from fpolicyd.app import Daemon
from fpolicyd.simulator.client import SimulatorConfig, run
from fpolicyd.sinks.aws.clients import AwsClients
from support.daemon import AS_DEPLOYED, make_settings
from support.moto_server import MotoEndpoint, create_queue, isolate_aws_env
from support.observability import one, scrape
from support.sqs_faults import SqsFaults

pytestmark = pytest.mark.slow


class CountingFaults(SqsFaults):
    """The proxy, also counting the entries of the whole requests it fails and the requests in which it fails
    an entry transiently (each of those is one retry round of the sink)."""

    entries_in_failed_requests = 0
    requests_with_transient = 0
    transient_entries = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp keeps it: the parent reads the same bytes again
        if request.headers.get("X-Amz-Target") == "AmazonSQS.SendMessageBatch" and self.request_failures:
            self.entries_in_failed_requests += len(json.loads(body)["Entries"])
        before = self.transient_entries
        response = await super()._handle(request)
        if self.transient_entries > before:
            self.requests_with_transient += 1
        return response


async def test_sqs_sink_metrics_match_what_the_endpoint_saw(
    moto: MotoEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as clients:
        queue_url = await create_queue(await clients.sqs())
    faults = CountingFaults(moto.url, request_failures=["500", "throttle"])
    permanent: set[str] = set()
    failed_once: set[str] = set()

    def rule(body: str) -> str | None:
        event = orjson.loads(body)
        if event["operation_type"] == "symlink":
            permanent.add(event["event_id"])
            return "permanent"  # SenderFault=true: dead-lettered
        if event["metadata"]["req_id"] % 7 == 0 and event["event_id"] not in failed_once:
            failed_once.add(event["event_id"])
            faults.transient_entries += 1
            return "transient"  # SenderFault=false: this entry alone is sent again
        return None

    faults.entry_rule = rule
    monkeypatch.setenv("AWS_ENDPOINT_URL", await faults.start())
    sink = f"sqs:{queue_url}"
    try:
        daemon = Daemon(make_settings(tmp_path, **AS_DEPLOYED, sinks=sink, sink_max_in_flight=1))
        await daemon.start()
        try:
            report = await run(SimulatorConfig(port=daemon.port, nodes=1, events=200, seed=25))
            worker = next(w for w in daemon.spooler.workers if w.name == sink)
            for _ in range(600):  # bounded: ~30 s
                if worker.figures().delivered >= report.sent and not worker.lag:
                    break
                await asyncio.sleep(0.05)
            metrics = await scrape(daemon)
        finally:
            await daemon.stop()
    finally:
        await faults.stop()

    sent = report.sent
    assert faults.request_failures == []
    assert permanent
    assert faults.transient_entries == len(failed_once) > 0
    assert faults.entries_in_failed_requests > 0
    assert faults.requests_with_transient > 0
    assert one(metrics, "fpolicyd_sink_settled_events", "fpolicyd_sink_settled_events_total", sink=sink) == sent
    assert one(metrics, "fpolicyd_sink_requests", "fpolicyd_sink_requests_total", sink=sink) == faults.batches
    request_time = "fpolicyd_sink_request_duration_seconds"
    assert one(metrics, request_time, f"{request_time}_count", sink=sink) == faults.batches
    assert one(metrics, "fpolicyd_sink_dead_lettered", "fpolicyd_sink_dead_lettered_total", sink=sink) == len(permanent)
    # Written by the sink's own process (the delivery process on two CPUs or more), counted in the daemon's /metrics.
    records = "fpolicyd_dead_letter_records"
    assert one(metrics, records, f"{records}_total", source=sink) == len(permanent)
    assert one(metrics, records, f"{records}_total", source="decoder") == 0
    assert 0 < one(metrics, "fpolicyd_dead_letter_size_bytes") <= one(metrics, "fpolicyd_dead_letter_limit_bytes")
    failed = "fpolicyd_sink_entries_failed"
    assert one(metrics, failed, f"{failed}_total", sink=sink, retryable="false") == len(permanent)
    assert one(metrics, failed, f"{failed}_total", sink=sink, retryable="true") == (
        faults.transient_entries + faults.entries_in_failed_requests
    )
    # One retry round per request that had something to retry: the two failed requests and each request with a
    # transient entry failure.
    assert one(metrics, "fpolicyd_sink_retries", "fpolicyd_sink_retries_total", sink=sink) == (
        2 + faults.requests_with_transient
    )
    assert one(metrics, "fpolicyd_processing_success_ratio", sink=sink) == pytest.approx((sent - len(permanent)) / sent)
    batches = "fpolicyd_sink_batch_records"
    assert one(metrics, batches, f"{batches}_sum", sink=sink) == sent
    e2e = "fpolicyd_end_to_end_latency_seconds"
    assert one(metrics, e2e, f"{e2e}_count", sink=sink) == sent
    assert one(metrics, "fpolicyd_sink_up", sink=sink) == 1
