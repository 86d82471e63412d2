"""simulator → `fpolicyd serve` (a real subprocess, real signals) → JSON Lines: every notification exactly once."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fpolicyd.events import (
    CORE_OPERATIONS,
    NameMaps,
    load_event_schema,
    load_reference_schema,
    normalize,
)
from fpolicyd.pipeline.router import Router
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import (
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
)
from fpolicyd.protocol.xml_codec import decode_payload, encode_message
from fpolicyd.simulator.client import SimulatorConfig, SimulatorError, expected_requests, run
from fpolicyd.simulator.peer import handshake
from fpolicyd.storage.routes_file import load_routes
from support.captures import NEGO_REQ, NEGO_RESP, SMB_OPEN
from support.peer import loopback_peer
from support.serve import VOLUME_NAMES, Served, read_events, start_serve, stop

pytestmark = pytest.mark.slow


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    marker = request.node.get_closest_marker("serve_flags")
    flags: tuple[str, ...] = marker.args if marker else ()
    daemon, reader = await start_serve(tmp_path, *flags)
    try:
        yield daemon
    finally:
        if daemon.process.returncode is None:
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.process.wait(), 30)
        await reader


def expected_events(config: SimulatorConfig) -> dict[str, dict[str, Any]]:
    names = NameMaps(volumes=VOLUME_NAMES, svms={}, default_volume=None, default_svm="svm_e2e")
    out: dict[str, dict[str, Any]] = {}
    for node, request in expected_requests(config):
        hello = handshake(seed=config.seed, node=node, policy_name=config.policy_name, vs_uuid=config.vs_uuid)
        context = SessionContext(hello.vs_uuid, hello.policy_name, hello.session_id, "1.2", "ignored")
        event = normalize(request, context, names, 0).to_dict()
        assert event["event_id"] not in out
        out[event["event_id"]] = event
    return out


COMPARED = (
    "operation_type",
    "file_path",
    "previous_path",
    "volume_name",
    "svm_name",
    "timestamp",
    "file_size",
    "client_ip",
)
COMPARED_METADATA = ("req_type", "req_id", "session_id", "vs_uuid", "policy_name", "is_directory", "file_type", "user")


def assert_exactly_once(received: list[dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    ids = [event["event_id"] for event in received]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert set(ids) == set(expected), (
        f"missing {len(set(expected) - set(ids))}, unexpected {len(set(ids) - set(expected))}"
    )
    checker = jsonschema.FormatChecker()
    event_validator = jsonschema.Draft202012Validator(load_event_schema(), format_checker=checker)
    reference_validator = jsonschema.Draft7Validator(load_reference_schema(), format_checker=checker)
    for event in received:
        want = expected[event["event_id"]]
        for key in COMPARED:
            assert event.get(key) == want.get(key), (key, event, want)
        for key in COMPARED_METADATA:
            assert event["metadata"].get(key) == want["metadata"].get(key), (key, event, want)
        event_validator.validate(event)
        if event["operation_type"] in CORE_OPERATIONS:
            reference_validator.validate(event)


async def test_every_notification_arrives_exactly_once_with_the_right_fields(served: Served) -> None:
    config = SimulatorConfig(port=served.port, nodes=3, events=2000, seed=11, keep_alive_interval_s=0.05, rate=8000)
    report = await run(config)
    assert report.completed
    assert report.sent == 6000
    assert await stop(served) == 0
    received = read_events(served.data_dir)
    assert_exactly_once(received, expected_events(config))
    operations = {event["operation_type"] for event in received}
    assert {"create", "write", "delete", "rename", "read", "open", "close", "setattr", "getattr"} <= operations
    assert {"lookup", "link", "symlink"} <= operations
    # Routing is on by default: every event carries the packaged routes' verdict, fan-out included.
    router = Router(load_routes(None))
    for event in received:
        assert event["metadata"]["routes"] == list(router.match(event["file_path"], event["operation_type"]))
    assert any(len(event["metadata"]["routes"]) > 1 for event in received), "no fan-out was exercised"
    stopped = [line for line in served.log_lines if line.get("event") == "stopped"]
    assert stopped == [stopped[0]]
    assert stopped[0]["events"] == 6000
    assert stopped[0]["undelivered"] == 0


@pytest.mark.serve_flags("--engine-mode", "sync")
async def test_sync_engine_gets_a_response_for_every_request(served: Served) -> None:
    config = SimulatorConfig(port=served.port, nodes=2, events=1500, seed=3, sync=True, max_outstanding=50)
    report = await run(config)
    assert report.completed
    assert report.responses == report.sent == 3000
    assert await stop(served) == 0
    assert_exactly_once(read_events(served.data_dir), expected_events(config))


#: A slow spool, for real: every append waits a whole second for its group commit (the setting's maximum), and a
#: synchronous engine's SCREEN_RESP waits for that.
SLOW_SPOOL = ("--engine-mode", "sync", "--spool-group-commit-s", "1.0")


@pytest.mark.serve_flags(*SLOW_SPOOL)
async def test_status_queries_are_answered_from_what_the_daemon_holds(served: Served) -> None:
    peer = await loopback_peer(served.port)
    try:
        await peer.send(NEGO_REQ.frame)
        assert await peer.receive() == NEGO_RESP.payload
        # One write: the SCREEN_REQ and the two queries are read together, long before the spool's commit.
        await peer.send(
            SMB_OPEN.frame,
            encode_message(StatusQuery(2822, "SMB_OPEN")),
            encode_message(StatusQuery(8888, "SMB_WR")),
        )
        first, second, third = [decode_payload(await peer.receive()).message for _ in range(3)]
        assert first == StatusQueryResp(2822, "SMB_OPEN", STATUS_IN_PROGRESS)  # waiting on the spool
        assert second == StatusQueryResp(8888, "SMB_WR", STATUS_REQUEST_LOST)  # never sent
        assert third == ScreenResponse(2822, "SMB_OPEN", 1)  # once durable
        await peer.send(encode_message(StatusQuery(2822, "SMB_OPEN")))  # answered: ONTAP would send it again
        assert decode_payload(await peer.receive()).message == StatusQueryResp(2822, "SMB_OPEN", STATUS_REQUEST_LOST)
        metrics = await scrape(served)
        assert 'fpolicyd_status_queries_total{answer="in_progress"} 1.0' in metrics
        assert 'fpolicyd_status_queries_total{answer="lost"} 2.0' in metrics
        assert "fpolicyd_sync_outstanding_requests 0.0" in metrics
    finally:
        await peer.close()
    assert await stop(served) == 0
    assert [event["operation_type"] for event in read_events(served.data_dir)] == ["open"]


@pytest.mark.serve_flags(*SLOW_SPOOL)
async def test_the_simulator_asks_like_ontap_and_a_slow_spool_answers_in_progress(served: Served) -> None:
    config = SimulatorConfig(
        port=served.port, nodes=2, events=100, seed=4, sync=True, max_outstanding=100, status_interval_s=0.3
    )
    report = await run(config)
    assert report.completed
    assert report.responses == report.sent == 200
    # Every request waited about a second for the spool: asked about at 0.3 s (and 0.6 s, 0.9 s) and told "in
    # progress". The daemon says "lost" only for a request it already answered (a query that crossed its
    # SCREEN_RESP), so nothing is ever sent again.
    in_progress = sum(node.status_in_progress for node in report.nodes)
    lost = sum(node.status_lost for node in report.nodes)
    assert in_progress >= 200
    assert in_progress + lost <= report.status_queries  # a query may still be unanswered when the run ends
    assert report.resends == 0
    assert await stop(served) == 0
    assert_exactly_once(read_events(served.data_dir), expected_events(config))


async def scrape(served: Served) -> str:
    """The daemon's /metrics page (its HTTP port is in the "http_listening" log line)."""
    [port] = [line["port"] for line in served.log_lines if line.get("event") == "http_listening"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    page = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return page.decode()


async def test_noti_req_alias_is_ingested(served: Served) -> None:
    config = SimulatorConfig(port=served.port, nodes=1, events=200, seed=5, notf_type="NOTI_REQ")
    assert (await run(config)).completed
    assert await stop(served) == 0
    assert_exactly_once(read_events(served.data_dir), expected_events(config))


async def test_sigterm_mid_stream_writes_everything_that_was_read(served: Served) -> None:
    config = SimulatorConfig(port=served.port, nodes=2, events=50_000, seed=7, rate=5000, duration_limit_s=30)
    simulation = asyncio.create_task(run(config))
    await asyncio.sleep(1.0)
    assert await stop(served) == 0
    with pytest.raises(SimulatorError):
        await simulation
    received = read_events(served.data_dir)
    stopped = next(line for line in served.log_lines if line.get("event") == "stopped")
    assert stopped["undelivered"] == 0
    assert 0 < len(received) == stopped["events"] < 100_000
    expected = expected_events(config)
    assert len({event["event_id"] for event in received}) == len(received)
    assert {event["event_id"] for event in received} <= set(expected)


@pytest.mark.serve_flags("--jsonl-max-file-bytes", "65536")
async def test_rotation_keeps_every_line_whole(served: Served) -> None:
    config = SimulatorConfig(port=served.port, nodes=1, events=3000, seed=9)
    assert (await run(config)).completed
    assert await stop(served) == 0
    files = sorted((served.data_dir / "events").glob("fpolicy_events_*.jsonl"))
    assert len(files) > 10
    assert all(path.stat().st_size <= 65536 for path in files)
    assert_exactly_once(read_events(served.data_dir), expected_events(config))


async def test_bad_settings_fail_at_start_with_the_key_named(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fpolicyd",
        "serve",
        "--idle-timeout-s",
        "10",
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"idle_timeout_s" in err
