"""The IP address ONTAP must connect to: this task's own address (never a load balancer's).

1. ``ontap_server_address`` / ``--address`` when given;
2. on ECS, the task's address from the container metadata endpoint v4 (``$ECS_CONTAINER_METADATA_URI_V4``,
   ``Networks[0].IPv4Addresses[0]`` of the container document; awsvpc mode gives the task ENI's address);
3. otherwise the local address of the interface that routes to the ONTAP management host (a UDP ``connect``
   only asks the kernel for a route; nothing is sent).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson

from fpolicyd.errors import ConfigError

__all__ = ["ECS_METADATA_ENV", "address_from_container_metadata", "detect_address", "route_address"]

ECS_METADATA_ENV: Final = "ECS_CONTAINER_METADATA_URI_V4"


def _checked(value: str, source: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(f"{source}: {value!r} is not an IP address") from None


def address_from_container_metadata(document: Mapping[str, Any]) -> str:
    """The first IPv4 address of the container's first network (ECS task metadata v4, container document)."""
    networks = document.get("Networks")
    if isinstance(networks, list):
        for network in networks:
            addresses = network.get("IPv4Addresses") if isinstance(network, Mapping) else None
            if isinstance(addresses, list) and addresses and isinstance(addresses[0], str):
                return _checked(addresses[0], ECS_METADATA_ENV)
    raise ConfigError(f"{ECS_METADATA_ENV}: the container metadata has no Networks[].IPv4Addresses")


async def _from_metadata(uri: str, timeout_s: float) -> str:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(uri) as response,
        ):
            body = await response.read()
            if response.status != 200:
                raise ConfigError(f"{ECS_METADATA_ENV} {uri}: HTTP {response.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigError(f"{ECS_METADATA_ENV} {uri}: cannot read the task metadata: {exc}") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ConfigError(f"{ECS_METADATA_ENV} {uri}: the task metadata is not JSON") from None
    if not isinstance(document, Mapping):
        raise ConfigError(f"{ECS_METADATA_ENV} {uri}: the task metadata is not a JSON object")
    return address_from_container_metadata(document)


async def route_address(host: str, port: int) -> str:
    """The local address the kernel would use to reach ``host``."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError(f"ontap_url: cannot resolve {host}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(sockaddr)
        except OSError as exc:
            raise ConfigError(f"no route to the ONTAP host {host}: {exc}; set ontap_server_address") from None
        return str(probe.getsockname()[0])


async def detect_address(
    explicit: str | None, *, ontap_host: str, ontap_port: int, metadata_uri: str | None, timeout_s: float
) -> str:
    if explicit:
        return _checked(explicit, "ontap_server_address")
    if metadata_uri:
        return await _from_metadata(metadata_uri, timeout_s)
    return await route_address(ontap_host, ontap_port)
