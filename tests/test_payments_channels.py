"""PaymentChannels on a real anvil: paying per request, redeeming once, closing, locking, slashing, jailing."""

from __future__ import annotations

import pytest

from ledger import (
    ContractRevert,
    PaymentChannels,
    PaymentParams,
    Voucher,
    VoucherDomain,
    Wei,
    dev_account,
    sign_voucher,
)
from ledger._reverts import (
    AccessControlUnauthorizedAccount,
    PaymentChannelsAlreadySettled,
    PaymentChannelsChannelClosed,
    PaymentChannelsChannelClosing,
    PaymentChannelsCloseNotStarted,
    PaymentChannelsDisputeNotOver,
    PaymentChannelsInvalidBatchSize,
    PaymentChannelsInvalidNode,
    PaymentChannelsInvalidSignature,
    PaymentChannelsNodeJailed,
    PaymentChannelsNotClient,
    PaymentChannelsNothingToWithdraw,
    PaymentChannelsNotNode,
    PaymentChannelsUnknownChannel,
    PaymentChannelsVoucherExceedsDeposit,
    PaymentChannelsVoucherNotAboveRedeemed,
    PaymentChannelsZeroAmount,
)
from tests.fixtures.chain import OUTSIDER, OWNER, SLASHER, ChainEnv
from tests.fixtures.payments import ETH, deploy_with_jail_switch, eth_balance, payments, spent, voucher

NODE, OTHER_NODE, CLIENT, OTHER_CLIENT = 1, 2, 10, 11
PRICE = 123_456_789  # wei per request


def _open(chain: ChainEnv, deposit: int = ETH, client: int = CLIENT, node: int = NODE) -> int:
    return payments(chain, client).open_channel(dev_account(node).address, deposit).channel_id


def _release_all(chain: ChainEnv) -> None:
    chain.advance(2 * payments(chain).verification_window() + 1)


def test_pay_for_n_requests_redeem_once_and_reclaim_the_rest_exact_to_the_wei(chain: ChainEnv) -> None:
    pay = payments(chain)
    deposit, n = ETH, 250
    client_before = eth_balance(chain.w3, CLIENT)
    opened = payments(chain, CLIENT).open_channel(dev_account(NODE).address, deposit)
    assert opened.receipt.events == ("ChannelOpened",)
    vouchers = [voucher(pay, CLIENT, opened.channel_id, PRICE * i) for i in range(1, n + 1)]

    node_before = eth_balance(chain.w3, NODE)
    redeemed = payments(chain, NODE).redeem(vouchers[-1])
    assert redeemed.events == ("VoucherRedeemed",)
    info = pay.channel(opened.channel_id)
    assert info is not None and info.redeemed == n * PRICE and info.remaining == deposit - n * PRICE
    assert pay.balances(dev_account(NODE).address).locked == n * PRICE

    _release_all(chain)
    withdrawn = payments(chain, NODE).withdraw()
    assert withdrawn.events == ("EarningsReleased", "Withdrawn")
    node_gas = spent(redeemed) + spent(withdrawn)
    assert eth_balance(chain.w3, NODE) - node_before + node_gas == n * PRICE

    client = payments(chain, CLIENT)
    receipts = [client.start_close(opened.channel_id)]
    chain.advance(pay.dispute_delay())
    receipts.append(client.finish_close(opened.channel_id))
    receipts.append(client.withdraw())
    client_gas = spent(opened.receipt) + sum(spent(r) for r in receipts)
    assert client_before - eth_balance(chain.w3, CLIENT) - client_gas == n * PRICE
    assert pay.balance() == 0


