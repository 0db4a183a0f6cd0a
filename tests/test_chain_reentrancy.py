"""Pull payments are reentrancy-safe: a malicious operator contract cannot withdraw twice, and a refusing
recipient gets a loud ``NodeRegistryTransferFailed`` with its balance kept."""

from __future__ import annotations

import pytest
from eth_utils.abi import function_signature_to_4byte_selector
from web3.contract import Contract

from ledger import load_artifact
from ledger._reverts import NodeRegistryTransferFailed, RevertDecoder
from ledger._tx import send_transaction
from tests.fixtures.chain import TEST_PARAMS, ChainEnv

STAKE = 10**17
CALLER = 12


def _deploy_attacker(chain: ChainEnv) -> tuple[Contract, RevertDecoder]:
    artifact = load_artifact("ReentrantOperator")
    decoder = RevertDecoder([load_artifact("NodeRegistry").abi])
    factory = chain.w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    receipt = send_transaction(
        chain.w3, chain.account(CALLER), factory.constructor(chain.deployment.registry_address), decoder
    )
    address = receipt["contractAddress"]
    assert address is not None
    return chain.w3.eth.contract(address=address, abi=list(artifact.abi)), decoder


def _unbond_and_release(chain: ChainEnv, attacker: Contract, decoder: RevertDecoder) -> None:
    account = chain.account(CALLER)
    send_transaction(chain.w3, account, attacker.functions.register(), decoder, value=STAKE)
    send_transaction(chain.w3, account, attacker.functions.requestUnbond(), decoder)
    chain.advance(TEST_PARAMS.unbonding_delay)
    send_transaction(chain.w3, account, attacker.functions.deregister(), decoder)


def test_reentrant_withdraw_is_blocked_and_pays_once(chain: ChainEnv) -> None:
    attacker, decoder = _deploy_attacker(chain)
    _unbond_and_release(chain, attacker, decoder)
    registry = chain.registry()
    assert registry.pending_withdrawal(attacker.address) == STAKE
    send_transaction(chain.w3, chain.account(CALLER), attacker.functions.withdraw(), decoder)
    assert attacker.functions.received().call() == STAKE
    assert chain.w3.eth.get_balance(attacker.address) == STAKE
    reason = bytes(attacker.functions.reentryError().call())
    # the nested call failed: the guard (transient storage) fires before the balance check
    assert reason[:4] == function_signature_to_4byte_selector("ReentrancyGuardReentrantCall()")
    assert registry.pending_withdrawal(attacker.address) == 0 and registry.balance() == 0


def test_refusing_recipient_keeps_its_balance_and_the_error_is_loud(chain: ChainEnv) -> None:
    attacker, decoder = _deploy_attacker(chain)
    _unbond_and_release(chain, attacker, decoder)
    send_transaction(chain.w3, chain.account(CALLER), attacker.functions.setRefuse(True), decoder)
    with pytest.raises(NodeRegistryTransferFailed) as exc:
        send_transaction(chain.w3, chain.account(CALLER), attacker.functions.withdraw(), decoder)
    assert (exc.value.to, exc.value.amount) == (attacker.address, STAKE)
    assert chain.registry().pending_withdrawal(attacker.address) == STAKE
