"""NodeRegistry against a real anvil: happy paths, every revert with its custom error's arguments, slashing,
jailing, rebonding, roles and constructor bounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ledger import ContractRevert, InvalidChainInput, NodeRegistry, RegistryParams, Role, deploy_all, model_id
from ledger._artifacts import load_artifact
from ledger._deploy import MAX_UNBONDING_DELAY
from ledger._reverts import (
    AccessControlEnforcedDefaultAdminDelay,
    AccessControlInvalidDefaultAdmin,
    AccessControlUnauthorizedAccount,
    NodeRegistryAlreadyRegistered,
    NodeRegistryInvalidEndpoint,
    NodeRegistryInvalidMinimumStake,
    NodeRegistryInvalidModelId,
    NodeRegistryInvalidPublicKey,
    NodeRegistryInvalidTreasury,
    NodeRegistryInvalidVerificationWindow,
    NodeRegistryNodeUnbonding,
    NodeRegistryNothingToWithdraw,
    NodeRegistryNotJailed,
    NodeRegistryNotRegistered,
    NodeRegistryNotUnbonding,
    NodeRegistryStakeBelowMinimum,
    NodeRegistryUnauthorizedTreasury,
    NodeRegistryUnbondingDelayTooLong,
    NodeRegistryUnbondingDelayTooShort,
    NodeRegistryUnbondingNotFinished,
    NodeRegistryZeroAmount,
    RevertDecoder,
)
from ledger._tx import send_transaction
from planetserve import ModelId
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
    assert reg.verification_window() == TEST_PARAMS.verification_window
    assert reg.admin_transfer_delay() == TEST_PARAMS.admin_transfer_delay
    assert reg.owner() == reg.admin() == chain.account(OWNER).address
    assert reg.has_role(NodeRegistry.DEFAULT_ADMIN_ROLE, chain.account(OWNER).address)
    assert reg.treasury() == chain.account(OWNER).address
    assert reg.pending_admin() == (None, 0)
    assert not any(reg.is_slasher(chain.account(i).address) for i in (OWNER, SLASHER, OUTSIDER))


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
    assert node.active and not node.unbonding and not node.jailed and node.registered_at > 0
    assert reg.is_active(reg.account)
    assert reg.balance() == 3 * ETH // 2
    assert chain.registry().get_node(chain.account(OUTSIDER).address) is None


@pytest.mark.parametrize("role", [Role.RELAY, Role.VERIFIER])
def test_register_other_roles_at_their_minimum(chain: ChainEnv, role: Role) -> None:
    reg = chain.registry(2)
    _register(reg, role, stake=reg.minimum_stake(role))
    node = reg.get_node(reg.account)
    assert node is not None and node.role is role and node.active
    assert node.model_id == (ModelId.ZERO if role is Role.RELAY else MODEL)


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
    assert (relay_model.value.role, relay_model.value.modelId) == (Role.RELAY, MODEL.to_bytes())
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


def test_only_slasher_role_holders_can_slash(chain: ChainEnv) -> None:
    victim = chain.registry(6)
    _register(victim, stake=2 * ETH)
    evidence = bytes([9]) * 32
    # before any grant, nobody (not even the admin) can slash
    for index in (OWNER, SLASHER, 6):
        with pytest.raises(AccessControlUnauthorizedAccount) as exc:
            chain.registry(index).slash(victim.account, ETH, evidence)
        assert (exc.value.account, exc.value.neededRole) == (chain.account(index).address, NodeRegistry.SLASHER_ROLE)
    # only the admin grants: the role's admin is DEFAULT_ADMIN_ROLE
    with pytest.raises(AccessControlUnauthorizedAccount) as not_admin:
        chain.registry(OUTSIDER).grant_slasher(chain.account(OUTSIDER).address)
    assert (not_admin.value.account, not_admin.value.neededRole) == (
        chain.account(OUTSIDER).address,
        NodeRegistry.DEFAULT_ADMIN_ROLE,
    )
    admin = chain.registry(OWNER)
    assert admin.grant_slasher(chain.account(SLASHER).address).events == ("RoleGranted",)
    assert admin.grant_slasher(chain.account(OUTSIDER).address).events == ("RoleGranted",)  # several holders
    assert admin.grant_slasher(chain.account(OUTSIDER).address).events == ()  # again: no-op
    assert admin.is_slasher(chain.account(SLASHER).address) and admin.is_slasher(chain.account(OUTSIDER).address)
    for index in (OWNER, 6):
        with pytest.raises(AccessControlUnauthorizedAccount):
            chain.registry(index).slash(victim.account, ETH, evidence)

    slasher = chain.registry(SLASHER)
    with pytest.raises(NodeRegistryZeroAmount):
        slasher.slash(victim.account, 0, evidence)
    assert slasher.slash(victim.account, ETH // 2, evidence).events == ("NodeSlashed", "NodeJailed")
    assert chain.registry(OUTSIDER).slash(victim.account, ETH, evidence).events == ("NodeSlashed",)  # already jailed
    assert victim.stake_of(victim.account) == ETH // 2 and victim.treasury_balance() == 3 * ETH // 2
    assert admin.revoke_slasher(chain.account(OUTSIDER).address).events == ("RoleRevoked",)
    with pytest.raises(AccessControlUnauthorizedAccount):
        chain.registry(OUTSIDER).slash(victim.account, ETH, evidence)
    assert slasher.is_slasher(slasher.account)
    _assert_solvent(chain)


def test_slash_jails_until_the_operator_restakes_and_unjails(chain: ChainEnv) -> None:
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
    slasher = chain.registry(SLASHER)
    victim = chain.registry(6)
    _register(victim, stake=2 * ETH)
    with pytest.raises(NodeRegistryNotJailed) as not_jailed:
        victim.unjail()
    assert not_jailed.value.operator == victim.account
    # a small slash still leaves the stake above the minimum, but the node is jailed: not routed to
    slasher.slash(victim.account, ETH // 2, b"\x01" * 32)
    node = victim.get_node(victim.account)
    assert node is not None and node.jailed and not node.active and node.stake == 3 * ETH // 2
    assert victim.is_jailed(victim.account) and not victim.is_active(victim.account)
    # a large one takes it below the minimum: unjail is refused until the operator tops up
    slasher.slash(victim.account, ETH, b"\x02" * 32)
    with pytest.raises(NodeRegistryStakeBelowMinimum) as below:
        victim.unjail()
    assert (below.value.operator, below.value.role, below.value.stake, below.value.minimum) == (
        victim.account,
        Role.MODEL,
        ETH // 2,
        ETH,
    )
    victim.add_stake(ETH // 2)
    assert victim.is_jailed(victim.account) and not victim.is_active(victim.account)  # stake alone does not free it
    assert victim.unjail().events == ("NodeUnjailed",)
    node = victim.get_node(victim.account)
    assert node is not None and not node.jailed and node.active
    # unbonding forbids unjail (NodeUnbonding), and deregistering clears the record, jail included
    slasher.slash(victim.account, 1, bytes(32))
    victim.request_unbond()
    with pytest.raises(NodeRegistryNodeUnbonding):
        victim.unjail()
    chain.advance(TEST_PARAMS.unbonding_delay)
    victim.deregister()
    assert not victim.is_jailed(victim.account)
    _assert_solvent(chain)


def test_slash_of_an_unknown_or_deregistered_node_is_skipped_not_reverted(chain: ChainEnv) -> None:
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
    slasher = chain.registry(SLASHER)
    assert slasher.slash(chain.account(OUTSIDER).address, ETH, b"\x03" * 32).events == ("SlashSkipped",)
    leaver = chain.registry(8)
    _register(leaver, Role.RELAY, stake=TEST_PARAMS.minimum_stake_relay)
    leaver.request_unbond()
    chain.advance(TEST_PARAMS.unbonding_delay)
    leaver.deregister()
    assert slasher.slash(leaver.account, ETH, b"\x04" * 32).events == ("SlashSkipped",)
    # the stake already released to the pull balance is not touched
    assert leaver.pending_withdrawal(leaver.account) == TEST_PARAMS.minimum_stake_relay
    assert leaver.treasury_balance() == 0
    logs = chain.registry().contract.events.SlashSkipped().get_logs(from_block=chain.deployment.deploy_block)
    assert [(log["args"]["operator"], log["args"]["requestedAmount"]) for log in logs] == [
        (chain.account(OUTSIDER).address, ETH),
        (leaver.account, ETH),
    ]
    _assert_solvent(chain)


def test_rebond_cancels_unbonding(chain: ChainEnv) -> None:
    reg = chain.registry(9)
    with pytest.raises(NodeRegistryNotRegistered):
        reg.rebond()
    _register(reg)
    with pytest.raises(NodeRegistryNotUnbonding) as not_unbonding:
        reg.rebond()
    assert not_unbonding.value.operator == reg.account
    reg.request_unbond()
    assert not reg.is_active(reg.account)
    assert reg.rebond().events == ("UnbondingCancelled",)
    node = reg.get_node(reg.account)
    assert node is not None and not node.unbonding and node.active
    reg.add_stake(ETH)  # bonded again: the frozen calls work
    # even past the end of the delay, a node not yet deregistered can come back
    reg.request_unbond()
    chain.advance(TEST_PARAMS.unbonding_delay + 5)
    reg.rebond()
    with pytest.raises(NodeRegistryNotUnbonding):
        reg.deregister()
    assert reg.is_active(reg.account) and reg.stake_of(reg.account) == 2 * ETH


def test_treasury_withdraws_slashed_funds_by_pull(chain: ChainEnv) -> None:
    chain.registry(OWNER).grant_slasher(chain.account(SLASHER).address)
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


def test_admin_moves_only_in_two_steps_after_the_delay(chain: ChainEnv) -> None:
    admin = chain.registry(OWNER)
    new = chain.registry(OUTSIDER)
    with pytest.raises(AccessControlUnauthorizedAccount):
        new.begin_admin_transfer(new.account)  # not the admin
    assert admin.begin_admin_transfer(new.account).events == ("DefaultAdminTransferScheduled",)
    pending, schedule = admin.pending_admin()
    assert pending == new.account and schedule == chain.now() + TEST_PARAMS.admin_transfer_delay
    with pytest.raises(AccessControlInvalidDefaultAdmin) as wrong:
        chain.registry(SLASHER).accept_admin_transfer()  # not the pending admin
    assert wrong.value.defaultAdmin == chain.account(SLASHER).address
    with pytest.raises(AccessControlEnforcedDefaultAdminDelay) as early:
        new.accept_admin_transfer()
    assert early.value.schedule == schedule
    assert admin.admin() == admin.account  # nothing moved yet
    chain.advance(TEST_PARAMS.admin_transfer_delay + 1)  # OpenZeppelin: accepted strictly after the schedule
    assert new.accept_admin_transfer().events == ("RoleRevoked", "RoleGranted")
    assert admin.admin() == new.account and admin.pending_admin() == (None, 0)
    with pytest.raises(AccessControlUnauthorizedAccount):
        admin.grant_slasher(admin.account)  # the old admin lost the power
    assert new.grant_slasher(chain.account(SLASHER).address).events == ("RoleGranted",)


def test_deploy_all_grants_the_configured_slashers(chain: ChainEnv, tmp_path: Any) -> None:
    params = RegistryParams(verification_window=60, unbonding_delay=60, slashers=(chain.account(SLASHER).address,))
    deployment = deploy_all(chain.w3, chain.account(OWNER), params, path=tmp_path / "d.json")
    reg = NodeRegistry(chain.w3, deployment.registry_address)
    assert reg.is_slasher(chain.account(SLASHER).address) and not reg.is_slasher(chain.account(OWNER).address)
    assert deployment.params["slashers"] == [chain.account(SLASHER).address]
    assert deployment.params["verificationWindow"] == 60


def _deploy_raw(chain: ChainEnv, **overrides: Any) -> None:
    """Send the constructor with ``overrides``, bypassing ``RegistryParams``' own checks."""
    artifact = load_artifact("NodeRegistry")
    args: dict[str, Any] = {
        "admin": chain.account(OWNER).address,
        "admin_delay": 0,
        "treasury": chain.account(OWNER).address,
        "model": ETH,
        "relay": ETH,
        "verifier": ETH,
        "window": 600,
        "unbonding": 3_600,
        **overrides,
    }
    factory = chain.w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    send_transaction(chain.w3, chain.account(OWNER), factory.constructor(*args.values()), RevertDecoder([artifact.abi]))


