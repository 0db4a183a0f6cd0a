"""``ledger.transfer``: a plain ETH transfer through the account's nonce manager with the ledger's error mapping.
A transfer whose receipt does not come in time is ``TransactionOutcomeUnknown`` (it may still be mined), never
web3's ``TimeExhausted``: before, a client wallet funding a fresh channel address leaked ``TimeExhausted``, which
no caller maps (the CLI printed a traceback) and which dropped the pending deposit row of a transfer that was sent.

Real anvil (the chain fixture); mining is switched off to hold a transaction in the pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_typing import HexStr

import node.client._wallet
from ledger import InsufficientFunds, TransactionOutcomeUnknown, dev_account, transfer
from node.client._wallet import Wallet
from tests.fixtures.chain import ChainEnv, rpc
from tests.fixtures.payments import payments

SENDER, RECEIVER, NODE = 12, 13, 3


@pytest.fixture
def no_automine(chain: ChainEnv) -> Iterator[ChainEnv]:
    """The chain with automine off (on again, and the pool mined, after the test)."""
    rpc(chain.w3, "evm_setAutomine", [False])
    try:
        yield chain
    finally:
        rpc(chain.w3, "evm_setAutomine", [True])
        rpc(chain.w3, "evm_mine", [])


def test_a_transfer_moves_exactly_its_value_and_pays_its_gas(chain: ChainEnv) -> None:
    w3, to = chain.w3, dev_account(RECEIVER).address
    before = w3.eth.get_balance(to)
    receipt = transfer(w3, dev_account(SENDER), to, 12_345, gas_price=2 * int(w3.eth.gas_price))
    assert receipt["status"] == 1 and receipt["gasUsed"] == 21_000
    assert w3.eth.get_balance(to) - before == 12_345


def test_a_transfer_beyond_the_balance_is_insufficient_funds(chain: ChainEnv) -> None:
    w3 = chain.w3
    poor = dev_account(SENDER).address
    with pytest.raises(InsufficientFunds):
        transfer(w3, dev_account(SENDER), dev_account(RECEIVER).address, int(w3.eth.get_balance(poor)) + 1)


def test_a_transfer_without_a_receipt_in_time_is_outcome_unknown_and_its_nonce_stays_spent(
    no_automine: ChainEnv,
) -> None:
    w3, sender, to = no_automine.w3, dev_account(SENDER), dev_account(RECEIVER).address
    with pytest.raises(TransactionOutcomeUnknown) as caught:
        transfer(w3, sender, to, 1, receipt_timeout=0.3)
    held = w3.eth.get_transaction(HexStr(caught.value.tx_hash))
    assert held["blockNumber"] is None  # sent, in the pool: it may still be mined
    rpc(w3, "evm_setAutomine", [True])
    rpc(w3, "evm_mine", [])
    second = transfer(w3, sender, to, 2)  # the next nonce: the held one was not handed out again
    assert w3.eth.get_transaction(second["transactionHash"])["nonce"] == held["nonce"] + 1


def test_a_fresh_address_funding_without_a_receipt_is_outcome_unknown_and_keeps_the_pending_deposit(
    no_automine: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.client._wallet, "FUND_RECEIPT_TIMEOUT_S", 0.3)
    wallet = Wallet(
        payments(no_automine),
        dev_account(SENDER),
        budget_wei=10**16,
        deposit_wei=10**15,
        state_dir=tmp_path,
        fresh_addresses=True,
    )
    try:
        with pytest.raises(TransactionOutcomeUnknown):
            wallet.deposit(dev_account(NODE).address, 10**15)
        assert len(wallet.store.pending()) == 1  # the transfer was sent: reconcile() decides, not a dropped row
    finally:
        wallet.close()
