"""``ps-node serve`` and ``ps-client ask`` as users run them: separate processes, registered on a real anvil, a
private request over 4 onion paths of 3 relays, clean shutdown on SIGTERM, one clear line for bad input."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.exit_codes import ExitCode
from ledger import Role, model_id
from ledger._anvil import free_port
from node import NodeIdentity
from node.inference import EngineConfig, GenerationRequest, SamplingParams, TorchEngine, read_info
from tests._cli import assert_failed, cli_env, ok_json, serve_ready, spawn_serve
from tests._procs import run_cli
from tests.fixtures.chain import ChainEnv

PROMPT = "3+4=7\n10+5="


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _local_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    async def run() -> str:
        engine = TorchEngine.from_folder(model_dir, EngineConfig(device="cpu"))
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            request = GenerationRequest(request_id="local", prompt=prompt, params=params)
            return "".join([chunk.text async for chunk in engine.generate(request)])
        finally:
            await engine.close()

    return asyncio.run(run())


def test_served_nodes_answer_a_private_request_and_stop_cleanly(
    chain: ChainEnv, tiny_model_dir: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    info = read_info(tiny_model_dir)
    assert info is not None
    model = f"{info.name}@{info.revision}"
    roles = ["model", "relay", "relay", "relay"]
    for index, role in enumerate(roles):
        # The nodes read the registry themselves: a relay forwards only to nodes registered there.
        # The model node holds its operator key (dev account 1): it signs heartbeats and charges its registered price.
        key = 1 if role == "model" else None
        env = cli_env(chain, tmp_path, key, PS_STATE_DIR=str(tmp_path / f"node-{index}"))
        args = ["serve", "--role", role, "--port", "0", "--json"]
        if role == "model":
            args += ["--engine", "torch", "--device", "cpu", "--model-dir", str(tiny_model_dir)]
        processes.append(spawn_serve(args, env))
    ready = [serve_ready(proc) for proc in processes]
    assert ready[0]["model_id"] == info.model_id and ready[0]["engine"] == "TorchEngine"
    for index, (role, node) in enumerate(zip(roles, ready, strict=True), start=1):
        assert node["role"] == role and node["endpoint"].startswith("http://127.0.0.1:")
        assert node["dial_private_addresses"] is True  # listening on loopback: its peers are on this host too
        chain.registry(index).register(
            role=Role.MODEL if role == "model" else Role.RELAY,
            endpoint=node["endpoint"],
            x25519_public_key=bytes.fromhex(node["x25519_public_key"][2:]),
            model_id=model_id(model) if role == "model" else None,
            price_per_1k_tokens=1000,
            stake=10**18,
        )

    # A fourth relay is registered but down (nothing listens at its endpoint). 4 paths of 3 over 4 relays put it on
    # 3 paths, so the first route always fails before any reply and the client must re-route around it.
    dead_port = free_port()  # bound and released at once: nothing listens there
    chain.registry(5).register(
        role=Role.RELAY,
        endpoint=f"http://127.0.0.1:{dead_port}",
        x25519_public_key=NodeIdentity.load_or_create(tmp_path / "dead-relay").public_key,
        model_id=None,
        price_per_1k_tokens=0,
        stake=10**18,
    )
    # The client pays from its own key (dev account 7): each request carries a voucher inside its sealed envelope.
    client_env = cli_env(chain, tmp_path, 7, PS_INDEX_DB=f"sqlite:///{tmp_path / 'client.sqlite'}")
    ask = ["ask", PROMPT, "--model", model, "--max-tokens", "6", "--paths", "4", "--hops", "3", "--json"]
    # Each relay re-reads the registry on a miss at most every 2 s (RegistryPeerDirectory): the nodes registered a
    # moment ago become resolvable by then, as the docs promise, and not necessarily sooner.
    time.sleep(2.5)
    answer = ok_json(run_cli("client", ask, client_env))
    assert answer["routes_tried"] == 2
    assert answer["text"] == _local_greedy(tiny_model_dir, PROMPT, 6)
    assert answer["completion_tokens"] >= 1 and answer["finish_reason"] in ("stop", "length")
    relay_operators = {chain.account(i).address for i in (2, 3, 4)}
    assert len(answer["paths"]) == 4 and all(set(path) == relay_operators for path in answer["paths"])
    assert answer["model_node"] == chain.account(1).address

    # Plain output streams the text itself; with the model's tokenizer the client hashes the prompt's chunks itself.
    plain = run_cli("client", [*ask[:-1], "--tokenizer", str(tiny_model_dir)], client_env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.rstrip("\n") == answer["text"]

    # The model node was paid for both answers, in its own voucher book; without a key the client gets a clear refusal.
    node_env = cli_env(chain, tmp_path, 1, PS_STATE_DIR=str(tmp_path / "node-0"))
    earned = ok_json(run_cli("node", ["earnings", "--json"], node_env))
    # One channel: the second `ps-client ask` (another process) continued the first one's, from the wallet's book.
    assert earned["channels"] == 1 and int(earned["served_wei"]) > 0
    unpaid = run_cli("client", ask, {k: v for k, v in client_env.items() if k != "PS_PRIVATE_KEY"})
    assert unpaid.returncode != 0 and "payment_required" in unpaid.stderr

    unknown = run_cli("client", ["ask", PROMPT, "--model", "other-model@v1"], client_env)
    assert_failed(unknown, ExitCode.NETWORK_ERROR, "no routable model node")

    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    for proc in processes:
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and "stopped" in proc.stderr.read()
    # Every node kept the replay tags of the packets it accepted, for its next start: 8-byte header + 20 per tag.
    for index in range(len(processes)):
        journal = tmp_path / f"node-{index}" / "replay.journal"
        assert journal.stat().st_size > 8 and (journal.stat().st_size - 8) % 20 == 0


def test_serve_refuses_bad_configuration_with_one_line(tmp_path: Path) -> None:
    env = cli_env(None, tmp_path, None)
    no_model = run_cli("node", ["serve", "--role", "model", "--port", "0"], env)
    assert_failed(no_model, ExitCode.INVALID_INPUT, "model_dir")
    missing = run_cli(
        "node", ["serve", "--role", "model", "--model-dir", str(tmp_path / "absent"), "--engine", "torch"], env
    )
    assert_failed(missing, ExitCode.MODEL_ERROR, "absent")
    bad_role = run_cli("node", ["serve", "--role", "verifier"], env)
    assert_failed(bad_role, ExitCode.INVALID_INPUT, "role")
    bad_engine = run_cli("node", ["serve", "--role", "model", "--model-dir", str(tmp_path), "--engine", "vllm"], env)
    assert_failed(bad_engine, ExitCode.INVALID_INPUT, "engine")


def test_serve_on_a_busy_port_is_one_line_and_port_in_use(tmp_path: Path) -> None:
    import socket

    env = cli_env(None, tmp_path, None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        relay = run_cli("node", ["serve", "--role", "relay", "--port", str(port)], env)
        assert_failed(relay, ExitCode.PORT_IN_USE, f"port {port}", "--port")
        as_json = run_cli("node", ["serve", "--role", "relay", "--port", str(port), "--json"], env)
    assert as_json.returncode == ExitCode.PORT_IN_USE and as_json.stdout == ""
    err = json.loads(as_json.stderr.strip().splitlines()[-1])["error"]
    assert err["type"] == "PortInUse" and err["port"] == port and err["exit_name"] == "PORT_IN_USE"


def test_ask_rejects_bad_input_before_touching_the_network(tmp_path: Path) -> None:
    env = cli_env(None, tmp_path, None, PS_RPC_URL="http://127.0.0.1:9")
    assert_failed(run_cli("client", ["ask", "hi", "--model", "not a model"], env), ExitCode.INVALID_INPUT, "model")
    assert_failed(
        run_cli("client", ["ask", "hi", "--model", "m@v1", "--temperature", "3"], env),
        ExitCode.INVALID_INPUT,
        "temperature",
    )
    assert_failed(run_cli("client", ["ask", "", "--model", "m@v1"], env), ExitCode.INVALID_INPUT, "prompt")
    no_tries = run_cli("client", ["ask", "hi", "--model", "m@v1", "--attempts", "0"], env)
    assert_failed(no_tries, ExitCode.INVALID_INPUT, "attempts")
    assert_failed(
        run_cli("client", ["ask", "hi", "--model", "m@v1", "--paths", "2", "--threshold", "3"], env),
        ExitCode.INVALID_INPUT,
    )
    assert_failed(run_cli("client", ["ask", "hi", "--model", "m@v1"], env), ExitCode.CHAIN_UNAVAILABLE)


def test_a_relay_told_not_to_dial_private_addresses_says_so(chain: ChainEnv, tmp_path: Path) -> None:
    """``--no-dial-private-addresses`` overrides the loopback default (what a node serving the internet runs with:
    a registrant's endpoint naming its own network is then refused at connect time, tests/test_abuse_overlay.py)."""
    env = cli_env(chain, tmp_path, None)
    proc = spawn_serve(["serve", "--role", "relay", "--port", "0", "--json", "--no-dial-private-addresses"], env)
    try:
        assert serve_ready(proc)["dial_private_addresses"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()
