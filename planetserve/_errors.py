"""The root of PlanetServe's error tree.

Every error the project raises on purpose derives from :class:`PlanetServeError`, with one base per layer
(``ChainError`` in ``ledger``, ``InferenceError`` in ``node.inference``, ``PrivacyError`` in ``node.privacy``, ...).
It lives in this dependency-free kernel package, below every layer, so that ``ledger`` and ``node`` share it
without importing each other.
"""

from __future__ import annotations


class PlanetServeError(Exception):
    """Base of every deliberate PlanetServe error.

    ``code`` is a stable, machine-readable identifier (used by the overlay for the OpenAI error shape and in
    ``--json`` errors); subclasses override it. The CLI chooses exit codes by class, never by ``code``.
    """

    code: str = "planetserve_error"
