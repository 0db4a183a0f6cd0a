"""``ps-node serve``'s paid re-forwarding (``cli/_node_reforward.py``): the wallet the CLI builds from the node's
own key pays a charging peer, and the books of all three parties agree.

In-process, with the CLI's builder called directly (a separate-process network would load two more model processes
for what the builder already decides): the node's wallet comes from ``PS_PRIVATE_KEY`` (node A's operator key, a dev
key), its book in ``<state-dir>/reforward-wallet`` under the budget; real anvil, real torch engines, six real
relays on 127.0.0.1 (the live network of ``tests/_reforward_net.py``, shared with
``tests/test_overlay_reforward.py``). The client pays A at A's price, A
pays B from the CLI-built wallet on A's own channel exactly what B charged, and a wallet reopened from the state
directory continues that channel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli._node_reforward import WALLET_FOLDER, node_reforward, reforward_wallet
from cli.exit_codes import ExitCode
from ledger import dev_account
from planetserve import InvalidValue
from tests._paid_net import voucher_store
from tests._procs import run_cli
from tests._reforward_net import (
    NODE_A,
    NODE_B,
    PRICE,
    assert_a_paid_b,
    assert_client_paid_a,
    paid_reforward,
    reforward_net,
)
from tests.fixtures.chain import ChainEnv


def test_the_node_builds_a_wallet_only_with_its_key_and_a_budget(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rpc, deployment = chain.rpc_url, chain.deployment_path
    monkeypatch.delenv("PS_PRIVATE_KEY", raising=False)
    assert node_reforward(0, rpc, deployment, tmp_path, None) is None  # no operator address: no re-forwarding
    assert reforward_wallet(rpc, deployment, tmp_path, budget_eth="0.01", deposit_eth="0.002") is None
    monkeypatch.setenv("PS_PRIVATE_KEY", dev_account(NODE_A).key.hex())
    free = node_reforward(3, rpc, deployment, tmp_path, None, budget_eth="0", deposit_eth="0.002")
    assert free is not None and free.wallet is None and free.describe() == "over 3 waiting, to free peers"
    assert not (tmp_path / WALLET_FOLDER).exists()
    paid = node_reforward(
        3, rpc, deployment, tmp_path, None, budget_eth="0.01", deposit_eth="0.5", max_peer_price=PRICE
    )
    assert paid is not None and paid.wallet is not None
    try:
        assert paid.reforwarder.config.operator == dev_account(NODE_A).address  # never re-forwards to itself
        assert paid.reforwarder.config.max_peer_price_per_1k_tokens == PRICE
        assert paid.wallet.address == dev_account(NODE_A).address
        assert (paid.wallet.budget_wei, paid.wallet.deposit_wei) == (10**16, 10**16)  # the deposit capped at it
        assert paid.wallet.store.path.parent == tmp_path / WALLET_FOLDER
        assert "charging peers (budget 0.01 ETH)" in paid.describe()
    finally:
        paid.wallet.close()
    for budget, deposit in (("-1", "0.002"), ("0.01", "lots"), ("0.01", "0")):
        with pytest.raises(InvalidValue):
            reforward_wallet(rpc, deployment, tmp_path, budget_eth=budget, deposit_eth=deposit)


def test_a_malformed_budget_fails_in_one_line_before_the_model_loads(tmp_path: Path) -> None:
    args = ["serve", "--role", "model", "--model-dir", str(tmp_path / "no-model"), "--port", "0"]
    args += ["--reforward-bound", "1", "--reforward-budget", "lots", "--state-dir", str(tmp_path)]
    done = run_cli("node", args)
    assert done.returncode == ExitCode.INVALID_INPUT, done.stderr
    assert "reforward_budget" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_the_cli_built_wallet_pays_a_charging_peer_and_the_books_agree(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PS_PRIVATE_KEY", dev_account(NODE_A).key.hex())
    state = tmp_path / "node-a"
    budget = dict(budget_eth="0.001", deposit_eth="0.0001")
    a_wallet = reforward_wallet(chain.rpc_url, chain.deployment_path, state, **budget)
    assert a_wallet is not None
    try:
        async with reforward_net(tiny_model_dir) as net:
            run = await paid_reforward(net, chain, tmp_path, a_wallet)
            # The client paid A at A's price; A's book of what clients owe it says the same.
            assert_client_paid_a(run)
    finally:
        a_wallet.close()
    # A paid B from its operator's wallet, on its own channel within the budget; B's book agrees, and B never saw
    # the client's channel. Read from the wallet and the book restarted nodes find in their state.
    again = reforward_wallet(chain.rpc_url, chain.deployment_path, state, **budget)
    assert again is not None
    try:
        with voucher_store(chain, tmp_path / "b.sqlite", NODE_B) as b_book:
            assert_a_paid_b(run, again, b_book)
        a_channel = again.channel(run.b.account.address)
        assert a_channel is not None and a_channel.deposit <= 10**15
        assert again.signer_address(a_channel) == dev_account(NODE_A).address
    finally:
        again.close()
