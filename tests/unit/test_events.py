"""normalize(): ScreenRequest → FileEvent, the event contract and both JSON Schemas."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

import fpolicyd.events as events_mod
from fpolicyd.events import (
    CORE_OPERATIONS,
    EVENT_ID_NAMESPACE,
    KNOWN_REQ_TYPES,
    FileEvent,
    NameMaps,
    Operation,
    event_id_from_identity,
    format_rfc3339_us,
    load_event_schema,
    load_reference_schema,
    normalize,
)
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import PathName, ProtCommonInfo, ScreenRequest, UserContext
from support.event_ids import recompute_event_id

# ------------------------------------------------------------------------------------------ fixtures

CTX = SessionContext(
    vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe04",
    policy_name="policy-test-flo",
    session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
    protocol_version="1.2",
    peer="192.168.11.10:34567",
)
NAMES = NameMaps()
RECEIVED_US = 1_707_492_533_000_001  # 2024-02-09T15:28:53.000001Z

# Both ontap-9.13-sim-session.json's SMB_OPEN and ontap-smb-rename.json's SMB_REN, as the codec decodes them
# (entities decoded: single backslashes, UNC prefix doubled).
SMB_OPEN_DIR = ScreenRequest(
    req_id=2822,
    req_type="SMB_OPEN",
    op_element="SmbOpenReq",
    common=ProtCommonInfo(
        client_ip="192.168.11.26",
        generation_time=1698970793791282,
        usr_id_type="MAPPED_ID",
        usr_context=UserContext("MappedId", uid=0, sid="S-1-5-21-1595729341-2636328267-1414669823-1000"),
        file_owner=UserContext("WinSid", sid="S-1-5-32-544"),
        access_paths=(PathName("WIN_NAME", "\\ntfs01"), PathName("UNIX_NAME", "/ntfs01")),
        vol_msid=2157674396,
        file_size=4096,
        num_hard_lnk=2,
        is_offline=False,
        file_type="DIR",
        is_sparse=False,
        is_dense=False,
    ),
    display_path="\\\\SVM0\\ntfs01\\",
    prot_ver=(3, 1),
    op_fields=(("OpenAccmode", "129"), ("OpenSharemode", "7"), ("OpenOptions", "0")),
)

SMB_REN = ScreenRequest(
    req_id=4996,
    req_type="SMB_REN",
    op_element="SmbRenReq",
    common=ProtCommonInfo(
        client_ip="10.202.17.170",
        generation_time=1707492532045224,
        usr_id_type="MAPPED_ID",
        usr_context=UserContext("MappedId", uid=65534, sid="S-1-5-21-1390067357-2139871995-682003330-305426"),
        file_owner=UserContext("WinSid", sid="S-1-5-21-1390067357-2139871995-682003330-305426"),
        access_paths=(PathName("WIN_NAME", "\\renamed6.txt"), PathName("UNIX_NAME", "/renamed6.txt")),
        vol_msid=2147830405,
        file_size=0,
        num_hard_lnk=1,
        is_offline=False,
        file_type="FILE",
        is_sparse=False,
        is_dense=False,
    ),
    display_path="\\\\NLABNASC9003\\test123\\renamed6.txt",
    prot_ver=(3, 1),
    target_paths=(PathName("WIN_NAME", "\\renamed66.txt"), PathName("UNIX_NAME", "/renamed66.txt")),
)

NFS_WR = ScreenRequest(
    req_id=77,
    req_type="NFS_WR",
    op_element="NfsWrReq",
    common=ProtCommonInfo(
        client_ip="10.0.0.9",
        generation_time=1_720_000_000_123_456,
        usr_id_type="UNIX_ONLY",
        usr_context=UserContext("UnixUid", uid=1001),
        file_owner=UserContext("UnixUid", uid=1001),
        access_paths=(
            PathName("WIN_NAME", "\\data\\NFSV3-FPOLICY-FINAL.txt"),
            PathName("UNIX_NAME", "/data/NFSV3-FPOLICY-FINAL.txt"),
        ),
        vol_msid=2147484000,
        file_size=1234,
        file_type="FILE",
    ),
    prot_ver=(3, 0),
    user_gids=("1001", "27"),
    op_fields=(("WrOffset", "0"), ("WrLength", "1234")),
)

_FORMATS = jsonschema.FormatChecker()
EVENT_VALIDATOR = jsonschema.Draft202012Validator(load_event_schema(), format_checker=_FORMATS)
REFERENCE_VALIDATOR = jsonschema.Draft7Validator(load_reference_schema(), format_checker=_FORMATS)


def with_common(req: ScreenRequest, **changes: Any) -> ScreenRequest:
    return dataclasses.replace(req, common=dataclasses.replace(req.common, **changes))


def check_schemas(event: FileEvent) -> dict[str, Any]:
    """Every event validates against fpolicyd's schema; core operations also against the reference one."""
    doc: dict[str, Any] = orjson.loads(event.to_json())
    EVENT_VALIDATOR.validate(doc)
    if doc["operation_type"] in CORE_OPERATIONS:
        REFERENCE_VALIDATOR.validate(doc)
    return doc


