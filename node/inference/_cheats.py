"""Deliberately dishonest engines, for testing verifiers and for the demo: NEVER use one to serve users.

A verifier is only as good as the cheats it was tested against. Besides serving a cheaper model (the variants of
``make_variant``, which are served by an ordinary engine), a node can cheat at the engine level:

- ``"canned"``: answer every cheated request with the same fixed text, without running a model;
- ``"replay"``: answer with an earlier honest answer to some other prompt (remembered in a bounded buffer);
- ``"substitute"``: run the cheated request on a second, cheaper real engine (e.g. the int8 or half-width variant).

``fraction`` (0..1] cheats on only that share of requests, drawn per request from a ``random.Random(seed)``, so a
test knows exactly which requests were cheated on (``decisions``) and a verifier must catch a node that is honest
most of the time. ``CheatingEngine`` implements the ``Engine`` protocol around a real honest engine; its
``model_id`` is the honest model's, because a cheater claims the registered model. ``score`` is always honest: a
node's score is never what a verifier trusts (the verifier scores on its own reference engine).

Selection is explicit only: nothing in the node's configuration, CLI or environment builds one; a test or the demo
constructs it by name (from ``node.inference.testing``). Its ``repr`` says CHEATING so a log never hides it. A model
node that cheats on 20% of requests with the int8 variant, for a verifier test::

    from node.inference import TorchEngine
    from node.inference.testing import CheatConfig, CheatingEngine

    honest = TorchEngine.from_folder(model_dir)
    engine = CheatingEngine(
        honest, CheatConfig(mode="substitute", fraction=0.2, seed=7), substitute=TorchEngine.from_folder(int8_dir)
    )
    app = create_model_app(overlay_config, engine)  # node.overlay's model-node app, as ps-node serve builds it

A node that answers every request with an earlier answer: ``CheatingEngine(honest, CheatConfig(mode="replay"),
tokenize=honest.tokenize, detokenize=honest.detokenize)``; with ``mode="canned"`` it never runs the model.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from node.inference._engine import Engine
from node.inference._errors import InvalidParams
from node.inference._types import EngineStats, GenerationChunk, GenerationRequest, ScoreResult
from planetserve import ModelId

CheatMode = Literal["canned", "replay", "substitute"]
CHEAT_MODES: tuple[str, ...] = ("canned", "replay", "substitute")
#: Most earlier answers a replaying cheater remembers.
MAX_REPLAY_WINDOW = 1024
#: Most per-request decisions kept for inspection (oldest dropped first).
MAX_DECISIONS = 4096
#: The log-prob a canned answer claims for each token (it never ran a model, so it makes one up).
CANNED_LOGPROB = -0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class CheatConfig:
    """How a ``CheatingEngine`` cheats."""

    #: "canned", "replay" or "substitute" (see the module docstring).
    mode: CheatMode
    #: Share of requests cheated on, in (0, 1]; 1 cheats on every request.
    fraction: float = 1.0
    #: Seed of the per-request draw (and of the replay choice), 0..2**63-1.
    seed: int = 0
    #: The fixed answer of "canned" (1..4096 characters); cut to each request's ``max_tokens``.
    canned_text: str = " 42\nthe cat sees the dog."
    #: Earlier answers "replay" remembers, 1..MAX_REPLAY_WINDOW.
    replay_window: int = 64

    def __post_init__(self) -> None:
        if self.mode not in CHEAT_MODES:
            raise InvalidParams(param="mode", value=self.mode, reason=f"one of {', '.join(CHEAT_MODES)}")
        if not isinstance(self.fraction, (int, float)) or not 0.0 < self.fraction <= 1.0:
            raise InvalidParams(param="fraction", value=self.fraction, reason="must be in (0, 1]")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidParams(param="seed", value=self.seed, reason="must be in 0..2**63-1")
        if not 0 < len(self.canned_text) <= 4096:
            raise InvalidParams(param="canned_text", value=len(self.canned_text), reason="1..4096 characters")
        if not 1 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise InvalidParams(param="replay_window", value=self.replay_window, reason=f"1..{MAX_REPLAY_WINDOW}")


@dataclass(frozen=True, slots=True)
class _Answer:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: Literal["stop", "length", "abort"]


class CheatingEngine:
    """An ``Engine`` that cheats on a seeded fraction of requests (see the module docstring). Tests and demo only.

    ``tokenize``/``detokenize`` (e.g. a ``TorchEngine``'s own methods) are needed by "canned" and "replay" to count
    and cut tokens; ``substitute`` is the cheaper real engine "substitute" runs. The wrapper owns both engines and
    closes them.
    """

    def __init__(
        self,
        honest: Engine,
        config: CheatConfig,
        *,
        substitute: Engine | None = None,
        tokenize: Callable[[str], Sequence[int]] | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        if config.mode == "substitute" and substitute is None:
            raise InvalidParams(param="substitute", value=None, reason="mode 'substitute' needs a second engine")
        if config.mode in ("canned", "replay") and (tokenize is None or detokenize is None):
            raise InvalidParams(param="tokenize", value=None, reason=f"mode {config.mode!r} needs a tokenizer")
        self._honest = honest
        self._substitute = substitute
        self._config = config
        self._tokenize = tokenize
        self._detokenize = detokenize
        self._rng = random.Random(config.seed)
        self._replay_rng = random.Random(config.seed ^ 0x5EED)
        self._earlier: deque[_Answer] = deque(maxlen=config.replay_window)
        self._decisions: deque[tuple[str, bool]] = deque(maxlen=MAX_DECISIONS)
        self._cheated = 0
        self._served = 0

    def __repr__(self) -> str:
        return f"CheatingEngine(CHEATING mode={self._config.mode!r}, fraction={self._config.fraction})"

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def config(self) -> CheatConfig:
        """How this engine cheats."""
        return self._config

    @property
    def decisions(self) -> tuple[tuple[str, bool], ...]:
        """(request id, cheated?) per request so far, oldest first (the last ``MAX_DECISIONS``)."""
        return tuple(self._decisions)

    @property
    def cheated_requests(self) -> int:
        """Requests answered dishonestly so far."""
        return self._cheated

    @property
    def served_requests(self) -> int:
        """Requests received so far."""
        return self._served

    # ------------------------------------------------------------------------------------------------ Engine
    @property
    def model_id(self) -> ModelId:
        """The honest model's id: a cheater claims the registered model."""
        return self._honest.model_id

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Honest, or (with probability ``fraction``) canned, replayed or substituted; see the module docstring."""
        cheat = self._rng.random() < self._config.fraction
        self._served += 1
        self._decisions.append((request.request_id, cheat))
        mode = self._config.mode
        if cheat and mode == "substitute":
            assert self._substitute is not None
            self._cheated += 1
            async for chunk in self._substitute.generate(request):
                yield chunk
            return
        if cheat and mode == "canned":
            self._cheated += 1
            assert self._tokenize is not None
            canned = tuple(self._tokenize(self._config.canned_text))
            answer = _Answer(canned, (CANNED_LOGPROB,) * len(canned), self._config.canned_text, "stop")
            yield self._fabricated(request, answer)
            return
        if cheat and mode == "replay" and self._earlier:
            self._cheated += 1
            yield self._fabricated(request, self._replay_rng.choice(list(self._earlier)))
            return
        if cheat:  # replay with nothing to replay yet: answer honestly and remember it
            self._decisions[-1] = (request.request_id, False)
        ids: list[int] = []
        logprobs: list[float] = []
        texts: list[str] = []
        async for chunk in self._honest.generate(request):
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            texts.append(chunk.text)
            if chunk.finish_reason is not None and mode == "replay":
                self._earlier.append(_Answer(tuple(ids), tuple(logprobs), "".join(texts), chunk.finish_reason))
            yield chunk

    def _fabricated(self, request: GenerationRequest, answer: _Answer) -> GenerationChunk:
        """One final chunk carrying ``answer`` cut to the request's ``max_tokens``, as an honest stream would end."""
        assert self._tokenize is not None and self._detokenize is not None
        limit = request.params.max_tokens
        ids, logprobs, text, reason = answer.token_ids, answer.logprobs, answer.text, answer.finish_reason
        if len(ids) > limit:
            ids, logprobs, reason = ids[:limit], logprobs[:limit], "length"
            text = self._detokenize(ids)
        prompt = request.prompt
        prompt_tokens = len(self._tokenize(prompt)) if isinstance(prompt, str) else len(prompt)
        return GenerationChunk(
            request_id=request.request_id,
            token_ids=ids,
            logprobs=logprobs,
            text=text,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
            cached_tokens=0,
        )

    async def score(self, prompt: str | Sequence[int], completion: str | Sequence[int]) -> ScoreResult:
        """The honest engine's score (a verifier never trusts a node's own scoring)."""
        return await self._honest.score(prompt, completion)

    def stats(self) -> EngineStats:
        """The honest engine's stats (what the node advertises)."""
        return self._honest.stats()

    async def abort(self, request_id: str) -> bool:
        """Abort on whichever engine holds the request."""
        found = await self._honest.abort(request_id)
        if self._substitute is not None:
            found = await self._substitute.abort(request_id) or found
        return found

    async def check_health(self) -> bool:
        """Healthy while the honest (and the substitute) engine is."""
        ok = await self._honest.check_health()
        if self._substitute is not None:
            ok = ok and await self._substitute.check_health()
        return ok

    async def close(self) -> None:
        """Close both engines (idempotent, as theirs are)."""
        await self._honest.close()
        if self._substitute is not None:
            await self._substitute.close()
