"""The lean AWS client's fast paths against botocore, their reference (no network here).

- ``encode_body`` (orjson) produces the same JSON value as botocore's serializer for every SendMessageBatch /
  PutEvents request fpolicyd's encoders can build, datetimes included;
- the signer (botocore's SigV4Auth on a plain-dict request) writes byte-identical X-Amz-Date,
  X-Amz-Security-Token and Authorization headers to stock ``SigV4Auth`` on an ``AWSRequest``;
- MD5OfMessageBody mismatches move exactly the affected entries to ``Failed``, retriable.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import botocore.auth
import botocore.session
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import ParamValidationError
from botocore.serialize import create_serializer
from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.sinks.aws.classify import classify_sqs
from fpolicyd.sinks.aws.encode import Batch, Item, plan_batches
from fpolicyd.sinks.aws.targets import EventBridgeTarget, SqsTarget
from fpolicyd.sinks.aws.transport import MD5_MISMATCH, _check_md5, _SigningRequest, _SigV4Auth, encode_body

SESSION = botocore.session.get_session()
SQS_BATCH = SESSION.get_service_model("sqs").operation_model("SendMessageBatch")
PUT_EVENTS = SESSION.get_service_model("events").operation_model("PutEvents")
SERIALIZER = create_serializer("json", include_validation=False)

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("\ufffe\uffffé"))
times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.sampled_from([UTC, None])
) | st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(2200, 1, 1)).map(
    lambda d: d.replace(tzinfo=timezone(timedelta(hours=-5)))
)


@st.composite
def event_jsons(draw: st.DrawFn) -> bytes:
    event: dict[str, Any] = {
        "event_id": draw(st.uuids()).hex,
        "operation_type": draw(st.sampled_from(["create", "write", "", "rename"])),
        "file_path": "/" + draw(text),
        "svm_name": draw(text),
        "timestamp": draw(st.sampled_from(["2024-05-01T10:00:00.000001Z", "2024-05-01T10:00:00Z", "bad"])),
        "file_size": draw(st.integers(min_value=0, max_value=2**62)),
        "metadata": {
            "routes": draw(st.lists(text, max_size=3)),
            "ratio": draw(st.floats(allow_nan=False, allow_infinity=False)),
        },
    }
    return orjson.dumps(event)


def botocore_body(params: dict[str, Any], model: Any) -> Any:
    return json.loads(SERIALIZER.serialize_to_request(params, model)["body"])


@settings(max_examples=150)
@given(st.lists(event_jsons(), min_size=1, max_size=10), st.booleans())
def test_sqs_body_is_botocores(events: list[bytes], fifo: bool) -> None:
    target = SqsTarget("https://sqs.eu-west-1.amazonaws.com/123456789012/q" + (".fifo" if fifo else ""))
    plan = plan_batches([Item(e) for e in events], target)
    for batch in plan:
        assert isinstance(batch, Batch)
        params = {"QueueUrl": target.queue_url, "Entries": [e.request for e in batch.entries]}
        assert orjson.loads(encode_body(params)) == botocore_body(params, SQS_BATCH)


@settings(max_examples=150)
@given(st.lists(event_jsons(), min_size=1, max_size=10), st.booleans())
def test_eventbridge_body_is_botocores(events: list[bytes], use_time: bool) -> None:
    target = EventBridgeTarget("bus", use_event_time=use_time)
    for batch in plan_batches([Item(e) for e in events], target):
        assert isinstance(batch, Batch)
        params = {"Entries": [e.request for e in batch.entries]}
        assert orjson.loads(encode_body(params)) == botocore_body(params, PUT_EVENTS)


@given(st.lists(times, min_size=1, max_size=10))
def test_timestamps_are_botocores(values: list[datetime]) -> None:
    params = {"Entries": [{"Time": v, "Source": "s", "DetailType": "d", "Detail": "{}"} for v in values]}
    mine = orjson.loads(encode_body(params))
    theirs = botocore_body(params, PUT_EVENTS)
    assert mine == theirs
    assert [type(e["Time"]) for e in mine["Entries"]] == [type(e["Time"]) for e in theirs["Entries"]]


def test_none_members_are_botocores_and_other_types_refused() -> None:
    params = {"Entries": [{"Source": "s", "DetailType": None, "Detail": "{}", "Resources": ["a"]}]}
    assert orjson.loads(encode_body(params)) == botocore_body(params, PUT_EVENTS)
    with pytest.raises(ParamValidationError):
        encode_body({"Entries": [{"Source": b"bytes"}]})


# -------------------------------------------------------------------------------------------- signing

hosts = st.sampled_from(
    [
        "https://sqs.us-east-1.amazonaws.com/",
        "https://events.eu-west-1.amazonaws.com/",
        "http://127.0.0.1:4566/",
        "http://localhost:8080/some/prefix/",
        "https://vpce-1234.sqs.eu-west-1.vpce.amazonaws.com/",
        "http://[::1]:9000/",
    ]
)
header_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.just(" "), max_size=30)


@settings(max_examples=200)
@given(
    url=hosts,
    extra=st.dictionaries(
        st.sampled_from(["X-Amz-Target", "Content-Type", "x-amzn-query-mode", "X-Extra"]), header_value
    ),
    body=st.binary(max_size=2000),
    token=st.none() | st.text(alphabet="abcdefXYZ0123456789/+=", min_size=1, max_size=40),
    region=st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2"]),
    service=st.sampled_from(["sqs", "events"]),
    secret=st.text(alphabet="abcdefXYZ0123456789/+", min_size=1, max_size=40),
    when=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
)
def test_signature_is_byte_identical_to_botocores(
    *,
    url: str,
    extra: dict[str, str],
    body: bytes,
    token: str | None,
    region: str,
    service: str,
    secret: str,
    when: datetime,
) -> None:
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", secret, token)
    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: when  # one clock for both signers
    try:
        stock = AWSRequest(method="POST", url=url, headers=dict(extra), data=body)
        SigV4Auth(credentials, service, region).add_auth(stock)
        # The lean client puts Host in the request itself, computed once by botocore from the same URL.
        host = SigV4Auth(None, service, region).headers_to_sign(AWSRequest(method="POST", url=url))["host"]
        lean = _SigningRequest(url, {"Host": host, **extra}, body)
        _SigV4Auth(credentials, service, region).add_auth(lean)
    finally:
        botocore.auth.get_current_datetime = original
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        assert lean.headers.get(name) == stock.headers.get(name), name


# ------------------------------------------------------------------------------------------------ MD5


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def test_md5_mismatch_fails_only_that_entry_retriably() -> None:
    target = SqsTarget("https://sqs.eu-west-1.amazonaws.com/123456789012/q")
    events = [orjson.dumps({"event_id": str(n), "file_path": f"/é/{n}"}) for n in range(4)]
    (batch,) = plan_batches([Item(e, ref=n) for n, e in enumerate(events)], target)
    assert isinstance(batch, Batch)
    entries = [e.request for e in batch.entries]
    response: dict[str, Any] = {
        "Successful": [
            {"Id": e["Id"], "MessageId": f"m{i}", "MD5OfMessageBody": md5(e["MessageBody"]) if i != 2 else "0" * 32}
            for i, e in enumerate(entries)
        ],
        "Failed": [],
        "ResponseMetadata": {"RequestId": "r"},
    }
    checked = _check_md5(response, entries)
    assert [ok["Id"] for ok in checked["Successful"]] == ["0", "1", "3"]
    assert [(f["Id"], f["Code"], f["SenderFault"]) for f in checked["Failed"]] == [("2", MD5_MISMATCH, False)]
    outcome = classify_sqs(checked, batch)
    assert [e.item.ref for e in outcome.succeeded] == [0, 1, 3]
    assert [e.item.ref for e, _ in outcome.retry] == [2]
    # All good: the response comes back as it was.
    good = {"Successful": [{"Id": "0", "MD5OfMessageBody": md5(entries[0]["MessageBody"])}], "ResponseMetadata": {}}
    assert _check_md5(dict(good), entries[:1]) == good
