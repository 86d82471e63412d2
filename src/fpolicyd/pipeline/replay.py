"""Replay awareness (sans-IO): reconnect times, persistent-store replay, out-of-order and duplicate notifications.

ONTAP's persistent store keeps notifications while no server is connected and sends them after the next
handshake as ordinary SCREEN_REQs, *after* live ones and so out of order, sometimes twice
(``docs/protocol.md`` §7.3–§7.4). This module watches the stream the readers decode and says, per notification:

- **replayed**: its ``GenerationTime`` is older than the handshake of the session that carries it (minus
  ``clock_tolerance_us``, for a node clock running behind this host's), i.e. it was generated while this node
  had no session with us — the persistent-store backlog;
- **out of order**: its ``GenerationTime`` is behind the highest one already seen for the same node/policy;
  ``ooo_lag_us`` is by how much;
- **duplicate**: its ``event_id`` was already seen among the last ``duplicate_window`` ids (any node).

A node/policy is keyed by ``(VsUUID, PolicyName, the node's IP address)``. ONTAP opens one connection per node
data LIF × policy (× IP family) and sends no node name; ``SessionId`` is not stable (a new one after
``session-timeout``, 10 s by default) and the peer *port* changes on every connection, but the LIF address stays
with the LIF — also across a LIF migration, which is when ONTAP retries and duplicates. So the key survives
exactly the reconnects this module has to measure. Two live connections on one key (a reconnect racing the
close of the old one) are counted in ``concurrent_sessions``; they share the key's highest GenerationTime.

Figures are plain attributes, read as one frozen :class:`ReplayStats` snapshot via :meth:`ReplayTracker.stats`.
A **replay episode** starts with the first replayed notification and ends once ``episode_idle_s`` passed
without one (live traffic only); its duration runs from the first to the last replayed notification.

``now`` is the caller's monotonic clock in seconds; ``wall_us`` its wall clock in epoch µs (GenerationTime is
epoch µs on ONTAP's clock). Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from fpolicyd.errors import ConfigError
from fpolicyd.events import MIN_PLAUSIBLE_GENERATION_US
from fpolicyd.protocol.context import SessionContext

__all__ = ["NodeKey", "ReplayConfig", "ReplaySession", "ReplayStats", "ReplayTracker", "node_key"]

NodeKey = tuple[str, str, str]

_NO_TIME: Final = -1


def node_key(context: SessionContext) -> NodeKey:
    """``(vs_uuid, policy_name, node IP)``; the IP is ``context.peer`` without its port (IPv6 too)."""
    host, sep, _port = context.peer.rpartition(":")
    return (context.vs_uuid, context.policy_name, host if sep else context.peer)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    #: Recent event ids remembered to count duplicates: the last ``duplicate_window`` to ``2 x`` that many.
    duplicate_window: int = 65_536
    #: A replay episode ends when no replayed notification arrived for this long (seconds).
    episode_idle_s: float = 2.0
    #: A notification is "replayed" only if generated more than this before its session's handshake (µs).
    clock_tolerance_us: int = 0
    #: Node/policy keys kept; beyond it the longest-disconnected key is forgotten (keys come from peers).
    max_nodes: int = 4096

    def __post_init__(self) -> None:
        if self.duplicate_window < 1:
            raise ConfigError("replay duplicate window must be >= 1 event id")
        if self.episode_idle_s <= 0:
            raise ConfigError("replay episode idle time must be > 0 s")
        if self.clock_tolerance_us < 0:
            raise ConfigError("replay clock tolerance must be >= 0")
        if self.max_nodes < 1:
            raise ConfigError("replay max nodes must be >= 1")


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """One consistent snapshot of the tracker's figures. Times are the caller's monotonic seconds."""

    #: Handshakes of a key that had lost its previous session (the first session of a key is not a reconnect).
    reconnects: int
    #: Session lost → next NEGO_REQ of the same key, seconds; 0.0 before the first reconnect.
    last_reconnect_s: float
    max_reconnect_s: float
    #: Sum over all reconnects (with ``reconnects``, a mean or a Prometheus summary).
    total_reconnect_s: float
    sessions_active: int
    #: Handshakes on a key that already had a live session.
    concurrent_sessions: int
    nodes_tracked: int
    replayed_events: int
    out_of_order_events: int
    #: Largest ``GenerationTime`` lag behind the key's highest one, µs.
    max_out_of_order_lag_us: int
    duplicates: int
    #: Notifications observed (all of them, flagged or not).
    events: int
    replay_active: bool
    #: Replay episodes that ended.
    replay_episodes: int
    #: First replayed notification of the current episode, else of the last ended one; None before any.
    replay_started_at: float | None
    #: Last replayed notification of the last ended episode; None while none ended.
    replay_ended_at: float | None
    #: First → last replayed notification of the current episode (so far), else of the last ended one.
    replay_duration_s: float
    #: Replayed notifications in that episode.
    replay_episode_events: int
    #: ``replay_episode_events / replay_duration_s`` (0.0 for an instant episode).
    replay_throughput_eps: float
    max_replay_duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Node:
    """What is known about one node/policy key across its sessions."""

    __slots__ = ("active", "key", "lost_at", "max_generation_us")

    def __init__(self, key: NodeKey) -> None:
        self.key = key
        self.active = 0
        self.lost_at: float | None = None
        self.max_generation_us = _NO_TIME


class ReplaySession:
    """The tracker's view of one negotiated session; the connection calls :meth:`observe` per notification."""

    __slots__ = ("_node", "_replayed_before_us", "_tracker", "context", "ended")

    def __init__(self, tracker: ReplayTracker, node: _Node, context: SessionContext, replayed_before_us: int) -> None:
        self._tracker = tracker
        self._node = node
        self._replayed_before_us = replayed_before_us
        self.context = context
        self.ended = False

    @property
    def key(self) -> NodeKey:
        return self._node.key

    def observe(self, generation_us: int | None, event_id: str, now: float) -> dict[str, Any] | None:
        """Check one notification; the metadata flags to add, or None when it is ordinary (the usual case)."""
        t = self._tracker
        t.events += 1
        flags: dict[str, Any] | None = None
        if generation_us is not None and generation_us >= MIN_PLAUSIBLE_GENERATION_US:
            node = self._node
            highest = node.max_generation_us
            if generation_us < highest:
                lag = highest - generation_us
                t.out_of_order_events += 1
                t.max_out_of_order_lag_us = max(t.max_out_of_order_lag_us, lag)
                flags = {"out_of_order": True, "ooo_lag_us": lag}
            else:
                node.max_generation_us = generation_us
            if generation_us < self._replayed_before_us:
                t.replayed(now)
                if flags is None:
                    flags = {"replayed": True}
                else:
                    flags["replayed"] = True
            elif t.replay_active and now - t.replay_last_at >= t.episode_idle_s:
                t.end_episode()
        elif t.replay_active and now - t.replay_last_at >= t.episode_idle_s:
            t.end_episode()
        recent = t.recent_ids
        if event_id in recent or event_id in t.older_ids:
            t.duplicates += 1
            if flags is None:
                flags = {"duplicate": True}
            else:
                flags["duplicate"] = True
        else:
            recent.add(event_id)
            if len(recent) >= t.duplicate_window:
                t.older_ids = recent
                t.recent_ids = set()
        return flags


