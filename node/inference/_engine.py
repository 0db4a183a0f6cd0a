"""The one narrow ``Engine`` protocol the overlay and the verifier program against.

Deliberately smaller than vLLM's: streaming ``generate``, teacher-forced ``score``, ``stats`` for heartbeats, ``abort``,
``check_health`` and ``close``. Nothing behind it (torch, TensorRT-LLM) leaks through.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

from node.inference._types import EngineStats, GenerationChunk, GenerationRequest, ScoreResult
from planetserve import ModelId


@runtime_checkable
class Engine(Protocol):
    """An inference engine serving one model."""

    @property
    def model_id(self) -> ModelId:
        """The served model's registry id (keccak of ``name@revision``; ``ModelId.ZERO`` without metadata)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream the completion as delta chunks; the last one carries ``finish_reason``.

        Raises ``EngineOverloaded`` (queue full) or ``InvalidParams`` on the first iteration, before any chunk.
        Closing or cancelling the iterator early aborts the request.
        """
        ...

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """Per-token log-probs of ``completion`` after ``prompt`` (teacher forcing)."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot of queue, running requests, cache summary and throughput."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Stop a queued or running request; True if it was found."""
        ...

    async def check_health(self) -> bool:
        """True while the engine can serve (worker alive, not closed)."""
        ...

    async def close(self) -> None:
        """Stop accepting work, abort what is in flight, release the model. Idempotent."""
        ...
