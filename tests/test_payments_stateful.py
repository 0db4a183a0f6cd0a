"""Random sequences of payment-channel operations against anvil, checked against a model of the contract:
deposits, top-ups, vouchers (valid, stale, over the deposit, forged), single and batch redemptions, closes,
settlements, slashes, withdrawals and time jumps. Invariants: the contract's balance is exactly what it owes
(unredeemed deposits of unsettled channels + node earnings, locked or not + withdrawable balances), every view
matches the model, and nobody ever withdraws more than it is owed.

Time: the machine starts 100 s into a lock epoch and only jumps by multiples of half an epoch, so every block's
position in its epoch (and relative to every close deadline) stays far from a boundary; the wall-clock seconds
anvil adds between blocks cannot flip a prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from ledger import (
    Anvil,
    ContractRevert,
    Deployment,
    PaymentChannels,
    PaymentParams,
    TxReceipt,
    Voucher,
    dev_account,
    sign_voucher,
)
from ledger._payments import deploy_payments
from ledger._reverts import (
    PaymentChannelsAlreadySettled,
    PaymentChannelsChannelClosed,
    PaymentChannelsChannelClosing,
    PaymentChannelsCloseNotStarted,
    PaymentChannelsDisputeNotOver,
    PaymentChannelsInvalidSignature,
    PaymentChannelsNothingToWithdraw,
    PaymentChannelsVoucherExceedsDeposit,
    PaymentChannelsVoucherNotAboveRedeemed,
    PaymentChannelsZeroAmount,
)
from tests._stateful import ChainMachine, run_on_chain
from tests.fixtures.chain import OUTSIDER, OWNER, SLASHER, rpc

CLIENTS = (10, 11)
NODES = (1, 2)
TREASURY = OWNER
ACCOUNTS = (*CLIENTS, *NODES, TREASURY)


@dataclass
class ModelChannel:
    channel_id: int
    client: int
    node: int
    deposit: int = 0
    redeemed: int = 0
    closes_at: int = 0
    settled: bool = False


def _amounts(ch: ModelChannel) -> st.SearchStrategy[int]:
    """Cumulative amounts for ``ch``: mostly valid (above redeemed, within the deposit), some stale or too high."""
    return st.one_of(
        st.integers(ch.redeemed + 1, max(ch.redeemed + 1, ch.deposit)),
        st.integers(ch.redeemed + 1, max(ch.redeemed + 1, ch.deposit)),
        st.integers(ch.redeemed + 1, max(ch.redeemed + 1, ch.deposit)),
        st.integers(0, ch.deposit + 1_000),
    )


def _with_amount(ch: ModelChannel) -> st.SearchStrategy[tuple[ModelChannel, int]]:
    return st.tuples(st.just(ch), _amounts(ch))


class PaymentsMachine(ChainMachine):
    """The contract's state re-derived in Python, driven alongside the real contract."""

    def __init__(self) -> None:
        super().__init__()
        # A contract of its own (reverted with the snapshot) with a dispute delay of one epoch, so closes settle
        # within a run; it reads jail flags from the session's real registry.
        params = PaymentParams(dispute_delay=1_800, verification_window=1_800, slashers=(dev_account(SLASHER).address,))
        address, _ = deploy_payments(
            self.w3, dev_account(OWNER), registry=self.deployment.registry_address, params=params
        )
        self.pay = {i: PaymentChannels(self.w3, address, dev_account(i)) for i in (*ACCOUNTS, SLASHER, OUTSIDER)}
        self.view = PaymentChannels(self.w3, address)
        self.window = self.view.verification_window()
        self.delay = self.view.dispute_delay()
        assert self.view.treasury() == dev_account(TREASURY).address
        start = (self._now() // self.window + 2) * self.window + 100
        rpc(self.w3, "evm_setNextBlockTimestamp", [start])
        rpc(self.w3, "evm_mine", [])
        self.channels: list[ModelChannel] = []
        # Per node two lock buckets [amount, epoch], indexed by epoch % 2, as in the contract.
        self.buckets = {n: [[0, 0], [0, 0]] for n in NODES}
        self.withdrawable = dict.fromkeys(ACCOUNTS, 0)
        self.deposited = dict.fromkeys(CLIENTS, 0)
        self.earned = dict.fromkeys(NODES, 0)
        self.slashed = dict.fromkeys(NODES, 0)
        self.withdrawn = dict.fromkeys(ACCOUNTS, 0)
        for client, node in ((10, 1), (11, 2)):  # start with channels so that vouchers flow from the first step
            self.open(client, node, 5_000)

    # -- model helpers -------------------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def _epoch(self) -> int:
        return self._now() // self.window

    def _released(self, node: int, epoch: int, *, apply: bool) -> int:
        released = 0
        for bucket in self.buckets[node]:
            if bucket[0] and bucket[1] + 2 <= epoch:
                released += bucket[0]
                if apply:
                    bucket[0] = 0
        return released

    def _locked(self, node: int, epoch: int) -> int:
        return sum(b[0] for b in self.buckets[node] if not (b[0] and b[1] + 2 <= epoch))

    def _lock(self, node: int, amount: int) -> None:
        epoch = self._epoch()
        self.withdrawable[node] += self._released(node, epoch, apply=True)
        bucket = self.buckets[node][epoch % 2]
        bucket[0] += amount
        bucket[1] = epoch

    def _expect(self, error: type[ContractRevert] | None, call: Callable[[], TxReceipt]) -> TxReceipt | None:
        """Run ``call``; it must raise exactly ``error`` (or succeed when None). Outcomes feed the statistics."""
        if error is None:
            receipt = call()
            event(f"ok: {', '.join(receipt.events) or 'no event'}")
            return receipt
        try:
            call()
        except error:
            event(f"refused: {error.__name__}")
            return None
        raise AssertionError(f"expected {error.__name__}")

    def _redeem_error(self, ch: ModelChannel, amount: int, redeemed: int) -> type[ContractRevert] | None:
        if ch.closes_at and self._now() >= ch.closes_at:
            return PaymentChannelsChannelClosed
        if amount <= redeemed:
            return PaymentChannelsVoucherNotAboveRedeemed
        if amount > ch.deposit:
            return PaymentChannelsVoucherExceedsDeposit
        return None

    def _voucher(self, ch: ModelChannel, amount: int, signer: int | None = None) -> Voucher:
        return sign_voucher(dev_account(signer or ch.client), self.view.domain(), ch.channel_id, amount)

    # -- rules ---------------------------------------------------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS), node=st.sampled_from(NODES), amount=st.sampled_from([1, 1_000, 5_000]))
    def open(self, client: int, node: int, amount: int) -> None:
        opened = self.pay[client].open_channel(dev_account(node).address, amount)
        assert opened.channel_id == len(self.channels) + 1
        self.channels.append(ModelChannel(opened.channel_id, client, node, deposit=amount))
        self.deposited[client] += amount

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), amount=st.sampled_from([1, 500]))
    def top_up(self, data: st.DataObject, amount: int) -> None:
        ch = data.draw(st.sampled_from(self.channels))
        error = PaymentChannelsChannelClosing if ch.closes_at else None
        self._expect(error, lambda: self.pay[ch.client].top_up(ch.channel_id, amount))
        if error is None:
            ch.deposit += amount
            self.deposited[ch.client] += amount

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), forged=st.sampled_from([False, False, False, True]))
    def redeem(self, data: st.DataObject, forged: bool) -> None:
        ch = data.draw(st.sampled_from(self.channels))
        amount = data.draw(_amounts(ch), label="amount")
        error = self._redeem_error(ch, amount, ch.redeemed)
        if error is None and forged:
            error = PaymentChannelsInvalidSignature
        voucher = self._voucher(ch, amount, OUTSIDER if forged else None)
        receipt = self._expect(error, lambda: self.pay[ch.node].redeem(voucher))
        if receipt is not None:
            self._lock(ch.node, amount - ch.redeemed)
            self.earned[ch.node] += amount - ch.redeemed
            ch.redeemed = amount

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def redeem_again(self, data: st.DataObject) -> None:
        """Redemption is the heart of the contract: give it twice the weight of the other rules."""
        self.redeem(data, forged=False)

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), node=st.sampled_from(NODES))
    def redeem_batch(self, data: st.DataObject, node: int) -> None:
        mine = [ch for ch in self.channels if ch.node == node]
        if not mine:
            return
        picks = data.draw(
            st.lists(
                st.sampled_from(mine).flatmap(lambda ch: st.tuples(st.just(ch), _amounts(ch))), min_size=1, max_size=4
            ),
            label="batch",
        )
        redeemed = {ch.channel_id: ch.redeemed for ch in mine}
        error: type[ContractRevert] | None = None
        for ch, amount in picks:
            error = self._redeem_error(ch, amount, redeemed[ch.channel_id])
            if error is not None:
                break
            redeemed[ch.channel_id] = amount
        vouchers = [self._voucher(ch, amount) for ch, amount in picks]
        receipt = self._expect(error, lambda: self.pay[node].redeem_batch(vouchers))
        if receipt is not None:
            total = sum(redeemed[ch.channel_id] - ch.redeemed for ch in mine)
            self._lock(node, total)
            self.earned[node] += total
            for ch in mine:
                ch.redeemed = redeemed[ch.channel_id]

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def start_close(self, data: st.DataObject) -> None:
        ch = data.draw(st.sampled_from(self.channels))
        error = PaymentChannelsChannelClosing if ch.closes_at else None
        receipt = self._expect(error, lambda: self.pay[ch.client].start_close(ch.channel_id))
        if receipt is not None:
            ch.closes_at = int(self.w3.eth.get_block(receipt.block_number)["timestamp"]) + self.delay

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), caller=st.sampled_from([*ACCOUNTS, OUTSIDER]))
    def finish_close(self, data: st.DataObject, caller: int) -> None:
        ch = data.draw(st.sampled_from(self.channels))
        error: type[ContractRevert] | None = None
        if not ch.closes_at:
            error = PaymentChannelsCloseNotStarted
        elif self._now() < ch.closes_at:
            error = PaymentChannelsDisputeNotOver
        elif ch.settled:
            error = PaymentChannelsAlreadySettled
        receipt = self._expect(error, lambda: self.pay[caller].finish_close(ch.channel_id))
        if receipt is not None:
            ch.settled = True
            self.withdrawable[ch.client] += ch.deposit - ch.redeemed

    @rule(account=st.sampled_from(ACCOUNTS))
    def withdraw(self, account: int) -> None:
        released = self._released(account, self._epoch(), apply=False) if account in NODES else 0
        expected = self.withdrawable[account] + released
        if expected == 0:
            self._expect(PaymentChannelsNothingToWithdraw, self.pay[account].withdraw)
            return
        address = dev_account(account).address
        before = self.w3.eth.get_balance(address)
        receipt = self.pay[account].withdraw()
        paid = self.w3.eth.get_balance(address) - before + receipt.gas_used * receipt.effective_gas_price
        assert paid == expected
        event(f"ok: withdraw by {'node' if account in NODES else 'treasury' if account == TREASURY else 'client'}")
        if account in NODES:
            self._released(account, self._epoch(), apply=True)
        self.withdrawable[account] = 0
        self.withdrawn[account] += paid

    @rule(node=st.sampled_from(NODES), amount=st.sampled_from([0, 1, 700, 700, 10**6]))
    def slash(self, node: int, amount: int) -> None:
        if amount == 0:
            self._expect(
                PaymentChannelsZeroAmount, lambda: self.pay[SLASHER].slash(dev_account(node).address, 0, b"\x01" * 32)
            )
            return
        self.pay[SLASHER].slash(dev_account(node).address, amount, b"\x02" * 32)
        self.withdrawable[node] += self._released(node, self._epoch(), apply=True)
        rest = amount
        for bucket in self.buckets[node]:
            take = min(rest, bucket[0])
            bucket[0] -= take
            rest -= take
        taken = amount - rest
        event("ok: slash took locked earnings" if taken else "ok: slash found nothing locked")
        self.slashed[node] += taken
        self.withdrawable[TREASURY] += taken

    @rule(seconds=st.sampled_from([1, 2, 4]))
    def advance(self, seconds: int) -> None:
        rpc(self.w3, "evm_increaseTime", [seconds * self.window // 2])
        rpc(self.w3, "evm_mine", [])

    # -- invariants ----------------------------------------------------------------------------------------------

    @invariant()
    def balance_is_exactly_what_is_owed(self) -> None:
        channels = sum(ch.deposit - ch.redeemed for ch in self.channels if not ch.settled)
        earnings = sum(b[0] for n in NODES for b in self.buckets[n])
        assert self.view.balance() == channels + earnings + sum(self.withdrawable.values())

    @invariant()
    def views_match_the_model(self) -> None:
        epoch = self._epoch()
        for account in ACCOUNTS:
            balances = self.view.balances(dev_account(account).address)
            if account in NODES:
                assert balances.locked == self._locked(account, epoch)
                released = self._released(account, epoch, apply=False)
            else:
                assert balances.locked == 0
                released = 0
            assert balances.withdrawable == self.withdrawable[account] + released
        for ch in self.channels:
            info = self.view.channel(ch.channel_id)
            assert info is not None
            assert (info.deposit, info.redeemed, info.closes_at, info.settled) == (
                ch.deposit,
                ch.redeemed,
                ch.closes_at,
                ch.settled,
            )

    @invariant()
    def nobody_withdraws_more_than_owed(self) -> None:
        for client in CLIENTS:
            paid_out = sum(ch.redeemed for ch in self.channels if ch.client == client)
            assert self.withdrawn[client] <= self.deposited[client] - paid_out
        for node in NODES:
            assert self.withdrawn[node] <= self.earned[node] - self.slashed[node]
        assert self.withdrawn[TREASURY] <= sum(self.slashed.values())


def test_random_payment_operations_keep_the_invariants(anvil: Anvil, chain_deployment: tuple[Deployment, Path]) -> None:
    run_on_chain(PaymentsMachine, anvil, chain_deployment[0], examples=6, steps=25, shrink=False)
