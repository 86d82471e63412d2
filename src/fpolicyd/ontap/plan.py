"""Which ONTAP REST calls bring the SVM's FPolicy objects to the wanted state (sans-IO: no HTTP, no clock).

The objects and the rules they follow (ONTAP REST API reference, ``/api/protocols/fpolicy/{svm.uuid}/...``):

- ``engines``: the external engine (``primary_servers``, ``port``, ``type`` synchronous|asynchronous — default
  *synchronous* —, ``format`` xml|protobuf, ``ssl_option`` no_auth|server_auth|mutual_auth). "Modification of an
  FPolicy engine that is attached to one or more enabled FPolicy policies is not allowed" (PATCH engines).
- ``events``: one protocol (cifs|nfsv3|nfsv4) and its ``file_operations`` (a map of booleans); ONTAP asks to
  disable a policy before modifying its configuration.
- ``policies``: ``engine.name``, ``events[].name``, ``mandatory`` (default *true*: all servers down ⇒ client
  access denied), ``scope.include_volumes``, ``persistent_store`` (9.14.1+). A policy is enabled by a PATCH with
  ``enabled: true`` *and* ``priority`` ("when enabling a policy, you must specify the policy priority") and
  disabled by ``enabled: false``; "if the policy is enabled, the FPolicy policy engine cannot be modified".
- ``persistent-stores`` (9.14.1+): ``name``, ``volume``; one per SVM, only for asynchronous, non-mandatory
  policies; its volume cannot be changed while it is part of an enabled policy.

So every change to an object the enabled policy uses is wrapped in disable → change → enable, and a policy that
is not enabled yet is enabled last. :func:`plan_apply` and :func:`plan_repoint` return a :class:`Plan` (ordered
:class:`Action` s, each one REST call); an empty plan means nothing to do (a second ``apply`` is a no-op).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import quote

from fpolicyd.errors import ConfigError

__all__ = [
    "FPOLICY_API",
    "SUPPORTED_FILE_OPERATIONS",
    "Action",
    "CurrentState",
    "Desired",
    "DesiredEngine",
    "DesiredEvent",
    "DesiredPolicy",
    "DesiredStore",
    "EngineType",
    "Method",
    "Plan",
    "Protocol",
    "SslOption",
    "Step",
    "event_name_for",
    "fpolicy_path",
    "plan_apply",
    "plan_repoint",
    "policy_disable",
    "policy_enable",
]

FPOLICY_API: Final = "/api/protocols/fpolicy"


class Protocol(StrEnum):
    CIFS = "cifs"
    NFSV3 = "nfsv3"
    NFSV4 = "nfsv4"


class EngineType(StrEnum):
    SYNCHRONOUS = "synchronous"
    ASYNCHRONOUS = "asynchronous"


class SslOption(StrEnum):
    NO_AUTH = "no_auth"
    SERVER_AUTH = "server_auth"
    MUTUAL_AUTH = "mutual_auth"


#: File operations ONTAP accepts per protocol ("Supported file operation and filter combinations that FPolicy
#: can monitor for SMB / NFSv3 / NFSv4", ONTAP docs, nas-audit). An event asking for another one is refused.
SUPPORTED_FILE_OPERATIONS: Final[Mapping[Protocol, frozenset[str]]] = {
    Protocol.CIFS: frozenset(
        {"close", "create", "create_dir", "delete", "delete_dir", "getattr", "open", "read", "write", "rename"}
        | {"rename_dir", "setattr"}
    ),
    Protocol.NFSV3: frozenset(
        {"create", "create_dir", "delete", "delete_dir", "link", "lookup", "read", "write", "rename", "rename_dir"}
        | {"setattr", "symlink"}
    ),
    Protocol.NFSV4: frozenset(
        {"close", "create", "create_dir", "delete", "delete_dir", "getattr", "link", "lookup", "open", "read"}
        | {"write", "rename", "rename_dir", "setattr", "symlink"}
    ),
}


class Method(StrEnum):
    POST = "POST"
    PATCH = "PATCH"


class Step(StrEnum):
    DISABLE_POLICY = "disable_policy"
    CREATE_STORE = "create_persistent_store"
    UPDATE_STORE = "update_persistent_store"
    CREATE_ENGINE = "create_engine"
    UPDATE_ENGINE = "update_engine"
    CREATE_EVENT = "create_event"
    UPDATE_EVENT = "update_event"
    CREATE_POLICY = "create_policy"
    UPDATE_POLICY = "update_policy"
    ENABLE_POLICY = "enable_policy"


def event_name_for(base: str, protocol: Protocol) -> str:
    """An ONTAP event has exactly one protocol, so each monitored protocol gets its own event ``<base>_<proto>``."""
    return f"{base}_{protocol.value}"


# ----------------------------------------------------------------------------------------- desired state


@dataclass(frozen=True, slots=True)
class DesiredEngine:
    name: str
    primary_servers: tuple[str, ...]
    port: int
    type: EngineType
    ssl_option: SslOption
    format: str = "xml"

    def fields(self) -> dict[str, Any]:
        return {
            "primary_servers": list(self.primary_servers),
            "port": self.port,
            "type": self.type.value,
            "format": self.format,
            "ssl_option": self.ssl_option.value,
        }


@dataclass(frozen=True, slots=True)
class DesiredEvent:
    name: str
    protocol: Protocol
    file_operations: frozenset[str]

    def __post_init__(self) -> None:
        unsupported = sorted(self.file_operations - SUPPORTED_FILE_OPERATIONS[self.protocol])
        if unsupported:
            raise ConfigError(
                f"ontap_file_operations: {', '.join(unsupported)} cannot be monitored over {self.protocol.value} "
                f"(supported: {', '.join(sorted(SUPPORTED_FILE_OPERATIONS[self.protocol]))})"
            )
        if not self.file_operations:
            raise ConfigError("ontap_file_operations: at least one file operation is needed")


@dataclass(frozen=True, slots=True)
class DesiredPolicy:
    name: str
    engine: str
    events: tuple[str, ...]
    mandatory: bool
    include_volumes: tuple[str, ...]
    priority: int
    persistent_store: str | None = None


@dataclass(frozen=True, slots=True)
class DesiredStore:
    name: str
    volume: str


@dataclass(frozen=True, slots=True)
class Desired:
    svm_uuid: str
    engine: DesiredEngine
    events: tuple[DesiredEvent, ...]
    policy: DesiredPolicy
    store: DesiredStore | None = None

    def __post_init__(self) -> None:
        if self.store is not None and (self.engine.type is not EngineType.ASYNCHRONOUS or self.policy.mandatory):
            raise ConfigError(
                "ontap_persistent_store: ONTAP allows a persistent store only for an asynchronous engine "
                "(engine_mode async) and a non-mandatory policy (ontap_mandatory false)"
            )


@dataclass(frozen=True, slots=True)
class CurrentState:
    """What ONTAP returned (the JSON records; ``None`` = does not exist)."""

    engine: Mapping[str, Any] | None
    events: Mapping[str, Mapping[str, Any] | None]
    policy: Mapping[str, Any] | None
    store: Mapping[str, Any] | None = None

    @property
    def policy_enabled(self) -> bool:
        return bool(self.policy and self.policy.get("enabled"))


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True, slots=True)
class Action:
    """One REST call. ``changes`` is field -> (current, wanted), for people reading a plan."""

    step: Step
    method: Method
    path: str
    body: Mapping[str, Any]
    target: str
    changes: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        what = self.step.value.split("_", 1)[0]
        if not self.changes:
            return f"{what} {self.target}"
        diffs = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in self.changes.items())
        return f"{what} {self.target} ({diffs})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step.value,
            "target": self.target,
            "method": self.method.value,
            "path": self.path,
            "body": dict(self.body),
            "changes": {key: {"current": old, "wanted": new} for key, (old, new) in self.changes.items()},
        }


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    policy: str

    @property
    def empty(self) -> bool:
        return not self.actions

    @property
    def disables_policy(self) -> bool:
        return any(a.step is Step.DISABLE_POLICY for a in self.actions)

    @property
    def enable_action(self) -> Action | None:
        return next((a for a in self.actions if a.step is Step.ENABLE_POLICY), None)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "changes": len(self.actions), "actions": [a.to_dict() for a in self.actions]}


def fpolicy_path(svm_uuid: str, collection: str, name: str | None = None) -> str:
    base = f"{FPOLICY_API}/{quote(svm_uuid, safe='')}/{collection}"
    return base if name is None else f"{base}/{quote(name, safe='')}"


def policy_enable(svm_uuid: str, policy: str, priority: int) -> Action:
    return Action(
        Step.ENABLE_POLICY,
        Method.PATCH,
        fpolicy_path(svm_uuid, "policies", policy),
        {"enabled": True, "priority": priority},
        f"policy {policy}",
    )


def policy_disable(svm_uuid: str, policy: str) -> Action:
    return Action(
        Step.DISABLE_POLICY,
        Method.PATCH,
        fpolicy_path(svm_uuid, "policies", policy),
        {"enabled": False},
        f"policy {policy}",
    )


def _same_set(current: Any, wanted: Sequence[str]) -> bool:
    return isinstance(current, list) and sorted(str(v) for v in current) == sorted(wanted)


def _engine_changes(current: Mapping[str, Any], wanted: DesiredEngine) -> dict[str, tuple[Any, Any]]:
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in wanted.fields().items():
        old = current.get(key)
        same = _same_set(old, value) if key == "primary_servers" else old == value
        if not same:
            changes[key] = (old, value)
    return changes


def _enabled_operations(record: Mapping[str, Any]) -> set[str]:
    ops = record.get("file_operations") or {}
    return {name for name, on in ops.items() if on} if isinstance(ops, Mapping) else set()


def _event_action(svm_uuid: str, wanted: DesiredEvent, current: Mapping[str, Any] | None) -> Action | None:
    operations = dict.fromkeys(sorted(wanted.file_operations), True)
    if current is None:
        body = {"name": wanted.name, "protocol": wanted.protocol.value, "file_operations": operations}
        return Action(Step.CREATE_EVENT, Method.POST, fpolicy_path(svm_uuid, "events"), body, f"event {wanted.name}")
    changes: dict[str, tuple[Any, Any]] = {}
    patch: dict[str, Any] = {}
    if current.get("protocol") != wanted.protocol.value:
        changes["protocol"] = (current.get("protocol"), wanted.protocol.value)
        patch["protocol"] = wanted.protocol.value
    now_on = _enabled_operations(current)
    if now_on != set(wanted.file_operations):
        changes["file_operations"] = (sorted(now_on), sorted(wanted.file_operations))
        patch["file_operations"] = {op: op in wanted.file_operations for op in sorted(now_on | wanted.file_operations)}
    if not patch:
        return None
    path = fpolicy_path(svm_uuid, "events", wanted.name)
    return Action(Step.UPDATE_EVENT, Method.PATCH, path, patch, f"event {wanted.name}", changes)


def _policy_fields(wanted: DesiredPolicy) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "engine": {"name": wanted.engine},
        "events": [{"name": name} for name in wanted.events],
        "mandatory": wanted.mandatory,
        "scope": {"include_volumes": list(wanted.include_volumes)},
    }
    if wanted.persistent_store is not None:
        fields["persistent_store"] = wanted.persistent_store
    return fields


def _policy_action(svm_uuid: str, wanted: DesiredPolicy, current: Mapping[str, Any] | None) -> Action | None:
    target = f"policy {wanted.name}"
    if current is None:
        # Created without a priority, so disabled; it is enabled as the last step, after everything it uses.
        body = {"name": wanted.name, **_policy_fields(wanted)}
        return Action(Step.CREATE_POLICY, Method.POST, fpolicy_path(svm_uuid, "policies"), body, target)
    engine = (current.get("engine") or {}).get("name")
    events = sorted(str(e.get("name")) for e in current.get("events") or [])
    volumes = (current.get("scope") or {}).get("include_volumes") or []
    observed: dict[str, Any] = {
        "engine": engine,
        "events": events,
        "mandatory": current.get("mandatory", True),
        "scope": sorted(volumes),
        "persistent_store": current.get("persistent_store"),
    }
    expected: dict[str, Any] = {
        "engine": wanted.engine,
        "events": sorted(wanted.events),
        "mandatory": wanted.mandatory,
        "scope": sorted(wanted.include_volumes),
        "persistent_store": wanted.persistent_store,
    }
    fields = _policy_fields(wanted)
    changes = {key: (observed[key], expected[key]) for key in expected if observed[key] != expected[key]}
    if wanted.persistent_store is None:
        changes.pop("persistent_store", None)  # not managed by fpolicyd when no store is configured
    if not changes:
        return None
    patch = {key: fields[key] for key in changes}
    return Action(
        Step.UPDATE_POLICY, Method.PATCH, fpolicy_path(svm_uuid, "policies", wanted.name), patch, target, changes
    )


def plan_apply(desired: Desired, current: CurrentState) -> Plan:
    """Create or update the store, the engine, the events and the policy, then (re-)enable the policy."""
    svm = desired.svm_uuid
    changes: list[Action] = []
    store = desired.store
    if store is not None:
        if current.store is None:
            body = {"name": store.name, "volume": store.volume}
            changes.append(
                Action(
                    Step.CREATE_STORE,
                    Method.POST,
                    fpolicy_path(svm, "persistent-stores"),
                    body,
                    f"persistent store {store.name}",
                )
            )
        elif current.store.get("volume") != store.volume:
            changes.append(
                Action(
                    Step.UPDATE_STORE,
                    Method.PATCH,
                    fpolicy_path(svm, "persistent-stores", store.name),
                    {"volume": store.volume},
                    f"persistent store {store.name}",
                    {"volume": (current.store.get("volume"), store.volume)},
                )
            )
    engine = desired.engine
    if current.engine is None:
        changes.append(
            Action(
                Step.CREATE_ENGINE,
                Method.POST,
                fpolicy_path(svm, "engines"),
                {"name": engine.name, **engine.fields()},
                f"engine {engine.name}",
            )
        )
    else:
        diff = _engine_changes(current.engine, engine)
        if diff:
            patch = {key: new for key, (_, new) in diff.items()}
            changes.append(
                Action(
                    Step.UPDATE_ENGINE,
                    Method.PATCH,
                    fpolicy_path(svm, "engines", engine.name),
                    patch,
                    f"engine {engine.name}",
                    diff,
                )
            )
    for event in desired.events:
        action = _event_action(svm, event, current.events.get(event.name))
        if action is not None:
            changes.append(action)
    policy_action = _policy_action(svm, desired.policy, current.policy)
    if policy_action is not None:
        changes.append(policy_action)

    actions: list[Action] = []
    enabled = current.policy_enabled
    if changes and enabled:
        actions.append(policy_disable(svm, desired.policy.name))
    actions.extend(changes)
    if changes or not enabled:
        actions.append(policy_enable(svm, desired.policy.name, desired.policy.priority))
    return Plan(tuple(actions), desired.policy.name)


def plan_repoint(
    svm_uuid: str, current: CurrentState, *, engine_name: str, policy_name: str, priority: int, address: str
) -> Plan:
    """Point the engine's ``primary_servers`` at ``address`` alone and leave the policy enabled.

    ONTAP refuses to modify an engine used by an enabled policy, so an enabled policy is disabled first and
    enabled again after the PATCH. A policy found disabled is enabled too: a task starting up is meant to
    receive notifications, and a disabled policy left behind by an interrupted earlier repoint must not stay so.
    """
    if current.engine is None:
        raise ConfigError(f"engine {engine_name} does not exist on the SVM: run `fpolicyd ontap apply` first")
    if current.policy is None:
        raise ConfigError(f"policy {policy_name} does not exist on the SVM: run `fpolicyd ontap apply` first")
    servers = current.engine.get("primary_servers") or []
    actions: list[Action] = []
    if list(servers) != [address]:
        if current.policy_enabled:
            actions.append(policy_disable(svm_uuid, policy_name))
        actions.append(
            Action(
                Step.UPDATE_ENGINE,
                Method.PATCH,
                fpolicy_path(svm_uuid, "engines", engine_name),
                {"primary_servers": [address]},
                f"engine {engine_name}",
                {"primary_servers": (list(servers), [address])},
            )
        )
        actions.append(policy_enable(svm_uuid, policy_name, priority))
    elif not current.policy_enabled:
        actions.append(policy_enable(svm_uuid, policy_name, priority))
    return Plan(tuple(actions), policy_name)
