"""Property tests for packed SQS messages (``SqsTarget.pack_bytes``).

Whatever the events and limits: every event of the input is in exactly one message (or set aside as
:class:`Oversize` only when it cannot be sent at all), in order (per message group on FIFO queues); every limit
holds (a packed message within the pack limit, any message within the message limit, a batch within 10 entries
and the batch bytes), sizes are the documented ones recomputed from the request; decoding a message gives back
exactly the event JSON objects it carries; an uncompressed message is closed only when the next event would not
fit; planning is deterministic (a packed FIFO message's deduplication id is a function of its events).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import zlib
from collections import defaultdict
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpolicyd.sinks.aws import encode
from fpolicyd.sinks.aws.encode import Batch, Entry, Item, Oversize, encode_sqs_entry, plan_batches, sqs_entry_size
from fpolicyd.sinks.aws.targets import SqsTarget
from fpolicyd.sinks.sqs_envelope import PackCompression, decode_message, pack_attributes

QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/events"

# Multi-byte characters (limits are UTF-8 bytes) and the two noncharacters SQS refuses, which a plain pack must
# escape; random text also makes gzip's ratio vary from message to message.
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("\ufffe\uffffé日"),
    max_size=40,
)
padding = st.integers(min_value=0, max_value=2000).map(lambda n: "p" * n)


@st.composite
def events(draw: st.DrawFn, n: int) -> Item:
    if draw(st.integers(min_value=0, max_value=30)) == 0:  # now and then something that is not an event
        return Item(draw(st.sampled_from([b"[1, 2]", b"\xff\xfe", b"", b'"text"'])), ref=n)
    event: dict[str, Any] = {
        "event_id": f"00000000-0000-5000-8000-{n:012d}",
        "operation_type": draw(st.sampled_from(["create", "write", "delete", "rename", ""])),
        "file_path": "/" + draw(text) + draw(padding),
        "volume_name": "vol1",
        "svm_name": draw(st.sampled_from(["svm-a", "svm-b", "svm é", ""]) | text),
        "timestamp": "2024-05-01T10:00:00.000001Z",
        "file_size": n,
        "metadata": {"routes": draw(st.lists(st.sampled_from(["UC1", "UC2", "UC16"]), max_size=3))},
    }
    return Item(orjson.dumps(event), ref=n)


@st.composite
def item_lists(draw: st.DrawFn) -> list[Item]:
    count = draw(st.integers(min_value=0, max_value=40))
    return [draw(events(n)) for n in range(count)]


targets = st.builds(
    SqsTarget,
    queue_url=st.sampled_from([QUEUE, QUEUE + ".fifo"]),
    max_batch_bytes=st.integers(min_value=400, max_value=40_000),
    max_message_bytes=st.integers(min_value=400, max_value=20_000),
    max_entries=st.integers(min_value=1, max_value=10),
    pack_bytes=st.integers(min_value=100, max_value=12_000),
    pack_compression=st.sampled_from(list(PackCompression)),
    pack_gzip_level=st.sampled_from([1, 6, 9]),
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def single_target(target: SqsTarget) -> SqsTarget:
    """The same queue without packing: what a one-event message looks like there."""
    return SqsTarget(
        target.queue_url, max_batch_bytes=target.max_batch_bytes, max_message_bytes=target.max_message_bytes
    )


def is_event(item: Item) -> bool:
    try:
        return isinstance(orjson.loads(item.event_json), dict)
    except orjson.JSONDecodeError:
        return False


def steps(plan: list[Batch | Oversize]) -> list[Entry | Oversize]:
    out: list[Entry | Oversize] = []
    for step in plan:
        out.extend(step.entries if isinstance(step, Batch) else (step,))
    return out


def carried(step: Entry | Oversize) -> tuple[Item, ...]:
    return step.items if isinstance(step, Entry) else (step.item,)


def attributes(entry: Entry) -> dict[str, str]:
    return {name: value["StringValue"] for name, value in entry.request.get("MessageAttributes", {}).items()}


def group_of(item: Item, target: SqsTarget) -> str | None:
    """The documented MessageGroupId of the event (None: not an event)."""
    if not is_event(item):
        return None
    return str(encode_sqs_entry(single_target(target), item.event_json, "0")["MessageGroupId"])


@SETTINGS
@given(items=item_lists(), target=targets)
def test_every_event_is_in_exactly_one_message_in_order(items: list[Item], target: SqsTarget) -> None:
    plan = plan_batches(items, target)
    flat = [item for step in steps(plan) for item in carried(step)]
    assert sorted(id(i) for i in flat) == sorted(id(i) for i in items)  # each exactly once
    if not target.fifo:
        assert all(a is b for a, b in zip(flat, items, strict=True))
        return
    # FIFO: each message holds one group's events; each group's events keep their order.
    by_group: dict[str | None, list[Item]] = defaultdict(list)
    for item in items:
        by_group[group_of(item, target)].append(item)
    planned: dict[str | None, list[Item]] = defaultdict(list)
    for step in steps(plan):
        if isinstance(step, Entry):
            group = step.request["MessageGroupId"]
            assert all(group_of(item, target) == group for item in step.items)
            planned[group].extend(step.items)
        else:
            planned[group_of(step.item, target)].append(step.item)
    assert planned.keys() == by_group.keys()
    for group, expected in by_group.items():
        assert all(a is b for a, b in zip(planned[group], expected, strict=True))


@SETTINGS
@given(items=item_lists(), target=targets)
def test_every_limit_holds_and_sizes_are_the_documented_ones(items: list[Item], target: SqsTarget) -> None:
    for step in plan_batches(items, target):
        if isinstance(step, Oversize):
            # Set aside only what can never be sent: not an event, or over the message limit even alone.
            one = step.item
            assert not is_event(one) or (
                sqs_entry_size(encode_sqs_entry(target, one.event_json, "0")) > target.entry_limit
            )
            continue
        assert 1 <= len(step.entries) <= target.max_entries
        assert step.size <= target.max_batch_bytes
        assert [e.request["Id"] for e in step.entries] == [str(i) for i in range(len(step.entries))]
        for entry in step.entries:
            assert entry.size == sqs_entry_size(entry.request)
            assert entry.size <= target.entry_limit
            if entry.packed:
                assert len(entry.items) >= 2
                assert entry.size <= target.pack_limit


@SETTINGS
@given(items=item_lists(), target=targets)
def test_decoding_a_message_gives_back_exactly_its_events(items: list[Item], target: SqsTarget) -> None:
    for step in steps(plan_batches(items, target)):
        if isinstance(step, Oversize):
            continue
        events = decode_message(step.request["MessageBody"], attributes(step))
        assert events == [orjson.loads(item.event_json) for item in step.items]
        if step.packed:
            expected = pack_attributes(len(step.items), target.pack_compression)
            assert step.request["MessageAttributes"] == expected
        else:  # a one-event message is exactly what it is without packing
            assert step.request == encode_sqs_entry(target, step.item.event_json, step.request["Id"])
        if target.fifo and step.packed:
            array = b"[" + b",".join(item.event_json for item in step.items) + b"]"
            assert step.request["MessageDeduplicationId"] == hashlib.sha256(array).hexdigest()


@SETTINGS
@given(items=item_lists(), target=targets)
def test_planning_is_deterministic(items: list[Item], target: SqsTarget) -> None:
    def requests() -> list[object]:
        return [s.request if isinstance(s, Entry) else s.reason for s in steps(plan_batches(items, target))]

    assert requests() == requests()


def plain_packed_size(events: list[Item], target: SqsTarget) -> int:
    """The exact size of an uncompressed packed message of ``events`` (their SQS-safe texts, as a single
    message's body has them)."""
    texts = [encode_sqs_entry(single_target(target), e.event_json, "0")["MessageBody"] for e in events]
    body = "[" + ",".join(texts) + "]"
    return len(body.encode()) + encode._attributes_size(pack_attributes(len(events), PackCompression.NONE))


@SETTINGS
@given(items=item_lists(), target=targets.filter(lambda t: t.pack_compression is PackCompression.NONE))
def test_an_uncompressed_message_closes_only_when_the_next_event_does_not_fit(
    items: list[Item], target: SqsTarget
) -> None:
    def packable(item: Item) -> bool:
        return is_event(item) and plain_packed_size([item], target) <= target.pack_limit

    runs: dict[str | None, list[Entry | Oversize]] = defaultdict(list)
    for step in steps(plan_batches(items, target)):
        runs[group_of(carried(step)[0], target) if target.fifo else None].append(step)
    for run in runs.values():
        for before, after in itertools.pairwise(run):
            first = carried(after)[0]
            together = [*carried(before), first]
            if isinstance(before, Entry) and isinstance(after, Entry) and all(packable(i) for i in together):
                assert plain_packed_size(together, target) > target.pack_limit


@SETTINGS
@given(
    data=st.binary(max_size=5000) | st.lists(text, max_size=200).map(lambda t: "".join(t).encode("utf-8")),
    level=st.integers(min_value=1, max_value=9),
)
def test_gzip_is_one_standard_member_at_every_level(data: bytes, level: int) -> None:
    """What a consumer gunzips (level 1 is ISA-L's deflate, 2..9 zlib's): one RFC 1952 member with nothing after it,
    read back by the standard library exactly."""
    packed = encode.gzip_compress(data, level)
    assert packed[:3] == b"\x1f\x8b\x08"  # gzip magic, deflate
    assert gzip.decompress(packed) == data
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert reader.decompress(packed) == data
    assert reader.eof
    assert reader.unused_data == b""
