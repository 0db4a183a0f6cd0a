"""``ps-node`` chain commands and ``ps-chain up`` as users run them: subprocesses, exit codes, JSON on stdout."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from cli.exit_codes import ExitCode
from ledger import connect, dev_account
from ledger._anvil import free_port
from tests._cli import OPERATOR, REGISTER, assert_failed, cli_env, ok_json
from tests._cli import InProcess as InProcess  # re-exported: see the note below
from tests._procs import read_json_object, run_cli, spawn_cli
from tests.fixtures.chain import TEST_PARAMS, ChainEnv

#: What the test modules other engineers own still import from here (``tests/test_client_wallet*.py``): the helpers
#: live in ``tests/_cli.py`` and ``tests/_procs.py``; drop these names once no module imports them from here.
_env = cli_env
_ok_json = ok_json
_failed = assert_failed
_run = run_cli


def test_register_stake_unbond_withdraw_through_the_cli(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inproc = InProcess(monkeypatch, capsys)
    env = cli_env(chain, tmp_path)
    address = dev_account(OPERATOR).address
    reg = ok_json(run_cli("node", [*REGISTER, "--price", "1500", "--stake", "1.5", "--json"], env))
    assert reg["operator"] == address and reg["role"] == "model" and reg["active"] is True
    assert reg["stake_wei"] == str(15 * 10**17) and reg["events"] == ["NodeRegistered"]
    key_file = tmp_path / "node-state" / "x25519.key"
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    from node import NodeIdentity

    assert reg["x25519_public_key"] == "0x" + NodeIdentity.load_or_create(tmp_path / "node-state").public_key.hex()

    added = ok_json(inproc("node", ["stake", "add", "0.5", "--json"], env))
    assert added["stake_wei"] == str(2 * 10**18)
    status = ok_json(inproc("node", ["status", "--json"], env))
    assert status["registered"] and status["stake_eth"] == "2" and status["reputation"] == 500_000
    listed = ok_json(inproc("node", ["list", "--json"], env))
    assert [(n["operator"], n["status"]) for n in listed] == [(address, "active")]

    unbond = ok_json(inproc("node", ["unbond", "--json"], env))
    assert unbond["unbonding_ends_at"] > 0
    assert unbond["unbonding"].startswith("unbonding ends in 1h 0m (20") and unbond["unbonding"].endswith(" UTC)")
    # Times read as a duration on the chain's clock and a UTC date, not as raw Unix seconds.
    line = assert_failed(
        run_cli("node", ["withdraw"], env), ExitCode.TX_REVERTED, "NodeRegistryUnbondingNotFinished(", address
    )
    assert f"unbondingEndsAt=in 1h 0m ({unbond['unbonding'].split('(')[1]}" in line and "currentTime=20" in line
    advanced = inproc("chain", ["advance", str(TEST_PARAMS.unbonding_delay)], env)
    assert advanced.returncode == 0, advanced.stderr
    withdrawn = ok_json(run_cli("node", ["withdraw", "--json"], env))
    assert withdrawn["withdrawn_wei"] == str(2 * 10**18)
    assert [t["events"] for t in withdrawn["transactions"]] == [["NodeDeregistered"], ["Withdrawn"]]  # both reported
    status = ok_json(run_cli("node", ["status", "--json"], env))
    assert status["registered"] is False
    listed = ok_json(inproc("node", ["list", "--json", "--all"], env))
    assert [n["status"] for n in listed] == ["deregistered"]
    secret = dev_account(OPERATOR).key.hex()
    for proc_output in (reg, added, status, listed, withdrawn):
        assert secret.removeprefix("0x") not in json.dumps(proc_output)


def test_bad_input_gets_one_line_and_a_named_exit_code(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run = InProcess(monkeypatch, capsys)
    env = cli_env(chain, tmp_path)
    # one real subprocess, to prove the path from the console script through to the exit status
    assert_failed(run_cli("node", ["withdraw"], env), ExitCode.TX_REVERTED, "NodeRegistryNothingToWithdraw(account=")
    assert_failed(
        run_cli("node", [*REGISTER, "--stake", "0.5"], env), ExitCode.INVALID_INPUT, "below the model minimum of 1 ETH"
    )
    bad_role = ["register", "--role", "miner", "--endpoint", "http://x", "--stake", "1"]
    assert_failed(run_cli("node", bad_role, env), ExitCode.INVALID_INPUT, "unknown role")
    assert_failed(run_cli("node", [*REGISTER[:5], "--stake", "1"], env), ExitCode.INVALID_INPUT, "needs --model")
    assert_failed(run_cli("node", [*REGISTER, "--stake", "lots"], env), ExitCode.INVALID_INPUT, "stake")

    nowhere = cli_env(None, tmp_path, PS_RPC_URL=f"http://127.0.0.1:{free_port()}")
    assert_failed(run_cli("node", ["status"], nowhere), ExitCode.CHAIN_UNAVAILABLE, "no chain answers")

    doc = json.loads(chain.deployment_path.read_text())
    doc["chainId"] = 5
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(doc))
    assert_failed(
        run_cli("node", ["status"], cli_env(chain, tmp_path, PS_DEPLOYMENT=str(wrong))),
        ExitCode.CHAIN_UNAVAILABLE,
        "wrong chain id",
    )
    missing = cli_env(chain, tmp_path, PS_DEPLOYMENT=str(tmp_path / "none.json"))
    assert_failed(run_cli("node", ["status"], missing), ExitCode.CHAIN_UNAVAILABLE, "file not found")

    poor = cli_env(chain, tmp_path, PS_PRIVATE_KEY=dev_account(600).key.hex())
    assert_failed(run_cli("node", [*REGISTER, "--stake", "1"], poor), ExitCode.INSUFFICIENT_FUNDS, "insufficient funds")
    assert_failed(
        run_cli("node", ["status"], cli_env(chain, tmp_path, key_index=None)), ExitCode.KEY_ERROR, "PS_PRIVATE_KEY"
    )
    garbage = cli_env(chain, tmp_path, PS_PRIVATE_KEY="not-a-key")
    line = assert_failed(run_cli("node", ["status"], garbage), ExitCode.KEY_ERROR, "not a valid")
    assert "not-a-key" not in line

    assert run_cli("node", [*REGISTER, "--stake", "1"], env).returncode == 0
    assert_failed(
        run_cli("node", [*REGISTER, "--stake", "1"], env),
        ExitCode.TX_REVERTED,
        "NodeRegistryAlreadyRegistered(operator=",
    )
    assert_failed(run_cli("node", ["stake", "add", "0"], env), ExitCode.INVALID_INPUT, "more than 0 ETH")


def test_keystore_unlocks_with_password_from_env(chain: ChainEnv, tmp_path: Path) -> None:
    account = dev_account(OPERATOR + 1)
    keystore = tmp_path / "key.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, "s3cret", kdf="pbkdf2", iterations=1024)))
    env = cli_env(chain, tmp_path, key_index=None, PS_KEYSTORE=str(keystore), PS_KEYSTORE_PASSWORD="s3cret")
    status = ok_json(run_cli("node", ["status", "--json"], env))
    assert status["operator"] == account.address
    env["PS_KEYSTORE_PASSWORD"] = "wrong"
    assert_failed(run_cli("node", ["status"], env), ExitCode.KEY_ERROR, "wrong password")


def _chain_up(tmp_path: Path, state_dir: Path) -> tuple[subprocess.Popen[str], Any]:
    env = cli_env(None, tmp_path, key_index=None)
    args = ["up", "--port", "0", "--json", "--state-dir", str(state_dir), "--deployment", str(tmp_path / "dep.json")]
    proc = spawn_cli("chain", args, env)
    try:
        return proc, read_json_object(proc, 60, what="ps-chain up")
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr
    return stderr


def test_chain_up_serves_deploys_persists_and_stops_cleanly(tmp_path: Path) -> None:
    state_dir = tmp_path / "chain-state"
    proc, info = _chain_up(tmp_path, state_dir)
    try:
        assert info["chain_id"] == 31337 and info["rpc_url"].startswith("http://127.0.0.1:")
        assert len(info["dev_accounts"]) == 10 and info["dev_accounts"][0] == dev_account(0).address
        assert Path(info["deployment"]).exists()
        registry = info["contracts"]["NodeRegistry"]
        env = cli_env(None, tmp_path, PS_RPC_URL=info["rpc_url"], PS_DEPLOYMENT=info["deployment"])
        assert run_cli("node", [*REGISTER, "--stake", "1"], env).returncode == 0
    finally:
        stderr = _stop(proc)
    assert dev_account(0).key.hex().removeprefix("0x") not in stderr
    with pytest.raises(Exception):  # noqa: B017 - anvil must be gone: any connection error will do
        connect(info["rpc_url"], timeout=1.0)
    proc, again = _chain_up(tmp_path, state_dir)
    try:
        assert again["contracts"]["NodeRegistry"] == registry
        env = cli_env(None, tmp_path, PS_RPC_URL=again["rpc_url"], PS_DEPLOYMENT=again["deployment"])
        status = ok_json(run_cli("node", ["status", "--json"], env))
        assert status["registered"] is True and status["role"] == "model"
    finally:
        stderr = _stop(proc)
    assert "reusing deployment" in stderr


def test_relay_registers_without_a_model(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = InProcess(monkeypatch, capsys)
    env = cli_env(chain, tmp_path, key_index=OPERATOR + 2)
    relay = ["register", "--role", "relay", "--endpoint", "http://127.0.0.1:9100", "--stake", "0.1", "--json"]
    relay.append("--no-check-endpoint")
    node = ok_json(run("node", relay, env))
    assert node["role"] == "relay" and node["model_id"] == "0x" + "00" * 32 and node["active"] is True
    with_model = ["register", "--role", "relay", "--endpoint", "http://x", "--model", "m@v1", "--stake", "1"]
    assert_failed(run("node", with_model, env), ExitCode.INVALID_INPUT, "relays serve no model")
    table = run("node", ["list"], env)
    assert table.returncode == 0 and "relay" in table.stdout and "1 node(s)" in table.stdout


def test_chain_up_on_a_port_another_program_holds_is_one_line_and_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("chain", ["up", "--port", str(port)], cli_env(None, tmp_path, key_index=None), timeout=60)
    assert_failed(proc, ExitCode.PORT_IN_USE, f"port {port}", "another program")


def test_a_second_chain_up_on_the_same_port_refuses_or_reuses_and_never_redeploys(tmp_path: Path) -> None:
    proc, first = _chain_up(tmp_path, tmp_path / "chain-state")
    try:
        port = first["rpc_url"].rsplit(":", 1)[1]
        dep_file = Path(first["deployment"])
        before = dep_file.read_bytes()
        w3 = connect(first["rpc_url"])
        head = w3.eth.block_number
        env = cli_env(None, tmp_path, key_index=None)
        args = ["up", "--port", port, "--deployment", str(dep_file)]
        refused = run_cli("chain", args, env)
        assert_failed(refused, ExitCode.PORT_IN_USE, f"port {port}", "running chain", "--reuse")
        assert refused.stdout == ""
        reused = ok_json(run_cli("chain", [*args, "--reuse", "--json"], env))
        assert reused["reused"] is True and reused["contracts"] == first["contracts"]
        assert reused["deploy_block"] == first["deploy_block"] and "dev_keys" not in reused
        assert dep_file.read_bytes() == before  # nothing was redeployed, the file is untouched
        assert w3.eth.block_number == head  # no deployment transaction reached the running chain
        # The library refuses the taken port too, instead of handing out the chain already listening there.
        from ledger import Anvil, AnvilConfig, ChainNotReachable

        with pytest.raises(ChainNotReachable, match="already in use"):
            Anvil(AnvilConfig(port=int(port))).start()
    finally:
        _stop(proc)


def test_chain_up_shows_dev_keys_only_when_asked_each_flagged_dev_only(tmp_path: Path) -> None:
    env = cli_env(None, tmp_path, key_index=None)
    args = ["up", "--port", "0", "--json", "--show-dev-keys", "--deployment", str(tmp_path / "dep.json")]
    proc = spawn_cli("chain", args, env)
    try:
        shown = read_json_object(proc, 60, what="ps-chain up")
    finally:
        stderr = _stop(proc)
    keys = shown["dev_keys"]
    assert len(keys) == len(shown["dev_accounts"]) == 10 and "DEV ONLY" in shown["dev_keys_warning"]
    for index, key in enumerate(keys):
        assert key["dev_only"] is True and key["address"] == shown["dev_accounts"][index]
        assert Account.from_key(key["private_key"]).address == key["address"] == dev_account(index).address
    assert "DEV ONLY" not in stderr or "never use on a real chain" in stderr


def test_register_checks_the_endpoint_serves_the_key_and_update_rebond_deregister_work(
    chain: ChainEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = InProcess(monkeypatch, capsys)
    served_state = tmp_path / "relay-state"
    serve_env = cli_env(chain, tmp_path, None, PS_STATE_DIR=str(served_state))
    relay_proc = spawn_cli("node", ["serve", "--role", "relay", "--port", "0", "--json"], serve_env)
    try:
        served = read_json_object(relay_proc, 60, what="ps-node serve")
        endpoint = served["endpoint"]
        env = cli_env(chain, tmp_path, key_index=OPERATOR + 3)
        relay = ["register", "--role", "relay", "--endpoint", endpoint, "--stake", "0.1"]
        # The default state dir holds another key than the running node's: refused before any transaction.
        assert_failed(run("node", relay, env), ExitCode.KEY_ERROR, "serves onion key", "--state-dir")
        as_model = ["register", "--role", "model", "--endpoint", endpoint, "--model", "m@v1", "--stake", "1"]
        assert_failed(
            run("node", [*as_model, "--state-dir", str(served_state)], env), ExitCode.INVALID_INPUT, "relay node"
        )
        dead = f"http://127.0.0.1:{free_port()}"
        dead_relay = ["register", "--role", "relay", "--endpoint", dead, "--stake", "0.1"]
        assert_failed(run("node", dead_relay, env), ExitCode.NETWORK_ERROR, "does not answer", "--no-check-endpoint")
        assert ok_json(run("node", ["status", "--json"], env))["registered"] is False

        node = ok_json(run("node", [*relay, "--state-dir", str(served_state), "--json"], env))
        assert node["x25519_public_key"] == served["x25519_public_key"] and node["endpoint"] == endpoint

        assert_failed(run("node", ["update", "--endpoint", dead], env), ExitCode.NETWORK_ERROR, "does not answer")
        priced = ok_json(run("node", ["update", "--price", "7", "--json"], env))
        assert priced["price_per_1k_tokens_wei"] == "7" and priced["endpoint"] == endpoint
        assert priced["events"] == ["NodeUpdated"] and priced["x25519_public_key"] == served["x25519_public_key"]
        moved = ok_json(run("node", ["update", "--endpoint", dead, "--no-check-endpoint", "--json"], env))
        assert moved["endpoint"] == dead and moved["price_per_1k_tokens_wei"] == "7"
        assert_failed(run("node", ["update"], env), ExitCode.INVALID_INPUT, "nothing to change")
    finally:
        relay_proc.terminate()
        relay_proc.communicate(timeout=30)

    assert_failed(run("node", ["unjail"], env), ExitCode.TX_REVERTED, "NodeRegistryNotJailed(")
    assert_failed(run("node", ["deregister"], env), ExitCode.TX_REVERTED, "NodeRegistryNotUnbonding(")
    assert ok_json(run("node", ["unbond", "--json"], env))["unbonding"].startswith("unbonding ends in 1h 0m")
    status = ok_json(run("node", ["status", "--json"], env))
    assert status["active"] is False and status["unbonding"].startswith("unbonding ends in 1h 0m")
    line = assert_failed(run("node", ["deregister"], env), ExitCode.TX_REVERTED, "NodeRegistryUnbondingNotFinished(")
    assert "unbondingEndsAt=in 1h 0m (" in line and " UTC)" in line
    rebonded = ok_json(run("node", ["rebond", "--json"], env))
    assert (
        rebonded["active"] is True
        and rebonded["unbonding_ends_at"] == 0
        and rebonded["events"] == ["UnbondingCancelled"]
    )
    assert run_cli("node", ["unbond"], env).returncode == 0
    assert run("chain", ["advance", str(TEST_PARAMS.unbonding_delay)], env).returncode == 0
    gone = ok_json(run("node", ["deregister", "--json"], env))
    assert gone["events"] == ["NodeDeregistered"] and gone["pending_withdrawal_wei"] == str(10**17)
    withdrawn = ok_json(run("node", ["withdraw", "--json"], env))
    assert [t["events"] for t in withdrawn["transactions"]] == [["Withdrawn"]] and withdrawn["withdrawn_wei"] == str(
        10**17
    )
