"""TLS for the FPolicy listener, matching the ONTAP external engine's ``ssl-option``.

- ``server_auth``: ONTAP verifies our certificate (its engine lists the CA); we ask nothing of ONTAP.
- ``mutual_auth``: as above, and ONTAP must present a client certificate that chains to ``tls_client_ca_file``.

TLS 1.2 is the floor (``tls_min_version``). Certificates are reloaded on SIGHUP without touching live
sessions: the listener's context only picks, per handshake, whichever context is current (OpenSSL's
servername callback runs on every ClientHello, with or without SNI), and a reload builds a complete new
context first, so a bad file leaves the running one in place.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from fpolicyd.config import Settings, TlsMode, TlsVersion
from fpolicyd.errors import ConfigError

_MIN_VERSION = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    mode: TlsMode
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    min_version: TlsVersion

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        if settings.tls_mode is TlsMode.OFF:
            return None
        assert settings.tls_cert_file is not None  # checked by Settings
        assert settings.tls_key_file is not None
        return cls(
            mode=settings.tls_mode,
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            client_ca_file=settings.tls_client_ca_file,
            min_version=settings.tls_min_version,
        )


def build_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context from the files as they are now; ConfigError (naming the file) when one is unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[files.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert_file {files.cert_file} / tls_key_file {files.key_file}: cannot load the certificate ({exc})"
        ) from None
    if files.mode is TlsMode.MUTUAL_AUTH:
        assert files.client_ca_file is not None  # checked by Settings
        try:
            context.load_verify_locations(cafile=files.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_client_ca_file {files.client_ca_file}: cannot load the CA bundle ({exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class ReloadableTls:
    """The listener's context, delegating every handshake to the context loaded last."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.current = build_context(files)
        self.reloads = 0
        self.reload_failures = 0
        self.listener = build_context(files)
        self.listener.sni_callback = self._select

    def _select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self.current

    def reload(self) -> None:
        """Load the files again; on failure keep the current context and raise ConfigError."""
        try:
            context = build_context(self.files)
        except ConfigError:
            self.reload_failures += 1
            raise
        self.current = context
        self.reloads += 1


def peer_certificate_subject(peercert: object) -> str | None:
    """``CN=…, O=…`` of a verified client certificate (``transport.get_extra_info("peercert")``), for the logs."""
    if not isinstance(peercert, dict):
        return None
    subject = peercert.get("subject")
    if not isinstance(subject, tuple):
        return None
    parts = [f"{key}={value}" for rdn in subject for key, value in rdn]
    return ", ".join(parts) or None
