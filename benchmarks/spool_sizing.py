"""Spool bytes per event, and how long an outage a spool absorbs, for the README's sizing table.

    .venv/bin/python benchmarks/spool_sizing.py [--events N] [--rates 1000,10000,30000]

Runs the simulator's corpus (3 nodes, all 27 ReqTypes, the daemon's default routes) through the reader's ingest
step as the daemon sets it up, and measures what each event costs in the spool: the raw record (the event JSON, as
the reader appends it) plus the spool's record header; and, when the processing stage runs (window dedup, settle,
DynamoDB dedup), the processed record it appends too (the same JSON behind a destination header) — both stay in
the spool until every consumer is past their segment, so a backlog holds both. Prints the mean and p99 bytes per
event and, for each rate, the seconds of outage the defaults absorb before ONTAP is asked to slow down
(``backpressure_high_bytes``, 2 GiB) and before reading stops (``backpressure_pause_bytes``, 3 GiB).
Deterministic: the same corpus gives the same figures on any machine.
"""

from __future__ import annotations

import argparse
import statistics

from fpolicyd.config import Settings
from fpolicyd.events import NameMaps
from fpolicyd.pipeline.dedup_window import DedupWindow
from fpolicyd.pipeline.ingest import Ingest, IngestCounters
from fpolicyd.pipeline.records import encode_processed
from fpolicyd.pipeline.replay import ReplayTracker
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol.framing import XmlFrameReader
from fpolicyd.protocol.messages import Handshake
from fpolicyd.protocol.session import Session
from fpolicyd.protocol.session_config import SessionConfig
from fpolicyd.protocol.xml_codec import encode_message, fast_screen
from fpolicyd.simulator.generate import DEFAULT_VS_UUID, generate_frames
from fpolicyd.storage.routes_file import load_routes
from fpolicyd.storage.spool import RECORD_HEADER_BYTES

NODES = 3
READ = 64
BASE_US = 1_700_000_000_000_000


def spool_records(events: int) -> list[bytes]:
    """The spool records the reader appends for the simulator's corpus, set up as the daemon's defaults."""
    ingest = Ingest(
        names=NameMaps(),
        counters=IngestCounters(),
        replay=ReplayTracker(),
        route=Router(load_routes(None)).match,
        window=DedupWindow(max_entries=1_000_000, ttl_s=3600.0),
    )
    session = ingest.session(Session(SessionConfig(), peer="127.0.0.1:40000", now=0.0, fast=fast_screen))
    hello = encode_message(Handshake(DEFAULT_VS_UUID, "fpolicyd", "sizing", ("1.2",)))[6:]
    session.feed([hello], 0.0, BASE_US - 1_000_000, BASE_US / 1e6 - 1)
    records: list[bytes] = []
    for node in range(NODES):
        wire = b"".join(generate_frames(seed=node, node=node, count=events // NODES, base_time_us=BASE_US))
        payloads = XmlFrameReader().feed(wire)
        for start in range(0, len(payloads), READ):
            records += session.feed(payloads[start : start + READ], 1.0, BASE_US + 100_000_000, BASE_US / 1e6).records
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rates", default="1000,10000,30000", help="events/s, comma-separated")
    args = parser.parse_args()
    records = spool_records(args.events)
    header = RECORD_HEADER_BYTES
    raw = [len(r) + header for r in records]
    processed = [len(encode_processed(r, None)) + header for r in records]
    both = [a + b for a, b in zip(raw, processed, strict=True)]
    fields = Settings.model_fields

    def p99(values: list[int]) -> int:
        return sorted(values)[int(len(values) * 0.99)]

    print(f"events: {len(records)} (spool record header: {header} bytes)")
    print("| spool bytes per event | mean | p99 |")
    print("|---|---:|---:|")
    print(f"| raw record (the reader's) | {statistics.fmean(raw):,.0f} | {p99(raw):,} |")
    print(f"| raw + processed (processing stage on) | {statistics.fmean(both):,.0f} | {p99(both):,} |")
    high, pause = fields["backpressure_high_bytes"].default, fields["backpressure_pause_bytes"].default
    print()
    print(
        "| rate (events/s) | stage | outage absorbed until BACK_PRESSURE_APPLY (2 GiB) | until reading stops (3 GiB) |"
    )
    print("|---:|---|---:|---:|")
    for rate in (int(r) for r in args.rates.split(",")):
        for name, sizes in (("off", raw), ("on", both)):
            per_s = rate * statistics.fmean(sizes)
            print(f"| {rate:,} | {name} | {high / per_s / 60:,.1f} min | {pause / per_s / 60:,.1f} min |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
