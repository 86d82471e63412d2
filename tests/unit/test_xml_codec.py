from __future__ import annotations

import pytest

from fpolicyd.errors import RemoteProtocolError
from fpolicyd.protocol.messages import (
    Alert,
    BackPressure,
    Handshake,
    HandshakeResp,
    KeepAlive,
    Message,
    Outage,
    PathName,
    ProtCommonInfo,
    ScreenCancel,
    ScreenRequest,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    UnknownMessage,
    UserContext,
    VolumeNotification,
)
from fpolicyd.protocol.req_types import REQ_TYPES, Operation, parse_req_type
from fpolicyd.protocol.xml_codec import (
    decode_payload,
    encode_handshake_resp,
    encode_message,
    frame_message,
    screen_request_body,
)
from support.captures import CAPTURES, KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN

HEADER = (
    b'<?xml version="1.0"?><Header><NotfType>%s</NotfType><ContentLen>%d</ContentLen>'
    b"<DataFormat>XML</DataFormat></Header>"
)


def payload(notf_type: str, body: bytes | None) -> bytes:
    return frame_message(notf_type, body)[6:]


def test_nego_req_capture() -> None:
    decoded = decode_payload(NEGO_REQ.payload)
    assert decoded.header.notf_type == "NEGO_REQ"
    assert decoded.header.content_len == 287 == decoded.body_length
    assert decoded.message == Handshake(
        vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe04",
        policy_name="policy-test-flo",
        session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
        versions=("1.0", "1.1", "1.2", "2.0"),
    )


def test_nego_resp_is_byte_exact_with_the_capture_plus_nul() -> None:
    request = decode_payload(NEGO_REQ.payload).message
    assert isinstance(request, Handshake)
    frame = encode_handshake_resp(HandshakeResp(request.vs_uuid, request.policy_name, request.session_id, "1.2"))
    assert frame == NEGO_RESP.frame
    assert int.from_bytes(frame[1:5], "big") == 361
    body = NEGO_RESP.body
    assert body is not None
    assert len(body) == 219 + len("policy-test-flo")


def test_keep_alive_capture() -> None:
    decoded = decode_payload(KEEP_ALIVE.payload)
    assert decoded.message == KeepAlive()
    assert decoded.header.content_len == 0


def test_smb_open_capture_fields() -> None:
    msg = decode_payload(SMB_OPEN.payload).message
    assert isinstance(msg, ScreenRequest)
    assert (msg.req_id, msg.req_type, msg.op_element) == (2822, "SMB_OPEN", "SmbOpenReq")
    pci = msg.common
    assert pci.client_ip == "192.168.11.26"
    assert pci.generation_time == 1698970793791282
    assert pci.usr_id_type == "MAPPED_ID"
    assert pci.usr_context == UserContext("MappedId", uid=0, sid="S-1-5-21-1595729341-2636328267-1414669823-1000")
    assert pci.file_owner == UserContext("WinSid", sid="S-1-5-32-544")
    assert pci.access_paths == (PathName("WIN_NAME", "\\ntfs01"), PathName("UNIX_NAME", "/ntfs01"))
    assert (pci.vol_msid, pci.file_size, pci.num_hard_lnk) == (2157674396, 4096, 2)
    assert (pci.is_offline, pci.file_type, pci.is_sparse, pci.is_dense) == (False, "DIR", False, False)
    assert msg.display_path == "\\\\SVM0\\ntfs01\\"
    assert msg.prot_ver == (3, 1)
    assert msg.op_fields == (("OpenAccmode", "129"), ("OpenSharemode", "7"), ("OpenOptions", "0"))


def test_smb_rename_capture_target() -> None:
    msg = decode_payload(SMB_REN.payload).message
    assert isinstance(msg, ScreenRequest)
    assert msg.req_type == "SMB_REN"
    assert msg.common.access_paths[1] == PathName("UNIX_NAME", "/renamed6.txt")
    assert msg.target_paths == (PathName("WIN_NAME", "\\renamed66.txt"), PathName("UNIX_NAME", "/renamed66.txt"))


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda c: c.notf_type)
def test_every_capture_reencodes_byte_for_byte(capture: object) -> None:
    from support.captures import Capture

    assert isinstance(capture, Capture)
    assert encode_message(decode_payload(capture.payload).message) == capture.frame


