"""normalize() on generated notifications: total, schema-valid, and event_id a function of the identity only."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import jsonschema
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fpolicyd.events import (
    CORE_OPERATIONS,
    KNOWN_REQ_TYPES,
    MAX_EPOCH_US,
    MIN_PLAUSIBLE_GENERATION_US,
    EventBuilder,
    NameMaps,
    load_event_schema,
    load_reference_schema,
    normalize,
)
from fpolicyd.pipeline.dedup_window import key_of_digest, key_of_event_id
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import PathName, ProtCommonInfo, ScreenRequest, UserContext
from fpolicyd.protocol.xml_fast import fields_of
from support.event_ids import recompute_event_id

_FORMATS = jsonschema.FormatChecker()
EVENT_VALIDATOR = jsonschema.Draft202012Validator(load_event_schema(), format_checker=_FORMATS)
REFERENCE_VALIDATOR = jsonschema.Draft7Validator(load_reference_schema(), format_checker=_FORMATS)

PROPS = settings(max_examples=200, deadline=None, database=None)

u64 = st.integers(0, 2**64 - 1)
# Any Unicode scalar value (codec output is always valid Unicode: no lone surrogates).
any_char = st.characters(exclude_categories=["Cs"])
text = st.text(any_char, max_size=24)
segment = st.sampled_from([" ", "a b", "&", "&amp;", "<x>", '"', "'", "\U0001f600", "日本語", "..", "."]) | st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/\\"), min_size=1, max_size=10
)
unix_path = st.tuples(st.sampled_from(["", "/", "//"]), st.lists(segment, max_size=5)).map(
    lambda t: t[0] + "/".join(t[1])
)
win_path = st.lists(segment, max_size=5).map(lambda s: "\\" + "\\".join(s))
path_names = st.lists(
    st.one_of(
        st.builds(PathName, type=st.just("UNIX_NAME"), name=unix_path),
        st.builds(PathName, type=st.sampled_from(["WIN_NAME", "WIN_8_3_NAME"]), name=win_path),
        st.builds(PathName, type=st.sampled_from(["UNIX_NAME", "WIN_NAME", "FUTURE_NAME"]), name=text),
    ),
    max_size=3,
).map(tuple)
req_types = (
    st.sampled_from(sorted(KNOWN_REQ_TYPES)) | st.from_regex(r"[A-Z0-9]{1,5}_[A-Z_]{1,12}", fullmatch=True) | text
)
generation_times = st.none() | u64 | st.integers(MIN_PLAUSIBLE_GENERATION_US, MAX_EPOCH_US - 1)
users = st.none() | st.builds(
    UserContext,
    kind=st.sampled_from(["UnixUid", "WinSid", "MappedId", "Future"]),
    uid=st.none() | u64,
    sid=st.none() | st.from_regex(r"S-1-5(-[0-9]{1,10}){1,5}", fullmatch=True),
)
fields = st.lists(st.tuples(st.from_regex(r"[A-Za-z]{1,12}(/[A-Za-z]{1,8})?", fullmatch=True), text), max_size=3).map(
    tuple
)

commons = st.builds(
    ProtCommonInfo,
    client_ip=st.none() | st.just("") | st.ip_addresses().map(str),
    generation_time=generation_times,
    usr_id_type=st.none() | st.sampled_from(["UNIX_ONLY", "WIN_ONLY", "MAPPED_ID"]),
    usr_context=users,
    file_owner=users,
    access_paths=path_names,
    vol_msid=st.none() | u64,
    file_size=st.none() | u64,
    num_hard_lnk=st.none() | st.integers(0, 2**32 - 1),
    is_offline=st.none() | st.booleans(),
    file_type=st.none() | st.sampled_from(["FILE", "DIR", "STREAM", "SYMLINK", "OTHER"]),
    extra=fields,
)
requests = st.builds(
    ScreenRequest,
    req_id=u64,
    req_type=req_types,
    op_element=st.just("SmbOpenReq"),
    common=commons,
    display_path=st.none() | text,
    prot_ver=st.none() | st.tuples(st.integers(0, 9), st.integers(0, 9)),
    user_gids=st.lists(st.from_regex(r"[0-9]{1,6}", fullmatch=True), max_size=3).map(tuple),
    target_paths=path_names,
    op_fields=fields,
)
contexts = st.builds(
    SessionContext,
    vs_uuid=st.uuids().map(str) | text,
    policy_name=text,
    session_id=st.uuids().map(str) | text,
    protocol_version=st.sampled_from(["1.0", "1.1", "1.2", "2.0"]),
    peer=st.just("10.0.0.1:40000"),
)
volume_name = st.text(any_char, min_size=0, max_size=40)
name_maps = st.builds(
    NameMaps,
    volumes=st.dictionaries(u64, volume_name, max_size=3),
    svms=st.dictionaries(st.uuids().map(str), volume_name, max_size=2),
    default_volume=st.none() | volume_name,
    default_svm=st.none() | volume_name,
)
received = st.integers(0, MAX_EPOCH_US - 1)


@PROPS
@given(req=requests, ctx=contexts, names=name_maps, received_at_us=received)
def test_normalize_is_total_and_schema_valid(
    req: ScreenRequest, ctx: SessionContext, names: NameMaps, received_at_us: int
) -> None:
    event = normalize(req, ctx, names, received_at_us)
    doc: dict[str, Any] = orjson.loads(event.to_json())
    EVENT_VALIDATOR.validate(doc)
    if doc["operation_type"] in CORE_OPERATIONS:
        REFERENCE_VALIDATOR.validate(doc)
    for path in (event.file_path, event.previous_path):
        if path is not None:
            assert path.startswith("/")
            assert not path.startswith("//")
    assert doc["metadata"]["req_type"] == req.req_type
    assert event.event_id == recompute_event_id(doc)


Inputs = tuple[ScreenRequest, SessionContext, NameMaps, int]
inputs = st.tuples(requests, contexts, name_maps, received)


@PROPS
@given(first=inputs, second=inputs)
def test_event_id_depends_only_on_identity(first: Inputs, second: Inputs) -> None:
    """Take every non-identity field from an unrelated request/context: the id must not move."""
    req, ctx, names, received_at_us = first
    other, other_ctx, other_names, other_received = second
    event = normalize(req, ctx, names, received_at_us)
    c = req.common
    o = other.common
    mixed_common = dataclasses.replace(
        o,
        client_ip=c.client_ip,
        generation_time=c.generation_time,
        usr_context=c.usr_context,
        access_paths=c.access_paths,
        vol_msid=c.vol_msid,
    )
    mixed = dataclasses.replace(other, req_type=req.req_type, target_paths=req.target_paths, common=mixed_common)
    mixed_ctx = dataclasses.replace(other_ctx, vs_uuid=ctx.vs_uuid)
    if event.metadata["timestamp_source"] == "received":
        # Without a usable GenerationTime the session and ReqId are part of the identity.
        mixed = dataclasses.replace(mixed, req_id=req.req_id)
        mixed_ctx = dataclasses.replace(mixed_ctx, session_id=ctx.session_id)
    assert normalize(mixed, mixed_ctx, other_names, other_received).event_id == event.event_id
    # Deterministic: the same inputs again give the same event.
    assert normalize(req, ctx, names, received_at_us) == event


@PROPS
@given(req=requests, ctx=contexts, received_at_us=received, extra=segment)
def test_event_id_moves_with_the_path(req: ScreenRequest, ctx: SessionContext, received_at_us: int, extra: str) -> None:
    base = normalize(req, ctx, NameMaps(), received_at_us)
    changed_path = base.file_path.rstrip("/") + "/" + extra.replace("/", "_") + "-x"
    moved = dataclasses.replace(
        req,
        common=dataclasses.replace(req.common, access_paths=(PathName("UNIX_NAME", changed_path),)),
        target_paths=(),
    )
    assert normalize(moved, ctx, NameMaps(), received_at_us).event_id != base.event_id


@PROPS
@given(reqs=st.lists(requests, min_size=1, max_size=4), ctx=contexts, names=name_maps, received_at_us=received)
def test_event_builder_matches_normalize_byte_for_byte(
    reqs: list[ScreenRequest], ctx: SessionContext, names: NameMaps, received_at_us: int
) -> None:
    """The hot-path builder (flat fields, session constants and volume names cached) against the reference: the
    same JSON bytes, key order included, for every request a session sees; its digest gives the id's key."""
    builder = EventBuilder(ctx, names)
    for req in reqs:
        event, digest = builder.build(fields_of(req), received_at_us)
        reference = normalize(req, ctx, names, received_at_us)
        assert orjson.dumps(event) == reference.to_json()
        assert key_of_digest(digest) == key_of_event_id(reference.event_id) == uuid.UUID(reference.event_id).int
