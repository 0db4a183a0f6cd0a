"""``ps-verifier``: audit model nodes and attest on chain."""

from __future__ import annotations

from cli._main import new_app, run

app = new_app("Audit model nodes with challenge prompts and attest on chain.", root=True)


@app.command()
def version() -> None:
    """Print the installed PlanetServe version."""
    from importlib.metadata import version as _version

    print(_version("planetserve"))


main = run(app)
