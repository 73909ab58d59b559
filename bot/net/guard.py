"""Outbound address guard: which addresses KubeCI may connect to.

Pipeline authors choose the URLs KubeCI calls, so a URL could point at the cloud
metadata service (169.254.169.254, fd00:ec2::254) and read the node's credentials.
The guard rejects link-local and metadata addresses unless `KUBECI_OUTBOUND_ALLOW`
lists them, and rejects whatever `KUBECI_OUTBOUND_DENY` lists.

The check runs at connect time on every hop of a request, redirects included.
`GuardedResolver` checks every address a host name resolves to. `guard_middleware` checks
URLs whose host is a literal IP address, because aiohttp connects to those without
calling the resolver.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult

from bot.config import ConfigError, Settings

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link-local ranges (where cloud metadata services live) and AWS's IPv6 metadata address.
BLOCKED_BY_DEFAULT: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundAddressRefused(Exception):
    """The guard rejected a connection before it was opened."""

    def __init__(self, host: str, address: str | None, reason: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        target = host if address is None or address == host else f"{host} ({address})"
        super().__init__(f"outbound connection to {target} rejected: {reason}")


def parse_address(text: str) -> IPAddress | None:
    """Return the IP address written in `text` (IPv4-mapped IPv6 as IPv4), else None."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address that an IPv6 address carries, else None.

    The forms: IPv4-compatible `::a.b.c.d` (deprecated, RFC 4291), NAT64 `64:ff9b::/96`
    (RFC 6052), 6to4 `2002::/16` (RFC 3056) and Teredo `2001::/32` (the client, RFC 4380).
    A network that routes these forms reaches the IPv4 host, link-local ones included.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    value = int(address)
    if value >> 32 == 0 and value > 1:  # not :: or ::1
        return ipaddress.IPv4Address(value)
    if address in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    # NOTE: local-use NAT64 prefixes (64:ff9b:1::/48 and operator prefixes) place the
    # IPv4 address by prefix length, which the guard cannot know; deny them if routed.
    return None


def _normalize_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class _Entries:
    networks: tuple[IPNetwork, ...]
    hosts: tuple[str, ...]

    @classmethod
    def parse(cls, items: Iterable[str], setting: str) -> _Entries:
        networks: list[IPNetwork] = []
        hosts: list[str] = []
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            if "/" in item or parse_address(item) is not None:
                networks.append(_parse_network(item, setting))
            else:
                hosts.append(_normalize_host(item))
        return cls(tuple(networks), tuple(hosts))

    def matches_host(self, host: str) -> bool:
        name = _normalize_host(host)
        for entry in self.hosts:
            # "*.example.com" and ".example.com" match every subdomain of example.com.
            suffix = entry.removeprefix("*")
            if name == entry or (suffix.startswith(".") and name.endswith(suffix)):
                return True
        return False

    def matches_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def _parse_network(item: str, setting: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(item.strip("[]"), strict=False)
    except ValueError:
        raise ConfigError(
            f"{setting} entry {item!r} is not a valid address or CIDR range; "
            "write it like 10.0.0.0/8, fd00::/8 or a host name"
        ) from None
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


@dataclass(frozen=True)
class OutboundPolicy:
    """Allow and deny entries; a deny entry wins over an allow entry."""

    allow: _Entries
    deny: _Entries

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls.from_lists(settings.outbound_allow, settings.outbound_deny)

    @classmethod
    def from_lists(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> OutboundPolicy:
        """Build a policy from entries that are host names, IP addresses or CIDR ranges.

        Raises `ConfigError` naming an entry that looks like an address but is invalid.
        """
        return cls(
            allow=_Entries.parse(allow, "KUBECI_OUTBOUND_ALLOW"),
            deny=_Entries.parse(deny, "KUBECI_OUTBOUND_DENY"),
        )

    def check_host(self, host: str) -> None:
        """Raise `OutboundAddressRefused` when the host name itself is denied."""
        if self.deny.matches_host(host):
            raise OutboundAddressRefused(
                host, None, "the host is listed in KUBECI_OUTBOUND_DENY; remove it there"
            )

    def check_address(self, host: str, address_text: str) -> None:
        """Raise `OutboundAddressRefused` when `host` may not be reached at this address.

        An IPv6 address that carries an IPv4 address (see `embedded_ipv4`) is checked as
        both addresses.
        """
        address = parse_address(address_text)
        if address is None:
            raise OutboundAddressRefused(host, address_text, "the address is not a valid IP")
        embedded = embedded_ipv4(address)
        candidates = [address] if embedded is None else [address, embedded]
        carries = "" if embedded is None else f" (it carries the IPv4 address {embedded})"
        if any(self.deny.matches_address(candidate) for candidate in candidates):
            raise OutboundAddressRefused(
                host,
                str(address),
                f"the address{carries} is in a range listed in KUBECI_OUTBOUND_DENY",
            )
        if not any(_blocked_by_default(candidate) for candidate in candidates):
            return
        if self.allow.matches_host(host) or any(map(self.allow.matches_address, candidates)):
            return
        raise OutboundAddressRefused(
            host,
            str(address),
            f"link-local and cloud metadata addresses are blocked by default{carries}; "
            "add the address or host to KUBECI_OUTBOUND_ALLOW to allow it",
        )


def _blocked_by_default(address: IPAddress) -> bool:
    return any(address in network for network in BLOCKED_BY_DEFAULT)


class GuardedResolver(AbstractResolver):
    """A resolver that checks every resolved address against an `OutboundPolicy`.

    One rejected address rejects the whole host, so that the connector never falls
    back to it.
    """

    def __init__(self, inner: AbstractResolver, policy: OutboundPolicy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self._policy.check_host(host)
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._check(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()

    def _check(self, host: str, address: str) -> None:
        try:
            self._policy.check_address(host, address)
        except OutboundAddressRefused as exc:
            log.warning("%s", exc)
            raise


def guard_middleware(policy: OutboundPolicy) -> ClientMiddlewareType:
    """Return an aiohttp client middleware that checks each hop's host before connecting.

    aiohttp (3.12 and later) calls session middlewares once per hop, redirects included.
    A request made with `middlewares=()` replaces the session's middlewares and skips this
    check, so KubeCI code never passes that argument.
    """

    async def middleware(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        host = request.url.raw_host or ""
        policy.check_host(host)
        if parse_address(host) is not None:
            try:
                policy.check_address(host, host)
            except OutboundAddressRefused as exc:
                log.warning("%s", exc)
                raise
        return await handler(request)

    return middleware
