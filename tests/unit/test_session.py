"""The session state machine driven by a fake ONTAP peer in memory, with a fake clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fpolicyd.errors import ConfigError, LocalProtocolError
from fpolicyd.protocol.messages import (
    STATUS_IN_PROGRESS,
    STATUS_REQUEST_LOST,
    Alert,
    Handshake,
    HandshakeResp,
    ScreenCancel,
    ScreenResponse,
    StatusQuery,
    StatusQueryResp,
    VolumeNotification,
)
from fpolicyd.protocol.session import Close, FileNotification, Notice, NoticeKind, Output, Reply, Session, SessionState
from fpolicyd.protocol.session_config import EngineMode, SessionConfig
from fpolicyd.protocol.xml_codec import FastScreen, decode_payload, encode_message, fast_screen, frame_message
from support.captures import KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN


def nego(versions: tuple[str, ...] = ("1.0", "1.1", "1.2", "2.0"), session_id: str = "S-1") -> bytes:
    return encode_message(Handshake("VS-1", "policy-a", session_id, versions))[6:]


def kinds(outputs: object) -> list[str]:
    assert isinstance(outputs, (list, tuple))
    return [type(o).__name__ if not isinstance(o, Notice) else f"Notice:{o.kind.value}" for o in outputs]


def established(config: SessionConfig | None = None, now: float = 0.0, fast: FastScreen | None = None) -> Session:
    session = Session(config or SessionConfig(), peer="10.0.0.5:40000", now=now, fast=fast)
    session.receive(NEGO_REQ.payload, now)
    assert session.state is SessionState.ACTIVE
    return session


def only(outputs: Sequence[Output], cls: type) -> list[Output]:
    return [o for o in outputs if isinstance(o, cls)]


def test_handshake_with_the_real_capture_replies_the_captured_bytes() -> None:
    session = Session(SessionConfig(), peer="p", now=0.0)
    outputs = session.receive(NEGO_REQ.payload, 0.5)
    replies = only(outputs, Reply)
    assert len(replies) == 1
    reply = replies[0]
    assert isinstance(reply, Reply)
    assert reply.data == NEGO_RESP.frame
    assert session.context is not None
    assert session.context.protocol_version == "1.2"
    assert session.context.session_id == "d8ad84cc-79dd-11ee-b638-000c29cdbe04"
    assert session.state is SessionState.ACTIVE


@pytest.mark.parametrize(
    ("offer", "preferred", "chosen"),
    [
        (("1.0",), ("1.2", "1.1", "1.0"), "1.0"),
        (("1.0", "1.1"), ("1.2", "1.1", "1.0"), "1.1"),
        (("2.0", "1.2"), ("1.2", "1.1", "1.0"), "1.2"),
        (("1.0", "1.2", "2.0"), ("2.0", "1.2"), "2.0"),
    ],
)
def test_version_is_chosen_only_from_the_offer(offer: tuple[str, ...], preferred: tuple[str, ...], chosen: str) -> None:
    session = Session(SessionConfig(preferred_versions=preferred), peer="p", now=0.0)
    reply = only(session.receive(nego(offer), 0.0), Reply)[0]
    assert isinstance(reply, Reply)
    decoded = decode_payload(reply.data[6:]).message
    assert decoded == HandshakeResp("VS-1", "policy-a", "S-1", chosen)


def test_no_common_version_closes() -> None:
    session = Session(SessionConfig(), peer="p", now=0.0)
    outputs = session.receive(nego(("3.0",)), 0.0)
    assert kinds(outputs) == ["Close"]
    close = outputs[0]
    assert isinstance(close, Close)
    assert close.reason == "no_common_version"
    assert session.state is SessionState.CLOSED


@pytest.mark.parametrize("first", [KEEP_ALIVE.payload, SMB_OPEN.payload])
def test_first_message_must_be_nego(first: bytes) -> None:
    session = Session(SessionConfig(), peer="p", now=0.0)
    outputs = session.receive(first, 0.0)
    assert isinstance(outputs[0], Close)
    assert outputs[0].reason == "expected_nego"


def test_handshake_timeout() -> None:
    session = Session(SessionConfig(handshake_timeout_s=5.0), peer="p", now=100.0)
    assert session.deadline() == 105.0
    assert session.check_timers(104.9) is None
    close = session.check_timers(105.0)
    assert close is not None
    assert close.reason == "handshake_timeout"


def test_idle_timeout_is_refreshed_by_keep_alives() -> None:
    session = established(SessionConfig(keep_alive_interval_s=10, idle_timeout_s=30), now=0.0)
    assert session.deadline() == 30.0
    assert kinds(session.receive(KEEP_ALIVE.payload, 25.0)) == ["Notice:keep_alive"]
    assert session.check_timers(30.0) is None
    assert session.deadline() == 55.0
    close = session.check_timers(55.0)
    assert close is not None
    assert close.reason == "idle_timeout"


def test_idle_timeout_zero_disables_it() -> None:
    session = established(SessionConfig(keep_alive_interval_s=0, idle_timeout_s=0))
    assert session.deadline() is None
    assert session.check_timers(1e9) is None


@pytest.mark.parametrize(("interval", "idle"), [(120, 120), (120, 359.9), (10, 20)])
def test_idle_timeout_below_three_intervals_is_refused(interval: float, idle: float) -> None:
    with pytest.raises(ConfigError, match="keep_alive_interval_s"):
        SessionConfig(keep_alive_interval_s=interval, idle_timeout_s=idle)


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        SessionConfig(preferred_versions=())
    with pytest.raises(ConfigError):
        SessionConfig(handshake_timeout_s=0)


def test_async_mode_sends_nothing_for_screen_requests() -> None:
    session = established()
    outputs = session.receive(SMB_REN.payload, 1.0)
    assert kinds(outputs) == ["FileNotification"]
    notification = outputs[0]
    assert isinstance(notification, FileNotification)
    assert notification.response is None
    assert notification.fields.req_type == "SMB_REN"
    assert only(session.receive(encode_message(StatusQuery(4996, "SMB_REN"))[6:], 1.0), Reply) == []


def status(session: Session, req_id: int, req_type: str = "SMB_OPEN") -> int:
    """Ask ``session`` about ``req_id`` as ONTAP does; the ``Resp`` of its one reply."""
    replies = only(session.receive(encode_message(StatusQuery(req_id, req_type))[6:], 1.0), Reply)
    assert len(replies) == 1
    reply = replies[0]
    assert isinstance(reply, Reply)
    message = decode_payload(reply.data[6:]).message
    assert isinstance(message, StatusQueryResp)
    assert (message.req_id, message.req_type) == (req_id, req_type)
    return message.resp


def test_sync_mode_answers_allow_and_status_in_progress_while_outstanding() -> None:
    session = established(SessionConfig(engine_mode=EngineMode.SYNC))
    notification = session.receive(SMB_OPEN.payload, 1.0)[0]
    assert isinstance(notification, FileNotification)
    answer = notification.response
    assert answer is not None
    assert decode_payload(answer.data[6:]).message == ScreenResponse(2822, "SMB_OPEN", 1)
    assert status(session, 2822) == STATUS_IN_PROGRESS
    session.answered(answer)
    assert status(session, 2822) == STATUS_REQUEST_LOST  # answered: the reply may have been lost, so send it again


def test_a_status_query_for_a_request_never_received_answers_lost() -> None:
    session = established(SessionConfig(engine_mode=EngineMode.SYNC))
    assert status(session, 8888, "SMB_WR") == STATUS_REQUEST_LOST
    session.receive(SMB_OPEN.payload, 1.0)
    assert status(session, 8888, "SMB_WR") == STATUS_REQUEST_LOST
    [notice] = only(session.receive(encode_message(StatusQuery(8888, "SMB_WR"))[6:], 1.0), Notice)
    assert isinstance(notice, Notice)
    assert notice.fields == {"req_id": 8888, "req_type": "SMB_WR", "answer": "lost"}


def test_a_cancelled_request_is_no_longer_outstanding_and_its_late_answer_changes_nothing() -> None:
    session = established(SessionConfig(engine_mode=EngineMode.SYNC))
    notification = session.receive(SMB_OPEN.payload, 1.0)[0]
    assert isinstance(notification, FileNotification)
    assert notification.response is not None
    [notice] = session.receive(encode_message(ScreenCancel(2822, "SMB_OPEN", "2"))[6:], 1.0)
    assert isinstance(notice, Notice)
    assert notice.kind is NoticeKind.CANCEL
    assert notice.fields["outstanding"] is True
    assert status(session, 2822) == STATUS_REQUEST_LOST
    again = session.receive(SMB_OPEN.payload, 1.0)[0]  # ONTAP sends it again
    assert isinstance(again, FileNotification)
    assert again.response is not None
    session.answered(notification.response)  # the cancelled copy's answer, written late
    assert status(session, 2822) == STATUS_IN_PROGRESS
    session.answered(again.response)
    assert status(session, 2822) == STATUS_REQUEST_LOST


def test_the_fast_path_tracks_requests_like_the_decoder() -> None:
    session = established(SessionConfig(engine_mode=EngineMode.SYNC), fast=fast_screen)
    notification = session.screen(SMB_OPEN.payload, 1.0)
    assert notification is not None
    assert notification.response is not None
    assert status(session, 2822) == STATUS_IN_PROGRESS
    answer = session.screened(77, "SMB_WR", 1.0)
    assert answer is not None
    assert status(session, 77, "SMB_WR") == STATUS_IN_PROGRESS
    session.answered(answer)
    assert status(session, 77, "SMB_WR") == STATUS_REQUEST_LOST
    assert status(session, 2822) == STATUS_IN_PROGRESS


def test_beyond_the_bound_the_longest_waiting_request_is_forgotten() -> None:
    session = established(SessionConfig(engine_mode=EngineMode.SYNC, max_outstanding=2))
    answers = [session.screened(req_id, "SMB_WR", 1.0) for req_id in (1, 2, 3)]
    assert session.outstanding.untracked == 1
    assert [status(session, req_id, "SMB_WR") for req_id in (1, 2, 3)] == [2, 1, 1]
    assert len(session.outstanding) == 2
    assert all(answer is not None for answer in answers)
    with pytest.raises(ConfigError):
        SessionConfig(max_outstanding=0)


def test_async_engines_track_nothing_and_answer_no_status_query() -> None:
    session = established()
    assert session.screened(77, "SMB_WR", 1.0) is None
    assert len(session.outstanding) == 0
    outputs = session.receive(encode_message(StatusQuery(77, "SMB_WR"))[6:], 1.0)
    assert only(outputs, Reply) == []
    [notice] = outputs
    assert isinstance(notice, Notice)
    assert "answer" not in notice.fields


def test_fatal_alert_is_surfaced_and_remembered() -> None:
    session = established()
    outputs = session.receive(encode_message(Alert("S-1", "FATAL", "Handshake failed"))[6:], 1.0)
    notice = outputs[0]
    assert isinstance(notice, Notice)
    assert notice.kind is NoticeKind.ALERT
    assert notice.fields["severity"] == "FATAL"
    assert session.fatal_alert
    session.receive(encode_message(Alert("S-1", "WARNING", "x"))[6:], 1.0)
    assert session.fatal_alert


def test_unknown_and_wrong_direction_types_are_ignored() -> None:
    session = established()
    assert kinds(session.receive(frame_message("FUTURE_MSG", b"<X/>")[6:], 1.0)) == ["Notice:unknown_type"]
    assert kinds(session.receive(encode_message(ScreenResponse(1, "SMB_OPEN", 1))[6:], 1.0)) == [
        "Notice:unexpected_direction"
    ]
    assert session.state is SessionState.ACTIVE


def test_cancel_volume_and_outage_notices() -> None:
    session = established()
    assert kinds(session.receive(encode_message(ScreenCancel(3, "SMB_OPEN", "2"))[6:], 1.0)) == ["Notice:cancel"]
    assert kinds(session.receive(encode_message(VolumeNotification(5, "MOUNT", True))[6:], 1.0)) == [
        "Notice:volume_notification"
    ]


def test_content_length_mismatch_is_a_notice_and_the_event_still_flows() -> None:
    session = established()
    body = SMB_REN.body
    assert body is not None
    header = SMB_REN.header.replace(b"<ContentLen>1224<", b"<ContentLen>1225<")
    outputs = session.receive(header + b"\n\n" + body + b"\x00", 1.0)
    assert kinds(outputs) == ["FileNotification", "Notice:content_len_mismatch"]


def test_protocol_error_closes_the_session() -> None:
    session = established()
    outputs = session.receive(b"<garbage\x00", 1.0)
    assert isinstance(outputs[0], Close)
    assert outputs[0].reason == "bad_xml"
    with pytest.raises(LocalProtocolError):
        session.receive(KEEP_ALIVE.payload, 2.0)


def test_renegotiation_adopts_the_new_session_id() -> None:
    session = established()
    outputs = session.receive(nego(session_id="S-2"), 3.0)
    assert kinds(outputs) == ["Reply", "Notice:handshake"]
    assert session.context is not None
    assert session.context.session_id == "S-2"


def test_back_pressure_needs_the_handshake() -> None:
    session = Session(SessionConfig(), peer="p", now=0.0)
    with pytest.raises(LocalProtocolError):
        session.back_pressure(True)
    session.receive(NEGO_REQ.payload, 0.0)
    assert b"<Apply>1</Apply>" in session.back_pressure(True)
    assert b"BACK_PRESSURE_REM" in session.back_pressure(False)


def test_an_async_engines_requests_are_taken_at_once_with_the_time_they_were_read() -> None:
    session = established()
    assert not session.answers_screen_requests
    session.screened_unanswered(5.0)
    assert session.last_received == 5.0
    assert len(session.outstanding) == 0


def test_only_an_active_async_session_takes_requests_unanswered() -> None:
    sync = established(SessionConfig(engine_mode=EngineMode.SYNC))
    assert sync.answers_screen_requests
    with pytest.raises(LocalProtocolError):
        sync.screened_unanswered(1.0)
    fresh = Session(SessionConfig(), peer="127.0.0.1:40000", now=0.0)
    with pytest.raises(LocalProtocolError):
        fresh.screened_unanswered(1.0)
    assert fresh.last_received == 0.0
