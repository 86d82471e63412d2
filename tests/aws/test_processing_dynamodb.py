"""Dedup through a running daemon with the DynamoDB backend on a moto server: two daemons sharing one table
(the multi-instance case DynamoDB is for) deliver a notification that both receive once, and audit the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.app import Daemon
from fpolicyd.errors import SinkError
from fpolicyd.sinks.aws.clients import AwsClients
from support.captures import NEGO_REQ, NEGO_RESP
from support.daemon import make_settings
from support.moto_server import MotoEndpoint, create_dedup_table, isolate_aws_env
from support.notifications import frame
from support.peer import loopback_peer


@pytest.fixture
async def table(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[str]:
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as clients:
        yield await create_dedup_table(await clients.client("dynamodb"))


def read(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_bytes().splitlines()]


async def eventually(directory: Path, count: int, within: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        found = read(directory)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_two_instances_share_claims(tmp_path: Path, table: str) -> None:
    daemons = []
    for name in ("a", "b"):
        settings = make_settings(
            tmp_path / name, dedup_mode="exact", dedup_backend="dynamodb", dedup_dynamodb_table=table
        )
        daemon = Daemon(settings)
        await daemon.start()
        daemons.append(daemon)
    try:
        for daemon in daemons:
            peer = await loopback_peer(daemon.port)
            await peer.send(NEGO_REQ.frame)
            assert await peer.receive() == NEGO_RESP.payload
            await peer.send(frame(1, "SMB_WR", "/shared/a.csv"), frame(2, "SMB_WR", "/shared/b.csv"))
            await eventually(tmp_path / daemon.settings.data_dir.name / "events", 1)
            await peer.close()
        ledger = await eventually(tmp_path / "b" / "ledger", 2)
    finally:
        for daemon in daemons:
            await daemon.stop()
    first, second = read(tmp_path / "a" / "events"), read(tmp_path / "b" / "events")
    assert sorted(e["file_path"] for e in first) == ["/shared/a.csv", "/shared/b.csv"]
    assert second == []
    assert sorted(record["first_seen_id"] for record in ledger) == sorted(e["event_id"] for e in first)


async def test_missing_table_fails_the_start_with_its_name(tmp_path: Path, table: str) -> None:
    settings = make_settings(tmp_path, dedup_mode="exact", dedup_backend="dynamodb", dedup_dynamodb_table="nope")
    daemon = Daemon(settings)
    with pytest.raises(SinkError, match="nope"):
        await daemon.start()
    await daemon.stop()
