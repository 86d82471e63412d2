"""``fpolicyd simulate``'s flags: wall-clock GenerationTime by default, grouped help with defaults, errors that
name the flag (issue 15 #5 and #7)."""

from __future__ import annotations

import dataclasses

import pytest

from fpolicyd.cli.main import build_parser, main
from fpolicyd.cli.simulate import GROUPS, config_from_args
from fpolicyd.simulator.client import SimulatorConfig
from fpolicyd.simulator.generate import DEFAULT_BASE_TIME_US


def parse(*flags: str) -> SimulatorConfig:
    return config_from_args(build_parser().parse_args(["simulate", *flags]))


def test_the_cli_stamps_the_wall_clock_by_default() -> None:
    config = parse("--port", "9999", "--events", "10")
    assert config.wall_clock is True
    assert (config.port, config.events) == (9999, 10)
    assert parse("--now").wall_clock is True  # the old flag is still accepted: it asked for what is now the default


def test_a_fixed_time_is_asked_for() -> None:
    fixed = parse("--fixed-time")
    assert (fixed.wall_clock, fixed.base_time_us) == (False, DEFAULT_BASE_TIME_US)
    based = parse("--base-time-us", "1800000000000000")
    assert (based.wall_clock, based.base_time_us) == (False, 1_800_000_000_000_000)


def test_targets_are_comma_separated() -> None:
    config = parse("--targets", "a:1, b:2", "--secondary-targets", "c:3")
    assert (config.targets, config.secondary_targets) == (("a:1", "b:2"), ("c:3",))
    assert config.primaries == (("a", 1), ("b", 2))


def test_every_config_field_has_a_flag_in_one_group_with_a_description() -> None:
    grouped = [name for _title, names in GROUPS for name in names]
    assert len(grouped) == len(set(grouped))
    fields = {f.name: f for f in dataclasses.fields(SimulatorConfig)}
    assert set(grouped) | {"base_time_us", "wall_clock"} == set(fields)
    assert all(fields[name].metadata["help"] for name in fields)


def test_help_is_grouped_with_defaults_and_says_events_are_per_node(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for title in ("server:", "load:", "GenerationTime", "ONTAP behaviour:", "run:"):
        assert title in text
    assert "SCREEN_REQs per node" in text
    assert "(default: 1000)" in text
    assert "(default: 9898)" in text
    assert "--fixed-time" in text
    assert "--now" not in text
    assert text.index("load:") < text.index("GenerationTime") < text.index("ONTAP behaviour:")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--events", "abc"], "--events: must be an integer >= 0, got 'abc'"),
        (["--nodes", "0"], "--nodes: must be an integer in 1..4096, got '0'"),
        (["--rate", "fast"], "--rate: must be a finite number >= 0 (0 = unlimited), got 'fast'"),
        (["--port", "70000"], "--port: must be an integer in 1..65535, got '70000'"),
        (["--targets", "a:1,b"], "--targets: 'b' is not HOST:PORT with a port in 1..65535, got 'a:1,b'"),
        (["--base-time-us", "-1"], "--base-time-us: must be an integer >= 0 (epoch microseconds), got '-1'"),
    ],
)
def test_a_bad_value_names_the_flag(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"fpolicyd simulate: {message}\n"
    assert "SimulatorConfig" not in err
