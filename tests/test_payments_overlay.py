"""Paying per request over the overlay (protocol §10.4), live: a real anvil with ``PaymentChannels``, a model node
with a real torch engine behind a ``PaymentGate`` and a SQLite voucher store, six relays on 127.0.0.1, and a
``Client`` with a ``Wallet``.

What is proven: N paid requests then one redeem move exactly the spec's amounts to the wei; a request without a
voucher and forged, wrong-chain, wrong-contract, wrong-channel, underpaid, underfunded, replayed and stale vouchers are
refused with their code before the engine runs (a counting engine, the gate's direct neighbour, says so); a node
stopped between answering and redeeming redeems everything after a restart from its SQLite file; the v2 vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError
from web3 import Web3

from ledger import AcceptedVoucher, Voucher, VoucherDomain, VoucherStore, Wei, dev_account, sign_voucher
from node.client import Client, ClientConfig, OverlayTransport
from node.client._wallet import Wallet, WalletExhausted, cost
from node.inference import TorchEngine
from node.overlay import (
    ClientSettings,
    CompletionDelta,
    CompletionError,
    CompletionRequest,
    Directory,
    ModelNode,
    ReplyIncomplete,
    Route,
)
from node.overlay._completion import _first_error, completion_handler
from node.overlay._payments import PaymentGate
from node.testing import LocalNetwork
from tests._cli import InProcess, cli_env, ok_json
from tests._paid_net import CLIENT as CLIENT  # re-exported: see the note below
from tests._paid_net import NODE as NODE
from tests._paid_net import OTHER_NODE as OTHER_NODE
from tests._paid_net import PRICE as PRICE
from tests._paid_net import PROMPTS as PROMPTS
from tests._paid_net import PaidNet as PaidNet
from tests._paid_net import paid_request, start_paid_net, voucher_store
from tests.fixtures.chain import OUTSIDER, ChainEnv
from tests.fixtures.payments import eth_balance, payments

VECTORS = Path(__file__).parent / "vectors" / "completion_v2.json"

#: What the test modules other engineers own still import from here (``tests/test_client_wallet*.py``): the harness
#: lives in ``tests/_paid_net.py``; drop these names once no module imports them from here.
_start = start_paid_net
_request = paid_request


class SlowSettleStore(VoucherStore):
    """The real store, taking 0.3 s longer to settle (a slow disk): widens the window between the answer's last
    line and the charge, if there is one."""

    def settle(self, accepted: AcceptedVoucher, used_tokens: int) -> Wei:
        time.sleep(0.3)
        return super().settle(accepted, used_tokens)


def _wallet(chain: ChainEnv, budget: int = 10**15, deposit: int = 10**14) -> Wallet:
    return Wallet(payments(chain), dev_account(CLIENT), budget_wei=budget, deposit_wei=deposit)


def _client(paid: PaidNet, wallet: Wallet | None) -> Client:
    config = ClientConfig(heartbeats=False, attempts=1)
    return Client(paid.directory(), config, tokenizer=paid.engine.tokenize, wallet=wallet)


async def _pay_for(paid: PaidNet, client: Client, prompts: Sequence[str]) -> tuple[int, int]:
    """Serve ``prompts`` through ``client`` and return (expected latest voucher, expected owed) by the spec's rule,
    computed here from the node's tokenizer and the answers' usage."""
    last = owed = 0
    for prompt in prompts:
        request = paid_request(paid, prompt)
        reservation = cost(PRICE, len(paid.engine.tokenize(prompt)) + request.max_tokens)
        last = max(last + 1, owed + reservation)
        done = await client.complete(request)
        owed += -(-PRICE * (done.prompt_tokens + done.completion_tokens) // 1000)
    return last, owed


async def test_n_paid_requests_and_one_redeem_are_exact_to_the_wei(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db")
    wallet = _wallet(chain)
    client_before = eth_balance(chain.w3, CLIENT)
    try:
        async with _client(paid, wallet) as client:
            latest, owed = await _pay_for(paid, client, PROMPTS)
        assert paid.engine.generated == len(PROMPTS)
        (state,) = wallet.channels()
        assert (state.last, state.owed, state.in_flight, state.deposit) == (latest, owed, 0, 10**14)
        book = paid.store.book(state.channel_id)
        assert book is not None
        assert (book.latest.cumulative_amount, book.owed, book.reserved) == (latest, owed, 0)
        # What the node can take beyond what it served: at most the last request's unused reservation.
        last_reservation = cost(PRICE, len(paid.engine.tokenize(PROMPTS[-1])) + 4)
        assert 0 <= latest - owed < last_reservation
        pay = payments(chain)
        opened = pay.channel(state.channel_id)
        assert opened is not None and opened.deposit == 10**14 and opened.client == dev_account(CLIENT).address
        # The client paid the deposit and the open's gas, nothing else: vouchers cost no gas.
        gas = client_before - eth_balance(chain.w3, CLIENT) - 10**14
        assert 0 < gas < 10**16
        redeemable = paid.store.redeemable()
        assert [v.cumulative_amount for v in redeemable] == [latest]
        node_pay = payments(chain, NODE)
        locked_before = node_pay.balances(dev_account(NODE).address).locked
        node_pay.redeem_batch(redeemable)
        paid.store.mark_redeemed(redeemable)
        after = pay.channel(state.channel_id)
        assert after is not None and after.redeemed == latest
        assert node_pay.balances(dev_account(NODE).address).locked - locked_before == latest
        assert paid.store.redeemable() == []
    finally:
        await paid.close()


async def test_bad_vouchers_are_refused_with_their_code_and_the_engine_never_runs(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db")
    wallet = _wallet(chain)
    pay = payments(chain)
    client_account = dev_account(CLIENT)
    try:
        async with _client(paid, wallet) as client:
            await client.complete(paid_request(paid, PROMPTS[0]))  # one paid request: the channel has a latest voucher
        assert paid.engine.generated == 1
        (state,) = wallet.channels()
        channel, accepted = state.channel_id, state.last
        other = payments(chain, CLIENT).open_channel(dev_account(OTHER_NODE).address, 10**14).channel_id
        domain = pay.domain()

        def signed(amount: int, *, on: int = channel, dom: VoucherDomain = domain, by: int = CLIENT) -> Voucher:
            return sign_voucher(dev_account(by), dom, on, amount)

        big = accepted + 10**12
        other_chain = VoucherDomain(chain_id=domain.chain_id + 1, contract=domain.contract)
        other_contract = VoucherDomain(chain_id=domain.chain_id, contract=client_account.address)
        cases: list[tuple[Voucher | None, str]] = [
            (None, "payment_required"),
            (signed(big, dom=other_chain), "voucher_wrong_chain"),
            (signed(big, dom=other_contract), "voucher_wrong_contract"),
            (signed(big, on=other), "voucher_wrong_channel"),
            (signed(big, on=pay.next_channel_id() + 5), "voucher_wrong_channel"),
            (signed(big, by=OUTSIDER), "voucher_forged"),
            (signed(accepted), "voucher_replayed"),
            (signed(accepted - 1), "voucher_stale"),
            (signed(accepted + 1), "voucher_underpaid"),
            (signed(10**14 + 1), "voucher_underfunded"),
        ]
        async with _client(paid, None) as bare:
            for bad, code in cases:
                request = paid_request(paid, PROMPTS[1])
                if bad is not None:
                    request = request.with_voucher(bad.to_json())
                with pytest.raises(CompletionError) as refused:
                    await bare.complete(request)
                assert refused.value.code == code
                assert paid.engine.generated == 1, code
        book = paid.store.book(channel)
        assert book is not None and book.latest.cumulative_amount == accepted and book.reserved == 0
        # The channel still works with the wallet's next voucher.
        async with _client(paid, wallet) as client:
            await client.complete(paid_request(paid, PROMPTS[2]))
        assert paid.engine.generated == 2
    finally:
        await paid.close()


async def test_a_node_stopped_before_redeeming_redeems_everything_after_a_restart(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "vouchers.db"
    paid = await start_paid_net(chain, tiny_model_dir, db)
    wallet = _wallet(chain)
    async with _client(paid, wallet) as client:
        latest, owed = await _pay_for(paid, client, PROMPTS[:3])
    await paid.stop()  # gone between answering and redeeming; its book is closed with it
    restarted = await start_paid_net(chain, tiny_model_dir, db, net=paid.net)
    try:
        (state,) = wallet.channels()
        book = restarted.store.book(state.channel_id)
        assert book is not None and (book.latest.cumulative_amount, book.owed) == (latest, owed)
        redeemable = restarted.store.redeemable()
        payments(chain, NODE).redeem_batch(redeemable)
        restarted.store.mark_redeemed(redeemable)
        after = payments(chain).channel(state.channel_id)
        assert after is not None and after.redeemed == latest
        # And it keeps serving the same channel after the restart.
        async with _client(restarted, wallet) as client:
            await client.complete(paid_request(restarted, PROMPTS[3]))
        assert restarted.engine.generated == 1
    finally:
        await restarted.close()


async def test_a_wallet_never_spends_beyond_its_budget(chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path) -> None:
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db")
    wallet = _wallet(chain, budget=1_000, deposit=1_000)  # far below one request's reservation
    before = eth_balance(chain.w3, CLIENT)
    try:
        async with _client(paid, wallet) as client:
            with pytest.raises(WalletExhausted):
                await client.complete(paid_request(paid, PROMPTS[0]))
        assert wallet.channels() == [] and wallet.spent_wei == 0
        assert eth_balance(chain.w3, CLIENT) == before and paid.engine.generated == 0
    finally:
        await paid.close()


class FirstTryFailsEarly:
    """The real overlay transport, except that the first send fails before any path answered (as a dead first
    relay on every path would): the destination never sees that request."""

    def __init__(self) -> None:
        self.inner = OverlayTransport(ClientSettings(n=4))
        self.failed: list[str] = []

    def send(self, request: CompletionRequest, route: Route) -> AsyncIterator[CompletionDelta]:
        if not self.failed:
            self.failed.append(route.destination.operator)
            return self._fail()
        return self.inner.send(request, route)

    async def _fail(self) -> AsyncIterator[CompletionDelta]:
        raise ReplyIncomplete(paths=4, received=0, failed_early=(0, 1, 2, 3))
        yield  # pragma: no cover - makes this an async generator

    async def fetch_heartbeat(self, endpoint: str) -> bytes:
        return await self.inner.fetch_heartbeat(endpoint)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_retry_on_another_node_never_pays_twice(chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path) -> None:
    first = await start_paid_net(chain, tiny_model_dir, tmp_path / "a.db")
    second = await start_paid_net(chain, tiny_model_dir, tmp_path / "b.db", net=first.net, node_index=OTHER_NODE)
    nodes = {p.served().operator: p for p in (first, second)}
    wallet = _wallet(chain)
    transport = FirstTryFailsEarly()
    directory = Directory(relays=tuple(first.net.descriptors()), model_nodes=tuple(p.served() for p in nodes.values()))
    config = ClientConfig(heartbeats=False, attempts=2)
    try:
        async with Client(
            directory, config, transport=transport, tokenizer=first.engine.tokenize, wallet=wallet
        ) as client:
            done = await client.complete(paid_request(first, PROMPTS[0]))
        failed, served = nodes[transport.failed[0]], next(p for o, p in nodes.items() if o != transport.failed[0])
        assert (failed.engine.generated, served.engine.generated) == (0, 1)
        charged = cost(PRICE, done.prompt_tokens + done.completion_tokens)
        by_node = {c.node: c for c in wallet.channels()}
        unseen, paid = by_node[failed.served().operator], by_node[served.served().operator]
        assert (unseen.owed, unseen.in_flight) == (0, 0)  # signed, never delivered, never counted
        assert failed.store.book(unseen.channel_id) is None and failed.store.redeemable() == []
        assert (paid.owed, paid.in_flight) == (charged, 0)
        book = served.store.book(paid.channel_id)
        assert book is not None and book.owed == charged
        assert [v.cumulative_amount for v in served.store.redeemable()] == [paid.last]
    finally:
        await second.stop()
        await first.close()


def test_vouchers_and_requests_are_redacted_in_reprs(chain: ChainEnv) -> None:
    v = sign_voucher(dev_account(CLIENT), payments(chain).domain(), 1, 12345)
    request = CompletionRequest(model="0x" + "ab" * 32, prompt="secret prompt").with_voucher(v.to_json())
    signature = v.signature.hex()
    for shown in (repr(request), str(request), repr(request.voucher), str(request.voucher)):
        assert signature not in shown and "secret prompt" not in shown
    assert signature in request.to_bytes().decode()  # it does travel, sealed, to the destination
    assert "voucher" not in CompletionRequest(model="0x" + "ab" * 32, prompt="p").to_bytes().decode()


def test_v2_request_vectors() -> None:
    vectors = json.loads(VECTORS.read_text())
    for case in vectors["accept"]:
        request = CompletionRequest.from_bytes(json.dumps(case["body"]).encode())
        assert (request.voucher.to_json() if request.voucher else None) == case["voucher"], case["name"]
        assert json.loads(request.to_bytes()) == {**case["body"], "stop": case["body"]["stop"]}, case["name"]
    assert len(vectors["reject"]) >= 10
    for case in vectors["reject"]:
        with pytest.raises(ValidationError) as exc:
            CompletionRequest.from_bytes(json.dumps(case["body"]).encode())
        assert _first_error(exc.value)[0] == case["param"], case["name"]


def test_a_paying_gate_needs_a_price(chain: ChainEnv, tmp_path: Path) -> None:
    from ledger import InvalidChainInput

    with pytest.raises(InvalidChainInput), voucher_store(chain, tmp_path / "v.db") as store:
        PaymentGate(store, price_per_1k_tokens=0, tokenize=lambda _t: [])


async def test_ps_node_earnings_and_claim(
    chain: ChainEnv,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "vouchers.db"
    paid = await start_paid_net(chain, tiny_model_dir, db)
    wallet = _wallet(chain)
    try:
        async with _client(paid, wallet) as client:
            latest, owed = await _pay_for(paid, client, PROMPTS[:2])
    finally:
        await paid.close()
    inproc = InProcess(monkeypatch, capsys)
    env = cli_env(chain, tmp_path, NODE, PS_VOUCHERS_DB=f"sqlite:///{db}")
    shown = ok_json(inproc("node", ["earnings", "--json"], env))
    assert shown["channels"] == 1 and shown["served_wei"] == str(owed) and shown["vouchers_wei"] == str(latest)
    assert (shown["redeemed_wei"], shown["unredeemed_wei"], shown["locked_wei"]) == ("0", str(latest), "0")
    claimed = ok_json(inproc("node", ["claim", "--json"], env))
    assert claimed["claimed_wei"] == str(latest) and claimed["channels"] == 1 and len(claimed["transactions"]) == 1
    shown = ok_json(inproc("node", ["earnings", "--json"], env))
    assert (shown["redeemed_wei"], shown["unredeemed_wei"], shown["locked_wei"]) == (str(latest), "0", str(latest))
    again = ok_json(inproc("node", ["claim", "--json"], env))
    assert again == {"claimed_wei": "0", "channels": 0, "transactions": []}  # no double redeem
    (state,) = wallet.channels()
    channel = payments(chain).channel(state.channel_id)
    assert channel is not None and channel.redeemed == latest


async def test_a_request_failing_after_acceptance_is_charged_only_what_was_processed(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db")
    wallet = _wallet(chain)
    too_long = "the quick brown fox jumps " * 300  # well over the tiny model's 1024-token context
    try:
        async with _client(paid, wallet) as client:
            with pytest.raises(CompletionError) as failed:
                await client.complete(paid_request(paid, too_long))
            assert failed.value.code == "invalid_params"
            (state,) = wallet.channels()
            book = paid.store.book(state.channel_id)
            # Accepted (the voucher is the channel's latest), then charged nothing: no delta was sent.
            assert book is not None and book.latest.cumulative_amount == state.last > 0
            assert (book.owed, book.reserved, state.owed, state.in_flight) == (0, 0, 0, 0)
            _, owed = await _pay_for(paid, client, PROMPTS[:1])  # the books agree: the next voucher is accepted
        book = paid.store.book(state.channel_id)
        assert book is not None and book.owed == owed and wallet.channels()[0].owed == owed
    finally:
        await paid.close()


async def test_a_free_node_ignores_a_voucher_and_serves(chain: ChainEnv, torch_engine: TorchEngine) -> None:
    async with LocalNetwork(relays=6, handler=completion_handler(torch_engine)) as net:
        free = ModelNode(
            operator=Web3.to_checksum_address(net.destination.node_id),
            endpoint=net.destination.endpoint,
            public_key=net.destination.public_key,
            model_id=torch_engine.model_id,
            price_per_1k_tokens=0,
        )
        directory = Directory(relays=tuple(net.descriptors()), model_nodes=(free,))
        bogus = sign_voucher(dev_account(OUTSIDER), payments(chain).domain(), 999, 1)
        request = CompletionRequest(model=torch_engine.model_id, prompt="hello", max_tokens=2, temperature=0.0)
        async with Client(directory, ClientConfig(heartbeats=False)) as client:
            done = await client.complete(request.with_voucher(bogus.to_json()))
        assert done.completion_tokens >= 1
        wallet = _wallet(chain)
        async with Client(directory, ClientConfig(heartbeats=False), wallet=wallet) as client:
            await client.complete(request)
        assert wallet.channels() == [] and wallet.spent_wei == 0  # a free node gets no channel, no voucher


async def test_the_charge_is_committed_before_the_last_line_so_back_to_back_requests_are_accepted(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A consumer that stops at the final delta (as the OpenAI endpoint's stream does) or at an error line sends its
    next voucher at once: the node must have charged the previous request by then."""
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db", kind=SlowSettleStore)
    wallet = _wallet(chain)
    too_long = "the quick brown fox jumps " * 300
    try:
        async with _client(paid, wallet) as client:
            for prompt in (PROMPTS[0], too_long, PROMPTS[1]):
                try:
                    async with contextlib.aclosing(client.stream(paid_request(paid, prompt))) as stream:
                        async for delta in stream:
                            if delta.finish_reason is not None:
                                break
                except CompletionError as exc:
                    assert exc.code == "invalid_params"
                (state,) = wallet.channels()
                book = paid.store.book(state.channel_id)
                assert book is not None and (book.reserved, book.owed) == (0, state.owed), prompt[:20]
        assert paid.engine.generated == 3
    finally:
        await paid.close()


