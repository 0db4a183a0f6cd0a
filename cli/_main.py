"""One ``main()`` wrapper: known errors become one actionable line and a named exit code.

Tracebacks appear only with ``PS_DEBUG=1``; pretty-printed locals stay off everywhere (they could hold secrets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer

from cli._output import error
from cli.exit_codes import ExitCode
from node import PlanetServeError

#: Maps an error's stable ``code`` prefix to an exit code. Layers add codes; unknown ones exit FAILURE.
_EXIT_BY_CODE: dict[str, ExitCode] = {
    "invalid": ExitCode.INVALID_INPUT,
    "chain_unavailable": ExitCode.CHAIN_UNAVAILABLE,
    "tx_reverted": ExitCode.TX_REVERTED,
    "insufficient_funds": ExitCode.INSUFFICIENT_FUNDS,
    "key": ExitCode.KEY_ERROR,
    "model": ExitCode.MODEL_ERROR,
    "network": ExitCode.NETWORK_ERROR,
}


def exit_code_for(exc: PlanetServeError) -> ExitCode:
    """The exit code for a PlanetServe error, from the prefix of its ``code``."""
    for prefix, code in _EXIT_BY_CODE.items():
        if exc.code.startswith(prefix):
            return code
    return ExitCode.FAILURE


def new_app(help_text: str) -> typer.Typer:
    """A Typer app with our conventions: no pretty exceptions (no locals), ``PS_*`` env defaults by option."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )


def run(app: typer.Typer) -> Callable[[], None]:
    """Build the console-script entry point for ``app``."""

    def main() -> None:
        debug = os.environ.get("PS_DEBUG") == "1"
        try:
            app(standalone_mode=False)
        except PlanetServeError as exc:
            if debug:
                raise
            error(str(exc))
            sys.exit(int(exit_code_for(exc)))
        except KeyboardInterrupt:
            sys.exit(int(ExitCode.INTERRUPTED))
        except SystemExit:
            raise
        except Exception as exc:
            import click

            if isinstance(exc, click.exceptions.Exit):
                sys.exit(exc.exit_code)
            if isinstance(exc, click.exceptions.Abort):
                sys.exit(int(ExitCode.INTERRUPTED))
            if isinstance(exc, click.ClickException):
                exc.show()
                sys.exit(int(ExitCode.USAGE) if isinstance(exc, click.UsageError) else exc.exit_code)
            raise

    return main
