"""Unit tests for the simulator's pure half: deterministic, exact, realistic SCREEN_REQ streams."""

from __future__ import annotations

import itertools
import re
import uuid
from collections import Counter
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from fpolicyd.protocol.framing import XmlFrameReader, split_payload
from fpolicyd.protocol.messages import PathNameType, ScreenRequest, UserKind
from fpolicyd.protocol.req_types import REQ_TYPES
from fpolicyd.protocol.xml_codec import decode_payload, encode_handshake, encode_screen_request
from fpolicyd.simulator import (
    DEFAULT_BASE_TIME_US,
    DEFAULT_VERSIONS,
    SimulatorConfig,
    SimulatorConfigError,
    expected_requests,
    generate_frames,
    generate_requests,
    handshake,
    manifest_record,
)
from support.captures import SMB_OPEN, SMB_REN

BASE = DEFAULT_BASE_TIME_US
LONG = 3000


def _capture_pci_order(body: bytes | None) -> list[str]:
    assert body is not None
    root: Any = etree.fromstring(body)
    return [child.tag for child in root.find("NotfInfo")[0].find("CommonInfo/ProtCommonInfo")]


#: ``ProtCommonInfo`` child order of the real captures (docs/protocol.md §4.3), read from them.
CAPTURE_PCI_ORDER = _capture_pci_order(SMB_OPEN.body)


def frames(seed: int = 7, node: int = 0, count: int = 200, **kw: Any) -> list[bytes]:
    return list(generate_frames(seed=seed, node=node, count=count, base_time_us=BASE, **kw))


def requests(seed: int = 7, node: int = 0, count: int = 200, **kw: Any) -> list[ScreenRequest]:
    return list(generate_requests(seed=seed, node=node, count=count, base_time_us=BASE, **kw))


@cache
def long_stream(seed: int = 11, node: int = 2) -> tuple[tuple[ScreenRequest, bytes], ...]:
    return tuple(zip(requests(seed, node, LONG), frames(seed, node, LONG), strict=True))


def body_root(frame: bytes) -> Any:
    _header, body = split_payload(frame[6:])
    assert body is not None
    return etree.fromstring(body)


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_frames() -> None:
    assert frames(seed=3, node=1) == frames(seed=3, node=1)
    assert requests(seed=3, node=1) == requests(seed=3, node=1)


def test_different_seed_or_node_gives_different_frames() -> None:
    base = frames(seed=3, node=1)
    assert frames(seed=4, node=1) != base
    assert frames(seed=3, node=2) != base


def test_prefix_of_a_longer_stream_is_the_shorter_stream() -> None:
    assert frames(count=50) == frames(count=500)[:50]


def test_req_ids_count_up_from_first_req_id() -> None:
    reqs = requests(count=100, first_req_id=4_000_000_000)
    assert [r.req_id for r in reqs] == list(range(4_000_000_000, 4_000_000_100))


def test_count_zero_is_empty() -> None:
    assert requests(count=0) == []


# ------------------------------------------------------------------------------------------- exactness


def test_fast_frames_are_byte_identical_to_the_codec() -> None:
    for request, frame in long_stream():
        assert frame == encode_screen_request(request)


def test_fast_frames_byte_identical_with_an_alias_header_type() -> None:
    reqs = requests(count=60, notf_type="NOTI_REQ")
    fast = frames(count=60, notf_type="NOTI_REQ")
    assert all(r.notf_type == "NOTI_REQ" for r in reqs)
    assert [encode_screen_request(r) for r in reqs] == fast
    assert b"<NotfType>NOTI_REQ</NotfType>" in fast[0]


def test_every_frame_round_trips_through_decode_payload() -> None:
    for request, frame in long_stream():
        decoded = decode_payload(frame[6:])
        assert decoded.message == request
        assert decoded.header.notf_type == "SCREEN_REQ"


@given(seed=st.integers(min_value=-(2**70), max_value=2**70), node=st.integers(0, 4095))
@settings(max_examples=25, deadline=None)
def test_round_trip_for_any_seed(seed: int, node: int) -> None:
    reqs = requests(seed=seed, node=node, count=60)
    for request, frame in zip(reqs, frames(seed=seed, node=node, count=60), strict=True):
        assert frame == encode_screen_request(request)
        assert decode_payload(frame[6:]).message == request


