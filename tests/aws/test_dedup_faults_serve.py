"""The DynamoDB dedup store's failure paths through a running daemon (in-process, moto on 127.0.0.1).

Faults: throttling (``ProvisionedThroughputExceededException`` from :class:`DynamoDbFaults`, a proxy in front of
moto: moto never throttles), and an endpoint that is down when the daemon starts (a TCP proxy that refuses
connections, then comes back on the same port). For each: the daemon stays up and keeps taking events, nothing
it read is lost, the failure mode decides (open: delivered unchecked, duplicates possible, each in the audit
ledger; closed: held in the spool, /readyz not ready), the metrics and logs say so, and it recovers by itself:
what was held goes out once and dedup works again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from fpolicyd.app import Daemon
from fpolicyd.simulator.peer import OntapPeer
from fpolicyd.sinks.aws.clients import AwsClients
from support.captures import NEGO_REQ, NEGO_RESP
from support.daemon import make_settings
from support.dynamodb_faults import DynamoDbFaults
from support.moto_server import MotoEndpoint, create_dedup_table, isolate_aws_env
from support.notifications import frame
from support.observability import one, scrape
from support.peer import loopback_peer
from support.tcp_proxy import Proxy


def read(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_bytes().splitlines()]


async def until(check: Callable[[], bool], within: float = 15.0) -> bool:
    """Poll ``check`` until true or ``within`` seconds passed (bounded)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def steady(read_count: Callable[[], int], hold_s: float) -> int:
    """The count after ``hold_s`` seconds, failing if it moved meanwhile (what is held stays held)."""
    before = read_count()
    await asyncio.sleep(hold_s)
    assert read_count() == before
    return before


