"""A lost client state directory is rebuilt from the chain (``Wallet.recover``, ``ps-client recover``), against a real
anvil: channels of the main address and of fresh addresses (re-derived from the key alone) are found by their
events, recorded as recovered (never paid on again), closed, and reclaimed after the dispute delay, balances exact to
the wei; a fresh address beyond the gap limit is not found; a book written before the ``recovered`` column existed
still opens.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cli.exit_codes import ExitCode
from ledger import Voucher, checksum, dev_account
from node.client._wallet import Wallet
from node.client._wallet_store import WalletStore
from node.overlay import CompletionRequest, ModelNode
from tests.fixtures.chain import ChainEnv
from tests.fixtures.payments import payments
from tests.test_chain_cli import InProcess, _env, _ok_json
from tests.test_client_wallet import DEPOSIT, _unreached_node, _wallet
from tests.test_payments_overlay import CLIENT, NODE, OTHER_NODE


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


async def _pay(wallet: Wallet, node: ModelNode, request: CompletionRequest, used: int) -> Voucher:
    """One paid request: the voucher the node got (and keeps, to redeem it later)."""
    paid, payment = await wallet.pay(node, request, None)
    assert payment is not None and paid.voucher is not None
    wallet.admitted(payment)
    wallet.finish(payment, used)
    return Voucher.from_json(paid.voucher.to_json())


def _fees_by_sender(chain: ChainEnv, tx_hashes: list[str]) -> dict[str, int]:
    fees: dict[str, int] = {}
    for tx_hash in tx_hashes:
        sender = str(chain.w3.eth.get_transaction(tx_hash)["from"])  # type: ignore[arg-type]
        receipt = chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        fees[sender] = fees.get(sender, 0) + int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    return fees


async def test_a_lost_state_dir_is_recovered_closed_and_reclaimed_exact_to_the_wei(
    chain: ChainEnv, tmp_path: Path
) -> None:
    node, request = _unreached_node()
    other = ModelNode(
        operator=dev_account(OTHER_NODE).address,
        endpoint=node.endpoint,
        public_key=node.public_key,
        model_id=node.model_id,
        price_per_1k_tokens=node.price_per_1k_tokens,
    )
    lost = tmp_path / "lost"
    wallet = _wallet(chain, lost)
    main_vouchers = [await _pay(wallet, node, request, used) for used in (3, 5, 2)]
    fresh = wallet.deposit(other.operator, DEPOSIT, fresh=True)
    fresh_voucher = await _pay(wallet, other, request, 4)
    fresh_address = wallet.signer_address(fresh)
    main_channel = main_vouchers[0].channel_id
    assert fresh_voucher.channel_id == fresh.channel_id != main_channel
    payments(chain, NODE).redeem(main_vouchers[1])  # the node redeemed once; it still holds the third voucher
    wallet.close()
    shutil.rmtree(lost)  # the disk is gone

    again = _wallet(chain, tmp_path / "new")
    assert again.channels() == []
    done = again.recover(from_block=chain.deployment.deploy_block, gap_limit=3)
    assert sorted(c.channel_id for c in done.found) == [main_channel, fresh.channel_id]
    assert done.known == 0 and all(c.recovered for c in done.found)
    by_id = {c.channel_id: c for c, _receipt in done.closing}
    assert {i: c.state for i, c in by_id.items()} == {main_channel: "closing", fresh.channel_id: "closing"}
    assert by_id[main_channel].redeemed == main_vouchers[1].cumulative_amount
    assert by_id[main_channel].last == DEPOSIT  # unknown what was signed: nothing is signed below the deposit
    assert again.signer_address(by_id[fresh.channel_id]) == fresh_address
    assert again.channel(node.operator) is None  # never paid on again: a next request opens a new channel
    with pytest.raises(ValueError, match="recovered"):  # and the book refuses to sign on it
        again.store.sign_amount(main_channel, 1)
    assert again.recover(from_block=chain.deployment.deploy_block).known == 2  # idempotent

    # During the dispute delay each node redeems the latest voucher it holds.
    payments(chain, NODE).redeem(main_vouchers[2])
    payments(chain, OTHER_NODE).redeem(fresh_voucher)
    chain.advance(payments(chain).dispute_delay() + 1)
    contract = chain.deployment.payments_address

    def balance(address: str) -> int:
        return int(chain.w3.eth.get_balance(checksum(address)))

    before = {a: balance(a) for a in (again.address, fresh_address, contract)}
    reclaimed = again.reclaim(chain.now())
    assert sorted(reclaimed.settled) == [main_channel, fresh.channel_id]
    main_rest = DEPOSIT - main_vouchers[2].cumulative_amount
    fresh_rest = DEPOSIT - fresh_voucher.cumulative_amount
    assert reclaimed.withdrawn_wei == main_rest + fresh_rest
    fees = _fees_by_sender(chain, [r.tx_hash for r in reclaimed.receipts])
    assert balance(again.address) == before[again.address] + main_rest - fees[again.address]
    assert balance(fresh_address) == before[fresh_address] + fresh_rest - fees[fresh_address]
    assert balance(contract) == before[contract] - main_rest - fresh_rest
    assert again.channels() == [] and {c.state for c in again.channels(include_closed=True)} == {"settled"}
    again.close()


def test_a_fresh_address_beyond_the_gap_limit_is_not_found(chain: ChainEnv, tmp_path: Path) -> None:
    node = dev_account(NODE).address
    wallet = _wallet(chain, tmp_path / "lost")
    first = wallet.deposit(node, DEPOSIT, fresh=True)  # fresh index 0
    failed = wallet.store.reserve_deposit(node, 1, from_block=0, budget=None, key_index="1")  # an open that failed
    assert failed is not None
    third = wallet.deposit(node, DEPOSIT, fresh=True)  # fresh index 2: index 1 never got a channel
    wallet.store.drop_pending(failed)
    assert (first.key_index, third.key_index) == ("0", "2")
    wallet.close()
    deploy_block = chain.deployment.deploy_block
    # Gap limit 1: index 0 found, index 1 empty, and the walk stops before index 2.
    near = Wallet(payments(chain), dev_account(CLIENT), budget_wei=1, deposit_wei=1, state_dir=tmp_path / "a")
    found = near.recover(from_block=deploy_block, gap_limit=1, close=False)
    assert [c.channel_id for c in found.found] == [first.channel_id] and found.fresh_indices == 2
    near.close()
    wide = Wallet(payments(chain), dev_account(CLIENT), budget_wei=1, deposit_wei=1, state_dir=tmp_path / "b")
    found = wide.recover(from_block=deploy_block, gap_limit=2, close=False)
    assert sorted(c.channel_id for c in found.found) == [first.channel_id, third.channel_id]
    assert {c.state for c in found.found} == {"open"} and found.closing == ()  # --no-close: found, not closed
    wide.close()
    # Another key's fresh addresses are not this client's.
    stranger = Wallet(payments(chain), dev_account(17), budget_wei=1, deposit_wei=1, state_dir=tmp_path / "c")
    assert stranger.recover(from_block=deploy_block, gap_limit=5, close=False).found == ()
    stranger.close()


def test_ps_client_recover_rebuilds_the_book_and_starts_closing(
    chain: ChainEnv, tmp_path: Path, in_process: InProcess
) -> None:
    node = dev_account(NODE).address
    wallet = _wallet(chain, tmp_path / "lost")
    opened = wallet.deposit(node, DEPOSIT)
    wallet.close()
    shutil.rmtree(tmp_path / "lost")
    env = _env(chain, tmp_path, key_index=CLIENT, PS_STATE_DIR=str(tmp_path / "client"))
    result = _ok_json(in_process("client", ["recover", "--json"], env))
    (row,) = result["recovered"]
    assert (row["channel_id"], row["state"], row["recovered"], row["deposit_wei"]) == (
        opened.channel_id,
        "closing",
        True,
        str(DEPOSIT),
    )
    assert row["close_tx_hash"].startswith("0x") and result["closing_started"] == 1
    (listed,) = _ok_json(in_process("client", ["channels", "--json"], env))["channels"]
    assert (listed["channel_id"], listed["state"], listed["recovered"]) == (opened.channel_id, "closing", True)
    again = _ok_json(in_process("client", ["recover", "--json"], env))
    assert again["recovered"] == [] and again["already_in_book"] == 1
    usage: subprocess.CompletedProcess[str] = in_process("client", ["recover", "--gap-limit", "0"], env)
    assert usage.returncode == ExitCode.USAGE and len(usage.stderr.strip().splitlines()) == 1


def test_a_book_written_before_recovery_existed_still_opens(chain: ChainEnv, tmp_path: Path) -> None:
    path = tmp_path / "wallet.sqlite"
    contract, client = chain.deployment.payments_address, dev_account(CLIENT).address
    old = WalletStore(path, genesis="0x" + "11" * 32, contract=contract, client=client)
    old.record_channel(channel_id=1, node=dev_account(NODE).address, deposit=5)
    old.close()
    with sqlite3.connect(path) as db:  # the schema as the previous version wrote it
        db.execute("ALTER TABLE wallet_channels DROP COLUMN recovered")
    reopened = WalletStore(path, genesis="0x" + "11" * 32, contract=contract, client=client)
    (state,) = reopened.channels()
    assert (state.channel_id, state.deposit, state.recovered) == (1, 5, False)
    assert reopened.sign_amount(1, 2) == 2
    reopened.close()
