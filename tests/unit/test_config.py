from __future__ import annotations

from pathlib import Path

import pytest

from fpolicyd.config import example_toml, load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.protocol.session_config import EngineMode

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FPOLICYD_") or name in (
            "FPOLICY_PORT",
            "MODE",
            "LOG_DIR",
            "SQS_QUEUE_URL",
            "SVM_NAME",
            "VOLUME_NAME",
            "WRITE_COMPLETE_DELAY_SEC",
            "FPOLICY_FORMAT",
            "PROTOBUF_FRAMING_MODE",
            "EVENT_BUS_NAME",
            "DEDUP_WINDOW_MINUTES",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./fpolicyd.toml is picked up by accident


def test_embedded_default() -> None:
    settings = load_settings(search_default_paths=False)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 9898)
    assert settings.effective_sinks == ("jsonl:fpolicyd-data/events",)
    assert settings.engine_mode is EngineMode.ASYNC
    assert settings.effective_idle_timeout_s == 360.0


def test_reference_environment_names_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICY_PORT", "9999")
    monkeypatch.setenv("MODE", "batch")
    monkeypatch.setenv("LOG_DIR", "/var/log/fpolicy")
    monkeypatch.setenv("SVM_NAME", "svm1")
    monkeypatch.setenv("VOLUME_NAME", "vol1")
    monkeypatch.setenv("WRITE_COMPLETE_DELAY_SEC", "5")
    monkeypatch.setenv("FPOLICY_FORMAT", "xml")
    settings = load_settings()
    assert settings.listen_port == 9999
    assert settings.effective_sinks == ("jsonl:/var/log/fpolicy",)
    assert (settings.svm_name, settings.volume_name, settings.write_complete_delay_s) == ("svm1", "vol1", 5.0)


def test_realtime_mode_selects_sqs_and_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "realtime")
    with pytest.raises(ConfigError, match="SQS_QUEUE_URL"):
        load_settings()
    monkeypatch.setenv("SQS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/q")
    assert load_settings().effective_sinks == ("sqs:https://sqs.eu-west-1.amazonaws.com/1/q",)


def test_precedence_flags_over_env_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text('listen_port = 1000\nlisten_host = "127.0.0.1"\nsvm_name = "from-file"\n')
    assert load_settings(config).listen_port == 1000
    monkeypatch.setenv("FPOLICYD_LISTEN_PORT", "2000")
    settings = load_settings(config)
    assert (settings.listen_port, settings.listen_host) == (2000, "127.0.0.1")
    assert load_settings(config, {"listen_port": "3000"}).listen_port == 3000


def test_default_config_file_in_the_working_directory_is_found(tmp_path: Path) -> None:
    (tmp_path / "fpolicyd.toml").write_text("max_connections = 7\n")
    assert load_settings().max_connections == 7


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text("listen_prot = 1\n")
    with pytest.raises(ConfigError, match="listen_prot") as raised:
        load_settings(config)
    assert str(raised.value) == f"unknown setting 'listen_prot' in {config} (did you mean listen_port?)"


def test_unknown_key_of_the_inline_settings_says_where_and_what_was_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_SETTINGS_TOML", "max_conections = 3\nzzzz_qqqq = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(search_default_paths=False)
    message = str(raised.value)
    assert "unknown setting 'max_conections' in FPOLICYD_SETTINGS_TOML (did you mean max_connections?)" in message
    assert "unknown setting 'zzzz_qqqq' in FPOLICYD_SETTINGS_TOML\n" in message + "\n"  # nothing close: no guess
    assert "Extra inputs" not in message


def test_unknown_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_LISTEN_PROT", "1")
    with pytest.raises(ConfigError, match="FPOLICYD_LISTEN_PROT") as raised:
        load_settings()
    assert str(raised.value) == "unknown environment variable FPOLICYD_LISTEN_PROT (did you mean FPOLICYD_LISTEN_PORT?)"


@pytest.mark.parametrize("variable", ["FPOLICY_PORT", "FPOLICYD_LISTEN_PORT"])
def test_an_environment_error_names_the_variable_set_and_its_value(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "abc")
    with pytest.raises(ConfigError) as raised:
        load_settings(search_default_paths=False)
    assert str(raised.value).startswith(f"{variable}='abc' (setting listen_port): Input should be a valid integer")


def test_a_secret_value_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_SETTINGS_TOML", "ontap_password = 987654\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(search_default_paths=False)
    assert "987654" not in str(raised.value)
    assert "ontap_password = <hidden> in FPOLICYD_SETTINGS_TOML" in str(raised.value)


def test_a_combination_error_has_no_pydantic_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "realtime")
    with pytest.raises(ConfigError) as raised:
        load_settings(search_default_paths=False)
    assert str(raised.value) == "mode (MODE) is realtime but sqs_queue_url (SQS_QUEUE_URL) is empty"