def run(req: ScreenRequest, names: NameMaps = NAMES, ctx: SessionContext = CTX) -> FileEvent:
    event = normalize(req, ctx, names, RECEIVED_US)
    check_schemas(event)
    assert event.event_id == recompute_event_id(orjson.loads(event.to_json()))
    return event


# ------------------------------------------------------------------------------------------ captures


def test_smb_open_of_share_root_directory() -> None:
    ev = run(SMB_OPEN_DIR)
    assert ev.operation_type == "open"
    assert ev.file_path == "/ntfs01"
    assert ev.previous_path is None
    assert ev.timestamp == "2023-11-03T00:19:53.791282Z"
    assert ev.file_size == 4096
    assert ev.client_ip == "192.168.11.26"
    assert ev.volume_name == "msid-2157674396"
    assert ev.svm_name == CTX.vs_uuid
    assert ev.metadata == {
        "req_type": "SMB_OPEN",
        "req_id": 2822,
        "protocol": "smb",
        "protocol_version": "3.1",
        "fpolicy_version": "1.2",
        "is_directory": True,  # from FileType DIR: SMB_OPEN has no _DIR variant
        "file_type": "DIR",
        "user": {"id_type": "MAPPED_ID", "uid": 0, "sid": "S-1-5-21-1595729341-2636328267-1414669823-1000"},
        "file_owner": {"id_type": "WIN_ONLY", "sid": "S-1-5-32-544"},
        "vs_uuid": CTX.vs_uuid,
        "policy_name": "policy-test-flo",
        "session_id": CTX.session_id,
        "volume_msid": 2157674396,
        "received_at": "2024-02-09T15:28:53.000001Z",
        "routes": [],
        "display_path": "\\\\SVM0\\ntfs01\\",
        "timestamp_source": "generation_time",
        "generation_time": 1698970793791282,
        "node": "192.168.11.10:34567",
        "op_fields": {"OpenAccmode": "129", "OpenSharemode": "7", "OpenOptions": "0"},
    }


def test_smb_rename_file_path_is_the_new_name() -> None:
    ev = run(SMB_REN)
    assert ev.operation_type == "rename"
    assert ev.file_path == "/renamed66.txt"
    assert ev.previous_path == "/renamed6.txt"
    assert ev.timestamp == "2024-02-09T15:28:52.045224Z"
    assert ev.metadata["user"] == {
        "id_type": "MAPPED_ID",
        "uid": 65534,
        "sid": "S-1-5-21-1390067357-2139871995-682003330-305426",
    }
    assert "target_missing" not in ev.metadata
    assert "op_fields" not in ev.metadata


def test_capture_decoded_by_the_codec_matches_the_hand_built_requests() -> None:
    """Keeps the hand-built requests above honest: the real bytes decode to exactly them."""
    from fpolicyd.protocol.framing import encode_frame
    from fpolicyd.protocol.xml_codec import decode_payload

    data = Path(__file__).resolve().parent.parent / "data"
    bodies = [
        item
        for name in ("ontap-9.13-sim-session.json", "ontap-smb-rename.json")
        for item in json.loads((data / name).read_text(encoding="utf-8"))
        if item["notf_type"] == "SCREEN_REQ"
    ]
    assert len(bodies) == 2
    for item, expected in zip(bodies, (SMB_OPEN_DIR, SMB_REN), strict=True):
        frame = encode_frame(item["header"].encode(), item["body"].encode())
        assert len(frame) - 6 == item["frame_length"]
        message = decode_payload(frame[6:]).message
        assert isinstance(message, ScreenRequest)
        assert normalize(message, CTX, NAMES, RECEIVED_US) == normalize(expected, CTX, NAMES, RECEIVED_US)


