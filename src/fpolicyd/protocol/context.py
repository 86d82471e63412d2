"""What one FPolicy session knows that every notification on it shares (pure).

The session (:mod:`fpolicyd.protocol.session`) builds it from the handshake and the socket; the normalizer
(:mod:`fpolicyd.events`) and the replay tracker read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What the session knows that every notification on it shares (from the handshake and the socket)."""

    vs_uuid: str
    policy_name: str
    session_id: str
    #: Negotiated FPolicy protocol version, e.g. ``"1.2"``.
    protocol_version: str
    #: The ONTAP node's address, ``"ip:port"``.
    peer: str
