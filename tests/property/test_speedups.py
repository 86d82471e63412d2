"""The C accelerator against the Python path: for every payload, None or the same record, byte for byte.

The reference is what the reader does without the accelerator: ``xml_codec.fast_screen`` (else the lxml
decoder), ``EventBuilder.build``, the routes and replay flags set on ``metadata``, ``orjson.dumps``. The
accelerator's record is ``speedups.event_record`` of its parts with the same routes and flags. Its other outputs
(event id, dedup key, file path, operation, GenerationTime, ReqId, ReqType) must be the Python path's values.
"""

from __future__ import annotations

import gc
import html
import re
import sys
import tracemalloc
import weakref
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fpolicyd.events import _NAMESPACE_SHA1, KNOWN_REQ_TYPES, MAX_EPOCH_US, EventBuilder, NameMaps, format_rfc3339_us
from fpolicyd.pipeline import speedups
from fpolicyd.pipeline.dedup_window import key_of_digest
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.xml_codec import fast_screen
from fpolicyd.protocol.xml_fast import MAX_FAST_BODY_BYTES
from fpolicyd.simulator.generate import generate_frames
from support.canonical_payloads import (
    SPACES,
    canonical_bodies,
    canonical_payloads,
    damaged_payloads,
    payload_of,
    python_event,
)
from support.captures import CAPTURES, SMB_REN
from support.screen_bodies import canonical_bodies as xml_fast_bodies
from support.screen_bodies import perturbed_bodies

_speedups = pytest.importorskip(
    "fpolicyd._speedups", reason="the C accelerator is not built here (tests/unit/test_speedups_build.py says why)"
)

# Generating a canonical body takes a few hundred draws: 150 examples per property keep this file near 30 s.
PROPS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
RECEIVED_US = 1_707_492_600_123_456

CONTEXT = SessionContext(
    vs_uuid="7e3cc08e-d2d3-11ee-9d6a-00a0b8a6e4f1",
    policy_name="fpolicyd",
    session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
    protocol_version="1.2",
    peer="10.0.0.5:40000",
)
NAMES = NameMaps(volumes={2147830405: "vol1", 0: 'odd "name"\\\u2028'}, svms={}, default_svm="svm1")

contexts = st.builds(
    SessionContext,
    vs_uuid=st.text(max_size=12),
    policy_name=st.text(max_size=8),
    session_id=st.text(max_size=8),
    protocol_version=st.sampled_from(["1.2", "2.0", "\u00e9\n"]),
    peer=st.text(max_size=8),
).filter(lambda c: not any("\ud800" <= ch <= "\udfff" for ch in c.vs_uuid + c.policy_name + c.session_id + c.peer))
name_maps = st.builds(
    NameMaps,
    volumes=st.dictionaries(st.integers(0, 10**19 - 1), st.text(st.characters(exclude_categories=["Cs"]), max_size=6)),
    default_volume=st.none() | st.text(st.characters(exclude_categories=["Cs"]), max_size=6),
    default_svm=st.none() | st.text(st.characters(exclude_categories=["Cs"]), max_size=6),
)
routes = st.none() | st.lists(st.text(max_size=8), max_size=3).map(tuple)
flags = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "out_of_order": st.just(True),
        "ooo_lag_us": st.integers(0, 2**63),
        "replayed": st.just(True),
        "duplicate": st.just(True),
    },
)
received = st.one_of(
    st.just(RECEIVED_US),
    st.integers(0, MAX_EPOCH_US - 1),
    st.sampled_from([0, MAX_EPOCH_US - 1, MAX_EPOCH_US, -1, 2**63, -(2**70)]),
)


def encoder(context: SessionContext = CONTEXT, names: NameMaps = NAMES, path_max_chars: int = 0) -> speedups.Encode:
    encode = speedups.session_encoder(context, names, path_max_chars=path_max_chars)
    assert encode is not None
    return encode