def test_rename_without_target_keeps_source_as_both_paths() -> None:
    ev = run(dataclasses.replace(SMB_REN, target_paths=()))
    assert ev.file_path == ev.previous_path == "/renamed6.txt"
    assert ev.metadata["target_missing"] is True


def test_link_with_and_without_target() -> None:
    lnk = ScreenRequest(
        req_id=5,
        req_type="NFS_LNK",
        op_element="NfsLnkReq",
        common=ProtCommonInfo(generation_time=1_720_000_000_000_000, access_paths=(PathName("UNIX_NAME", "/a"),)),
        target_paths=(PathName("UNIX_NAME", "/b"),),
    )
    ev = run(lnk)
    assert (ev.operation_type, ev.file_path, ev.previous_path) == ("link", "/b", "/a")
    ev = run(dataclasses.replace(lnk, target_paths=()))
    assert (ev.file_path, ev.previous_path, ev.metadata["target_missing"]) == ("/a", "/a", True)
    sym = run(dataclasses.replace(lnk, req_type="NFS_SYM_LNK", op_element="NfsSymLnkReq", target_paths=()))
    assert (sym.operation_type, sym.previous_path) == ("symlink", None)
    assert "target_missing" not in sym.metadata


# --------------------------------------------------------------------------------------------- paths


def test_nfs_prefers_unix_name_wherever_it_is() -> None:
    ev = run(NFS_WR)
    assert ev.operation_type == "write"
    assert ev.file_path == "/data/NFSV3-FPOLICY-FINAL.txt"
    assert ev.metadata["protocol"] == "nfs"
    assert ev.metadata["protocol_version"] == "3.0"
    assert ev.metadata["user"] == {"id_type": "UNIX_ONLY", "uid": 1001}
    assert ev.metadata["file_owner"] == {"id_type": "UNIX_ONLY", "uid": 1001}
    assert ev.metadata["user_gids"] == ["1001", "27"]
    assert ev.metadata["op_fields"] == {"WrOffset": "0", "WrLength": "1234"}
    assert "display_path" not in ev.metadata
    reversed_paths = with_common(NFS_WR, access_paths=tuple(reversed(NFS_WR.common.access_paths)))
    assert run(reversed_paths).file_path == ev.file_path


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ((PathName("WIN_NAME", "\\data\\f.txt"),), "/data/f.txt"),
        ((PathName("WIN_8_3_NAME", "\\DATA~1\\F~1.TXT"),), "/DATA~1/F~1.TXT"),
        ((PathName("WIN_8_3_NAME", "\\S~1"), PathName("WIN_NAME", "\\long")), "/long"),
        ((PathName("WIN_NAME", "\\w"), PathName("UNIX_NAME", "")), "/w"),
        ((PathName("UNIX_NAME", "a/b"),), "/a/b"),
        ((PathName("UNIX_NAME", "//a//b/"),), "/a//b/"),
        ((PathName("UNIX_NAME", "/"),), "/"),
        ((PathName("WIN_NAME", "\\"),), "/"),
        ((PathName("WIN_NAME", "\\\\x\\y"),), "/x/y"),
        ((PathName("FUTURE_NAME", "\\z"),), "/z"),
        ((PathName("UNIX_NAME", "/a b/&<>\"'/\U0001f600.txt"),), "/a b/&<>\"'/\U0001f600.txt"),
    ],
)
def test_path_choice_and_form(paths: tuple[PathName, ...], expected: str) -> None:
    ev = run(with_common(NFS_WR, access_paths=paths))
    assert ev.file_path == expected
    assert "path_missing" not in ev.metadata


def test_no_paths_gives_root_and_a_flag() -> None:
    ev = run(with_common(NFS_WR, access_paths=()))
    assert ev.file_path == "/"
    assert ev.metadata["path_missing"] is True
    ev = run(with_common(NFS_WR, access_paths=(PathName("UNIX_NAME", ""),)))
    assert ev.file_path == "/"
    assert ev.metadata["path_missing"] is True


def test_rename_of_unknown_source_still_has_previous_path() -> None:
    ev = run(with_common(SMB_REN, access_paths=()))
    assert (ev.file_path, ev.previous_path, ev.metadata["path_missing"]) == ("/renamed66.txt", "/", True)


