"""The root of PlanetServe's error tree.

Every error the project raises on purpose derives from :class:`PlanetServeError`, with one base per layer
(``ChainError`` in ``ledger``, ``InferenceError`` in ``node.inference``, ``PrivacyError`` in ``node.privacy``, ...).
It lives here, in the lightest package, so that every layer can share it without importing any other layer.
"""

from __future__ import annotations


class PlanetServeError(Exception):
    """Base of every deliberate PlanetServe error.

    ``code`` is a stable, machine-readable identifier (used by the CLI for exit codes and by the overlay for
    the OpenAI error shape); subclasses override it.
    """

    code: str = "planetserve_error"
