"""fpolicyd.server.preflight: the checks `serve` and `config check` share (directories, sink URIs), without writing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.config import SINK_SCHEMES, load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.server.preflight import directory_problem, preflight, sink_problem, write_targets


def test_a_directory_that_does_not_exist_yet_under_a_writable_one_is_fine_and_not_created(tmp_path: Path) -> None:
    assert directory_problem(tmp_path / "a" / "b" / "c") is None
    assert not (tmp_path / "a").exists()


def test_a_file_in_the_path_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "spool", tmp_path / "f" / "a" / "b"):
        problem = directory_problem(path)
        assert problem is not None
        assert problem.errno == errno.ENOTDIR
        assert problem.filename == str(tmp_path / "f")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes any directory whatever its mode")
def test_a_directory_without_write_permission_is_eacces(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        problem = directory_problem(locked / "spool")
    finally:
        locked.chmod(0o700)
    assert problem is not None
    assert problem.errno == errno.EACCES


def test_write_targets_name_the_setting_the_user_set(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": str(tmp_path)}, search_default_paths=False)
    targets = write_targets(settings, settings.effective_sinks)
    assert (targets[0].setting, targets[0].path) == ("data_dir", tmp_path / "spool")
    assert {target.setting for target in targets} == {"data_dir", f"sink jsonl:{tmp_path / 'events'}"}
    settings = load_settings(
        overrides={"data_dir": str(tmp_path), "spool_dir": str(tmp_path / "s")}, search_default_paths=False
    )
    names = {target.setting: target.path for target in write_targets(settings, ())}
    assert names["spool_dir"] == tmp_path / "s"


@pytest.mark.parametrize(
    ("uri", "fine"),
    [
        ("stdout:", True),
        ("jsonl:/var/log/fpolicy", True),
        ("sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/q", True),
        ("sqs:http://127.0.0.1:4566/000000000000/q", True),
        ("eventbridge:bus", True),
        ("sqs:notaurl", False),
        ("sqs:https://sqs.eu-west-1.amazonaws.com/", False),
        ("sqs:", False),
        ("eventbridge: ", False),
        ("kafka:x", False),
        ("nocolon", False),
    ],
)
def test_sink_uris(uri: str, fine: bool) -> None:
    assert (sink_problem(uri) is None) is fine


@given(st.text(max_size=80))
def test_sink_problem_never_raises_and_accepts_only_known_schemes(uri: str) -> None:
    problem = sink_problem(uri)
    if problem is None:
        assert uri.partition(":")[0] in SINK_SCHEMES
    else:
        assert problem.startswith("sink ")


def test_preflight_lists_every_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    settings = load_settings(
        overrides={"data_dir": str(tmp_path / "f"), "sinks": "sqs:notaurl"}, search_default_paths=False
    )
    with pytest.raises(ConfigError) as raised:
        preflight(settings)
    message = str(raised.value)
    assert "sqs:notaurl" in message
    assert f"data_dir {tmp_path / 'f'}" in message
