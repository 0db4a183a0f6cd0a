"""Transactions that never mislead: concurrent sends from one key all mine, a missing receipt is "outcome unknown"
(with the hash, never a revert), and a command of two transactions reports both, even when the second fails."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_typing import HexStr

from ledger import (
    InsufficientFunds,
    InvalidChainInput,
    NodeRegistry,
    Role,
    TransactionFailed,
    TransactionOutcomeUnknown,
    TxReceipt,
    model_id,
)
from tests.fixtures.chain import OUTSIDER, OWNER, TEST_PARAMS, ChainEnv, rpc

ETH = 10**18
KEY = b"\x01" * 32


def _register(reg: NodeRegistry, stake: int = ETH) -> None:
    reg.register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9001",
        x25519_public_key=KEY,
        model_id=model_id("tiny-llama@v1"),
        price_per_1k_tokens=1,
        stake=stake,
    )


@pytest.fixture
def paused_mining(chain: ChainEnv) -> Iterator[ChainEnv]:
    """anvil with automine off for the test (``evm_revert`` does not restore it, so it is switched back here)."""
    rpc(chain.w3, "evm_setAutomine", [False])
    try:
        yield chain
    finally:
        rpc(chain.w3, "evm_setAutomine", [True])


async def test_eight_concurrent_sends_from_one_key_all_mine(chain: ChainEnv) -> None:
    reg = chain.registry(10)
    _register(reg)
    before = chain.w3.eth.get_transaction_count(reg.account)
    receipts: list[TxReceipt] = await asyncio.wait_for(
        asyncio.gather(*(asyncio.to_thread(reg.with_account(chain.account(10)).add_stake, ETH) for _ in range(8))),
        timeout=60,
    )
    assert all(r.events == ("StakeAdded",) for r in receipts)
    assert len({r.tx_hash for r in receipts}) == 8
    nonces = sorted(chain.w3.eth.get_transaction(HexStr(r.tx_hash))["nonce"] for r in receipts)
    assert nonces == list(range(before, before + 8))
    assert reg.stake_of(reg.account) == 9 * ETH


def test_a_missing_receipt_is_outcome_unknown_not_a_revert(paused_mining: ChainEnv) -> None:
    chain = paused_mining
    admin = NodeRegistry(chain.w3, chain.deployment.registry_address, chain.account(OWNER), receipt_timeout=0.3)
    first, second = chain.account(15).address, chain.account(OUTSIDER).address
    with pytest.raises(TransactionOutcomeUnknown) as exc:
        admin.grant_slasher(first)
    assert not isinstance(exc.value, TransactionFailed)
    assert exc.value.code == "tx_unknown" and exc.value.timeout_s == 0.3
    assert exc.value.tx_hash.startswith("0x") and len(exc.value.tx_hash) == 66
    assert str(exc.value).startswith(f"sent, outcome unknown, transaction {exc.value.tx_hash}")
    # the key's next transaction does not reuse the pending nonce (it would replace the first one)
    with pytest.raises(TransactionOutcomeUnknown) as again:
        admin.with_account(chain.account(OWNER)).grant_slasher(second)
    hashes = [HexStr(exc.value.tx_hash), HexStr(again.value.tx_hash)]
    nonces = [chain.w3.eth.get_transaction(h)["nonce"] for h in hashes]
    assert nonces[1] == nonces[0] + 1
    assert not admin.is_slasher(first)  # nothing mined yet
    rpc(chain.w3, "evm_mine", [])
    assert [chain.w3.eth.get_transaction_receipt(h)["status"] for h in hashes] == [1, 1]  # both were fine
    assert admin.is_slasher(first) and admin.is_slasher(second)


def test_a_timed_out_transaction_the_node_dropped_does_not_stall_the_key(paused_mining: ChainEnv) -> None:
    """Its nonce is forgotten once the node no longer knows it, so the next send is not stuck behind a gap."""
    chain = paused_mining
    admin = NodeRegistry(chain.w3, chain.deployment.registry_address, chain.account(OWNER), receipt_timeout=0.3)
    with pytest.raises(TransactionOutcomeUnknown) as exc:
        admin.grant_slasher(chain.account(15).address)
    nonce = chain.w3.eth.get_transaction(HexStr(exc.value.tx_hash))["nonce"]
    rpc(chain.w3, "anvil_dropTransaction", [exc.value.tx_hash])
    rpc(chain.w3, "evm_setAutomine", [True])
    receipt = admin.grant_slasher(chain.account(OUTSIDER).address)  # would wait 0.3 s and fail with a gap
    assert chain.w3.eth.get_transaction(HexStr(receipt.tx_hash))["nonce"] == nonce
    assert admin.is_slasher(chain.account(OUTSIDER).address) and not admin.is_slasher(chain.account(15).address)


def test_receipt_timeout_must_be_positive(chain: ChainEnv) -> None:
    with pytest.raises(InvalidChainInput) as exc:
        NodeRegistry(chain.w3, chain.deployment.registry_address, receipt_timeout=0)
    assert exc.value.param == "receipt_timeout"


def test_deregister_and_withdraw_reports_both_transactions(chain: ChainEnv) -> None:
    reg = chain.registry(13)
    _register(reg, 3 * ETH // 2)
    reg.request_unbond()
    chain.advance(TEST_PARAMS.unbonding_delay)
    result = reg.deregister_and_withdraw()
    assert result.deregister is not None and result.amount == 3 * ETH // 2
    assert [r.events for r in result.receipts] == [("NodeDeregistered",), ("Withdrawn",)]
    assert result.receipts[0].block_number < result.receipts[1].block_number


class _DrainedBeforeWithdraw(NodeRegistry):
    """The operator's account is emptied right before ``withdraw`` (a real failure, from anvil, of step two)."""

    def withdraw(self) -> TxReceipt:
        rpc(self.w3, "anvil_setBalance", [self.account, "0x0"])
        return super().withdraw()


