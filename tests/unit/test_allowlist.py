"""The peer allowlist: parsing, IPv4-mapped IPv6, and agreement with ipaddress membership over generated input."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpolicyd.config import Settings, load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.server.allowlist import PeerAllowlist


def test_empty_list_allows_everyone() -> None:
    allowlist = PeerAllowlist.parse([])
    assert allowlist.open
    assert allowlist.allows("203.0.113.9")
    assert allowlist.describe() == ["any"]


def test_cidrs_and_single_addresses() -> None:
    allowlist = PeerAllowlist.parse(["10.0.1.0/24", "192.0.2.7", "2001:db8::/32"])
    assert allowlist.allows("10.0.1.200")
    assert not allowlist.allows("10.0.2.1")
    assert allowlist.allows("192.0.2.7")
    assert not allowlist.allows("192.0.2.8")
    assert allowlist.allows("2001:db8::1")
    assert not allowlist.allows("2001:db9::1")
    assert allowlist.describe() == ["10.0.1.0/24", "192.0.2.7/32", "2001:db8::/32"]


def test_ipv4_mapped_ipv6_peer_is_matched_as_ipv4() -> None:
    allowlist = PeerAllowlist.parse(["10.0.1.0/24"])
    assert allowlist.allows("::ffff:10.0.1.5")
    assert not allowlist.allows("::ffff:10.0.9.5")


def test_zone_index_is_ignored_and_non_addresses_are_refused() -> None:
    allowlist = PeerAllowlist.parse(["fe80::/10"])
    assert allowlist.allows("fe80::1%eth0")
    assert not allowlist.allows("")
    assert not allowlist.allows("/run/fpolicyd.sock")


def test_host_bits_are_ignored() -> None:
    assert PeerAllowlist.parse(["10.0.0.5/24"]).allows("10.0.0.77")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-ip", "10.0.0"])
def test_bad_entries_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        PeerAllowlist.parse([bad])
    with pytest.raises(ConfigError, match="allowed_networks"):
        load_settings(overrides={"allowed_networks": bad}, search_default_paths=False)


def test_setting_accepts_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPOLICYD_ALLOWED_NETWORKS", "10.0.1.0/24, 10.0.2.0/24")
    settings: Settings = load_settings(search_default_paths=False)
    assert settings.allowed_networks == ("10.0.1.0/24", "10.0.2.0/24")


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
networks = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
    st.tuples(ipv6, st.integers(0, 128)).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
)


@given(st.lists(networks, max_size=6), st.one_of(ipv4, ipv6))
def test_agrees_with_ipaddress_membership(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], peer: object
) -> None:
    allowlist = PeerAllowlist.parse([str(net) for net in nets])
    mapped = peer.ipv4_mapped if isinstance(peer, ipaddress.IPv6Address) else None
    effective = mapped if mapped is not None else peer
    expected = not nets or any(effective in net for net in nets)
    assert allowlist.allows(str(peer)) is expected
