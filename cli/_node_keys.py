"""``ps-node keys rotate|show``: the node's onion keys, which rotate (``node/_identity.py``).

The operator's Ethereum key is the long-term identity: it signs the registry ``update`` that publishes a new onion
key, which is the "operator signs the new key". The onion key is medium-term: ``rotate`` makes a new one (pending),
waits until a running ``ps-node serve`` with the same ``--state-dir`` has loaded it (it reloads its keyring every
2 s), publishes it on chain, and keeps the old key for the grace period, after which node and CLI shred it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from cli._main import new_app
from cli._node_chain import (
    DEFAULT_RPC_URL,
    DeploymentOpt,
    JsonOpt,
    Keystore,
    RpcUrl,
    StateDir,
    _receipt_json,
    load_operator,
    open_chain,
    state_dir_or_default,
)
from cli._output import emit, info
from node import IdentityError, OnionKeyStore
from node._identity import DEFAULT_GRACE_S, MIN_GRACE_S

app = new_app("Rotate and show the node's onion keys.")

Grace = Annotated[
    float,
    typer.Option(
        "--grace",
        envvar="PS_KEY_GRACE",
        min=MIN_GRACE_S,
        help=f"Seconds the old key keeps working after a rotation (at least {MIN_GRACE_S}).",
    ),
]


def _key_json(store: OnionKeyStore) -> dict[str, Any]:
    previous = store.previous()
    pending = store.pending()
    return {
        "current_public_key": "0x" + store.current().public_key.hex(),
        "pending_public_key": None if pending is None else "0x" + pending.public_key.hex(),
        "previous_public_key": None if previous is None else "0x" + previous[0].public_key.hex(),
        "previous_delete_after": None if previous is None else previous[1],
    }


@app.command()
def rotate(
    grace: Grace = DEFAULT_GRACE_S,
    publish_after: Annotated[
        float,
        typer.Option(
            "--publish-after",
            envvar="PS_KEY_PUBLISH_AFTER",
            min=0,
            help="Seconds between making the key and publishing it (a running node loads it meanwhile).",
        ),
    ] = 3.0,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    keystore: Keystore = None,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a new onion key, publish it with the registry's `update` (endpoint and price unchanged), keep the old
    one for the grace period. Rerun after an interrupted rotation: it resumes with the same new key."""
    from ledger import InvalidChainInput, TransactionOutcomeUnknown

    store = OnionKeyStore(state_dir_or_default(state_dir), grace_s=grace)
    _, registry = open_chain(rpc_url, deployment, load_operator(keystore))
    node = registry.get_node(registry.account)
    if node is None:
        raise InvalidChainInput("operator", registry.account, "not registered; run `ps-node register` first")
    current = store.current()
    pending = store.begin_rotation()
    receipt = None
    if node.x25519_public_key == pending.public_key:
        info("the new key is already on chain (an interrupted rotation): finishing it")
    elif node.x25519_public_key != current.public_key:
        store.abort_rotation()
        raise IdentityError(
            "the key on chain is not this state directory's onion key: wrong --state-dir or operator key?"
        )
    else:
        if publish_after:
            info(f"new onion key made; publishing it in {publish_after:g} s (a running node loads it meanwhile)")
            time.sleep(publish_after)
        try:
            receipt = registry.update(
                endpoint=node.endpoint,
                x25519_public_key=pending.public_key,
                price_per_1k_tokens=node.price_per_1k_tokens,
            )
        except TransactionOutcomeUnknown:
            raise  # the key may be on chain: keep it pending, a rerun finishes the rotation
        except Exception:  # refused or reverted: nothing was published
            store.abort_rotation()
            raise
    store.commit_rotation()
    result = _key_json(store)
    if receipt is not None:
        result.update(_receipt_json(receipt))
    emit(result, as_json=as_json, title="rotated")


@app.command()
def show(state_dir: StateDir = None, as_json: JsonOpt = False) -> None:
    """The node's onion public keys: current, pending (a rotation in progress) and previous (in its grace period)."""
    store = OnionKeyStore(state_dir_or_default(state_dir))
    store.prune()
    emit(_key_json(store), as_json=as_json, title="onion keys")