# ----------------------------------------------------------------------------------------- req types

EXPECTED_REQ_TYPES: dict[str, tuple[str, bool]] = {
    "SMB_OPEN": ("open", False),
    "SMB_CLOSE": ("close", False),
    "SMB_CREAT": ("create", False),
    "SMB_CREAT_DIR": ("create", True),
    "SMB_DEL": ("delete", False),
    "SMB_DEL_DIR": ("delete", True),
    "SMB_REN": ("rename", False),
    "SMB_REN_DIR": ("rename", True),
    "SMB_GET_ATTR": ("getattr", False),
    "SMB_SET_ATTR": ("setattr", False),
    "SMB_RD": ("read", False),
    "SMB_WR": ("write", False),
    "NFS_LOOKUP": ("lookup", False),
    "NFS_CREAT": ("create", False),
    "NFS_CREAT_DIR": ("create", True),
    "NFS_DEL": ("delete", False),
    "NFS_DEL_DIR": ("delete", True),
    "NFS_REN": ("rename", False),
    "NFS_REN_DIR": ("rename", True),
    "NFS_OPEN": ("open", False),
    "NFS_CLOSE": ("close", False),
    "NFS_RD": ("read", False),
    "NFS_WR": ("write", False),
    "NFS_GET_ATTR": ("getattr", False),
    "NFS_SET_ATTR": ("setattr", False),
    "NFS_LNK": ("link", False),
    "NFS_SYM_LNK": ("symlink", False),
}


def test_known_req_types_table_is_the_27_real_ones() -> None:
    assert len(KNOWN_REQ_TYPES) == 27
    assert set(KNOWN_REQ_TYPES) == set(EXPECTED_REQ_TYPES)


@pytest.mark.parametrize("req_type", sorted(KNOWN_REQ_TYPES))
def test_every_known_req_type(req_type: str) -> None:
    op, is_dir = EXPECTED_REQ_TYPES[req_type]
    ev = run(with_common(dataclasses.replace(SMB_REN, req_type=req_type), file_type="FILE"))
    assert ev.operation_type == op
    assert ev.metadata["is_directory"] is is_dir
    assert ev.metadata["req_type"] == req_type
    assert ev.metadata["protocol"] == req_type.split("_", maxsplit=1)[0].lower()
    info = KNOWN_REQ_TYPES[req_type]
    assert (info.operation.value, info.is_directory) == (op, is_dir)


@pytest.mark.parametrize(
    ("req_type", "op", "is_dir", "protocol"),
    [
        ("SMB_FROB", "unknown", False, "smb"),
        ("SMB_FROB_DIR", "unknown", True, "smb"),
        ("S3_OPEN", "open", False, "s3"),  # a future protocol token parses generically
        ("NFS4_REN_DIR", "rename", True, "nfs4"),
    ],
)
def test_unknown_and_future_req_types(req_type: str, op: str, is_dir: bool, protocol: str) -> None:
    ev = run(with_common(dataclasses.replace(NFS_WR, req_type=req_type), file_type=None))
    assert (ev.operation_type, ev.metadata["is_directory"], ev.metadata["protocol"]) == (op, is_dir, protocol)
    assert ev.metadata["req_type"] == req_type


def test_req_type_without_proto_token_is_unknown() -> None:
    ev = run(dataclasses.replace(NFS_WR, req_type="GARBAGE"))
    assert ev.operation_type == Operation.UNKNOWN
    assert ev.metadata["req_type"] == "GARBAGE"
    assert isinstance(ev.metadata["protocol"], str)


def test_req_type_cache_is_bounded() -> None:
    for i in range(3000):
        normalize(dataclasses.replace(NFS_WR, req_type=f"NFS_X{i}"), CTX, NAMES, RECEIVED_US)
    assert len(events_mod._REQ_TYPE_CACHE) <= events_mod._REQ_TYPE_CACHE_MAX
    assert all(rt in events_mod._REQ_TYPE_CACHE for rt in KNOWN_REQ_TYPES)


def test_dir_file_type_marks_directory() -> None:
    assert run(with_common(NFS_WR, file_type="DIR")).metadata["is_directory"] is True
    assert run(with_common(NFS_WR, file_type="SYMLINK")).metadata["is_directory"] is False


