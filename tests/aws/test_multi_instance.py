"""Issue 12: what is per instance when ONTAP round-robins one SVM's notifications over several fpolicyd instances
(every node connects to every primary server of the external engine and spreads its notifications over them).

Two in-process daemons A and B play two primary servers of one engine; the node's notifications are hand-built
frames sent on one session to each, so that the test picks which instance gets which notification:

- settle (write-complete debounce) holds a path's events on the instance that received them: a create on A and
  the write that completes the file on B are two events (A: ``create``, B: ``write``), where one instance would
  emit one ``create`` coalescing both; a delete on B does not cancel a create held on A; with ``rename_commit``
  a rename on B commits nothing held on A (B emits the rename, A the temporary file at ``settle_max_hold_s``);
- exact dedup (the event id) with the embedded backend is the reader's window of *that* instance: a notification
  ONTAP re-sends on another instance's session is delivered again (same event id); with the DynamoDB backend the
  claim is shared and the second instance suppresses it (audit ledger);
- window dedup (per use case, path and operation) with the embedded backend is a SQLite file of that instance:
  a second write inside the window on the other instance is delivered; with DynamoDB it is suppressed.

Each daemon stops at the end of its block (bounded drain); every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.app import Daemon
from fpolicyd.simulator.peer import OntapPeer
from fpolicyd.sinks.aws.clients import AwsClients
from support.daemon import make_settings, running_daemon
from support.moto_server import MotoEndpoint, create_dedup_table, isolate_aws_env
from support.notifications import BASE_GENERATION_US, frame
from support.peer import negotiated_peer, wait_for_records

#: Settle's quiet window in these tests: long enough that a create and its write sent together are one burst on
#: one instance, short enough to keep the test quick.
SETTLE_S = 0.3


class Backend(StrEnum):
    embedded = "embedded"
    dynamodb = "dynamodb"


@dataclass(frozen=True, slots=True)
class Instance:
    """One fpolicyd instance (a primary server of the engine) and the node's session to it."""

    name: str
    daemon: Daemon
    peer: OntapPeer
    root: Path

    async def send(self, *frames: bytes) -> None:
        await self.peer.send(*frames)

    def events(self) -> list[dict[str, Any]]:
        return _lines(self.root / "events")

    def ledger(self) -> list[dict[str, Any]]:
        return _lines(self.root / "ledger")


def _lines(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_bytes().splitlines()]


@asynccontextmanager
async def two_instances(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Instance, Instance]]:
    """Instances A and B with the same settings (each its own data directory), and a session to each."""
    async with AsyncExitStack() as stack:
        instances = []
        for name in ("a", "b"):
            settings = make_settings(tmp_path / name, drain_timeout_s=2.0, **overrides)
            daemon = await stack.enter_async_context(running_daemon(settings))
            peer = await negotiated_peer(daemon.port)
            stack.push_async_callback(peer.close)
            instances.append(Instance(name, daemon, peer, tmp_path / name))
        yield instances[0], instances[1]


async def _dedup_settings(backend: Backend, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if backend is Backend.embedded:
        return {"dedup_backend": "embedded"}
    moto: MotoEndpoint = request.getfixturevalue("moto")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    isolate_aws_env(monkeypatch, tmp_path, moto, via_env=True)
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region) as clients:
        table = await create_dedup_table(await clients.client("dynamodb"))
    return {"dedup_backend": "dynamodb", "dedup_dynamodb_table": table}


