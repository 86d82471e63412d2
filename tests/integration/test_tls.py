"""TLS on the FPolicy listener (ONTAP ssl-option server-auth and mutual-auth), certificate reload, allowlist.

Certificates come from a throw-away CA made by trustme; clients are Python's ssl module and, where installed,
the openssl command line (a TLS client that is not part of this repository)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from fpolicyd.app import Daemon
from fpolicyd.config import TlsMode
from fpolicyd.errors import ConfigError
from fpolicyd.simulator.peer import OntapPeer
from support.captures import KEEP_ALIVE, NEGO_REQ, NEGO_RESP, SMB_OPEN, SMB_REN
from support.daemon import make_settings, marked_settings, running_daemon
from support.observability import http_get
from support.peer import loopback_peer, wait_for_events
from support.serve import start_serve, stop


class Pki:
    """A CA, the server's certificate files and a client CA for mutual auth, all under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.client_ca_file = directory / "client-ca.pem"
        self.client_ca.cert_pem.write_to_path(str(self.client_ca_file))
        self.issue_server_cert("127.0.0.1")

    def issue_server_cert(self, *names: str) -> trustme.LeafCert:
        cert = self.ca.issue_cert(*names)
        cert.private_key_pem.write_to_path(str(self.key_file))
        cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self.cert_file), append=True)
        return cert

    def client_context(self, *, client_cert_from: trustme.CA | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client_cert_from is not None:
            client_cert_from.issue_cert("ontap-node-1.example.com").configure_cert(context)
        return context

    def settings(self, mode: TlsMode) -> dict[str, Any]:
        return {
            "tls_mode": mode.value,
            "tls_cert_file": str(self.cert_file),
            "tls_key_file": str(self.key_file),
            "tls_client_ca_file": str(self.client_ca_file),
        }


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki(directory)


@pytest.fixture
async def tls_daemon(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> AsyncIterator[Daemon]:
    """Not the ``daemon`` fixture: TLS with this test's certificates (the ``pki`` fixture) under the markers."""
    overrides = {**pki.settings(TlsMode.SERVER_AUTH), **marked_settings(request)}
    async with running_daemon(make_settings(tmp_path, **overrides)) as daemon:
        yield daemon


async def handshake(peer: OntapPeer) -> None:
    await peer.send(NEGO_REQ.frame)
    assert await peer.receive() == NEGO_RESP.payload


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """Whether a TLS client with ``context`` is turned away, during the TLS handshake or at its first read (TLS 1.3
    reports a refused client certificate only then)."""
    try:
        peer = await loopback_peer(port, context)
        await handshake(peer)
    except (ssl.SSLError, ConnectionError):
        return True
    await peer.close()
    return False


def server_certificate(peer: OntapPeer) -> bytes:
    ssl_object = peer.writer.get_extra_info("ssl_object")
    assert isinstance(ssl_object, ssl.SSLObject)
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_server_auth_session_delivers_events(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    peer = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(peer)
    await peer.send(KEEP_ALIVE.frame, SMB_OPEN.frame, SMB_REN.frame)
    events = await wait_for_events(tmp_path, 2)
    assert [event["operation_type"] for event in events] == ["open", "rename"]
    ssl_object = peer.writer.get_extra_info("ssl_object")
    assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    await peer.close()


async def test_plain_tcp_client_gets_no_session(tls_daemon: Daemon) -> None:
    peer = await loopback_peer(tls_daemon.port)
    await peer.send(NEGO_REQ.frame)
    assert await peer.closed_by_server(within=5.0)
    assert tls_daemon.context.sessions_opened == 0
    await peer.close()


async def test_client_that_does_not_trust_our_ca_fails(tls_daemon: Daemon) -> None:
    untrusting = ssl.create_default_context()
    trustme.CA().configure_trust(untrusting)
    with pytest.raises(ssl.SSLCertVerificationError):
        await loopback_peer(tls_daemon.port, untrusting)


@pytest.mark.settings(tls_min_version="1.3")
async def test_minimum_version_is_enforced(tls_daemon: Daemon, pki: Pki) -> None:
    tls12_only = pki.client_context()
    tls12_only.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await refused(tls_daemon.port, tls12_only)
    assert not await refused(tls_daemon.port, pki.client_context())


@pytest.mark.settings(tls_mode="mutual_auth")
async def test_mutual_auth_requires_a_client_certificate_from_the_configured_ca(tls_daemon: Daemon, pki: Pki) -> None:
    good = await loopback_peer(tls_daemon.port, pki.client_context(client_cert_from=pki.client_ca))
    await handshake(good)

    assert await refused(tls_daemon.port, pki.client_context())
    assert await refused(tls_daemon.port, pki.client_context(client_cert_from=trustme.CA()))
    assert tls_daemon.context.sessions_opened == 1
    await good.close()


async def test_reload_swaps_the_certificate_for_new_sessions_only(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    first_cert = der_of(pki.issue_server_cert("127.0.0.1"))  # what the daemon loaded (same key files)
    tls_daemon.reload()
    before = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(before)
    assert server_certificate(before) == first_cert

    renewed = pki.issue_server_cert("127.0.0.1", "fpolicyd.example.com")
    tls_daemon.reload()
    assert tls_daemon.tls is not None
    assert tls_daemon.tls.reloads == 2

    after = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(after)
    assert server_certificate(after) == der_of(renewed)
    # The session that predates the reload goes on undisturbed.
    await before.send(KEEP_ALIVE.frame, SMB_OPEN.frame)
    events = await wait_for_events(tmp_path, 1)
    assert [event["operation_type"] for event in events] == ["open"]
    assert not before.is_closing()
    await before.close()
    await after.close()


async def test_failed_reload_keeps_the_running_certificate(tls_daemon: Daemon, pki: Pki) -> None:
    current = der_of(pki.issue_server_cert("127.0.0.1"))
    tls_daemon.reload()
    pki.key_file.write_text("not a key\n")
    tls_daemon.reload()
    assert tls_daemon.tls is not None
    assert tls_daemon.tls.reload_failures == 1
    peer = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(peer)
    assert server_certificate(peer) == current
    await peer.close()


async def test_unusable_certificate_fails_start_with_the_file_named(tmp_path: Path, pki: Pki) -> None:
    pki.cert_file.write_text("garbage\n")
    daemon = Daemon(make_settings(tmp_path, **pki.settings(TlsMode.SERVER_AUTH)))
    with pytest.raises(ConfigError, match="tls_cert_file"):
        await daemon.start()
    await daemon.stop()


def test_mutual_auth_without_a_client_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    settings = pki.settings(TlsMode.MUTUAL_AUTH)
    del settings["tls_client_ca_file"]
    with pytest.raises(ConfigError, match="tls_client_ca_file"):
        make_settings(tmp_path, **settings)


@pytest.mark.settings(allowed_networks="192.0.2.0/24")
async def test_peer_outside_the_allowlist_is_closed_and_counted(tls_daemon: Daemon, pki: Pki) -> None:
    assert await refused(tls_daemon.port, pki.client_context())
    assert tls_daemon.context.rejections == {"not_allowed": 1}
    assert tls_daemon.context.sessions_opened == 0


@pytest.mark.settings(allowed_networks="127.0.0.0/8")
async def test_peer_inside_the_allowlist_is_served(tls_daemon: Daemon, pki: Pki) -> None:
    peer = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(peer)
    assert tls_daemon.context.rejections == {}
    await peer.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command line not installed")
@pytest.mark.settings(tls_mode="mutual_auth")
async def test_openssl_client_verifies_us_and_is_verified(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    pki.ca.cert_pem.write_to_path(str(ca_file))
    client = pki.client_ca.issue_cert("ontap-node-2.example.com")
    client_pem = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(client_pem))

    def s_client(*extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_daemon.port}", "-CAfile", str(ca_file),
             "-verify_return_error", "-brief", *extra],
            input=NEGO_REQ.frame, capture_output=True, timeout=20, check=False,
        )  # fmt: skip

    accepted = await asyncio.to_thread(s_client, "-cert", str(client_pem))
    assert accepted.returncode == 0, accepted.stderr.decode()
    assert b"Verification: OK" in accepted.stderr
    assert tls_daemon.context.sessions_opened == 1
    await asyncio.to_thread(s_client)  # no client certificate: refused before any session
    assert tls_daemon.context.sessions_opened == 1


@pytest.mark.slow
async def test_sighup_reloads_in_a_running_server(tmp_path: Path, pki: Pki) -> None:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in pki.settings(TlsMode.SERVER_AUTH).items()]
    served, _ = await start_serve(tmp_path, *flags)
    try:
        renewed = pki.issue_server_cert("127.0.0.1", "renewed.example.com")
        served.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if any(line.get("event") == "tls_reloaded" for line in served.log_lines):
                break
            await asyncio.sleep(0.05)
        peer = await loopback_peer(served.port, pki.client_context())
        await handshake(peer)
        assert server_certificate(peer) == der_of(renewed)
        await peer.close()
    finally:
        assert await stop(served) == 0


# ------------------------------------------------------------------------- failed and pending handshakes


async def plain_tcp_client(port: int) -> None:
    """An engine without ssl-option: speaks FPolicy in clear to the TLS port."""
    peer = await loopback_peer(port)
    await peer.send(NEGO_REQ.frame)
    assert await peer.closed_by_server(within=5.0)
    await peer.close()


def tls11_context(pki: Pki) -> ssl.SSLContext | None:
    """A client that offers nothing above TLS 1.1, or None when the local OpenSSL cannot build one."""
    context = pki.client_context()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: that is the point
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return None
    return context


async def silent_client(port: int, within: float) -> bool:
    """Connects and never starts the TLS handshake; whether the server closed it ``within`` seconds."""
    peer = await loopback_peer(port)
    closed = await peer.closed_by_server(within=within)
    await peer.close()
    return closed


@pytest.mark.both_loops
@pytest.mark.settings(handshake_timeout_s=0.3, log_rate_limit_interval_s=60.0)
async def test_failed_handshakes_are_counted_by_reason_with_one_log_line_each(tls_daemon: Daemon, pki: Pki) -> None:
    context = tls11_context(pki)
    expected = {"plain_tcp": 3, "handshake_timeout": 3}
    with capture_logs() as logs:
        for _ in range(3):
            await plain_tcp_client(tls_daemon.port)
        assert all(await asyncio.gather(*(silent_client(tls_daemon.port, 5.0) for _ in range(3))))
        if context is not None:
            expected["protocol_version"] = 3
            for _ in range(3):
                assert await refused(tls_daemon.port, context)
        for _ in range(100):  # the server's side of the last close may lag the client's
            if tls_daemon.context.tls_failures == expected:
                break
            await asyncio.sleep(0.02)
    assert tls_daemon.context.tls_failures == expected
    lines = [entry for entry in logs if entry["event"] == "tls_handshake_failed"]
    assert sorted(line["reason"] for line in lines) == sorted(expected)  # one line per reason
    assert all(line["suppressed"] == 0 and line["peer"].startswith("127.0.0.1:") for line in lines)
    assert tls_daemon.context.sessions_opened == 0
    assert tls_daemon.context.budget.pending == 0
    # The metric counts every failure, by reason.
    assert tls_daemon.http_port is not None
    status, body = await asyncio.to_thread(http_get, tls_daemon.http_port, "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    counted = {s.labels["reason"]: s.value for s in families["fpolicyd_tls_handshake_failures"].samples}
    assert {reason: counted[reason] for reason in expected} == expected
    assert status == 200
    if context is None:
        pytest.skip("the local OpenSSL cannot build a TLS 1.1 client: protocol_version not exercised")


@pytest.mark.both_loops
@pytest.mark.settings(max_pending_handshakes=4, handshake_timeout_s=30.0)
async def test_pending_handshakes_beyond_the_budget_are_evicted_and_a_node_gets_in(
    tls_daemon: Daemon, pki: Pki, tmp_path: Path
) -> None:
    opened = 40
    before = len(os.listdir("/proc/self/fd"))
    silent = [await loopback_peer(tls_daemon.port) for _ in range(opened)]
    for _ in range(200):  # until the server has accepted them all
        if tls_daemon.context.rejections.get("pending_evicted", 0) == opened - 4:
            break
        await asyncio.sleep(0.02)
    assert tls_daemon.context.rejections == {"pending_evicted": opened - 4}
    assert tls_daemon.context.budget.pending == 4
    assert tls_daemon.context.tls_failures == {}  # evictions are not handshake failures
    # This process holds both ends: the clients' 40 sockets and, on the server's side, only the 4 pending ones
    # (plus whatever the loop briefly holds for connections being closed).
    assert len(os.listdir("/proc/self/fd")) - before <= opened + 4 + 8
    node = await loopback_peer(tls_daemon.port, pki.client_context())
    await handshake(node)
    await node.send(SMB_OPEN.frame)
    events = await wait_for_events(tmp_path, 1)
    assert [event["operation_type"] for event in events] == ["open"]
    assert tls_daemon.context.budget.sessions == 1
    await node.close()
    closed = await asyncio.gather(*(peer.closed_by_server(within=5.0) for peer in silent[: opened - 4]))
    assert all(closed)  # the evicted ones were closed by the server
    for peer in silent:
        await peer.close()


@pytest.mark.both_loops
@pytest.mark.settings(tls_mode="mutual_auth")
async def test_refused_client_certificates_are_counted_as_certificate_failures(tls_daemon: Daemon, pki: Pki) -> None:
    assert await refused(tls_daemon.port, pki.client_context())  # none
    assert await refused(tls_daemon.port, pki.client_context(client_cert_from=trustme.CA()))  # another CA
    for _ in range(100):
        if sum(tls_daemon.context.tls_failures.values()) == 2:
            break
        await asyncio.sleep(0.02)
    assert tls_daemon.context.tls_failures == {"certificate": 2}
