"""One ``main()`` wrapper: every known error becomes one actionable line and a named exit code.

- PlanetServe errors map to an exit code by exception class (walking the class's MRO through ``_EXIT_BY_CLASS``),
  never by the text of their ``code``: a remote peer's error code (``CompletionError.code``) is data, and must not
  choose local behaviour.
- typer's usage errors (missing or unknown option, command or argument, a bad value) exit 2 with one line.
- With ``--json`` on the command line (or ``PS_JSON=1``), the error is one JSON object on one line of **stderr**:
  stdout carries results only, so ``ps-node status --json | jq`` never mistakes an error for a result; the exit
  status tells which happened.

Tracebacks appear only with ``PS_DEBUG=1`` (and for bugs); pretty-printed locals stay off everywhere (they could hold
secrets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from cli._output import error, error_json
from cli.exit_codes import ExitCode
from node import PlanetServeError

#: (module, class, exit code). A class is looked up only in modules already imported: an exception of a class can
#: exist only once its module is loaded, so mapping an error never imports web3 or torch. ``exit_code_for`` walks
#: the error's MRO, so a leaf listed here wins over its base. tests/test_cli_usage.py checks every entry resolves.
_EXIT_BY_CLASS: tuple[tuple[str, str, ExitCode], ...] = (
    ("cli._errors", "PortInUse", ExitCode.PORT_IN_USE),
    ("cli._errors", "EndpointUnreachable", ExitCode.NETWORK_ERROR),
    ("cli._errors", "EndpointKeyMismatch", ExitCode.KEY_ERROR),
    ("node", "IdentityError", ExitCode.KEY_ERROR),
    ("node.inference", "InvalidParams", ExitCode.INVALID_INPUT),
    ("node.inference", "ModelLoadError", ExitCode.MODEL_ERROR),
    ("node.inference", "EngineUnavailable", ExitCode.MODEL_ERROR),
    ("node.privacy", "InvalidPrivacyParam", ExitCode.INVALID_INPUT),
    ("node.privacy", "InsufficientRelays", ExitCode.NETWORK_ERROR),
    # A packet that fails a check came from a peer: a network problem, not the user's input.
    ("node.privacy", "MalformedPacket", ExitCode.NETWORK_ERROR),
    ("node.overlay", "OverlayError", ExitCode.NETWORK_ERROR),
    ("planetserve", "InvalidValue", ExitCode.INVALID_INPUT),
    ("ledger", "InvalidChainInput", ExitCode.INVALID_INPUT),
    ("ledger", "ChainUnavailable", ExitCode.CHAIN_UNAVAILABLE),
    ("ledger", "TransactionFailed", ExitCode.TX_REVERTED),
    ("ledger", "TransactionOutcomeUnknown", ExitCode.TX_OUTCOME_UNKNOWN),
    ("ledger", "InsufficientFunds", ExitCode.INSUFFICIENT_FUNDS),
    ("ledger", "OperatorKeyError", ExitCode.KEY_ERROR),
    # The key given is not an active verifier's (not registered and staked as one, jailed or unbonding).
    ("verifier._runner", "NotAVerifier", ExitCode.KEY_ERROR),
    ("verifier._errors", "InvalidVerifierInput", ExitCode.INVALID_INPUT),
    ("verifier._errors", "EvidenceNotFound", ExitCode.NOT_FOUND),
    ("verifier._errors", "EvidenceTampered", ExitCode.TAMPERED),
    ("node.client._wallet", "UnknownChannel", ExitCode.INVALID_INPUT),
    ("node.client._wallet", "WalletExhausted", ExitCode.INSUFFICIENT_FUNDS),
    ("node.client", "RequestTimeout", ExitCode.NETWORK_ERROR),
)


def _exit_table() -> dict[type, ExitCode]:
    table: dict[type, ExitCode] = {}
    for module_name, class_name, code in _EXIT_BY_CLASS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            table[cls] = code
    return table


def exit_code_for(exc: PlanetServeError) -> ExitCode:
    """The exit code for a PlanetServe error: its nearest class in ``_EXIT_BY_CLASS``, else FAILURE."""
    table = _exit_table()
    for cls in type(exc).__mro__:
        found = table.get(cls)
        if found is not None:
            return found
    return ExitCode.FAILURE


def usage_exit_code(exc: typer.TyperException) -> ExitCode:
    """USAGE for typer's usage errors, FAILURE for its other exceptions.

    typer 0.29 vendors click as ``typer._click`` and exports only the base ``typer.TyperException`` and one usage
    leaf, ``typer.BadParameter``; the usage family (its private ``UsageError``: missing or unknown option, command
    or argument, a bad value) is told apart by the ``exit_code`` class attribute typer sets on it (2), so no private
    name is imported. tests/test_cli_usage.py fails loudly if a typer upgrade changes that.
    """
    return (
        ExitCode.USAGE if isinstance(exc, typer.BadParameter) or exc.exit_code == ExitCode.USAGE else ExitCode.FAILURE
    )


def usage_message(exc: typer.TyperException) -> str:
    """typer's message on one line, with where to look next (the command's help; a group's commands)."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    # Usage errors carry the click context they were raised in (typer's ``Context`` is a subclass of its class, so
    # the attributes are read by name: ``command_path``, and ``list_commands`` where the command is a group).
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    if not isinstance(path, str):
        return message
    lister = getattr(getattr(ctx, "command", None), "list_commands", None)
    commands = f"commands: {', '.join(lister(ctx))}; " if callable(lister) else ""
    return f"{message} ({commands}try '{path} --help')"


