"""``ps-chain``: run a local chain with PlanetServe's contracts deployed."""

from __future__ import annotations

from cli._main import new_app, run

app = new_app("Run a local PlanetServe chain (anvil) and deploy the contracts.")

main = run(app)
