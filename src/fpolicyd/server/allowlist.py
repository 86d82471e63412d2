"""Which peers may open an FPolicy session: the SVM's data LIFs, nobody else.

A connection from anywhere else costs a session slot and, when it speaks the protocol, can inject fake file
events; the allowlist closes it before anything is read. IPv4 peers seen through an IPv6 socket arrive as
IPv4-mapped addresses (``::ffff:10.0.0.5``) and are matched as the IPv4 address they are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class PeerAllowlist:
    """Empty = every peer is allowed (the embedded default)."""

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, specs: Iterable[str]) -> PeerAllowlist:
        """CIDRs or single addresses; host bits are ignored (``10.0.0.5/24`` means ``10.0.0.0/24``).

        Raises ValueError naming the bad entry."""
        networks: list[IPNetwork] = []
        for spec in specs:
            try:
                networks.append(ipaddress.ip_network(spec.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"{spec!r} is not an IP network or address ({exc})") from None
        return cls(tuple(networks))

    @property
    def open(self) -> bool:
        return not self.networks

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an address as the socket reports it, maybe with an IPv6 zone) may connect.

        Anything that is not an IP address (a Unix socket path, an empty string) is refused when a list is set."""
        if not self.networks:
            return True
        try:
            address: IPAddress = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def describe(self) -> list[str]:
        return [str(network) for network in self.networks] or ["any"]
