"""``ps-node register|update|stake add|unbond|rebond|unjail|deregister|withdraw|status|list``: the node's on-chain life.

Secrets: the operator key comes from ``PS_PRIVATE_KEY`` or an encrypted ``--keystore`` (password from
``PS_KEYSTORE_PASSWORD`` or a prompt), never from a flag, and is never printed.

web3 and eth-account take about two seconds to import, so they are imported inside the commands that talk to the
chain: ``--help``, ``ps-node serve`` and ``ps-node model`` start without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from platformdirs import user_data_dir

from cli._main import new_app
from cli._output import emit, info
from node import NodeIdentity

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from eth_typing import ChecksumAddress

    from ledger import Deployment, IndexedNode, NodeInfo, NodeRegistry, PaymentChannels, TxReceipt

app = new_app("Register, stake, unbond and withdraw on chain.")
stake_app = new_app("Manage the node's stake.")
app.add_typer(stake_app, name="stake")

RpcUrl = Annotated[str, typer.Option("--rpc-url", envvar="PS_RPC_URL", help="JSON-RPC URL of the chain.")]
DeploymentOpt = Annotated[
    Path | None,
    typer.Option("--deployment", envvar="PS_DEPLOYMENT", help="Deployment file (default deployments/<chainId>.json)."),
]
Keystore = Annotated[
    Path | None,
    typer.Option("--keystore", envvar="PS_KEYSTORE", help="eth-account keystore JSON (else PS_PRIVATE_KEY)."),
]
StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="PS_STATE_DIR", help="Node state directory (keys, index database)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", envvar="PS_JSON", help="Print JSON on stdout (errors: one JSON line on stderr).")
]
IndexDb = Annotated[
    str | None, typer.Option("--db", envvar="PS_INDEX_DB", help="SQLAlchemy URL (default: SQLite in state dir).")
]
#: ``--db`` where the state dir is a verifier's (same option, the help names what is indexed).
RegistryIndexDb = Annotated[
    str | None, typer.Option("--db", envvar="PS_INDEX_DB", help="SQLAlchemy URL of the registry index.")
]


def status_epochs(help: str) -> Any:
    """The ``--epochs`` option of the status commands (``PS_STATUS_EPOCHS``, 1..1000), with its command's help."""
    return typer.Option("--epochs", envvar="PS_STATUS_EPOCHS", min=1, max=1000, help=help)


DEFAULT_RPC_URL = "http://127.0.0.1:8545"


def state_dir_or_default(value: Path | None) -> Path:
    """The node state directory: ``--state-dir``/``PS_STATE_DIR``, else under the user data dir."""
    return value if value is not None else Path(user_data_dir("planetserve")) / "node"


def default_index_db(folder: Path, chain_id: int) -> str:
    """The SQLite URL of the registry index kept in ``folder`` (created 0700), one file per chain id."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"sqlite:///{folder / f'index-{chain_id}.sqlite'}"


def load_operator(keystore: Path | None) -> LocalAccount:
    """The operator account from ``--keystore`` or ``PS_PRIVATE_KEY``; the key never reaches output."""
    from eth_account import Account

    from ledger import OperatorKeyError

    if keystore is not None:
        try:
            encrypted = json.loads(keystore.read_text())
        except (OSError, ValueError) as exc:
            raise OperatorKeyError(f"cannot read keystore {keystore} ({type(exc).__name__})") from exc
        password = os.environ.get("PS_KEYSTORE_PASSWORD")
        if password is None:
            password = typer.prompt("Keystore password", hide_input=True)
        try:
            account: LocalAccount = Account.from_key(Account.decrypt(encrypted, password))
        except (ValueError, TypeError, KeyError) as exc:
            raise OperatorKeyError(f"cannot decrypt keystore {keystore}: wrong password or corrupt file") from exc
        return account
    secret = os.environ.get("PS_PRIVATE_KEY")
    if not secret:
        raise OperatorKeyError("no operator key: set PS_PRIVATE_KEY or pass --keystore PATH")
    try:
        env_account: LocalAccount = Account.from_key(secret.strip())
    except (ValueError, TypeError) as exc:
        raise OperatorKeyError("PS_PRIVATE_KEY is not a valid 32-byte hex private key") from exc
    return env_account


def open_chain(rpc_url: str, deployment: Path | None, account: LocalAccount | None) -> tuple[Deployment, NodeRegistry]:
    from ledger import connect, default_deployment_path, open_registry

    if deployment is None:
        deployment = default_deployment_path(connect(rpc_url).eth.chain_id)
    return open_registry(rpc_url, deployment, account)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeChain:
    """The chain as one ``ps-node`` command sees it: the deployment, the registry handle and the operator."""

    #: The deployment read from ``--deployment`` (or ``deployments/<chainId>.json``).
    deployment: Deployment
    #: The registry handle, signed by :attr:`account` when there is one.
    registry: NodeRegistry
    #: The node's operator address (the key's account, or ``--operator`` for a read-only command).
    operator: ChecksumAddress
    #: The operator's key when the command signs; None for a read-only command.
    account: LocalAccount | None

    def payments(self) -> PaymentChannels:
        """The deployment's ``PaymentChannels``, signed by :attr:`account` when there is one."""
        from ledger import PaymentChannels

        return PaymentChannels(self.registry.w3, self.deployment.payments_address, self.account)


