"""Random sequences of registry operations against anvil, checked against a model and two invariants:
the contract is always exactly solvent (balance == stakes + pending withdrawals + treasury), and nobody ever
withdraws more than they deposited. The operations include jailing by slash, unjail, rebond, slashes of
deregistered or unknown nodes, and granting/revoking the slasher role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from ledger import Anvil, ContractRevert, Deployment, NodeRegistry, Role, model_id
from ledger._reverts import (
    AccessControlUnauthorizedAccount,
    NodeRegistryAlreadyRegistered,
    NodeRegistryNodeUnbonding,
    NodeRegistryNothingToWithdraw,
    NodeRegistryNotJailed,
    NodeRegistryNotRegistered,
    NodeRegistryNotUnbonding,
    NodeRegistryStakeBelowMinimum,
    NodeRegistryUnbondingNotFinished,
    NodeRegistryZeroAmount,
)
from tests._stateful import ChainMachine, run_on_chain
from tests.fixtures.chain import OUTSIDER, OWNER, SLASHER, TEST_PARAMS, rpc

TENTH = 10**17
OPERATORS = (1, 2, 3, 4)
KEY = b"\x01" * 32
MINIMUM = {
    Role.MODEL: TEST_PARAMS.minimum_stake_model,
    Role.RELAY: TEST_PARAMS.minimum_stake_relay,
    Role.VERIFIER: TEST_PARAMS.minimum_stake_verifier,
}

#: Accounts that may hold the slasher role (the model tracks which do).
SLASHERS = (SLASHER, OUTSIDER)
operators = st.sampled_from(OPERATORS)
slashers = st.sampled_from(SLASHERS)
amounts = st.integers(min_value=0, max_value=30).map(lambda n: n * TENTH)


class RegistryMachine(ChainMachine):
    """A model of the registry (stakes, unbonding, pending withdrawals, treasury) driven alongside the contract."""

    def __init__(self) -> None:
        super().__init__()
        address = self.deployment.registry_address
        self.regs = {i: NodeRegistry(self.w3, address, dev(i)) for i in (*OPERATORS, OWNER, *SLASHERS)}
        self.regs[OWNER].grant_slasher(dev(SLASHER).address)
        self.slashers = {SLASHER}
        self.stake: dict[int, int] = {}
        self.role: dict[int, Role] = {}
        self.unbonding: dict[int, bool] = {}
        self.jailed: dict[int, bool] = {}
        self.pending = dict.fromkeys(OPERATORS, 0)
        self.deposited = dict.fromkeys(OPERATORS, 0)
        self.withdrawn = dict.fromkeys(OPERATORS, 0)
        self.treasury = 0

    def _expect(self, error: type[ContractRevert] | None, call: Any) -> Any:
        if error is None:
            return call()
        try:
            call()
        except error as exc:
            return exc
        raise AssertionError(f"expected {error.__name__}")

    @rule(op=operators, role=st.sampled_from(list(Role)), stake=amounts)
    def register(self, op: int, role: Role, stake: int) -> None:
        error: type[ContractRevert] | None = None
        if op in self.stake:
            error = NodeRegistryAlreadyRegistered
        elif stake < MINIMUM[role]:
            error = NodeRegistryStakeBelowMinimum
        self._expect(
            error,
            lambda: self.regs[op].register(
                role=role,
                endpoint=f"http://127.0.0.1:{9000 + op}",
                x25519_public_key=KEY,
                model_id=None if role is Role.RELAY else model_id("m@v1"),
                price_per_1k_tokens=op,
                stake=stake,
            ),
        )
        if error is None:
            self.stake[op], self.role[op], self.unbonding[op], self.jailed[op] = stake, role, False, False
            self.deposited[op] += stake

    @rule(op=operators, amount=amounts)
    def add_stake(self, op: int, amount: int) -> None:
        error: type[ContractRevert] | None = None
        if op not in self.stake:
            error = NodeRegistryNotRegistered
        elif self.unbonding[op]:
            error = NodeRegistryNodeUnbonding
        elif amount == 0:
            error = NodeRegistryZeroAmount
        self._expect(error, lambda: self.regs[op].add_stake(amount))
        if error is None:
            self.stake[op] += amount
            self.deposited[op] += amount

    @rule(op=operators)
    def request_unbond(self, op: int) -> None:
        error: type[ContractRevert] | None = None
        if op not in self.stake:
            error = NodeRegistryNotRegistered
        elif self.unbonding[op]:
            error = NodeRegistryNodeUnbonding
        self._expect(error, self.regs[op].request_unbond)
        if error is None:
            self.unbonding[op] = True

    @rule(op=operators)
    def rebond(self, op: int) -> None:
        error: type[ContractRevert] | None = None
        if op not in self.stake:
            error = NodeRegistryNotRegistered
        elif not self.unbonding[op]:
            error = NodeRegistryNotUnbonding
        self._expect(error, self.regs[op].rebond)
        if error is None:
            self.unbonding[op] = False

    @rule(op=operators)
    def unjail(self, op: int) -> None:
        error: type[ContractRevert] | None = None
        if op not in self.stake:
            error = NodeRegistryNotRegistered
        elif self.unbonding[op]:
            error = NodeRegistryNodeUnbonding
        elif not self.jailed[op]:
            error = NodeRegistryNotJailed
        elif self.stake[op] < MINIMUM[self.role[op]]:
            error = NodeRegistryStakeBelowMinimum
        self._expect(error, self.regs[op].unjail)
        if error is None:
            self.jailed[op] = False

    @rule(who=slashers, grant=st.booleans())
    def set_slasher_role(self, who: int, grant: bool) -> None:
        admin = self.regs[OWNER]
        receipt = admin.grant_slasher(dev(who).address) if grant else admin.revoke_slasher(dev(who).address)
        changed = (who in self.slashers) != grant
        assert receipt.events == ((("RoleGranted",) if grant else ("RoleRevoked",)) if changed else ())
        if grant:
            self.slashers.add(who)
        else:
            self.slashers.discard(who)

    @rule(seconds=st.sampled_from([1, 600, TEST_PARAMS.unbonding_delay, 2 * TEST_PARAMS.unbonding_delay]))
    def advance(self, seconds: int) -> None:
        rpc(self.w3, "evm_increaseTime", [seconds])
        rpc(self.w3, "evm_mine", [])

    @rule(op=operators)
    def deregister(self, op: int) -> None:
        if op not in self.stake:
            self._expect(NodeRegistryNotRegistered, self.regs[op].deregister)
            return
        if not self.unbonding[op]:
            self._expect(NodeRegistryNotUnbonding, self.regs[op].deregister)
            return
        try:
            self.regs[op].deregister()
        except NodeRegistryUnbondingNotFinished as exc:
            assert exc.currentTime < exc.unbondingEndsAt
            return
        self.pending[op] += self.stake.pop(op)
        del self.role[op], self.unbonding[op], self.jailed[op]

    @rule(op=operators)
    def withdraw(self, op: int) -> None:
        if self.pending[op] == 0:
            self._expect(NodeRegistryNothingToWithdraw, self.regs[op].withdraw)
            return
        account = dev(op).address
        before = self.w3.eth.get_balance(account)
        receipt = self.regs[op].withdraw()
        paid = self.w3.eth.get_balance(account) - before + receipt.gas_used * receipt.effective_gas_price
        assert paid == self.pending[op]
        self.withdrawn[op] += paid
        self.pending[op] = 0

    @rule(op=operators, amount=amounts, by=slashers)
    def slash(self, op: int, amount: int, by: int) -> None:
        error: type[ContractRevert] | None = None
        if by not in self.slashers:
            error = AccessControlUnauthorizedAccount
        elif amount == 0:
            error = NodeRegistryZeroAmount
        receipt = self._expect(error, lambda: self.regs[by].slash(dev(op).address, amount, b"\x02" * 32))
        if error is not None:
            return
        if op not in self.stake:  # never registered or deregistered: skipped, nothing taken
            assert receipt.events == ("SlashSkipped",)
            return
        assert receipt.events == (("NodeSlashed",) if self.jailed[op] else ("NodeSlashed", "NodeJailed"))
        taken = min(amount, self.stake[op])
        self.stake[op] -= taken
        self.treasury += taken
        self.jailed[op] = True

    @invariant()
    def contract_is_exactly_solvent(self) -> None:
        reg = self.regs[OWNER]
        balance = reg.balance()
        assert balance == sum(self.stake.values()) + sum(self.pending.values()) + self.treasury
        assert balance == reg.total_staked() + reg.total_pending_withdrawals() + reg.treasury_balance()
        assert reg.treasury_balance() == self.treasury

    @invariant()
    def stakes_and_activity_match_the_model(self) -> None:
        reg = self.regs[OWNER]
        for op in OPERATORS:
            address = dev(op).address
            assert reg.stake_of(address) == self.stake.get(op, 0)
            assert reg.pending_withdrawal(address) == self.pending[op]
            active = (
                op in self.stake
                and not self.unbonding[op]
                and not self.jailed[op]
                and self.stake[op] >= MINIMUM[self.role[op]]
            )
            assert reg.is_active(address) == active
            assert reg.is_jailed(address) == self.jailed.get(op, False)
        for who in SLASHERS:
            assert reg.is_slasher(dev(who).address) == (who in self.slashers)

    @invariant()
    def nobody_withdraws_more_than_deposited(self) -> None:
        for op in OPERATORS:
            assert self.withdrawn[op] + self.pending[op] <= self.deposited[op]


def dev(index: int) -> Any:
    from ledger import dev_account

    return dev_account(index)


def test_random_registry_operations_keep_the_invariants(
    anvil: Anvil, chain_deployment: tuple[Deployment, Path]
) -> None:
    run_on_chain(RegistryMachine, anvil, chain_deployment[0], examples=8, steps=16)
