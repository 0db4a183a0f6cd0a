"""The console scripts as the CLI tests drive them: their environment, in-process runs, the checks of their output,
and ``ps-node serve`` in the background.

Why a module of its own: these helpers lived in ``test_chain_cli`` and ``test_serve_cli`` and a dozen test modules
imported them from there (a test module's private names, and importing a test module collects its tests' imports
too). Subprocess runs are in :mod:`tests._procs`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.exit_codes import ExitCode
from ledger import dev_account
from tests._procs import read_json_object, spawn_cli
from tests.fixtures.chain import ChainEnv

#: The anvil dev account the CLI tests act as by default.
OPERATOR = 9
#: Seconds ``ps-node serve`` gets to print its ready line (a model node loads its engine first).
SERVE_READY_TIMEOUT_S = 180.0

# Nothing listens at this endpoint: the tests using it opt out of the endpoint check (tested on its own).
REGISTER = [
    "register",
    "--role",
    "model",
    "--endpoint",
    "http://127.0.0.1:9001",
    "--model",
    "tiny-llama@v1",
    "--no-check-endpoint",
]


def cli_env(chain: ChainEnv | None, tmp_path: Path, key_index: int | None = OPERATOR, **extra: str) -> dict[str, str]:
    """This process's environment without any ``PS_*``, then the state dir under ``tmp_path``, the chain's RPC URL
    and deployment, ``PS_PRIVATE_KEY`` of dev account ``key_index`` (None: no key) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PS_STATE_DIR"] = str(tmp_path / "node-state")
    if chain is not None:
        env["PS_RPC_URL"] = chain.rpc_url
        env["PS_DEPLOYMENT"] = str(chain.deployment_path)
    if key_index is not None:
        env["PS_PRIVATE_KEY"] = dev_account(key_index).key.hex()
    env.update(extra)
    return env


class InProcess:
    """Runs a console script's ``main()`` in this process (same code path as the subprocess, ~2 s faster a call:
    importing web3 and eth-account dominates a CLI start on this machine)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def __call__(self, tool: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        main = importlib.import_module(f"cli.{tool}").main
        with self._monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("PS_")]:
                patch.delenv(key)
            for key, value in env.items():
                if key.startswith("PS_"):
                    patch.setenv(key, value)
            patch.setattr(sys, "argv", [f"ps-{tool}", *args])
            self._capsys.readouterr()
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
            out = self._capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a command that succeeded printed on stdout."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_failed(proc: subprocess.CompletedProcess[str], code: ExitCode, *needles: str) -> str:
    """Check that ``proc`` failed with ``code`` and one error line (its last line, no traceback) holding every one
    of ``needles``; returns that line."""
    assert proc.returncode == int(code), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def spawn_serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``ps-node serve ARGS`` (``args`` starts with ``serve``) in the background; the caller stops it."""
    return spawn_cli("node", args, env)


def serve_ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON object ``serve --json`` prints once it listens."""
    return read_json_object(proc, SERVE_READY_TIMEOUT_S, what="ps-node serve")