def check(
    payload: bytes,
    *,
    context: SessionContext = CONTEXT,
    names: NameMaps = NAMES,
    received_at_us: int = RECEIVED_US,
    route_names: tuple[str, ...] | None = None,
    replay_flags: dict[str, Any] | None = None,
    path_max_chars: int = 0,
) -> bool:
    """Assert the accelerator's result for ``payload`` is None or the Python path's; True when it built one."""
    encoded = encoder(context, names, path_max_chars)(payload, received_at_us)
    reference = python_event(payload, EventBuilder(context, names, path_max_chars=path_max_chars), received_at_us)
    if encoded is None:
        return False
    assert reference is not None, "the accelerator built an event the Python path does not make"
    event, digest, fields = reference
    metadata: dict[str, Any] = event["metadata"]
    if replay_flags is not None:
        metadata.update(replay_flags)
    if route_names is not None:
        metadata["routes"] = list(route_names)
    head, tail, event_id, key, file_path, operation, generation_time, req_id, req_type = encoded
    routes = speedups.NO_ROUTES if route_names is None else speedups.routes_json(route_names)
    assert speedups.event_record(head, routes, tail, replay_flags) == orjson.dumps(event)
    assert (event_id, key) == (event["event_id"], key_of_digest(digest))
    assert (file_path, operation) == (event["file_path"], event["operation_type"])
    assert (generation_time, req_id, req_type) == (fields.generation_time, fields.req_id, fields.req_type)
    return True


# ------------------------------------------------------------------------------------ real and simulated


@pytest.mark.parametrize("capture", [c for c in CAPTURES if c.notf_type == "SCREEN_REQ"], ids=lambda c: c.notf_type)
def test_captures_are_read_and_identical(capture: Any) -> None:
    assert check(capture.payload)
    assert check(capture.payload, route_names=("a", "b"), replay_flags={"out_of_order": True, "ooo_lag_us": 5})


def test_other_captured_messages_are_left_to_python() -> None:
    for capture in CAPTURES:
        if capture.notf_type != "SCREEN_REQ":
            assert encoder()(capture.payload, RECEIVED_US) is None


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_simulator_corpus_is_read_whole_and_identical(seed: int) -> None:
    """Every notification of the simulator (all 27 ReqTypes over the seeds) is built by the accelerator."""
    seen: set[str] = set()
    for frame in generate_frames(seed=seed, node=seed, count=1500, base_time_us=1_700_000_000_000_000):
        payload = frame[6:]
        assert check(payload), payload
        fields = fast_screen(payload)
        assert fields is not None
        seen.add(fields.req_type)
    assert len(seen) > 20


def test_the_simulator_corpus_covers_every_req_type() -> None:
    seen: set[str] = set()
    for seed in range(3):
        for frame in generate_frames(seed=seed, node=seed, count=2000, base_time_us=1_700_000_000_000_000):
            encoded = encoder()(frame[6:], RECEIVED_US)
            assert encoded is not None
            seen.add(encoded[8])
    assert seen == set(KNOWN_REQ_TYPES)


# ------------------------------------------------------------------------------------------- generated


@PROPS
@given(payload=canonical_payloads(), route_names=routes, replay_flags=flags)
def test_canonical_payloads_are_read_exactly_as_python_reads_them(
    payload: bytes, route_names: tuple[str, ...] | None, replay_flags: dict[str, Any] | None
) -> None:
    built = check(payload, route_names=route_names, replay_flags=replay_flags)
    # The same layout as the Python fast path: whatever it reads, the accelerator reads too.
    assert built == (fast_screen(payload) is not None)


@PROPS
@given(payload=canonical_payloads(), context=contexts, names=name_maps, received_at_us=received)
def test_any_session_names_and_receive_time(
    payload: bytes, context: SessionContext, names: NameMaps, received_at_us: int
) -> None:
    built = check(payload, context=context, names=names, received_at_us=received_at_us)
    if not 0 <= received_at_us < MAX_EPOCH_US:
        assert not built


