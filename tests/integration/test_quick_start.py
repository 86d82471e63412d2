"""The README quick start, as a new user runs it (issue 15 #5): `fpolicyd serve` and `fpolicyd simulate`, two
real subprocesses on 127.0.0.1. A fresh simulate run against a fresh daemon is not flagged ``replayed`` and
breaches no ingestion-latency SLO, because simulate stamps GenerationTime with the clock by default; a
``--fixed-time`` run (the reproducible 2023 stream) is flagged replayed and breaches it, event by event, which
shows that this test reads the flags and the counters it claims to."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.observability import http_get
from support.serve import read_events, start_serve

pytestmark = pytest.mark.slow

NODES, EVENTS = 2, 400


async def _simulate(port: int, manifest: Path, *flags: str) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fpolicyd",
        "simulate",
        "--port",
        str(port),
        "--nodes",
        str(NODES),
        "--events",
        str(EVENTS),
        "--rate",
        "1000",
        "--manifest",
        str(manifest),
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    report: dict[str, object] = orjson.loads(out)
    return report


def _metric(page: str, family: str) -> float:
    """The sum of a counter family's ``_total`` samples over its labels (0 when it has none yet)."""
    for parsed in text_string_to_metric_families(page):
        if parsed.name == family:
            return sum(s.value for s in parsed.samples if s.name == family + "_total")
    raise AssertionError(f"{family} is not on /metrics")


@pytest.mark.parametrize(("flags", "old"), [((), False), (("--fixed-time",), True)], ids=["default", "fixed-time"])
async def test_a_fresh_simulate_run_is_neither_replayed_nor_late(
    tmp_path: Path, flags: tuple[str, ...], old: bool
) -> None:
    daemon, reader = await start_serve(tmp_path)
    try:
        manifest = tmp_path / "sent.jsonl"
        report = await _simulate(daemon.port, manifest, *flags)
        total = NODES * EVENTS
        assert report["sent"] == total
        [http_port] = [line["port"] for line in daemon.log_lines if line.get("event") == "http_listening"]
        # Which ingest path runs is readable in the log as it is written (the default redaction hashes file paths:
        # it used to turn this line's value into a hash).
        [ingest] = [line for line in daemon.log_lines if line.get("event") == "ingest_path"]
        assert ingest["ingest"] in {"c", "python"}, ingest
        deadline = time.monotonic() + 30
        while True:  # until the sink has acknowledged every event: the SLO is counted on acknowledgement
            status, body = await asyncio.to_thread(http_get, http_port, "/metrics")
            assert status == 200
            page = body.decode()
            if _metric(page, "fpolicyd_sink_settled_events") >= total or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert _metric(page, "fpolicyd_sink_settled_events") == total
        events = read_events(tmp_path, live=True)
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.process.wait(), 30) == 0
        await reader
    sent = sorted(orjson.loads(line)["generation_time"] for line in manifest.read_bytes().splitlines())
    assert sorted(event["metadata"]["generation_time"] for event in events) == sent  # what simulate says it sent
    replayed = sum(1 for event in events if event["metadata"].get("replayed", False))
    breaches = _metric(page, "fpolicyd_ingestion_latency_slo_breaches")
    if old:
        assert (replayed, _metric(page, "fpolicyd_replayed_events"), breaches) == (total, total, total)
    else:
        assert (replayed, _metric(page, "fpolicyd_replayed_events"), breaches) == (0, 0, 0)
        assert _metric(page, "fpolicyd_events_received") == total
