"""What SQS bills per event: one event per message vs packed messages (``sqs_pack_bytes``), plain and gzip.

    .venv/bin/python benchmarks/bench_sqs_pack.py [--events 20000] [--pack-bytes 262144] [--runs 3]

Events: the simulator's notifications (``fpolicyd.simulator.generate.generate_requests``) normalized and routed as the
reader does (``events.normalize``, the packaged routes), i.e. the event JSON the spool holds. They are cut into
the reads the SQS sender makes (10 events without packing; ``PACK_READ_BYTES`` / ``PACK_READ_RECORDS`` with it)
and each read is planned and encoded by the real planner (``plan_batches``), so every figure comes from the
SendMessageBatch requests fpolicyd would send:

- requests/event: SendMessageBatch calls per event;
- billed/event: SQS bills "each 64 KB chunk of a payload" as one request (``BILLED_CHUNK_BYTES``), so a call
  counts ceil(payload / 64 KiB), payload = the sum of its messages as SQS sizes them (body + attributes);
- USD per million events, and per 30-day month at 100,000 events/s, at ``SQS_STANDARD_USD_PER_MILLION``
  (the first paid tier, flat: above 100 billion requests a month AWS charges less);
- encode µs/event: CPU (process time) of planning and encoding all reads, the best of ``--runs``, garbage
  collector on (as in the daemon), and the same as a ratio to one event per message within this run.

No network, no AWS: planning is pure. Sending costs are not included (one HTTP request per SendMessageBatch,
so packing also divides the HTTP work by the requests/event ratio).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fpolicyd.events import NameMaps, normalize  # noqa: E402 - benchmarks are run as scripts
from fpolicyd.pipeline.router import Router  # noqa: E402
from fpolicyd.protocol.context import SessionContext  # noqa: E402
from fpolicyd.simulator.generate import generate_requests  # noqa: E402
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches  # noqa: E402
from fpolicyd.sinks.aws.sender import PACK_READ_BYTES, PACK_READ_RECORDS, SINGLE_READ_RECORDS  # noqa: E402
from fpolicyd.sinks.aws.targets import SqsTarget  # noqa: E402
from fpolicyd.sinks.sqs_envelope import PackCompression  # noqa: E402
from fpolicyd.storage.routes_file import load_routes  # noqa: E402

#: SQS standard queues, US East (N. Virginia), 1 million to 100 billion requests a month; FIFO is $0.50.
SQS_STANDARD_USD_PER_MILLION: Final = 0.40
#: When that price was read: the rate published on SQS_PRICING_URL, as quoted in June 2026 pricing reviews
#: (the page itself renders its table in the browser).
SQS_PRICE_DATE: Final = "2026-06-13"
SQS_PRICING_URL: Final = "https://aws.amazon.com/sqs/pricing/"
#: "Each 64 KB chunk of a payload is billed as 1 request (for example, an API action with a 256 KB payload is
#: billed as 4 requests)" (SQS_PRICING_URL): 256 KB = 262,144 bytes (the former message limit), so 64 KiB.
BILLED_CHUNK_BYTES: Final = 64 * 1024
SECONDS_PER_MONTH: Final = 30 * 86_400
#: The event rate of the monthly-cost column: the high-volume deployment packing is for.
EVENTS_PER_SECOND: Final = 100_000
QUEUE: Final = "https://sqs.us-east-1.amazonaws.com/123456789012/fpolicy-events"
PLAIN: Final = PackCompression.NONE

CONTEXT = SessionContext(
    vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe04",
    policy_name="bench",
    session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
    protocol_version="1.2",
    peer="127.0.0.1:1",
)


def simulator_events(count: int) -> list[bytes]:
    base_us = int(time.time() * 1e6)
    router = Router(load_routes(None))
    out = []
    for i, request in enumerate(generate_requests(seed=7, node=0, count=count, base_time_us=base_us)):
        event = normalize(request, CONTEXT, NameMaps(), base_us + i)
        out.append(event.with_routes(router.match(event.file_path, event.operation_type)).to_json())
    return out


def reads(events: Sequence[bytes], max_records: int, max_bytes: int) -> Iterator[list[Item]]:
    """The reads a sink worker makes (``Spool.read``: at most max_records and max_bytes, at least one)."""
    current: list[Item] = []
    size = 0
    for n, event in enumerate(events):
        if current and (len(current) >= max_records or size + len(event) > max_bytes):
            yield current
            current, size = [], 0
        current.append(Item(event, ref=n))
        size += len(event)
    if current:
        yield current


@dataclass(frozen=True, slots=True)
class Row:
    mode: str
    events_per_message: float
    requests_per_event: float
    billed_per_event: float
    encode_us: float

    @property
    def usd_per_million(self) -> float:
        return self.billed_per_event * SQS_STANDARD_USD_PER_MILLION

    @property
    def usd_per_month(self) -> float:
        return self.billed_per_event * EVENTS_PER_SECOND * SECONDS_PER_MONTH / 1e6 * SQS_STANDARD_USD_PER_MILLION


def measure(mode: str, target: SqsTarget, events: Sequence[bytes], runs: int) -> Row:
    packing = target.packing
    split = list(
        reads(events, PACK_READ_RECORDS, PACK_READ_BYTES) if packing else reads(events, SINGLE_READ_RECORDS, 1 << 40)
    )
    best = math.inf
    for _ in range(runs):
        # Each read's plan is dropped once made, as the sender drops it once sent: holding every plan of the run
        # would make the garbage collector's passes, not the encoding, dominate the one-per-message figure.
        started = time.process_time()
        for read in split:
            plan_batches(read, target)
        best = min(best, time.process_time() - started)
    planned = [step for read in split for step in plan_batches(read, target)]
    plans = [step for step in planned if isinstance(step, Batch)]
    if len(plans) != len(planned):
        raise SystemExit(f"{mode}: {len(planned) - len(plans)} events set aside as oversize")
    messages = sum(len(batch) for batch in plans)
    carried = sum(len(entry.items) for batch in plans for entry in batch.entries)
    if carried != len(events):
        raise SystemExit(f"{mode}: {carried} events planned of {len(events)}")
    billed = sum(max(1, math.ceil(batch.size / BILLED_CHUNK_BYTES)) for batch in plans)
    return Row(
        mode=mode,
        events_per_message=len(events) / messages,
        requests_per_event=len(plans) / len(events),
        billed_per_event=billed / len(events),
        encode_us=best / len(events) * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--pack-bytes", type=int, default=256 * 1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.events <= 1_000_000 or not 1 <= args.runs <= 20:
        parser.error("--events must be 1..1000000 and --runs 1..20")
    events = simulator_events(args.events)
    pack = args.pack_bytes
    modes = [
        ("one event per message (default)", SqsTarget(QUEUE)),
        (f"packed {pack // 1024} KiB, plain JSON array", SqsTarget(QUEUE, pack_bytes=pack, pack_compression=PLAIN)),
        (f"packed {pack // 1024} KiB, gzip level 1 (default)", SqsTarget(QUEUE, pack_bytes=pack)),
        (f"packed {pack // 1024} KiB, gzip level 6", SqsTarget(QUEUE, pack_bytes=pack, pack_gzip_level=6)),
        ("packed 64 KiB, gzip level 1", SqsTarget(QUEUE, pack_bytes=64 * 1024)),
    ]
    rows = [measure(mode, target, events, args.runs) for mode, target in modes]
    base = rows[0].encode_us
    size = sum(len(e) for e in events) / len(events)
    print(
        f"{len(events):,} simulator events, {size:,.0f} bytes of JSON each on average; SQS standard "
        f"${SQS_STANDARD_USD_PER_MILLION:.2f} per million requests ({SQS_PRICE_DATE}, {SQS_PRICING_URL}); "
        f"billed chunk {BILLED_CHUNK_BYTES // 1024} KiB"
    )
    print()
    print(
        "| mode | events/message | requests/event | billed requests/event | USD per million events "
        f"| USD/month at {EVENTS_PER_SECOND:,} events/s | encode µs/event (× one per message) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.mode} | {row.events_per_message:,.1f} | {row.requests_per_event:.5f} "
            f"| {row.billed_per_event:.5f} | {row.usd_per_million:.5f} | {row.usd_per_month:,.0f} "
            f"| {row.encode_us:.1f} ({row.encode_us / base:.2f}×) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
