"""PlanetServe ledger: contract handles, deployment, anvil launcher and event indexer (being built)."""

__all__: list[str] = []