@PROPS
@given(body=xml_fast_bodies())
def test_the_xml_fast_suites_canonical_bodies(body: bytes) -> None:
    """The generator of tests/property/test_xml_fast.py: every ReqType with its op fields, as the encoder writes."""
    payload = payload_of(body)
    assert check(payload) == (fast_screen(payload) is not None)


@PROPS
@given(body=perturbed_bodies())
def test_the_xml_fast_suites_perturbed_bodies(body: bytes) -> None:
    """Its departures from the layout (whitespace, comments, CDATA, attributes, entities, character references,
    dropped, repeated, swapped and renamed elements, odd values): None, or what the Python path makes."""
    check(payload_of(body))


@PROPS
@given(payload=damaged_payloads())
def test_damaged_payloads_are_none_or_identical(payload: bytes) -> None:
    check(payload)


@PROPS
@given(body=st.binary(max_size=300), nul=st.booleans())
@example(body=b"", nul=True)
@example(body=b'<?xml version="1.0"?><FscreenReq><ReqId>1</ReqId>', nul=False)
def test_arbitrary_bodies_under_a_canonical_header(body: bytes, nul: bool) -> None:
    check(payload_of(body, nul=nul))


@PROPS
@given(payload=st.binary(max_size=200))
def test_arbitrary_payloads(payload: bytes) -> None:
    check(payload)


@st.composite
def long_path_payloads(draw: st.DrawFn) -> bytes:
    """Canonical payloads whose path names are their generated text repeated up to 400 times (entities, non-ASCII
    and astral characters, leading and Windows separators included): paths around and over the bound."""
    body = draw(canonical_bodies())
    times = draw(st.integers(1, 400))
    return payload_of(
        re.sub(
            "<PathName>(.*?)</PathName>", lambda m: f"<PathName>{m[1] * times}</PathName>", body, flags=re.S
        ).encode()
    )


@PROPS
@given(payload=long_path_payloads(), bound=st.sampled_from([0, 512, 600, 1024, 4096]))
def test_long_paths_are_left_to_python_which_cuts_them(payload: bytes, bound: int) -> None:
    """With path_max_chars, a payload with a longer file_path or previous_path is None (the Python path cuts it);
    every other canonical payload is built, byte for byte as the Python path builds it with the same bound."""
    built = check(payload, path_max_chars=bound)
    reference = python_event(payload, EventBuilder(CONTEXT, NAMES, path_max_chars=bound), RECEIVED_US)
    cut = reference is not None and "path_truncated" in reference[0]["metadata"]
    assert built == (fast_screen(payload) is not None and not cut)
    if cut:
        assert bound > 0
        assert reference is not None
        assert max(len(reference[0]["file_path"]), len(reference[0].get("previous_path", ""))) <= bound


def test_the_bound_is_counted_in_characters_not_bytes() -> None:
    """A path of exactly the bound in astral characters (4 UTF-8 bytes each) is built by the accelerator; one
    character more is left to Python."""
    body = SMB_REN.body
    assert body is not None
    source = re.search(rb"<PathName>(/[^<]*)</PathName>", body)
    assert source is not None
    for chars, built in ((4096, True), (4097, False)):
        path = ("/" + "\U0001f600" * (chars - 1)).encode()
        long = body.replace(source[1], path)
        long = re.sub(rb"<TargetAccessPath>.*</TargetAccessPath>", b"", long, flags=re.S)
        assert check(payload_of(long), path_max_chars=4096) is built
        assert check(payload_of(long)) is True


