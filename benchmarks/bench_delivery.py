"""CPU per event of the delivery work alone: spool → SQS / EventBridge, in one process, nothing else running in it.

    .venv/bin/python benchmarks/bench_delivery.py [--events 50000] [--runs 3] [--rows sqs,eventbridge,sqs-packed]
        [--tls]

What the delivery process of ``fpolicyd serve`` does for an AWS sink, without the daemon, the load generator or
the other process's reads: a spool is filled beforehand with the simulator corpus's events (stored exactly as the
reader stores them: ``bench_ingest_step.py``'s ingest session, packaged routes), then one :class:`SinkWorker` with
the sender ``sinks/factory.py`` builds from the default settings reads it through a
:class:`~fpolicyd.storage.spool.SpoolTail` (as the delivery process does) and sends everything to
``benchmarks/aws_endpoint.py`` (its own process, O(1) per request; its CPU is reported apart). The clock and the
CPU count (this process, all threads) run from the worker's start to the last ack. Not counted: the acks' trip to
the daemon (the delivery channel) and the figures sent to it every 0.5 s.

``--tls``: the endpoint serves HTTPS, as AWS does, so the client's TLS work is counted too. Rows run interleaved
(run 1 of every row, then run 2); each prints events/s, delivery CPU µs per event and per request, requests per
event, and the endpoint's CPU µs per event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import uvloop  # noqa: E402

from aws_endpoint import EndpointProcess, endpoint_process, self_issued_certificate  # noqa: E402 - benchmarks are run as scripts
from bench_ingest_step import RECEIVED_US, corpus, ingest_session  # noqa: E402
from daemon_process import cpu_seconds  # noqa: E402
from fpolicyd.config import Settings, load_settings  # noqa: E402
from fpolicyd.pipeline.router import Router  # noqa: E402
from fpolicyd.server.runtime import tune_garbage_collector  # noqa: E402
from fpolicyd.sinks.aws.clients import AwsClients  # noqa: E402
from fpolicyd.sinks.dead_letter import DeadLetterWriter  # noqa: E402
from fpolicyd.sinks.factory import build_senders  # noqa: E402
from fpolicyd.sinks.runner import SinkWorker  # noqa: E402
from fpolicyd.storage.routes_file import load_routes  # noqa: E402
from fpolicyd.storage.spool import ReadPosition, Spool, SpoolSettings, SpoolTail  # noqa: E402

ROWS = ("sqs", "eventbridge", "sqs-packed")
LABELS = {
    "sqs": "SQS, one event per message",
    "eventbridge": "EventBridge",
    "sqs-packed": "SQS packed 256 KiB (gzip)",
}
#: The longest one row may take before the run is declared failed (bounded wait).
ROW_TIMEOUT_S = 300.0


def stored_events(count: int) -> list[bytes]:
    """``count`` events as the reader stores them (the ingest step's records)."""
    session = ingest_session(True, Router(load_routes()))
    frames = corpus(count)
    payloads = [frame[6:] for frame in frames]
    records: list[bytes] = []
    for i in range(0, len(payloads), 64):
        records += session.feed(payloads[i : i + 64], 1.0, RECEIVED_US, RECEIVED_US / 1e6).records
    return records


def settings_for(row: str, endpoint: EndpointProcess, data: Path, in_flight: int | None) -> Settings:
    uri = f"eventbridge:{endpoint.buses[0]}" if row == "eventbridge" else f"sqs:{endpoint.queues['fpolicy-bench']}"
    overrides: dict[str, Any] = {"sinks": [uri], "data_dir": str(data)}
    if in_flight is not None:
        overrides["sink_max_in_flight"] = in_flight
    if row == "sqs-packed":
        overrides["sqs_pack_bytes"] = 262144
    return load_settings(overrides=overrides, search_default_paths=False)


async def deliver_all(
    settings: Settings, spool_dir: Path, sink: str, last_seq: int, start: ReadPosition
) -> tuple[float, float]:
    """Wall and CPU seconds from the worker's start (the sender started: clients built, queue checked) to the
    last ack."""
    clients = AwsClients(
        region_name=settings.aws_region,
        max_pool_connections=max(10, settings.sink_max_in_flight * 2),
        data_path=settings.aws_data_path,
    )
    dead_letter = DeadLetterWriter(settings.dead_letter_file, limits=settings.dead_letter_limits())
    try:
        (sender,) = build_senders(settings.sink_options(), clients, dead_letter)
        assert sender.name == sink, (sender.name, sink)
        tail = SpoolTail(spool_dir, {sink: (0, start)}, last_seq)
        done = asyncio.Event()

        def on_ack() -> None:
            if tail.acked_seq(sink) >= last_seq:
                done.set()

        worker = SinkWorker(sender, tail, on_ack=on_ack)
        await sender.start()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        worker.start()
        await asyncio.wait_for(done.wait(), ROW_TIMEOUT_S)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        await worker.stop(5.0)
        await sender.close()
        tail.close()
        return wall, cpu
    finally:
        await clients.close()
        dead_letter.close()


def fill_spool(directory: Path, sink: str, events: list[bytes]) -> tuple[int, ReadPosition]:
    """The spool with every event durable: (last seq, where the sink starts reading)."""
    spool = Spool.open(SpoolSettings(directory=directory), [sink])
    try:
        for i in range(0, len(events), 1000):
            spool.append_many(events[i : i + 1000])
        spool.flush()
        return spool.sync(), spool.position(sink)
    finally:
        spool.close()


def run_row(row: str, endpoint: EndpointProcess, events: list[bytes], in_flight: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fpolicyd-bench-delivery-") as tmp:
        data = Path(tmp)
        settings = settings_for(row, endpoint, data, in_flight)
        sink = settings.sinks[0]
        spool_dir = data / "spool"
        last_seq, start = fill_spool(spool_dir, sink, events)
        before = endpoint.stats()
        endpoint_cpu0 = cpu_seconds(endpoint.pid)
        wall, cpu = uvloop.run(deliver_all(settings, spool_dir, sink, last_seq, start))
        endpoint_cpu = cpu_seconds(endpoint.pid) - endpoint_cpu0
        after = endpoint.stats()
    requests = sum(after["requests"].values()) - sum(before["requests"].values())
    n = len(events)
    return {
        "row": row,
        "in_flight": settings.sink_max_in_flight,
        "events_per_s": n / wall,
        "cpu_us_per_event": cpu / n * 1e6,
        "cpu_us_per_request": cpu / max(requests, 1) * 1e6,
        "requests_per_event": requests / n,
        "endpoint_cpu_us_per_event": endpoint_cpu / n * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument(
        "--in-flight",
        default="",
        help="comma-separated sink_max_in_flight values, each a row of its own (default: the setting's default)",
    )
    parser.add_argument(
        "--endpoint-latency-ms",
        type=float,
        default=0.0,
        help="the endpoint answers each request this late (an AWS region: ~10-30 ms; default 0: at once)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the endpoint serves HTTPS (a certificate issued by a throw-away CA, trusted through AWS_CA_BUNDLE), "
        "as AWS does: the client's TLS work is then in the delivery CPU",
    )
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    in_flights: list[int | None] = [int(v) for v in args.in_flight.split(",") if v.strip()] or [None]
    events = stored_events(args.events)
    tune_garbage_collector(load_settings(search_default_paths=False).gc_young_threshold)  # as the delivery process does
    results: dict[tuple[str, int | None], list[dict[str, Any]]] = {(r, n): [] for r in rows for n in in_flights}
    with contextlib.ExitStack() as stack:
        tls = None
        if args.tls:
            tls = self_issued_certificate(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            os.environ["AWS_CA_BUNDLE"] = str(tls[2])
        endpoint = stack.enter_context(
            endpoint_process(
                queues=("fpolicy-bench",), latency_s=args.endpoint_latency_ms / 1000, tls=tls and (tls[0], tls[1])
            )
        )
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint.url,
            AWS_REGION=endpoint.region,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # the local endpoint takes any credentials
        )
        for _ in range(args.runs):
            for (row, in_flight), runs in results.items():
                runs.append(run_row(row, endpoint, events, in_flight))
    print(
        f"{len(events):,} events per run, {args.runs} runs per row, interleaved; ranges over runs; the endpoint "
        f"answers after {args.endpoint_latency_ms:g} ms, over {'HTTPS' if args.tls else 'plain HTTP'}"
    )
    print(
        "| row | in flight | events/s | delivery CPU µs/event | µs/request | requests/event | endpoint CPU µs/event |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (row, _), runs in results.items():

        def span(key: str, fmt: str, runs: list[dict[str, Any]] = runs) -> str:
            values = sorted(r[key] for r in runs)
            low, high = format(values[0], fmt), format(values[-1], fmt)
            return low if low == high else f"{low}–{high}"

        print(
            f"| {LABELS[row]} | {runs[0]['in_flight']} | {span('events_per_s', ',.0f')} | "
            f"{span('cpu_us_per_event', '.1f')} | {span('cpu_us_per_request', '.0f')} | "
            f"{span('requests_per_event', '.4f')} | {span('endpoint_cpu_us_per_event', '.1f')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