class ReplayTracker:
    """Shared by every connection of a daemon (one event loop: no locking)."""

    def __init__(self, config: ReplayConfig | None = None) -> None:
        cfg = config or ReplayConfig()
        self.config = cfg
        self.duplicate_window = cfg.duplicate_window
        self.episode_idle_s = cfg.episode_idle_s
        self._nodes: dict[NodeKey, _Node] = {}
        self.recent_ids: set[str] = set()
        self.older_ids: set[str] = set()
        self.reconnects = 0
        self.last_reconnect_s = 0.0
        self.max_reconnect_s = 0.0
        self.total_reconnect_s = 0.0
        self.sessions_active = 0
        self.concurrent_sessions = 0
        self.events = 0
        self.replayed_events = 0
        self.out_of_order_events = 0
        self.max_out_of_order_lag_us = 0
        self.duplicates = 0
        self.replay_active = False
        self.replay_first_at = 0.0
        self.replay_last_at = 0.0
        self.replay_count = 0
        self.replay_episodes = 0
        self.last_episode: tuple[float, float, int] | None = None
        self.max_replay_duration_s = 0.0

    # ------------------------------------------------------------------------------------------ sessions

    def session_started(
        self, context: SessionContext, now: float, wall_us: int, previous: ReplaySession | None = None
    ) -> ReplaySession:
        """A NEGO_REQ was answered at ``now`` / ``wall_us``. ``previous``: this connection's earlier session (a
        NEGO_REQ resent on the same connection is a renegotiation, not a reconnect)."""
        key = node_key(context)
        replayed_before_us = wall_us - self.config.clock_tolerance_us
        if previous is not None and not previous.ended:
            if previous.key == key:
                return ReplaySession(self, previous._node, context, replayed_before_us)
            self.session_ended(previous, now)
        node = self._nodes.pop(key, None)
        if node is None:
            node = _Node(key)
            self._forget_oldest()
        self._nodes[key] = node  # most recently active last
        if node.active:
            self.concurrent_sessions += 1
        elif node.lost_at is not None:
            gap = max(0.0, now - node.lost_at)
            self.reconnects += 1
            self.last_reconnect_s = gap
            self.total_reconnect_s += gap
            self.max_reconnect_s = max(self.max_reconnect_s, gap)
        node.active += 1
        node.lost_at = None
        self.sessions_active += 1
        return ReplaySession(self, node, context, replayed_before_us)

    def session_ended(self, session: ReplaySession, now: float) -> None:
        """The connection carrying ``session`` closed (idempotent)."""
        if session.ended:
            return
        session.ended = True
        node = session._node
        node.active -= 1
        self.sessions_active -= 1
        if not node.active:
            node.lost_at = now

    def _forget_oldest(self) -> None:
        if len(self._nodes) < self.config.max_nodes:
            return
        for key, node in self._nodes.items():
            if not node.active:
                del self._nodes[key]
                return

    # ------------------------------------------------------------------------------------------ episodes

    def replayed(self, now: float) -> None:
        self.replayed_events += 1
        if self.replay_active and now - self.replay_last_at >= self.episode_idle_s:
            self.end_episode()
        if not self.replay_active:
            self.replay_active = True
            self.replay_first_at = now
            self.replay_count = 0
        self.replay_last_at = now
        self.replay_count += 1

    def end_episode(self) -> None:
        self.replay_active = False
        self.replay_episodes += 1
        duration = self.replay_last_at - self.replay_first_at
        self.last_episode = (self.replay_first_at, self.replay_last_at, self.replay_count)
        self.max_replay_duration_s = max(self.max_replay_duration_s, duration)

    def tick(self, now: float) -> None:
        """Close a replay episode that went quiet even when no notification at all arrives after it."""
        if self.replay_active and now - self.replay_last_at >= self.episode_idle_s:
            self.end_episode()

    # ------------------------------------------------------------------------------------------ figures

    def stats(self, now: float | None = None) -> ReplayStats:
        """A snapshot; with ``now``, an episode quiet for ``episode_idle_s`` is closed first."""
        if now is not None:
            self.tick(now)
        started: float | None
        ended: float | None = None
        if self.replay_active:
            started, last, count = self.replay_first_at, self.replay_last_at, self.replay_count
            if self.last_episode is not None:
                ended = self.last_episode[1]
        elif self.last_episode is not None:
            started, last, count = self.last_episode
            ended = last
        else:
            started, last, count = None, 0.0, 0
        duration = 0.0 if started is None else last - started
        return ReplayStats(
            reconnects=self.reconnects,
            last_reconnect_s=self.last_reconnect_s,
            max_reconnect_s=self.max_reconnect_s,
            total_reconnect_s=self.total_reconnect_s,
            sessions_active=self.sessions_active,
            concurrent_sessions=self.concurrent_sessions,
            nodes_tracked=len(self._nodes),
            replayed_events=self.replayed_events,
            out_of_order_events=self.out_of_order_events,
            max_out_of_order_lag_us=self.max_out_of_order_lag_us,
            duplicates=self.duplicates,
            events=self.events,
            replay_active=self.replay_active,
            replay_episodes=self.replay_episodes,
            replay_started_at=started,
            replay_ended_at=ended,
            replay_duration_s=duration,
            replay_episode_events=count,
            replay_throughput_eps=count / duration if duration > 0 else 0.0,
            max_replay_duration_s=max(self.max_replay_duration_s, duration if self.replay_active else 0.0),
        )
