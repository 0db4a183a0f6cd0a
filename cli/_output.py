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
        table = Table(title=title, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")  # never an ellipsis: keys and hashes must survive a narrow pipe
        for key, value in data.items():
            table.add_row(str(key), str(value))
        _stdout.print(table)
        return
    rows = list(data)
    table = Table(title=title)
    if rows:
        for key in rows[0]:
            table.add_column(str(key))
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
    _stdout.print(table)


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
