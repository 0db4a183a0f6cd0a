"""Paid re-forwarding between separate ``ps-node serve`` processes (protocol §10.5, ``cli/_node_reforward.py``).

Two charging model nodes and four relays as separate processes, registered on an anvil of this module's own. A runs
one request at a time (``NodeSpec.prelude``) with ``--reforward-bound 0``; background clients keep a request waiting
in its engine, marked ``forwarded`` so that A serves them itself. A client that knows only A pays A at A's price;
A, over its bound, re-forwards to the idle B and pays B at B's (lower) price from the wallet ``ps-node serve`` built
from A's own key, its book in ``<A's state>/reforward-wallet``. Afterwards the books are read as an operator would,
through the CLI: ``ps-node earnings`` for both nodes, ``ps-client channels`` over A's re-forwarding wallet; they
agree with each other and with the clients' wallets to the wei.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger import PaymentChannels, connect, dev_account, load_deployment
from node.client import Client, ClientConfig, load_tokenizer
from node.client._registry import RegistryDirectory
from node.client._wallet import Wallet, cost
from node.overlay import CompletionRequest
from node.testing import NodeSpec, ProcessNetwork
from tests._process_net import metric, node_named, only_model, own_chain, process_network
from tests._procs import run_cli

#: Dev accounts: model nodes A and B, four relays, the client, three background clients.
A, B, RELAYS, CLIENT, BACKGROUND = 1, 2, (3, 4, 5, 6), 10, (11, 12, 13)
#: Wei per 1000 tokens: A charges more than B, so the two legs of a re-forwarded request differ.
PRICE_A, PRICE_B = 3 * 10**12, 10**12
#: A's engine runs one request at a time, so requests really wait there.
ONE_AT_A_TIME = (
    "import functools, cli._node_serve as s; from node.inference import EngineConfig; "
    "setattr(s, 'EngineConfig', functools.partial(EngineConfig, max_running=1))"
)
BUSY_PROMPT = "the quick brown fox jumps over the lazy dog; " * 3
TRIES = 6


@pytest.fixture(scope="module")
def chain_here(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with own_chain(tmp_path_factory, accounts=16) as chain:
        yield chain


@pytest.fixture(scope="module")
def network(
    chain_here: tuple[str, Path], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessNetwork]:
    specs = [
        NodeSpec(
            name="a",
            role="model",
            account_index=A,
            stake_wei=2 * 10**18,
            price_per_1k_tokens=PRICE_A,
            prelude=ONE_AT_A_TIME,
        ),
        NodeSpec(name="b", role="model", account_index=B, stake_wei=2 * 10**18, price_per_1k_tokens=PRICE_B),
    ]
    specs += [NodeSpec(name=f"relay-{i}", role="relay", account_index=i, stake_wei=2 * 10**17) for i in RELAYS]
    env = {"PS_REFORWARD_BOUND": "0", "PS_REFORWARD_BUDGET": "0.01", "PS_REFORWARD_DEPOSIT": "0.001"}
    with process_network(chain_here, tiny_model_dir, tmp_path_factory, specs, extra_env=env) as net:
        yield net


def _cli_json(tool: str, args: list[str], key_index: int, chain: tuple[str, Path]) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(PS_PRIVATE_KEY="0x" + bytes(dev_account(key_index).key).hex(), PS_RPC_URL=chain[0])
    env["PS_DEPLOYMENT"] = str(chain[1])
    done = run_cli(tool, [*args, "--json"], env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_a_re_forwarding_node_pays_the_charging_peer_from_its_own_wallet_and_the_books_agree(
    network: ProcessNetwork, chain_here: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Everything opened here (wallets and their locks, registry indexes) is closed however the test ends.
    with contextlib.ExitStack() as owned:
        rpc_url, deployment = chain_here
        a, b = node_named(network, "a"), node_named(network, "b")
        pay = PaymentChannels(connect(rpc_url), load_deployment(deployment).payments_address)
        tokenizer = load_tokenizer(tiny_model_dir)
        config = ClientConfig(paths=4, hops=1, heartbeats=False)

        def wallet(index: int) -> Wallet:
            made = Wallet(
                pay, dev_account(index), budget_wei=10**16, deposit_wei=10**15, state_dir=tmp_path / str(index)
            )
            owned.callback(made.close)
            return made

        def directory(name: str) -> RegistryDirectory:
            made = RegistryDirectory(rpc_url, deployment=deployment, db_url=f"sqlite:///{tmp_path / name}.sqlite")
            owned.callback(made.close)
            return made

        indexes = [directory(f"bg-{i}") for i in BACKGROUND]
        background = [
            Client(only_model(index, a.operator), config, tokenizer=tokenizer, wallet=wallet(i))
            for index, i in zip(indexes, BACKGROUND, strict=True)
        ]
        client_index = directory("client")
        client = Client(only_model(client_index, a.operator), config, tokenizer=tokenizer, wallet=wallet(CLIENT))
        stop = asyncio.Event()

        async def keep_busy(busy: Client) -> None:
            request = CompletionRequest(
                model=a.model_id, prompt=BUSY_PROMPT, max_tokens=96, temperature=0.0, forwarded=True
            )
            while not stop.is_set():
                await busy.complete(request)

        tasks = [asyncio.create_task(keep_busy(c)) for c in background]
        relayed: list[int] = []  # tokens of each request of the client that B served through A
        served_here: list[int] = []
        peer = 'planetserve_reforwards_total{outcome="served_by_peer"}'
        try:
            async with asyncio.timeout(300):
                while await metric(a.endpoint, "planetserve_engine_queued_requests") < 1:
                    await asyncio.sleep(0.1)
                for i in range(TRIES):
                    before = await metric(a.endpoint, peer)
                    request = CompletionRequest(model=a.model_id, prompt=f"{i}+1=", max_tokens=4, temperature=0.0)
                    result = await client.complete(request)
                    used = result.prompt_tokens + result.completion_tokens
                    (relayed if await metric(a.endpoint, peer) > before else served_here).append(used)
                    if len(relayed) >= 2:
                        break
                stop.set()
                await asyncio.gather(*tasks)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            for c in background:
                await c.close()
        assert relayed, f"A never re-forwarded ({len(served_here)} served by A itself)"
        assert await metric(a.endpoint, 'planetserve_reforwards_total{outcome="broken"}') == 0
        assert client.wallet is not None
        client_channel = client.wallet.channel(a.operator)
        assert client_channel is not None
        # The client paid A at A's price for every request, B's answers included (on B's token counts).
        assert client_channel.owed == sum(cost(PRICE_A, used) for used in relayed + served_here)
        background_owed = 0
        for c in background:
            assert c.wallet is not None
            channel = c.wallet.channel(a.operator)
            background_owed += channel.owed if channel is not None else 0
        expected_b = sum(cost(PRICE_B, used) for used in relayed)

        def books() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            earned_a = _cli_json("node", ["earnings", "--state-dir", str(a.state_dir)], A, chain_here)
            earned_b = _cli_json("node", ["earnings", "--state-dir", str(b.state_dir)], B, chain_here)
            wallet_a = _cli_json(
                "client", ["channels", "--state-dir", str(a.state_dir / "reforward-wallet")], A, chain_here
            )
            return earned_a, earned_b, wallet_a

        async with asyncio.timeout(60):  # the nodes close their books just after their last delta
            while True:
                earned_a, earned_b, wallet_a = await asyncio.to_thread(books)
                if int(earned_b["served_wei"]) == expected_b and int(earned_a["served_wei"]) == (
                    client_channel.owed + background_owed
                ):
                    break
                await asyncio.sleep(0.5)
        # B was paid only by A, on one channel, exactly what A's own wallet says it spent there.
        assert earned_b["channels"] == 1
        (channel_to_b,) = wallet_a["channels"]
        assert wallet_a["client"] == a.operator == channel_to_b["payer"]
        assert channel_to_b["node"] == b.operator
        assert int(channel_to_b["spent_wei"]) == expected_b == int(earned_b["served_wei"])
        assert int(channel_to_b["deposit_wei"]) <= 10**16  # within the node's --reforward-budget
        # A earned what its clients owe it; it keeps the difference of the two prices on the relayed requests.
        assert int(earned_a["served_wei"]) == client_channel.owed + background_owed
        print(f"re-forwarded {len(relayed)} of {len(relayed) + len(served_here)}; B earned {expected_b} wei from A")