async def test_settle_is_per_instance_a_create_and_its_write_on_two_instances_are_two_events(tmp_path: Path) -> None:
    async with two_instances(tmp_path, dedup_mode="exact", write_complete_delay_s=SETTLE_S) as (a, b):
        # The same sequence on one instance: one event, the create, coalescing the write.
        await a.send(frame(1, "SMB_CREAT", "/scans/one.tiff"), frame(2, "SMB_WR", "/scans/one.tiff"))
        # Round-robin put the create on A and the write that completes the file on B.
        await a.send(frame(3, "SMB_CREAT", "/scans/split.tiff"))
        await b.send(frame(4, "SMB_WR", "/scans/split.tiff"))
        # A create on A, then a delete on B: B's settle holds nothing for the path, so nothing is cancelled.
        await a.send(frame(5, "SMB_CREAT", "/scans/gone.tmp"))
        await b.send(frame(6, "SMB_DEL", "/scans/gone.tmp"))
        on_a = await wait_for_records(a.events, 3)
        on_b = await wait_for_records(b.events, 2)
        await asyncio.sleep(2 * SETTLE_S)  # nothing else is still held
        for instance in (a, b):
            processing = instance.daemon.processing
            assert processing is not None
            assert processing.stage.pending == 0
    assert (on_a, on_b) == (a.events(), b.events())
    by_path_a = {e["file_path"]: e for e in on_a}
    by_path_b = {e["file_path"]: e for e in on_b}
    assert set(by_path_a) == {"/scans/one.tiff", "/scans/split.tiff", "/scans/gone.tmp"}
    assert set(by_path_b) == {"/scans/split.tiff", "/scans/gone.tmp"}
    # One instance: one create for the create + write.
    one = by_path_a["/scans/one.tiff"]
    assert (one["operation_type"], one["metadata"]["settle"]["coalesced"]) == ("create", 2)
    # Two instances: each settles its own share; two events for the one file, a create and a write.
    split_a, split_b = by_path_a["/scans/split.tiff"], by_path_b["/scans/split.tiff"]
    assert (split_a["operation_type"], split_a["metadata"]["settle"]["coalesced"]) == ("create", 1)
    assert (split_b["operation_type"], split_b["metadata"]["settle"]["coalesced"]) == ("write", 1)
    assert split_a["event_id"] != split_b["event_id"], "two notifications: dedup keeps both"
    # The delete on B cancels nothing: the create held on A is emitted as well.
    gone_a, gone_b = by_path_a["/scans/gone.tmp"], by_path_b["/scans/gone.tmp"]
    assert gone_a["operation_type"] == "create"
    assert gone_b["operation_type"] == "delete"
    assert "settle" not in gone_b["metadata"]


#: rename_commit holds until the rename (or this long): short, so that the half held on the other instance shows.
MAX_HOLD_S = 1.0


async def test_rename_commit_is_per_instance_the_rename_on_another_instance_commits_nothing(tmp_path: Path) -> None:
    # (rename_commit has no quiet period: the window only switches settle on, and may not exceed the hold.)
    overrides = {
        "write_complete_delay_s": MAX_HOLD_S,
        "settle_strategy": "rename_commit",
        "settle_max_hold_s": MAX_HOLD_S,
    }
    async with two_instances(tmp_path, dedup_mode="exact", **overrides) as (a, b):
        # One instance: write x.part, rename it to x.pdf: one create of x.pdf at the rename.
        await a.send(
            frame(1, "SMB_CREAT", "/in/one.part"),
            frame(2, "SMB_WR", "/in/one.part"),
            frame(3, "SMB_REN", "/in/one.part", target="/in/one.pdf"),
        )
        # Two instances: the rename lands on B, which holds nothing for the temporary name.
        await a.send(frame(4, "SMB_CREAT", "/in/two.part"), frame(5, "SMB_WR", "/in/two.part"))
        await b.send(frame(6, "SMB_REN", "/in/two.part", target="/in/two.pdf"))
        [renamed] = await wait_for_records(b.events, 1)
        on_a = await wait_for_records(a.events, 2, within=MAX_HOLD_S + 10.0)
    by_path = {e["file_path"]: e for e in on_a}
    assert set(by_path) == {"/in/one.pdf", "/in/two.part"}
    one = by_path["/in/one.pdf"]
    assert (one["operation_type"], one["metadata"]["settle"]["coalesced"]) == ("create", 3)
    # B passes the rename through as it came; A keeps the temporary file's burst until settle_max_hold_s.
    assert (renamed["operation_type"], renamed["file_path"], renamed["previous_path"]) == (
        "rename",
        "/in/two.pdf",
        "/in/two.part",
    )
    assert "settle" not in renamed["metadata"]
    held = by_path["/in/two.part"]
    assert (held["operation_type"], held["metadata"]["settle"]["coalesced"]) == ("create", 2)
    assert held["metadata"]["settle"]["reason"] == "max_hold"


