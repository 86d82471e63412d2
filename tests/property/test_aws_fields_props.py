"""Differential property test of the AWS sinks' fast read of an event (``encode._read_fields``, a typed msgspec
decoder) against the reference: orjson's whole parse (``_load_event``) and ``_Fields.of``.

For every document orjson reads as an object, both give the same text and members; for everything orjson
refuses, the fast path refuses too (a ``ValueError``, so the event is set aside exactly as before), with the
one documented exception of a number beyond a double's range, which orjson refuses and the fast path skips
when no member it reads holds it. The validity check of gzip-packed events (``encode._check_event``) reads no
member: it accepts exactly what ``_read_fields`` accepts, and also such a number in the members it reads.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fpolicyd.sinks.aws.encode import _check_event, _Fields, _load_event, _read_fields

MEMBERS = ("operation_type", "svm_name", "timestamp", "metadata", "event_id", "file_path")

text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('\x00\x1f"\\/\ufffe\uffffé日,'),
    max_size=12,
)
integer = st.integers(-(2**63), 2**64 - 1)
scalar = st.none() | st.booleans() | integer | st.floats(allow_nan=False, allow_infinity=False) | text
value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6
)
# A member as fpolicyd writes it (text), or anything else JSON can hold there.
member_value = text | value
routes = st.lists(text, max_size=3) | value
metadata_value = st.fixed_dictionaries({}, optional={"routes": routes, "node": text}) | value
# Number spellings orjson and msgspec may read differently: big integers, exponents, negative zero.
odd_number = st.sampled_from(
    ["123456789012345678901234567890", "-9223372036854775809", "18446744073709551616", "1E5", "-0", "-0.0e-400",
     "1e-400", "1.5e300", "0.1", "1e308"]
)  # fmt: skip
space = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


def reference(event_json: bytes) -> _Fields:
    return _Fields.of(event_json, _load_event(event_json))


def outcome(read: Any, event_json: bytes) -> tuple[str, Any]:
    try:
        return "ok", read(event_json)
    except ValueError:
        return "refused", None


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """JSON text of an object written member by member: any order, repeated members, odd spacing and numbers."""
    names = draw(st.lists(st.sampled_from(MEMBERS) | text, max_size=7))
    parts = []
    for name in names:
        if name == "metadata":
            rendered = orjson.dumps(draw(metadata_value)).decode()
        elif draw(st.integers(0, 5)) == 0:
            rendered = draw(odd_number)
        else:
            rendered = orjson.dumps(draw(member_value)).decode()
        parts.append(draw(space) + orjson.dumps(name).decode() + draw(space) + ":" + draw(space) + rendered)
    return (draw(space) + "{" + ",".join(parts) + draw(space) + "}" + draw(space)).encode()


@settings(max_examples=600)
@given(event=st.dictionaries(st.sampled_from(MEMBERS) | text, member_value, max_size=6))
def test_an_event_as_orjson_writes_it_reads_the_same(event: dict[str, Any]) -> None:
    event_json = orjson.dumps(event)
    assert _read_fields(event_json) == reference(event_json)


@settings(max_examples=600)
@given(event_json=documents())
@example(b'{"operation_type":"a","operation_type":"b"}')
@example(b'{"metadata":{"routes":["a"]},"metadata":null}')
@example(b'{"operation_type":"\\u0000","svm_name":"a\\/b","timestamp":"\\ud83d\\ude00"}')
def test_any_object_text_reads_the_same(event_json: bytes) -> None:
    assert outcome(_read_fields, event_json) == outcome(reference, event_json)
    if not _out_of_range(event_json):
        assert outcome(_check_event, event_json)[0] == outcome(reference, event_json)[0]


def _out_of_range(event_json: bytes) -> bool:
    """Whether the document is JSON by RFC 8259's grammar with a number beyond a double's range (Python's json
    module reads those as infinity; orjson refuses them)."""
    found = False

    def number(literal: str) -> float:
        nonlocal found
        result = float(literal)
        found = found or math.isinf(result)
        return result

    def constant(literal: str) -> None:
        raise ValueError(literal)  # NaN, Infinity: not JSON

    try:
        json.loads(event_json, parse_float=number, parse_int=number, parse_constant=constant)
    except (ValueError, RecursionError):
        return False
    return found


def mutations(base: bytes) -> st.SearchStrategy[bytes]:
    def mutate(args: tuple[int, int, bytes]) -> bytes:
        at, cut, insert = args
        at %= len(base) + 1
        return base[:at] + insert + base[at + cut :]

    return st.tuples(st.integers(0, 10**6), st.integers(0, 8), st.binary(max_size=6)).map(mutate)


EVENT = orjson.dumps(
    {
        "event_id": "6efbceec-bb3c-5fb9-b6e6-21e8deabc1bd",
        "operation_type": "rename",
        "file_path": "/𝔘𝔫𝔦𝔠𝔬𝔡𝔢.docx",
        "svm_name": "svm1",
        "timestamp": "2023-11-14T22:13:20.000845Z",
        "file_size": 457277,
        "metadata": {"req_type": "SMB_REN", "routes": ["legal-compliance", "education-research"], "is_dir": False},
    }
)


@settings(max_examples=1500)
@given(event_json=st.binary(max_size=64) | mutations(EVENT) | documents().flatmap(mutations))
@example(b'{"file_size":1e400,"operation_type":"create"}')
@example(b'\xef\xbb\xbf{"operation_type":"create"}')
@example(b'{"file_path":"\xff","operation_type":"create"}')
@example(b'{"file_path":"\xed\xa0\x80"}')
@example(b'{"file_path":"\\ud800"}')
@example(b"[1]")
def test_arbitrary_bytes_are_refused_as_orjson_refuses_them(event_json: bytes) -> None:
    fast = outcome(_read_fields, event_json)
    expected = outcome(reference, event_json)
    if expected[0] == "refused" and fast[0] == "ok":
        # The one documented difference: a number beyond a double's range in a member the sinks do not read.
        assert _out_of_range(event_json), event_json
        parsed = json.loads(event_json)
        assert fast[1] == _Fields.of(event_json, parsed)
    else:
        assert fast == expected
    checked = outcome(_check_event, event_json)[0]
    if checked != fast[0]:
        # The same difference, in any member: the check reads none.
        assert (checked, fast[0], expected[0]) == ("ok", "refused", "refused"), event_json
        assert _out_of_range(event_json), event_json


def test_a_number_out_of_range_in_a_member_no_sink_reads_is_sent_as_stored() -> None:
    event_json = b'{"operation_type":"create","file_size":1e400}'
    with pytest.raises(orjson.JSONDecodeError):
        _load_event(event_json)
    assert _read_fields(event_json) == _Fields(event_json.decode(), "create", None, None, None)
    # ... but not in a member it reads: orjson decides there.
    with pytest.raises(orjson.JSONDecodeError):
        _read_fields(b'{"operation_type":1e400}')
    # The gzip packer's check reads no member: there too.
    _check_event(b'{"operation_type":1e400}')


@pytest.mark.parametrize("depth", [900, 1024, 1025, 5000])
def test_deep_nesting_is_decided_by_orjson(depth: int) -> None:
    event_json = b'{"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b',"svm_name":"s"}'
    assert outcome(_read_fields, event_json) == outcome(reference, event_json)
    assert outcome(_check_event, event_json)[0] == outcome(reference, event_json)[0]
