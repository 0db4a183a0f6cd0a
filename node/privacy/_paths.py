"""Choosing ``n`` relay paths of ``L`` hops: distinct operators within a path, no relay reused across paths where the
pool allows, weighted by reputation and liveness, with a CSPRNG."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.privacy._constants import MAX_HOPS, MAX_N, NODE_ID_LEN
from node.privacy._errors import InsufficientRelays, InvalidPrivacyParam
from node.privacy._onion import Hop

#: ``host[:port]``: a DNS name or IPv4 address, or an IPv6 address in brackets; nothing else.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")


def check_endpoint(endpoint: str, *, max_bytes: int) -> None:
    """Refuse a registered endpoint that is not a bare ``http://host[:port]`` (a trailing ``/`` allowed).

    Why: nodes and clients append their own path (``/overlay/v1/onion``, the heartbeat's) to it. A path,
    ``;params``, a query, a ``#fragment`` (which swallows the appended path), userinfo, spaces or control characters
    would let whoever registered the endpoint choose what a relay or client requests, and where on that host.
    """
    authority = endpoint.removeprefix("http://").removesuffix("/")
    match = _AUTHORITY.fullmatch(authority) if endpoint.startswith("http://") else None
    if (
        match is None
        or not endpoint.isascii()
        or len(endpoint.encode()) > max_bytes
        or (match.group(1) is not None and not 0 < int(match.group(1)) < 65536)
    ):
        raise InvalidPrivacyParam("endpoint", endpoint[:80], f"http://host:port, at most {max_bytes} ASCII bytes")


@dataclass(frozen=True, slots=True)
class RelayDescriptor:
    """A relay as the client knows it from the registry (membership) and heartbeats (liveness)."""

    node_id: str
    """Registry id of the node: ``0x`` + 40 hex digits, its operator's address (checksummed or not). Paths are
    compared by it; :meth:`hop` turns it into the 20 bytes an onion slot carries."""
    operator: str
    """Operator address that staked the node; paths never repeat an operator."""
    endpoint: str
    """ASCII ``http://host:port``, at most 64 bytes."""
    public_key: bytes = field(repr=False)
    """Raw 32-byte X25519 public key from the registry."""
    reputation: float = 1.0
    """On-chain reputation normalised to 0..1."""
    liveness: float = 1.0
    """Heartbeat-derived probability that the relay is up, 0..1."""

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise InvalidPrivacyParam("public_key", len(self.public_key), "32 bytes")
        if not (0.0 <= self.reputation <= 1.0):
            raise InvalidPrivacyParam("reputation", self.reputation, "0..1")
        if not (0.0 <= self.liveness <= 1.0):
            raise InvalidPrivacyParam("liveness", self.liveness, "0..1")
        check_endpoint(self.endpoint, max_bytes=64)

    @property
    def weight(self) -> float:
        """Selection weight: reputation times liveness."""
        return self.reputation * self.liveness

    def hop(self) -> Hop:
        """This relay as an onion hop (raises ``InvalidPrivacyParam`` when ``node_id`` is not a 20-byte hex id)."""
        return Hop(node_id=node_id_bytes(self.node_id), public_key=self.public_key)


def node_id_bytes(node_id: str) -> bytes:
    """The 20 bytes of a ``0x``-hex registry id (an Ethereum address, any case)."""
    digits = node_id.removeprefix("0x")
    try:
        raw = bytes.fromhex(digits)
    except ValueError as exc:
        raise InvalidPrivacyParam("node_id", node_id[:44], "0x + 40 hex digits") from exc
    if len(raw) != NODE_ID_LEN or len(digits) != 2 * NODE_ID_LEN:
        raise InvalidPrivacyParam("node_id", node_id[:44], "0x + 40 hex digits")
    return raw


def _weighted_pick(rng: secrets.SystemRandom, pool: Sequence[RelayDescriptor]) -> RelayDescriptor:
    total = sum(r.weight for r in pool)
    point = rng.random() * total
    acc = 0.0
    for relay in pool:
        acc += relay.weight
        if point < acc:
            return relay
    return pool[-1]


def select_paths(
    relays: Iterable[RelayDescriptor],
    n: int,
    length: int,
    *,
    exclude_operators: Iterable[str] = (),
    exclude_nodes: Iterable[str] = (),
) -> list[list[RelayDescriptor]]:
    """Pick ``n`` paths of ``length`` relays.

    Within a path every relay has a distinct operator. Across paths a relay is reused only when the pool has too few
    unused relays with distinct operators (then the relay least used so far is preferred). Relays of
    ``exclude_operators`` (the destination's operator, the client's own), the relays in ``exclude_nodes`` (by
    ``node_id``: e.g. suspected dead) and relays of weight 0 are never chosen.
    """
    if not (1 <= n <= MAX_N):
        raise InvalidPrivacyParam("n", n, f"1..{MAX_N}")
    if not (1 <= length <= MAX_HOPS - 1):
        raise InvalidPrivacyParam("length", length, f"1..{MAX_HOPS - 1}")
    excluded = set(exclude_operators)
    excluded_nodes = set(exclude_nodes)
    eligible = [r for r in relays if r.weight > 0 and r.operator not in excluded and r.node_id not in excluded_nodes]
    operators = {r.operator for r in eligible}
    if len(operators) < length:
        raise InsufficientRelays(needed=length, available=len(operators))
    rng = secrets.SystemRandom()
    used: dict[str, int] = {}
    paths: list[list[RelayDescriptor]] = []
    for _ in range(n):
        path: list[RelayDescriptor] = []
        path_ops: set[str] = set()
        for _ in range(length):
            candidates = [r for r in eligible if r.operator not in path_ops]
            least = min(used.get(r.node_id, 0) for r in candidates)
            fresh = [r for r in candidates if used.get(r.node_id, 0) == least]
            choice = _weighted_pick(rng, fresh)
            path.append(choice)
            path_ops.add(choice.operator)
            used[choice.node_id] = used.get(choice.node_id, 0) + 1
        paths.append(path)
    return paths
