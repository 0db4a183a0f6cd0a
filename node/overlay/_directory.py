"""The client's view of the network: relays and model nodes from the on-chain registry, and a route for a request.

Membership comes only from the registry (via the ledger's indexer); a node that is not routable there (unbonding,
slashed below the minimum, deregistered) never appears here. Entries whose endpoint or key cannot be used on the
overlay are skipped with a log line rather than failing the whole directory.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node.overlay._errors import OverlayError, ReplyIncomplete
from node.overlay._peers import Peer
from node.privacy import Hop, InsufficientRelays, InvalidPrivacyParam, RelayDescriptor, select_paths
from node.privacy._paths import node_id_bytes
from planetserve import ModelId

if TYPE_CHECKING:
    from ledger import IndexedNode

log = logging.getLogger(__name__)


class NoModelNode(OverlayError):
    """No routable model node serves the requested model."""

    code = "network_no_model_node"
    status = 503

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"no routable model node serves model {model_id[:18]}…")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelNode:
    """A registered model node as a client routes to it."""

    operator: str
    """Operator address (checksummed)."""
    endpoint: str
    """``http://host:port``."""
    public_key: bytes = field(repr=False)
    """Raw X25519 public key (the last onion hop)."""
    model_id: ModelId
    """The model it serves (the registry's id)."""
    price_per_1k_tokens: int
    """Wei per 1000 tokens."""

    def hop(self) -> Hop:
        """This node as the final onion hop (named by its registry id, the operator's address)."""
        return Hop(node_id=node_id_bytes(self.operator), public_key=self.public_key)

    def peer(self) -> Peer:
        """This node as a peer: its id, endpoint and onion key (what a client sends the last clove hop to)."""
        return Peer(node_id=node_id_bytes(self.operator), endpoint=self.endpoint, public_key=self.public_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where one request goes: the model node and one relay path per clove."""

    destination: ModelNode
    """The chosen model node."""
    paths: tuple[tuple[RelayDescriptor, ...], ...]
    """``n`` paths of relays (first hop first)."""


@dataclass(frozen=True, slots=True)
class Directory:
    """Routable relays and model nodes."""

    relays: tuple[RelayDescriptor, ...]
    model_nodes: tuple[ModelNode, ...]

    @classmethod
    def from_registry(cls, nodes: Iterable[IndexedNode]) -> Directory:
        """Keep the routable relays and model nodes of an indexed registry."""
        from ledger import Role  # web3 is heavy; only a client building its directory pays for it

        relays: list[RelayDescriptor] = []
        models: list[ModelNode] = []
        for node in nodes:
            if not node.active:
                continue
            try:
                if node.role is Role.RELAY:
                    relays.append(
                        RelayDescriptor(
                            node_id=node.operator,
                            operator=node.operator,
                            endpoint=node.endpoint,
                            public_key=node.x25519_public_key,
                        )
                    )
                elif node.role is Role.MODEL:
                    model = ModelNode(
                        operator=node.operator,
                        endpoint=node.endpoint,
                        public_key=node.x25519_public_key,
                        model_id=node.model_id,
                        price_per_1k_tokens=int(node.price_per_1k_tokens),
                    )
                    model.peer()  # validates the id, endpoint and key now, not at send time
                    models.append(model)
            except InvalidPrivacyParam as exc:
                log.info("skipping %s: unusable on the overlay (%s)", node.operator, exc.param)
        return cls(relays=tuple(relays), model_nodes=tuple(models))

    def serving(self, model_id: str) -> list[ModelNode]:
        """Model nodes serving ``model_id`` (0x-hex)."""
        return [m for m in self.model_nodes if m.model_id == model_id.lower()]

    def route(
        self,
        model_id: str,
        *,
        n: int,
        hops: int,
        avoid_relays: Iterable[str] = (),
        avoid_model_nodes: Iterable[str] = (),
        destination: ModelNode | None = None,
    ) -> Route:
        """A model node for ``model_id`` and ``n`` relay paths of ``hops`` relays to it.

        ``destination`` is the model node the client's forwarding policy chose (``node.client``). Without one, the
        model node is drawn uniformly among the cheapest tenth of the candidates (at least one): price is the only
        signal the registry gives on its own. Relay paths avoid the model node's own operator. ``avoid_relays``
        (``node_id``) and ``avoid_model_nodes`` (operators; ignored when no other node serves the model) are suspects
        from a failed try.
        """
        if destination is None:
            candidates = sorted(self.serving(model_id), key=lambda m: m.price_per_1k_tokens)
            if not candidates:
                raise NoModelNode(model_id)
            avoided = set(avoid_model_nodes)
            candidates = [m for m in candidates if m.operator not in avoided] or candidates
            cheapest = candidates[: max(1, len(candidates) // 10)]
            destination = cheapest[secrets.randbelow(len(cheapest))]
        paths = select_paths(
            self.relays, n, hops, exclude_operators=(destination.operator,), exclude_nodes=avoid_relays
        )
        return Route(destination=destination, paths=tuple(tuple(p) for p in paths))


def reroute(
    directory: Directory,
    model_id: str,
    *,
    n: int,
    hops: int,
    route: Route,
    failure: ReplyIncomplete,
    destination: ModelNode | None = None,
) -> Route:
    """A new route for a try that failed with ``failure`` before any path answered (else ``failure`` is raised).

    Paths avoid every relay that can explain the failure, or if that leaves too few, those common to all failures;
    last, those common suspects minus the relays of paths that had not failed when the client stopped waiting (weak
    evidence that they work, but with few relays the common suspects can be a dead relay and the one behind it).
    Without a ``destination`` chosen by the caller, another model node than the failed one is preferred: a dead
    model node fails every path alike.
    """
    common = common_suspects(route, failure)
    pending = set(range(failure.paths)) - set(failure.failed_early) - set(failure.started)
    working = {r.node_id for i in pending if i < len(route.paths) for r in route.paths[i]}
    candidates = [suspect_relays(route, failure), common]
    if common - working and common - working != common:
        candidates.append(common - working)
    for suspects in candidates:
        try:
            return directory.route(
                model_id,
                n=n,
                hops=hops,
                avoid_relays=suspects,
                avoid_model_nodes=(route.destination.operator,),
                destination=destination,
            )
        except InsufficientRelays:
            continue
    raise failure


def _cleared(route: Route, failure: ReplyIncomplete) -> set[str]:
    """Relays proven up: every relay of a path whose reply started, and each first hop that blamed a hop behind it."""
    cleared = {r.node_id for i in failure.started for r in route.paths[i]}
    forwarding = [i for i in failure.failed_early if i not in failure.first_hop_failed and route.paths[i]]
    cleared |= {route.paths[i][0].node_id for i in forwarding}
    return cleared


def _suspects_per_path(route: Route, failure: ReplyIncomplete) -> list[set[str]]:
    """For each early-failed path, the relays that may explain it: only the first hop when the failure was its own
    (the packet got no further), else every relay not proven up (the destination itself may also be the culprit)."""
    cleared = _cleared(route, failure)
    out = []
    for i in failure.failed_early:
        path = route.paths[i]
        if not path:
            continue
        nodes = {path[0].node_id} if i in failure.first_hop_failed else {r.node_id for r in path}
        out.append(nodes - cleared)
    return out


def suspect_relays(route: Route, failure: ReplyIncomplete) -> set[str]:
    """Relays (``node_id``) to avoid when retrying a request that failed with ``failure`` on ``route``: every relay
    that may explain some early-failed path. When avoiding them leaves too few relays, try :func:`common_suspects`."""
    return set().union(*_suspects_per_path(route, failure))


def common_suspects(route: Route, failure: ReplyIncomplete) -> set[str]:
    """The narrower guess: the relays that could explain *every* early-failed path (one dead relay explains all)."""
    per_path = [s for s in _suspects_per_path(route, failure) if s]
    return set.intersection(*per_path) if per_path else set()
