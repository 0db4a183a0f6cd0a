"""``ps-client serve`` as a user runs it, a separate process: it reads the registry through its own index, serves the
OpenAI-compatible API on the port it is given (0: any free) and prints its base URL; the official ``openai`` package
lists the registered model by the name the command was given; a request that no node of the registry can carry (its
relays and model node registered at addresses where nothing listens) is an OpenAI-shaped error, not a hang or a
traceback; SIGTERM stops it with exit 0.

What serving a completion looks like end to end is proven by ``tests/test_net_cli.py`` (``ps-net up`` runs the same
app) and ``tests/test_client_openai.py``; this module proves the command's own wiring.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ledger import Role
from planetserve import ModelId
from tests._cli import cli_env
from tests._procs import read_json_object, spawn_cli
from tests.fixtures.chain import ChainEnv

NAME = "tiny-llama@v1"
#: Seconds the command gets to start (imports, index sync) and to stop.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def _dead_port() -> int:
    """A 127.0.0.1 port where nothing listens (bound, then closed: a dial there is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def serving(chain: ChainEnv, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    for index, role in ((1, Role.MODEL), (2, Role.RELAY), (3, Role.RELAY), (4, Role.RELAY)):
        chain.registry(index).register(
            role=role,
            endpoint=f"http://127.0.0.1:{_dead_port()}",
            x25519_public_key=bytes([index]) * 32,
            model_id=ModelId.of(NAME) if role is Role.MODEL else None,
            price_per_1k_tokens=0,
            stake=2 * 10**18 if role is Role.MODEL else 10**17,
        )
    env = cli_env(chain, tmp_path, key_index=None)
    db = f"sqlite:///{tmp_path}/index.sqlite"
    proc = spawn_cli("client", ["serve", "--port", "0", "--model", NAME, "--db", db, "--json"], env)
    try:
        summary = read_json_object(proc, START_TIMEOUT_S, what="ps-client serve")
        yield proc, summary["base_url"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_ps_client_serve_lists_registered_models_answers_errors_openai_shaped_and_stops(
    serving: tuple[subprocess.Popen[str], str],
) -> None:
    proc, base_url = serving
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as api:
        assert [m.id for m in api.models.list().data] == [NAME]
        with pytest.raises(openai.APIStatusError) as failed:
            api.completions.create(model=NAME, prompt="3+4=", max_tokens=2, temperature=0)
        with pytest.raises(openai.NotFoundError) as unknown:
            api.completions.create(model="nobody@v1", prompt="3+4=", max_tokens=2)
    assert failed.value.status_code >= 500
    body = failed.value.body
    assert isinstance(body, dict) and body.get("code") not in (None, "internal_error"), body
    print(f"unreachable network: {failed.value.status_code} {body['code']}")
    assert unknown.value.code == "model_not_found"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "stopped" in stderr