def test_frame_lengths_follow_the_protocol() -> None:
    for _request, frame in long_stream()[:500]:
        assert frame[0] == frame[5] == 0x22
        length = int.from_bytes(frame[1:5], "big")
        assert length == len(frame) - 6
        payload = frame[6:]
        assert payload.endswith(b"\x00")
        header, body = split_payload(payload)
        assert body is not None
        content_len = int(re.search(rb"<ContentLen>(\d+)</ContentLen>", header).group(1))  # type: ignore[union-attr]
        assert content_len == len(body)
        assert length == len(header) + 2 + len(body) + 1
        assert header.startswith(b'<?xml version="1.0"?><Header><NotfType>SCREEN_REQ</NotfType><ContentLen>')
        assert body.startswith(b'<?xml version="1.0"?><FscreenReq><ReqId>')


def test_frame_reader_splits_a_concatenated_stream() -> None:
    stream = [f for _, f in long_stream()[:300]]
    payloads = XmlFrameReader().feed(b"".join(stream))
    assert payloads == [f[6:] for f in stream]


# ------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(("seed", "node"), [(0, 0), (1, 5), (99, 4095), (-3, 17)])
def test_all_27_req_types_within_54_events(seed: int, node: int) -> None:
    reqs = requests(seed=seed, node=node, count=2 * len(REQ_TYPES))
    assert len(REQ_TYPES) == 27
    assert {r.req_type for r in reqs} == set(REQ_TYPES)
    # The first cycle alone already covers them, so even a 27-event run exercises every type.
    assert {r.req_type for r in reqs[: len(REQ_TYPES)]} == set(REQ_TYPES)


def test_element_fields_and_targets_follow_req_types() -> None:
    for request, _frame in long_stream():
        info = REQ_TYPES[request.req_type]
        assert request.op_element == info.element
        assert tuple(name for name, _ in request.op_fields) == info.fields
        assert all(value.isdigit() for _, value in request.op_fields)
        assert bool(request.target_paths) == info.has_target
        if info.is_directory:
            assert request.common.file_type == "DIR"
        if request.req_type == "NFS_SYM_LNK":
            assert request.common.file_type == "SYMLINK"


def test_smb_and_nfs_common_info() -> None:
    seen_types: Counter[str] = Counter()
    for request, frame in long_stream():
        common = request.common
        seen_types[common.usr_id_type or ""] += 1
        assert common.client_ip
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", common.client_ip)
        assert None not in (common.vol_msid, common.file_size, common.num_hard_lnk)
        assert None not in (common.is_offline, common.is_sparse)
        assert common.is_dense is False
        assert common.usr_context is not None
        assert common.file_owner is not None
        if REQ_TYPES[request.req_type].protocol == "smb":
            assert request.display_path is not None
            assert request.display_path.startswith("\\\\FPSIM-SVM0\\")
            assert b"<DisplayPath>" in frame
            assert request.prot_ver in {(3, 1), (2, 1)}
            assert request.user_gids == ()
            assert common.usr_id_type in {"MAPPED_ID", "WIN_ONLY"}
            if common.usr_id_type == "MAPPED_ID":
                assert common.usr_context.kind == UserKind.MAPPED_ID
                assert common.usr_context.uid is not None
                assert common.usr_context.sid
            else:
                assert common.usr_context.kind == UserKind.WIN_SID
            assert common.file_owner.kind == UserKind.WIN_SID
            assert (common.file_owner.sid or "").startswith("S-1-5-")
        else:
            assert request.display_path is None
            assert b"<DisplayPath>" not in frame
            assert request.prot_ver in {(3, 0), (4, 0), (4, 1)}
            assert request.user_gids
            assert all(g.isdigit() for g in request.user_gids)
            assert common.usr_id_type == "UNIX_ONLY"
            assert common.usr_context.kind == UserKind.UNIX_UID
            assert common.file_owner.kind == UserKind.UNIX_UID
            if request.req_type in ("NFS_OPEN", "NFS_CLOSE"):
                assert request.prot_ver[0] == 4
    assert set(seen_types) == {"MAPPED_ID", "WIN_ONLY", "UNIX_ONLY"}


def test_vol_msids_come_from_a_small_set() -> None:
    msids = {r.common.vol_msid for r, _ in long_stream()}
    assert len(msids) == 3


def test_display_path_is_share_plus_win_path() -> None:
    roots = 0
    for request, _frame in long_stream():
        if request.display_path is None:
            continue
        win = request.common.access_paths[0]
        assert win.type == PathNameType.WIN_NAME
        share_and_path = request.display_path[len("\\\\FPSIM-SVM0\\") :]
        share, _, rest = share_and_path.partition("\\")
        assert share
        assert "\\" + rest == win.name
        roots += win.name == "\\"
    assert roots > 0  # share roots: DisplayPath ends in a backslash, as captured


# ------------------------------------------------------------------------------------------- raw XML


