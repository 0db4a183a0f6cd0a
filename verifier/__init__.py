"""PlanetServe verifier: challenges, scoring, committee and attestations (being built)."""

__all__: list[str] = []