def test_a_flag_error_names_the_flag_and_every_error_is_listed(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text("max_connections = 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {"listen_port": "abc"})
    lines = str(raised.value).splitlines()
    assert lines[0] == "invalid settings:"
    assert lines[1].startswith("  --listen-port 'abc' (listen_port): Input should be a valid integer")
    assert lines[2] == f"  max_connections = 0 in {config}: Input should be greater than or equal to 1"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"listen_port": "70000"}, "listen_port"),
        ({"max_frame_bytes": "10"}, "max_frame_bytes"),
        ({"engine_mode": "sometimes"}, "engine_mode"),
        ({"log_level": "loud"}, "log_level"),
        ({"sinks": "kafka:x"}, "sinks"),
        ({"keep_alive_interval_s": "120", "idle_timeout_s": "120"}, "keep_alive_interval_s"),
        ({"fpolicy_format": "json"}, "fpolicy_format"),
        ({"protobuf_framing_mode": "FRAMELESS"}, "protobuf_framing_mode"),
        ({"protobuf_framing_mode": "zigzag"}, "protobuf_framing_mode"),
        ({"volume_names": {"not-a-number": "v"}}, "volume_names"),
    ],
)
def test_bad_values_fail_with_the_key_named(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(overrides=overrides, search_default_paths=False)


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text("listen_port = \n")
    with pytest.raises(ConfigError, match=str(config)):
        load_settings(config)


def test_missing_explicit_config_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(Path("/nonexistent/fpolicyd.toml"))


def test_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_SINKS", "jsonl:/a, stdout:")
    monkeypatch.setenv("FPOLICYD_PREFERRED_VERSIONS", "1.0")
    monkeypatch.setenv("FPOLICYD_VOLUME_NAMES", '{"2157674396": "vol1"}')
    settings = load_settings()
    assert settings.effective_sinks == ("jsonl:/a", "stdout:")
    assert settings.preferred_versions == ("1.0",)
    assert settings.volume_names == {2157674396: "vol1"}


def test_settings_are_frozen() -> None:
    from pydantic import ValidationError

    settings = load_settings(search_default_paths=False)
    with pytest.raises(ValidationError):
        settings.listen_port = 1


def test_committed_example_is_generated_from_the_settings() -> None:
    assert (REPO / "config" / "fpolicyd.example.toml").read_text(encoding="utf-8") == example_toml()


def test_example_file_loads_and_equals_the_defaults() -> None:
    from_file = load_settings(REPO / "config" / "fpolicyd.example.toml")
    assert from_file == load_settings(search_default_paths=False)


def test_a_whole_settings_file_can_come_from_one_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_SETTINGS_TOML", 'max_connections = 7\nallowed_networks = ["10.0.0.0/8"]\n')
    monkeypatch.setenv("FPOLICYD_LOG_LEVEL", "debug")
    settings = load_settings(search_default_paths=False)
    assert settings.max_connections == 7
    assert settings.allowed_networks == ("10.0.0.0/8",)
    assert settings.log_level == "debug"
    monkeypatch.setenv("FPOLICYD_MAX_CONNECTIONS", "9")  # an individual variable wins over it
    assert load_settings(search_default_paths=False).max_connections == 9


def test_a_bad_inline_settings_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_SETTINGS_TOML", "max_connections = ")
    with pytest.raises(ConfigError, match="FPOLICYD_SETTINGS_TOML"):
        load_settings(search_default_paths=False)
    monkeypatch.setenv("FPOLICYD_SETTINGS_TOML", "no_such_key = 1")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_settings(search_default_paths=False)


def test_the_gap_above_the_pause_watermark_must_hold_two_segments() -> None:
    """Past backpressure_pause_bytes only the processing stage appends, and space frees only once it has finished a
    segment: a gap smaller than two segments could leave it no room to finish one (a deadlock at a full spool)."""
    sizes = {
        "spool_segment_bytes": 1 << 20,
        "backpressure_low_bytes": 2 << 20,
        "backpressure_high_bytes": 4 << 20,
        "backpressure_pause_bytes": 8 << 20,
    }
    with pytest.raises(ConfigError, match="at least two spool segments"):
        load_settings(overrides={**sizes, "spool_max_bytes": (9 << 20)}, search_default_paths=False)
    assert load_settings(overrides={**sizes, "spool_max_bytes": (10 << 20)}, search_default_paths=False)


def test_several_delivery_processes_need_the_delivery_process() -> None:
    with pytest.raises(ConfigError, match="delivery_processes = 2 needs delivery_process on or auto"):
        load_settings(overrides={"delivery_process": "off", "delivery_processes": 2}, search_default_paths=False)
    assert load_settings(overrides={"delivery_processes": 2}, search_default_paths=False).delivery_processes == 2
    with pytest.raises(ConfigError, match="delivery_processes"):
        load_settings(overrides={"delivery_processes": 17}, search_default_paths=False)
