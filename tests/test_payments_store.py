"""The node's durable voucher store against a real anvil and a SQLite file: every acceptance rule, restarts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from ledger import (
    ChannelInfo,
    InvalidChainInput,
    PaymentChannels,
    PriceRule,
    Voucher,
    VoucherDomain,
    VoucherRejected,
    VoucherStore,
    Wei,
    dev_account,
    sign_voucher,
)
from ledger._vouchers import (
    VoucherChannelClosing,
    VoucherForged,
    VoucherReplayed,
    VoucherStale,
    VoucherUnderfunded,
    VoucherUnderpaid,
    VoucherWrongChain,
    VoucherWrongChannel,
    VoucherWrongContract,
)
from tests.fixtures.chain import OUTSIDER, ChainEnv
from tests.fixtures.payments import payments, voucher

NODE, OTHER_NODE, CLIENT = 1, 2, 10
#: 1000 wei per 1000 tokens: one wei per token, so amounts read as token counts.
PRICE = Wei(1_000)
E = TypeVar("E", bound=VoucherRejected)


def _rule(prompt: int = 10, max_tokens: int = 20) -> PriceRule:
    return PriceRule(price_per_1k_tokens=PRICE, prompt_tokens=prompt, max_tokens=max_tokens)


def _store(chain: ChainEnv, path: Path, node: int = NODE) -> VoucherStore:
    pay = payments(chain)
    return VoucherStore(f"sqlite:///{path}", domain=pay.domain(), node=dev_account(node).address, channels=pay)


def _open(chain: ChainEnv, deposit: int = 10_000, node: int = NODE) -> int:
    return payments(chain, CLIENT).open_channel(dev_account(node).address, deposit).channel_id


def _refused(store: VoucherStore, v: Voucher, expected: type[E]) -> E:
    """Accepting ``v`` raises exactly ``expected`` and leaves the channel's book as it was."""
    before = store.book(v.channel_id)
    with pytest.raises(VoucherRejected) as exc:
        store.accept(v, _rule())
    assert type(exc.value) is expected
    assert store.book(v.channel_id) == before
    return exc.value


def test_each_rejection_has_a_stable_distinct_code() -> None:
    leaves: list[type[VoucherRejected]] = [
        VoucherWrongChain,
        VoucherWrongContract,
        VoucherWrongChannel,
        VoucherChannelClosing,
        VoucherForged,
        VoucherReplayed,
        VoucherStale,
        VoucherUnderpaid,
        VoucherUnderfunded,
    ]
    assert [c.code for c in leaves] == [
        "voucher_wrong_chain",
        "voucher_wrong_contract",
        "voucher_wrong_channel",
        "voucher_channel_closing",
        "voucher_forged",
        "voucher_replayed",
        "voucher_stale",
        "voucher_underpaid",
        "voucher_underfunded",
    ]


