"""Long paths (``path_max_chars``): cut by characters to a schema-valid head + marker + tail, flagged and hashed iff
cut, the full path's hash in the marker and ``metadata``; the event id always that of the full path; kept whole
when the setting is 0. The C accelerator's side is in ``tests/property/test_speedups.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fpolicyd.events import (
    CORE_OPERATIONS,
    KNOWN_REQ_TYPES,
    PATH_HASH_HEX_CHARS,
    PATH_MAX_CHARS_MIN,
    PATH_TAIL_CHARS,
    REFERENCE_PATH_MAX_CHARS,
    EventBuilder,
    NameMaps,
    load_event_schema,
    load_reference_schema,
    normalize,
    path_sha256,
    truncate_path,
)
from fpolicyd.pipeline.dedup_window import key_of_digest, key_of_event_id
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import PathName, ProtCommonInfo, ScreenRequest
from fpolicyd.protocol.xml_fast import fields_of

_FORMATS = jsonschema.FormatChecker()
EVENT_VALIDATOR = jsonschema.Draft202012Validator(load_event_schema(), format_checker=_FORMATS)
REFERENCE_VALIDATOR = jsonschema.Draft7Validator(load_reference_schema(), format_checker=_FORMATS)

PROPS = settings(max_examples=200, deadline=None, database=None)
RECEIVED_US = 1_707_492_600_123_456
CTX = SessionContext("7e3cc08e-d2d3-11ee-9d6a-00a0b8a6e4f1", "p", "s-1", "1.2", "10.0.0.1:40000")
MARKER = re.compile(r"…\[sha256:([0-9a-f]{16})\]…")

# Any Unicode scalar value (decoded paths never hold lone surrogates): ASCII, BMP, astral (one code point, two
# UTF-16 units, four UTF-8 bytes), combining marks, separators.
any_char = st.characters(exclude_categories=["Cs"])
chunk = st.one_of(
    st.text(any_char, min_size=1, max_size=12),
    st.sampled_from(["a", "/", "日本語", "\U0001f600", "e\u0301", "\U0010fffd", "…[sha256:0123456789abcdef]…"]),
)


@st.composite
def long_text(draw: st.DrawFn, max_reps: int = 900) -> str:
    """Text from a few characters to ~10,000: a random start, a repeated chunk, a random end (cheap to draw)."""
    return (
        draw(st.text(any_char, max_size=20))
        + draw(chunk) * draw(st.integers(0, max_reps))
        + draw(st.text(any_char, max_size=300))
    )


paths = long_text().map(lambda t: "/" + t)
bounds = st.one_of(
    st.sampled_from([PATH_MAX_CHARS_MIN, REFERENCE_PATH_MAX_CHARS]), st.integers(PATH_MAX_CHARS_MIN, 6000)
)


@PROPS
@given(path=paths, bound=bounds)
@example(path="/" + "a" * 6006, bound=REFERENCE_PATH_MAX_CHARS)
@example(path="/" + "\U0001f600" * 4096, bound=REFERENCE_PATH_MAX_CHARS)
@example(path="/" + "a" * (REFERENCE_PATH_MAX_CHARS - 1), bound=REFERENCE_PATH_MAX_CHARS)
@example(path="/" + "a" * REFERENCE_PATH_MAX_CHARS, bound=REFERENCE_PATH_MAX_CHARS)
def test_truncate_path(path: str, bound: int) -> None:
    out = truncate_path(path, bound)
    assert truncate_path(path, 0) == path
    if len(path) <= bound:
        assert out == path
        return
    assert len(out) == bound  # characters (code points), what JSON Schema's maxLength counts
    head = bound - len("…[sha256:]…") - PATH_HASH_HEX_CHARS - PATH_TAIL_CHARS
    assert out[:head] == path[:head]
    assert out[-PATH_TAIL_CHARS:] == path[-PATH_TAIL_CHARS:]
    marker = MARKER.fullmatch(out[head:-PATH_TAIL_CHARS])
    assert marker is not None
    assert marker.group(1) == hashlib.sha256(path.encode()).hexdigest()[:PATH_HASH_HEX_CHARS] == path_sha256(path)[:16]
    assert out.startswith("/")
    out.encode("utf-8")  # whole code points: never a lone surrogate or a split sequence
    assert truncate_path(out, bound) == out  # idempotent: a cut path is at the bound


@pytest.mark.parametrize("bound", [1, PATH_MAX_CHARS_MIN - 1])
def test_a_bound_below_the_minimum_is_refused(bound: int) -> None:
    with pytest.raises(ValueError, match="path_max_chars"):
        truncate_path("/" + "a" * 600, bound)
    with pytest.raises(ValueError, match="path_max_chars"):
        EventBuilder(CTX, NameMaps(), path_max_chars=bound)


def request(req_type: str, source: str | None, target: str | None, *, unix: bool) -> ScreenRequest:
    kind = "UNIX_NAME" if unix else "WIN_NAME"

    def names(path: str | None) -> tuple[PathName, ...]:
        return () if path is None else (PathName(kind, path if unix else path.replace("/", "\\")),)

    return ScreenRequest(
        req_id=7,
        req_type=req_type,
        op_element="SmbRenReq",
        common=ProtCommonInfo(
            client_ip="10.0.0.9",
            generation_time=1_707_492_600_000_001,
            access_paths=names(source),
            vol_msid=2157674396,
            file_size=10,
        ),
        target_paths=names(target),
    )


requests = st.builds(
    request,
    req_type=st.sampled_from(sorted(KNOWN_REQ_TYPES)),
    source=st.none() | paths,
    target=st.none() | paths,
    unix=st.booleans(),
)


def check_cut(event: dict[str, Any], whole: dict[str, Any], bound: int) -> None:
    """``event`` (built with ``bound``) against ``whole`` (the same request with paths kept whole)."""
    metadata = event["metadata"]
    cut = {name for name in ("file_path", "previous_path") if len(whole.get(name) or "") > bound}
    assert ("path_truncated" in metadata) == bool(cut)
    assert ("truncated_paths" in metadata) == bool(cut)
    if cut:
        assert metadata["path_truncated"] is True
        assert set(metadata["truncated_paths"]) == cut
    for name in ("file_path", "previous_path"):
        if name not in whole:
            assert name not in event
            continue
        full, got = whole[name], event[name]
        assert got == truncate_path(full, bound)
        if name in cut:
            assert metadata["truncated_paths"][name] == {"chars": len(full), "sha256": path_sha256(full)}
            assert MARKER.search(got) is not None
            assert full.startswith(got[: bound - 27 - PATH_TAIL_CHARS])
        else:
            assert got == full
    # Everything else is the whole-path event's, the event id included (made of the full paths).
    rest = {k: v for k, v in event.items() if k not in ("file_path", "previous_path", "metadata")}
    assert rest == {k: v for k, v in whole.items() if k not in ("file_path", "previous_path", "metadata")}
    other = {k: v for k, v in metadata.items() if k not in ("path_truncated", "truncated_paths")}
    assert other == whole["metadata"]


@PROPS
@given(req=requests, bound=bounds)
def test_events_are_cut_valid_flagged_and_keep_the_full_paths_id(req: ScreenRequest, bound: int) -> None:
    whole = orjson.loads(normalize(req, CTX, NameMaps(), RECEIVED_US).to_json())
    cut = normalize(req, CTX, NameMaps(), RECEIVED_US, path_max_chars=bound)
    event = orjson.loads(cut.to_json())
    check_cut(event, whole, bound)
    EVENT_VALIDATOR.validate(event)
    EVENT_VALIDATOR.validate(whole)
    if bound <= REFERENCE_PATH_MAX_CHARS and event["operation_type"] in CORE_OPERATIONS:
        REFERENCE_VALIDATOR.validate(event)
    # The hot-path builder makes the same bytes, and its digest is the full path's key.
    built, digest = EventBuilder(CTX, NameMaps(), path_max_chars=bound).build(fields_of(req), RECEIVED_US)
    assert orjson.dumps(built) == cut.to_json()
    assert key_of_digest(digest) == key_of_event_id(whole["event_id"])


rooted = paths.filter(lambda p: p[1:2] != "/")


@PROPS
@given(req_type=st.sampled_from(sorted(KNOWN_REQ_TYPES)), source=st.none() | rooted, target=st.none() | rooted)
def test_with_the_setting_off_paths_are_kept_whole(req_type: str, source: str | None, target: str | None) -> None:
    req = request(req_type, source, target, unix=True)
    event = normalize(req, CTX, NameMaps(), RECEIVED_US)
    if target is not None:
        assert (event.file_path, event.previous_path) == (target, source or "/")
    else:
        assert event.file_path == (source or "/")
    assert "path_truncated" not in event.metadata
    assert "truncated_paths" not in event.metadata
    EVENT_VALIDATOR.validate(orjson.loads(event.to_json()))
    built, _ = EventBuilder(CTX, NameMaps()).build(fields_of(req), RECEIVED_US)
    assert orjson.dumps(built) == event.to_json()


@PROPS
@given(
    head=st.builds(lambda c, n: c * (REFERENCE_PATH_MAX_CHARS // len(c) + 1 + n), chunk, st.integers(0, 50)),
    ends=st.lists(st.text(any_char, min_size=1, max_size=5), min_size=2, max_size=2, unique=True),
)
def test_long_paths_sharing_a_head_never_share_an_id_or_a_cut_path(head: str, ends: list[str]) -> None:
    """Two different long paths with the same first 4096 characters (and even the same last 255): different ids,
    different dedup keys and different cut paths (the marker's hash)."""
    tail = "x" * PATH_TAIL_CHARS
    first, second = (
        normalize(
            request("NFS_WR", "/d" + head + end + tail, None, unix=True),
            CTX,
            NameMaps(),
            RECEIVED_US,
            path_max_chars=REFERENCE_PATH_MAX_CHARS,
        )
        for end in ends
    )
    assert first.event_id != second.event_id
    assert first.file_path != second.file_path
    assert first.file_path[:3000] == second.file_path[:3000]
    for event in (first, second):
        REFERENCE_VALIDATOR.validate(orjson.loads(event.to_json()))


def test_a_rename_without_target_cuts_both_fields_alike() -> None:
    long = "/" + "d/" * 3000 + "report.pdf"
    event = normalize(request("SMB_REN", long, None, unix=True), CTX, NameMaps(), RECEIVED_US, path_max_chars=4096)
    assert event.file_path == event.previous_path == truncate_path(long, 4096)
    assert event.file_path.endswith("/report.pdf")  # suffix routes (.pdf) still match
    assert event.metadata["target_missing"] is True
    assert set(event.metadata["truncated_paths"]) == {"file_path", "previous_path"}


def test_a_short_path_is_untouched_with_the_setting_on() -> None:
    req = request("NFS_WR", "/a/b.txt", None, unix=True)
    assert dataclasses.asdict(normalize(req, CTX, NameMaps(), RECEIVED_US, path_max_chars=512)) == dataclasses.asdict(
        normalize(req, CTX, NameMaps(), RECEIVED_US)
    )
