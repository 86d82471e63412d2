"""Which REST calls `fpolicyd ontap apply/repoint` makes, decided without HTTP (fpolicyd.ontap.plan)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.config import load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.ontap.address import address_from_container_metadata
from fpolicyd.ontap.ops import desired_from_settings
from fpolicyd.ontap.plan import (
    SUPPORTED_FILE_OPERATIONS,
    CurrentState,
    Desired,
    DesiredEngine,
    DesiredEvent,
    DesiredPolicy,
    DesiredStore,
    EngineType,
    Method,
    Protocol,
    SslOption,
    Step,
    plan_apply,
    plan_repoint,
)

SVM = "4f643fb4-fd21-11e8-ae49-0050568e2c1e"
BASE = f"/api/protocols/fpolicy/{SVM}"
OPS = frozenset({"create", "write", "rename", "delete"})


def desired(
    *, address: str = "10.0.0.10", store: bool = False, protocols: tuple[Protocol, ...] = (Protocol.CIFS,)
) -> Desired:
    events = tuple(DesiredEvent(f"fpolicyd_{p.value}", p, OPS) for p in protocols)
    return Desired(
        svm_uuid=SVM,
        engine=DesiredEngine("fpolicyd", (address,), 9898, EngineType.ASYNCHRONOUS, SslOption.NO_AUTH),
        events=events,
        policy=DesiredPolicy(
            "fpolicyd",
            "fpolicyd",
            tuple(e.name for e in events),
            mandatory=False,
            include_volumes=("vol1",),
            priority=1,
            persistent_store="ps1" if store else None,
        ),
        store=DesiredStore("ps1", "fpolicy_ps") if store else None,
    )


def matching_state(want: Desired, *, enabled: bool = True) -> CurrentState:
    """What ONTAP returns once `want` is applied (with fields ONTAP adds that fpolicyd does not manage)."""
    engine = {"name": want.engine.name, **want.engine.fields(), "secondary_servers": [], "keep_alive_interval": "PT2M"}
    events: dict[str, Any] = {
        e.name: {
            "name": e.name,
            "protocol": e.protocol.value,
            "file_operations": {op: op in e.file_operations for op in SUPPORTED_FILE_OPERATIONS[e.protocol]},
            "volume_monitoring": False,
        }
        for e in want.events
    }
    policy: dict[str, Any] = {
        "name": want.policy.name,
        "engine": {"name": want.policy.engine},
        "events": [{"name": n} for n in reversed(want.policy.events)],
        "mandatory": want.policy.mandatory,
        "scope": {"include_volumes": list(want.policy.include_volumes)},
        "enabled": enabled,
        "priority": 1,
    }
    store = None
    if want.store is not None:
        policy["persistent_store"] = want.store.name
        store = {"name": want.store.name, "volume": want.store.volume}
    return CurrentState(engine=engine, events=events, policy=policy, store=store)


def empty_state(want: Desired) -> CurrentState:
    return CurrentState(engine=None, events={e.name: None for e in want.events}, policy=None, store=None)


def steps(actions: Any) -> list[Step]:
    return [a.step for a in actions]


def test_from_empty_creates_everything_in_dependency_order_then_enables() -> None:
    want = desired(store=True, protocols=(Protocol.CIFS, Protocol.NFSV3))
    plan = plan_apply(want, empty_state(want))
    assert steps(plan.actions) == [
        Step.CREATE_STORE,
        Step.CREATE_ENGINE,
        Step.CREATE_EVENT,
        Step.CREATE_EVENT,
        Step.CREATE_POLICY,
        Step.ENABLE_POLICY,
    ]
    store, engine, cifs, nfs, policy, enable = plan.actions
    assert (store.method, store.path, dict(store.body)) == (
        Method.POST,
        f"{BASE}/persistent-stores",
        {"name": "ps1", "volume": "fpolicy_ps"},
    )
    assert engine.path == f"{BASE}/engines"
    assert engine.body == {
        "name": "fpolicyd",
        "primary_servers": ["10.0.0.10"],
        "port": 9898,
        "type": "asynchronous",
        "format": "xml",
        "ssl_option": "no_auth",
    }
    assert cifs.body["protocol"] == "cifs"
    assert nfs.body["protocol"] == "nfsv3"
    assert cifs.body["file_operations"] == dict.fromkeys(sorted(OPS), True)
    assert policy.body == {
        "name": "fpolicyd",
        "engine": {"name": "fpolicyd"},
        "events": [{"name": "fpolicyd_cifs"}, {"name": "fpolicyd_nfsv3"}],
        "mandatory": False,
        "scope": {"include_volumes": ["vol1"]},
        "persistent_store": "ps1",
    }
    assert "priority" not in policy.body  # created disabled, enabled last
    assert (enable.method, enable.path, dict(enable.body)) == (
        Method.PATCH,
        f"{BASE}/policies/fpolicyd",
        {"enabled": True, "priority": 1},
    )
    assert not plan.disables_policy


def test_no_op_when_ontap_already_matches() -> None:
    want = desired(store=True, protocols=(Protocol.CIFS, Protocol.NFSV4))
    plan = plan_apply(want, matching_state(want))
    assert plan.empty
    assert plan.to_dict()["changes"] == 0


def test_disabled_but_matching_policy_is_only_enabled() -> None:
    want = desired()
    assert steps(plan_apply(want, matching_state(want, enabled=False)).actions) == [Step.ENABLE_POLICY]


def test_changed_address_patches_only_the_engine_field_inside_disable_enable() -> None:
    want = desired(address="10.0.0.11")
    current = matching_state(desired(address="10.0.0.10"))
    plan = plan_apply(want, current)
    assert steps(plan.actions) == [Step.DISABLE_POLICY, Step.UPDATE_ENGINE, Step.ENABLE_POLICY]
    update = plan.actions[1]
    assert dict(update.body) == {"primary_servers": ["10.0.0.11"]}
    assert update.changes == {"primary_servers": (["10.0.0.10"], ["10.0.0.11"])}
    assert "10.0.0.10" in update.describe()
    assert dict(plan.actions[0].body) == {"enabled": False}


def test_ontap_defaults_synchronous_and_mandatory_are_corrected() -> None:
    want = desired()
    current = matching_state(want)
    assert current.engine is not None
    assert current.policy is not None
    engine = {**current.engine, "type": "synchronous"}
    policy = {**current.policy, "mandatory": True, "enabled": False}
    plan = plan_apply(want, CurrentState(engine=engine, events=current.events, policy=policy))
    assert steps(plan.actions) == [Step.UPDATE_ENGINE, Step.UPDATE_POLICY, Step.ENABLE_POLICY]
    assert dict(plan.actions[0].body) == {"type": "asynchronous"}
    assert dict(plan.actions[1].body) == {"mandatory": False}


def test_event_operations_diff_turns_extra_ones_off() -> None:
    want = desired()
    current = matching_state(want)
    event = dict(current.events["fpolicyd_cifs"] or {})
    event["file_operations"] = {"create": True, "read": True, "write": False}
    plan = plan_apply(want, CurrentState(current.engine, {"fpolicyd_cifs": event}, current.policy))
    assert steps(plan.actions) == [Step.DISABLE_POLICY, Step.UPDATE_EVENT, Step.ENABLE_POLICY]
    assert plan.actions[1].body == {
        "file_operations": {"create": True, "delete": True, "read": False, "rename": True, "write": True}
    }


def test_store_volume_change_and_scope_change() -> None:
    want = desired(store=True)
    current = matching_state(want)
    assert current.policy is not None
    policy = {**current.policy, "scope": {"include_volumes": ["vol1", "vol2"]}}
    plan = plan_apply(want, CurrentState(current.engine, current.events, policy, {"name": "ps1", "volume": "old"}))
    assert steps(plan.actions) == [
        Step.DISABLE_POLICY,
        Step.UPDATE_STORE,
        Step.UPDATE_POLICY,
        Step.ENABLE_POLICY,
    ]
    assert dict(plan.actions[1].body) == {"volume": "fpolicy_ps"}
    assert dict(plan.actions[2].body) == {"scope": {"include_volumes": ["vol1"]}}


def test_repoint_sequence_is_disable_patch_enable() -> None:
    current = matching_state(desired(address="10.0.0.10"))
    plan = plan_repoint(SVM, current, engine_name="fpolicyd", policy_name="fpolicyd", priority=3, address="10.0.9.9")
    assert [(a.step, a.method, a.path, dict(a.body)) for a in plan.actions] == [
        (Step.DISABLE_POLICY, Method.PATCH, f"{BASE}/policies/fpolicyd", {"enabled": False}),
        (Step.UPDATE_ENGINE, Method.PATCH, f"{BASE}/engines/fpolicyd", {"primary_servers": ["10.0.9.9"]}),
        (Step.ENABLE_POLICY, Method.PATCH, f"{BASE}/policies/fpolicyd", {"enabled": True, "priority": 3}),
    ]


def test_repoint_when_already_pointing_here_does_nothing_and_enables_a_disabled_policy() -> None:
    current = matching_state(desired(address="10.0.0.10"))
    kwargs: dict[str, Any] = {"engine_name": "fpolicyd", "policy_name": "fpolicyd", "priority": 1}
    assert plan_repoint(SVM, current, address="10.0.0.10", **kwargs).empty
    disabled = matching_state(desired(address="10.0.0.10"), enabled=False)
    assert steps(plan_repoint(SVM, disabled, address="10.0.0.10", **kwargs).actions) == [Step.ENABLE_POLICY]
    assert steps(plan_repoint(SVM, disabled, address="10.0.0.12", **kwargs).actions) == [
        Step.UPDATE_ENGINE,
        Step.ENABLE_POLICY,
    ]


def test_repoint_needs_the_engine_and_policy() -> None:
    with pytest.raises(ConfigError, match="ontap apply"):
        plan_repoint(
            SVM,
            CurrentState(None, {}, None),
            engine_name="fpolicyd",
            policy_name="fpolicyd",
            priority=1,
            address="10.0.0.1",
        )


def test_unsupported_operation_for_a_protocol_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"ontap_file_operations: open cannot be monitored over nfsv3"):
        DesiredEvent("e", Protocol.NFSV3, frozenset({"open", "create"}))


def test_persistent_store_needs_async_and_non_mandatory() -> None:
    want = desired(store=True)
    with pytest.raises(ConfigError, match="asynchronous engine"):
        Desired(
            svm_uuid=SVM,
            engine=DesiredEngine("e", ("10.0.0.1",), 9898, EngineType.SYNCHRONOUS, SslOption.NO_AUTH),
            events=want.events,
            policy=want.policy,
            store=want.store,
        )


@given(
    address=st.ip_addresses(v=4).map(str),
    protocols=st.lists(st.sampled_from(list(Protocol)), min_size=1, max_size=3, unique=True),
    enabled=st.booleans(),
    store=st.booleans(),
)
def test_applying_a_plan_converges(address: str, protocols: list[Protocol], enabled: bool, store: bool) -> None:
    """Property: after the plan's changes, planning again is a no-op; a plan that disables also re-enables last."""
    old = desired(address="192.0.2.1", protocols=(Protocol.CIFS,), store=store)
    want = desired(address=address, protocols=tuple(protocols), store=store)
    plan = plan_apply(want, matching_state(old, enabled=enabled))
    if plan.disables_policy:
        assert plan.actions[0].step is Step.DISABLE_POLICY
    if not plan.empty:
        assert plan.actions[-1].step is Step.ENABLE_POLICY
    assert plan_apply(want, matching_state(want)).empty