# ---------------------------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    "moment",
    [
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2000, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(2001, 9, 9, 1, 46, 40, tzinfo=dt.UTC),
        dt.datetime(2023, 11, 3, 0, 19, 53, 791282, tzinfo=dt.UTC),
        dt.datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=dt.UTC),
        dt.datetime(2100, 3, 1, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    ],
)
def test_format_rfc3339_us_matches_datetime(moment: dt.datetime) -> None:
    us = (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    events_mod._second_prefix.clear()  # exercise the miss path, then the hit path
    for _ in range(2):
        assert format_rfc3339_us(us) == moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize("bad", [-1, events_mod.MAX_EPOCH_US])
def test_format_rfc3339_us_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="out of RFC 3339 range"):
        format_rfc3339_us(bad)


def test_second_prefix_cache_is_bounded() -> None:
    for s in range(events_mod._SECOND_PREFIX_MAX + 10):
        format_rfc3339_us(s * 1_000_000)
    assert len(events_mod._second_prefix) <= events_mod._SECOND_PREFIX_MAX


@pytest.mark.parametrize(
    ("generation_time", "source"),
    [
        (None, "received"),  # protocol 1.0/1.1: no GenerationTime
        (0, "received"),
        (12345, "received"),  # SCHEMA's 2017 sample style: not epoch µs
        (10**15 - 1, "received"),
        (10**15, "generation_time"),
        (1698970793791282, "generation_time"),
        (events_mod.MAX_EPOCH_US - 1, "generation_time"),
        (events_mod.MAX_EPOCH_US, "received"),
        (2**64 - 1, "received"),
    ],
)
def test_timestamp_source(generation_time: int | None, source: str) -> None:
    ev = run(with_common(SMB_REN, generation_time=generation_time))
    assert ev.metadata["timestamp_source"] == source
    assert ev.metadata["generation_time"] == generation_time
    if source == "received":
        assert ev.timestamp == ev.metadata["received_at"] == "2024-02-09T15:28:53.000001Z"
    else:
        assert generation_time is not None
        assert ev.timestamp == format_rfc3339_us(generation_time)


# ------------------------------------------------------------------------------------------ event id


def test_event_id_namespace_is_derived_as_documented() -> None:
    assert uuid.uuid5(uuid.NAMESPACE_URL, "urn:fpolicyd:event-id:v1") == EVENT_ID_NAMESPACE


@pytest.mark.parametrize(
    "identity",
    [
        ["a", 1, None],
        ["ü\U0001f600", 2**64 - 1, '\x00\x1f"\\/\u2028'],
        [],
    ],
)
def test_event_id_from_identity_is_uuid5(identity: list[str | int | None]) -> None:
    name = json.dumps(identity, ensure_ascii=False, separators=(",", ":"))
    assert event_id_from_identity(identity) == str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


def test_event_id_is_stable_across_redelivery() -> None:
    first = normalize(SMB_REN, CTX, NAMES, RECEIVED_US)
    other_ctx = dataclasses.replace(
        CTX, session_id="other", policy_name="p2", peer="10.9.9.9:1", protocol_version="2.0"
    )
    replay = normalize(
        dataclasses.replace(SMB_REN, req_id=1), other_ctx, NameMaps(default_volume="v"), RECEIVED_US + 10**9
    )
    assert replay.event_id == first.event_id
    # Fields outside the identity do not change it either.
    unrelated = with_common(
        dataclasses.replace(SMB_REN, display_path=None, prot_ver=(2, 1)), file_size=99, file_type="DIR", file_owner=None
    )
    assert normalize(unrelated, CTX, NAMES, RECEIVED_US).event_id == first.event_id


_UID_USER = UserContext("MappedId", uid=1, sid="S-1-5-21-1390067357-2139871995-682003330-305426")
_SID_USER = UserContext("MappedId", uid=65534, sid="S-1-5-21-1")
IDENTITY_CHANGES: dict[str, Callable[[ScreenRequest], ScreenRequest]] = {
    "vol_msid": lambda r: with_common(r, vol_msid=1),
    "vol_msid absent": lambda r: with_common(r, vol_msid=None),
    "req_type": lambda r: dataclasses.replace(r, req_type="SMB_REN_DIR"),
    "source path": lambda r: with_common(r, access_paths=(PathName("UNIX_NAME", "/other.txt"),)),
    "target path": lambda r: dataclasses.replace(r, target_paths=(PathName("UNIX_NAME", "/x.txt"),)),
    "target absent": lambda r: dataclasses.replace(r, target_paths=()),
    "generation_time": lambda r: with_common(r, generation_time=r.common.generation_time + 1),  # type: ignore[operator]
    "client_ip": lambda r: with_common(r, client_ip="10.202.17.171"),
    "client_ip absent": lambda r: with_common(r, client_ip=None),
    "uid": lambda r: with_common(r, usr_context=_UID_USER),
    "sid": lambda r: with_common(r, usr_context=_SID_USER),
    "user absent": lambda r: with_common(r, usr_context=None),
}