def test_forged_and_misdirected_vouchers_are_refused_on_chain(chain: ChainEnv) -> None:
    pay = payments(chain)
    node = payments(chain, NODE)
    channel = _open(chain)
    other = _open(chain)
    client = dev_account(CLIENT).address

    forged = sign_voucher(dev_account(OUTSIDER), pay.domain(), channel, 10)
    with pytest.raises(PaymentChannelsInvalidSignature) as exc:
        node.redeem(forged)
    assert exc.value.values == {"channelId": channel, "signer": dev_account(OUTSIDER).address, "client": client}

    # Signed for another chain / contract / channel, presented as if for this one: the signature does not match.
    elsewhere = [
        VoucherDomain(chain_id=1, contract=pay.address),
        VoucherDomain(chain_id=pay.domain().chain_id, contract=dev_account(OUTSIDER).address),
    ]
    for domain in elsewhere:
        signed = sign_voucher(dev_account(CLIENT), domain, channel, 10)
        replanted = Voucher(
            domain=pay.domain(), channel_id=channel, cumulative_amount=Wei(10), signature=signed.signature
        )
        with pytest.raises(PaymentChannelsInvalidSignature) as exc:
            node.redeem(replanted)
        assert exc.value.client == client and exc.value.signer != client
    for_other = voucher(pay, CLIENT, other, 10)
    moved = Voucher(domain=pay.domain(), channel_id=channel, cumulative_amount=Wei(10), signature=for_other.signature)
    with pytest.raises(PaymentChannelsInvalidSignature):
        node.redeem(moved)

    # A malleated (high-s) twin of a valid signature is refused, with signer zero.
    good = voucher(pay, CLIENT, channel, 10)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(good.signature[32:64], "big")
    twin = good.signature[:32] + (n - s).to_bytes(32, "big") + bytes([55 - good.signature[64]])
    with pytest.raises(PaymentChannelsInvalidSignature) as exc:
        node.redeem(Voucher(domain=pay.domain(), channel_id=channel, cumulative_amount=Wei(10), signature=twin))
    assert int(exc.value.signer, 16) == 0

    with pytest.raises(PaymentChannelsNotNode) as not_node:
        payments(chain, OTHER_NODE).redeem(good)
    assert not_node.value.values == {
        "channelId": channel,
        "caller": dev_account(OTHER_NODE).address,
        "node": dev_account(NODE).address,
    }
    with pytest.raises(PaymentChannelsUnknownChannel):
        node.redeem(voucher(pay, CLIENT, 999, 10))
    with pytest.raises(PaymentChannelsVoucherExceedsDeposit) as over:
        node.redeem(voucher(pay, CLIENT, channel, ETH + 1))
    assert over.value.values == {"channelId": channel, "cumulativeAmount": ETH + 1, "deposit": ETH}
    assert pay.channel(channel).redeemed == 0  # type: ignore[union-attr]


def test_no_double_redeem_and_an_older_voucher_is_worthless(chain: ChainEnv) -> None:
    pay = payments(chain)
    node = payments(chain, NODE)
    channel = _open(chain)
    older, latest = voucher(pay, CLIENT, channel, 100), voucher(pay, CLIENT, channel, 300)
    node.redeem(latest)
    for again in (latest, older):
        with pytest.raises(PaymentChannelsVoucherNotAboveRedeemed) as exc:
            node.redeem(again)
        assert exc.value.values == {"channelId": channel, "cumulativeAmount": again.cumulative_amount, "redeemed": 300}
    node.redeem(voucher(pay, CLIENT, channel, 301))
    assert pay.balances(dev_account(NODE).address).locked == 301


