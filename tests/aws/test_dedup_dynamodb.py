"""The DynamoDB dedup store against a moto server the tests start themselves (never the real AWS).

Proved here: the conditional put gives first/duplicate with the first-seen id (from the ALL_OLD item moto returns
on a failed condition); a claim past its expiry, or past its retention but not yet swept by TTL, is taken over;
the same claimant is first again; window mode slides and catches the tumbling-boundary case; same-key requests of
one batch are judged in batch order; an unreachable endpoint gives error_open or error_closed per the failure
mode, with the counters (after one request failed its retries the rest of the batch is not sent); a request
DynamoDB refuses (ValidationException) is delivered whatever the mode; a long path's window key fits; and over a
random sequence the store decides exactly as the embedded store.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fpolicyd.errors import SinkError
from fpolicyd.pipeline.dedup import (
    MAX_PARTITION_KEY_BYTES,
    Decision,
    DedupFailureMode,
    DedupKey,
    DedupMode,
    DedupRequest,
    EmbeddedDedupStore,
    exact_key,
    window_key,
)
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.dedup_dynamodb import CONDITION, DynamoDbDedupStore, item_of
from fpolicyd.sinks.retry import RetryPolicy
from support.moto_server import MotoEndpoint, create_dedup_table, isolate_aws_env

T0 = 1_714_557_600.0
DAY = 86400.0
FAST = RetryPolicy(base_s=0.001, cap_s=0.01)


def exact(event_id: str, claimant: str, now: float, ttl: float = 7 * DAY) -> DedupRequest:
    return DedupRequest(exact_key(event_id), event_id, claimant, now, now + ttl)


def windowed(event_id: str, claimant: str, event_time: float, now: float | None = None) -> DedupRequest:
    now = event_time if now is None else now
    return DedupRequest(
        window_key("UC1", "/legal/a.pdf", "write"),
        event_id,
        claimant,
        event_time,
        event_time + 300,
        mode=DedupMode.window,
        retain_until=now + 7 * DAY,
        use_case="UC1",
    )


@pytest.fixture
def aws_env(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoEndpoint:
    isolate_aws_env(monkeypatch, tmp_path, moto)
    return moto


@pytest.fixture
async def clients(aws_env: MotoEndpoint) -> AsyncIterator[AwsClients]:
    async with AwsClients(endpoint_url=aws_env.url, region_name=aws_env.region, max_pool_connections=8) as made:
        yield made


@pytest.fixture
async def table(clients: AwsClients) -> str:
    return await create_dedup_table(await clients.client("dynamodb"))


@pytest.fixture
def store(clients: AwsClients, table: str) -> DynamoDbDedupStore:
    return DynamoDbDedupStore(clients, table, max_in_flight=4, retry_policy=FAST, rng=random.Random(1))


async def decide(store: DynamoDbDedupStore, requests: list[DedupRequest], now: float) -> list[Decision]:
    return [r.decision for r in await store.check_many(requests, now)]


async def test_first_then_duplicate_with_first_seen_id(store: DynamoDbDedupStore, clients: AwsClients) -> None:
    first = await store.check_many([exact("e1", "i:1", T0), exact("e2", "i:1", T0)], T0)
    assert [r.decision for r in first] == [Decision.first, Decision.first]
    [dup] = await store.check_many([exact("e1", "i:2", T0 + 1)], T0 + 1)
    assert (dup.decision, dup.first_seen_id, dup.first_claimant, dup.claimant) == (
        Decision.duplicate,
        "e1",
        "i:1",
        "i:2",
    )
    assert (store.checks, store.duplicates, store.errors) == (3, 1, 0)
    item = (
        await (await clients.client("dynamodb")).get_item(
            TableName=store.table, Key={"pk": {"S": "e1"}, "sk": {"S": "exact"}}
        )
    )["Item"]
    assert item == item_of(exact("e1", "i:1", T0))
    assert int(item["ttl"]["N"]) == int(T0 + 7 * DAY)


async def test_failed_condition_returns_the_old_item(store: DynamoDbDedupStore, clients: AwsClients) -> None:
    """The store relies on ReturnValuesOnConditionCheckFailure=ALL_OLD (a GetItem is only the fallback)."""
    client = await clients.client("dynamodb")
    request = exact("e1", "i:1", T0)
    await store.check_many([request], T0)
    with pytest.raises(ClientError) as caught:
        await client.put_item(
            TableName=store.table,
            Item=item_of(exact("e1", "i:2", T0)),
            ConditionExpression=CONDITION,
            ExpressionAttributeNames={"#ttl": "ttl"},
            ExpressionAttributeValues={":now": {"N": str(T0)}, ":claimant": {"S": "i:2"}, ":at": {"N": str(T0)}},
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    assert caught.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    assert caught.value.response["Item"] == item_of(request)


async def put_raw(clients: AwsClients, table: str, item: dict[str, Any]) -> None:
    await (await clients.client("dynamodb")).put_item(TableName=table, Item=item)


async def test_expired_claim_is_taken_over(store: DynamoDbDedupStore, clients: AwsClients) -> None:
    old = item_of(exact("e1", "old:1", T0 - 8 * DAY))  # expires_at and ttl a day ago, not swept yet
    await put_raw(clients, store.table, old)
    assert await decide(store, [exact("e1", "new:1", T0)], T0) == [Decision.first]
    assert await decide(store, [exact("e1", "new:2", T0)], T0) == [Decision.duplicate]


async def test_claim_past_retention_is_taken_over_even_if_unexpired(
    store: DynamoDbDedupStore, clients: AwsClients
) -> None:
    lagging = item_of(
        DedupRequest(window_key("UC1", "/legal/a.pdf", "write"), "w0", "old:1", T0, T0 + 300, retain_until=T0 - 5)
    )
    await put_raw(clients, store.table, lagging)
    assert await decide(store, [windowed("w1", "new:1", T0 + 10)], T0 + 10) == [Decision.first]


async def test_same_claimant_is_first_again(store: DynamoDbDedupStore) -> None:
    assert await decide(store, [exact("e1", "node-a:7", T0)], T0) == [Decision.first]
    assert await decide(store, [exact("e1", "node-a:7", T0 + 5)], T0 + 5) == [Decision.first]
    assert await decide(store, [exact("e1", "node-b:7", T0 + 6)], T0 + 6) == [Decision.duplicate]


async def test_window_mode(store: DynamoDbDedupStore) -> None:
    assert await decide(store, [windowed("w1", "a", T0 + 299.5)], T0 + 299.5) == [Decision.first]
    # across the reference's 5-minute bucket boundary: still the same write
    assert await decide(store, [windowed("w2", "b", T0 + 300.5)], T0 + 300.5) == [Decision.duplicate]
    # 5 min + 1 s after the claim: a genuine rewrite, it takes the claim over
    assert await decide(store, [windowed("w3", "c", T0 + 600.5)], T0 + 600.5) == [Decision.first]
    [dup] = await store.check_many([windowed("w4", "d", T0 + 700)], T0 + 700)
    assert (dup.decision, dup.first_seen_id) == (Decision.duplicate, "w3")
    # a late event a window or more before the claim: delivered, the claim stays
    assert await decide(store, [windowed("w0", "e", T0, now=T0 + 700)], T0 + 700) == [Decision.first]
    [again] = await store.check_many([windowed("w5", "f", T0 + 710)], T0 + 710)
    assert again.first_seen_id == "w3"


async def test_same_key_in_one_batch_is_judged_in_order(store: DynamoDbDedupStore) -> None:
    batch = [exact(f"e{i % 3}", f"i:{i}", T0) for i in range(12)]
    results = await store.check_many(batch, T0)
    assert [r.decision for r in results] == [Decision.first] * 3 + [Decision.duplicate] * 9
    assert [r.first_claimant for r in results[3:6]] == ["i:0", "i:1", "i:2"]


async def test_check_table(store: DynamoDbDedupStore, clients: AwsClients) -> None:
    await store.check_table()
    missing = DynamoDbDedupStore(clients, "no-such-table")
    with pytest.raises(SinkError, match="does not exist") as caught:
        await missing.check_table()
    assert not caught.value.retriable
    client = await clients.client("dynamodb")
    await client.create_table(
        TableName="wrong-keys",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    with pytest.raises(SinkError, match="string keys pk"):
        await DynamoDbDedupStore(clients, "wrong-keys").check_table()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("mode", "decision"),
    [(DedupFailureMode.open, Decision.error_open), (DedupFailureMode.closed, Decision.error_closed)],
)
async def test_unreachable_endpoint_applies_the_failure_mode(
    aws_env: MotoEndpoint, mode: DedupFailureMode, decision: Decision
) -> None:
    async with AwsClients(
        endpoint_url=f"http://127.0.0.1:{closed_port()}", region_name=aws_env.region, connect_timeout_s=2
    ) as unreachable:
        store = DynamoDbDedupStore(unreachable, "t", max_in_flight=1, retries=2, failure_mode=mode, retry_policy=FAST)
        results = await store.check_many([exact("e1", "a", T0), exact("e2", "a", T0)], T0)
        assert [r.decision for r in results] == [decision, decision]
        assert [r.first_seen_id for r in results] == [None, None]
        # The first request is retried twice; the store is then down for the rest of the batch.
        assert (store.checks, store.errors, store.retries_done, store.duplicates) == (2, 2, 2, 0)
        assert store.short_circuited == 1
        assert (store.fail_open, store.fail_closed) == ((2, 0) if mode is DedupFailureMode.open else (0, 2))
        with pytest.raises(SinkError) as caught:
            await store.check_table()
        assert caught.value.retriable


async def test_missing_table_is_not_retried(clients: AwsClients) -> None:
    store = DynamoDbDedupStore(clients, "no-such-table", retries=5, retry_policy=FAST)
    assert await decide(store, [exact("e1", "a", T0)], T0) == [Decision.error_open]
    assert (store.errors, store.retries_done) == (1, 0)


async def test_decides_like_the_embedded_store(store: DynamoDbDedupStore, tmp_path: Path) -> None:
    """One random sequence of batches (both modes, few keys and claimants, a moving clock) through both stores."""
    rng = random.Random(20240501)
    now = T0
    seen: set[Decision] = set()
    with EmbeddedDedupStore(tmp_path, max_entries=10_000).open(now) as embedded:
        for _ in range(15):
            now += rng.choice([0, 10, 60, 200, 400])
            batch: list[DedupRequest] = []
            for _ in range(rng.randint(1, 6)):
                event_id, claimant = f"e{rng.randint(0, 3)}", f"i:{rng.randint(0, 3)}"
                if rng.random() < 0.5:
                    batch.append(exact(event_id, claimant, now, ttl=300))
                else:
                    batch.append(windowed(event_id, claimant, now + rng.randint(-400, 100), now=now))
            remote = await store.check_many(batch, now)
            local = embedded.check_many(batch, now)
            assert [(r.decision, r.first_seen_id) for r in remote] == [(r.decision, r.first_seen_id) for r in local]
            seen.update(r.decision for r in local)
    assert seen == {Decision.first, Decision.duplicate}


def long_window(event_id: str, path: str) -> DedupRequest:
    return DedupRequest(
        DedupKey(f"UC1#{path}", "write"),  # built by hand: window_key would shorten it
        event_id,
        "i:1",
        T0,
        T0 + 300,
        mode=DedupMode.window,
        retain_until=T0 + 7 * DAY,
        use_case="UC1",
    )


async def test_a_request_dynamodb_refuses_is_delivered_even_fail_closed(clients: AwsClients, table: str) -> None:
    """A key over DynamoDB's 2048-byte limit is refused (ValidationException) on every attempt: fail-closed
    would hold the whole stage behind it for good. It is delivered (error_open), alone; the batch goes on."""
    store = DynamoDbDedupStore(clients, table, retries=3, failure_mode=DedupFailureMode.closed, retry_policy=FAST)
    results = await store.check_many([long_window("e1", "/" + "a" * 3000), exact("e2", "i:1", T0)], T0)
    assert [r.decision for r in results] == [Decision.error_open, Decision.first]
    assert (store.unjudgeable, store.retries_done, store.fail_open, store.fail_closed) == (1, 0, 1, 0)
    assert str(store.last_failure).startswith("ValidationException")


async def test_a_long_path_gets_a_window_key_dynamodb_accepts(store: DynamoDbDedupStore) -> None:
    path = "/" + "é" * 1500  # 3001 UTF-8 bytes
    key = window_key("UC1", path, "write")
    assert len(key.pk.encode()) <= MAX_PARTITION_KEY_BYTES
    assert key == window_key("UC1", path, "write") != window_key("UC1", path + "x", "write")
    request = DedupRequest(key, "e1", "i:1", T0, T0 + 300, mode=DedupMode.window, use_case="UC1")
    again = DedupRequest(key, "e2", "i:2", T0 + 1, T0 + 301, mode=DedupMode.window, use_case="UC1")
    assert await decide(store, [request], T0) == [Decision.first]
    assert await decide(store, [again], T0 + 1) == [Decision.duplicate]


async def test_after_one_request_fails_its_retries_the_rest_of_the_batch_is_not_sent(aws_env: MotoEndpoint) -> None:
    """Against an endpoint that is down, a fail-open batch costs one request's retries, not every request's."""
    async with AwsClients(
        endpoint_url=f"http://127.0.0.1:{closed_port()}", region_name=aws_env.region, connect_timeout_s=2
    ) as unreachable:
        store = DynamoDbDedupStore(unreachable, "t", max_in_flight=1, retries=2, retry_policy=FAST)
        results = await store.check_many([exact(f"e{i}", "a", T0) for i in range(50)], T0)
        assert {r.decision for r in results} == {Decision.error_open}
        assert (store.errors, store.retries_done, store.short_circuited) == (50, 2, 49)
        # The next batch tries again (one request, then the rest at once).
        await store.check_many([exact("e1", "a", T0), exact("e2", "a", T0)], T0)
        assert (store.retries_done, store.short_circuited) == (4, 50)
