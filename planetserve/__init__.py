"""PlanetServe's shared kernel: what every layer (``ledger``, ``node``, ``verifier``, ``cli``) may import and
which imports none of them. Dependency-free by design; importing it costs nothing.
"""

from planetserve._errors import PlanetServeError

__all__ = ["PlanetServeError"]