@pytest.fixture
async def table(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    isolate_aws_env(monkeypatch, tmp_path, moto)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as clients:
        return await create_dedup_table(await clients.client("dynamodb"))


@pytest.fixture
async def faults(moto: MotoEndpoint, table: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DynamoDbFaults]:
    proxy = DynamoDbFaults(moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", await proxy.start())
    try:
        yield proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def serving(tmp_path: Path, table: str, **overrides: Any) -> AsyncIterator[tuple[Daemon, OntapPeer]]:
    settings = make_settings(
        tmp_path,
        dedup_mode="exact",
        dedup_backend="dynamodb",
        dedup_dynamodb_table=table,
        dedup_closed_retry_max_s=0.2,
        **overrides,
    )
    daemon = Daemon(settings)
    await daemon.start()
    try:
        peer = await loopback_peer(daemon.port)
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
        yield daemon, peer
        await peer.close()
    finally:
        await daemon.stop()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return read(tmp_path / "events")


def ledger(tmp_path: Path) -> list[dict[str, Any]]:
    return read(tmp_path / "ledger")


async def metric(daemon: Daemon, family: str, name: str | None = None, **labels: str) -> float:
    return one(await scrape(daemon), family, name, **labels)


async def test_short_throttling_is_absorbed_by_the_retries(tmp_path: Path, table: str, faults: DynamoDbFaults) -> None:
    faults.throttle_next = 2
    async with serving(tmp_path, table, dedup_dynamodb_retries=3) as (daemon, peer):
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"), frame(2, "SMB_WR", "/data/b.csv"))
        assert await until(lambda: len(events(tmp_path)) == 2)
        await peer.send(frame(1, "SMB_WR", "/data/a.csv"))  # the same notification again: a duplicate
        assert await until(lambda: len(ledger(tmp_path)) == 1)
        assert faults.throttled == 2
        assert await metric(daemon, "fpolicyd_dedup_store_throttled", "fpolicyd_dedup_store_throttled_total") == 2
        assert await metric(daemon, "fpolicyd_dedup_store_retries", "fpolicyd_dedup_store_retries_total") >= 2
        assert await metric(daemon, "fpolicyd_dedup_errors", "fpolicyd_dedup_errors_total", mode="open") == 0
        assert await metric(daemon, "fpolicyd_dedup_store_up") == 1
    assert len(events(tmp_path)) == 2
    [record] = ledger(tmp_path)
    assert record["decision"] == "duplicate"


async def test_fail_closed_holds_events_while_throttled_then_delivers_each_once(
    tmp_path: Path, table: str, faults: DynamoDbFaults
) -> None:
    faults.throttling = True
    overrides = {"dedup_failure_mode": "closed", "dedup_dynamodb_retries": 1, "dedup_dynamodb_max_in_flight": 1}
    with capture_logs() as logs:
        async with serving(tmp_path, table, **overrides) as (daemon, peer):
            await peer.send(*(frame(i, "SMB_WR", f"/data/{i}.csv") for i in range(1, 4)))
            processor = daemon.processing
            assert processor is not None
            assert await until(lambda: processor.last_error is not None)
            # Held: nothing out while the table throttles, and the daemon keeps taking events.
            await peer.send(frame(4, "SMB_WR", "/data/4.csv"))
            assert await steady(lambda: len(events(tmp_path)), 1.0) == 0
            assert daemon.spooler.spool.records_pending("processor") == 4
            ready = {check.name: check.ok for check in daemon.readiness().checks}
            assert ready["processor"] is False
            assert ready["listener"] is True
            assert await metric(daemon, "fpolicyd_dedup_store_up") == 0
            assert await metric(daemon, "fpolicyd_dedup_errors", "fpolicyd_dedup_errors_total", mode="closed") > 0
            # One request per attempt reaches the table; the rest of the batch is not sent.
            skipped = "fpolicyd_dedup_store_short_circuited"
            assert await metric(daemon, skipped, f"{skipped}_total") >= 2
            faults.throttling = False
            assert await until(lambda: len(events(tmp_path)) == 4)
            assert await until(lambda: processor.last_error is None)
            await peer.send(frame(2, "SMB_WR", "/data/2.csv"))
            assert await until(lambda: len(ledger(tmp_path)) == 1)
            assert await metric(daemon, "fpolicyd_dedup_store_up") == 1
            assert {check.name: check.ok for check in daemon.readiness().checks}["processor"] is True
    delivered = events(tmp_path)
    assert sorted(e["file_path"] for e in delivered) == [f"/data/{i}.csv" for i in range(1, 5)]
    assert [r["decision"] for r in ledger(tmp_path)] == ["duplicate"]  # error_closed is never recorded
    names = [entry["event"] for entry in logs]
    assert names.count("dedup_store_failing") == 1
    assert names.count("dedup_recovered") == 1
    [failing] = [entry for entry in logs if entry["event"] == "dedup_store_failing"]
    assert failing["failure_mode"] == "closed"
    assert "ProvisionedThroughputExceededException" in failing["error"]


async def test_fail_open_delivers_unchecked_while_throttled_and_audits_it(
    tmp_path: Path, table: str, faults: DynamoDbFaults
) -> None:
    faults.throttling = True
    with capture_logs() as logs:
        async with serving(tmp_path, table, dedup_dynamodb_retries=1) as (daemon, peer):
            await peer.send(frame(1, "SMB_WR", "/data/a.csv"))
            assert await until(lambda: len(events(tmp_path)) == 1)
            await peer.send(frame(1, "SMB_WR", "/data/a.csv"))  # a redelivery: not caught while the store fails
            assert await until(lambda: len(events(tmp_path)) == 2)
            assert await metric(daemon, "fpolicyd_dedup_store_up") == 0
            assert await metric(daemon, "fpolicyd_dedup_errors", "fpolicyd_dedup_errors_total", mode="open") == 2
            assert {check.name: check.ok for check in daemon.readiness().checks}["processor"] is True
            faults.throttling = False
            await peer.send(frame(2, "SMB_WR", "/data/b.csv"), frame(2, "SMB_WR", "/data/b.csv"))
            assert await until(lambda: len(ledger(tmp_path)) == 3)
            assert await until(lambda: len(events(tmp_path)) == 3)
            assert await metric(daemon, "fpolicyd_dedup_store_up") == 1
    assert [e["file_path"] for e in events(tmp_path)] == ["/data/a.csv", "/data/a.csv", "/data/b.csv"]
    assert [r["decision"] for r in ledger(tmp_path)] == ["error_open", "error_open", "duplicate"]
    names = [entry["event"] for entry in logs]
    assert (names.count("dedup_store_failing"), names.count("dedup_recovered")) == (1, 1)
    [recovered] = [entry for entry in logs if entry["event"] == "dedup_recovered"]
    assert recovered["delivered_unchecked"] == 2


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_endpoint_down_at_start_then_back(
    tmp_path: Path, moto: MotoEndpoint, table: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    host, port = moto.url.removeprefix("http://").rsplit(":", 1)
    async with Proxy(host, int(port)) as link:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{link.port}")
        await link.cut()
        with capture_logs() as logs:
            overrides = {"dedup_failure_mode": mode, "dedup_dynamodb_retries": 1}
            async with serving(tmp_path, table, **overrides) as (daemon, peer):
                assert "dedup_store_unreachable" in [entry["event"] for entry in logs]
                await peer.send(frame(1, "SMB_WR", "/data/a.csv"), frame(2, "SMB_WR", "/data/b.csv"))
                if mode == "open":
                    assert await until(lambda: len(events(tmp_path)) == 2)
                else:
                    assert await until(
                        lambda: daemon.processing is not None and daemon.processing.last_error is not None
                    )
                    assert await steady(lambda: len(events(tmp_path)), 1.0) == 0
                assert await metric(daemon, "fpolicyd_dedup_store_up") == 0
                await link.restore()
                await peer.send(frame(3, "SMB_WR", "/data/c.csv"))
                assert await until(lambda: len(events(tmp_path)) == 3)
                await peer.send(frame(3, "SMB_WR", "/data/c.csv"))  # dedup works again
                await until(lambda: any(r["decision"] == "duplicate" for r in ledger(tmp_path)))
                assert await metric(daemon, "fpolicyd_dedup_store_up") == 1
    assert sorted(e["file_path"] for e in events(tmp_path)) == ["/data/a.csv", "/data/b.csv", "/data/c.csv"]
    decisions = [r["decision"] for r in ledger(tmp_path)]
    assert decisions == (["error_open", "error_open", "duplicate"] if mode == "open" else ["duplicate"])
    names = [entry["event"] for entry in logs]
    assert (names.count("dedup_store_failing"), names.count("dedup_recovered")) == (1, 1)