def test_limits_of_the_scan() -> None:
    body = SMB_REN.body
    assert body is not None
    # Longer than the fast path's cap: left to Python, like xml_fast.
    padded = body.replace(b"<FileType>FILE</FileType>", b"<FileType>FILE" + b" " * MAX_FAST_BODY_BYTES + b"</FileType>")
    assert encoder()(payload_of(padded), RECEIVED_US) is None
    # More op fields than the accelerator keeps: left to Python, which reads them.
    fields = b"".join(b"<F%d>x</F%d>" % (i, i) for i in range(_speedups.MAX_FIELDS + 1))
    many = body.replace(b"</SmbRenReq>", fields + b"</SmbRenReq>")
    assert fast_screen(payload_of(many)) is not None
    assert encoder()(payload_of(many), RECEIVED_US) is None
    few = body.replace(b"</SmbRenReq>", fields[: fields.index(b"<F%d>" % _speedups.MAX_FIELDS)] + b"</SmbRenReq>")
    assert check(payload_of(few))
    # Integers: 19 digits are read, 20 are left to Python (which reads those up to 2**64-1).
    for digits, built in ((b"9" * 19, True), (b"1" + b"0" * 19, False)):
        assert check(payload_of(body.replace(b"<FileSize>0<", b"<FileSize>" + digits + b"<"))) is built
    # ContentLen that does not match the body, and a header that is not exactly canonical.
    payload = SMB_REN.payload
    assert encoder()(payload.replace(b"<ContentLen>1224<", b"<ContentLen>1225<"), RECEIVED_US) is None
    assert encoder()(payload.replace(b"<ContentLen>1224<", b"<ContentLen>00000001224<"), RECEIVED_US) is not None
    assert encoder()(payload.replace(b"<ContentLen>1224<", b"<ContentLen>0000000001224<"), RECEIVED_US) is None
    assert encoder()(payload.replace(b"\n\n", b"\n \n", 1), RECEIVED_US) is None


# ------------------------------------------------------------------------------------------ text pieces


@settings(max_examples=500, deadline=None, database=None)
@given(value=st.text(st.characters(exclude_categories=["Cs"])))
def test_json_escaping_is_orjsons(value: str) -> None:
    assert _speedups.json_string(value) == orjson.dumps(value)


def test_json_escaping_of_every_special() -> None:
    specials = "".join(map(chr, range(0x20))) + '"\\/\x7f\x80\x9f\u2028\u2029\ufffe\uffff\U0010ffff'
    for ch in specials:
        assert _speedups.json_string(ch) == orjson.dumps(ch), repr(ch)


def test_strip_knows_every_whitespace_python_knows() -> None:
    """Every character of the BMP and beyond that XML text can carry: stripped by the C scan iff str.strip does."""
    forbidden = {c for c in range(0x20) if c not in (0x09, 0x0A)} | {0x0D, 0xFFFE, 0xFFFF}
    for code in range(0x110000):
        if code in forbidden or 0xD800 <= code <= 0xDFFF or chr(code) in "<&":
            continue
        ch = chr(code)
        raw = f"{ch}x{ch}".encode()
        assert _speedups.element_text(raw, True) == f"{ch}x{ch}".strip(), hex(code)
    assert {c for c in map(chr, range(0x110000)) if c.isspace() and ord(c) not in forbidden} == set(SPACES)


@settings(max_examples=100, deadline=None, database=None)
@given(body=canonical_bodies(), strip=st.booleans())
def test_element_text_reads_what_python_reads(body: str, strip: bool) -> None:
    """Every text (and tag name) of a generated body: decoded and stripped as the Python path does."""
    for piece in re.split("[<>]", body):
        expected = html.unescape(piece)  # the generator writes only the five XML entities
        assert _speedups.element_text(piece.encode(), strip) == (expected.strip() if strip else expected)


@pytest.mark.parametrize(
    "raw", [b"a<b", b"&amp", b"&#65;", b"&foo;", b"a\rb", b"\x00", b"\xed\xa0\x80", b"\xef\xbf\xbe"]
)
def test_element_text_refuses_what_is_not_canonical_text(raw: bytes) -> None:
    assert _speedups.element_text(raw, False) is None


@settings(max_examples=500, deadline=None, database=None)
@given(epoch_us=st.integers(0, MAX_EPOCH_US - 1))
@example(epoch_us=0)
@example(epoch_us=MAX_EPOCH_US - 1)
@example(epoch_us=951_782_400_000_000)  # 2000-02-29
@example(epoch_us=4_107_542_400_000_000)  # 2100-03-01
def test_time_format_is_pythons(epoch_us: int) -> None:
    assert _speedups.format_rfc3339_us(epoch_us) == format_rfc3339_us(epoch_us)


