"""The model id: one value, ``keccak256(utf8("name@revision"))``, written one way everywhere above the edges.

Why a ``str`` subclass holding the canonical ``0x`` + 64 lowercase hex text, rather than a bytes wrapper or a bare
``NewType``: the id crosses JSON far more often than the ABI (wire requests, heartbeats, ``planetserve.json``, CLI
``--json`` output, the OpenAI ``model`` field, dictionary keys of directories), and there the canonical text is
what goes out unchanged; the chain is the one place that wants the 32 raw bytes, and gets them from
:meth:`ModelId.to_bytes` at its edge. Unlike a ``NewType``, construction validates and normalises (any hex case in,
lowercase out), so two spellings of one id can never compare unequal; and since the class is a ``str``, a typed
``ModelId`` parameter refuses a plain string under mypy while a ``ModelId`` still goes wherever text is expected.
"""

from __future__ import annotations

import re
from typing import ClassVar

from planetserve._errors import InvalidValue
from planetserve._keccak import keccak256

_HEX64 = re.compile(r"0x[0-9a-fA-F]{64}")
#: ``name@revision``: what the registry hashes. Names may hold ``/`` (``org/model``); one ``@``; bounded lengths.
_NAME_AT_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,128}@[A-Za-z0-9._-]{1,64}")


class ModelId(str):
    """A model's 32-byte on-chain id as canonical ``0x`` + 64 lowercase hex characters.

    ``ModelId(value)`` accepts the two edge forms, the ``0x``-hex text (any case) and the 32 raw bytes of an ABI
    ``bytes32``, and raises :class:`~planetserve.InvalidValue` for anything else. :meth:`of` derives the id from
    ``name@revision``. The all-zero id (:attr:`ZERO`) is what the registry stores for relays.
    """

    __slots__ = ()

    #: The all-zero id: "no model" (relays).
    ZERO: ClassVar[ModelId]

    def __new__(cls, value: str | bytes) -> ModelId:
        return cls.parse(value)

    @classmethod
    def parse(cls, value: object, *, param: str = "model_id") -> ModelId:
        """``value`` (``0x``-hex text or 32 bytes) as a model id, or ``InvalidValue(param=param)``."""
        if isinstance(value, ModelId):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            if len(raw) != 32:
                raise InvalidValue(param, f"<{len(raw)} bytes>", "a model id is exactly 32 bytes")
            return str.__new__(cls, "0x" + raw.hex())
        if isinstance(value, str):
            if not _HEX64.fullmatch(value):
                raise InvalidValue(param, value, "expected a model id: 0x and 64 hex digits")
            return str.__new__(cls, value.lower())
        raise InvalidValue(param, type(value).__name__, "expected a model id: 0x and 64 hex digits")

    @classmethod
    def of(cls, name_at_revision: str, *, param: str = "model") -> ModelId:
        """The registry's id of ``name@revision`` (e.g. ``ps-tiny@3f1c...``): keccak256 of its UTF-8 bytes.

        The one function from a model's name to its id; the name is validated first (``InvalidValue``), so a
        typo is an error here rather than an id nobody registered.
        """
        if not isinstance(name_at_revision, str) or not _NAME_AT_REVISION.fullmatch(name_at_revision):
            raise InvalidValue(param, name_at_revision, "expected NAME@REVISION, e.g. tiny-llama@v1")
        return str.__new__(cls, "0x" + keccak256(name_at_revision.encode()).hex())

    def to_bytes(self) -> bytes:
        """The 32 raw bytes (an ABI ``bytes32``): the chain edge's form."""
        return bytes.fromhex(self[2:])

    @property
    def is_zero(self) -> bool:
        """Whether this is the all-zero id (relays register it: they serve no model)."""
        return self == ModelId.ZERO

    def __repr__(self) -> str:
        return f"ModelId({str.__repr__(self)})"


ModelId.ZERO = ModelId(bytes(32))


def is_model_name(text: str) -> bool:
    """Whether ``text`` has the ``name@revision`` shape that :meth:`ModelId.of` accepts (no hashing)."""
    return bool(_NAME_AT_REVISION.fullmatch(text))
