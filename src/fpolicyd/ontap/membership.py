"""Engine membership (sans-IO): which FPolicy servers the engine lists after a join, a leave or a prune.

Several fpolicyd tasks share one external engine. ``repoint`` overwrites ``primary_servers`` with one address
(single instance); these operations add or remove one address and keep everyone else's entries, in order:

- :func:`join`: the address ends up in the asked list (``primary_servers`` or ``secondary_servers``), appended
  if it was not there, and out of the other list;
- :func:`leave`: the address is removed from both lists;
- :func:`prune`: the servers ONTAP has shown disconnected for longer than a grace period (:func:`stale_servers`
  over ``GET /api/protocols/fpolicy/{svm.uuid}/connections``) are removed from both lists.

ONTAP needs at least one primary server (``primary_servers`` is a required field of the engine), so no
operation empties that list: a leave by the last primary, and a prune of every primary, keep the last primary
(for a prune, the first one listed) — it stays in the engine and ONTAP keeps trying it, which with
``mandatory: false`` delays nothing; with ``mandatory: true`` an engine without reachable servers denies access
anyway. :class:`Membership` says what was kept and why, so the command can print it.

:func:`plan_membership` turns old → new lists into REST actions: none when the lists did not change (no
disable → modify → enable window), else disable (when enabled) → PATCH the engine's two lists → enable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from fpolicyd.errors import ConfigError
from fpolicyd.ontap.plan import Action, CurrentState, Method, Plan, Step, fpolicy_path, policy_disable, policy_enable

__all__ = [
    "Membership",
    "Operation",
    "Role",
    "Servers",
    "join",
    "leave",
    "plan_membership",
    "prune",
    "stale_servers",
]


class Role(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Operation(StrEnum):
    JOIN = "join"
    LEAVE = "leave"
    PRUNE = "prune"


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(addresses))


@dataclass(frozen=True, slots=True)
class Servers:
    """The engine's two server lists, in ONTAP's order, without duplicates."""

    primary: tuple[str, ...]
    secondary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "primary", _unique(self.primary))
        object.__setattr__(self, "secondary", _unique(a for a in self.secondary if a not in self.primary))

    @classmethod
    def of_engine(cls, engine: Mapping[str, Any]) -> Servers:
        return cls(
            tuple(str(a) for a in engine.get("primary_servers") or ()),
            tuple(str(a) for a in engine.get("secondary_servers") or ()),
        )

    def __contains__(self, address: object) -> bool:
        return address in self.primary or address in self.secondary

    def to_dict(self) -> dict[str, list[str]]:
        return {"primary_servers": list(self.primary), "secondary_servers": list(self.secondary)}


@dataclass(frozen=True, slots=True)
class Membership:
    """The outcome of one operation on one snapshot of the engine. ``kept``: addresses the operation was asked
    to remove but kept, because ONTAP needs one primary server."""

    operation: Operation
    before: Servers
    after: Servers
    kept: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.before != self.after


def join(servers: Servers, address: str, role: Role = Role.PRIMARY) -> Membership:
    """``address`` in the ``role`` list (appended when new), out of the other one; the others keep their order."""
    if role is Role.PRIMARY:
        after = Servers(
            servers.primary if address in servers.primary else (*servers.primary, address),
            tuple(a for a in servers.secondary if a != address),
        )
    else:
        primary = tuple(a for a in servers.primary if a != address)
        if not primary:
            raise ConfigError(
                f"ontap join --secondary: {address} is the engine's only primary server and ONTAP needs one; "
                "join another instance as primary first"
            )
        after = Servers(primary, servers.secondary if address in servers.secondary else (*servers.secondary, address))
    return Membership(Operation.JOIN, servers, after)


def _without(servers: Servers, gone: frozenset[str], operation: Operation) -> Membership:
    primary = tuple(a for a in servers.primary if a not in gone)
    kept: tuple[str, ...] = ()
    if not primary and servers.primary:
        primary = servers.primary[:1]
        kept = primary
    after = Servers(primary, tuple(a for a in servers.secondary if a not in gone))
    return Membership(operation, servers, after, kept)


def leave(servers: Servers, address: str) -> Membership:
    """``address`` out of both lists (kept when it is the only primary server: ONTAP needs one)."""
    return _without(servers, frozenset({address}), Operation.LEAVE)


def prune(servers: Servers, stale: frozenset[str]) -> Membership:
    """The ``stale`` addresses out of both lists; when every primary is stale, the first primary is kept."""
    return _without(servers, stale, Operation.PRUNE)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def stale_servers(connections: Iterable[Mapping[str, Any]], *, now: datetime, grace_s: float) -> frozenset[str]:
    """Servers every connection record of which (one per node) is ``disconnected`` since before ``now - grace_s``
    (``update_time``: "the time at which the FPolicy server is connected or disconnected", ISO 8601 with an
    offset). A server connected on any node, or with a record whose time is missing or unreadable, is not stale;
    a server without any record is not either (ONTAP shows nothing about it, so nothing proves it gone)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = now - timedelta(seconds=grace_s)
    verdict: dict[str, bool] = {}
    for record in connections:
        server = record.get("server")
        if not isinstance(server, str):
            continue
        since = _parse_time(record.get("update_time"))
        stale = record.get("state") == "disconnected" and since is not None and since <= cutoff
        verdict[server] = verdict.get(server, True) and stale
    return frozenset(server for server, stale in verdict.items() if stale)


def plan_membership(
    svm_uuid: str,
    current: CurrentState,
    membership: Membership,
    *,
    engine_name: str,
    policy_name: str,
    priority: int,
    enable_if_disabled: bool,
) -> Plan:
    """The REST calls from ``membership.before`` (read from ``current``) to ``membership.after``: nothing when the
    lists are the same (``enable_if_disabled``: then only enable a disabled policy, what a joining task wants),
    else disable (when enabled) → PATCH both lists of the engine → enable."""
    if current.engine is None:
        raise ConfigError(f"engine {engine_name} does not exist on the SVM: run `fpolicyd ontap apply` first")
    if current.policy is None:
        raise ConfigError(f"policy {policy_name} does not exist on the SVM: run `fpolicyd ontap apply` first")
    actions: list[Action] = []
    if membership.changed:
        if current.policy_enabled:
            actions.append(policy_disable(svm_uuid, policy_name))
        before, after = membership.before.to_dict(), membership.after.to_dict()
        actions.append(
            Action(
                Step.UPDATE_ENGINE,
                Method.PATCH,
                fpolicy_path(svm_uuid, "engines", engine_name),
                after,
                f"engine {engine_name}",
                {key: (before[key], after[key]) for key in after if before[key] != after[key]},
            )
        )
        actions.append(policy_enable(svm_uuid, policy_name, priority))
    elif enable_if_disabled and not current.policy_enabled:
        actions.append(policy_enable(svm_uuid, policy_name, priority))
    return Plan(tuple(actions), policy_name)
