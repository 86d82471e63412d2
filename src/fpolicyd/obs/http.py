"""The metrics and health HTTP server: ``/metrics`` (Prometheus text format), ``/healthz``, ``/readyz``.

It runs on its own threads (``http.server.ThreadingHTTPServer``), never on the event loop: a scrape or a probe
costs the readers nothing, and ``/healthz`` can still answer — with 503 — when the event loop is wedged.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fpolicyd.errors import ConfigError
from fpolicyd.obs.health import HealthReport
from fpolicyd.obs.log import get_logger

log = get_logger("fpolicyd.http")

_JSON = "application/json"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Not SO_REUSEADDR: a second daemon on the same port must fail loudly, not share it.
    allow_reuse_address = False


class ObservabilityServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        liveness: Callable[[], HealthReport],
        readiness: Callable[[], HealthReport],
    ) -> None:
        self.host = host
        self._requested_port = port
        self._registry = registry
        self._liveness = liveness
        self._readiness = readiness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        """Bind (raises ConfigError when the address is unusable) and serve on a background thread."""
        handler = _handler(self._registry, self._liveness, self._readiness)
        server_class: type[_Server] = _Server
        try:
            if ipaddress.ip_address(self.host).version == 6:
                server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        except ValueError:
            pass  # a host name: resolved by bind
        try:
            self._server = server_class((self.host, self._requested_port), handler)
        except OSError as exc:
            raise ConfigError(f"http_host/http_port {self.host}:{self._requested_port}: cannot listen: {exc}") from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="fpolicyd-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (blocks up to one poll interval)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None


def _handler(
    registry: CollectorRegistry,
    liveness: Callable[[], HealthReport],
    readiness: Callable[[], HealthReport],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fpolicyd"
        #: Seconds a client may take to send its request: a stuck probe cannot pin a thread for ever.
        timeout = 10

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = generate_latest(registry)
                except Exception as exc:  # a collector bug must not kill the server thread
                    log.exception("metrics_collect_failed")
                    self._reply(500, f"collecting metrics failed: {exc}\n".encode(), "text/plain; charset=utf-8")
                    return
                self._reply(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._health(liveness())
            elif path == "/readyz":
                self._health(readiness())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

        def do_HEAD(self) -> None:
            self.do_GET()

        def _health(self, report: HealthReport) -> None:
            self._reply(report.status, report.to_json(), _JSON)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http_request", client=self.client_address[0], request=format % args)

    return Handler
