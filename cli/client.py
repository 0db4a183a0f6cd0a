"""``ps-client``: send private, paid requests to the network."""

from __future__ import annotations

from cli._main import new_app, run

app = new_app("Send private, paid requests to the PlanetServe network.")


@app.command()
def version() -> None:
    """Print the installed PlanetServe version."""
    from importlib.metadata import version as _version

    print(_version("planetserve"))


main = run(app)