def test_entities_and_character_references_are_decoded() -> None:
    msg = decode_payload(SMB_REN.payload).message
    assert isinstance(msg, ScreenRequest)
    body = screen_request_body(msg).replace(
        b"/renamed66.txt", b"/a &amp; b &lt;c&gt; &quot;q&quot; &apos;s&apos; &#x263A;&#128512;"
    )
    decoded = decode_payload(payload("SCREEN_REQ", body)).message
    assert isinstance(decoded, ScreenRequest)
    assert decoded.target_paths[1].name == "/a & b <c> \"q\" 's' ☺😀"


def test_encoder_escapes_what_it_writes() -> None:
    msg = decode_payload(SMB_REN.payload).message
    assert isinstance(msg, ScreenRequest)
    tricky = "/x & <y> \"z\" 'w'\r\n\tü"
    changed = ScreenRequest(
        req_id=msg.req_id,
        req_type=msg.req_type,
        op_element=msg.op_element,
        common=msg.common,
        display_path=msg.display_path,
        prot_ver=msg.prot_ver,
        target_paths=(PathName("UNIX_NAME", tricky),),
    )
    frame = encode_message(changed)
    assert b"&amp;" in frame
    assert b"&#13;" in frame
    assert decode_payload(frame[6:]).message == changed


DTD_BODIES = [
    b'<?xml version="1.0"?><!DOCTYPE FscreenReq [<!ENTITY x "boom">]><FscreenReq>&x;</FscreenReq>',
    b'<?xml version="1.0"?><!DOCTYPE FscreenReq SYSTEM "file:///etc/passwd"><FscreenReq/>',
    b'<?xml version="1.0"?><!DOCTYPE FscreenReq [<!ENTITY e SYSTEM "file:///etc/passwd">]><FscreenReq>&e;</FscreenReq>',
    b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><l>&c;&c;&c;&c;</l>',
    b"<!DOCTYPE FscreenReq><FscreenReq/>",
]


