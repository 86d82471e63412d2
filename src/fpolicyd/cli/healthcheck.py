"""``fpolicyd healthcheck``: probe the daemon's HTTP ``/healthz`` (or ``/readyz``) and exit 0 if it answers 200.

This is the container health check (Dockerfile ``HEALTHCHECK``, the ECS task definition): it needs no curl in
the image and reads the same settings as the daemon (``http_host``/``http_port`` from the environment, the TOML
file or flags), so it probes wherever the daemon serves. It never touches the FPolicy port: a TCP connect there
would look like an ONTAP session that never sends NEGO_REQ.

Exit status follows Docker's convention: 0 healthy, 1 unhealthy (with the reason on stderr). Docker reserves 2,
so a settings problem is reported as 1 too.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError

#: Default probe timeout: well under the health check's own timeout (5 s in the Dockerfile and task definition).
DEFAULT_TIMEOUT_S = 3.0
#: Longest part of an unhealthy response body echoed on stderr.
MAX_REASON_BODY = 200
#: A wildcard bind address is probed on the loopback of the same family.
_WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    healthy: bool
    #: What happened, for stderr: the HTTP status (and body) or the connection error.
    reason: str


def add_healthcheck_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "healthcheck",
        help="probe the daemon's /healthz (or /readyz); exit 0 if healthy",
        description="GET http://{http_host}:{http_port}/healthz (settings as for serve: flags, FPOLICYD_* "
        "environment, TOML file) or --url; exit 0 on HTTP 200, 1 otherwise with the reason on stderr.",
    )
    parser.add_argument("--url", help="probe this URL instead of the one the settings give")
    parser.add_argument("--ready", action="store_true", help="probe /readyz instead of /healthz")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS", help="connect + response timeout"
    )
    return parser


def health_url(host: str, port: int, *, ready: bool) -> str:
    """The URL of the daemon's health (or readiness) endpoint for its ``http_host``/``http_port``."""
    address = _WILDCARD_TO_LOOPBACK.get(host, host)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}/{'readyz' if ready else 'healthz'}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A health endpoint answers itself; a redirect is an unhealthy answer, not something to follow."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


#: No proxies (an HTTP_PROXY in the container's environment must not capture a loopback probe), no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def probe(url: str, timeout_s: float) -> ProbeResult:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        return ProbeResult(False, f"{url}: not an http(s) URL")
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            status = int(response.status)
            body = response.read(MAX_REASON_BODY)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(MAX_REASON_BODY)
        return ProbeResult(False, f"{url}: HTTP {exc.code} {_text(body)}".rstrip())
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return ProbeResult(False, f"{url}: no response within {timeout_s:g} s")
        return ProbeResult(False, f"{url}: {_error_text(exc.reason)}")
    except TimeoutError:
        return ProbeResult(False, f"{url}: no response within {timeout_s:g} s")
    except OSError as exc:
        return ProbeResult(False, f"{url}: {_error_text(exc)}")
    if status != 200:
        return ProbeResult(False, f"{url}: HTTP {status} {_text(body)}".rstrip())
    return ProbeResult(True, f"{url}: HTTP 200")


def run_healthcheck(ns: argparse.Namespace, load_settings: Callable[[], Settings]) -> int:
    """Probe ``--url`` or the endpoint the settings give; 0 if healthy, 1 otherwise."""
    if ns.timeout <= 0:
        sys.stderr.write("fpolicyd healthcheck: --timeout must be positive\n")
        return 1
    if ns.url:
        url = str(ns.url)
    else:
        try:
            settings = load_settings()
        except ConfigError as exc:
            sys.stderr.write(f"fpolicyd healthcheck: unhealthy: {exc}\n")
            return 1
        url = health_url(settings.http_host, settings.http_port, ready=ns.ready)
    result = probe(url, ns.timeout)
    if not result.healthy:
        sys.stderr.write(f"fpolicyd healthcheck: unhealthy: {result.reason}\n")
        return 1
    return 0


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip().replace("\n", " ")


def _error_text(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)
