"""``ps-node serve --reforward-bound``: the model node's re-forwarding (protocol §10.5), free and paid peers.

Why the node has a wallet of its own for this: a peer that charges wants a voucher from whoever sends it the request,
and the re-forwarding node is that sender (the client's voucher is for the node's own channel, never the peer's).
The node pays from its operator key (``PS_PRIVATE_KEY``; its identity is public on chain anyway, so a fresh address
would hide nothing), with its own durable book in ``<state-dir>/reforward-wallet``: a restart continues the same
channels, and the book is apart from the node's voucher book of what clients owe it. What it may hold in channels
to peers at once is ``--reforward-budget`` (0: free peers only, as before the wallet existed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli._output import info

if TYPE_CHECKING:
    from node.client._wallet import Wallet
    from node.overlay._reforward import Reforwarder
    from node.overlay._serve import RegistryDirectorySource

#: Default of ``--reforward-budget``: small, the node's own money held in channels to peers at once.
DEFAULT_BUDGET_ETH = "0.01"
#: Default of ``--reforward-deposit``: what each new channel to a peer starts with (capped at the budget).
DEFAULT_DEPOSIT_ETH = "0.002"
#: The folder of the node's re-forwarding wallet inside its state directory.
WALLET_FOLDER = "reforward-wallet"

BudgetOpt = Annotated[
    str,
    typer.Option(
        "--reforward-budget",
        envvar="PS_REFORWARD_BUDGET",
        help="Model nodes with --reforward-bound: most ETH the node holds in channels to charging peers it "
        "re-forwards to (paid from PS_PRIVATE_KEY; 0: free peers only).",
    ),
]
DepositOpt = Annotated[
    str,
    typer.Option(
        "--reforward-deposit",
        envvar="PS_REFORWARD_DEPOSIT",
        help="ETH a new channel to a charging peer is opened with (at most the budget).",
    ),
]
MaxPriceOpt = Annotated[
    int | None,
    typer.Option(
        "--reforward-max-price",
        envvar="PS_REFORWARD_MAX_PRICE",
        min=0,
        help="Highest price of a charging peer the node re-forwards to, wei per 1000 tokens (default: any within the "
        "budget; set it to your own price not to pay a peer more than the client pays you).",
    ),
]


@dataclass(frozen=True, slots=True)
class NodeReforward:
    """What ``ps-node serve`` wires: the re-forwarder, and the wallet paying its charging peers (None: free only)."""

    reforwarder: Reforwarder
    wallet: Wallet | None
    source: RegistryDirectorySource | None = None
    """The registry index the re-forwarder reads its peers from (closed with the rest)."""

    def describe(self) -> str:
        """The ready line's words (no amounts a peer chose)."""
        bound = self.reforwarder.config.queue_bound
        if self.wallet is None:
            return f"over {bound} waiting, to free peers"
        from planetserve import format_eth

        return f"over {bound} waiting, to free and charging peers (budget {format_eth(self.wallet.budget_wei)} ETH)"

    async def close(self) -> None:
        """Close the re-forwarder's connections, the wallet's book and locks, and the registry index, each whatever
        the others raise (idempotent). ``ps-node serve`` runs it on every path out, also when the node never
        served (a model that failed to load, a port taken)."""
        from node.overlay._lifecycle import stop_all

        async def wallet() -> None:
            if self.wallet is not None:
                self.wallet.close()

        async def source() -> None:
            if self.source is not None:
                self.source.close()

        await stop_all([self.reforwarder.close, wallet, source])

    def cleanup_ctx(self) -> Any:
        """An aiohttp cleanup context closing all of it (:meth:`close`) when the node stops."""

        async def ctx(_app: Any) -> Any:
            yield
            await self.close()

        return ctx


def parse_amounts(budget_eth: str, deposit_eth: str) -> tuple[int, int]:
    """(budget, deposit) in wei; ``ps-node serve`` checks them before loading a model. Raises ``InvalidValue``
    (exit 3) for a malformed amount, or a 0 deposit under a budget."""
    from planetserve import InvalidValue, parse_eth

    budget = parse_eth(budget_eth, param="reforward_budget")
    deposit = parse_eth(deposit_eth, param="reforward_deposit")
    if budget > 0 and deposit == 0:
        raise InvalidValue("reforward_deposit", deposit_eth, "must be more than 0 while the budget is not 0")
    return budget, deposit


def reforward_wallet(
    rpc_url: str, deployment: Path | None, state: Path, *, budget_eth: str, deposit_eth: str
) -> Wallet | None:
    """The node's own wallet for charging peers, from ``PS_PRIVATE_KEY``, its book in ``<state>/reforward-wallet``;
    None when the budget is 0 or there is no key. Raises ``InvalidValue`` (exit 3) for a malformed amount."""
    budget, deposit = parse_amounts(budget_eth, deposit_eth)
    if budget == 0 or not os.environ.get("PS_PRIVATE_KEY"):
        return None
    from cli._client_wallet import make_wallet
    from cli._node_chain import load_operator

    folder = state / WALLET_FOLDER
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return make_wallet(
        rpc_url,
        deployment,
        load_operator(None),
        state_dir=folder,
        budget_wei=budget,
        deposit_wei=min(deposit, budget),
    )


def node_reforward(
    bound: int | None,
    rpc_url: str,
    deployment: Path | None,
    state: Path,
    engine: Any,
    *,
    budget_eth: str = DEFAULT_BUDGET_ETH,
    deposit_eth: str = DEFAULT_DEPOSIT_ETH,
    max_peer_price: int | None = None,
    dial_private_addresses: bool = True,
) -> NodeReforward | None:
    """The model node's re-forwarding when ``--reforward-bound`` is set and the operator key is in the environment
    (the node must know its own registry entry, never to pick itself); charging peers are paid from the node's own
    wallet (:func:`reforward_wallet`) within the budget and at most ``max_peer_price`` (wei per 1000 tokens; None:
    any), free peers always qualify."""
    if bound is None:
        return None
    if not os.environ.get("PS_PRIVATE_KEY"):
        info("no PS_PRIVATE_KEY: this model node does not re-forward (it needs its operator address)")
        return None
    from cli._node_chain import load_operator
    from node.overlay._reforward import ReforwardConfig, Reforwarder
    from node.overlay._serve import registry_directory_source

    wallet = reforward_wallet(rpc_url, deployment, state, budget_eth=budget_eth, deposit_eth=deposit_eth)
    try:
        source = registry_directory_source(rpc_url, deployment, f"sqlite:///{state / 'reforward-index.sqlite'}")
        config = ReforwardConfig(
            operator=load_operator(None).address,
            queue_bound=bound,
            max_peer_price_per_1k_tokens=max_peer_price,
            dial_private_addresses=dial_private_addresses,
        )
        tokenize = getattr(engine, "tokenize", None)
        reforwarder = Reforwarder(config, source, payer=wallet, tokenize=tokenize if callable(tokenize) else None)
    except BaseException:  # nothing else holds the wallet yet: release its book and locks here
        if wallet is not None:
            wallet.close()
        raise
    return NodeReforward(reforwarder=reforwarder, wallet=wallet, source=source)
