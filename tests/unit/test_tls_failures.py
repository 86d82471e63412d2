"""What a failed server-side TLS handshake raises, mapped to the reason label of the failure counter."""

from __future__ import annotations

import ssl

import pytest

from fpolicyd.server.tls_failures import TlsFailure, classify_handshake_failure


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ssl_error("WRONG_VERSION_NUMBER"), TlsFailure.PLAIN_TCP),
        (ssl_error("HTTP_REQUEST"), TlsFailure.PLAIN_TCP),
        (ssl_error("UNSUPPORTED_PROTOCOL"), TlsFailure.PROTOCOL_VERSION),
        (ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), TlsFailure.PROTOCOL_VERSION),
        (ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), TlsFailure.CERTIFICATE),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), TlsFailure.CERTIFICATE),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), TlsFailure.CERTIFICATE),
        (ConnectionAbortedError("SSL handshake is taking longer than 5.0 seconds: aborting the connection"),
         TlsFailure.HANDSHAKE_TIMEOUT),
        (TimeoutError(), TlsFailure.HANDSHAKE_TIMEOUT),
        (ConnectionResetError(), TlsFailure.PEER_CLOSED),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), TlsFailure.PEER_CLOSED),
        (ssl_error("NO_SHARED_CIPHER"), TlsFailure.OTHER),
        (RuntimeError("unexpected"), TlsFailure.OTHER),
    ],
)  # fmt: skip
def test_classification(exc: BaseException, expected: TlsFailure) -> None:
    assert classify_handshake_failure(exc) is expected
