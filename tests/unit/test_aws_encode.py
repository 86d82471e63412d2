"""Unit tests for the pure AWS parts: encoders, sizes, batch planning, response and exception classification,
the delivery loop (fake send, fake clock) and the dead-letter file."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from botocore import exceptions as bx

from fpolicyd.errors import SinkError
from fpolicyd.events import FileEvent
from fpolicyd.sinks.aws.classify import (
    ErrorKind,
    Outcome,
    classify_eventbridge,
    classify_exception,
    classify_sqs,
    error_kind,
)
from fpolicyd.sinks.aws.deliver import deliver
from fpolicyd.sinks.aws.encode import (
    Batch,
    Entry,
    Item,
    Oversize,
    encode_eventbridge_entry,
    encode_sqs_entry,
    eventbridge_entry_size,
    items_of,
    plan_batches,
    sqs_entry_size,
)
from fpolicyd.sinks.aws.sender import AWS_RETRY
from fpolicyd.sinks.aws.targets import AwsTarget, EventBridgeTarget, SqsTarget
from fpolicyd.sinks.dead_letter import DeadLetterWriter
from fpolicyd.sinks.retry import RetryPolicy

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/fpolicy-events"
FIFO_QUEUE = QUEUE + ".fifo"


def event(n: int = 0, **overrides: Any) -> FileEvent:
    fields: dict[str, Any] = {
        "event_id": f"6f1c2a9e-0000-5000-8000-{n:012d}",
        "operation_type": "create",
        "file_path": f"/legal/report-{n}.pdf",
        "previous_path": None,
        "volume_name": "vol1",
        "svm_name": "svm-a",
        "timestamp": "2024-05-01T10:00:00.123456Z",
        "file_size": 42,
        "client_ip": "10.0.0.5",
        "metadata": {"vs_uuid": "a1b2c3d4-0000-1111-2222-333344445555", "routes": ["UC1", "UC16"]},
    }
    fields.update(overrides)
    return FileEvent(**fields)


def ejson(n: int = 0, **overrides: Any) -> bytes:
    return event(n, **overrides).to_json()


def sqs_attr(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


# --------------------------------------------------------------------------------------------- SQS encode


def test_sqs_entry_standard_exact_shape() -> None:
    body = ejson()
    assert encode_sqs_entry(SqsTarget(QUEUE), body, "7") == {
        "Id": "7",
        "MessageBody": body.decode(),
        "MessageAttributes": {
            "operation": sqs_attr("create"),
            "svm": sqs_attr("svm-a"),
            "routes": sqs_attr("UC1,UC16"),
        },
    }


def test_sqs_body_is_the_event_json_exactly() -> None:
    body = ejson(file_path="/données/résumé — ü.pdf")
    entry = encode_sqs_entry(SqsTarget(QUEUE), body, "0")
    assert entry["MessageBody"].encode() == body


def test_sqs_routes_attribute_omitted_when_empty() -> None:
    entry = encode_sqs_entry(SqsTarget(QUEUE), ejson(metadata={"routes": []}), "0")
    assert set(entry["MessageAttributes"]) == {"operation", "svm"}
    entry = encode_sqs_entry(SqsTarget(QUEUE), ejson(metadata={}), "0")
    assert set(entry["MessageAttributes"]) == {"operation", "svm"}


def test_sqs_empty_attribute_values_are_omitted() -> None:
    body = orjson.dumps({"event_id": "e1", "operation_type": "", "svm_name": "", "metadata": {"routes": [""]}})
    entry = encode_sqs_entry(SqsTarget(QUEUE), body, "0")
    assert "MessageAttributes" not in entry
    assert sqs_entry_size(entry) == len(body)


def test_sqs_standard_queue_has_no_fifo_fields() -> None:
    entry = encode_sqs_entry(SqsTarget(QUEUE), ejson(), "0")
    assert "MessageGroupId" not in entry
    assert "MessageDeduplicationId" not in entry
    assert not SqsTarget(QUEUE).fifo


def test_sqs_fifo_group_from_svm_and_dedup_from_event_id() -> None:
    target = SqsTarget(FIFO_QUEUE)
    assert target.fifo
    entry = encode_sqs_entry(target, ejson(3), "0")
    assert entry["MessageGroupId"] == "svm-a"
    assert entry["MessageDeduplicationId"] == event(3).event_id


def test_sqs_fifo_group_from_dotted_path() -> None:
    target = SqsTarget(FIFO_QUEUE, group_id_field="metadata.vs_uuid")
    assert encode_sqs_entry(target, ejson(), "0")["MessageGroupId"] == "a1b2c3d4-0000-1111-2222-333344445555"
    target = SqsTarget(FIFO_QUEUE, group_id_field="volume_name")
    assert encode_sqs_entry(target, ejson(), "0")["MessageGroupId"] == "vol1"


@pytest.mark.parametrize("missing", ["metadata.nope", "nope", "metadata.routes", "file_size.x"])
def test_sqs_fifo_group_falls_back_to_svm_name(missing: str) -> None:
    target = SqsTarget(FIFO_QUEUE, group_id_field=missing)
    assert encode_sqs_entry(target, ejson(), "0")["MessageGroupId"] == "svm-a"


def test_sqs_fifo_group_number_is_text() -> None:
    target = SqsTarget(FIFO_QUEUE, group_id_field="file_size")
    assert encode_sqs_entry(target, ejson(), "0")["MessageGroupId"] == "42"


def test_sqs_fifo_invalid_group_value_is_hashed_stably() -> None:
    target = SqsTarget(FIFO_QUEUE)
    first = encode_sqs_entry(target, ejson(1, svm_name="svm with spaces é"), "0")["MessageGroupId"]
    second = encode_sqs_entry(target, ejson(2, svm_name="svm with spaces é"), "0")["MessageGroupId"]
    other = encode_sqs_entry(target, ejson(3, svm_name="other svm"), "0")["MessageGroupId"]
    assert first == second != other
    assert first.startswith("sha256-")
    assert len(first) <= 128
    long_name = encode_sqs_entry(target, ejson(svm_name="s" * 129), "0")["MessageGroupId"]
    assert long_name.startswith("sha256-")


def test_sqs_fifo_without_event_id_dedups_on_content() -> None:
    body = orjson.dumps({"operation_type": "write", "svm_name": "svm-a"})
    entry = encode_sqs_entry(SqsTarget(FIFO_QUEUE), body, "0")
    assert len(entry["MessageDeduplicationId"]) == 64


def test_sqs_body_escapes_noncharacters_sqs_refuses() -> None:
    body = ejson(file_path="/a\ufffeb\uffff.txt")
    entry = encode_sqs_entry(SqsTarget(QUEUE), body, "0")
    assert "\ufffe" not in entry["MessageBody"]
    assert "\uffff" not in entry["MessageBody"]
    assert "\\ufffe" in entry["MessageBody"]
    assert orjson.loads(entry["MessageBody"]) == orjson.loads(body)
    (batch,) = plan_batches([Item(body)], SqsTarget(QUEUE))
    assert isinstance(batch, Batch)
    assert batch.entries[0].size == sqs_entry_size(entry)


def test_sqs_attribute_values_lose_characters_sqs_refuses() -> None:
    entry = encode_sqs_entry(SqsTarget(QUEUE), ejson(svm_name="svm\ufffe1"), "0")
    assert entry["MessageAttributes"]["svm"]["StringValue"] == "svm\ufffd1"


def test_sqs_size_counts_body_and_attribute_names_types_values() -> None:
    body = ejson(svm_name="sv\u00e9")  # é is 2 bytes in UTF-8
    entry = encode_sqs_entry(SqsTarget(QUEUE), body, "0")
    attributes = (
        len("operation") + len("String") + len("create")
        + len("svm") + len("String") + len("své".encode())
        + len("routes") + len("String") + len("UC1,UC16")
    )  # fmt: skip
    assert sqs_entry_size(entry) == len(body) + attributes


def test_encode_refuses_non_objects() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        encode_sqs_entry(SqsTarget(QUEUE), b"[1, 2]", "0")
    with pytest.raises(ValueError):  # noqa: PT011 -- orjson's own message
        encode_eventbridge_entry(EventBridgeTarget("bus"), b"{not json")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_url": ""},
        {"queue_url": QUEUE, "group_id_field": ""},
        {"queue_url": QUEUE, "group_id_field": "metadata..x"},
        {"queue_url": QUEUE, "max_batch_bytes": 0},
        {"queue_url": QUEUE, "max_message_bytes": -1},
        {"queue_url": QUEUE, "max_entries": 11},
        {"queue_url": QUEUE, "max_entries": 0},
    ],
)
def test_sqs_target_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each names its own field
        SqsTarget(**kwargs)


# --------------------------------------------------------------------------------------- EventBridge encode


def test_eventbridge_entry_exact_shape() -> None:
    body = ejson()
    assert encode_eventbridge_entry(EventBridgeTarget("fsxn-fpolicy-events"), body) == {
        "Time": datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC),
        "Source": "fsxn.fpolicy",
        "DetailType": "FPolicy File Operation",
        "Detail": body.decode(),
        "EventBusName": "fsxn-fpolicy-events",
        "Resources": [],
    }


def test_eventbridge_source_and_detail_type_configurable() -> None:
    target = EventBridgeTarget("arn:aws:events:us-east-1:123456789012:event-bus/b", source="acme.fs", detail_type="X")
    entry = encode_eventbridge_entry(target, ejson())
    assert (entry["Source"], entry["DetailType"], entry["EventBusName"]) == ("acme.fs", "X", target.bus_name)


@pytest.mark.parametrize("stamp", ["yesterday", "2024-05-01T10:00:00", 17, None])
def test_eventbridge_time_omitted_when_timestamp_unusable(stamp: object) -> None:
    body = orjson.dumps({"event_id": "e", "timestamp": stamp})
    entry = encode_eventbridge_entry(EventBridgeTarget("bus"), body)
    assert "Time" not in entry
    assert eventbridge_entry_size(entry) == len("fsxn.fpolicy") + len("FPolicy File Operation") + len(body)


def test_eventbridge_time_can_be_turned_off() -> None:
    assert "Time" not in encode_eventbridge_entry(EventBridgeTarget("bus", use_event_time=False), ejson())


def test_eventbridge_time_with_offset_becomes_utc() -> None:
    body = orjson.dumps({"timestamp": "2024-05-01T19:00:00+09:00"})
    assert encode_eventbridge_entry(EventBridgeTarget("bus"), body)["Time"] == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_eventbridge_size_rule() -> None:
    body = ejson(file_path="/ü/日本.pdf")
    target = EventBridgeTarget("bus", source="src.ü", detail_type="Détail")
    entry = encode_eventbridge_entry(target, body)
    expected = 14 + len("src.ü".encode()) + len("Détail".encode()) + len(body)
    assert eventbridge_entry_size(entry) == expected
    assert eventbridge_entry_size({**entry, "Resources": ["arn:x", "é"]}) == expected + 5 + 2
    (batch,) = plan_batches([Item(body)], target)
    assert isinstance(batch, Batch)
    assert batch.entries[0].size == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bus_name": ""},
        {"bus_name": "b", "source": ""},
        {"bus_name": "b", "source": "aws.fsx"},
        {"bus_name": "b", "source": "s" * 257},
        {"bus_name": "b", "detail_type": ""},
        {"bus_name": "b", "detail_type": "d" * 129},
        {"bus_name": "b", "max_entry_bytes": 0},
        {"bus_name": "b", "max_entries": 12},
    ],
)
def test_eventbridge_target_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each names its own field
        EventBridgeTarget(**kwargs)


def test_default_limits() -> None:
    assert (SqsTarget(QUEUE).max_batch_bytes, SqsTarget(QUEUE).entry_limit) == (1 << 20, 1 << 20)
    target = EventBridgeTarget("b")
    assert (target.max_batch_bytes, target.entry_limit, target.max_entries) == (1 << 20, 256 << 10, 10)
    assert EventBridgeTarget("b", max_batch_bytes=1000).entry_limit == 1000


# ------------------------------------------------------------------------------------------ planning


def items(count: int, **overrides: Any) -> list[Item]:
    return [Item(ejson(n, **overrides), ref=n) for n in range(count)]


def batches_only(plan: list[Batch | Oversize]) -> list[Batch]:
    out = [p for p in plan if isinstance(p, Batch)]
    assert len(out) == len(plan)
    return out


def test_plan_empty() -> None:
    assert plan_batches([], SqsTarget(QUEUE)) == []


@pytest.mark.parametrize("target", [SqsTarget(QUEUE), EventBridgeTarget("bus")])
def test_plan_ten_entries_per_batch(target: AwsTarget) -> None:
    plan = batches_only(plan_batches(items(25), target))
    assert [len(b) for b in plan] == [10, 10, 5]
    assert [e.item.ref for b in plan for e in b.entries] == list(range(25))


def test_plan_sqs_ids_are_batch_positions() -> None:
    plan = batches_only(plan_batches(items(12), SqsTarget(QUEUE)))
    assert [[e.request["Id"] for e in b.entries] for b in plan] == [[str(i) for i in range(10)], ["0", "1"]]


def test_plan_byte_limit() -> None:
    one = sqs_entry_size(encode_sqs_entry(SqsTarget(QUEUE), ejson(0), "0"))
    target = SqsTarget(QUEUE, max_batch_bytes=3 * one)
    plan = batches_only(plan_batches(items(7), target))
    assert [len(b) for b in plan] == [3, 3, 1]
    assert all(b.size <= 3 * one for b in plan)
    # One byte less and only two fit.
    plan = batches_only(plan_batches(items(7), SqsTarget(QUEUE, max_batch_bytes=3 * one - 1)))
    assert [len(b) for b in plan] == [2, 2, 2, 1]


def test_plan_max_entries_configurable() -> None:
    plan = batches_only(plan_batches(items(5), EventBridgeTarget("bus", max_entries=2)))
    assert [len(b) for b in plan] == [2, 2, 1]


def test_plan_entry_exactly_at_limit_is_sent() -> None:
    body = ejson()
    size = eventbridge_entry_size(encode_eventbridge_entry(EventBridgeTarget("bus"), body))
    (batch,) = plan_batches([Item(body)], EventBridgeTarget("bus", max_entry_bytes=size))
    assert isinstance(batch, Batch)
    (over,) = plan_batches([Item(body)], EventBridgeTarget("bus", max_entry_bytes=size - 1))
    assert isinstance(over, Oversize)
    assert over.size == size
    assert f"{size} bytes" in over.reason


def test_plan_oversize_in_place_and_batches_around_it() -> None:
    big = Item(ejson(99, file_path="/" + "x" * 300_000), ref="big")
    plan = plan_batches([*items(3), big, *items(2)], EventBridgeTarget("bus"))
    assert [type(p).__name__ for p in plan] == ["Batch", "Oversize", "Batch"]
    assert isinstance(plan[1], Oversize)
    assert plan[1].item is big
    assert "262144-byte limit of eventbridge:bus" in plan[1].reason


def test_plan_sqs_oversize_by_attributes() -> None:
    body = ejson()
    entry = encode_sqs_entry(SqsTarget(QUEUE), body, "0")
    # The body alone fits; body plus attributes does not.
    (over,) = plan_batches([Item(body)], SqsTarget(QUEUE, max_message_bytes=len(body) + 1))
    assert isinstance(over, Oversize)
    assert over.size == sqs_entry_size(entry)


def test_plan_non_json_item_is_set_aside() -> None:
    good = items(2)
    plan = plan_batches([good[0], Item(b"\xff garbage", ref="bad"), good[1]], SqsTarget(QUEUE))
    assert [type(p).__name__ for p in plan] == ["Batch", "Oversize", "Batch"]
    assert isinstance(plan[1], Oversize)
    assert plan[1].reason.startswith("not an event JSON object")


def test_plan_repeated_event_gets_distinct_ids() -> None:
    body = ejson()
    (batch,) = plan_batches([Item(body), Item(body)], SqsTarget(FIFO_QUEUE))
    assert isinstance(batch, Batch)
    assert [e.request["Id"] for e in batch.entries] == ["0", "1"]


# ------------------------------------------------------------------------------------- classification


def sqs_batch(count: int, target: SqsTarget | None = None) -> Batch:
    (batch,) = plan_batches(items(count), target or SqsTarget(QUEUE))
    assert isinstance(batch, Batch)
    return batch


def eb_batch(count: int) -> Batch:
    (batch,) = plan_batches(items(count), EventBridgeTarget("bus"))
    assert isinstance(batch, Batch)
    return batch


def refs(entries: tuple[Entry, ...] | tuple[tuple[Entry, str], ...]) -> list[object]:
    return [(e[0] if isinstance(e, tuple) else e).item.ref for e in entries]


def test_classify_sqs_every_branch() -> None:
    batch = sqs_batch(7)
    response = {
        "Successful": [{"Id": "0", "MessageId": "m0"}, {"Id": "4", "MessageId": "m4"}, {"Id": "zz", "MessageId": "?"}],
        "Failed": [
            {"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "try again"},
            {"Id": "2", "SenderFault": True, "Code": "InvalidMessageContents", "Message": "bad char"},
            {"Id": "3", "SenderFault": True, "Code": "KmsThrottled", "Message": "slow down"},
            {"Id": "4", "SenderFault": True, "Code": "InvalidMessageContents", "Message": "ignored: also succeeded"},
            {"Id": "5", "SenderFault": True, "Code": "KmsDisabled", "Message": "key disabled"},
            {"Id": "nope", "SenderFault": True, "Code": "X"},
        ],
    }
    outcome = classify_sqs(response, batch)
    assert refs(outcome.succeeded) == [0, 4]
    assert refs(outcome.retry) == [1, 3, 6]
    assert [r for _, r in outcome.retry] == [
        "InternalError: try again",
        "KmsThrottled: slow down",
        "missing from the SendMessageBatch response",
    ]
    assert [(e.item.ref, r) for e, r in outcome.dead] == [(2, "InvalidMessageContents: bad char")]
    assert [(e.item.ref, r) for e, r in outcome.blocked] == [(5, "KmsDisabled: key disabled")]


def test_classify_sqs_sender_fault_default_and_query_prefix() -> None:
    batch = sqs_batch(2)
    response = {
        "Failed": [
            {"Id": "0", "Code": "ServiceUnavailable"},  # SenderFault absent: the service's fault
            {"Id": "1", "SenderFault": True, "Code": "AWS.SimpleQueueService.NonExistentQueue", "Message": "gone"},
        ]
    }
    outcome = classify_sqs(response, batch)
    assert refs(outcome.retry) == [0]
    assert [(e.item.ref, r) for e, r in outcome.blocked] == [(1, "NonExistentQueue: gone")]


def test_classify_sqs_all_successful() -> None:
    batch = sqs_batch(3)
    outcome = classify_sqs({"Successful": [{"Id": str(i)} for i in range(3)], "Failed": []}, batch)
    assert outcome == Outcome(succeeded=batch.entries)


def test_classify_eventbridge_every_branch() -> None:
    batch = eb_batch(6)
    response = {
        "FailedEntryCount": 4,
        "Entries": [
            {"EventId": "e0"},
            {"ErrorCode": "InternalFailure", "ErrorMessage": "oops"},
            {"ErrorCode": "ThrottlingException"},
            {"ErrorCode": "MalformedDetail", "ErrorMessage": "Detail is malformed."},
            {"ErrorCode": "NotAuthorizedForSourceException", "ErrorMessage": "no"},
            {},
        ],
    }
    outcome = classify_eventbridge(response, batch)
    assert refs(outcome.succeeded) == [0]
    assert [(e.item.ref, r) for e, r in outcome.retry] == [
        (1, "InternalFailure: oops"),
        (2, "ThrottlingException"),
        (5, "neither EventId nor ErrorCode in the PutEvents response"),
    ]
    assert [(e.item.ref, r) for e, r in outcome.dead] == [(3, "MalformedDetail: Detail is malformed.")]
    assert [(e.item.ref, r) for e, r in outcome.blocked] == [(4, "NotAuthorizedForSourceException: no")]


def test_classify_eventbridge_misaligned_response_retries_everything() -> None:
    batch = eb_batch(3)
    outcome = classify_eventbridge({"Entries": [{"EventId": "a"}]}, batch)
    assert refs(outcome.retry) == [0, 1, 2]
    assert outcome.succeeded == ()
    assert outcome.dead == outcome.blocked == ()


@pytest.mark.parametrize("code", ["InvalidArgument", "RedactionFailure", "SomethingNew"])
def test_classify_eventbridge_other_codes_are_dead(code: str) -> None:
    outcome = classify_eventbridge({"Entries": [{"ErrorCode": code}]}, eb_batch(1))
    assert refs(outcome.dead) == [0]


def client_error(code: str, status: int, message: str = "m") -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (client_error("ThrottlingException", 400), ErrorKind.RETRY),
        (client_error("Throttling", 400), ErrorKind.RETRY),
        (client_error("RequestThrottled", 403), ErrorKind.RETRY),
        (client_error("AWS.SimpleQueueService.RequestThrottled", 403), ErrorKind.RETRY),
        (client_error("KmsThrottled", 400), ErrorKind.RETRY),
        (client_error("SomethingBroke", 500), ErrorKind.RETRY),
        (client_error("ServiceUnavailable", 503), ErrorKind.RETRY),
        (client_error("Whatever", 429), ErrorKind.RETRY),
        (client_error("ExpiredToken", 400), ErrorKind.RETRY),
        (client_error("AccessDenied", 403), ErrorKind.SINK),
        (client_error("AccessDeniedException", 400), ErrorKind.SINK),
        (client_error("AWS.SimpleQueueService.NonExistentQueue", 400), ErrorKind.SINK),
        (client_error("QueueDoesNotExist", 400), ErrorKind.SINK),
        (client_error("ResourceNotFoundException", 400), ErrorKind.SINK),
        (client_error("UnrecognizedClientException", 400), ErrorKind.SINK),
        (client_error("Unknown403", 403), ErrorKind.SINK),
        (client_error("ValidationException", 400), ErrorKind.REQUEST),
        (client_error("InvalidParameterValue", 400), ErrorKind.REQUEST),
        (client_error("AWS.SimpleQueueService.BatchRequestTooLong", 400), ErrorKind.REQUEST),
        (bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ErrorKind.RETRY),
        (bx.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), ErrorKind.RETRY),
        (bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), ErrorKind.RETRY),
        (bx.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), ErrorKind.RETRY),
        (bx.HTTPClientError(error="reset"), ErrorKind.RETRY),
        (bx.CredentialRetrievalError(provider="ecs", error_msg="timeout"), ErrorKind.RETRY),
        (aiohttp.ServerDisconnectedError(), ErrorKind.RETRY),
        (TimeoutError(), ErrorKind.RETRY),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ErrorKind.RETRY),
        (OSError(errno.ENETUNREACH, "unreachable"), ErrorKind.RETRY),
        (bx.NoCredentialsError(), ErrorKind.SINK),
        (bx.NoRegionError(), ErrorKind.SINK),
        (bx.ParamValidationError(report="bad"), ErrorKind.REQUEST),
        (ValueError("a bug"), ErrorKind.SINK),
    ],
    ids=lambda v: v.value if isinstance(v, ErrorKind) else type(v).__name__,
)
def test_error_kind(exc: BaseException, kind: ErrorKind) -> None:
    assert error_kind(exc) is kind
    assert classify_exception(exc) is (kind is ErrorKind.RETRY)


# ---------------------------------------------------------------------------------------------- deliver


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


Send = Callable[[Batch], Awaitable[Outcome]]


def scripted(*steps: Callable[[Batch], Outcome]) -> tuple[Send, list[list[object]]]:
    """A send that answers call i with steps[i] (the last one repeats); records each request's refs."""
    seen: list[list[object]] = []

    async def send(batch: Batch) -> Outcome:
        seen.append([e.item.ref for e in batch.entries])
        step = steps[min(len(seen) - 1, len(steps) - 1)]
        return step(batch)

    return send, seen