def test_a_failing_second_transaction_still_reports_the_first(chain: ChainEnv) -> None:
    reg = chain.registry(14)
    _register(reg)
    reg.request_unbond()
    chain.advance(TEST_PARAMS.unbonding_delay)
    drained = _DrainedBeforeWithdraw(chain.w3, reg.address, chain.account(14))
    with pytest.raises(InsufficientFunds) as exc:
        drained.deregister_and_withdraw()
    assert [r.events for r in exc.value.completed] == [("NodeDeregistered",)]
    assert reg.get_node(reg.account) is None and reg.pending_withdrawal(reg.account) == ETH


def test_an_anvil_with_a_block_time_mines_without_transactions() -> None:
    """``ps-chain up --block-time``: verifier epochs are anchored to the first block at or after their start, which
    a chain mining only on transactions may never produce."""
    import time

    from ledger import Anvil, AnvilConfig

    with Anvil(AnvilConfig(block_time_s=1)) as anvil:
        w3 = anvil.web3()
        first = w3.eth.block_number
        deadline = time.monotonic() + 10
        while w3.eth.block_number < first + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert w3.eth.block_number >= first + 2


def test_stop_returns_after_anvil_itself_exited_with_its_state_written(tmp_path: Path) -> None:
    """``stop()`` waits for anvil itself, not a wrapper: the state file is complete and no anvil is left running.

    The npm wrapper (``node_modules/.bin/anvil``) forwarded SIGTERM and exited at once, so a restart on the same
    state file raced anvil's own dump (a CI run found no file)."""
    from ledger import Anvil, AnvilConfig
    from ledger._anvil import anvil_binary

    assert ".bin" not in anvil_binary().parts  # the native binary, whose exit is anvil's own
    state = tmp_path / "anvil.json"
    anvil = Anvil(AnvilConfig(state_file=state)).start()
    pid = anvil.pid
    assert pid is not None
    rpc(anvil.web3(), "evm_mine", [])
    anvil.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (reaped by stop), not dumping in the background
    dumped = json.loads(state.read_text())
    assert int(dumped["block"]["number"], 16) == 1
    with Anvil(AnvilConfig(state_file=state)) as again:
        assert again.web3().eth.block_number >= 1