def test_prot_common_info_order_equals_the_capture() -> None:
    assert _capture_pci_order(SMB_REN.body) == CAPTURE_PCI_ORDER
    assert len(CAPTURE_PCI_ORDER) == 13
    for _request, frame in long_stream()[:500]:
        pci = body_root(frame).find("NotfInfo")[0].find("CommonInfo/ProtCommonInfo")
        assert [child.tag for child in pci] == CAPTURE_PCI_ORDER


def test_common_info_and_op_element_order() -> None:
    for request, frame in long_stream()[:500]:
        root = body_root(frame)
        assert [c.tag for c in root] == ["ReqId", "ReqType", "NotfInfo"]
        op = root.find("NotfInfo")[0]
        common = [c.tag for c in op.find("CommonInfo")]
        if REQ_TYPES[request.req_type].protocol == "smb":
            assert common == ["ProtCommonInfo", "DisplayPath", "ProtVer"]
        else:
            assert common == ["ProtCommonInfo", "ProtVer", "UserGids"]
        tags = [c.tag for c in op]
        assert tags[0] == "CommonInfo"
        if request.target_paths:
            assert tags[1] == "TargetAccessPath"


def test_win_name_comes_before_unix_name_and_unix_is_rarely_missing() -> None:
    win_only = 0
    for _request, frame in long_stream():
        op = body_root(frame).find("NotfInfo")[0]
        for where in ("CommonInfo/ProtCommonInfo/AccessPath", "TargetAccessPath"):
            element = op.find(where)
            if element is None:
                continue
            types = [p.findtext("PathNameType") for p in element]
            names = [p.findtext("PathName") for p in element]
            assert types in (["WIN_NAME", "UNIX_NAME"], ["WIN_NAME"])
            assert names[0].startswith("\\")
            assert "/" not in names[0]
            if len(names) == 2:
                assert names[1] == names[0].replace("\\", "/")
            elif where.endswith("AccessPath") and where.startswith("CommonInfo"):
                win_only += 1
    assert 0 < win_only < LONG * 0.03  # about 1%


def test_generation_time_strictly_increasing_epoch_us() -> None:
    times = [r.common.generation_time for r, _ in long_stream()]
    assert all(t is not None for t in times)
    assert times[0] > BASE  # type: ignore[operator]
    assert all(a < b for a, b in itertools.pairwise(times))  # type: ignore[operator]


def test_names_exercise_unicode_escaping_and_nesting() -> None:
    names = [
        p.name
        for r, _ in long_stream()
        for p in (*r.common.access_paths, *r.target_paths)
        if p.type == PathNameType.UNIX_NAME
    ]
    text = "".join(names)
    assert any(ord(ch) > 0xFFFF for ch in text)  # emoji / non-BMP
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # CJK
    assert any(ch in "éüßçïÜ" for ch in text)  # accents
    for special in "&<>'\"":
        assert special in text
    assert " " in text
    assert max(name.count("/") for name in names) >= 4  # nested directories
    raw = b"".join(f for _, f in long_stream())
    for entity in (b"&amp;", b"&lt;", b"&gt;", b"&apos;", b"&quot;"):
        assert entity in raw


def test_both_protocols_files_and_dirs_present() -> None:
    kinds = Counter((REQ_TYPES[r.req_type].protocol, r.common.file_type) for r, _ in long_stream())
    for proto in ("smb", "nfs"):
        assert kinds[(proto, "FILE")] > 0
        assert kinds[(proto, "DIR")] > 0


# ------------------------------------------------------------------------------------------- handshake


def test_handshake_is_deterministic_and_uuid_shaped() -> None:
    hs = handshake(seed=1, node=0, policy_name="p", vs_uuid="11111111-2222-11ee-8888-000c29000001")
    assert hs == handshake(seed=1, node=0, policy_name="p", vs_uuid="11111111-2222-11ee-8888-000c29000001")
    assert hs.versions == DEFAULT_VERSIONS
    assert len(hs.session_id) == 36
    assert uuid.UUID(hs.session_id).version == 1
    others = {handshake(seed=s, node=n, policy_name="p", vs_uuid="v").session_id for s in (1, 2) for n in range(50)}
    assert len(others) == 100
    frame = encode_handshake(hs)
    assert decode_payload(frame[6:]).message == hs


def test_handshake_versions_are_kept_in_order() -> None:
    hs = handshake(seed=0, node=0, policy_name="p", vs_uuid="v", versions=["1.0", "1.2"])
    assert hs.versions == ("1.0", "1.2")


