"""``ps-verifier``: audit model nodes and attest on chain."""

from __future__ import annotations

from cli import _verifier_inspect
from cli._main import new_app, run
from cli._verifier_run import run_command

app = new_app("Audit model nodes with challenge prompts and attest on chain.", root=True)
app.add_typer(_verifier_inspect.app)
app.command(name="run")(run_command)


@app.command()
def version() -> None:
    """Print the installed PlanetServe version."""
    from importlib.metadata import version as _version

    print(_version("planetserve"))


main = run(app)