async def test_concurrent_requests_to_one_node_are_all_accepted(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Vouchers are signed in increasing order; the wallet admits one request per channel at a time (until the
    node answered its first delta), so a later voucher never overtakes an earlier one on the way (voucher_stale)."""
    paid = await start_paid_net(chain, tiny_model_dir, tmp_path / "vouchers.db")
    wallet = _wallet(chain)
    try:
        async with _client(paid, wallet) as client:
            done = await asyncio.gather(*(client.complete(paid_request(paid, p)) for p in PROMPTS * 2))
        (state,) = wallet.channels()
        owed = sum(cost(PRICE, d.prompt_tokens + d.completion_tokens) for d in done)
        book = paid.store.book(state.channel_id)
        assert book is not None and (book.owed, book.reserved) == (owed, 0) == (state.owed, state.in_flight)
        assert paid.engine.generated == len(PROMPTS) * 2
    finally:
        await paid.close()


def test_a_model_node_gate_uses_its_registered_price(chain: ChainEnv, tmp_path: Path) -> None:
    from cli._node_pay import payment_gate
    from ledger import Role, model_id

    def gate() -> PaymentGate | None:
        db = f"sqlite:///{tmp_path / 'v.db'}"
        address = dev_account(NODE).address
        return payment_gate(chain.rpc_url, chain.deployment_path, tmp_path, db, address, lambda t: [0] * len(t))

    assert gate() is None  # not registered: nothing to charge for
    chain.registry(NODE).register(
        role=Role.MODEL,
        endpoint="http://127.0.0.1:9001",
        x25519_public_key=bytes(range(1, 33)),
        model_id=model_id("tiny-llama@v1"),
        price_per_1k_tokens=PRICE,
        stake=10**18,
    )
    registered = gate()
    assert registered is not None and registered.price_per_1k_tokens == PRICE
    registered.store.close()
    chain.registry(NODE).update(
        endpoint="http://127.0.0.1:9001", x25519_public_key=bytes(range(1, 33)), price_per_1k_tokens=0
    )
    assert gate() is None  # a free node serves without a gate