# ------------------------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    cfg = SimulatorConfig()
    assert (cfg.host, cfg.port, cfg.nodes, cfg.events, cfg.rate) == ("127.0.0.1", 9898, 1, 1000, 0.0)
    assert (cfg.sync, cfg.max_outstanding, cfg.keep_alive_interval_s) == (False, 500, 120.0)
    assert cfg.versions == ("1.0", "1.1", "1.2", "2.0")
    assert (cfg.base_time_us, cfg.chunk_events, cfg.manifest) == (BASE, 256, None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("host", ""),
        ("port", 0),
        ("port", 70000),
        ("port", True),
        ("nodes", 0),
        ("nodes", 5000),
        ("events", -1),
        ("rate", -1.0),
        ("rate", float("inf")),
        ("rate", float("nan")),
        ("seed", 1.5),
        ("sync", 1),
        ("max_outstanding", 0),
        ("max_outstanding", 10001),
        ("keep_alive_interval_s", -0.1),
        ("versions", ()),
        ("versions", ("1.0", "")),
        ("versions", ("1.2", "1.2")),
        ("versions", ["1.0"]),
        ("policy_name", ""),
        ("policy_name", "x" * 257),
        ("vs_uuid", ""),
        ("vs_uuid", "x" * 37),
        ("base_time_us", -1),
        ("notf_type", " "),
        ("connect_timeout_s", 0),
        ("handshake_timeout_s", -1),
        ("duration_limit_s", float("inf")),
        ("chunk_events", 0),
        ("manifest", "out.jsonl"),
    ],
)
def test_config_validation_names_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SimulatorConfig\.{name}\b"):
        SimulatorConfig(**{name: value})  # type: ignore[arg-type]


def test_config_accepts_edge_values(tmp_path: Path) -> None:
    cfg = SimulatorConfig(
        events=0, rate=0.5, keep_alive_interval_s=0, nodes=4096, manifest=tmp_path / "m.jsonl", max_outstanding=1
    )
    assert replace(cfg, port=1).port == 1


# ------------------------------------------------------------------------------------------- helpers


def test_expected_requests_regenerates_every_node() -> None:
    cfg = SimulatorConfig(nodes=3, events=40, seed=5)
    expected = expected_requests(cfg)
    assert len(expected) == 120
    for node in range(3):
        mine = [r for n, r in expected if n == node]
        assert mine == list(generate_requests(seed=5, node=node, count=40, base_time_us=cfg.base_time_us))


def test_manifest_record() -> None:
    request = next(r for r, _ in long_stream() if r.target_paths and len(r.common.access_paths) == 2)
    record = manifest_record(3, request)
    assert record["node"] == 3
    assert record["req_id"] == request.req_id
    assert record["req_type"] == request.req_type
    assert record["generation_time"] == request.common.generation_time
    assert record["paths"] == {p.type: p.name for p in request.common.access_paths}
    assert record["target_paths"] == {p.type: p.name for p in request.target_paths}
    assert set(record["paths"]) == {"WIN_NAME", "UNIX_NAME"}


# ------------------------------------------------------------------------------------------- wall clock


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**17), min_size=1, max_size=60))
def test_a_clocked_stream_follows_the_clock_and_stays_strictly_increasing(readings: list[int]) -> None:
    """Each request carries the clock's reading when it is drawn (or 1 µs after the previous stamp when the
    clock stood still or went back); nothing else about the request changes."""
    clock = iter(readings)
    count = len(readings)
    clocked = list(generate_requests(seed=3, node=1, count=count, base_time_us=BASE, clock_us=lambda: next(clock)))
    fixed = list(generate_requests(seed=3, node=1, count=count, base_time_us=BASE))
    times = [r.common.generation_time for r in clocked]
    previous = -1
    for reading, stamp in zip(readings, times, strict=True):
        assert stamp == (reading if reading > previous else previous + 1)
        previous = stamp
    assert [replace(r, common=replace(r.common, generation_time=0)) for r in clocked] == [
        replace(r, common=replace(r.common, generation_time=0)) for r in fixed
    ]


def test_a_clocked_stream_reads_the_clock_as_each_request_is_drawn() -> None:
    now = [1_000]
    stream = generate_requests(seed=3, node=0, count=3, base_time_us=BASE, clock_us=lambda: now[0])
    assert next(stream).common.generation_time == 1_000
    now[0] = 5_000_000  # 5 s later: the next stamp is 5 s later too, not one seeded offset later
    assert next(stream).common.generation_time == 5_000_000


def test_wall_clock_config_is_validated_and_not_reproducible() -> None:
    assert SimulatorConfig().wall_clock is False  # the programmatic default stays reproducible
    with pytest.raises(SimulatorConfigError, match=r"SimulatorConfig\.wall_clock\b") as caught:
        SimulatorConfig(wall_clock=1)  # type: ignore[arg-type]
    assert (caught.value.name, caught.value.why, caught.value.value) == ("wall_clock", "must be a bool", 1)
    with pytest.raises(ValueError, match="not reproducible"):
        expected_requests(SimulatorConfig(wall_clock=True))
