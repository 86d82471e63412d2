"""Help of the commands whose flags are the settings (issue 15 #7): short, grouped by area, the settings a command
cannot run without first, every setting's description and default one flag away (``--help-settings``)."""

from __future__ import annotations

import re

import pytest

from fpolicyd.cli.main import main
from fpolicyd.cli.ontap import REQUIRED_SETTINGS
from fpolicyd.cli.settings_flags import SETTING_AREAS, area_fields, setting_flag, setting_help
from fpolicyd.config import Settings, load_settings

FLAGS = {setting_flag(name) for name in Settings.model_fields}


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_setting_is_in_exactly_one_area() -> None:
    areas = area_fields()
    assert list(areas) == [key for key, _title, _first in SETTING_AREAS]
    listed = [name for names in areas.values() for name in names]
    assert listed == list(Settings.model_fields)
    firsts = [first for _key, _title, first in SETTING_AREAS]
    assert [names[0] for names in areas.values()] == firsts


@pytest.mark.parametrize("command", [("serve",), ("config", "check"), ("config", "show"), ("healthcheck",)])
def test_help_lists_every_setting_flag_by_area_and_is_short(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(capsys, *command, "--help")
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: fpolicyd {' '.join(command)} [")
    assert lines[1] == "" or not lines[1].startswith(" "), "the usage line is one line, not every flag"
    # Packed: several flags a line, grouped by area. The bound follows the number of settings (a fixed 110 broke as
    # soon as settings were added); one line per flag, the form this replaced, would be over it.
    assert len(lines) < 0.8 * len(FLAGS), (len(lines), len(FLAGS))
    # Every flag is listed, and none is broken across two lines ("--tls-min-" / "version").
    words = set(re.findall(r"--[a-z0-9-]+", text))
    assert words >= FLAGS
    assert {w for w in words if w.endswith("-")} == set()
    for _key, title, _first in SETTING_AREAS:
        assert title in text


def test_config_help_is_not_the_help_of_its_actions(capsys: pytest.CaptureFixture[str]) -> None:
    config = help_of(capsys, "config", "--help")
    check = help_of(capsys, "config", "check", "--help")
    assert len(config.splitlines()) < 25
    assert "{check,show,example}" in config
    assert "validate the settings" in check
    assert check != config


def test_ontap_help_puts_the_required_settings_first(capsys: pytest.CaptureFixture[str]) -> None:
    """The four settings without which no ontap command runs (url, svm, username and password, or a secret
    in place of both) come right after the command's own options, each described."""
    text = help_of(capsys, "ontap", "plan", "--help")
    lines = text.splitlines()
    first_setting = min(i for i, line in enumerate(lines) if set(re.findall(r"--[a-z0-9-]+", line)) & FLAGS)
    required_lines = {
        setting_flag(name): next(i for i, line in enumerate(lines) if line.lstrip().startswith(setting_flag(name)))
        for name in REQUIRED_SETTINGS
    }
    assert min(required_lines.values()) == first_setting
    assert max(required_lines.values()) < 30
    assert "ONTAP REST password" in text
    assert len(lines) <= 200, len(lines)


def test_help_settings_describes_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, "serve", "--help-settings")
    flat = " ".join(text.split())
    for name in Settings.model_fields:
        assert setting_flag(name) in text
        assert " ".join(setting_help(name).split()) in flat
    assert "(default: 9898)" in flat
    only_tls = help_of(capsys, "config", "check", "--help-settings", "tls")
    assert "--tls-mode" in only_tls
    assert "--listen-port" not in only_tls


def test_setting_flags_still_set_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--listen-port", "1234", "--log-format", "console"]) == 0
    assert capsys.readouterr().out == "settings OK\n"
    assert main(["config", "check", "--listen-port", "nope"]) == 2
    assert "listen_port" in capsys.readouterr().err
    assert load_settings(overrides={"listen_port": 1234}, search_default_paths=False).listen_port == 1234
