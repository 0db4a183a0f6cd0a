"""NodeRegistry against a real anvil: happy paths, every revert with its custom error's arguments, slashing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger import ContractRevert, NodeRegistry, Role, model_id
from ledger._reverts import (
    NodeRegistryAlreadyRegistered,
    NodeRegistryInvalidEndpoint,
    NodeRegistryInvalidModelId,
    NodeRegistryInvalidPublicKey,
    NodeRegistryInvalidSlasher,
    NodeRegistryNodeUnbonding,
    NodeRegistryNothingToWithdraw,
    NodeRegistryNotRegistered,
    NodeRegistryNotUnbonding,
    NodeRegistrySlasherAlreadySet,
    NodeRegistryStakeBelowMinimum,
    NodeRegistryUnauthorizedSlasher,
    NodeRegistryUnauthorizedTreasury,
    NodeRegistryUnbondingNotFinished,
    NodeRegistryZeroAmount,
    OwnableUnauthorizedAccount,
)
from tests.fixtures.chain import OUTSIDER, OWNER, SLASHER, TEST_PARAMS, ChainEnv

ETH = 10**18
KEY = bytes(range(1, 33))
MODEL = model_id("tiny-llama@v1")


def _register(
    reg: NodeRegistry, role: Role = Role.MODEL, stake: int = ETH, endpoint: str = "http://127.0.0.1:9001"
) -> None:
    reg.register(
        role=role,
        endpoint=endpoint,
        x25519_public_key=KEY,
        model_id=None if role is Role.RELAY else MODEL,
        price_per_1k_tokens=1_000,
        stake=stake,
    )


def _assert_solvent(chain: ChainEnv) -> None:
    reg = chain.registry()
    assert reg.balance() == reg.total_staked() + reg.total_pending_withdrawals() + reg.treasury_balance()


def test_deployment_exposes_parameters(chain: ChainEnv) -> None:
    reg = chain.registry()
    assert reg.minimum_stake(Role.MODEL) == TEST_PARAMS.minimum_stake_model
    assert reg.minimum_stake(Role.RELAY) == TEST_PARAMS.minimum_stake_relay
    assert reg.minimum_stake(Role.VERIFIER) == TEST_PARAMS.minimum_stake_verifier
    assert reg.unbonding_delay() == TEST_PARAMS.unbonding_delay
    assert reg.owner() == chain.account(OWNER).address
    assert reg.treasury() == chain.account(OWNER).address
    assert reg.slasher() is None


def test_register_records_node_and_activates_it(chain: ChainEnv) -> None:
    reg = chain.registry(1)
    receipt = reg.register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9001",
        x25519_public_key=KEY,
        model_id=MODEL,
        price_per_1k_tokens=1_234,
        stake=3 * ETH // 2,
    )
    assert receipt.events == ("NodeRegistered",)
    assert receipt.gas_used > 0
    node = reg.get_node(reg.account)
    assert node is not None
    assert (node.role, node.stake, node.endpoint) == (Role.MODEL, 3 * ETH // 2, "http://127.0.0.1:9001")
    assert (node.x25519_public_key, node.model_id, node.price_per_1k_tokens) == (KEY, MODEL, 1_234)
    assert node.active and not node.unbonding and node.registered_at > 0
    assert reg.is_active(reg.account)
    assert reg.balance() == 3 * ETH // 2
    assert chain.registry().get_node(chain.account(OUTSIDER).address) is None


@pytest.mark.parametrize("role", [Role.RELAY, Role.VERIFIER])
def test_register_other_roles_at_their_minimum(chain: ChainEnv, role: Role) -> None:
    reg = chain.registry(2)
    _register(reg, role, stake=reg.minimum_stake(role))
    node = reg.get_node(reg.account)
    assert node is not None and node.role is role and node.active
    assert node.model_id == (bytes(32) if role is Role.RELAY else MODEL)


def test_add_stake_update_unbond_deregister_withdraw_lifecycle(chain: ChainEnv) -> None:
    reg = chain.registry(3)
    _register(reg)
    assert reg.add_stake(ETH // 2).events == ("StakeAdded",)
    assert reg.stake_of(reg.account) == 3 * ETH // 2
    assert reg.update(
        endpoint="http://127.0.0.1:9999", x25519_public_key=bytes(31) + b"\x07", price_per_1k_tokens=7
    ).events == ("NodeUpdated",)
    node = reg.get_node(reg.account)
    assert node is not None and (node.endpoint, node.x25519_public_key[-1], node.price_per_1k_tokens) == (
        "http://127.0.0.1:9999",
        7,
        7,
    )
    assert reg.request_unbond().events == ("UnbondingRequested",)
    node = reg.get_node(reg.account)
    assert node is not None and node.unbonding and not node.active
    assert node.unbonding_ends_at == chain.now() + TEST_PARAMS.unbonding_delay
    chain.advance(TEST_PARAMS.unbonding_delay)
    assert reg.deregister().events == ("NodeDeregistered",)
    assert reg.get_node(reg.account) is None
    assert reg.pending_withdrawal(reg.account) == 3 * ETH // 2
    _assert_solvent(chain)
    before = chain.w3.eth.get_balance(reg.account)
    receipt = reg.withdraw()
    assert receipt.events == ("Withdrawn",)
    after = chain.w3.eth.get_balance(reg.account)
    assert after - before == 3 * ETH // 2 - receipt.gas_used * receipt.effective_gas_price
    assert reg.balance() == 0 and reg.pending_withdrawal(reg.account) == 0
    _register(reg)  # the operator may come back
    assert reg.is_active(reg.account)


def test_register_reverts_with_decoded_arguments(chain: ChainEnv) -> None:
    reg = chain.registry(4)
    with pytest.raises(NodeRegistryStakeBelowMinimum) as below:
        _register(reg, Role.VERIFIER, stake=ETH)
    assert (below.value.operator, below.value.role, below.value.stake, below.value.minimum) == (
        reg.account,
        Role.VERIFIER,
        ETH,
        2 * ETH,
    )
    assert "NodeRegistryStakeBelowMinimum(" in str(below.value) and "role=verifier" in str(below.value)
    with pytest.raises(NodeRegistryInvalidEndpoint) as empty:
        _register(reg, endpoint="")
    assert (empty.value.length, empty.value.maxLength) == (0, 256)
    with pytest.raises(NodeRegistryInvalidEndpoint) as long:
        _register(reg, endpoint="http://" + "a" * 250)
    assert (long.value.length, long.value.maxLength) == (257, 256)
    with pytest.raises(NodeRegistryInvalidPublicKey) as zero_key:
        reg.register(
            role=Role.MODEL, endpoint="e", x25519_public_key=bytes(32), model_id=MODEL, price_per_1k_tokens=0, stake=ETH
        )
    assert zero_key.value.x25519PublicKey == bytes(32)
    with pytest.raises(NodeRegistryInvalidModelId) as no_model:
        reg.register(
            role=Role.MODEL, endpoint="e", x25519_public_key=KEY, model_id=None, price_per_1k_tokens=0, stake=ETH
        )
    assert (no_model.value.role, no_model.value.modelId) == (Role.MODEL, bytes(32))
    with pytest.raises(NodeRegistryInvalidModelId) as relay_model:
        reg.register(
            role=Role.RELAY, endpoint="e", x25519_public_key=KEY, model_id=MODEL, price_per_1k_tokens=0, stake=ETH
        )
    assert (relay_model.value.role, relay_model.value.modelId) == (Role.RELAY, MODEL)
    _register(reg)
    with pytest.raises(NodeRegistryAlreadyRegistered) as twice:
        _register(reg)
    assert twice.value.operator == reg.account
    with pytest.raises(NodeRegistryInvalidEndpoint):
        reg.update(endpoint="", x25519_public_key=KEY, price_per_1k_tokens=0)
    with pytest.raises(NodeRegistryInvalidPublicKey):
        reg.update(endpoint="e", x25519_public_key=bytes(32), price_per_1k_tokens=0)
    with pytest.raises(NodeRegistryZeroAmount) as zero:
        reg.add_stake(0)
    assert zero.value.operator == reg.account
    _assert_solvent(chain)


def test_calls_without_a_node_revert_not_registered(chain: ChainEnv) -> None:
    reg = chain.registry(OUTSIDER)
    calls: list[Callable[[], object]] = [
        lambda: reg.add_stake(ETH),
        lambda: reg.update(endpoint="e", x25519_public_key=KEY, price_per_1k_tokens=0),
        reg.request_unbond,
        reg.deregister,
    ]
    for call in calls:
        with pytest.raises(NodeRegistryNotRegistered) as exc:
            call()
        assert exc.value.operator == reg.account
    with pytest.raises(NodeRegistryNothingToWithdraw) as nothing:
        reg.withdraw()
    assert nothing.value.account == reg.account


def test_unbonding_node_is_frozen_until_the_delay_passes(chain: ChainEnv) -> None:
    reg = chain.registry(5)
    _register(reg)
    with pytest.raises(NodeRegistryNotUnbonding) as not_unbonding:
        reg.deregister()
    assert not_unbonding.value.operator == reg.account
    reg.request_unbond()
    ends = reg.get_node(reg.account).unbonding_ends_at  # type: ignore[union-attr]
    calls: list[Callable[[], object]] = [
        lambda: reg.add_stake(ETH),
        lambda: reg.update(endpoint="e", x25519_public_key=KEY, price_per_1k_tokens=0),
        reg.request_unbond,
    ]
    for call in calls:
        with pytest.raises(NodeRegistryNodeUnbonding) as frozen:
            call()
        assert (frozen.value.operator, frozen.value.unbondingEndsAt) == (reg.account, ends)
    chain.advance(TEST_PARAMS.unbonding_delay - 10)
    with pytest.raises(NodeRegistryUnbondingNotFinished) as early:
        reg.deregister()
    assert early.value.operator == reg.account and early.value.unbondingEndsAt == ends
    assert early.value.currentTime < ends
    with pytest.raises(NodeRegistryNothingToWithdraw):
        reg.withdraw()
    chain.advance(10)
    reg.deregister()
    reg.withdraw()


def test_only_the_authorised_slasher_can_slash(chain: ChainEnv) -> None:
    victim = chain.registry(6)
    _register(victim, stake=2 * ETH)
    evidence = bytes([9]) * 32
    # before any slasher is set, nobody (not even the owner) can slash
    for index in (OWNER, SLASHER, 6):
        with pytest.raises(NodeRegistryUnauthorizedSlasher) as exc:
            chain.registry(index).slash(victim.account, ETH, evidence)
        assert exc.value.caller == chain.account(index).address
    with pytest.raises(OwnableUnauthorizedAccount) as not_owner:
        chain.registry(OUTSIDER).set_slasher(chain.account(OUTSIDER).address)
    assert not_owner.value.account == chain.account(OUTSIDER).address
    with pytest.raises(NodeRegistryInvalidSlasher):
        chain.registry(OWNER).set_slasher("0x" + "00" * 20)
    assert chain.registry(OWNER).set_slasher(chain.account(SLASHER).address).events == ("SlasherSet",)
    with pytest.raises(NodeRegistrySlasherAlreadySet) as again:
        chain.registry(OWNER).set_slasher(chain.account(OUTSIDER).address)
    assert again.value.slasher == chain.account(SLASHER).address
    for index in (OWNER, OUTSIDER, 6):
        with pytest.raises(NodeRegistryUnauthorizedSlasher):
            chain.registry(index).slash(victim.account, ETH, evidence)

    slasher = chain.registry(SLASHER)
    with pytest.raises(NodeRegistryZeroAmount):
        slasher.slash(victim.account, 0, evidence)
    with pytest.raises(NodeRegistryNotRegistered):
        slasher.slash(chain.account(OUTSIDER).address, ETH, evidence)
    assert slasher.slash(victim.account, 3 * ETH // 2, evidence).events == ("NodeSlashed",)
    assert victim.stake_of(victim.account) == ETH // 2
    assert not victim.is_active(victim.account)  # below the model minimum: no longer routed to
    assert victim.treasury_balance() == 3 * ETH // 2
    victim.add_stake(ETH // 2)
    assert victim.is_active(victim.account)
    victim.request_unbond()
    slasher.slash(victim.account, 10 * ETH, evidence)  # capped at the stake, also while unbonding
    assert victim.stake_of(victim.account) == 0 and victim.treasury_balance() == 5 * ETH // 2
    _assert_solvent(chain)


def test_treasury_withdraws_slashed_funds_by_pull(chain: ChainEnv) -> None:
    chain.registry(OWNER).set_slasher(chain.account(SLASHER).address)
    victim = chain.registry(7)
    _register(victim)
    with pytest.raises(NodeRegistryNothingToWithdraw):
        chain.registry(OWNER).withdraw_treasury()
    chain.registry(SLASHER).slash(victim.account, ETH // 4, bytes(32))
    with pytest.raises(NodeRegistryUnauthorizedTreasury) as exc:
        chain.registry(OUTSIDER).withdraw_treasury()
    assert exc.value.caller == chain.account(OUTSIDER).address
    assert chain.registry(OWNER).withdraw_treasury().events == ("TreasuryWithdrawn",)
    assert victim.treasury_balance() == 0 and victim.balance() == 3 * ETH // 4
    _assert_solvent(chain)


def test_every_revert_is_a_contract_revert_with_code_tx_reverted(chain: ChainEnv) -> None:
    with pytest.raises(ContractRevert) as exc:
        chain.registry(OUTSIDER).request_unbond()
    assert exc.value.code.startswith("tx_reverted")
    assert exc.value.error_name == "NodeRegistryNotRegistered"