def wants_json(argv: Sequence[str]) -> bool:
    """Whether errors should be JSON: ``--json`` among the options (before a ``--``), or ``PS_JSON`` set true."""
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--json" in args or os.environ.get("PS_JSON", "").strip().lower() in ("1", "true", "yes", "on")


def _fields(exc: BaseException) -> dict[str, Any]:
    """What a script branches on, when the error carries it (never values that could hold secrets or prompts)."""
    fields: dict[str, Any] = {}
    for name in ("param", "tx_hash", "error_name", "port", "endpoint"):
        value = getattr(exc, name, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            fields[name] = value
    return fields


def _completed(exc: BaseException) -> tuple[str, list[dict[str, Any]]]:
    """Transactions of the same command that were mined before the error (``ChainError.completed``): a command
    sending two must report the first even when the second fails."""
    receipts = [r for r in getattr(exc, "completed", ()) if isinstance(getattr(r, "tx_hash", None), str)]
    if not receipts:
        return "", []
    listed = [{"tx_hash": r.tx_hash, "events": list(getattr(r, "events", ()))} for r in receipts]
    text = ", ".join(f"tx {r['tx_hash']} ({', '.join(r['events']) or 'no events'})" for r in listed)
    return f"; mined before the error: {text}", listed


def _fail(code: ExitCode, message: str, *, as_json: bool, kind: str, error_code: str, extra: dict[str, Any]) -> None:
    message = " ".join(message.split())
    if as_json:
        error_json(
            {
                "error": {
                    "type": kind,
                    "code": error_code,
                    "message": message,
                    "exit_code": int(code),
                    "exit_name": code.name,
                    **extra,
                }
            }
        )
    else:
        error(message)
    sys.exit(int(code))


def describe(exc: PlanetServeError) -> str:
    """The error's line: its own text, with chain times read as durations and dates where it carries them."""
    from cli._durations import describe_error

    return describe_error(exc)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(version("planetserve"))
        raise typer.Exit()


VersionOpt = Annotated[
    bool,
    typer.Option("--version", is_eager=True, callback=_show_version, help="Print the installed version and exit."),
]


def new_app(help_text: str, *, root: bool = False) -> typer.Typer:
    """A Typer app with our conventions: no pretty exceptions (no locals), no completion commands.

    ``root=True`` is for the app a console script runs: it gets ``--version``. Run without a command, an app
    reports "Missing command" with its commands listed (one line, exit 2) instead of typer's ``no_args_is_help``,
    whose help is printed as a side effect of building the error and then ends in a traceback.
    """
    app = typer.Typer(help=help_text, no_args_is_help=False, pretty_exceptions_enable=False, add_completion=False)
    if root:

        @app.callback()
        def _root(version: VersionOpt = False) -> None:
            pass

    return app


def run(app: typer.Typer) -> Callable[[], None]:
    """Build the console-script entry point for ``app``."""

    def main() -> None:
        debug = os.environ.get("PS_DEBUG") == "1"
        as_json = wants_json(sys.argv[1:])
        try:
            result = app(standalone_mode=False)
        except PlanetServeError as exc:
            if debug:
                raise
            suffix, completed = _completed(exc)
            _fail(
                exit_code_for(exc),
                describe(exc) + suffix,
                as_json=as_json,
                kind=type(exc).__name__,
                error_code=exc.code,
                extra=_fields(exc) | ({"completed": completed} if completed else {}),
            )
        except typer.TyperException as exc:
            if debug:
                raise
            _fail(
                usage_exit_code(exc),
                usage_message(exc),
                as_json=as_json,
                kind="UsageError",
                error_code="usage",
                extra=_fields(exc),
            )
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _fail(
                ExitCode.INTERRUPTED,
                "interrupted",
                as_json=as_json,
                kind="Interrupted",
                error_code="interrupted",
                extra={},
            )
        # typer returns the code of a ``typer.Exit`` (or Ctrl-C, 130) raised inside a command instead of raising it.
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            sys.exit(result)

    return main
