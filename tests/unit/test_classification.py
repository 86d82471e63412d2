"""Data classification: path hashing, log redaction per level, event and ledger redaction, settings."""

from __future__ import annotations

import hashlib
import hmac
import io
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.events import FileEvent, NameMaps, load_event_schema, load_reference_schema, normalize
from fpolicyd.obs.log import configure_logging, get_logger
from fpolicyd.pipeline.redaction import MASK, DataClassification, Redactor
from fpolicyd.protocol.context import SessionContext
from fpolicyd.protocol.messages import ScreenRequest
from fpolicyd.protocol.xml_codec import decode_payload
from support.captures import SMB_REN

DEV, PROD, REGULATED = DataClassification.DEV, DataClassification.PROD, DataClassification.REGULATED
CTX = SessionContext(
    vs_uuid="45228b37-6292-11ee-b5d1-000c29cdbe04",
    policy_name="policy-test-flo",
    session_id="d8ad84cc-79dd-11ee-b638-000c29cdbe04",
    protocol_version="1.2",
    peer="192.168.11.10:34567",
)
RECEIVED_US = 1_707_492_533_000_001


def rename_event() -> FileEvent:
    request = decode_payload(SMB_REN.payload).message
    assert isinstance(request, ScreenRequest)
    return normalize(request, CTX, NameMaps(), RECEIVED_US)


def test_hash_is_slash_and_16_hex_of_sha256() -> None:
    path = "/finance/q3/report.pdf"
    assert Redactor().hash_path(path) == "/" + hashlib.sha256(path.encode()).hexdigest()[:16]


def test_salt_keys_the_hash_with_hmac() -> None:
    path = "/finance/q3/report.pdf"
    salted = Redactor(salt=b"s3cret").hash_path(path)
    assert salted == "/" + hmac.new(b"s3cret", path.encode(), hashlib.sha256).hexdigest()[:16]
    assert salted != Redactor(salt=b"other").hash_path(path)


@given(st.text(max_size=200), st.text(max_size=200))
def test_hash_is_deterministic_and_separates_paths(a: str, b: str) -> None:
    redactor = Redactor(salt=b"k")
    assert redactor.hash_path(a) == redactor.hash_path(a)
    hashed = redactor.hash_path(a)
    assert len(hashed) == 17
    assert hashed.startswith("/")
    int(hashed[1:], 16)
    if a != b:
        assert hashed != redactor.hash_path(b)  # a 64-bit collision would be news


def log_as(level: DataClassification) -> dict[str, Any]:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream, redactor=Redactor(level=level))
    try:
        get_logger("test").info(
            "probe",
            path="/hr/salaries.xlsx",
            user={"uid": 1000, "sid": "S-1-5-21-1"},
            detail={"file_path": "/x", "sid": "S-1-5-21-2"},
            peer="10.0.0.5:1234",
        )
    finally:
        configure_logging(redactor=Redactor())
    record: dict[str, Any] = orjson.loads(stream.getvalue().splitlines()[-1])
    return record


def test_dev_logs_everything_in_clear() -> None:
    record = log_as(DEV)
    assert record["path"] == "/hr/salaries.xlsx"
    assert record["user"] == {"uid": 1000, "sid": "S-1-5-21-1"}


def test_prod_logs_hash_paths_and_mask_users() -> None:
    record = log_as(PROD)
    assert record["path"] == Redactor().hash_path("/hr/salaries.xlsx")
    assert record["user"] == MASK
    assert record["detail"] == {"file_path": Redactor().hash_path("/x"), "sid": MASK}
    assert record["peer"] == "10.0.0.5:1234"


def test_regulated_logs_drop_users() -> None:
    record = log_as(REGULATED)
    assert "user" not in record
    assert record["detail"] == {"file_path": Redactor().hash_path("/x")}
    assert record["path"] == Redactor().hash_path("/hr/salaries.xlsx")


def test_default_logging_is_prod() -> None:
    """The default settings' redactor (what ``fpolicyd serve`` logs through) and a bare Redactor() are prod."""
    settings = load_settings(search_default_paths=False)
    for redactor in (settings.redactor(), Redactor()):
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream, redactor=redactor)
        get_logger("test").info("probe", path="/a/b", user={"uid": 1000})
        record = orjson.loads(stream.getvalue())
        assert record["path"] == Redactor().hash_path("/a/b")
        assert record["user"] == MASK
    configure_logging(redactor=Redactor())


def test_logging_is_never_configured_without_a_redactor() -> None:
    """There is no default redactor to fall back on: a caller that forgot one would log paths in clear."""
    with pytest.raises(TypeError, match="redactor"):
        configure_logging("info", "json")  # type: ignore[call-arg]


def test_events_are_left_alone_unless_asked() -> None:
    event = rename_event()
    assert Redactor(level=REGULATED).redact_event(event) is event
    assert Redactor(level=DEV, classify_events=True).redact_event(event) is event


def validate(event: FileEvent) -> None:
    jsonschema.validate(orjson.loads(event.to_json()), load_event_schema())
    if event.operation_type in ("create", "write", "delete", "rename"):
        body = orjson.loads(event.to_json())
        jsonschema.validate(body, load_reference_schema())


def test_prod_events_keep_paths_and_drop_identities() -> None:
    event = rename_event()
    redacted = Redactor(level=PROD, classify_events=True).redact_event(event)
    assert redacted.file_path == event.file_path
    assert redacted.metadata["user"] == {"id_type": event.metadata["user"]["id_type"]}
    assert "uid" in event.metadata["user"] or "sid" in event.metadata["user"]  # the input is untouched
    validate(redacted)


def test_regulated_events_hash_every_path_and_drop_identities() -> None:
    event = rename_event()
    redactor = Redactor(level=REGULATED, salt=b"k", classify_events=True)
    redacted = redactor.redact_event(event)
    assert event.previous_path is not None
    assert redacted.file_path == redactor.hash_path(event.file_path)
    assert redacted.previous_path == redactor.hash_path(event.previous_path)
    assert redacted.metadata["path_hashed"] is True
    if "display_path" in event.metadata:
        assert redacted.metadata["display_path"] == redactor.hash_path(event.metadata["display_path"])
    assert set(redacted.metadata["user"]) <= {"id_type"}
    assert redacted.event_id == event.event_id  # identity for dedup and replay detection is unchanged
    validate(redacted)


def test_ledger_records_follow_the_same_rules() -> None:
    record = {"event_id": "e", "file_path": "/legal/a.pdf", "user": "alice", "decision": "duplicate"}
    assert Redactor(level=REGULATED, classify_events=True).redact_record(record) == {
        "event_id": "e",
        "file_path": Redactor().hash_path("/legal/a.pdf"),
        "decision": "duplicate",
    }
    assert Redactor(level=PROD, classify_events=True).redact_record(record)["user"] == MASK
    assert Redactor(level=PROD).redact_record(record) == record


def test_salt_comes_from_the_environment_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_CLASSIFICATION_SALT", "pepper")
    monkeypatch.setenv("FPOLICYD_DATA_CLASSIFICATION", "regulated")
    settings = load_settings(search_default_paths=False)
    assert settings.redactor() == Redactor(level=REGULATED, salt=b"pepper")
    assert "pepper" not in settings.model_dump_json()


def test_bad_level_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="data_classification"):
        load_settings(overrides={"data_classification": "secret"}, search_default_paths=False)
