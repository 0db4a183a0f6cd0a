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


class InvalidValue(PlanetServeError):
    """A value of a shared kernel type (model id, wei amount, address) failed to parse; ``param`` names it.

    Raised at the edges where text or bytes become kernel values (CLI options, wire fields, files). The ledger's
    ``InvalidChainInput`` is a subclass, so a caller that branches on bad input catches both. ``value`` is the
    rejected input, truncated in the message so a huge wire field cannot flood a log line.
    """

    code = "invalid_input"

    def __init__(self, param: str, value: object, reason: str) -> None:
        self.param = param
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {param} {shown}: {reason}")
