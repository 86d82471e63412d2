"""Start-up errors of `fpolicyd serve` and `fpolicyd config check`, as real subprocesses (issue 15, items 1-3).

A listen port in use, a data directory that cannot be written, a bad routes file or sink URI: one line on stderr
naming the setting and the reason, exit 2, nothing opened; and `config check` refuses exactly what `serve`
refuses, with the same message (both run fpolicyd.server.preflight.preflight).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Generous: a loaded machine imports fpolicyd in seconds; a serve that started despite a bad config would
#: run until killed, so this bounds the test.
RUN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str


def run_cli(tmp_path: Path, *args: str, environment: Mapping[str, str] | None = None) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPOLICYD_") and k not in _REFERENCE_VARS}
    env.update(environment or {})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fpolicyd", *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"fpolicyd {' '.join(args)} did not exit: {exc.stderr!r}") from None
    return Outcome(done.returncode, done.stderr.decode(errors="replace"))


_REFERENCE_VARS = frozenset({"MODE", "SQS_QUEUE_URL", "FPOLICY_PORT", "LOG_DIR", "EVENT_BUS_NAME"})

#: serve on loopback, a kernel-chosen port, no HTTP port to compete for.
SERVE: tuple[str, ...] = ("serve", "--listen-host", "127.0.0.1", "--listen-port", "0", "--http-port", "0")


def serve(tmp_path: Path, *args: str, environment: Mapping[str, str] | None = None) -> Outcome:
    command = SERVE
    if "FPOLICY_PORT" in (environment or {}):  # the flag would win over it
        command = ("serve", "--listen-host", "127.0.0.1", "--http-port", "0")
    return run_cli(tmp_path, *command, *args, environment=environment)


def check(tmp_path: Path, *args: str, environment: Mapping[str, str] | None = None) -> Outcome:
    return run_cli(tmp_path, "config", "check", *args, environment=environment)


def assert_one_line(outcome: Outcome, *fragments: str) -> None:
    assert outcome.code == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("fpolicyd: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------------------ item 1: port


def test_fpolicy_port_in_use_is_one_line_and_exit_2_before_anything_is_opened(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        data = tmp_path / "data"
        args = ("serve", "--listen-host", "127.0.0.1", "--listen-port", str(port), "--http-port", "0")
        outcome = run_cli(tmp_path, *args, "--data-dir", str(data))
    assert_one_line(outcome, f"listen_host/listen_port 127.0.0.1:{port}", "Address already in use")
    assert not data.exists()  # no spool, no dead-letter file, no sink directory: nothing was opened


def test_http_port_in_use_is_still_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = ("serve", "--listen-host", "127.0.0.1", "--listen-port", "0", "--http-host", "127.0.0.1")
        outcome = run_cli(tmp_path, *args, "--http-port", str(port), "--data-dir", str(tmp_path / "d"))
    assert_one_line(outcome, f"http_host/http_port 127.0.0.1:{port}", "Address already in use")


# ------------------------------------------------------------------------------ item 2: directories


def test_data_dir_under_a_file_names_data_dir_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    data = tmp_path / "a-file" / "data"
    outcome = serve(tmp_path, "--data-dir", str(data))
    assert_one_line(outcome, f"data_dir {data}", "Not a directory", str(tmp_path / "a-file"))


def test_spool_dir_that_is_a_file_names_spool_dir(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("not a directory")
    outcome = serve(tmp_path, "--data-dir", str(tmp_path / "data"), "--spool-dir", str(tmp_path / "spool"))
    assert_one_line(outcome, f"spool_dir {tmp_path / 'spool'}", "Not a directory")
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_directory_that_cannot_be_created_after_all_is_one_line_too(tmp_path: Path) -> None:
    """/proc passes the checks as root (a writable directory) but refuses mkdir: the spool's own error is then
    the last line, naming data_dir, without a traceback (non-root: preflight refuses it first)."""
    data = Path(f"/proc/fpolicyd-test-{os.getpid()}/data")
    outcome = serve(tmp_path, "--data-dir", str(data))
    assert outcome.code == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    last = outcome.stderr.splitlines()[-1]
    assert last.startswith(f"fpolicyd: data_dir {data}: "), last


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes any directory whatever its mode")
def test_data_dir_without_permission_names_data_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        outcome = serve(tmp_path, "--data-dir", str(locked / "data"))
    finally:
        locked.chmod(0o700)
    assert_one_line(outcome, f"data_dir {locked / 'data'}", "Permission denied")


# ----------------------------------------------------------------------- item 3: config check = serve


@dataclass(frozen=True)
class Bad:
    name: str
    #: Builds the files the case needs under tmp_path and returns the flags.
    flags: Callable[[Path], tuple[str, ...]]
    environment: Mapping[str, str] = field(default_factory=dict)
    #: What the message must say.
    says: tuple[str, ...] = ()


def _duplicate_route_ids(tmp_path: Path) -> tuple[str, ...]:
    route = 'name = "{name}"\nid = "UC1"\nprefixes = ["/{name}/"]\noperations = ["create"]\ntarget = "T"\n'
    text = "".join("[[route]]\n" + route.format(name=name) for name in ("a", "b"))
    (tmp_path / "routes.toml").write_text(text)
    return ("--routes-file", str(tmp_path / "routes.toml"))


def _file_at(relative: str) -> Callable[[Path], tuple[str, ...]]:
    def make(tmp_path: Path) -> tuple[str, ...]:
        (tmp_path / "blocker").write_text("a file")
        return ("--data-dir", str(tmp_path / relative))

    return make


def _settings_file(text: str) -> Callable[[Path], tuple[str, ...]]:
    def make(tmp_path: Path) -> tuple[str, ...]:
        (tmp_path / "fpolicyd.toml").write_text(text)
        return ("--config", str(tmp_path / "fpolicyd.toml"))

    return make


def _tls_without_cert(tmp_path: Path) -> tuple[str, ...]:
    missing = tmp_path / "missing"
    return ("--tls-mode", "server_auth", "--tls-cert-file", f"{missing}.crt", "--tls-key-file", f"{missing}.key")


def _jsonl_under_a_file(tmp_path: Path) -> tuple[str, ...]:
    (tmp_path / "blocker").write_text("a file")
    return ("--sinks", f"jsonl:{tmp_path / 'blocker' / 'events'}")


BAD: tuple[Bad, ...] = (
    Bad("duplicate route ids", _duplicate_route_ids, says=("'UC1' is already used",)),
    Bad("SQS_QUEUE_URL=notaurl", lambda _: (), {"MODE": "realtime", "SQS_QUEUE_URL": "notaurl"}, ("notaurl",)),
    Bad("sinks sqs:notaurl", lambda _: ("--sinks", "sqs:notaurl"), says=("not an SQS queue URL",)),
    Bad(
        "SQS sink without a region",
        lambda tmp_path: ("--sinks", "sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/q"),
        {"AWS_REGION": "", "AWS_DEFAULT_REGION": "", "AWS_CONFIG_FILE": "/nonexistent/aws-config"},
        ("aws_region: needed by sink",),
    ),
    Bad("sinks eventbridge: empty", lambda _: ("--sinks", "eventbridge:"), says=("needs a target",)),
    Bad("data_dir under a file", _file_at("blocker/data"), says=("data_dir", "Not a directory")),
    Bad("data_dir is a file", _file_at("blocker"), says=("data_dir", "Not a directory")),
    Bad("tls cert missing", _tls_without_cert, says=("tls_cert_file",)),
    Bad("jsonl sink under a file", _jsonl_under_a_file, says=("sink jsonl:", "Not a directory")),
    Bad("idle timeout too short", lambda _: ("--idle-timeout-s", "10"), says=("idle_timeout_s",)),
    # item 4: what the user wrote is named, with the value (never a secret's)
    Bad("FPOLICY_PORT=abc", lambda _: (), {"FPOLICY_PORT": "abc"}, ("FPOLICY_PORT='abc' (setting listen_port)",)),
    Bad(
        "unknown key in the file",
        _settings_file("listen_prot = 9899\n"),
        says=("unknown setting 'listen_prot' in ", "(did you mean listen_port?)"),
    ),
    Bad(
        "secret of the wrong type",
        _settings_file("classification_salt = 424242\n"),
        says=("classification_salt = <hidden> in ",),
    ),
    Bad("MODE=realtime without a queue", lambda _: (), {"MODE": "realtime"}, ("mode (MODE) is realtime",)),
)


@pytest.mark.parametrize("bad", BAD, ids=[bad.name for bad in BAD])
def test_config_check_refuses_what_serve_refuses_with_the_same_message(tmp_path: Path, bad: Bad) -> None:
    (tmp_path / "check").mkdir()
    (tmp_path / "serve").mkdir()
    checked = check(tmp_path / "check", *bad.flags(tmp_path / "check"), environment=bad.environment)
    served = serve(tmp_path / "serve", *bad.flags(tmp_path / "serve"), environment=bad.environment)
    assert checked.code == served.code == 2, (checked, served)
    assert "Traceback" not in checked.stderr + served.stderr
    assert checked.stderr.replace(str(tmp_path / "check"), "T") == served.stderr.replace(str(tmp_path / "serve"), "T")
    for fragment in bad.says:
        assert fragment in served.stderr, served.stderr
    assert "Value error" not in served.stderr
    assert "Extra inputs are not permitted" not in served.stderr
    assert "424242" not in served.stderr


def test_config_check_accepts_what_serve_starts_with(tmp_path: Path) -> None:
    outcome = run_cli(tmp_path, "config", "check", "--data-dir", str(tmp_path / "data"))
    assert outcome.code == 0, outcome.stderr
    assert not (tmp_path / "data").exists()  # check creates nothing
