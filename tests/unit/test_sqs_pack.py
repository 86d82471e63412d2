"""Packed SQS messages (``sqs_pack_bytes``): the exact envelope, the packing rules, FIFO groups and ids, what a
rejected packed message leaves in the dead-letter file, the reference decoder, the settings, and the sender
(pack limit fitted to the queue, an unsettled packed message sent again as the same message) with a scripted
SQS client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError, SinkError
from fpolicyd.events import FileEvent
from fpolicyd.pipeline.records import Record
from fpolicyd.sinks.aws import encode
from fpolicyd.sinks.aws.classify import Outcome, classify_sqs
from fpolicyd.sinks.aws.clients import AwsClients
from fpolicyd.sinks.aws.deliver import deliver
from fpolicyd.sinks.aws.encode import Batch, Entry, Item, Oversize, encode_sqs_entry, plan_batches, sqs_entry_size
from fpolicyd.sinks.aws.sender import (
    PACK_READ_BYTES,
    PACK_READ_RECORDS,
    PACK_READS_IN_FLIGHT,
    SINGLE_READ_RECORDS,
    AwsSender,
)
from fpolicyd.sinks.aws.targets import SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.factory import build_senders
from fpolicyd.sinks.retry import RetryPolicy
from fpolicyd.sinks.sqs_envelope import (
    PackCompression,
    PackedMessageError,
    decode_message,
    pack_attributes,
)

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/fpolicy-events"
FIFO_QUEUE = QUEUE + ".fifo"
PLAIN = PackCompression.NONE
GZIP = PackCompression.GZIP


def ejson(n: int, *, svm: str = "svm-a", path: str | None = None) -> bytes:
    return FileEvent(
        event_id=f"6f1c2a9e-0000-5000-8000-{n:012d}",
        operation_type=("create", "write", "delete", "rename")[n % 4],
        file_path=path if path is not None else f"/legal/report-{n}.pdf",
        previous_path=None,
        volume_name="vol1",
        svm_name=svm,
        timestamp=f"2024-05-01T10:00:{n % 60:02d}.123456Z",
        file_size=n,
        client_ip="10.0.0.5",
        metadata={"vs_uuid": "a1b2c3d4-0000-1111-2222-333344445555", "routes": ["UC1"] if n % 2 else []},
    ).to_json()


def items(count: int, **kw: Any) -> list[Item]:
    return [Item(ejson(n, **kw), ref=n) for n in range(count)]


def entries(plan: Sequence[Batch | Oversize]) -> list[Entry | Oversize]:
    out: list[Entry | Oversize] = []
    for step in plan:
        out.extend(step.entries if isinstance(step, Batch) else (step,))
    return out


def attributes(entry: Entry) -> dict[str, str]:
    return {name: value["StringValue"] for name, value in entry.request.get("MessageAttributes", {}).items()}


def decoded(entry: Entry) -> list[Any]:
    return decode_message(entry.request["MessageBody"], attributes(entry))


def packed_size(pieces: Sequence[bytes], compression: PackCompression = PLAIN) -> int:
    """The exact size of an uncompressed packed message of these events (body plus attributes)."""
    body = b"[" + b",".join(pieces) + b"]"
    return len(body) + encode._attributes_size(pack_attributes(len(pieces), compression))


# ------------------------------------------------------------------------------------------- envelope


def test_plain_packed_message_exact_shape() -> None:
    three = items(3)
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024, pack_compression=PLAIN)
    (batch,) = plan_batches(three, target)
    assert isinstance(batch, Batch)
    (entry,) = batch.entries
    body = b"[" + b",".join(i.event_json for i in three) + b"]"
    assert entry.request == {
        "Id": "0",
        "MessageBody": body.decode(),
        "MessageAttributes": {
            "fpolicyd-format": {"DataType": "String", "StringValue": "packed-v1"},
            "fpolicyd-count": {"DataType": "Number", "StringValue": "3"},
        },
    }
    assert entry.items == tuple(three)
    assert entry.item is three[0]
    assert entry.size == sqs_entry_size(entry.request) == packed_size([i.event_json for i in three])
    assert decoded(entry) == [orjson.loads(i.event_json) for i in three]


def test_gzip_packed_message_is_base64_of_the_gzipped_array() -> None:
    three = items(3)
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024)
    assert target.pack_compression is GZIP  # the default when packing
    (entry,) = entries(plan_batches(three, target))
    assert isinstance(entry, Entry)
    assert attributes(entry) == {"fpolicyd-format": "packed-v1", "fpolicyd-count": "3", "content-encoding": "gzip"}
    array = zlib.decompress(base64.b64decode(entry.request["MessageBody"], validate=True), 16 + zlib.MAX_WBITS)
    assert array == b"[" + b",".join(i.event_json for i in three) + b"]"
    assert entry.size == sqs_entry_size(entry.request)
    assert "MessageGroupId" not in entry.request


def test_packing_off_is_one_event_per_message_as_before() -> None:
    five = items(5)
    plan = plan_batches(five, SqsTarget(QUEUE))
    assert [e.request for e in entries(plan) if isinstance(e, Entry)] == [
        encode_sqs_entry(SqsTarget(QUEUE), i.event_json, str(n)) for n, i in enumerate(five)
    ]


@pytest.mark.parametrize("compression", list(PackCompression))
def test_an_event_alone_is_a_plain_one_event_message(compression: PackCompression) -> None:
    (one,) = items(1)
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024, pack_compression=compression)
    (entry,) = entries(plan_batches([one], target))
    assert isinstance(entry, Entry)
    assert entry.request == encode_sqs_entry(target, one.event_json, "0")
    assert entry.packed == ()
    assert "fpolicyd-format" not in attributes(entry)


def test_plain_pack_fills_up_to_the_exact_limit() -> None:
    pieces = [i.event_json for i in items(4)]
    exact = packed_size(pieces[:3])
    for limit, counts in ((exact, [3, 1]), (exact - 1, [2, 2])):
        target = SqsTarget(QUEUE, pack_bytes=limit, pack_compression=PLAIN)
        got = entries(plan_batches(items(4), target))
        assert [len(e.items) for e in got if isinstance(e, Entry)] == counts
        assert all(e.size <= limit for e in got if isinstance(e, Entry) and e.packed)


def test_noncharacters_are_escaped_inside_a_plain_pack() -> None:
    odd = [Item(ejson(0, path="/a\ufffe\uffffb"), ref=0), Item(ejson(1), ref=1)]
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024, pack_compression=PLAIN)
    (entry,) = entries(plan_batches(odd, target))
    assert isinstance(entry, Entry)
    body = entry.request["MessageBody"]
    assert "\ufffe" not in body
    assert "\uffff" not in body
    assert "\\ufffe\\uffff" in body
    assert entry.size == sqs_entry_size(entry.request)
    assert decoded(entry) == [orjson.loads(i.event_json) for i in odd]


@pytest.mark.parametrize("compression", list(PackCompression))
def test_an_event_too_big_to_pack_goes_alone_in_its_place(compression: PackCompression) -> None:
    small = items(5)
    big = Item(ejson(99, path="/" + "x" * 3000), ref="big")
    target = SqsTarget(QUEUE, pack_bytes=2048, pack_compression=compression)
    got = entries(plan_batches([small[0], small[1], big, small[2], small[3], small[4]], target))
    assert [tuple(i.ref for i in e.items) if isinstance(e, Entry) else e for e in got] == [
        (0, 1),
        ("big",),
        (2, 3, 4),
    ]
    alone = got[1]
    assert isinstance(alone, Entry)
    assert alone.request == encode_sqs_entry(target, big.event_json, "1")
    assert alone.size > target.pack_limit


def test_an_event_over_the_message_limit_is_oversize_in_its_place() -> None:
    big = Item(ejson(99, path="/" + "x" * 3000), ref="big")
    target = SqsTarget(QUEUE, pack_bytes=1500, max_message_bytes=2048, pack_compression=PLAIN)
    got = entries(plan_batches([*items(2), big, *items(2)], target))
    assert [type(e).__name__ for e in got] == ["Entry", "Oversize", "Entry"]
    oversize = got[1]
    assert isinstance(oversize, Oversize)
    assert oversize.item is big
    assert "over the 2048-byte limit" in oversize.reason


def test_a_non_json_item_is_set_aside_in_its_place() -> None:
    bad = Item(b"[1, 2]", ref="bad")
    got = entries(plan_batches([*items(2), bad, *items(2)], SqsTarget(QUEUE, pack_bytes=8192)))
    assert [type(e).__name__ for e in got] == ["Entry", "Oversize", "Entry"]
    assert isinstance(got[1], Oversize)
    assert got[1].reason.startswith("not an event JSON object")


def test_packed_entries_share_batches_within_the_batch_limits() -> None:
    target = SqsTarget(QUEUE, pack_bytes=1500, max_batch_bytes=4000, pack_compression=PLAIN)
    plan = plan_batches(items(20), target)
    assert all(isinstance(b, Batch) for b in plan)
    batches = [b for b in plan if isinstance(b, Batch)]
    assert all(b.size <= 4000 and len(b) <= 10 for b in batches)
    assert len(batches) > 1
    assert [e.request["Id"] for e in batches[0].entries] == [str(i) for i in range(len(batches[0]))]
    assert [i.ref for b in batches for e in b.entries for i in e.items] == list(range(20))


# ----------------------------------------------------------------------------------------------- gzip


def test_gzip_messages_stay_within_the_limit_and_are_well_filled() -> None:
    many = items(600)
    target = SqsTarget(QUEUE, pack_bytes=8 * 1024)
    got = [e for e in entries(plan_batches(many, target)) if isinstance(e, Entry)]
    assert [i.ref for e in got for i in e.items] == list(range(600))
    assert all(e.size <= 8 * 1024 for e in got)
    full = [e.size / (8 * 1024) for e in got[:-1]]
    assert min(full) >= 0.8
    assert len(got) < 600 / 20  # these events compress far better than 20 per 8 KiB


def test_gzip_incompressible_events_still_fit() -> None:
    rng = random.Random(3)
    noisy = [Item(ejson(n, path="/" + rng.randbytes(300).hex()), ref=n) for n in range(80)]
    target = SqsTarget(QUEUE, pack_bytes=4096)
    got = [e for e in entries(plan_batches(noisy, target)) if isinstance(e, Entry)]
    assert [i.ref for e in got for i in e.items] == list(range(80))
    assert all(e.size <= 4096 for e in got if e.packed)
    assert all(decoded(e) == [orjson.loads(i.event_json) for i in e.items] for e in got)


# ----------------------------------------------------------------------------------------------- FIFO


@pytest.mark.parametrize("compression", list(PackCompression))
def test_fifo_packs_each_group_apart_with_a_content_deduplication_id(compression: PackCompression) -> None:
    mixed = [Item(ejson(n, svm=("svm-a", "svm-b")[n % 2]), ref=n) for n in range(8)]
    target = SqsTarget(FIFO_QUEUE, pack_bytes=64 * 1024, pack_compression=compression)
    got = entries(plan_batches(mixed, target))
    assert all(isinstance(e, Entry) for e in got)
    first, second = (e for e in got if isinstance(e, Entry))
    assert [i.ref for i in first.items] == [0, 2, 4, 6]
    assert [i.ref for i in second.items] == [1, 3, 5, 7]
    for entry, group in ((first, "svm-a"), (second, "svm-b")):
        array = b"[" + b",".join(i.event_json for i in entry.items) + b"]"
        assert entry.request["MessageGroupId"] == group
        assert entry.request["MessageDeduplicationId"] == hashlib.sha256(array).hexdigest()
    again = entries(plan_batches(mixed, target))
    assert [e.request for e in again if isinstance(e, Entry)] == [first.request, second.request]


def test_fifo_lone_event_keeps_its_event_id_as_deduplication_id() -> None:
    target = SqsTarget(FIFO_QUEUE, pack_bytes=64 * 1024)
    got = entries(plan_batches([Item(ejson(0, svm="svm-a")), Item(ejson(1, svm="svm-b"))], target))
    assert [e.request["MessageDeduplicationId"] for e in got if isinstance(e, Entry)] == [
        "6f1c2a9e-0000-5000-8000-000000000000",
        "6f1c2a9e-0000-5000-8000-000000000001",
    ]


# ------------------------------------------------------------------------------------ delivery, dead letter


async def test_a_rejected_packed_message_dead_letters_every_event_with_the_reason(tmp_path: Path) -> None:
    four = items(4)
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024)
    (batch,) = plan_batches(four, target)
    assert isinstance(batch, Batch)

    async def reject(sent: Batch) -> Outcome:
        return classify_sqs(
            {"Failed": [{"Id": "0", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "too big"}]},
            sent,
        )

    with DeadLetterWriter(tmp_path / "dead-letter.jsonl") as writer:
        report = await deliver(batch, reject, RetryPolicy(), random.Random(1), writer.for_sink(target.name))
    assert report.settled
    assert len(report.dead) == 1
    records = [orjson.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()]
    assert [r["event"] for r in records] == [orjson.loads(i.event_json) for i in four]
    assert [r["reason"] for r in records] == [
        f"InvalidParameterValue: too big (packed message, event {n} of 4)" for n in range(1, 5)
    ]
    assert {r["sink"] for r in records} == {target.name}


async def test_a_retried_packed_entry_is_resent_as_the_same_message() -> None:
    target = SqsTarget(QUEUE, pack_bytes=64 * 1024)
    (batch,) = plan_batches(items(6), target)
    assert isinstance(batch, Batch)
    sent: list[dict[str, Any]] = []

    async def flaky(attempt: Batch) -> Outcome:
        sent.extend(dict(e.request) for e in attempt.entries)
        if len(sent) == 1:
            return Outcome(retry=tuple((e, "InternalError") for e in attempt.entries))
        return Outcome(succeeded=attempt.entries)

    async def no_sleep(_: float) -> None:
        return None

    report = await deliver(batch, flaky, RetryPolicy(), random.Random(1), lambda i, r: None, sleep=no_sleep)
    assert report.settled
    assert len(sent) == 2
    assert sent[0] == sent[1]
    assert encode.items_of(report.delivered) == items(6)


def test_items_of_flattens_packed_entries() -> None:
    plan = plan_batches(items(5), SqsTarget(QUEUE, pack_bytes=64 * 1024))
    assert [i.ref for i in encode.items_of([e for e in entries(plan) if isinstance(e, Entry)])] == list(range(5))


# -------------------------------------------------------------------------------------------- decoder


def gzip_body(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1, wbits=16 + zlib.MAX_WBITS)).decode()


@pytest.mark.parametrize(
    ("body", "attrs", "message"),
    [
        ("[{}]", {"fpolicyd-format": "packed-v9", "fpolicyd-count": "1"}, "unknown fpolicyd-format"),
        ("[{}]", {"fpolicyd-format": "packed-v1", "fpolicyd-count": "1", "content-encoding": "br"}, "unknown content"),
        ("[{},{}]", {"fpolicyd-format": "packed-v1", "fpolicyd-count": "3"}, "holds 2 events"),
        ("[{}]", {"fpolicyd-format": "packed-v1"}, "says None"),
        ('{"a":1}', {"fpolicyd-format": "packed-v1", "fpolicyd-count": "1"}, "not an array"),
        ("[{", {"fpolicyd-format": "packed-v1", "fpolicyd-count": "1"}, "does not decode"),
        ("not base64!", {"fpolicyd-format": "packed-v1", "fpolicyd-count": "1", "content-encoding": "gzip"}, "decode"),
        (
            base64.b64encode(b"not gzip").decode(),
            {"fpolicyd-format": "packed-v1", "fpolicyd-count": "1", "content-encoding": "gzip"},
            "does not decode",
        ),
    ],
)
def test_decoder_refuses_what_is_not_a_packed_message(body: str, attrs: dict[str, str], message: str) -> None:
    with pytest.raises(PackedMessageError, match=message):
        decode_message(body, attrs)


def test_decoder_reads_all_three_forms() -> None:
    assert decode_message('{"a":1}', {"operation": "create"}) == [{"a": 1}]
    packed = {"fpolicyd-format": "packed-v1", "fpolicyd-count": "2"}
    assert decode_message('[{"a":1},{"b":2}]', packed) == [{"a": 1}, {"b": 2}]
    gzipped = {**packed, "content-encoding": "gzip"}
    assert decode_message(gzip_body(b'[{"a":1},{"b":2}]'), gzipped) == [{"a": 1}, {"b": 2}]


# --------------------------------------------------------------------------------------- target, settings


@pytest.mark.parametrize(
    "kwargs",
    [{"pack_bytes": -1}, {"pack_gzip_level": 0}, {"pack_gzip_level": 10}, {"pack_compression": "zstd"}],
)
def test_sqs_target_refuses_bad_pack_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SqsTarget(QUEUE, **kwargs)


def test_pack_limit_is_within_the_message_and_batch_limits() -> None:
    assert SqsTarget(QUEUE).packing is False
    assert SqsTarget(QUEUE, pack_bytes=300_000).pack_limit == 300_000
    assert SqsTarget(QUEUE, pack_bytes=300_000, max_message_bytes=262_144).pack_limit == 262_144
    assert SqsTarget(QUEUE, pack_bytes=300_000, max_batch_bytes=100_000).pack_limit == 100_000


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"sqs_pack_bytes": 1023}, "sqs_pack_bytes must be 0"),
        ({"sqs_pack_bytes": (1 << 20) + 1}, "sqs_pack_bytes"),
        ({"sqs_pack_bytes": 70_000, "sqs_max_batch_bytes": 65_536}, "sqs_max_batch_bytes"),
        ({"sqs_pack_compression": "zstd"}, "sqs_pack_compression"),
    ],
)
def test_settings_refuse_bad_pack_values(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings(overrides=overrides, search_default_paths=False)


def test_settings_reach_the_sqs_sender(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"sqs_pack_bytes": 262_144, "sqs_pack_compression": "none", "sinks": [f"sqs:{QUEUE}"]},
        search_default_paths=False,
    )
    (sender,) = build_senders(settings.sink_options(), AwsClients(), DeadLetterWriter(tmp_path / "dead.jsonl"))
    assert isinstance(sender, AwsSender)
    assert isinstance(sender.target, SqsTarget)
    assert (sender.target.pack_bytes, sender.target.pack_compression) == (262_144, PLAIN)
    assert (sender.max_records, sender.max_bytes) == (PACK_READ_RECORDS, PACK_READ_BYTES)
    default = load_settings(overrides={"sinks": [f"sqs:{QUEUE}"]}, search_default_paths=False)
    (plain,) = build_senders(default.sink_options(), AwsClients(), DeadLetterWriter(tmp_path / "dead.jsonl"))
    assert isinstance(plain, AwsSender)
    assert isinstance(plain.target, SqsTarget)
    assert (plain.target.pack_bytes, plain.max_records, plain.max_bytes) == (0, SINGLE_READ_RECORDS, 1 << 20)
    assert (plain.linger_records, sender.linger_records) == (10, PACK_READ_RECORDS)
    # Reads in flight: as many as requests without packing; a few big ones with it (memory).
    assert (plain.max_in_flight, sender.max_in_flight) == (default.sink_max_in_flight, PACK_READS_IN_FLIGHT)


# ------------------------------------------------------------------------------------------- the sender


class ScriptedSqs:
    """An SQS client that reports the queue's MaximumMessageSize and, for its first ``failing`` SendMessageBatch
    requests, answers the entries whose Id is in ``fail_ids`` with ``fail`` (a Failed[] record without Id);
    everything else succeeds. Keeps the very entry objects it was sent (``originals``)."""

    def __init__(
        self,
        max_message_bytes: int,
        *,
        failing: int = 0,
        fail: dict[str, Any] | None = None,
        fail_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.failing = failing
        self.fail = fail or {}
        self.fail_ids = fail_ids
        self.requests: list[list[dict[str, Any]]] = []
        self.originals: list[list[dict[str, Any]]] = []
        self.checks = 0
        self.unreachable = False

    async def get_queue_attributes(self, **kwargs: Any) -> dict[str, Any]:
        self.checks += 1
        if self.unreachable:
            raise OSError("connection refused")
        limit = str(self.max_message_bytes)
        fifo = "true" if str(kwargs.get("QueueUrl", "")).endswith(".fifo") else "false"
        return {"Attributes": {"QueueArn": "arn:q", "FifoQueue": fifo, "MaximumMessageSize": limit}}

    async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.originals.append(list(kwargs["Entries"]))
        batch = [dict(e) for e in kwargs["Entries"]]
        self.requests.append(batch)
        failing = len(self.requests) <= self.failing
        failed = [e for e in batch if failing and e["Id"] in self.fail_ids]
        return {
            "Successful": [{"Id": e["Id"], "MessageId": "m"} for e in batch if e not in failed],
            "Failed": [{"Id": e["Id"], **self.fail} for e in failed],
        }


class ScriptedClients(AwsClients):
    def __init__(self, sqs: ScriptedSqs) -> None:
        super().__init__()
        self.scripted = sqs

    async def sqs(self) -> Any:
        return self.scripted

    async def sqs_data(self) -> Any:
        """SendMessageBatch goes through the data-path client (sinks/aws/transport.py): the same script."""
        return self.scripted


def sender(tmp_path: Path, client: ScriptedSqs, **target: Any) -> AwsSender:
    made = AwsSender(
        SqsTarget(QUEUE, **target),
        ScriptedClients(client),
        DeadLetterWriter(tmp_path / "dead-letter.jsonl"),
        max_in_flight=1,
        retry=RetryPolicy(base_s=0.001, cap_s=0.001),
        linger_s=0,
    )
    return made


def records(count: int) -> list[Record]:
    return [Record(seq, ejson(seq)) for seq in range(count)]


async def test_sender_fits_the_pack_limit_to_the_queue(tmp_path: Path) -> None:
    client = ScriptedSqs(2048)
    made = sender(tmp_path, client, pack_bytes=65_536, pack_compression=PLAIN)
    await made.start()
    assert isinstance(made.target, SqsTarget)
    assert made.target.pack_bytes == 2048
    assert await made.send(records(12)) == []
    sent = [e for request in client.requests for e in request]
    assert all(sqs_entry_size(e) <= 2048 for e in sent)
    assert sum(int(e["MessageAttributes"]["fpolicyd-count"]["StringValue"]) for e in sent) == 12


async def test_sender_checks_the_queue_before_packing_when_start_could_not(tmp_path: Path) -> None:
    client = ScriptedSqs(2048)
    client.unreachable = True
    made = sender(tmp_path, client, pack_bytes=65_536, pack_compression=PLAIN)
    with pytest.raises(SinkError) as failed:
        await made.start()
    assert failed.value.retriable
    with pytest.raises(SinkError):  # still unreachable: nothing is sent, the worker keeps the records
        await made.send(records(3))
    assert client.requests == []
    client.unreachable = False
    assert await made.send(records(12)) == []
    assert isinstance(made.target, SqsTarget)
    assert made.target.pack_bytes == 2048
    assert client.checks == 3
    assert all(sqs_entry_size(e) <= 2048 for request in client.requests for e in request)


class SlowSqs(ScriptedSqs):
    """Answers every SendMessageBatch after a short wait, counting the requests in flight at once."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.active = 0
        self.peak = 0

    async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.01)
            return await super().send_message_batch(**kwargs)
        finally:
            self.active -= 1


