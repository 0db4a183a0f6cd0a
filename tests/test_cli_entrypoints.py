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
