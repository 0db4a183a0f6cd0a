"""Usage mistakes as a new user makes them: one line on stderr, exit 2, no traceback, for all four console scripts;
``--version`` everywhere; errors as one JSON object under ``--json``; exit codes chosen by exception class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from typing import Any

import pytest
import typer

from cli._main import _EXIT_BY_CLASS, exit_code_for, usage_exit_code
from cli.exit_codes import ExitCode

TOOLS = ("node", "client", "verifier", "chain")


def _run(tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; from cli.{tool} import main; sys.argv[0] = 'ps-{tool}'; main()"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env={**clean, **env}
    )


def _usage(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == ExitCode.USAGE, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("tool", TOOLS)
def test_version_prints_the_installed_version_and_exits_zero(tool: str) -> None:
    proc = _run(tool, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == version("planetserve")


@pytest.mark.parametrize("tool", TOOLS)
def test_no_command_is_one_line_listing_the_commands(tool: str) -> None:
    line = _usage(_run(tool), "Missing command", "commands:", f"ps-{tool} --help")
    assert "version" in line or "up" in line or "register" in line


@pytest.mark.parametrize("tool", TOOLS)
def test_unknown_command_and_unknown_option_are_usage_errors(tool: str) -> None:
    _usage(_run(tool, "frobnicate"), "No such command", "frobnicate")
    _usage(_run(tool, "--bogus"), "No such option", "--bogus")


@pytest.mark.parametrize(
    ("tool", "args", "needle"),
    [
        ("node", ["serve", "--port", "abc"], "--port"),
        ("node", ["register"], "--role"),
        ("node", ["stake", "add"], "amount"),
        ("node", ["stake"], "Missing command"),
        ("node", ["model", "make", "--quick"], "--out"),
        ("node", ["serve", "--nope"], "--nope"),
        ("client", ["ask"], "prompt"),
        ("client", ["ask", "hi", "--max-tokens", "many"], "--max-tokens"),
        ("chain", ["up", "--port", "abc"], "--port"),
        ("chain", ["up", "--port", "70000"], "--port"),
        ("chain", ["advance"], "seconds"),
        ("verifier", ["version", "extra"], "extra"),
    ],
)
def test_each_usage_mistake_is_one_line_and_exit_2(tool: str, args: list[str], needle: str) -> None:
    _usage(_run(tool, *args), needle, f"ps-{tool}")


def test_usage_error_under_json_is_one_json_object_on_stderr() -> None:
    proc = _run("node", "serve", "--port", "abc", "--json")
    assert proc.returncode == ExitCode.USAGE and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    err = json.loads(lines[0])["error"]
    assert err["type"] == "UsageError" and err["exit_code"] == 2 and err["exit_name"] == "USAGE"
    assert "--port" in err["message"]


def test_planetserve_error_under_json_is_one_json_object_with_its_fields() -> None:
    # PS_JSON=1 turns JSON errors on as --json does; the error here is raised before any chain or network work.
    proc = _run("client", "ask", "hi", "--model", "m@v1", "--attempts", "0", PS_JSON="1")
    assert proc.returncode == ExitCode.INVALID_INPUT and proc.stdout == ""
    err: dict[str, Any] = json.loads(proc.stderr.strip())["error"]
    assert err["type"] == "InvalidParams" and err["param"] == "attempts" and err["code"] == "invalid_params"
    assert err["exit_code"] == int(ExitCode.INVALID_INPUT) and "attempts" in err["message"]


def test_debug_shows_the_traceback() -> None:
    proc = _run("node", "serve", "--port", "abc", PS_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_typer_usage_errors_are_told_apart_without_private_names() -> None:
    # If a typer upgrade changes how its usage errors look from the public API, this fails first.
    assert issubclass(typer.BadParameter, typer.TyperException)
    assert usage_exit_code(typer.BadParameter("x")) is ExitCode.USAGE
    assert usage_exit_code(typer.TyperException("x")) is ExitCode.FAILURE
    from typer.main import get_command

    app = typer.Typer()

    @app.command()
    def one(count: int) -> None:
        del count

    @app.command()
    def two() -> None:
        pass

    command = get_command(app)
    for args in (["one"], ["one", "x"], ["three"], ["two", "--nope"], []):
        with pytest.raises(typer.TyperException) as caught:
            command.main(args, standalone_mode=False)
        assert usage_exit_code(caught.value) is ExitCode.USAGE, args


def test_exit_codes_map_by_class_not_by_code_text() -> None:
    import ledger
    import node.client._wallet
    import node.inference
    import node.overlay
    import node.privacy
    import verifier._errors
    import verifier._runner  # its NotAVerifier is in the table
    from cli import _errors

    for module_name, class_name, _ in _EXIT_BY_CLASS:
        assert isinstance(getattr(sys.modules[module_name], class_name, None), type), (module_name, class_name)
    # A peer's error code is data: a model node answering "invalid_..." or "tx_reverted" does not pick our exit code.
    for peer_code in ("invalid_params", "tx_reverted", "key_error", "model_load_error"):
        assert exit_code_for(node.overlay.CompletionError(peer_code, "from a peer")) is ExitCode.NETWORK_ERROR
    assert exit_code_for(node.inference.InvalidParams(param="p", value=1, reason="r")) is ExitCode.INVALID_INPUT
    assert exit_code_for(ledger.InvalidChainInput("stake", "x", "r")) is ExitCode.INVALID_INPUT
    assert exit_code_for(ledger.WrongChainId(1, 2)) is ExitCode.CHAIN_UNAVAILABLE
    assert exit_code_for(ledger.TransactionFailed("boom")) is ExitCode.TX_REVERTED
    # "sent, outcome unknown" is not a revert: a script must not retry it as one (it could stake twice).
    assert exit_code_for(ledger.TransactionOutcomeUnknown("0x" + "ab" * 32, 1.0)) is ExitCode.TX_OUTCOME_UNKNOWN
    assert exit_code_for(ledger.OperatorKeyError("no key")) is ExitCode.KEY_ERROR
    assert exit_code_for(node.privacy.InsufficientRelays(3, 1)) is ExitCode.NETWORK_ERROR
    assert exit_code_for(_errors.PortInUse(host="127.0.0.1", port=1)) is ExitCode.PORT_IN_USE
    missing = verifier._errors.EvidenceNotFound(evidence_hash="0x" + "00" * 32, store="evidence")
    assert exit_code_for(missing) is ExitCode.NOT_FOUND
    changed = verifier._errors.EvidenceTampered(evidence_hash="0x" + "00" * 32, path="p", detail="changed")
    assert exit_code_for(changed) is ExitCode.TAMPERED

    class Renamed(node.PlanetServeError):
        code = "invalid_but_unmapped"  # a code that only looks like an invalid-input one

    assert exit_code_for(Renamed()) is ExitCode.FAILURE


def _commands(command: Any, path: str) -> list[tuple[str, Any]]:
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, f"{path} {name}")
    return found


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_reads_a_ps_environment_variable(tool: str) -> None:
    # The README and STYLE promise it: any option can be set from a PS_* variable (--help and --version aside).
    import importlib

    from typer.main import get_command

    app = importlib.import_module(f"cli.{tool}").app
    missing = []
    for path, command in _commands(get_command(app), f"ps-{tool}"):
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option" or param.name in ("help", "version"):
                continue
            envvar = param.envvar
            if not (isinstance(envvar, str) and envvar.startswith("PS_")):
                missing.append(f"{path} --{param.name}")
    assert missing == []


def test_results_for_people_keep_long_values_whole_in_a_pipe() -> None:
    # rich assumes 80 columns in a pipe: a table would fold or cut a 66-character id that a user copies from it.
    long_id = "0x" + "ab" * 32
    code = (
        "from cli._output import emit; "
        f"emit({{'model_id': '{long_id}', 'name': 'm'}}, as_json=False, title='model'); "
        f"emit([{{'operator': '{long_id}', 'endpoint': 'http://127.0.0.1:8701/' + 'p' * 60}}], as_json=False)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"model_id  {long_id}\n" in proc.stdout
    assert long_id in proc.stdout.splitlines()[-2] and "p" * 60 in proc.stdout
