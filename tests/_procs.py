"""The console scripts as users run them, in separate processes: one helper module for every CLI test.

Why one module: ``test_chain_cli``, ``test_serve_cli`` and ``test_net_cli`` each had their own copy of "run
``ps-<tool>`` as a subprocess", "start it in the background" and "read the pretty-printed JSON object it prints", and
the copies drifted (one read with a timeout, two could hang forever on a process that never printed). A process is
started as ``python -c "from cli.<tool> import main; main()"`` rather than through the installed script, so the
tests run the working tree's code whether or not the package was reinstalled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

#: Seconds :func:`run_cli` waits for a command by default.
RUN_TIMEOUT_S = 60.0


def cli_command(tool: str, args: list[str]) -> list[str]:
    """The argv that runs ``ps-<tool> ARGS`` from this checkout (``tool``: ``node``, ``chain``, ``client``, ...)."""
    code = f"import sys; from cli.{tool} import main; sys.argv[0] = 'ps-{tool}'; main()"
    return [sys.executable, "-c", code, *args]


def run_cli(
    tool: str, args: list[str], env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``ps-<tool> ARGS`` to completion (stdout and stderr captured as text); ``env`` None: this process's."""
    return subprocess.run(cli_command(tool, args), capture_output=True, text=True, env=env, timeout=timeout)


def spawn_cli(tool: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``ps-<tool> ARGS`` in the background with piped text stdout and stderr; the caller stops it."""
    return subprocess.Popen(cli_command(tool, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def read_json_object(proc: subprocess.Popen[str], timeout: float, *, what: str = "the process") -> dict[str, Any]:
    """The first JSON object ``proc`` prints on stdout (``emit`` pretty-prints it over lines ending with ``}``).

    Waits at most ``timeout`` seconds. A process that exits first, or stays silent too long (then it is killed), is
    an ``AssertionError`` carrying its stderr, so a failing start shows why.
    """
    assert proc.stdout is not None
    result: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        text = ""
        for line in proc.stdout:
            text += line
            if line.rstrip() == "}":
                result.update(json.loads(text))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if result:
        return result
    if reader.is_alive():  # still running and silent: stop it so its stderr can be read to the end
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    stderr = proc.stderr.read() if proc.stderr is not None else ""
    raise AssertionError(f"no JSON object from {what} (exit {proc.returncode}): {stderr[-4000:]}")
