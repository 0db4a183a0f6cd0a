"""The root of PlanetServe's error tree, re-exported from the kernel (``planetserve``) where it lives, so that
``from node import PlanetServeError`` keeps working and ``ledger`` need not import ``node``."""

from __future__ import annotations

from planetserve import PlanetServeError

__all__ = ["PlanetServeError"]