@pytest.mark.parametrize("change", sorted(IDENTITY_CHANGES))
def test_event_id_changes_with_every_identity_field(change: str) -> None:
    base = normalize(SMB_REN, CTX, NAMES, RECEIVED_US).event_id
    changed = run(IDENTITY_CHANGES[change](SMB_REN))
    assert changed.event_id != base


def test_event_id_changes_with_vs_uuid() -> None:
    other = dataclasses.replace(CTX, vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe05")
    assert run(SMB_REN, ctx=other).event_id != run(SMB_REN).event_id


def test_without_generation_time_session_and_req_id_join_the_identity() -> None:
    old = with_common(SMB_REN, generation_time=None)
    base = run(old).event_id
    assert run(dataclasses.replace(old, req_id=4997)).event_id != base
    assert run(old, ctx=dataclasses.replace(CTX, session_id="s2")).event_id != base
    # ... and the receive time still does not: a redelivery on the same session is the same event.
    assert normalize(old, CTX, NAMES, RECEIVED_US + 5).event_id == base


def test_with_generation_time_req_id_is_not_identity() -> None:
    assert run(dataclasses.replace(SMB_REN, req_id=1)).event_id == run(SMB_REN).event_id


# ---------------------------------------------------------------------------------------------- names


def test_volume_name_resolution_order() -> None:
    mapped = NameMaps(volumes={2147830405: "vol_finance"}, default_volume="fallback")
    assert run(SMB_REN, names=mapped).volume_name == "vol_finance"
    assert run(with_common(SMB_REN, vol_msid=7), names=mapped).volume_name == "fallback"
    assert run(with_common(SMB_REN, vol_msid=None), names=mapped).volume_name == "fallback"
    assert run(with_common(SMB_REN, vol_msid=7)).volume_name == "msid-7"
    assert run(with_common(SMB_REN, vol_msid=None)).volume_name == "unknown-volume"
    assert NameMaps(default_volume="").volume_name(7) == "msid-7"  # reference default "" means unset


def test_svm_name_resolution_order() -> None:
    mapped = NameMaps(svms={CTX.vs_uuid: "svm_prod"}, default_svm="svm_default")
    assert run(SMB_REN, names=mapped).svm_name == "svm_prod"
    other = dataclasses.replace(CTX, vs_uuid="00000000-0000-0000-0000-000000000000")
    assert run(SMB_REN, names=mapped, ctx=other).svm_name == "svm_default"
    assert run(SMB_REN, ctx=other).svm_name == other.vs_uuid
    assert NameMaps(default_svm="").svm_name("") == "unknown-svm"


def test_name_maps_are_read_only_copies() -> None:
    volumes = {1: "a"}
    names = NameMaps(volumes=volumes)
    volumes[1] = "b"
    assert names.volume_name(1) == "a"
    with pytest.raises(TypeError):
        names.volumes[2] = "c"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        names.default_svm = "x"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ FileEvent


def test_to_json_is_compact_and_omits_nulls() -> None:
    ev = normalize(with_common(NFS_WR, client_ip=""), CTX, NAMES, RECEIVED_US)
    raw = ev.to_json()
    assert not raw.endswith(b"\n")
    assert b" " not in raw.replace(b"NFSV3-FPOLICY-FINAL", b"")
    doc = orjson.loads(raw)
    assert "previous_path" not in doc
    assert "client_ip" not in doc
    assert ev.client_ip is None
    assert list(doc) == [
        "event_id",
        "operation_type",
        "file_path",
        "volume_name",
        "svm_name",
        "timestamp",
        "file_size",
        "metadata",
    ]


def test_round_trip_and_equality_with_dataclass_constructor() -> None:
    ev = normalize(SMB_REN, CTX, NAMES, RECEIVED_US)
    assert FileEvent.from_json(ev.to_json()) == ev
    assert FileEvent(**{f.name: getattr(ev, f.name) for f in dataclasses.fields(FileEvent)}) == ev
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.file_path = "/x"  # type: ignore[misc]


def test_with_routes_copies() -> None:
    ev = normalize(SMB_REN, CTX, NAMES, RECEIVED_US)
    routed = ev.with_routes(("UC1", "UC16"))
    assert routed.metadata["routes"] == ["UC1", "UC16"]
    assert ev.metadata["routes"] == []
    assert dataclasses.replace(routed, metadata=ev.metadata) == ev
    check_schemas(routed)


def test_file_size_absent_is_zero() -> None:
    assert run(with_common(NFS_WR, file_size=None)).file_size == 0


def test_user_shapes() -> None:
    assert run(with_common(NFS_WR, usr_context=None, usr_id_type=None)).metadata["user"] == {}
    sid_only = with_common(NFS_WR, usr_context=UserContext("WinSid", sid="S-1-5-18"), usr_id_type=None)
    assert run(sid_only).metadata["user"] == {"id_type": "WIN_ONLY", "sid": "S-1-5-18"}
    assert "file_owner" not in run(with_common(NFS_WR, file_owner=None)).metadata


def test_unknown_common_elements_are_kept() -> None:
    ev = run(with_common(NFS_WR, extra=(("NewThing", "1"),)))
    assert ev.metadata["extra"] == {"NewThing": "1"}


# -------------------------------------------------------------------------------------------- schemas


def test_schemas_are_valid_and_cached() -> None:
    jsonschema.Draft202012Validator.check_schema(load_event_schema())
    jsonschema.Draft7Validator.check_schema(load_reference_schema())
    assert load_event_schema() is load_event_schema()
    assert set(load_event_schema()["properties"]["operation_type"]["enum"]) == {o.value for o in Operation}
    assert set(load_reference_schema()["properties"]["operation_type"]["enum"]) == CORE_OPERATIONS


def _ref_doc() -> dict[str, Any]:
    return orjson.loads(normalize(SMB_REN, CTX, NAMES, RECEIVED_US).to_json())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", "not-a-uuid"),
        ("timestamp", "2024-13-09T15:28:52.045224Z"),
        ("timestamp", "yesterday"),
        ("operation_type", "open"),
        ("file_path", ""),
        ("file_path", "/" + "a" * 4096),
        ("volume_name", "v" * 256),
        ("svm_name", ""),
        ("file_size", -1),
        ("unexpected", 1),
    ],
)
def test_reference_schema_rejects(field: str, value: object) -> None:
    """The formats really are checked (uuid is built into jsonschema, date-time uses rfc3339-validator)."""
    doc = _ref_doc()
    doc[field] = value
    assert not REFERENCE_VALIDATOR.is_valid(doc)


