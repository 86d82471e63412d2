"""Connections that never negotiate must not lock out a real ONTAP node (issue 14, defect 1).

Through the real daemon on 127.0.0.1: silent connections beyond ``max_pending_handshakes`` evict the oldest
pending one and a node still negotiates and delivers; a reconnect storm writes a handful of log lines while the
counter counts every eviction (``fpolicyd serve``, its JSON log and /metrics); ``max_connections_per_peer``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fpolicyd.app import Daemon
from fpolicyd.simulator.peer import OntapPeer
from support.captures import NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN
from support.observability import http_get
from support.peer import loopback_peer, wait_for_events
from support.serve import Served, read_events, start_serve, stop


async def negotiate(peer: OntapPeer) -> None:
    await peer.send(NEGO_REQ.frame)
    assert await peer.receive() == NEGO_RESP.payload


async def settled(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``condition()`` is true (the server sees a client's connect or close a moment later)."""
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


@pytest.mark.settings(max_pending_handshakes=8, max_connections=4, handshake_timeout_s=30.0)
async def test_silent_connections_beyond_the_pending_budget_do_not_keep_a_node_out(
    daemon: Daemon, tmp_path: Path
) -> None:
    opened = 60  # more than max_connections and max_pending_handshakes together
    silent = [await loopback_peer(daemon.port) for _ in range(opened)]
    ctx = daemon.context
    await settled(lambda: ctx.rejections.get("pending_evicted", 0) == opened - 8)
    assert ctx.rejections == {"pending_evicted": opened - 8}
    assert (ctx.budget.pending, ctx.budget.sessions) == (8, 0)
    node = await loopback_peer(daemon.port)
    await negotiate(node)
    await node.send(SMB_OPEN.frame, SMB_REN.frame)
    events = await wait_for_events(tmp_path, 2)
    assert [event["operation_type"] for event in events] == ["open", "rename"]
    assert ctx.budget.sessions == 1
    assert ctx.rejections == {"pending_evicted": opened - 8 + 1}  # the node's arrival evicted one more
    assert all(await asyncio.gather(*(peer.closed_by_server(within=5.0) for peer in silent[: opened - 7])))
    await node.close()
    for peer in silent:
        await peer.close()


@pytest.mark.settings(max_connections_per_peer=3, handshake_timeout_s=30.0)
async def test_per_peer_limit(daemon: Daemon) -> None:
    ctx = daemon.context
    held = [await loopback_peer(daemon.port) for _ in range(3)]
    await negotiate(held[0])  # sessions and pending connections both count
    extra = await loopback_peer(daemon.port)
    assert await extra.closed_by_server(within=5.0)
    assert ctx.rejections == {"max_per_peer": 1}
    await extra.close()
    await held[1].close()
    await settled(lambda: ctx.budget.peer_count("127.0.0.1") == 2)
    again = await loopback_peer(daemon.port)  # a freed slot is usable again
    await negotiate(again)
    assert ctx.rejections == {"max_per_peer": 1}
    for peer in (*held, again):
        await peer.close()


# ------------------------------------------------------------------------------------ reconnect storm

STORM_CLIENTS = 10
#: Each storm client holds its connection this long, silent, then reconnects (~100 connections/s in all).
STORM_HOLD_S = 0.1
STORM_MAX_S = 3.0
STORM_MAX_CONNECTIONS = 2000
NODE_ATTEMPTS = 5


async def storm_client(port: int, stop_at: float, budget: list[int]) -> None:
    while time.monotonic() < stop_at and budget[0] < STORM_MAX_CONNECTIONS:
        budget[0] += 1
        try:
            peer = await loopback_peer(port)
        except OSError:
            continue
        await asyncio.sleep(STORM_HOLD_S)
        peer.abort()


async def node_session(port: int) -> int:
    """Connect as a node until NEGO_RESP (as ONTAP reconnects); returns the attempts it took."""
    for attempt in range(1, NODE_ATTEMPTS + 1):
        peer = await loopback_peer(port)
        try:
            await negotiate(peer)
        except (ConnectionError, TimeoutError):
            await peer.close()
            continue
        await peer.send(SMB_OPEN.frame, SMB_REN.frame)
        await asyncio.sleep(0.2)
        await peer.close()
        return attempt
    raise AssertionError(f"no NEGO_RESP in {NODE_ATTEMPTS} attempts")


def metrics_of(served: Served) -> dict[str, dict[str, float]]:
    line = next(r for r in served.log_lines if r.get("event") == "http_listening")
    status, body = http_get(int(line["port"]), "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("reason", "")] = sample.value
    return out


@pytest.mark.slow
async def test_reconnect_storm_lets_a_node_in_with_few_log_lines(tmp_path: Path) -> None:
    served, _ = await start_serve(
        tmp_path,
        "--max-pending-handshakes=4",
        "--log-rate-limit-interval-s=60",
        "--handshake-timeout-s=30",
        "--dedup-mode=off",
    )
    try:
        budget = [0]
        stop_at = time.monotonic() + STORM_MAX_S
        storm = [asyncio.create_task(storm_client(served.port, stop_at, budget)) for _ in range(STORM_CLIENTS)]
        await asyncio.sleep(0.5)  # the storm is under way
        attempts = [await node_session(served.port) for _ in range(3)]
        await asyncio.gather(*storm)
        events = []
        for _ in range(250):
            events = read_events(served.data_dir, live=True)
            if len(events) >= 6:
                break
            await asyncio.sleep(0.02)
        metrics = await asyncio.to_thread(metrics_of, served)
    finally:
        assert await stop(served) == 0
    evicted = metrics["fpolicyd_connections_rejected_total"]["pending_evicted"]
    lines = [r for r in served.log_lines if r.get("event") == "connection_rejected"]
    print(
        f"storm: {budget[0]} connections, {evicted:.0f} evicted, {len(lines)} connection_rejected lines, "
        f"node attempts {attempts}"
    )
    assert [event["operation_type"] for event in events] == ["open", "rename"] * 3
    assert evicted >= 50  # the storm kept the pending budget full
    # One line per reason per interval (60 s: the first one), counted exactly by the metric.
    assert [line["reason"] for line in lines] == ["pending_evicted"]
    unnegotiated = [
        r
        for r in served.log_lines
        if r.get("event") in ("connection_opened", "connection_closing")
        or (r.get("event") == "connection_closed" and r.get("reason") == "not_negotiated")
    ]
    assert len(unnegotiated) <= 3, unnegotiated  # one line per (event, reason), not one per connection
