"""SQS sink cost, and memory during a sink outage.

    .venv/bin/python benchmarks/bench_sqs.py [--events 3000] [--outage-events 100000]

1. simulator → ``fpolicyd serve`` → SQS on a local moto server: AWS requests per event (target ≤ 0.1: ten
   entries per SendMessageBatch). moto answers ~30 batches/s here, so wall time would measure moto, not
   fpolicyd; requests per event do not depend on it.
2. The same daemon with its SQS endpoint refusing connections while ``--outage-events`` arrive as fast as the
   simulator sends: resident memory sampled every 0.5 s stays flat (events go to the spool, not to memory),
   and the daemon's CPU per event (ingest + spool, no sending).
Everything binds 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moto.server import ThreadedMotoServer

from daemon_process import Daemon, cpu_seconds, memory_mib
from fpolicyd.sinks.aws.clients import AwsClients


def free_port() -> int:
    """A port nobody listens on (for the "endpoint down" phase): bound once, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def simulate(port: int, events: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fpolicyd",
            "simulate",
            "--fixed-time",  # the fixed, reproducible stream the figures were measured with
            "--port",
            str(port),
            "--events",
            str(events),
            "--keep-alive-interval-s",
            "0",
        ],
        capture_output=True,
        check=True,
        timeout=600,
    )


async def create_queue(endpoint: str) -> str:
    async with AwsClients(endpoint_url=endpoint, region_name="us-east-1") as clients:
        sqs = await clients.sqs()
        response = await sqs.create_queue(QueueName=f"bench-{os.getpid()}")
        return str(response["QueueUrl"])


def aws_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FPOLICYD_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    return env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--outage-events", type=int, default=100_000)
    args = parser.parse_args()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, moto_port = moto.get_host_and_port()
    endpoint = f"http://{host}:{moto_port}"
    os.environ.update(aws_env(endpoint))  # this process talks to moto only, with dummy credentials
    try:
        queue_url = asyncio.run(create_queue(endpoint))
        with tempfile.TemporaryDirectory() as tmp:
            daemon = Daemon(Path(tmp), "--sinks", f"sqs:{queue_url}", "--drain-timeout-s", "60", env=aws_env(endpoint))
            simulate(daemon.port, args.events)
            lines = daemon.stop()
            stats = next(line for line in lines if line.get("event") == "sink_stats")["sinks"][f"sqs:{queue_url}"]
        with tempfile.TemporaryDirectory() as tmp:
            down = aws_env(f"http://127.0.0.1:{free_port()}")
            daemon = Daemon(Path(tmp), "--sinks", f"sqs:{queue_url}", "--drain-timeout-s", "1", env=down)
            port, pid = daemon.port, daemon.pid
            samples: list[float] = []
            sim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fpolicyd",
                    "simulate",
                    "--fixed-time",
                    "--port",
                    str(port),
                    "--events",
                    str(args.outage_events),
                    "--keep-alive-interval-s",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            cpu_start = cpu_seconds(pid)
            deadline = time.monotonic() + 300
            while sim.poll() is None and time.monotonic() < deadline:
                samples.append(memory_mib(pid))
                time.sleep(0.5)
            sim.wait(60)
            cpu = cpu_seconds(pid) - cpu_start
            samples.append(memory_mib(pid))
            daemon.stop()
    finally:
        moto.stop()
    delivered = stats["delivered"]
    print(
        f"SQS: {delivered} events delivered in {stats['requests']} SendMessageBatch requests "
        f"= {stats['requests'] / max(delivered, 1):.3f} requests/event (target <= 0.1)"
    )
    print(
        f"outage: {args.outage_events:,} events spooled with the endpoint down; daemon CPU "
        f"{cpu / args.outage_events * 1e6:.1f} µs/event; RSS MiB over the run: first {samples[0]:.0f}, "
        f"max {max(samples):.0f}, last {samples[-1]:.0f} ({len(samples)} samples)"
    )
    print(json.dumps({"sqs": stats, "outage_rss_mib": [round(s, 1) for s in samples]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
