"""``ps-net up`` as a user runs it: anvil, a model node and relays as separate ``ps-node serve`` processes, the
OpenAI-compatible endpoint in front; the official ``openai`` package and ``ps-client chat`` answer through it; a
crashed relay is reported and the network stays up; ``ps-net down`` stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from ledger import dev_account
from node.inference import read_info
from tests._procs import read_json_object, run_cli, spawn_cli

#: Seconds a ``ps-net`` or ``ps-client`` command gets (``down`` stops every process of the network).
NET_TIMEOUT_S = 120.0


@pytest.fixture
def network(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any], Path]]:
    state = tmp_path / "net"
    args = ["up", "--relays", "4", "--models", "2", "--model-dir", str(tiny_model_dir), "--openai-port", "0"]
    proc = spawn_cli("net", [*args, "--state-dir", str(state), "--json"])
    try:
        summary = read_json_object(proc, 240, what="ps-net up")
        yield proc, summary, state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_local_network_of_processes_serves_openai_and_chat_survives_crashes_and_stops(
    network: tuple[subprocess.Popen[str], dict[str, Any], Path], tiny_model_dir: Path
) -> None:
    proc, summary, state = network
    info = read_info(tiny_model_dir)
    assert info is not None
    name = f"{info.name}@{info.revision}"
    assert summary["model"] == name and summary["base_url"].startswith("http://127.0.0.1:")
    roles = sorted(n["role"] for n in summary["nodes"])
    assert roles == ["model", "model", "relay", "relay", "relay", "relay"]

    api = openai.OpenAI(base_url=summary["base_url"], api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in api.models.list().data] == [name]
    done = api.completions.create(model=name, prompt="3+4=7\n12+7=", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in {"stop", "length"} and done.usage is not None
    chunks = list(
        api.chat.completions.create(
            model=info.name, messages=[{"role": "user", "content": "12+7="}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks and chunks[0].choices[0].delta.role == "assistant"

    chat = run_cli(
        "client",
        [
            "chat",
            "12+7=",
            "--model",
            name,
            "--max-tokens",
            "6",
            "--rpc-url",
            summary["rpc_url"],
            "--deployment",
            summary["deployment"],
            "--db",
            f"sqlite:///{state / 'cli-index.sqlite'}",
            "--json",
        ],
        # The model node charges its registered price: this client pays from its own dev key (an unused account).
        env={**os.environ, "PS_PRIVATE_KEY": "0x" + bytes(dev_account(6).key).hex()},
        timeout=NET_TIMEOUT_S,
    )
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["model"] == name

    # A second `up` from the same state refuses in one line instead of clobbering the running network.
    again = run_cli("net", ["up", "--state-dir", str(state)], timeout=NET_TIMEOUT_S)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already up" in again.stderr

    # A model node crashes: every next request is answered, once, by the other one (a silent node is not routed
    # to; a try that failed before any path answered is retried elsewhere, never after).
    model = next(n for n in summary["nodes"] if n["role"] == "model")
    os.kill(model["pid"], signal.SIGKILL)
    for i in range(3):
        after = api.completions.create(model=name, prompt=f"3+4=7\n1{i}+7=", max_tokens=4, temperature=0)
        assert len(after.choices) == 1 and after.choices[0].finish_reason in {"stop", "length"}

    relay = next(n for n in summary["nodes"] if n["role"] == "relay")
    os.kill(relay["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        shown = run_cli("net", ["status", "--state-dir", str(state), "--json"], timeout=NET_TIMEOUT_S)
        status = json.loads(shown.stdout)
        if not next(n for n in status["nodes"] if n["name"] == relay["name"])["alive"]:
            break
        time.sleep(0.5)
    assert not next(n for n in status["nodes"] if n["name"] == relay["name"])["alive"]
    assert proc.poll() is None, "the network went down with one relay"

    down = run_cli("net", ["down", "--state-dir", str(state), "--json"], timeout=NET_TIMEOUT_S)
    assert down.returncode == 0 and json.loads(down.stdout)["stopped"] is True
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None
    reported = proc.stderr.read()
    assert f"{relay['name']} exited" in reported and f"{model['name']} exited" in reported
    gone = run_cli("net", ["down", "--state-dir", str(state)], timeout=NET_TIMEOUT_S)
    assert gone.returncode != 0 and "no network is up" in gone.stderr