def test_node_redeems_during_the_dispute_delay_and_client_reclaims_after_it(chain: ChainEnv) -> None:
    pay = payments(chain)
    client, node = payments(chain, CLIENT), payments(chain, NODE)
    channel = _open(chain, deposit=10_000)
    with pytest.raises(PaymentChannelsCloseNotStarted):
        client.finish_close(channel)
    started = client.start_close(channel)
    assert started.events == ("ChannelCloseStarted",)
    closes_at = pay.channel(channel).closes_at  # type: ignore[union-attr]
    assert closes_at == chain.now() + pay.dispute_delay()
    with pytest.raises(PaymentChannelsChannelClosing):
        client.top_up(channel, 1)
    with pytest.raises(PaymentChannelsChannelClosing):
        client.start_close(channel)
    with pytest.raises(PaymentChannelsDisputeNotOver) as early:
        client.finish_close(channel)
    assert early.value.closesAt == closes_at

    node.redeem(voucher(pay, CLIENT, channel, 4_000))  # still allowed during the delay
    chain.advance(pay.dispute_delay())
    with pytest.raises(PaymentChannelsChannelClosed) as late:
        node.redeem(voucher(pay, CLIENT, channel, 5_000))
    assert late.value.closesAt == closes_at and late.value.currentTime >= closes_at

    settled = payments(chain, OUTSIDER).finish_close(channel)  # anyone may settle; the refund is the client's
    assert settled.events == ("ChannelSettled",)
    with pytest.raises(PaymentChannelsAlreadySettled):
        client.finish_close(channel)
    assert pay.balances(dev_account(CLIENT).address).withdrawable == 6_000
    assert pay.balances(dev_account(OUTSIDER).address).withdrawable == 0
    before = eth_balance(chain.w3, CLIENT)
    receipt = client.withdraw()
    assert eth_balance(chain.w3, CLIENT) - before + spent(receipt) == 6_000
    with pytest.raises(PaymentChannelsNothingToWithdraw):
        client.withdraw()


def test_batch_redeem_pays_several_channels_in_one_transaction_all_or_nothing(chain: ChainEnv) -> None:
    pay = payments(chain)
    node = payments(chain, NODE)
    clients = (10, 11, 12, 13)
    channels = [_open(chain, deposit=1_000, client=c) for c in clients]
    batch = [voucher(pay, c, ch, 100 * (i + 1)) for i, (c, ch) in enumerate(zip(clients, channels, strict=True))]

    bad = [*batch[:3], voucher(pay, OUTSIDER, channels[3], 400)]
    with pytest.raises(PaymentChannelsInvalidSignature):
        node.redeem_batch(bad)
    assert all(pay.channel(ch).redeemed == 0 for ch in channels)  # type: ignore[union-attr]

    receipt = node.redeem_batch(batch)
    assert receipt.events == ("VoucherRedeemed",) * 4
    assert [pay.channel(ch).redeemed for ch in channels] == [100, 200, 300, 400]  # type: ignore[union-attr]
    assert pay.balances(dev_account(NODE).address).locked == 1_000

    with pytest.raises(PaymentChannelsInvalidBatchSize) as empty:
        node.redeem_batch([])
    assert empty.value.values == {"length": 0, "maxLength": 64}
    with pytest.raises(PaymentChannelsInvalidBatchSize):
        node.redeem_batch([batch[0]] * 65)


def test_redeemed_earnings_stay_locked_for_the_window_then_become_withdrawable(chain: ChainEnv) -> None:
    pay = payments(chain)
    node = payments(chain, NODE)
    node_address = dev_account(NODE).address
    window = pay.verification_window()
    channel = _open(chain)
    node.redeem(voucher(pay, CLIENT, channel, 5_000))
    redeemed_at = chain.now()
    balances = pay.balances(node_address)
    assert balances.locked == 5_000 and balances.withdrawable == 0
    assert redeemed_at + window <= balances.locked_until <= redeemed_at + 2 * window
    with pytest.raises(PaymentChannelsNothingToWithdraw):
        node.withdraw()

    # anvil's clock keeps running between blocks, so stay clear of the boundary by a margin.
    chain.advance(balances.locked_until - chain.now() - 30)
    assert pay.balances(node_address).locked == 5_000
    chain.advance(31)
    released = pay.balances(node_address)
    assert (released.locked, released.withdrawable, released.locked_until) == (0, 5_000, 0)

    # A redeem in a later epoch recycles the released bucket into the withdrawable balance.
    chain.advance(window)
    receipt = node.redeem(voucher(pay, CLIENT, channel, 7_000))
    assert receipt.events == ("VoucherRedeemed", "EarningsReleased")
    after = pay.balances(node_address)
    assert (after.locked, after.withdrawable) == (2_000, 5_000)
    before = eth_balance(chain.w3, NODE)
    receipt = node.withdraw()
    assert eth_balance(chain.w3, NODE) - before + spent(receipt) == 5_000


