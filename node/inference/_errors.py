"""The inference layer's error tree: one base, one leaf per thing that went wrong.

Codes are stable strings; the CLI maps their prefixes to exit codes (``invalid`` → invalid input, ``model`` → model
error) and the overlay renders them in the OpenAI error shape.
"""

from __future__ import annotations

from node._errors import PlanetServeError


class InferenceError(PlanetServeError):
    """Base of every error raised by ``node.inference``."""

    code = "inference_error"


class InvalidParams(InferenceError):
    """A sampling parameter or request field is out of range. ``param`` names it; ``value`` is what was given.

    ``value`` is kept for the caller to branch on, but the message never repeats prompt text.
    """

    code = "invalid_params"

    def __init__(self, *, param: str, value: object, reason: str) -> None:
        self.param = param
        self.value = value
        self.reason = reason
        shown = value if isinstance(value, (int, float, bool)) or value is None else type(value).__name__
        super().__init__(f"invalid parameter {param!r} ({shown}): {reason}")


class EngineOverloaded(InferenceError):
    """The engine's bounded queue is full; the caller should retry later or route elsewhere."""

    code = "engine_overloaded"

    def __init__(self, *, queued: int, limit: int) -> None:
        self.queued = queued
        self.limit = limit
        super().__init__(f"engine overloaded: {queued} requests queued (limit {limit})")


class EngineClosed(InferenceError):
    """The engine was closed (or its worker died) and accepts no more work."""

    code = "engine_closed"

    def __init__(self, reason: str = "engine is closed") -> None:
        super().__init__(reason)


class EngineTimeout(InferenceError):
    """No chunk arrived within the stream's deadline; the request was aborted."""

    code = "engine_timeout"

    def __init__(self, *, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"no progress within {seconds:g} s")


class ModelLoadError(InferenceError):
    """A model folder is missing, incomplete or corrupt. ``path`` is the folder; ``reason`` says what is wrong."""

    code = "model_load_error"

    def __init__(self, *, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load model from {path}: {reason}")


class EngineUnavailable(InferenceError):
    """The requested engine cannot run here (package not installed, no GPU). ``engine`` names it."""

    code = "model_engine_unavailable"

    def __init__(self, *, engine: str, reason: str) -> None:
        self.engine = engine
        self.reason = reason
        super().__init__(f"engine {engine!r} is unavailable: {reason}")
