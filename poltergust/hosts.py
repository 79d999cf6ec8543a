"""Which `Host` header names a local web server answers to (luigid, the dashboard): against DNS rebinding.

A page on another site can point its own name at loopback and then read (or
call) a server reached through an ssh tunnel as if it were its own; the
browser still sends that name in `Host`, so a server that answers only its
own names is out of reach.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")


def allowed_hosts(extra: Iterable[str], address: str | None) -> frozenset[str]:
    """The names `Host` may carry: loopback, the listening address (unless it is all addresses) and `extra`."""
    hosts = {*LOOPBACK_HOSTS, *extra}
    if address and address not in ANY_ADDRESS:
        hosts.add(address)
    return frozenset(host.strip().lower().strip("[]") for host in hosts if host.strip())


def host_name(value: str) -> str:
    """`example:8082` -> `example`, `[::1]:8082` -> `::1` (lower case); empty for a malformed value."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.index("]")] if "]" in value else ""
    if value.count(":") > 1:  # a bare IPv6 address
        try:
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            return ""
    return value.split(":", 1)[0]