@pytest.mark.parametrize("backend", list(Backend))
async def test_exact_dedup_of_a_notification_resent_to_the_other_instance(
    tmp_path: Path, request: pytest.FixtureRequest, backend: Backend
) -> None:
    dedup = await _dedup_settings(backend, request, tmp_path)
    generation = BASE_GENERATION_US + 1_000
    async with two_instances(tmp_path, dedup_mode="exact", **dedup) as (a, b):
        await a.send(frame(1, "SMB_WR", "/data/report.csv", generation_us=generation))
        [first] = await wait_for_records(a.events, 1)
        # Sent again on A's session (a persistent-store replay to the same server): every backend folds it.
        await a.send(frame(2, "SMB_WR", "/data/report.csv", generation_us=generation))
        await wait_for_records(a.ledger, 1)
        # ONTAP sends it again on B's session (A's session was lost before the response): a new req_id, the
        # same notification, so the same event id.
        await b.send(frame(1, "SMB_WR", "/data/report.csv", generation_us=generation))
        if backend is Backend.embedded:
            # The reader's window is B's own: B has never seen the event id, and delivers it again.
            [again] = await wait_for_records(b.events, 1)
            assert again["event_id"] == first["event_id"]
            assert b.daemon.context.ingest.counters.duplicates == 0
        else:
            # The claim A made in DynamoDB is B's as well: B suppresses and audits it.
            [record] = await wait_for_records(b.ledger, 1)
            assert record["decision"] == "duplicate"
            assert record["first_seen_id"] == first["event_id"]
            await asyncio.sleep(0.3)
            assert b.events() == []
        await asyncio.sleep(0.2)
    assert a.events() == [first]
    [folded] = a.ledger()
    assert folded["decision"] == "duplicate"
    assert folded["first_seen_id"] == first["event_id"]
    assert len(b.events()) == (1 if backend is Backend.embedded else 0)


@pytest.mark.parametrize("backend", list(Backend))
async def test_window_dedup_across_instances(tmp_path: Path, request: pytest.FixtureRequest, backend: Backend) -> None:
    dedup = await _dedup_settings(backend, request, tmp_path)
    second = 1_000_000  # µs
    async with two_instances(tmp_path, dedup_mode="window", dedup_window_minutes=5, **dedup) as (a, b):
        await a.send(frame(1, "SMB_WR", "/finance/a.pdf", generation_us=BASE_GENERATION_US))
        [first] = await wait_for_records(a.events, 1)
        # Another write of the same file 1 s later, inside the window, on the same instance: folded everywhere.
        await a.send(frame(2, "SMB_WR", "/finance/a.pdf", generation_us=BASE_GENERATION_US + second))
        await wait_for_records(a.ledger, 1)
        # A third write 2 s after the first, on the other instance.
        await b.send(frame(3, "SMB_WR", "/finance/a.pdf", generation_us=BASE_GENERATION_US + 2 * second))
        if backend is Backend.embedded:
            # The window is B's local SQLite store, which holds no claim for the path: delivered.
            [other] = await wait_for_records(b.events, 1)
            assert other["event_id"] != first["event_id"]
            await asyncio.sleep(0.2)
            assert b.ledger() == []
        else:
            # The window claims are in the shared table: B folds it into A's event (one audit record per use
            # case, that is per route the path matches).
            records = await wait_for_records(b.ledger, 1)
            assert {(r["decision"], r["first_seen_id"]) for r in records} == {("duplicate", first["event_id"])}
            await asyncio.sleep(0.3)
            assert b.events() == []
    assert a.events() == [first]
    assert {(r["decision"], r["first_seen_id"]) for r in a.ledger()} == {("duplicate", first["event_id"])}
    assert len(b.events()) == (1 if backend is Backend.embedded else 0)
