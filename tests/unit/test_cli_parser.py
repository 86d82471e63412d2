"""Did-you-mean for a mistyped option or command of any ``fpolicyd`` command (fpolicyd.cli.parser)."""

from __future__ import annotations

import argparse

import pytest

from fpolicyd.cli.main import _healthcheck_parser, build_parser, main
from fpolicyd.cli.parser import FpolicydArgumentParser
from fpolicyd.errors import did_you_mean


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines argparse wrote on stderr (exit 2 checked)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_a_mistyped_option_names_the_closest_one_after_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    lines = error_of(["serve", "--listen-prot", "1"], capsys)
    assert lines[0].startswith("usage: fpolicyd serve ")
    assert lines[-1] == "fpolicyd serve: error: unknown option --listen-prot (did you mean --listen-port?)"
    assert sum(1 for line in lines if "error" in line) == 1
    # --flag=value spelling; a nested command's own options.
    assert error_of(["serve", "--listen-prot=1"], capsys)[-1].endswith("(did you mean --listen-port?)")
    assert error_of(["replay-test", "--outage-secs", "2"], capsys)[-1] == (
        "fpolicyd replay-test: error: unknown option --outage-secs (did you mean --outage-s?)"
    )
    assert error_of(["ontap", "status", "--policy-nam", "x"], capsys)[-1].startswith(
        "fpolicyd ontap status: error: unknown option --policy-nam (did you mean --"
    )
    assert error_of(["--verison"], capsys)[-1] == "fpolicyd: error: unknown option --verison (did you mean --version?)"
    assert error_of(["healthcheck", "--http-prot", "1"], capsys)[-1] == (
        "fpolicyd healthcheck: error: unknown option --http-prot (did you mean --http-port?)"
    )


def test_nothing_close_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(["serve", "--zzzzqqqq", "1"], capsys)[-1] == "fpolicyd serve: error: unknown option --zzzzqqqq"
    assert (
        error_of(["replay-test", "stray"], capsys)[-1] == "fpolicyd replay-test: error: unrecognized arguments: stray"
    )


def test_a_mistyped_command_names_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(["serv"], capsys)[-1] == "fpolicyd: error: unknown command serv (did you mean serve?)"
    assert (
        error_of(["replay-tset"], capsys)[-1]
        == "fpolicyd: error: unknown command replay-tset (did you mean replay-test?)"
    )
    assert error_of(["ontap", "stauts"], capsys)[-1] == (
        "fpolicyd ontap: error: unknown command stauts (did you mean status?)"
    )
    assert (
        error_of(["config", "chek"], capsys)[-1] == "fpolicyd config: error: unknown command chek (did you mean check?)"
    )
    nothing = error_of(["xyzzy"], capsys)[-1]
    assert nothing.startswith("fpolicyd: error: unknown command xyzzy (choose from serve, config, ")
    assert "did you mean" not in nothing


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.extend(subparsers(child))
    return found


def test_every_fpolicyd_parser_is_the_suggesting_one() -> None:
    for root in (build_parser(), _healthcheck_parser()):
        parsers = subparsers(root)
        assert len(parsers) > 1
        assert all(isinstance(p, FpolicydArgumentParser) for p in parsers), [
            p.prog for p in parsers if not isinstance(p, FpolicydArgumentParser)
        ]


def test_did_you_mean_wording() -> None:
    assert did_you_mean("listen_prot", ["listen_port", "data_dir"]) == " (did you mean listen_port?)"
    assert did_you_mean("qqq", ["listen_port"]) == ""


def command(*names: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize(
    "names", [("replay-test",), ("ontap",), ("ontap", "status"), ("ontap", "plan"), ("ontap", "apply")]
)
def test_every_option_has_a_help_text(names: tuple[str, ...]) -> None:
    parser = command(*names)
    options = [a for a in parser._actions if a.option_strings]
    assert options
    # Settings flags of areas listed by name (--help-settings AREA describes them) are the one exception.
    listed = [a for a in options if a.help != argparse.SUPPRESS]
    assert listed
    assert all(a.help and a.help.strip() for a in listed), [a.option_strings for a in listed if not a.help]


def test_replay_test_help_is_grouped_with_defaults_and_says_events_are_the_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = command("replay-test")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings
    with pytest.raises(SystemExit) as exited:
        main(["replay-test", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    titles = ["\nrun shape:", "\ndaemon (", "\nsink (", "\noutput:", "\ntime bounds:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    assert text.index("--events N") < text.index("--restart-daemon") < text.index("--plot FILE.html")
    assert "the total across the nodes" in " ".join(text.split())
    assert "--plot-interval-s S" in text


def test_ontap_status_help_puts_its_own_options_and_the_required_settings_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ontap", "status", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--format {text,json}  text for people, json for scripts (default text)" in text
    order = [text.index(t) for t in ("--format", "required settings", "--ontap-url", "\nsettings:")]
    assert order == sorted(order)
