"""Helpers for tests that drive a daemon over loopback: settings for a temporary data dir, a connection as an ONTAP
node (:class:`~fpolicyd.simulator.peer.OntapPeer`, plain TCP or TLS) and readers of the JSON Lines it produced."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from fpolicyd.config import Settings, load_settings
from fpolicyd.simulator.peer import OntapPeer


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "data_dir": str(tmp_path),
        "jsonl_fsync": "never",
        "http_port": 0,
        # These tests send one capture many times over: identical notifications, which exact dedup would fold.
        "dedup_mode": "off",
        # In-process tests read the sink workers' state directly; the delivery process (the default on two CPUs)
        # is exercised through `fpolicyd serve` (tests/support/serve.py) and tests/integration/test_delivery.py.
        "delivery_process": "off",
    }
    base.update(overrides)
    return load_settings(overrides=base, search_default_paths=False)


async def loopback_peer(port: int, tls: ssl.SSLContext | None = None) -> OntapPeer:
    """An ONTAP node's connection to the daemon under test, which listens on 127.0.0.1."""
    return await OntapPeer.connect("127.0.0.1", port, tls=tls)


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


async def wait_for_events(root: Path, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        events = jsonl_events(root)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.02)
