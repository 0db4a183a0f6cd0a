"""The one output helper: data to stdout (plain or ``--json``), diagnostics to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_stdout = Console(soft_wrap=True)
_stderr = Console(stderr=True, soft_wrap=True)
#: Widest table printed into a pipe (where rich would otherwise assume 80 columns and truncate).
_PIPE_WIDTH = 1000


def _default(value: object) -> object:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if hasattr(value, "__str__"):
        return str(value)
    raise TypeError(type(value).__name__)


def emit(data: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, as_json: bool, title: str | None = None) -> None:
    """Print a result: JSON on stdout for machines, a table or key/value lines for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=_default, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    if isinstance(data, Mapping):
        # Aligned plain lines, not a table: a table folds or truncates a 66-character hash or key to the terminal's
        # width (80 columns in a pipe), and a value must stay one piece that can be copied or grepped.
        width = max((len(str(key)) for key in data), default=0)
        lines = [title] if title else []
        lines += [f"{key!s:<{width}}  {value}" for key, value in data.items()]
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
        return
    rows = list(data)
    table = Table(title=title)
    if rows:
        for key in rows[0]:
            table.add_column(str(key))
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
    # In a pipe rich assumes 80 columns and would cut addresses and endpoints short: let the table be as wide as
    # its content there (a table only takes the width it needs).
    console = _stdout if _stdout.is_terminal else Console(soft_wrap=True, width=_PIPE_WIDTH)
    console.print(table)


def info(message: str) -> None:
    """A progress or diagnostic line, on stderr."""
    _stderr.print(message, markup=False, highlight=False)


def error(message: str) -> None:
    """The one actionable error line, on stderr."""
    _stderr.print(f"error: {message}", style="bold red", markup=False, highlight=False)


def error_json(data: Mapping[str, Any]) -> None:
    """The error as one JSON object on one line of stderr (``--json``): stdout is for results only."""
    sys.stderr.write(json.dumps(data, default=_default, sort_keys=True) + "\n")
    sys.stderr.flush()
