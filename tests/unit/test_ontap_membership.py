"""Engine membership without HTTP (fpolicyd.ontap.membership): join / leave / prune → the engine's new server
lists, the REST calls that get there, and which servers ONTAP's connection records show gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.errors import ConfigError
from fpolicyd.ontap.membership import (
    Membership,
    Operation,
    Role,
    Servers,
    join,
    leave,
    plan_membership,
    prune,
    stale_servers,
)
from fpolicyd.ontap.plan import CurrentState, Step

SVM = "4f643fb4-fd21-11e8-ae49-0050568e2c1e"
NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)

addresses = st.ip_addresses(v=4).map(str)
address_lists = st.lists(addresses, max_size=6, unique=True)


@st.composite
def servers(draw: st.DrawFn, *, min_primary: int = 1) -> Servers:
    primary = draw(st.lists(addresses, min_size=min_primary, max_size=6, unique=True))
    secondary = draw(st.lists(addresses.filter(lambda a: a not in primary), max_size=4, unique=True))
    return Servers(tuple(primary), tuple(secondary))


def state(servers: Servers, *, enabled: bool = True) -> CurrentState:
    engine: dict[str, Any] = {"name": "fpolicyd", "port": 9898, **servers.to_dict()}
    policy: dict[str, Any] = {"name": "fpolicyd", "enabled": enabled, "engine": {"name": "fpolicyd"}}
    return CurrentState(engine=engine, events={}, policy=policy)


def plan(membership: Membership, *, enabled: bool = True, enable_if_disabled: bool = False) -> Any:
    return plan_membership(
        SVM,
        state(membership.before, enabled=enabled),
        membership,
        engine_name="fpolicyd",
        policy_name="fpolicyd",
        priority=1,
        enable_if_disabled=enable_if_disabled,
    )


def no_duplicates(s: Servers) -> bool:
    every = [*s.primary, *s.secondary]
    return len(every) == len(set(every))


def others(addresses: tuple[str, ...], address: str) -> list[str]:
    return [a for a in addresses if a != address]


# ---------------------------------------------------------------------------------------------- properties


@given(before=servers(), address=addresses, role=st.sampled_from(list(Role)))
def test_join_is_idempotent_keeps_the_others_in_order_and_has_no_duplicates(
    before: Servers, address: str, role: Role
) -> None:
    if role is Role.SECONDARY and before.primary == (address,):
        with pytest.raises(ConfigError, match="only primary server"):
            join(before, address, role)
        return
    once = join(before, address, role)
    after = once.after
    assert address in (after.primary if role is Role.PRIMARY else after.secondary)
    assert no_duplicates(after)
    assert others(after.primary, address) == others(before.primary, address)
    assert others(after.secondary, address) == others(before.secondary, address)
    twice = join(after, address, role)
    assert not twice.changed
    assert twice.after == after
    assert plan(twice).empty  # no disable → modify → enable window when nothing changes


@given(before=servers(), address=addresses)
def test_leave_after_join_restores_the_lists(before: Servers, address: str) -> None:
    if address in before:
        before = leave(before, address).after
        if address in before:  # it was the last primary: kept
            return
    joined = join(before, address).after
    assert leave(joined, address).after == before
    assert not leave(before, address).changed


@given(before=servers(), stale=st.frozensets(addresses, max_size=4), data=st.data())
def test_prune_removes_only_stale_servers_and_never_the_last_primary(
    before: Servers, stale: frozenset[str], data: st.DataObject
) -> None:
    stale = stale | data.draw(st.frozensets(st.sampled_from([*before.primary, *before.secondary]), max_size=3))
    pruned = prune(before, stale)
    after = pruned.after
    assert after.primary, "ONTAP needs a primary server"
    kept = set(pruned.kept)
    for address in [*before.primary, *before.secondary]:
        if address not in stale:
            assert address in after, "a connected server was pruned"
        elif address not in kept:
            assert address not in after
    assert pruned.kept in ((), before.primary[:1])
    assert bool(pruned.kept) == all(a in stale for a in before.primary)
    assert no_duplicates(after)
    assert [a for a in before.primary if a in after] == list(after.primary)  # order kept
    assert not prune(after, stale).changed


@given(before=servers(), address=addresses, role=st.sampled_from(list(Role)), enabled=st.booleans())
def test_a_change_is_one_engine_patch_inside_disable_enable(
    before: Servers, address: str, role: Role, enabled: bool
) -> None:
    if role is Role.SECONDARY and before.primary == (address,):
        return
    membership = join(before, address, role)
    actions = plan(membership, enabled=enabled).actions
    if not membership.changed:
        assert actions == ()
        return
    want = [Step.DISABLE_POLICY] if enabled else []
    assert [a.step for a in actions] == [*want, Step.UPDATE_ENGINE, Step.ENABLE_POLICY]
    patch = actions[-2]
    assert patch.body == membership.after.to_dict()
    assert patch.path == f"/api/protocols/fpolicy/{SVM}/engines/fpolicyd"
    assert actions[-1].body == {"enabled": True, "priority": 1}


# ------------------------------------------------------------------------------------------------ examples


def test_join_appends_and_moves_between_lists() -> None:
    s = Servers(("10.0.0.1", "10.0.0.2"), ("10.0.0.9",))
    assert join(s, "10.0.0.3").after == Servers(("10.0.0.1", "10.0.0.2", "10.0.0.3"), ("10.0.0.9",))
    assert join(s, "10.0.0.9").after == Servers(("10.0.0.1", "10.0.0.2", "10.0.0.9"), ())
    assert join(s, "10.0.0.1", Role.SECONDARY).after == Servers(("10.0.0.2",), ("10.0.0.9", "10.0.0.1"))


def test_leave_keeps_the_last_primary_and_says_so() -> None:
    alone = leave(Servers(("10.0.0.1",), ("10.0.0.9",)), "10.0.0.1")
    assert not alone.changed
    assert alone.kept == ("10.0.0.1",)
    assert leave(Servers(("10.0.0.1", "10.0.0.2")), "10.0.0.1").after == Servers(("10.0.0.2",))
    assert leave(Servers(("10.0.0.1",)), "10.0.0.7").kept == ()


def test_unchanged_join_only_enables_a_disabled_policy() -> None:
    membership = join(Servers(("10.0.0.1",)), "10.0.0.1")
    assert [a.step for a in plan(membership, enabled=False, enable_if_disabled=True).actions] == [Step.ENABLE_POLICY]
    assert plan(membership, enabled=False).empty  # leave / prune: nothing to do, nothing touched
    assert plan(membership, enabled=True, enable_if_disabled=True).empty


def test_plan_needs_the_engine_and_the_policy() -> None:
    membership = join(Servers(("10.0.0.1",)), "10.0.0.2")
    for current, missing in (
        (CurrentState(engine=None, events={}, policy={"name": "fpolicyd"}), "engine fpolicyd"),
        (CurrentState(engine={"name": "fpolicyd"}, events={}, policy=None), "policy fpolicyd"),
    ):
        with pytest.raises(ConfigError, match=f"{missing} does not exist"):
            plan_membership(
                SVM,
                current,
                membership,
                engine_name="fpolicyd",
                policy_name="fpolicyd",
                priority=1,
                enable_if_disabled=True,
            )


def test_servers_of_an_engine_record() -> None:
    engine = {"primary_servers": ["10.0.0.1", "10.0.0.1", "10.0.0.2"], "secondary_servers": ["10.0.0.2", "10.0.0.3"]}
    assert Servers.of_engine(engine) == Servers(("10.0.0.1", "10.0.0.2"), ("10.0.0.3",))
    assert Servers.of_engine({"primary_servers": ["10.0.0.1"]}).secondary == ()
    assert Operation("prune") is Operation.PRUNE


def record(server: str, state: str, age_s: float, node: str = "n1", **extra: Any) -> dict[str, Any]:
    when = (NOW - timedelta(seconds=age_s)).astimezone(datetime.fromisoformat("2026-01-01T00:00+05:30").tzinfo)
    return {"server": server, "state": state, "node": {"name": node}, "update_time": when.isoformat(), **extra}


def test_stale_servers_are_disconnected_on_every_node_for_longer_than_the_grace() -> None:
    connections = [
        record("10.0.0.1", "disconnected", 600),  # gone for 10 min
        record("10.0.0.2", "disconnected", 30),  # just went away: within the grace
        record("10.0.0.3", "disconnected", 600),
        record("10.0.0.3", "connected", 600, node="n2"),  # still connected to another node
        record("10.0.0.4", "connected", 6000),
        record("10.0.0.5", "disconnected", 600, node="n1"),
        record("10.0.0.5", "disconnected", 900, node="n2"),
        {"server": "10.0.0.6", "state": "disconnected", "update_time": "not a time"},
        {"server": "10.0.0.7", "state": "disconnected"},
        {"server": "10.0.0.8", "state": "disconnected", "update_time": "2026-12-07T09:00:00"},  # no offset
        {"state": "disconnected", "update_time": "2026-12-07T09:00:00Z"},  # no server
    ]
    assert stale_servers(connections, now=NOW, grace_s=300) == {"10.0.0.1", "10.0.0.5"}
    assert stale_servers(connections, now=NOW, grace_s=20) == {"10.0.0.1", "10.0.0.2", "10.0.0.5"}
    assert stale_servers(
        [{"server": "10.0.0.9", "state": "disconnected", "update_time": "2026-12-07T09:00:00Z"}], now=NOW, grace_s=60
    ) == {"10.0.0.9"}
    with pytest.raises(ValueError, match="timezone-aware"):
        stale_servers([], now=NOW.replace(tzinfo=None), grace_s=1)


@given(
    connected=address_lists,
    gone=st.lists(addresses, max_size=4, unique=True),
    grace_s=st.floats(min_value=1, max_value=3600),
)
def test_prune_never_touches_a_connected_server(connected: list[str], gone: list[str], grace_s: float) -> None:
    connections = [record(a, "connected", grace_s * 2) for a in connected]
    connections += [record(a, "disconnected", grace_s + 1, node="n2") for a in gone]
    stale = stale_servers(connections, now=NOW, grace_s=grace_s)
    assert stale == set(gone) - set(connected)
    before = Servers(("192.0.2.1", *connected), tuple(a for a in gone if a not in connected))
    after = prune(before, stale).after
    assert all(a in after for a in connected)