def test_time_format_range() -> None:
    for value in (-1, MAX_EPOCH_US, 2**64, -(2**80)):
        assert _speedups.format_rfc3339_us(value) is None


# ---------------------------------------------------------------------------------------- robustness


def test_callback_errors_propagate_and_leak_nothing() -> None:
    """A failing volume lookup raises out of encode (as the Python path's would), every time, and holds on to
    nothing."""

    def volume_miss(msid: int | None) -> bytes:
        raise RuntimeError("volume lookup failed")

    payload = SMB_REN.payload
    encode = _speedups.EventEncoder(
        _NAMESPACE_SHA1, {}, speedups._req_type_entry, {}, volume_miss, *[b'"x"'] * 6
    ).encode
    before = sys.getrefcount(payload)
    for _ in range(100):
        with pytest.raises(RuntimeError, match="volume lookup failed"):
            encode(payload, RECEIVED_US)
    assert sys.getrefcount(payload) == before

    def bad_volume(msid: int | None) -> bytes:
        return "not bytes"  # type: ignore[return-value]  # the mistake under test

    encode = _speedups.EventEncoder(_NAMESPACE_SHA1, {}, speedups._req_type_entry, {}, bad_volume, *[b'"x"'] * 6).encode
    with pytest.raises(TypeError):
        encode(payload, RECEIVED_US)
    untyped: Any = encode  # the mistakes under test: a payload that is not bytes, a time that is not an int
    with pytest.raises(TypeError):
        untyped(bytearray(payload), RECEIVED_US)
    with pytest.raises(TypeError):
        untyped(payload, 1.5)
    with pytest.raises(TypeError):
        untyped(payload)


def _run(encode: speedups.Encode, payloads: list[bytes], rounds: int) -> None:
    for _ in range(rounds):
        for payload in payloads:
            encode(payload, RECEIVED_US)


def test_an_encoder_that_was_not_initialised_refuses_to_encode() -> None:
    encoder_object = _speedups.EventEncoder.__new__(_speedups.EventEncoder)
    with pytest.raises(TypeError, match="__init__"):
        encoder_object.encode(SMB_REN.payload, RECEIVED_US)


def test_no_reference_or_memory_is_kept_across_calls() -> None:
    encode = encoder()
    payloads = [SMB_REN.payload, SMB_REN.payload[:-40] + b"x" * 40, SMB_REN.payload.replace(b"10.202", b"\xff")]
    payloads += [frame[6:] for frame in generate_frames(seed=3, node=0, count=50, base_time_us=1_700_000_000_000_000)]
    counts = [sys.getrefcount(p) for p in payloads]
    _run(encode, payloads, 1)  # warm the caches (ReqTypes, volumes)
    gc.collect()
    tracemalloc.start()
    try:
        _run(encode, payloads, 20)
        gc.collect()
        first, _peak = tracemalloc.get_traced_memory()
        _run(encode, payloads, 200)
        gc.collect()
        second, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert second - first < 4096, (first, second)
    assert [sys.getrefcount(p) for p in payloads] == counts


def test_encoders_are_collected() -> None:
    volumes: dict[int | None, bytes] = {}

    class Miss:
        def __call__(self, msid: int | None) -> bytes:
            return b'"v"'

    miss = Miss()
    encoder_object = _speedups.EventEncoder(_NAMESPACE_SHA1, {}, speedups._req_type_entry, volumes, miss, *[b'"x"'] * 6)
    miss.encoder = encoder_object  # type: ignore[attr-defined]  # a reference cycle through the callback
    ref = weakref.ref(miss)
    assert encoder_object.encode(SMB_REN.payload, RECEIVED_US) is not None
    del encoder_object, miss
    gc.collect()
    assert ref() is None