def test_slashing_takes_what_is_still_locked_and_nothing_released(chain: ChainEnv) -> None:
    pay = payments(chain)
    node = payments(chain, NODE)
    node_address = dev_account(NODE).address
    slasher = payments(chain, SLASHER)
    with pytest.raises(AccessControlUnauthorizedAccount) as denied:
        slasher.slash(node_address, 1, b"\x01" * 32)
    assert denied.value.neededRole == PaymentChannels.SLASHER_ROLE
    payments(chain, OWNER).grant_slasher(dev_account(SLASHER).address)
    assert pay.has_role(PaymentChannels.SLASHER_ROLE, dev_account(SLASHER).address)

    channel = _open(chain)
    node.redeem(voucher(pay, CLIENT, channel, 3_000))
    _release_all(chain)
    node.redeem(voucher(pay, CLIENT, channel, 10_000))  # 7_000 newly locked
    with pytest.raises(PaymentChannelsZeroAmount):
        slasher.slash(node_address, 0, b"\x01" * 32)
    receipt = slasher.slash(node_address, 5_000, b"\x02" * 32)
    assert receipt.events == ("EarningsSlashed",)
    assert pay.balances(node_address).locked == 2_000
    slasher.slash(node_address, 10**18, b"\x03" * 32)  # capped at what is locked
    balances = pay.balances(node_address)
    assert (balances.locked, balances.withdrawable) == (0, 3_000)
    treasury = pay.treasury()
    assert pay.balances(treasury).withdrawable == 7_000
    assert pay.balance() == ETH - 10_000 + 3_000 + 7_000


def test_a_jailed_node_cannot_redeem(chain: ChainEnv) -> None:
    setup = deploy_with_jail_switch(chain, PaymentParams(dispute_delay=60, verification_window=60))
    client = setup.payments.with_account(dev_account(CLIENT))
    node = setup.payments.with_account(dev_account(NODE))
    channel = client.open_channel(dev_account(NODE).address, 1_000).channel_id
    signed = sign_voucher(dev_account(CLIENT), setup.payments.domain(), channel, 500)
    setup.set_jailed(NODE, True)
    with pytest.raises(PaymentChannelsNodeJailed) as exc:
        node.redeem(signed)
    assert exc.value.node == dev_account(NODE).address
    with pytest.raises(PaymentChannelsNodeJailed):
        node.redeem_batch([signed])
    setup.set_jailed(NODE, False)
    node.redeem(signed)
    assert setup.payments.channel(channel).redeemed == 500  # type: ignore[union-attr]


def test_open_and_top_up_refuse_bad_input(chain: ChainEnv) -> None:
    client = payments(chain, CLIENT)
    with pytest.raises(PaymentChannelsInvalidNode):
        client.open_channel(dev_account(CLIENT).address, 1)
    with pytest.raises(PaymentChannelsUnknownChannel):
        client.top_up(42, 1)
    channel = _open(chain, deposit=5)
    with pytest.raises(PaymentChannelsNotClient) as exc:
        payments(chain, OTHER_CLIENT).top_up(channel, 1)
    assert exc.value.client == dev_account(CLIENT).address
    receipt = client.top_up(channel, 7)
    assert receipt.events == ("ChannelToppedUp",)
    assert payments(chain).channel(channel).deposit == 12  # type: ignore[union-attr]
    with pytest.raises(PaymentChannelsNotClient):
        payments(chain, OTHER_CLIENT).start_close(channel)


def test_every_payment_error_in_the_abi_has_its_python_class() -> None:
    from ledger import load_artifact
    from ledger._reverts import REVERT_CLASSES

    names = {i["name"] for i in load_artifact("PaymentChannels").abi if i["type"] == "error"}
    assert names <= set(REVERT_CLASSES)
    ours = {n for n in names if n.startswith("PaymentChannels")}
    assert len(ours) == 19
    assert all(issubclass(REVERT_CLASSES[n], ContractRevert) for n in names)
