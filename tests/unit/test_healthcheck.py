"""`fpolicyd healthcheck` against a tiny http.server on 127.0.0.1: healthy, unhealthy, refused, silent."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fpolicyd.cli.healthcheck import health_url, probe
from fpolicyd.cli.main import main

ANSWERS = {
    "/healthz": (200, b"ok"),
    "/readyz": (503, b"not ready: sink sqs:q unreachable"),
    "/moved": (302, b""),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS.get(self.path, (404, b"no such path"))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/healthz")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthy_endpoint_exits_0(http_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["healthcheck", "--http-host", "127.0.0.1", "--http-port", str(http_port)]) == 0
    assert capsys.readouterr().err == ""


def test_settings_come_from_the_environment_like_the_daemons(
    http_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FPOLICYD_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("FPOLICYD_HTTP_PORT", str(http_port))
    assert main(["healthcheck"]) == 0
    assert main(["healthcheck", "--ready"]) == 1
    assert "HTTP 503 not ready: sink sqs:q unreachable" in capsys.readouterr().err


def test_unhealthy_status_exits_1_with_the_reason(http_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{http_port}/readyz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fpolicyd healthcheck: unhealthy: ")
    assert "/readyz: HTTP 503" in err


def test_a_redirect_is_unhealthy_not_followed(http_port: int) -> None:
    result = probe(f"http://127.0.0.1:{http_port}/moved", 2.0)
    assert not result.healthy
    assert "HTTP 302" in result.reason


def test_connection_refused_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    assert main(["healthcheck", "--http-host", "127.0.0.1", "--http-port", str(port)]) == 1
    assert "refused" in capsys.readouterr().err.lower()


def test_a_server_that_never_answers_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        port = silent.getsockname()[1]
        code = main(["healthcheck", "--url", f"http://127.0.0.1:{port}/healthz", "--timeout", "0.3"])
    assert code == 1
    assert "no response within 0.3 s" in capsys.readouterr().err


def test_bad_settings_are_unhealthy_not_docker_reserved_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["healthcheck", "--http-port", "70000"]) == 1
    assert "http_port" in capsys.readouterr().err


def test_only_http_urls_are_probed() -> None:
    result = probe("file:///etc/passwd", 1.0)
    assert not result.healthy
    assert "not an http(s) URL" in result.reason


@pytest.mark.parametrize(
    ("host", "ready", "url"),
    [
        ("127.0.0.1", False, "http://127.0.0.1:9100/healthz"),
        ("0.0.0.0", True, "http://127.0.0.1:9100/readyz"),
        ("::", False, "http://[::1]:9100/healthz"),
        ("fd00::5", False, "http://[fd00::5]:9100/healthz"),
        ("metrics.local", False, "http://metrics.local:9100/healthz"),
    ],
)
def test_health_url(host: str, ready: bool, url: str) -> None:
    assert health_url(host, 9100, ready=ready) == url


def test_the_health_check_does_not_import_the_other_commands() -> None:
    """It runs every 30 s beside a busy daemon (timeout 5 s): building every subcommand's parser imported aiohttp,
    routing, the ONTAP client, ... and took 3-5 s on a loaded 2-core box instead of 0.5 s."""
    probe_script = (
        "import sys\n"
        "from fpolicyd.cli.main import main\n"
        "main(['healthcheck', '--url', 'http://127.0.0.1:1/healthz', '--timeout', '0.5'])\n"
        "light = {'fpolicyd.cli', 'fpolicyd.cli.main', 'fpolicyd.cli.parser', 'fpolicyd.cli.settings_flags',"
        " 'fpolicyd.cli.healthcheck'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' or m.startswith('fpolicyd.ontap')"
        " or (m.startswith('fpolicyd.cli.') and m not in light))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe_script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
    assert "unhealthy" in result.stderr