def open_node_chain(
    rpc_url: str, deployment: Path | None, keystore: Path | None, *, sign: bool = True, operator: str | None = None
) -> NodeChain:
    """The one way ``ps-node`` commands open the chain for an operator.

    ``sign``: the operator key (``--keystore`` or ``PS_PRIVATE_KEY``) signs the handles. Otherwise they are
    read-only, for ``operator`` when given (``--operator``), else for the key's account (the key is then read only
    for its address).
    """
    from ledger import checksum

    account = load_operator(keystore) if sign else None
    if account is not None:
        address = account.address
    else:
        address = checksum(operator, param="operator") if operator is not None else load_operator(keystore).address
    dep, registry = open_chain(rpc_url, deployment, account)
    return NodeChain(deployment=dep, registry=registry, operator=address, account=account)


def chain_now(registry: NodeRegistry) -> int:
    """The chain's clock (latest block timestamp): what unbonding ends are measured against (``ps-chain advance``
    moves it, the wall clock does not)."""
    return int(registry.w3.eth.get_block("latest")["timestamp"])


def _unbonding(ends_at: int, now: int) -> str:
    from cli._durations import describe_time

    if ends_at == 0:
        return "not unbonding"
    return (
        f"unbonding ends {describe_time(ends_at, now)}"
        if ends_at > now
        else f"unbonding ended {describe_time(ends_at, now)}"
    )


#: Most bytes read from a node's ``/overlay/info`` answer (it is a few hundred).
_MAX_INFO_BYTES = 16 * 1024


