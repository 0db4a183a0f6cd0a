"""``ps-node``: operate a PlanetServe node (registration and stake, models, serving)."""

from __future__ import annotations

from cli import _node_chain, _node_keys, _node_model, _node_pay, _node_serve, _node_status
from cli._main import new_app, run

app = new_app("Operate a PlanetServe node: register and stake on chain, build models, serve.", root=True)
app.add_typer(_node_chain.app)
app.add_typer(_node_model.app, name="model")
app.add_typer(_node_serve.app)
app.add_typer(_node_keys.app, name="keys")
app.add_typer(_node_pay.app)
app.add_typer(_node_status.app)  # after _node_chain: the status command with reputation, attestations and slashes

main = run(app)
