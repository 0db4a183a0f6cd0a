"""PlanetServe node: inference engines, the aiohttp overlay and the privacy layer.

Importing this package is cheap and has no side effects; heavy dependencies load inside the functions that need them.
"""

from node._errors import PlanetServeError
from node._identity import IdentityError, NodeIdentity, OnionKeyStore, RotatingKeyring, RotationInProgress

__all__ = [
    "IdentityError",
    "NodeIdentity",
    "OnionKeyStore",
    "PlanetServeError",
    "RotatingKeyring",
    "RotationInProgress",
]