def test_every_acceptance_rule_refuses_with_its_own_code_and_changes_nothing(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    store = _store(chain, tmp_path / "v.db")
    channel = _open(chain)
    here = pay.domain()

    other_chain = VoucherDomain(chain_id=here.chain_id + 1, contract=here.contract)
    _refused(store, sign_voucher(dev_account(CLIENT), other_chain, channel, 30), VoucherWrongChain)
    other_contract = VoucherDomain(chain_id=here.chain_id, contract=dev_account(OUTSIDER).address)
    _refused(store, sign_voucher(dev_account(CLIENT), other_contract, channel, 30), VoucherWrongContract)
    _refused(store, voucher(pay, CLIENT, 9_999, 30), VoucherWrongChannel)
    foreign = _open(chain, node=OTHER_NODE)
    assert (
        _refused(store, voucher(pay, CLIENT, foreign, 30), VoucherWrongChannel).node == dev_account(OTHER_NODE).address
    )
    _refused(store, sign_voucher(dev_account(OUTSIDER), here, channel, 30), VoucherForged)
    signed_elsewhere = sign_voucher(dev_account(CLIENT), here, channel + 1, 30)
    moved = Voucher(domain=here, channel_id=channel, cumulative_amount=Wei(30), signature=signed_elsewhere.signature)
    _refused(store, moved, VoucherForged)
    underpaid = _refused(store, voucher(pay, CLIENT, channel, 29), VoucherUnderpaid)
    assert (underpaid.amount, underpaid.required) == (29, 30)
    _refused(store, voucher(pay, CLIENT, channel, 10_001), VoucherUnderfunded)

    accepted = store.accept(voucher(pay, CLIENT, channel, 40), _rule())
    assert accepted.reservation == 30 and accepted.client == dev_account(CLIENT).address
    _refused(store, voucher(pay, CLIENT, channel, 40), VoucherReplayed)
    _refused(store, voucher(pay, CLIENT, channel, 35), VoucherStale)

    payments(chain, CLIENT).start_close(channel)
    _refused(store, voucher(pay, CLIENT, channel, 100), VoucherChannelClosing)


def test_the_next_baseline_is_what_was_actually_used(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    store = _store(chain, tmp_path / "v.db")
    channel = _open(chain)
    first = store.accept(voucher(pay, CLIENT, channel, 30), _rule())
    assert store.settle(first, used_tokens=15) == 15
    book = store.book(channel)
    assert book is not None and (book.owed, book.reserved, book.latest.cumulative_amount) == (15, 0, 30)
    # Next request reserves 30 more on top of the 15 really used: 45, not 60.
    _refused(store, voucher(pay, CLIENT, channel, 44), VoucherUnderpaid)
    second = store.accept(voucher(pay, CLIENT, channel, 45), _rule())
    # A request in flight keeps its reservation: a concurrent one must cover both.
    required = _refused(store, voucher(pay, CLIENT, channel, 74), VoucherUnderpaid).required
    assert required == 15 + 30 + 30
    third = store.accept(voucher(pay, CLIENT, channel, 75), _rule())
    store.settle(second, used_tokens=30)
    store.settle(third, used_tokens=11)
    book = store.book(channel)
    assert book is not None and (book.owed, book.reserved) == (15 + 30 + 11, 0)
    with pytest.raises(InvalidChainInput):
        store.settle(third, used_tokens=31)


def test_prices_round_up_so_no_request_is_free() -> None:
    rule = PriceRule(price_per_1k_tokens=Wei(1), prompt_tokens=1, max_tokens=0)
    assert rule.reservation == 1 and rule.cost(0) == 0 and rule.cost(1000) == 1 and rule.cost(1001) == 2


def test_a_node_killed_between_answering_and_redeeming_redeems_everything_after_restart(
    chain: ChainEnv, tmp_path: Path
) -> None:
    pay = payments(chain)
    path = tmp_path / "node.db"
    channels = [_open(chain, deposit=5_000) for _ in range(3)]
    store = _store(chain, path)
    amounts = {}
    for channel in channels:
        owed = 0
        for _request in range(20):
            accepted = store.accept(voucher(pay, CLIENT, channel, owed + 30), _rule())
            owed += store.settle(accepted, used_tokens=25)
        last = store.accept(voucher(pay, CLIENT, channel, owed + 30), _rule())  # answered, then the node dies
        amounts[channel] = last.voucher.cumulative_amount
    del store, last

    restarted = _store(chain, path)
    assert restarted.book(channels[0]).owed == amounts[channels[0]]  # type: ignore[union-attr]
    to_redeem = restarted.redeemable()
    assert {v.channel_id: v.cumulative_amount for v in to_redeem} == amounts
    node = PaymentChannels(chain.w3, pay.address, dev_account(NODE))
    receipt = node.redeem_batch(to_redeem)
    assert receipt.events.count("VoucherRedeemed") == 3
    restarted.mark_redeemed(to_redeem)
    assert restarted.redeemable() == []
    assert [pay.channel(c).redeemed for c in channels] == [amounts[c] for c in channels]  # type: ignore[union-attr]
    assert pay.balances(dev_account(NODE).address).locked == sum(amounts.values())
    # The replay cache survived the restart too.
    _refused(restarted, to_redeem[0], VoucherReplayed)
    _refused(restarted, voucher(pay, CLIENT, channels[0], 1), VoucherStale)


def test_a_top_up_makes_an_underfunded_voucher_acceptable(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    store = _store(chain, tmp_path / "v.db")
    channel = _open(chain, deposit=50)
    _refused(store, voucher(pay, CLIENT, channel, 60), VoucherUnderfunded)
    payments(chain, CLIENT).top_up(channel, 10)
    assert store.accept(voucher(pay, CLIENT, channel, 60), _rule()).voucher.cumulative_amount == 60


def test_a_fresh_store_starts_from_what_was_redeemed_on_chain(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    channel = _open(chain)
    payments(chain, NODE).redeem(voucher(pay, CLIENT, channel, 500))
    store = _store(chain, tmp_path / "lost.db")  # the node lost its database
    _refused(store, voucher(pay, CLIENT, channel, 500), VoucherStale)
    _refused(store, voucher(pay, CLIENT, channel, 529), VoucherUnderpaid)
    store.accept(voucher(pay, CLIENT, channel, 530), _rule())


def test_amounts_beyond_64_bits_survive_the_database(chain: ChainEnv, tmp_path: Path) -> None:
    pay = payments(chain)
    path = tmp_path / "big.db"
    channel = _open(chain, deposit=2**70)
    amount = 2**64 + 12_345
    _store(chain, path).accept(voucher(pay, CLIENT, channel, amount), _rule())
    book = _store(chain, path).book(channel)
    assert book is not None and book.latest.cumulative_amount == amount and book.owed == 30
    assert book.latest == voucher(pay, CLIENT, channel, amount)


class _FixedChannels:
    """The store's direct neighbour faked: one open channel per id, paying NODE, funded generously."""

    def channel(self, channel_id: int) -> ChannelInfo | None:
        return ChannelInfo(
            channel_id=channel_id,
            client=dev_account(CLIENT).address,
            node=dev_account(NODE).address,
            deposit=Wei(10**9),
            redeemed=Wei(0),
            closes_at=0,
            settled=False,
        )


def test_concurrent_accepts_from_threads_are_serialised(tmp_path: Path) -> None:
    domain = VoucherDomain(chain_id=31337, contract=dev_account(OUTSIDER).address)
    store = VoucherStore(
        f"sqlite:///{tmp_path / 'v.db'}", domain=domain, node=dev_account(NODE).address, channels=_FixedChannels()
    )
    rule = PriceRule(price_per_1k_tokens=Wei(1_000), prompt_tokens=1, max_tokens=0)
    vouchers = [sign_voucher(dev_account(CLIENT), domain, c, a) for a in range(1, 25) for c in (1, 2, 3)]

    def attempt(v: Voucher) -> int | None:
        try:
            return store.accept(v, rule).voucher.cumulative_amount
        except VoucherStale:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(zip(vouchers, pool.map(attempt, vouchers), strict=True))
    for channel in (1, 2, 3):
        accepted = [amount for v, amount in outcomes if v.channel_id == channel and amount is not None]
        assert len(accepted) == len(set(accepted))  # no amount accepted twice
        book = store.book(channel)
        assert book is not None and book.latest.cumulative_amount == max(accepted)
        assert book.reserved == len(accepted)  # every accepted request holds its reservation
