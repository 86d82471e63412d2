"""Property tests for AWS batch planning and response classification.

``plan_batches`` never exceeds a limit, keeps every item exactly once and in order, sets aside exactly the
items over the per-entry limit, and closes a batch only when it must. The sizes it plans with are recomputed
here from the request entries with the services' documented rules, so a planner that under-counts fails.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.sinks.aws.classify import classify_eventbridge, classify_sqs
from fpolicyd.sinks.aws.encode import (
    Batch,
    Item,
    Oversize,
    encode_eventbridge_entry,
    encode_sqs_entry,
    eventbridge_entry_size,
    plan_batches,
    sqs_entry_size,
)
from fpolicyd.sinks.aws.targets import AwsTarget, EventBridgeTarget, SqsTarget

QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/events"

# Text with multi-byte characters (sizes are UTF-8 bytes, not characters), including the two noncharacters SQS
# refuses and the encoder escapes (which changes the body size).
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("\ufffe\uffffé日"),
    max_size=40,
)
padding = st.integers(min_value=0, max_value=3000).map(lambda n: "p" * n)


@st.composite
def events(draw: st.DrawFn, n: int) -> Item:
    event: dict[str, Any] = {
        "event_id": f"00000000-0000-5000-8000-{n:012d}",
        "operation_type": draw(st.sampled_from(["create", "write", "delete", "rename", ""])),
        "file_path": "/" + draw(text) + draw(padding),
        "volume_name": "vol1",
        "svm_name": draw(text),
        "timestamp": draw(st.sampled_from(["2024-05-01T10:00:00.000001Z", "not a time"])),
        "file_size": 0,
        "metadata": {"routes": draw(st.lists(st.sampled_from(["UC1", "UC2", "UC16"]), max_size=3))},
    }
    return Item(orjson.dumps(event), ref=n)


@st.composite
def item_lists(draw: st.DrawFn) -> list[Item]:
    count = draw(st.integers(min_value=0, max_value=40))
    return [draw(events(n)) for n in range(count)]


sqs_targets = st.builds(
    SqsTarget,
    queue_url=st.sampled_from([QUEUE, QUEUE + ".fifo"]),
    max_batch_bytes=st.integers(min_value=200, max_value=20_000),
    max_message_bytes=st.integers(min_value=200, max_value=6_000),
    max_entries=st.integers(min_value=1, max_value=10),
)
eventbridge_targets = st.builds(
    EventBridgeTarget,
    bus_name=st.just("bus"),
    source=st.sampled_from(["fsxn.fpolicy", "source.é"]),
    max_batch_bytes=st.integers(min_value=200, max_value=20_000),
    max_entry_bytes=st.integers(min_value=200, max_value=6_000),
    max_entries=st.integers(min_value=1, max_value=10),
)
targets = sqs_targets | eventbridge_targets


def documented_size(target: AwsTarget, request: dict[str, Any]) -> int:
    return sqs_entry_size(request) if isinstance(target, SqsTarget) else eventbridge_entry_size(request)


def encode(target: AwsTarget, item: Item) -> dict[str, Any]:
    if isinstance(target, SqsTarget):
        return encode_sqs_entry(target, item.event_json, "0")
    return encode_eventbridge_entry(target, item.event_json)


def flatten(plan: list[Batch | Oversize]) -> list[Item]:
    out: list[Item] = []
    for step in plan:
        if isinstance(step, Batch):
            out.extend(e.item for e in step.entries)
        else:
            out.append(step.item)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=item_lists(), target=targets)
def test_plan_respects_limits_and_keeps_every_item_in_order(items: list[Item], target: AwsTarget) -> None:
    plan = plan_batches(items, target)
    flat = flatten(plan)
    assert len(flat) == len(items)
    assert all(a is b for a, b in zip(flat, items, strict=True))
    for step in plan:
        if isinstance(step, Oversize):
            continue
        assert 1 <= len(step.entries) <= target.max_entries
        assert step.size <= target.max_batch_bytes
        for entry in step.entries:
            assert entry.size == documented_size(target, entry.request)
            assert entry.size <= target.entry_limit
        if isinstance(target, SqsTarget):
            ids = [e.request["Id"] for e in step.entries]
            assert ids == [str(i) for i in range(len(ids))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=item_lists(), target=targets)
def test_oversize_is_exactly_what_is_over_the_entry_limit(items: list[Item], target: AwsTarget) -> None:
    plan = plan_batches(items, target)
    oversize = [step.item.ref for step in plan if isinstance(step, Oversize)]
    # Each item's size measured on its own, from the request entry, with the documented rule.
    expected = [item.ref for item in items if documented_size(target, encode(target, item)) > target.entry_limit]
    assert oversize == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=item_lists(), target=targets)
def test_batches_are_closed_only_when_they_must(items: list[Item], target: AwsTarget) -> None:
    plan = plan_batches(items, target)
    for before, after in itertools.pairwise(plan):
        if isinstance(before, Batch) and isinstance(after, Batch):
            full = len(before.entries) == target.max_entries
            no_room = before.size + after.entries[0].size > target.max_batch_bytes
            assert full or no_room


@st.composite
def sqs_responses(draw: st.DrawFn, count: int) -> dict[str, Any]:
    ids = [str(i) for i in range(count)] + ["stray"]
    fate = {i: draw(st.sampled_from(["ok", "fail", "both", "none"])) for i in ids}
    successful = [{"Id": i, "MessageId": "m"} for i, f in fate.items() if f in ("ok", "both")]
    failed = [
        {
            "Id": i,
            "SenderFault": draw(st.booleans()),
            "Code": draw(st.sampled_from(["InternalError", "InvalidMessageContents", "KmsDisabled", "KmsThrottled"])),
        }
        for i, f in fate.items()
        if f in ("fail", "both")
    ]
    return {"Successful": draw(st.permutations(successful)), "Failed": draw(st.permutations(failed))}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), count=st.integers(min_value=1, max_value=10))
def test_classify_sqs_puts_every_entry_in_exactly_one_bucket(data: st.DataObject, count: int) -> None:
    items = [Item(orjson.dumps({"event_id": str(n)}), ref=n) for n in range(count)]
    (batch,) = plan_batches(items, SqsTarget(QUEUE))
    assert isinstance(batch, Batch)
    response = data.draw(sqs_responses(count))
    outcome = classify_sqs(response, batch)
    buckets = [
        [e.item.ref for e in outcome.succeeded],
        [e.item.ref for e, _ in outcome.retry],
        [e.item.ref for e, _ in outcome.dead],
        [e.item.ref for e, _ in outcome.blocked],
    ]
    assert sorted(ref for bucket in buckets for ref in bucket) == list(range(count))  # type: ignore[type-var]
    succeeded_ids = {s["Id"] for s in response["Successful"]}
    assert {str(r) for r in buckets[0]} == succeeded_ids - {"stray"}


@settings(max_examples=300, deadline=None)
@given(
    codes=st.lists(
        st.sampled_from([None, "InternalFailure", "ThrottlingException", "MalformedDetail", "X"]),
        min_size=1,
        max_size=10,
    )
)
def test_classify_eventbridge_aligns_by_index(codes: list[str | None]) -> None:
    items = [Item(orjson.dumps({"event_id": str(n)}), ref=n) for n in range(len(codes))]
    (batch,) = plan_batches(items, EventBridgeTarget("bus"))
    assert isinstance(batch, Batch)
    response = {"Entries": [{"EventId": f"e{i}"} if c is None else {"ErrorCode": c} for i, c in enumerate(codes)]}
    outcome = classify_eventbridge(response, batch)
    assert [e.item.ref for e in outcome.succeeded] == [i for i, c in enumerate(codes) if c is None]
    assert [e.item.ref for e, _ in outcome.retry] == [
        i for i, c in enumerate(codes) if c in ("InternalFailure", "ThrottlingException")
    ]
    assert [e.item.ref for e, _ in outcome.dead] == [i for i, c in enumerate(codes) if c in ("MalformedDetail", "X")]
