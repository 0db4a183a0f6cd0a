"""PaymentChannels' pull payment resists reentrancy and refusing recipients; the real registry's jail blocks redeem."""

from __future__ import annotations

import pytest
from eth_utils.abi import function_signature_to_4byte_selector
from web3.contract import Contract

from ledger import NodeRegistry, Role, dev_account, load_artifact, model_id
from ledger._reverts import PaymentChannelsNodeJailed, PaymentChannelsTransferFailed, RevertDecoder
from ledger._tx import send_transaction
from tests.fixtures.chain import OWNER, SLASHER, TEST_PARAMS, ChainEnv
from tests.fixtures.payments import payments, voucher

CALLER, NODE, CLIENT = 12, 3, 10
DEPOSIT = 10**15


def _payee(chain: ChainEnv) -> tuple[Contract, RevertDecoder]:
    """A client contract with an open channel to NODE that it has already started closing."""
    artifact = load_artifact("ReentrantPayee")
    decoder = RevertDecoder([load_artifact("PaymentChannels").abi])
    factory = chain.w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    receipt = send_transaction(
        chain.w3, dev_account(CALLER), factory.constructor(chain.deployment.payments_address), decoder
    )
    assert receipt["contractAddress"] is not None
    payee = chain.w3.eth.contract(address=receipt["contractAddress"], abi=list(artifact.abi))
    open_close = payee.functions.openAndClose(dev_account(NODE).address)
    send_transaction(chain.w3, dev_account(CALLER), open_close, decoder, value=DEPOSIT)
    return payee, decoder


def _settle_refund(chain: ChainEnv) -> None:
    pay = payments(chain, OWNER)
    chain.advance(pay.dispute_delay())
    pay.finish_close(pay.next_channel_id() - 1)


def test_a_reentrant_withdraw_is_blocked_and_pays_once(chain: ChainEnv) -> None:
    payee, decoder = _payee(chain)
    _settle_refund(chain)
    pay = payments(chain)
    assert pay.balances(payee.address).withdrawable == DEPOSIT
    send_transaction(chain.w3, dev_account(CALLER), payee.functions.withdraw(), decoder)
    assert payee.functions.received().call() == DEPOSIT == chain.w3.eth.get_balance(payee.address)
    reason = bytes(payee.functions.reentryError().call())
    assert reason[:4] == function_signature_to_4byte_selector("ReentrancyGuardReentrantCall()")
    assert pay.balances(payee.address).withdrawable == 0


def test_a_refusing_recipient_keeps_its_balance_and_the_error_is_loud(chain: ChainEnv) -> None:
    payee, decoder = _payee(chain)
    _settle_refund(chain)
    send_transaction(chain.w3, dev_account(CALLER), payee.functions.setRefuse(True), decoder)
    with pytest.raises(PaymentChannelsTransferFailed) as exc:
        send_transaction(chain.w3, dev_account(CALLER), payee.functions.withdraw(), decoder)
    assert (exc.value.to, exc.value.amount) == (payee.address, DEPOSIT)
    assert payments(chain).balances(payee.address).withdrawable == DEPOSIT


def test_a_node_jailed_by_the_registry_cannot_redeem_until_it_unjails(chain: ChainEnv) -> None:
    registry = NodeRegistry(chain.w3, chain.deployment.registry_address, dev_account(NODE))
    minimum = TEST_PARAMS.minimum_stake_model
    registry.register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9003",
        x25519_public_key=b"\x05" * 32,
        model_id=model_id("tiny-llama@v1"),
        price_per_1k_tokens=1_000,
        stake=minimum,
    )
    registry.with_account(dev_account(OWNER)).grant_slasher(dev_account(SLASHER).address)
    pay = payments(chain)
    channel = payments(chain, CLIENT).open_channel(dev_account(NODE).address, 1_000).channel_id
    signed = voucher(pay, CLIENT, channel, 600)
    registry.with_account(dev_account(SLASHER)).slash(dev_account(NODE).address, 1, b"\x09" * 32)
    assert registry.is_jailed(dev_account(NODE).address)
    with pytest.raises(PaymentChannelsNodeJailed):
        payments(chain, NODE).redeem(signed)
    registry.add_stake(1)
    registry.unjail()
    payments(chain, NODE).redeem(signed)
    assert pay.channel(channel).redeemed == 600  # type: ignore[union-attr]