def all_ok(batch: Batch) -> Outcome:
    return Outcome(succeeded=batch.entries)


def raising(exc: BaseException) -> Callable[[Batch], Outcome]:
    def step(batch: Batch) -> Outcome:
        raise exc

    return step


class DeadLetters:
    def __init__(self) -> None:
        self.records: list[tuple[object, str]] = []

    def __call__(self, item: Item, reason: str) -> None:
        self.records.append((item.ref, reason))


POLICY = RetryPolicy(base_s=0.1, cap_s=20.0)


async def test_deliver_everything_first_time() -> None:
    batch = sqs_batch(5)
    send, seen = scripted(all_ok)
    clock = FakeClock()
    report = await deliver(batch, send, POLICY, random.Random(1), DeadLetters(), clock=clock, sleep=clock.sleep)
    assert refs(report.delivered) == [0, 1, 2, 3, 4]
    assert report.settled
    assert (report.requests, report.retried_entries, report.error) == (1, 0, None)
    assert seen == [[0, 1, 2, 3, 4]]
    assert clock.sleeps == []


async def test_deliver_retries_only_failed_entries_and_dead_letters_rejects() -> None:
    batch = sqs_batch(6)

    def first(b: Batch) -> Outcome:
        e = b.entries
        return Outcome(
            succeeded=(e[0], e[3], e[5]),
            retry=((e[1], "InternalError"), (e[4], "InternalError")),
            dead=((e[2], "InvalidMessageContents: bad"),),
        )

    send, seen = scripted(first, all_ok)
    dead = DeadLetters()
    clock = FakeClock()
    report = await deliver(batch, send, POLICY, random.Random(1), dead, clock=clock, sleep=clock.sleep)
    assert seen == [[0, 1, 2, 3, 4, 5], [1, 4]]
    assert sorted(refs(report.delivered)) == [0, 1, 3, 4, 5]  # type: ignore[type-var]
    assert dead.records == [(2, "InvalidMessageContents: bad")]
    assert [(e.item.ref, r) for e, r in report.dead] == [(2, "InvalidMessageContents: bad")]
    assert (report.requests, report.retried_entries, report.pending, report.error) == (2, 2, (), None)
    assert len(clock.sleeps) == 1
    assert 0 <= clock.sleeps[0] <= 0.1


