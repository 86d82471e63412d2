"""Why a TLS handshake failed: the reasons counted and logged for every failed handshake.

Apart from :mod:`fpolicyd.server.tls` (which builds contexts from the settings) so that the metrics collector can
name every reason without importing the settings.
"""

from __future__ import annotations

import ssl
from enum import StrEnum
from typing import Final


class TlsFailure(StrEnum):
    """Why a TLS handshake failed (the ``reason`` label of ``fpolicyd_tls_handshake_failures``)."""

    #: The peer's first bytes are not a TLS record (plain TCP — e.g. an engine without ssl-option — or HTTP).
    PLAIN_TCP = "plain_tcp"
    #: A TLS version (or SSL) below ``tls_min_version``, or no version in common.
    PROTOCOL_VERSION = "protocol_version"
    #: A client certificate missing or not from ``tls_client_ca_file``, or the peer refused ours.
    CERTIFICATE = "certificate"
    #: The handshake did not finish within ``handshake_timeout_s``.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: The peer closed or reset the connection during the handshake.
    PEER_CLOSED = "peer_closed"
    OTHER = "other"


#: OpenSSL reasons (``ssl.SSLError.reason``) of bytes that are not TLS at all.
_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "PACKET_LENGTH_TOO_LONG"})
#: OpenSSL reasons of a version the server does not accept.
_VERSION: Final = frozenset({
    "UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION",
    "WRONG_SSL_VERSION", "UNKNOWN_PROTOCOL",
})  # fmt: skip


def classify_handshake_failure(exc: BaseException) -> TlsFailure:
    """Map what a failed server-side handshake raises (``loop.connect_accepted_socket(ssl=...)``, uvloop and
    the standard loop alike) to a :class:`TlsFailure`. The handshake timeout surfaces as ConnectionAbortedError
    ("SSL handshake is taking longer than ..."), a peer going away as ConnectionResetError or an EOF error."""
    if isinstance(exc, ssl.SSLCertVerificationError | ssl.CertificateError):
        return TlsFailure.CERTIFICATE
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return TlsFailure.PEER_CLOSED
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NOT_TLS:
            return TlsFailure.PLAIN_TCP
        if reason in _VERSION:
            return TlsFailure.PROTOCOL_VERSION
        if "CERTIFICATE" in reason or reason.endswith("UNKNOWN_CA"):
            return TlsFailure.CERTIFICATE
        return TlsFailure.OTHER
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return TlsFailure.HANDSHAKE_TIMEOUT
    if isinstance(exc, ConnectionError | EOFError):
        return TlsFailure.PEER_CLOSED
    return TlsFailure.OTHER
