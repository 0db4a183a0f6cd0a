"""Which addresses a node's outgoing connections may reach.

A registered endpoint names any host, and a relay forwards bytes its sender chose: a node on the public internet that
dialled loopback or private addresses would let any registrant point it at a service on its own host or network.
``public_only_socket`` is aiohttp's ``socket_factory`` hook for such a node; :func:`dial_private_by_default` is the
rule ``ps-node serve`` applies when the operator does not choose.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any


def public_only_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's ``socket_factory`` for a node that dials only public addresses: called with the address about to be
    connected to (a literal one, or one a name resolved to, so DNS rebinding does not get past it)."""
    family, kind, proto, _canonical, sockaddr = addr_info
    if not ipaddress.ip_address(sockaddr[0]).is_global:
        raise OSError(errno.EACCES, "refusing to connect to a non-public address")
    return socket.socket(family=family, type=kind, proto=proto)


def dial_private_by_default(listen_host: str) -> bool:
    """Whether a node listening on ``listen_host`` may dial non-public addresses unless told otherwise: yes when it
    listens on a loopback or private address (a network on one host or a LAN: its peers are there too), no when it
    listens on a public address or on every interface (``0.0.0.0``, ``::``: reachable from the internet)."""
    if listen_host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(listen_host.strip("[]"))
    except ValueError:
        return False  # a public name: the node serves the internet
    return not address.is_unspecified and not address.is_global
