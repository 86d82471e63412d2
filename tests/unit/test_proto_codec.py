"""Protobuf codec on the provisional schema: same dataclasses as XML, unknown fields kept, no drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol import fpolicy_pb2 as pb
from fpolicyd.protocol import proto_codec
from fpolicyd.protocol.messages import (
    Handshake,
    KeepAlive,
    Message,
    PathName,
    ScreenRequest,
    UnknownMessage,
)
from fpolicyd.protocol.proto_codec import (
    DATA_FORMAT,
    FLAT_PREFIX,
    UNKNOWN_PREFIX,
    RawField,
    WireFormatError,
    decode_payload,
    dump_fields,
    encode_message,
    walk_fields,
)
from fpolicyd.protocol.xml_codec import decode_payload as decode_xml
from support import strategies
from support.captures import CAPTURES, SMB_REN

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "fpolicyd" / "protocol"


@settings(max_examples=300)
@given(strategies.messages)
def test_every_message_round_trips(message: Message) -> None:
    decoded = decode_payload(encode_message(message))
    assert decoded.message == message
    assert decoded.header.data_format == DATA_FORMAT
    assert decoded.header.content_len == decoded.body_length


def test_real_captures_decode_to_the_same_messages_as_xml() -> None:
    for capture in CAPTURES:
        message = decode_xml(capture.payload).message
        decoded = decode_payload(encode_message(message))
        assert decoded.message == message
        assert decoded.header.notf_type == capture.notf_type


def _append_field(data: bytes, number: int, value: bytes) -> bytes:
    """``data`` plus one LEN field ``number`` (unknown to the schema)."""
    return data + proto_codec_key(number, 2) + bytes([len(value)]) + value


def proto_codec_key(number: int, wire_type: int) -> bytes:
    key = (number << 3) | wire_type
    out = bytearray()
    while key > 0x7F:
        out.append((key & 0x7F) | 0x80)
        key >>= 7
    out.append(key)
    return bytes(out)


def test_unknown_fields_are_kept_in_extra_and_not_fatal() -> None:
    request = decode_xml(SMB_REN.payload).message
    assert isinstance(request, ScreenRequest)
    envelope = proto_codec.to_protobuf(request)
    file_operation = _append_field(envelope.file_operation.SerializeToString(), 500, b"new")
    common = pb.ProtCommonInfo()
    common.ParseFromString(_append_field(envelope.file_operation.common.SerializeToString(), 42, b"x"))
    envelope.file_operation.common.CopyFrom(common)
    operation = pb.FileOperationNotification()
    operation.ParseFromString(file_operation)
    operation.common.CopyFrom(common)
    envelope.file_operation.CopyFrom(operation)
    payload = envelope.SerializeToString() + proto_codec_key(99, 0) + b"\x07"
    decoded = decode_payload(payload).message
    assert isinstance(decoded, ScreenRequest)
    extra = dict(decoded.common.extra)
    assert extra[f"{UNKNOWN_PREFIX}99"] == "0:7"
    assert extra[f"{UNKNOWN_PREFIX}file_operation/500"] == f"2:{b'new'.hex()}"
    assert extra[f"{UNKNOWN_PREFIX}file_operation/common/42"] == f"2:{b'x'.hex()}"
    without_unknown = dict(decoded.common.extra)
    for key in list(without_unknown):
        if key.startswith(UNKNOWN_PREFIX):
            del without_unknown[key]
    assert without_unknown == dict(request.common.extra)


def test_an_unknown_field_on_a_handshake_is_not_fatal() -> None:
    payload = _append_field(encode_message(Handshake("vs", "p", "s", ("1.0",))), 77, b"?")
    assert decode_payload(payload).message == Handshake("vs", "p", "s", ("1.0",))


def test_the_public_attempts_flat_fields_are_mapped() -> None:
    flat = pb.FPolicyMessage()
    op = flat.file_operation
    op.file_path = "/dir/file.txt"
    op.new_path = "/dir/renamed.txt"
    op.operation_type = "rename"
    op.protocol = "cifs"
    op.client_ip = "10.0.0.5"
    op.file_size = 12
    op.timestamp = "1698970793791282"
    op.svm_name = "svm1"
    op.user_name = "alice"
    decoded = decode_payload(flat.SerializeToString()).message
    assert isinstance(decoded, ScreenRequest)
    assert decoded.req_type == "SMB_REN"
    assert decoded.op_element == "SmbRenReq"
    assert decoded.common.access_paths == (PathName("UNIX_NAME", "/dir/file.txt"),)
    assert decoded.target_paths == (PathName("UNIX_NAME", "/dir/renamed.txt"),)
    assert decoded.common.client_ip == "10.0.0.5"
    assert decoded.common.file_size == 12
    assert decoded.common.generation_time == 1698970793791282
    assert dict(decoded.common.extra) == {f"{FLAT_PREFIX}svm_name": "svm1", f"{FLAT_PREFIX}user_name": "alice"}


def test_a_header_only_message_of_unknown_type_is_kept() -> None:
    envelope = pb.FPolicyMessage()
    envelope.header.notf_type = "FUTURE_MSG"
    assert decode_payload(envelope.SerializeToString()).message == UnknownMessage("FUTURE_MSG", b"")


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no body, no header
        b"\xff",  # truncated key
        b"\x12\x05ab",  # LEN field runs past the end
        b"\x0a\x02\x08",  # header holding a truncated varint
    ],
)
def test_bad_payloads_raise_remote_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_payload(payload)


def test_keep_alive_is_a_non_empty_payload() -> None:
    payload = encode_message(KeepAlive())
    assert payload
    assert decode_payload(payload).message == KeepAlive()


def test_walk_fields_without_a_schema() -> None:
    payload = encode_message(Handshake("vs", "pol", "sid", ("1.0", "1.2")))
    fields = walk_fields(payload)
    header, body = fields
    assert (header.number, header.wire_type) == (1, 2)
    assert body.number == 2
    assert body.children is not None
    assert [(f.number, f.value) for f in body.children] == [
        (1, b"vs"),
        (2, b"pol"),
        (3, b"sid"),
        (4, b"1.0"),
        (4, b"1.2"),
    ]
    lines = dump_fields(fields)
    assert any(line.strip() == "4: len[3] '1.0'" for line in lines)
    assert walk_fields(b"\x08\x96\x01\x15\x01\x00\x00\x00\x19" + b"\x02" + b"\x00" * 7) == (
        RawField(1, 0, 150),
        RawField(2, 5, 1),
        RawField(3, 1, 2),
    )


@pytest.mark.parametrize("payload", [b"\x0b", b"\x00", b"\x08", b"\x11\x00", b"\x80" * 11, b"\x0f"])
def test_walk_fields_refuses_what_is_not_a_message(payload: bytes) -> None:
    with pytest.raises(WireFormatError):
        walk_fields(payload)


@pytest.mark.slow
def test_regenerating_the_protobuf_module_gives_the_committed_files(tmp_path: Path) -> None:
    """Generated code never drifts from proto/fpolicy.proto (pinned grpcio-tools and mypy-protobuf)."""
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in ("fpolicy_pb2.py", "fpolicy_pb2.pyi"):
        assert (tmp_path / name).read_bytes() == (GENERATED / name).read_bytes(), (
            f"{name} is stale: run proto/generate.py"
        )
