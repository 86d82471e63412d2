"""Differential property test of the SQS entry encoder against the plain reading of its rules.

``fpolicyd.sinks.aws.encode._encode_sqs`` takes shortcuts on the hot path (printable-ASCII attribute values skip
the character filter, sizes are added as attributes are set, a list of route names is joined without
conversions). The reference below is the encoder as first written, rule by rule; for any event object both must
give the same entry and the same size, for standard and FIFO queues.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.sinks.aws.encode import _encode_sqs, _Fields, _group_id, _sqs_body
from fpolicyd.sinks.aws.targets import SqsTarget

_SQS_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_GROUP_ID_OK = re.compile(r"[!-~]{1,128}")


def _field(event: Mapping[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _text(value: Any) -> str:
    if value is None or isinstance(value, bool | dict | list):
        return ""
    return str(value)


def _attribute(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": _SQS_INVALID.sub("\ufffd", value)}


def _attributes_size(attributes: Mapping[str, Mapping[str, Any]]) -> int:
    size = 0
    for name, value in attributes.items():
        size += len(name.encode("utf-8")) + len(str(value.get("DataType", "")).encode("utf-8"))
        if "StringValue" in value:
            size += len(str(value["StringValue"]).encode("utf-8"))
    return size


def reference_encode_sqs(
    target: SqsTarget, event_json: bytes, event: Mapping[str, Any], entry_id: str
) -> tuple[dict[str, Any], int]:
    body, size = _sqs_body(event_json.decode("utf-8"), len(event_json))
    attributes: dict[str, dict[str, str]] = {}
    operation = _text(event.get("operation_type"))
    if operation:
        attributes["operation"] = _attribute(operation)
    svm = _text(event.get("svm_name"))
    if svm:
        attributes["svm"] = _attribute(svm)
    routes = _field(event, "metadata.routes")
    if isinstance(routes, list | tuple):
        joined = ",".join(str(r) for r in routes if r is not None and str(r))
        if joined:
            attributes["routes"] = _attribute(joined)
    entry: dict[str, Any] = {"Id": entry_id, "MessageBody": body}
    if attributes:
        entry["MessageAttributes"] = attributes
        size += _attributes_size(attributes)
    if target.fifo:
        entry["MessageGroupId"] = _group_id(event, target.group_id_field)
        event_id = _text(event.get("event_id"))
        entry["MessageDeduplicationId"] = (
            event_id if _GROUP_ID_OK.fullmatch(event_id) else hashlib.sha256(event_json).hexdigest()
        )
    return entry, size


# Every character JSON can carry (no lone surrogates: orjson refuses them), with the ones the encoder treats
# specially drawn often: controls SQS refuses, tab/newline/CR it allows, DEL, the noncharacters U+FFFE/U+FFFF.
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from("\x00\x01\x1f\t\n\r\x7f \ufffe\uffff\ufffdé日,"),
    max_size=20,
)
integer = st.integers(-(2**63), 2**64 - 1)  # the JSON numbers orjson reads and writes as integers
scalar = st.none() | st.booleans() | integer | st.floats(allow_nan=False, allow_infinity=False) | text
value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6
)
routes = st.lists(text | st.none() | integer | st.booleans(), max_size=4) | value


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for key in ("event_id", "operation_type", "svm_name", "file_path"):
        if draw(st.booleans()):
            event[key] = draw(text if key != "event_id" else (text | value))
    for key in ("operation_type", "svm_name"):
        if key in event and draw(st.integers(0, 3)) == 0:
            event[key] = draw(value)
    if draw(st.booleans()):
        event["metadata"] = draw(st.fixed_dictionaries({}, optional={"routes": routes, "node": text}) | value)
    return event


@settings(max_examples=400)
@given(event=events(), fifo=st.booleans())
def test_encode_sqs_matches_the_reference(event: dict[str, Any], fifo: bool) -> None:
    target = SqsTarget("https://sqs.eu-west-1.amazonaws.com/123456789012/q" + (".fifo" if fifo else ""))
    event_json = orjson.dumps(event)
    parsed = orjson.loads(event_json)
    fields = _Fields.of(event_json, parsed)
    expected = reference_encode_sqs(target, event_json, parsed, "3")
    assert _encode_sqs(target, event_json, fields, "3", event=parsed) == expected
    assert _encode_sqs(target, event_json, fields, "3", fifo=fifo, event=parsed) == expected
    assert _encode_sqs(target, event_json, fields, "3", fifo=fifo) == expected  # a FIFO queue parses by itself