async def test_deliver_backoff_is_capped_full_jitter() -> None:
    batch = sqs_batch(2)
    throttled = raising(client_error("ThrottlingException", 400))
    send, seen = scripted(*([throttled] * 8), all_ok)
    clock = FakeClock()
    report = await deliver(
        batch, send, RetryPolicy(0.1, 1.0), random.Random(7), DeadLetters(), clock=clock, sleep=clock.sleep
    )
    assert report.settled
    assert len(seen) == 9
    assert len(clock.sleeps) == 8
    for n, delay in enumerate(clock.sleeps):
        assert 0 <= delay <= min(1.0, 0.1 * 2**n)


async def test_deliver_request_error_isolates_the_culprit() -> None:
    batch = sqs_batch(4)

    async def send(b: Batch) -> Outcome:
        if any(e.item.ref == 2 for e in b.entries):
            raise client_error("InvalidParameterValue", 400, "Message must be shorter than 1024 bytes.")
        return Outcome(succeeded=b.entries)

    dead = DeadLetters()
    clock = FakeClock()
    report = await deliver(batch, send, POLICY, random.Random(1), dead, clock=clock, sleep=clock.sleep)
    assert refs(report.delivered) == [0, 1, 3]
    assert dead.records == [(2, "InvalidParameterValue: Message must be shorter than 1024 bytes. (HTTP 400)")]
    assert report.requests == 5  # the batch, then one request per entry
    assert report.settled
    assert clock.sleeps == []


