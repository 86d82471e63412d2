"""The README's Lambda consumer, run as it is written there, on SQS event records made from messages the real
planner produced: gzip-packed, plain packed and one-event messages map back to exactly the events, in order;
broken or failing messages, and only they, are reported in ``batchItemFailures`` (on a FIFO queue, the failed
message and every later one, none of them handled)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from fpolicyd.events import FileEvent
from fpolicyd.sinks.aws.encode import Batch, Entry, Item, plan_batches
from fpolicyd.sinks.aws.targets import SqsTarget
from fpolicyd.sinks.sqs_envelope import PackCompression
from support.readme_lambda import LambdaHandler, lambda_record, load_lambda_consumer

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/fpolicy-events"
ARN = "arn:aws:sqs:us-east-1:123456789012:fpolicy-events"
FIFO_ARN = ARN + ".fifo"


def event_json(n: int, *, path: str | None = None) -> bytes:
    return FileEvent(
        event_id=f"6f1c2a9e-0000-5000-8000-{n:012d}",
        operation_type=("create", "write", "rename")[n % 3],
        file_path=path if path is not None else f"/資料/report-{n} é.pdf",
        previous_path="/old.pdf" if n % 3 == 2 else None,
        volume_name="vol1",
        svm_name="svm-a",
        timestamp="2024-05-01T10:00:00.123456Z",
        file_size=n,
        client_ip="10.0.0.5",
        metadata={"routes": ["UC1"]},
    ).to_json()


def messages(first: int, count: int, target: SqsTarget, **kw: Any) -> list[Entry]:
    items = [Item(event_json(n, **kw), ref=n) for n in range(first, first + count)]
    out: list[Entry] = []
    for step in plan_batches(items, target):
        assert isinstance(step, Batch)
        out.extend(step.entries)
    return out


def records(entries: Sequence[Entry], arn: str = ARN) -> list[dict[str, Any]]:
    return [
        lambda_record(f"m{n}", e.request["MessageBody"], e.request.get("MessageAttributes", {}), queue_arn=arn)
        for n, e in enumerate(entries)
    ]


def consumer(fail_on: str | None = None) -> tuple[LambdaHandler, list[dict[str, Any]]]:
    handled: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event_id"] == fail_on:
            raise RuntimeError("downstream refused")
        handled.append(event)

    return load_lambda_consumer(on_event), handled


def events_of(entries: Sequence[Entry]) -> list[Any]:
    return [orjson.loads(item.event_json) for e in entries for item in e.items]


def test_every_form_of_message_maps_back_to_its_events_in_order() -> None:
    gzip = messages(0, 300, SqsTarget(QUEUE, pack_bytes=4096))
    plain = messages(300, 40, SqsTarget(QUEUE, pack_bytes=4096, pack_compression=PackCompression.NONE))
    noncharacters = messages(
        340, 2, SqsTarget(QUEUE, pack_bytes=4096, pack_compression=PackCompression.NONE), path="/a\ufffe"
    )
    alone = messages(342, 1, SqsTarget(QUEUE, pack_bytes=4096))
    too_big = messages(343, 1, SqsTarget(QUEUE, pack_bytes=1024), path="/" + "x" * 2000)
    everything = [*gzip, *plain, *noncharacters, *alone, *too_big]
    assert {len(e.items) > 1 for e in gzip} == {True}
    assert all(e.packed for e in plain + noncharacters)
    assert not alone[0].packed
    assert not too_big[0].packed
    handler, handled = consumer()
    assert handler({"Records": records(everything)}, None) == {"batchItemFailures": []}
    assert handled == events_of(everything)
    assert len(handled) == 344


def test_only_the_messages_that_fail_are_reported() -> None:
    good = messages(0, 60, SqsTarget(QUEUE, pack_bytes=1024))[:2] + messages(100, 1, SqsTarget(QUEUE))
    batch = records(good)
    packed = batch[0]
    attributes = packed["messageAttributes"]
    unknown = {**packed, "messageId": "unknown", "messageAttributes": {**attributes, "fpolicyd-format": {
        "stringValue": "packed-v9", "dataType": "String"}}}  # fmt: skip
    not_base64 = {**packed, "messageId": "not-base64", "body": "%%%"}
    not_gzip = {**packed, "messageId": "not-gzip", "body": base64.b64encode(b"plain text").decode()}
    miscounted = {**packed, "messageId": "miscounted", "messageAttributes": {**attributes, "fpolicyd-count": {
        "stringValue": "2", "dataType": "Number"}}}  # fmt: skip
    handler, handled = consumer()
    response = handler({"Records": [batch[0], unknown, not_base64, batch[1], not_gzip, miscounted, batch[2]]}, None)
    assert response == {
        "batchItemFailures": [
            {"itemIdentifier": "unknown"},
            {"itemIdentifier": "not-base64"},
            {"itemIdentifier": "not-gzip"},
            {"itemIdentifier": "miscounted"},
        ]
    }
    assert handled == events_of(good)


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
def test_a_failing_event_fails_its_message_and_on_fifo_every_later_one(fifo: bool) -> None:
    entries = messages(0, 100, SqsTarget(QUEUE + (".fifo" if fifo else ""), pack_bytes=1024))
    assert len(entries) >= 4
    failing = entries[1].items[3]
    fail_on = orjson.loads(failing.event_json)["event_id"]
    handler, handled = consumer(fail_on=fail_on)
    response = handler({"Records": records(entries, FIFO_ARN if fifo else ARN)}, None)
    if fifo:
        assert response["batchItemFailures"] == [{"itemIdentifier": f"m{n}"} for n in range(1, len(entries))]
        assert handled == events_of(entries[:1]) + events_of(entries[1:2])[:3]
    else:
        # The failed message's events up to the failing one were handled and will be seen again; the later
        # messages are handled as usual.
        assert response["batchItemFailures"] == [{"itemIdentifier": "m1"}]
        assert handled == events_of(entries[:1]) + events_of(entries[1:2])[:3] + events_of(entries[2:])
