"""Who may hold a socket: negotiated sessions and pending connections, counted apart.

A connection is *pending* from accept until its NEGO_REQ is answered (a TLS handshake included); then it is a
*session*. Pending connections have their own, smaller budget (``max_pending_handshakes``): when it is full, the
**oldest** pending connection makes room for the new one, so a flood of connections that never negotiate cannot
keep a real ONTAP node out (a real node sends NEGO_REQ at once, it is never the oldest for long). Sessions have
``max_connections``; a pending connection never holds one of those, so a node that completes NEGO is refused
only when that many sessions are open. ``max_connections_per_peer`` (0 = off) bounds what one address holds of
both. Open sockets are therefore at most ``max_connections + max_pending_handshakes``.

Sans-IO: the server calls :meth:`open`, :meth:`promote` and :meth:`discard` and closes what it is told to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from fpolicyd.errors import ConfigError

K = TypeVar("K", bound=Hashable)


class Refusal(StrEnum):
    """Why a connection is closed by the budget (the ``reason`` label of ``fpolicyd_connections_rejected``)."""

    #: ``max_connections`` sessions are open (at accept, or when the NEGO_REQ arrives).
    MAX_CONNECTIONS = "max_connections"
    #: The peer's address already holds ``max_connections_per_peer`` connections.
    MAX_PER_PEER = "max_per_peer"
    #: A pending connection closed to make room for a newer one (``max_pending_handshakes``).
    PENDING_EVICTED = "pending_evicted"


@dataclass(frozen=True, slots=True)
class Admission(Generic[K]):
    """The answer to a new connection: refused (with the reason), or admitted as pending; either way, the
    pending connections to close now to make room (oldest first)."""

    refused: Refusal | None
    evict: tuple[K, ...] = ()


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    max_sessions: int
    max_pending: int
    #: 0 = no per-address limit.
    max_per_peer: int = 0

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_sessions}")
        if self.max_pending < 1:
            raise ConfigError(f"max_pending_handshakes must be >= 1, got {self.max_pending}")
        if self.max_per_peer < 0:
            raise ConfigError(f"max_connections_per_peer must be >= 0 (0 = off), got {self.max_per_peer}")


class ConnectionBudget(Generic[K]):
    """The pending and session sets, and connections per peer address. Keys are the server's connection objects."""

    __slots__ = ("_pending", "_per_peer", "_sessions", "limits")

    def __init__(self, limits: BudgetLimits) -> None:
        self.limits = limits
        #: Pending connections, oldest first, with their peer address.
        self._pending: OrderedDict[K, str] = OrderedDict()
        self._sessions: dict[K, str] = {}
        self._per_peer: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def peer_count(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def is_pending(self, key: K) -> bool:
        return key in self._pending

    def is_session(self, key: K) -> bool:
        return key in self._sessions

    def open(self, key: K, peer: str) -> Admission[K]:
        """A connection was accepted from ``peer`` (its address, no port)."""
        limits = self.limits
        if limits.max_per_peer and self._per_peer.get(peer, 0) >= limits.max_per_peer:
            return Admission(Refusal.MAX_PER_PEER)
        if len(self._sessions) >= limits.max_sessions:
            return Admission(Refusal.MAX_CONNECTIONS)
        evict: list[K] = []
        while len(self._pending) >= limits.max_pending:
            oldest, oldest_peer = self._pending.popitem(last=False)
            self._release(oldest_peer)
            evict.append(oldest)
        self._pending[key] = peer
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return Admission(None, tuple(evict))

    def promote(self, key: K) -> bool:
        """The connection's NEGO_REQ is about to be answered: true when it becomes a session; false when it is
        no longer pending (evicted) or ``max_sessions`` sessions are open — then it must be closed (and
        :meth:`discard`-ed)."""
        peer = self._pending.get(key)
        if peer is None or len(self._sessions) >= self.limits.max_sessions:
            return False
        del self._pending[key]
        self._sessions[key] = peer
        return True

    def discard(self, key: K) -> None:
        """The connection is gone (or going); a key that is not held (evicted, refused) is ignored."""
        peer = self._pending.pop(key, None)
        if peer is None:
            peer = self._sessions.pop(key, None)
        if peer is not None:
            self._release(peer)

    def _release(self, peer: str) -> None:
        left = self._per_peer[peer] - 1
        if left:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]
