"""What the OpenAI-compatible endpoint needs from a client: the models it can reach and a completion stream.

:class:`~node.client.Client` implements it over the overlay. The endpoint depends only on this protocol, so the
endpoint's parsing, streaming and error shapes are one module and the network is another.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from node.overlay import CompletionDelta, CompletionRequest
from planetserve import ModelId


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedModel:
    """A model the client can route requests for."""

    name: str
    """``name@revision``, or the 0x model id when no name is known for it."""
    model_id: ModelId
    """keccak of ``name@revision``, as registered on chain."""
    nodes: int
    """Routable model nodes serving it right now."""


class CompletionService(Protocol):
    """A source of completions for the endpoint (the :class:`~node.client.Client`, or a test's neighbour)."""

    def models(self) -> Sequence[ServedModel]:
        """Models with at least one routable node."""
        ...

    def resolve_model(self, model: str) -> ServedModel:
        """``name@revision``, a bare name (newest revision) or a 0x id; raises ``UnknownModel``."""
        ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionDelta]:
        """Send ``request`` privately and yield its deltas; the last one has ``finish_reason`` set."""
        ...