def test_formats_are_enforced_by_the_event_schema_too() -> None:
    doc = _ref_doc()
    doc["event_id"] = str(uuid.uuid4())  # a uuid, but not a v5 one
    assert not EVENT_VALIDATOR.is_valid(doc)
    doc = _ref_doc()
    doc["timestamp"] = "2024-02-30T15:28:52.045224Z"  # matches the pattern, not a date
    assert not EVENT_VALIDATOR.is_valid(doc)


@pytest.mark.parametrize("op", ["rename", "link"])
def test_previous_path_is_required_for_rename_and_link(op: str) -> None:
    doc = _ref_doc()
    doc["operation_type"] = op
    del doc["previous_path"]
    assert not EVENT_VALIDATOR.is_valid(doc)
    if op == "rename":
        assert not REFERENCE_VALIDATOR.is_valid(doc)


def test_unknown_operation_is_valid_for_fpolicyd_only() -> None:
    doc = check_schemas(run(dataclasses.replace(NFS_WR, req_type="NFS_FROB")))
    assert doc["operation_type"] == "unknown"
    assert not REFERENCE_VALIDATOR.is_valid(doc)


def test_schema_files_ship_in_the_package() -> None:
    import importlib.resources

    root = importlib.resources.files("fpolicyd") / "schemas"
    assert (root / "event.schema.json").is_file()
    assert (root / "reference-event.schema.json").is_file()