def test_task_address_from_ecs_container_metadata_v4() -> None:
    document = {
        "DockerId": "ea32192c8553fbff06c9340478a2ff089b2bb5646fb718b4ee206641c9086d66",
        "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.106"]}],
    }
    assert address_from_container_metadata(document) == "10.0.2.106"
    with pytest.raises(ConfigError, match="IPv4Addresses"):
        address_from_container_metadata({"Networks": []})
    with pytest.raises(ConfigError, match="not an IP address"):
        address_from_container_metadata({"Networks": [{"IPv4Addresses": ["ten.zero"]}]})


def test_desired_state_follows_the_server_settings() -> None:
    settings = load_settings(
        None,
        {
            "listen_port": 9999,
            "engine_mode": "sync",
            "ontap_protocols": "nfsv3, NFSV4,nfsv3",
            "ontap_volumes": "vol1",
            "ontap_event_name": "audit",
        },
        search_default_paths=False,
    )
    want = desired_from_settings(settings, SVM, "10.0.0.7")
    assert want.engine.fields() == {
        "primary_servers": ["10.0.0.7"],
        "port": 9999,
        "type": "synchronous",
        "format": "xml",
        "ssl_option": "no_auth",
    }
    assert [(e.name, e.protocol) for e in want.events] == [
        ("audit_nfsv3", Protocol.NFSV3),
        ("audit_nfsv4", Protocol.NFSV4),
    ]
    assert want.policy.mandatory is False
    assert want.store is None
    half_store = load_settings(None, {"ontap_persistent_store": "ps1"}, search_default_paths=False)
    with pytest.raises(ConfigError, match="go together"):
        desired_from_settings(half_store, SVM, "10.0.0.7")
    bad_protocol = load_settings(None, {"ontap_protocols": "smb"}, search_default_paths=False)
    with pytest.raises(ConfigError, match="ontap_protocols"):
        desired_from_settings(bad_protocol, SVM, "10.0.0.7")
