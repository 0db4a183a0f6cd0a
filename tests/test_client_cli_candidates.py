"""``ps-client ask|chat|serve --candidates N`` (``PS_CANDIDATES``) reaches ``ClientConfig.candidates``, bounded
0..``MAX_CANDIDATES`` with a one-line usage error (exit 2).

The ``Client`` is the commands' direct neighbour: a probe subclass records the config it is built with and stops the
command there (an ``InvalidParams``, exit 3), so no network is needed beyond the chain ``ask`` reads first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import node.client
from cli._client_options import MAX_CANDIDATES
from cli.exit_codes import ExitCode
from node.client import ClientConfig
from node.inference import InvalidParams
from tests._cli import InProcess, cli_env
from tests.fixtures.chain import ChainEnv


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[ClientConfig]:
    seen: list[ClientConfig] = []

    class Probe(node.client.Client):
        def __init__(self, directory: Any, config: ClientConfig | None = None, **_kwargs: Any) -> None:
            assert config is not None
            seen.append(config)
            raise InvalidParams(param="probe", value=0, reason="the test stops here")

    monkeypatch.setattr(node.client, "Client", Probe)
    return seen


CHAT = ["chat", "hi", "--model", "tiny-llama@v1", "--db", "sqlite://"]
SERVE = ["serve", "--port", "0", "--db", "sqlite://"]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([*CHAT, "--candidates", "3"], {}, 3),
        (CHAT, {}, 16),
        ([*SERVE, "--candidates", "0"], {}, 0),
        (SERVE, {"PS_CANDIDATES": "7"}, 7),
    ],
)
def test_chat_and_serve_weigh_the_candidates_asked_for(
    args: list[str],
    env: dict[str, str],
    expected: int,
    tmp_path: Path,
    in_process: InProcess,
    configs: list[ClientConfig],
) -> None:
    done = in_process("client", args, {**cli_env(None, tmp_path, key_index=None), **env})
    assert done.returncode == ExitCode.INVALID_INPUT, done.stderr
    assert [c.candidates for c in configs] == [expected]


def test_ask_weighs_the_candidates_asked_for(
    chain: ChainEnv, tmp_path: Path, in_process: InProcess, configs: list[ClientConfig]
) -> None:
    args = ["ask", "12+07=", "--model", "tiny-llama@v1", "--db", "sqlite://", "--candidates", "5"]
    done = in_process("client", args, cli_env(chain, tmp_path, key_index=None))
    assert done.returncode == ExitCode.INVALID_INPUT, done.stderr
    assert [c.candidates for c in configs] == [5]


def _usage(done: Any) -> Sequence[str]:
    assert done.returncode == ExitCode.USAGE, done.stderr
    lines: list[str] = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--candidates" in lines[0] and "Traceback" not in done.stderr
    return lines


@pytest.mark.parametrize("command", [["ask", "12+07=", "--model", "tiny-llama@v1"], CHAT, SERVE])
def test_candidates_out_of_range_is_a_one_line_usage_error(
    command: list[str], tmp_path: Path, in_process: InProcess, configs: list[ClientConfig]
) -> None:
    env = cli_env(None, tmp_path, key_index=None)
    _usage(in_process("client", [*command, "--candidates", "-1"], env))
    _usage(in_process("client", command, {**env, "PS_CANDIDATES": str(MAX_CANDIDATES + 1)}))
    assert configs == []  # refused before any client exists