async def test_deliver_blocked_entries_stop_and_stay_pending() -> None:
    batch = sqs_batch(4)

    def first(b: Batch) -> Outcome:
        e = b.entries
        return Outcome(
            succeeded=(e[0],),
            retry=((e[1], "InternalError"),),
            blocked=((e[2], "KmsDisabled: off"), (e[3], "KmsDisabled: off")),
        )

    send, seen = scripted(first, all_ok)
    dead = DeadLetters()
    report = await deliver(batch, send, POLICY, random.Random(1), dead)
    assert len(seen) == 1
    assert refs(report.delivered) == [0]
    assert sorted(refs(report.pending)) == [1, 2, 3]  # type: ignore[type-var]
    assert dead.records == []
    assert report.error is not None
    assert not report.error.retriable
    assert "KmsDisabled" in str(report.error)


async def test_deliver_sink_error_keeps_everything() -> None:
    batch = sqs_batch(3)
    send, _ = scripted(raising(client_error("AccessDenied", 403)))
    dead = DeadLetters()
    report = await deliver(batch, send, POLICY, random.Random(1), dead)
    assert refs(report.pending) == [0, 1, 2]
    assert dead.records == []
    assert report.error is not None
    assert not report.error.retriable


async def test_deliver_unexpected_exception_keeps_everything() -> None:
    send, _ = scripted(raising(KeyError("bug")))
    report = await deliver(sqs_batch(2), send, POLICY, random.Random(1), DeadLetters())
    assert refs(report.pending) == [0, 1]
    assert report.error is not None
    assert not report.error.retriable


