"""Every console script starts and answers ``--help`` with exit code 0."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("tool", ["node", "client", "verifier", "chain"])
def test_console_script_help_exits_zero(tool: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; from cli.{tool} import main; sys.argv[0] = 'ps-{tool}'; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_help_and_startup_do_not_import_the_heavy_libraries() -> None:
    # web3/eth-account (~2 s), aiohttp and torch load inside the commands that need them, not for --help.
    heavy = ("web3", "eth_account", "aiohttp", "torch", "transformers")
    code = (
        "import sys, cli.node, cli.client, cli.chain, cli.verifier; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
