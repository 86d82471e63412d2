"""EventBridge's own matcher (moto) and the in-process router agree, event by event.

The patterns `fpolicyd routes export --format eventbridge` prints become one rule per route on a bus, each
rule sending to its own SQS queue; a few hundred generated events (paths built from the 17 routes' prefixes
and suffixes plus noise, every operation) are put on the bus; what each queue received must be exactly the
events the router sends to that route. Done twice: the default semantics and strict ownership (prefix only).

moto 5's ``EventPattern`` implements the ``prefix`` and ``suffix`` filters (``str.startswith``/``endswith`` on
string values, OR across the list, AND across fields), the same semantics the routes file documents.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.cli.main import main
from fpolicyd.config import Settings
from fpolicyd.pipeline.router import KNOWN_OPERATIONS, Router, RouteTable
from fpolicyd.sinks.aws.clients import AwsClients
from support.moto_server import MotoEndpoint, create_queue, drain_queue, isolate_aws_env, unique

SOURCE: str = Settings.model_fields["eventbridge_source"].default
DETAIL_TYPE: str = Settings.model_fields["eventbridge_detail_type"].default
EVENTS = 400
PUT_EVENTS_MAX_ENTRIES = 10


@pytest.fixture
async def clients(moto: MotoEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[AwsClients]:
    isolate_aws_env(monkeypatch, tmp_path, moto)
    for name in list(os.environ):
        if name.startswith("FPOLICYD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # `fpolicyd routes export` must not pick up a ./fpolicyd.toml
    async with AwsClients(endpoint_url=moto.url, region_name=moto.region, max_pool_connections=4) as made:
        yield made


def exported_patterns(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main(["routes", "export", "--format", "eventbridge", *flags]) == 0
    patterns: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return patterns


def generated_paths(table: RouteTable, count: int, seed: int) -> list[str]:
    """Paths that hit, nearly hit and miss the routes: their prefixes and suffixes, cut short, in the wrong case,
    in the middle of a path, followed by more text, with unicode noise."""
    rng = random.Random(seed)
    prefixes = sorted({p for route in table.routes for p in route.prefixes})
    suffixes = sorted({s for route in table.routes for s in route.suffixes})
    words = ["report", "a", "日本語", "ünï", "x y", "LEGAL", "legal", "2024", ".", "", "/", "pdf", "data.v2"]

    def noise() -> str:
        return "/".join(rng.choice(words) for _ in range(rng.randint(0, 3)))

    shapes = [
        lambda: rng.choice(prefixes) + noise() + rng.choice(suffixes),
        lambda: rng.choice(prefixes) + noise(),
        lambda: "/" + noise() + rng.choice(suffixes),
        lambda: "/" + noise(),
        lambda: rng.choice(prefixes)[:-1],  # "/legal" is not "/legal/"
        lambda: rng.choice(prefixes).upper() + noise(),
        lambda: "/" + noise() + rng.choice(suffixes).upper(),
        lambda: "/" + noise() + rng.choice(suffixes) + rng.choice([".bak", "~", "x"]),
        lambda: "/vol1" + rng.choice(prefixes) + noise(),  # a prefix that is not at the start
        lambda: rng.choice(suffixes),
    ]
    return ["/legal/audit/report.pdf", *(rng.choice(shapes)() for _ in range(count - 1))]


async def rules_with_queues(clients: AwsClients, patterns: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """A bus with one rule per pattern, each sending to its own queue; returns (bus, route name -> queue URL)."""
    events = await clients.events()
    sqs = await clients.sqs()
    bus = unique("fpolicy-routes")
    await events.create_event_bus(Name=bus)
    queues: dict[str, str] = {}
    for name, pattern in patterns.items():
        queue_url = await create_queue(sqs)
        attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        await events.put_rule(Name=name, EventBusName=bus, EventPattern=orjson.dumps(pattern).decode())
        await events.put_targets(
            Rule=name, EventBusName=bus, Targets=[{"Id": name, "Arn": attributes["Attributes"]["QueueArn"]}]
        )
        queues[name] = queue_url
    return bus, queues


async def delivered(clients: AwsClients, queues: dict[str, str], expected: dict[str, int]) -> dict[str, list[str]]:
    """Route name -> event ids its queue received (every message, and then proof the queue is empty)."""
    sqs = await clients.sqs()
    out: dict[str, list[str]] = {}
    for name, queue_url in queues.items():
        messages = await drain_queue(sqs, queue_url, expected[name], within=10.0)
        # moto delivers to the targets inside PutEvents, so anything more would already be in the queue.
        extra = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages += extra.get("Messages", [])
        out[name] = [orjson.loads(m["Body"])["detail"]["event_id"] for m in messages]
    return out


@pytest.mark.parametrize("strict", [False, True], ids=["prefix-or-suffix", "strict-prefix-only"])
async def test_eventbridge_and_the_router_agree_event_by_event(
    clients: AwsClients, capsys: pytest.CaptureFixture[str], strict: bool
) -> None:
    table = RouteTable.load(None)
    router = Router(table, strict=strict)
    patterns = exported_patterns(capsys, "--strict" if strict else "--no-strict")
    assert list(patterns) == [route.name for route in table.routes]  # every packaged route has prefixes
    bus, queues = await rules_with_queues(clients, patterns)

    rng = random.Random(17)
    # Every operation, the four the routes list more often (the others never route, whatever the path).
    operations = sorted(KNOWN_OPERATIONS) + ["create", "write", "rename", "delete"] * 3
    details: list[dict[str, Any]] = [
        {
            "event_id": f"evt-{n:04d}",
            "operation_type": "create" if n == 0 else rng.choice(operations),
            "file_path": path,
            "volume_name": "vol1",
            "svm_name": "svm1",
            "timestamp": "2026-11-28T06:00:00.000000Z",
            "file_size": n,
            "metadata": {"routes": []},
        }
        for n, path in enumerate(generated_paths(table, EVENTS, seed=4))
    ]
    events_client = await clients.events()
    for start in range(0, len(details), PUT_EVENTS_MAX_ENTRIES):
        entries = [
            {"Source": SOURCE, "DetailType": DETAIL_TYPE, "Detail": orjson.dumps(d).decode(), "EventBusName": bus}
            for d in details[start : start + PUT_EVENTS_MAX_ENTRIES]
        ]
        response = await events_client.put_events(Entries=entries)
        assert response["FailedEntryCount"] == 0, response

    routed = {d["event_id"]: router.match(d["file_path"], d["operation_type"]) for d in details}
    expected_counts = {name: sum(name in names for names in routed.values()) for name in queues}
    received = await delivered(clients, queues, expected_counts)

    by_event: dict[str, list[str]] = {d["event_id"]: [] for d in details}
    for name, event_ids in received.items():
        for event_id in event_ids:
            by_event[event_id].append(name)
    order = {route.name: i for i, route in enumerate(table.routes)}
    eventbridge = {event_id: tuple(sorted(names, key=order.__getitem__)) for event_id, names in by_event.items()}
    mismatches = {
        d["event_id"]: (d["file_path"], d["operation_type"], eventbridge[d["event_id"]], routed[d["event_id"]])
        for d in details
        if eventbridge[d["event_id"]] != routed[d["event_id"]]
    }
    assert mismatches == {}

    # The generated events exercised every kind of outcome, so the agreement above says something.
    fan_out = [len(names) for names in routed.values()]
    assert fan_out.count(0) > EVENTS // 10
    assert sum(1 for n in fan_out if n == 1) > EVENTS // 20
    if strict:
        assert routed["evt-0000"] == ("legal-compliance",)
    else:
        assert max(fan_out) >= 4
        assert routed["evt-0000"] == (  # the reference fan-out example: UC1 by prefix, every .pdf use case
            "legal-compliance",
            "financial-idp",
            "insurance-claims",
            "logistics-ocr",
            "education-research",
            "government-archives",
        )
    assert sum(1 for count in expected_counts.values() if count) >= 12
