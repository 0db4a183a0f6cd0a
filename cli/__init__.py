"""PlanetServe command-line tools: ``ps-node``, ``ps-client``, ``ps-verifier``, ``ps-chain``."""

__all__: list[str] = []
