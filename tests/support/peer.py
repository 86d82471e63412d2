"""Helpers for tests that drive a daemon over loopback: a connection as an ONTAP node
(:class:`~fpolicyd.simulator.peer.OntapPeer`, plain TCP or TLS) and readers of the JSON Lines the daemon produced.
The daemon's settings: support/daemon.py."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from fpolicyd.simulator.peer import OntapPeer
from support.captures import NEGO_REQ, NEGO_RESP


async def loopback_peer(port: int, tls: ssl.SSLContext | None = None) -> OntapPeer:
    """An ONTAP node's connection to the daemon under test, which listens on 127.0.0.1."""
    return await OntapPeer.connect("127.0.0.1", port, tls=tls)


async def negotiated_peer(port: int) -> OntapPeer:
    """A :func:`loopback_peer` past the NEGO exchange of the captures (NEGO_REQ, and exactly their NEGO_RESP)."""
    peer = await loopback_peer(port)
    await peer.send(NEGO_REQ.frame)
    assert await peer.receive() == NEGO_RESP.payload
    return peer


def jsonl_events(root: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted((root / "events").glob("fpolicy_events_*.jsonl")):
        for line in path.read_bytes().splitlines():
            events.append(orjson.loads(line))
    return events


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> bool:
    """Whether ``predicate`` (the state of a daemon in this process) holds within ``within`` seconds, polled."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


async def wait_for_records(
    read: Callable[[], list[dict[str, Any]]], count: int, within: float = 10.0
) -> list[dict[str, Any]]:
    """What ``read()`` returns once it holds ``count`` records, or after ``within`` seconds (polled)."""
    deadline = time.monotonic() + within
    while True:
        records = read()
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.02)


async def wait_for_events(root: Path, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    return await wait_for_records(lambda: jsonl_events(root), count, within)