def check_endpoint(endpoint: str, public_key: bytes, role: str, timeout_s: float = 5.0) -> None:
    """Check that ``endpoint`` runs a PlanetServe node of ``role`` that accepts onion packets for ``public_key``.

    Registering an endpoint that answers with another key (a wrong ``--state-dir``) or not at all would be accepted
    on chain and fail later, as relays a client cannot reach. Redirects are not followed: the endpoint itself must
    be the node.
    """
    import asyncio

    import aiohttp

    from cli._errors import EndpointKeyMismatch, EndpointUnreachable
    from ledger import InvalidChainInput

    if not endpoint.startswith(("http://", "https://")):
        raise InvalidChainInput("endpoint", endpoint, "an http:// or https:// URL")
    url = endpoint.rstrip("/") + "/overlay/info"

    async def fetch() -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            return response.status, await response.content.read(_MAX_INFO_BYTES)

    try:
        status, body = asyncio.run(fetch())
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise EndpointUnreachable(endpoint=endpoint, detail=type(exc).__name__) from exc
    if status != 200:
        raise EndpointUnreachable(endpoint=endpoint, detail=f"HTTP {status} from /overlay/info")
    try:
        data = json.loads(body)
        served = tuple(str(k).lower() for k in data["x25519_public_keys"])
        served_role = str(data["role"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointUnreachable(endpoint=endpoint, detail="its /overlay/info is not a PlanetServe node's") from exc
    if served_role != role:
        raise InvalidChainInput("role", role, f"{endpoint} runs a {served_role} node")
    wanted = "0x" + public_key.hex()
    if wanted not in served:
        raise EndpointKeyMismatch(endpoint=endpoint, registering=wanted, served=served)


CheckEndpoint = Annotated[
    bool,
    typer.Option(
        "--check-endpoint/--no-check-endpoint",
        envvar="PS_CHECK_ENDPOINT",
        help="Check first that the endpoint answers and serves this node's onion key.",
    ),
]


def _receipt_json(receipt: TxReceipt) -> dict[str, Any]:
    return {
        "tx_hash": receipt.tx_hash,
        "block": receipt.block_number,
        "gas_used": receipt.gas_used,
        "events": list(receipt.events),
    }


def _node_json(node: NodeInfo | IndexedNode) -> dict[str, Any]:
    from ledger import format_eth

    return {
        "operator": node.operator,
        "role": node.role.name.lower(),
        "endpoint": node.endpoint,
        "x25519_public_key": "0x" + node.x25519_public_key.hex(),
        "model_id": node.model_id,
        "price_per_1k_tokens_wei": str(node.price_per_1k_tokens),
        "stake_wei": str(node.stake),
        "stake_eth": format_eth(node.stake),
        "active": node.active,
        "jailed": getattr(node, "jailed", False),
        "unbonding_ends_at": node.unbonding_ends_at,
    }


@app.command()
def register(
    role: Annotated[str, typer.Option("--role", envvar="PS_ROLE", help="model, relay or verifier.")],
    endpoint: Annotated[str, typer.Option("--endpoint", envvar="PS_ENDPOINT", help="The node's public URL.")],
    stake: Annotated[str, typer.Option("--stake", envvar="PS_STAKE", help="Stake in ETH, e.g. 1.5.")],
    model: Annotated[
        str | None, typer.Option("--model", envvar="PS_MODEL", help="NAME@REV served or verified (not for relays).")
    ] = None,
    price: Annotated[int, typer.Option("--price", envvar="PS_PRICE", min=0, help="Price in wei per 1000 tokens.")] = 0,
    check: CheckEndpoint = True,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Register this node on chain with a stake; its X25519 key is created in the state directory on first use.

    First (unless ``--no-check-endpoint``) the endpoint must answer and serve that key: start ``ps-node serve``
    with the same ``--state-dir`` before registering. Verifiers serve no overlay and are not checked.
    """
    from ledger import InvalidChainInput, Role, format_eth, model_id, parse_eth

    parsed_role = Role.parse(role)
    if parsed_role is Role.RELAY and model is not None:
        raise InvalidChainInput("model", model, "relays serve no model; omit --model")
    if parsed_role is not Role.RELAY and model is None:
        raise InvalidChainInput("model", None, f"a {parsed_role.name.lower()} node needs --model NAME@REV")
    mid = None if model is None else model_id(model)
    wei = parse_eth(stake, param="stake")
    chain = open_node_chain(rpc_url, deployment, keystore)
    registry = chain.registry
    minimum = registry.minimum_stake(parsed_role)
    if wei < minimum:
        raise InvalidChainInput(
            "stake", stake, f"below the {parsed_role.name.lower()} minimum of {format_eth(minimum)} ETH"
        )
    identity = NodeIdentity.load_or_create(state_dir_or_default(state_dir))
    if check and parsed_role is not Role.VERIFIER:
        check_endpoint(endpoint, identity.public_key, parsed_role.name.lower())
    info(f"registering {chain.operator} as {parsed_role.name.lower()} with {format_eth(wei)} ETH")
    receipt = registry.register(
        role=parsed_role,
        endpoint=endpoint,
        x25519_public_key=identity.public_key,
        model_id=mid,
        price_per_1k_tokens=price,
        stake=wei,
    )
    node = registry.get_node(chain.operator)
    assert node is not None, "a successful register leaves a node"
    emit({**_node_json(node), **_receipt_json(receipt)}, as_json=as_json, title="registered")


@stake_app.command("add")
def stake_add(
    amount: Annotated[str, typer.Argument(help="ETH to add, e.g. 0.5.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """Add stake to this node."""
    from ledger import InvalidChainInput, parse_eth

    wei = parse_eth(amount)
    if wei == 0:
        raise InvalidChainInput("amount", amount, "must be more than 0 ETH")
    registry = open_node_chain(rpc_url, deployment, keystore).registry
    receipt = registry.add_stake(wei)
    emit(
        {"stake_wei": str(registry.stake_of(registry.account)), **_receipt_json(receipt)},
        as_json=as_json,
        title="stake added",
    )


@app.command()
def unbond(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop being routed to and start the unbonding delay."""
    registry = open_node_chain(rpc_url, deployment, keystore).registry
    receipt = registry.request_unbond()
    node = registry.get_node(registry.account)
    ends = 0 if node is None else node.unbonding_ends_at
    result = {"unbonding_ends_at": ends, "unbonding": _unbonding(ends, chain_now(registry)), **_receipt_json(receipt)}
    emit(result, as_json=as_json, title="unbonding")


@app.command()
def withdraw(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """After the unbonding delay: deregister the node (if still registered) and withdraw its stake."""
    from ledger import format_eth

    registry = open_node_chain(rpc_url, deployment, keystore).registry
    # Two transactions when still registered: if the second fails, the error reports the first as mined.
    done = registry.deregister_and_withdraw()
    emit(
        {
            "withdrawn_wei": str(done.amount),
            "withdrawn_eth": format_eth(done.amount),
            "transactions": [_receipt_json(r) for r in done.receipts],
        },
        as_json=as_json,
        title="withdrawn",
    )


@app.command()
def update(
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", envvar="PS_ENDPOINT", help="New public URL (default: unchanged).")
    ] = None,
    price: Annotated[
        int | None,
        typer.Option(
            "--price", envvar="PS_PRICE", min=0, help="New price in wei per 1000 tokens (default: unchanged)."
        ),
    ] = None,
    check: CheckEndpoint = True,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """Change this node's endpoint or price on chain (its onion key is kept; `ps-node keys rotate` changes that)."""
    from ledger import InvalidChainInput

    if endpoint is None and price is None:
        raise InvalidChainInput("update", None, "nothing to change: pass --endpoint and/or --price")
    registry = open_node_chain(rpc_url, deployment, keystore).registry
    node = registry.get_node(registry.account)
    if node is None:
        raise InvalidChainInput("operator", registry.account, "not registered; run `ps-node register` first")
    new_endpoint = node.endpoint if endpoint is None else endpoint
    if check and endpoint is not None and node.role.name.lower() != "verifier":
        check_endpoint(new_endpoint, node.x25519_public_key, node.role.name.lower())
    receipt = registry.update(
        endpoint=new_endpoint,
        x25519_public_key=node.x25519_public_key,
        price_per_1k_tokens=node.price_per_1k_tokens if price is None else price,
    )
    updated = registry.get_node(registry.account)
    assert updated is not None, "an update leaves the node registered"
    emit({**_node_json(updated), **_receipt_json(receipt)}, as_json=as_json, title="updated")


@app.command()
def deregister(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """After the unbonding delay: leave the registry; the stake becomes withdrawable (`ps-node withdraw`)."""
    from ledger import format_eth

    registry = open_node_chain(rpc_url, deployment, keystore).registry
    receipt = registry.deregister()
    pending = registry.pending_withdrawal(registry.account)
    emit(
        {
            "pending_withdrawal_wei": str(pending),
            "pending_withdrawal_eth": format_eth(pending),
            **_receipt_json(receipt),
        },
        as_json=as_json,
        title="deregistered",
    )


@app.command()
def rebond(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel unbonding: the node is routable again with its whole stake."""
    registry = open_node_chain(rpc_url, deployment, keystore).registry
    receipt = registry.rebond()
    node = registry.get_node(registry.account)
    assert node is not None, "a rebond leaves the node registered"
    emit({**_node_json(node), **_receipt_json(receipt)}, as_json=as_json, title="rebonded")


@app.command()
def unjail(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    as_json: JsonOpt = False,
) -> None:
    """After a slash: become routable again, once the stake is back at the role's minimum (`ps-node stake add`)."""
    registry = open_node_chain(rpc_url, deployment, keystore).registry
    receipt = registry.unjail()
    node = registry.get_node(registry.account)
    assert node is not None, "an unjail leaves the node registered"
    emit({**_node_json(node), **_receipt_json(receipt)}, as_json=as_json, title="unjailed")


@app.command("list")
def list_nodes(
    include_deregistered: Annotated[
        bool, typer.Option("--all", envvar="PS_LIST_ALL", help="Include deregistered nodes.")
    ] = False,
    names: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            envvar="PS_LIST_MODELS",
            help="NAME@REVISION to show by name (repeat): the chain stores only keccak(name@revision).",
        ),
    ] = None,
    db: IndexDb = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """The registry as the event indexer sees it (syncs the index first), model ids shown by the names given."""
    from ledger import Indexer, Role, format_eth
    from planetserve import ModelId

    # A malformed name is the kernel's InvalidValue: one line, exit 3, before any chain work.
    known = {ModelId.of(name): name for name in names or ()}

    def model_name(node: IndexedNode) -> str | None:
        return known.get(node.model_id) if node.role is not Role.RELAY else None

    dep, registry = open_chain(rpc_url, deployment, None)
    if db is None:
        db = default_index_db(state_dir_or_default(state_dir), dep.chain_id)
    with Indexer(registry, dep, db) as indexer:
        report = indexer.sync()
        info(f"indexed blocks {report.from_block}..{report.to_block}: {report.applied} new events")
        nodes = indexer.nodes(include_deregistered=include_deregistered)
    if as_json:
        emit([_node_json(n) | {"status": n.status, "model": model_name(n)} for n in nodes], as_json=True)
        return
    rows = [
        {
            "operator": n.operator,
            "role": n.role.name.lower(),
            "model": "-" if n.role is Role.RELAY else model_name(n) or f"{n.model_id[:10]}…",
            "status": n.status,
            "active": n.active,
            "stake ETH": format_eth(n.stake),
            "price/1k wei": n.price_per_1k_tokens,
            "endpoint": n.endpoint,
        }
        for n in nodes
    ]
    emit(rows, as_json=False, title=f"{len(rows)} node(s)")
