"""The options several commands share (``--db``, ``--epochs``) are declared once (``cli._node_chain``'s aliases) and
read the same in each command: flag, ``PS_*`` variable, bounds and help, as each command had them before."""

from __future__ import annotations

from typing import Any

import pytest
import typer.main

from cli.node import app as node_app
from cli.verifier import app as verifier_app

NODE_DB = "SQLAlchemy URL (default: SQLite in state dir)."
VERIFIER_DB = "SQLAlchemy URL of the registry index."


def _option(app: typer.Typer, command: str, flag: str) -> Any:
    """The parsed option ``flag`` of ``command`` (typer's own click objects: read by attribute, not by class)."""
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    (found,) = [p for p in cmd.params if flag in p.opts]
    return found


def _bounds(option: Any) -> tuple[int, int]:
    return option.min, option.max


@pytest.mark.parametrize(
    ("app", "command", "db_help"),
    [(node_app, "status", NODE_DB), (node_app, "list", NODE_DB), (verifier_app, "status", VERIFIER_DB)],
)
def test_the_index_db_option_reads_ps_index_db_with_its_commands_help(
    app: typer.Typer, command: str, db_help: str
) -> None:
    db = _option(app, command, "--db")
    assert db.envvar == "PS_INDEX_DB" and db.default is None and db.help == db_help


def test_ps_verifier_run_reads_the_same_db_option_and_its_anchor_confirmations() -> None:
    db = _option(verifier_app, "run", "--db")
    assert db.envvar == "PS_INDEX_DB" and db.help == VERIFIER_DB
    confirmations = _option(verifier_app, "run", "--anchor-confirmations")
    assert confirmations.envvar == "PS_ANCHOR_CONFIRMATIONS" and confirmations.default == 2
    assert _bounds(confirmations) == (0, 64)


@pytest.mark.parametrize(
    ("app", "help_text"), [(node_app, "Latest rated epochs shown."), (verifier_app, "Latest epochs shown.")]
)
def test_the_status_epochs_option_is_bounded_and_reads_ps_status_epochs(app: typer.Typer, help_text: str) -> None:
    epochs = _option(app, "status", "--epochs")
    assert epochs.envvar == "PS_STATUS_EPOCHS" and epochs.default == 10 and epochs.help == help_text
    assert _bounds(epochs) == (1, 1000)