def test_constructor_rejects_unusable_parameters_with_their_values(chain: ChainEnv) -> None:
    zero = "0x" + "00" * 20
    with pytest.raises(NodeRegistryInvalidTreasury):
        _deploy_raw(chain, treasury=zero)
    with pytest.raises(AccessControlInvalidDefaultAdmin):
        _deploy_raw(chain, admin=zero)
    for field, role in (("model", Role.MODEL), ("relay", Role.RELAY), ("verifier", Role.VERIFIER)):
        with pytest.raises(NodeRegistryInvalidMinimumStake) as stake:
            _deploy_raw(chain, **{field: 0})
        assert (stake.value.role, stake.value.minimum) == (role, 0)
    with pytest.raises(NodeRegistryInvalidVerificationWindow) as window:
        _deploy_raw(chain, window=0, unbonding=0)
    assert window.value.verificationWindow == 0
    with pytest.raises(NodeRegistryUnbondingDelayTooShort) as short:
        _deploy_raw(chain, window=600, unbonding=599)
    assert (short.value.unbondingDelay, short.value.verificationWindow) == (599, 600)
    with pytest.raises(NodeRegistryUnbondingDelayTooLong) as long:
        _deploy_raw(chain, unbonding=MAX_UNBONDING_DELAY + 1)
    assert (long.value.unbondingDelay, long.value.maxUnbondingDelay) == (MAX_UNBONDING_DELAY + 1, MAX_UNBONDING_DELAY)
    _deploy_raw(chain, window=MAX_UNBONDING_DELAY, unbonding=MAX_UNBONDING_DELAY)  # both bounds are inclusive


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"minimum_stake_relay": 0}, "minimum_stake_relay"),
        ({"verification_window": 0}, "verification_window"),
        ({"verification_window": 601, "unbonding_delay": 600}, "unbonding_delay"),
        ({"unbonding_delay": MAX_UNBONDING_DELAY + 1}, "unbonding_delay"),
        ({"admin_transfer_delay": 2**48}, "admin_transfer_delay"),
        ({"slashers": ("0x1234",)}, "slasher"),
    ],
)
def test_registry_params_check_the_contract_bounds_before_sending(overrides: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidChainInput) as exc:
        RegistryParams(**overrides)
    assert exc.value.param == param


def test_every_revert_is_a_contract_revert_with_code_tx_reverted(chain: ChainEnv) -> None:
    with pytest.raises(ContractRevert) as exc:
        chain.registry(OUTSIDER).request_unbond()
    assert exc.value.code.startswith("tx_reverted")
    assert exc.value.error_name == "NodeRegistryNotRegistered"