@pytest.mark.parametrize("body", DTD_BODIES)
def test_dtds_and_entity_declarations_are_refused(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(payload("SCREEN_REQ", body))
    assert info.value.reason in ("dtd_refused", "bad_xml")


def test_undeclared_entity_is_a_parse_error() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(payload("SCREEN_REQ", b'<?xml version="1.0"?><FscreenReq>&nope;</FscreenReq>'))
    assert info.value.reason == "bad_xml"


def test_utf16_document_cannot_smuggle_a_dtd() -> None:
    body = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>'.encode("utf-16")
    with pytest.raises(RemoteProtocolError):
        decode_payload(payload("NEGO_REQ", body))


def test_comments_and_processing_instructions_are_ignored() -> None:
    body = (
        b'<?xml version="1.0"?><Handshake><!-- c --><VsUUID>u</VsUUID><?pi x?><PolicyName>p</PolicyName>'
        b"<SessionId>s</SessionId><ProtVersion><Vers>1.2</Vers><!-- c --></ProtVersion></Handshake>"
    )
    assert decode_payload(payload("NEGO_REQ", body)).message == Handshake("u", "p", "s", ("1.2",))


def test_noti_req_is_read_as_screen_req() -> None:
    body = SMB_REN.body
    assert body is not None
    msg = decode_payload(payload("NOTI_REQ", body)).message
    assert isinstance(msg, ScreenRequest)
    assert msg.notf_type == "NOTI_REQ"
    assert msg.req_type == "SMB_REN"


def test_unknown_type_is_kept_not_fatal() -> None:
    decoded = decode_payload(payload("FUTURE_THING", b'<?xml version="1.0"?><X/>'))
    assert decoded.message == UnknownMessage("FUTURE_THING", b'<?xml version="1.0"?><X/>')


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (HEADER % (b"SCREEN_REQ", 0) + b"\x00", "missing_body"),
        (HEADER % (b"NEGO_REQ", 5) + b'\n\n<?xml version="1.0"?><Nope/>\x00', "unexpected_body"),
        (HEADER % (b"SCREEN_REQ", 5) + b"\n\n<FscreenReq><ReqId>x</ReqId></FscreenReq>\x00", "bad_value"),
        (HEADER % (b"SCREEN_REQ", 5) + b"\n\n<FscreenReq><ReqId>-1</ReqId></FscreenReq>\x00", "bad_value"),
        (
            HEADER % (b"SCREEN_REQ", 5)
            + b"\n\n<FscreenReq><ReqId>1</ReqId><ReqType>SMB_OPEN</ReqType></FscreenReq>\x00",
            "missing_element",
        ),
        (
            HEADER % (b"SCREEN_REQ", 5)
            + b"\n\n<FscreenReq><ReqId>1</ReqId><ReqType>SMB_OPEN</ReqType>"
            + b"<NotfInfo><SmbOpenReq/></NotfInfo></FscreenReq>\x00",
            "missing_element",
        ),
        (b"<Header><NotfType>NEGO_REQ</NotfType></Header>\x00", "missing_element"),
        (b"<Header><ContentLen>0</ContentLen></Header>\x00", "missing_element"),
        (
            b"<Header><NotfType>KEEP_ALIVE</NotfType><ContentLen>0</ContentLen><DataFormat>JSON</DataFormat></Header>",
            "unsupported_data_format",
        ),
        (b"not xml at all\x00", "bad_xml"),
        (b"\x00", "bad_xml"),
        (b"<Wrong/>\x00", "unexpected_body"),
        (b"<Header><NotfType>KEEP_ALIVE</NotfType><ContentLen>zz</ContentLen></Header>", "bad_value"),
    ],
)
def test_malformed_payloads_raise_the_peer_error(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(raw)
    assert info.value.reason == reason


def test_invalid_utf8_is_a_peer_error() -> None:
    body = SMB_REN.body
    assert body is not None
    with pytest.raises(RemoteProtocolError):
        decode_payload(payload("SCREEN_REQ", body.replace(b"renamed66", b"renamed\xff\xfe")))


@pytest.mark.parametrize("req_type", sorted(REQ_TYPES))
def test_all_27_req_types_decode(req_type: str) -> None:
    info = REQ_TYPES[req_type]
    msg = ScreenRequest(
        req_id=7,
        req_type=req_type,
        op_element=info.element,
        common=ProtCommonInfo(client_ip="10.0.0.1", access_paths=(PathName("UNIX_NAME", "/d/f"),)),
        target_paths=(PathName("UNIX_NAME", "/d/g"),) if info.has_target else (),
        op_fields=tuple((name, "1") for name in info.fields),
    )
    assert decode_payload(encode_message(msg)[6:]).message == msg


def test_req_type_table_has_the_27_schema_values() -> None:
    assert len(REQ_TYPES) == 27
    assert REQ_TYPES["SMB_REN_DIR"].element == "SmbRenReq"
    assert REQ_TYPES["NFS_SYM_LNK"].operation is Operation.SYMLINK
    assert parse_req_type("SMB_CREAT_DIR").is_directory
    assert parse_req_type("CIFS_FUTURE_OP").operation is Operation.UNKNOWN
    assert parse_req_type("WEIRD").operation is Operation.UNKNOWN


@pytest.mark.parametrize(
    "msg",
    [
        ScreenCancel(5, "SMB_OPEN", "Cancel Timedout"),
        ScreenCancel(5, "SMB_OPEN", "2"),
        StatusQuery(9, "NFS_WR"),
        StatusQueryResp(9, "NFS_WR", 1),
        ScreenResponse(9, "NFS_WR", 1),
        BackPressure("aaaaaaaa-bbbb-11ee-8888-000c29000002", True),
        BackPressure("aaaaaaaa-bbbb-11ee-8888-000c29000002", False),
        Alert("sid", "FATAL", "Handshake failed: version <3.0> not offered"),
        VolumeNotification(2157674396, "MOUNT", True),
        Outage("/.fpolicy/outage-1", "p1", "incomplete"),
    ],
)
def test_rare_messages_round_trip(msg: Message) -> None:
    frame = encode_message(msg)
    decoded = decode_payload(frame[6:])
    assert decoded.message == msg
    assert decoded.header.content_len == decoded.body_length


def test_back_pressure_body_shape() -> None:
    frame = encode_message(BackPressure("S1", True))
    assert b"<NotfType>BACK_PRESSURE_APPLY</NotfType>" in frame
    assert b"<BackPressure><SessionId>S1</SessionId><Apply>1</Apply></BackPressure>" in frame
    assert b"<NotfType>BACK_PRESSURE_REM</NotfType>" in encode_message(BackPressure("S1", False))


def test_screen_response_body_shape() -> None:
    frame = encode_message(ScreenResponse(2822, "SMB_OPEN", 1))
    assert frame.endswith(
        b'<?xml version="1.0"?><FscreenResp><ReqId>2822</ReqId><ReqType>SMB_OPEN</ReqType>'
        b"<NotfResp>1</NotfResp></FscreenResp>\x00"
    )
    header_len = frame.index(b"\n\n") - 6
    body_len = len(frame) - 6 - header_len - 2 - 1
    assert f"<ContentLen>{body_len}</ContentLen>".encode() in frame
    assert int.from_bytes(frame[1:5], "big") == header_len + 2 + body_len + 1


def test_set_attr_nested_fields_flatten_and_rebuild() -> None:
    msg = ScreenRequest(
        req_id=1,
        req_type="SMB_SET_ATTR",
        op_element="SmbSetAttrReq",
        common=ProtCommonInfo(),
        op_fields=(("SetAttrChangeAttr", "16"), ("SetAttrMtime/Secs", "1700000000"), ("SetAttrMtime/NanoSecs", "5")),
    )
    frame = encode_message(msg)
    assert b"<SetAttrMtime><Secs>1700000000</Secs><NanoSecs>5</NanoSecs></SetAttrMtime>" in frame
    assert decode_payload(frame[6:]).message == msg


def test_user_gids_read_in_both_forms() -> None:
    base = screen_request_body(
        ScreenRequest(1, "NFS_WR", "NfsWrReq", ProtCommonInfo(), prot_ver=(3, 0), user_gids=("0", "10"))
    )
    assert b"<UserGids><Gid>0</Gid><Gid>10</Gid></UserGids>" in base
    flat = base.replace(b"<UserGids><Gid>0</Gid><Gid>10</Gid></UserGids>", b"<UserGids>0, 10</UserGids>")
    msg = decode_payload(payload("SCREEN_REQ", flat)).message
    assert isinstance(msg, ScreenRequest)
    assert msg.user_gids == ("0", "10")


def test_handshake_with_plain_text_version() -> None:
    body = (
        b'<?xml version="1.0"?><Handshake><VsUUID>u</VsUUID><PolicyName>p</PolicyName><SessionId>s</SessionId>'
        b"<ProtVersion>1.0</ProtVersion></Handshake>"
    )
    assert decode_payload(payload("NEGO_REQ", body)).message == Handshake("u", "p", "s", ("1.0",))


def test_content_length_mismatch_is_reported_not_hidden() -> None:
    body = NEGO_REQ.body
    assert body is not None
    raw = HEADER % (b"NEGO_REQ", 999) + b"\n\n" + body + b"\x00"
    decoded = decode_payload(raw)
    assert decoded.header.content_len == 999
    assert decoded.body_length == 287


@pytest.mark.parametrize("value", ["18446744073709551616", "-1", "1e3", ""])
def test_numbers_outside_u64_are_peer_errors(value: str) -> None:
    body = SMB_REN.body
    assert body is not None
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(payload("SCREEN_REQ", body.replace(b"<VolMsid>2147830405<", f"<VolMsid>{value}<".encode())))
    assert info.value.reason == "bad_value"