@pytest.mark.parametrize(("queue", "max_in_flight", "peak"), [(QUEUE, 2, 2), (QUEUE, 8, 4), (FIFO_QUEUE, 8, 1)])
async def test_a_reads_batches_go_out_together_within_the_request_limit(
    tmp_path: Path, queue: str, max_in_flight: int, peak: int
) -> None:
    """A read of 40 events is four requests: on a standard queue they are in flight together, never more than
    ``sink_max_in_flight`` of them; on a FIFO queue one after another."""
    client = SlowSqs()
    made = AwsSender(
        SqsTarget(queue),
        ScriptedClients(client),
        DeadLetterWriter(tmp_path / "dead-letter.jsonl"),
        max_in_flight=max_in_flight,
        retry=RetryPolicy(base_s=0.001, cap_s=0.001),
        linger_s=0,
    )
    await made.start()
    assert await made.send(records(40)) == []
    assert len(client.requests) == 4
    assert client.peak == peak
    assert sorted(orjson.loads(e["MessageBody"])["file_size"] for r in client.requests for e in r) == list(range(40))


@pytest.mark.parametrize("fifo", [True, False])
async def test_a_fifo_send_stops_at_the_first_unsettled_batch(tmp_path: Path, fifo: bool) -> None:
    """A read of 25 events is three requests. When the first leaves an entry unsettled (KmsDisabled: the sink is
    unusable), a FIFO queue gets nothing more from this read — a later message of the entry's group would overtake
    it — and every unsent record goes back to the worker, in order; a standard queue gets the other two requests."""
    kms = {"SenderFault": True, "Code": "KmsDisabled", "Message": "off"}
    client = ScriptedSqs(1 << 20, failing=1, fail=kms, fail_ids=frozenset({"1"}))
    made = AwsSender(
        SqsTarget(FIFO_QUEUE if fifo else QUEUE),
        ScriptedClients(client),
        DeadLetterWriter(tmp_path / "dead-letter.jsonl"),
        max_in_flight=1,
        retry=RetryPolicy(base_s=0.001, cap_s=0.001),
        linger_s=0,
    )
    await made.start()
    pending = await made.send(records(25))
    if fifo:
        assert len(client.requests) == 1
        assert [r.seq for r in pending] == [1, *range(10, 25)]
    else:
        assert len(client.requests) == 3
        assert [r.seq for r in pending] == [1]


async def test_unsettled_packed_messages_go_out_again_unchanged(tmp_path: Path) -> None:
    # KmsDisabled: the sink is unusable, so the send stops and hands those messages' records back to the worker;
    # the worker's next send of exactly those records must send the very same messages, not pack them anew.
    kms = {"SenderFault": True, "Code": "KmsDisabled", "Message": "off"}
    client = ScriptedSqs(1 << 20, failing=1, fail=kms, fail_ids=frozenset({"1", "2"}))
    made = sender(tmp_path, client, pack_bytes=1024)
    await made.start()
    pending = await made.send(records(300))
    first = client.originals[0]
    assert len(first) > 3
    sent_before = len(client.originals)
    unsettled = [e for e in first if e["Id"] in ("1", "2")]
    assert made.last_error is not None
    assert not made.last_error.retriable
    counts = [int(e["MessageAttributes"]["fpolicyd-count"]["StringValue"]) for e in first]
    assert [r.seq for r in pending] == list(range(counts[0], sum(counts[:3])))
    assert await made.send(pending) == []
    (second,) = client.originals[sent_before:]
    assert len(second) == 2
    assert all(again is before for again, before in zip(second, unsettled, strict=True))
    assert made.dead_lettered == 0