async def test_deliver_deadline_returns_pending_never_drops() -> None:
    batch = sqs_batch(3)
    send, seen = scripted(raising(bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")))
    clock = FakeClock()
    report = await deliver(
        batch, send, POLICY, random.Random(3), DeadLetters(), deadline=clock.now + 5.0, clock=clock, sleep=clock.sleep
    )
    assert refs(report.pending) == [0, 1, 2]
    assert report.delivered == ()
    assert report.dead == ()
    assert report.error is not None
    assert report.error.retriable
    assert len(seen) >= 3
    assert clock.now <= 1005.0  # never slept past the deadline
    assert report.requests == len(seen)


async def test_deliver_deadline_already_passed_sends_nothing() -> None:
    send, seen = scripted(all_ok)
    clock = FakeClock()
    report = await deliver(sqs_batch(2), send, POLICY, random.Random(1), DeadLetters(), deadline=clock.now, clock=clock)
    assert seen == []
    assert refs(report.pending) == [0, 1]
    assert report.error is not None
    assert report.error.retriable


async def test_deliver_keeps_entry_when_dead_letter_fails() -> None:
    batch = sqs_batch(2)

    def first(b: Batch) -> Outcome:
        return Outcome(succeeded=(b.entries[0],), dead=((b.entries[1], "InvalidMessageContents"),))

    def broken(item: Item, reason: str) -> None:
        raise SinkError("disk full", retriable=True)

    send, _ = scripted(first)
    report = await deliver(batch, send, POLICY, random.Random(1), broken)
    assert refs(report.delivered) == [0]
    assert refs(report.pending) == [1]
    assert report.dead == ()
    assert report.error is not None
    assert "dead-letter write failed" in str(report.error)


def test_items_of() -> None:
    batch = sqs_batch(2)
    assert items_of(batch.entries) == [e.item for e in batch.entries]


def test_aws_retry_policy() -> None:
    assert isinstance(AWS_RETRY, RetryPolicy)
    assert (AWS_RETRY.base_s, AWS_RETRY.cap_s) == (0.1, 20.0)


# ------------------------------------------------------------------------------------------ dead letter


def test_dead_letter_records(tmp_path: Path) -> None:
    path = tmp_path / "dlq" / "dead-letter.jsonl"
    body = ejson(1)
    with DeadLetterWriter(path, clock=lambda: 1714557600.5) as writer:
        writer.write(body, sink="sqs:q", reason="InvalidMessageContents: bad")
        writer.for_sink("eventbridge:b")(Item(b"\x00not json"), "not an event JSON object")
        assert writer.written == 2
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert list(first) == ["time", "sink", "reason", "event"]
    assert first == {
        "time": "2024-05-01T10:00:00.500000Z",
        "sink": "sqs:q",
        "reason": "InvalidMessageContents: bad",
        "event": orjson.loads(body),
    }
    second = orjson.loads(lines[1])
    assert second["sink"] == "eventbridge:b"
    assert second["event_raw_b64"] == "AG5vdCBqc29u"
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 in (0o040, 0o000)


def test_dead_letter_appends_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    for n in range(3):
        with DeadLetterWriter(path) as writer:
            writer.write(ejson(n), sink="s", reason=f"r{n}")
    assert [orjson.loads(line)["reason"] for line in path.read_bytes().splitlines()] == ["r0", "r1", "r2"]


def test_dead_letter_fsyncs_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    writer = DeadLetterWriter(tmp_path / "d.jsonl").open()
    writer.write(ejson(), sink="s", reason="r")
    assert synced == []
    writer.close()
    assert len(synced) == 1
    writer.close()  # idempotent
    with pytest.raises(SinkError, match="not open"):
        writer.write(ejson(), sink="s", reason="r")


def test_dead_letter_failed_write_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.jsonl"
    writer = DeadLetterWriter(path).open()
    writer.write(ejson(0), sink="s", reason="ok")
    before = path.read_bytes()
    real_write = os.write
    calls = 0

    def half_then_enospc(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)  # briefly, for the whole process
    with pytest.raises(SinkError) as info:
        writer.write(ejson(1), sink="s", reason="lost?")
    assert info.value.retriable
    assert path.read_bytes() == before
    assert writer.written == 1
    monkeypatch.undo()
    writer.write(ejson(2), sink="s", reason="after")
    writer.close()
    assert [orjson.loads(x)["reason"] for x in path.read_bytes().splitlines()] == ["ok", "after"]
