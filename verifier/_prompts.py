"""Challenge prompts drawn fresh from the distribution users' prompts come from, never from a fixed list.

Why: a model node that could recognise audits would answer them honestly and cheat on everyone else. So a challenge
must look like a user request in everything the node sees: the prompt's grammar and length, the sampling parameters,
the sealed request's size class (``docs/protocol.md`` §6.3) and, across an epoch, how often prefixes repeat.

**The distribution** (:class:`PromptDistribution`) is the project's user grammar, built on the training corpus's
(``node/inference/_corpus.py``) line kinds with fresh random operands and words: few-shot additions as the demo
sends them (``03+04=07\\n…12+07=``), echo and reverse tasks, fact questions, sentence continuations, and any of
them wrapped in the OpenAI chat template (``node.client.render_chat``) as the OpenAI endpoint sends them. The number
of worked examples ahead of the question is heavy-tailed (Zipf-like, up to a context-safe length), so long prompts
(larger size classes) occur as they do for users; and a share of prompts reuse one of a small pool of prefixes
chosen Zipf(1.1), as users sharing a system prompt or few-shot block do (``bench/forwarding.py``'s workload), so
a prefix-cache hit is no sign of a user. Parameters follow what clients send: ``max_tokens`` from the
task's usual range, temperature 0 (greedy) or 0.8 (sampled) — the two temperatures scoring is calibrated at —
``top_p`` 1, and always a fresh 63-bit ``seed`` (the OpenAI endpoint and the verifier both send one, so a sampled
answer can be replayed).

The same :meth:`PromptDistribution.draw` serves both sides: :class:`ChallengeGenerator` draws challenges from a
keyed stream, and :func:`user_request` draws "user" traffic from any ``random.Random`` (benchmarks, tests, the
wire-shape comparison). Sameness by construction is the point.

**Keying.** A challenge is derived from its planned key (``verifier._epoch.PlannedChallenge.key``, itself from the
epoch seed) and the verifier's private **salt** by HMAC-SHA256 in counter mode. The epoch seed is secret until the
verifier publishes its evidence; the salt stays secret after that, so a published seed still does not let anyone
precompute any other epoch's prompts from a leaked seed alone, and a checker given the salt in a dispute can re-derive
every prompt (the evidence carries ``keccak256(salt)`` to pin it: a verifier that changed its salt to grind prompts
would show a changed commitment).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from node.inference._corpus import MAX_OPERAND, MAX_PAYLOAD_WORDS, addition_line, facts
from verifier._errors import InvalidVerifierInput

if TYPE_CHECKING:
    from node.overlay._completion import CompletionRequest

#: Bytes of a verifier's private prompt salt.
SALT_BYTES = 32
#: Line kinds a prompt asks about, and their share among prompts (sums to 1).
KINDS: tuple[str, ...] = ("addition", "echo", "reverse", "fact", "sentence")
_KIND_WEIGHTS = (0.45, 0.18, 0.14, 0.11, 0.12)
#: Share of prompts wrapped in the chat template (OpenAI ``/v1/chat/completions`` users).
CHAT_SHARE = 0.2
#: Share of prompts that start with one of the pool's shared prefixes.
SHARED_PREFIX_SHARE = 0.4
#: Prefixes in the shared pool, drawn Zipf(:data:`PREFIX_ZIPF`).
PREFIX_POOL = 8
PREFIX_ZIPF = 1.1
#: Temperatures prompts use (greedy and sampled) and the share of greedy ones.
TEMPERATURES = (0.0, 0.8)
GREEDY_SHARE = 0.5
#: Default bound on a prompt's characters. Measured on the default model's byte-level BPE: mixed corpus text is
#: about 0.47 tokens per character, but digits are about one token each, so 3,600 characters of few-shot additions
#: are up to ~3,450 tokens: more than the default models' 2,048 positions. Pass ``tokenize`` and
#: ``context_tokens`` to trim to the model; without them this bound keeps prompt + ``max_tokens`` under 2,048 tokens
#: for any byte-level tokenizer (at most one token per ASCII character).
DEFAULT_MAX_PROMPT_CHARS = 1_900

_ADJ = ("red", "small", "old", "quiet", "happy", "green", "tall", "cold", "bright", "lazy")
_NOUN = ("cat", "dog", "bird", "river", "tree", "child", "farmer", "ship", "lamp", "horse", "teacher", "stone")
_VERB = ("sees", "likes", "follows", "finds", "paints", "carries", "watches", "helps")
_SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "vo", "zi", "pa", "dor", "el", "shi", "ba")
_SYSTEM = ("You are terse.", "Answer with the result only.", "You are a helpful assistant.", "Be brief.")
#: max_tokens ranges per kind (what a client asking that kind of question sets).
_MAX_TOKENS: dict[str, tuple[int, ...]] = {
    "addition": (2, 3, 4, 6, 8, 16),
    "echo": (8, 12, 16, 24),
    "reverse": (8, 12, 16, 24),
    "fact": (4, 6, 8, 16),
    "sentence": (16, 24, 32, 48, 64),
}


class Draws(Protocol):
    """A source of uniform draws (a keyed stream for challenges, ``random.Random`` for users)."""

    def random(self) -> float:
        """A float in [0, 1)."""


class KeyedDraws:
    """Uniform floats from ``HMAC-SHA256(salt, key || counter)``: deterministic, unpredictable without the salt."""

    __slots__ = ("_buffer", "_counter", "_key", "_salt")

    def __init__(self, key: bytes, salt: bytes) -> None:
        self._key = key
        self._salt = salt
        self._counter = 0
        self._buffer: list[int] = []

    def random(self) -> float:
        if not self._buffer:
            block = hmac.new(self._salt, self._key + self._counter.to_bytes(8, "big"), hashlib.sha256).digest()
            self._counter += 1
            self._buffer = [int.from_bytes(block[i : i + 8], "big") >> 11 for i in range(0, 32, 8)]
        return self._buffer.pop() / float(1 << 53)

    def __repr__(self) -> str:
        return "KeyedDraws(<redacted>)"


def _integer(draws: Draws, low: int, high: int) -> int:
    """A uniform integer in ``[low, high]``."""
    return low + min(int(draws.random() * (high - low + 1)), high - low)


def _choice(draws: Draws, options: Sequence[str] | Sequence[int] | Sequence[float]) -> object:
    return options[_integer(draws, 0, len(options) - 1)]


def _weighted(draws: Draws, weights: Sequence[float]) -> int:
    u, total = draws.random() * sum(weights), 0.0
    for index, weight in enumerate(weights):
        total += weight
        if u < total:
            return index
    return len(weights) - 1


def _zipf_weights(count: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChallengeRequest:
    """One prompt with its sampling parameters: a user request's shape. The prompt is private until published."""

    #: The prompt text (never in reprs or logs).
    prompt: str = field(repr=False)
    #: Most tokens to generate, 1..4096.
    max_tokens: int
    #: 0 (greedy) or a sampling temperature.
    temperature: float
    #: Nucleus sampling bound, (0, 1].
    top_p: float = 1.0
    #: The request's sampling seed, 0..2**63-1 (always set: replayable; not in reprs).
    seed: int = field(repr=False)
    #: Stop strings (at most four).
    stop: tuple[str, ...] = ()
    #: The line kind asked about (one of :data:`KINDS`).
    kind: str
    #: Whether the prompt is in the chat template.
    chat: bool = False

    def completion_request(self, model: str) -> CompletionRequest:
        """The §10.1 request for the model id ``model`` (0x + 64 hex), exactly as a user's is built."""
        from node.overlay._completion import CompletionRequest

        return CompletionRequest(
            model=model,
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptDistribution:
    """The user prompt distribution (see the module docstring); its bounds are parameters."""

    #: Longest prompt in characters (keep prompt + max_tokens inside the served model's context).
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    #: Most worked examples before the question (the tail of the Zipf-like count).
    max_shots: int = 400
    #: Share of prompts in the chat template, in [0, 1].
    chat_share: float = CHAT_SHARE
    #: Share of prompts starting with a shared-pool prefix, in [0, 1].
    shared_prefix_share: float = SHARED_PREFIX_SHARE
    #: The served model's tokenizer (``node.client.load_tokenizer``); with :attr:`context_tokens`, prompts are
    #: trimmed to fit the model's context. None: only :attr:`max_prompt_chars` bounds them.
    tokenize: Callable[[str], Sequence[int]] | None = field(default=None, repr=False, compare=False)
    #: The model's context in tokens (``max_position_embeddings``); prompt + ``max_tokens`` stay within it.
    context_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_prompt_chars, int) or not 64 <= self.max_prompt_chars <= 65_536:
            raise InvalidVerifierInput("max_prompt_chars", self.max_prompt_chars, "in [64, 65536]")
        if not isinstance(self.max_shots, int) or not 0 <= self.max_shots <= 10_000:
            raise InvalidVerifierInput("max_shots", self.max_shots, "in [0, 10000]")
        if self.context_tokens is not None and (not isinstance(self.context_tokens, int) or self.context_tokens < 128):
            raise InvalidVerifierInput("context_tokens", self.context_tokens, "at least 128 tokens")
        for name in ("chat_share", "shared_prefix_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidVerifierInput(name, value, "in [0, 1]")

    # -- lines -------------------------------------------------------------------------------------------------

    @staticmethod
    def _words(draws: Draws) -> list[str]:
        count = _integer(draws, 2, MAX_PAYLOAD_WORDS)
        return ["".join(str(_choice(draws, _SYLLABLES)) for _ in range(_integer(draws, 1, 2))) for _ in range(count)]

    def _example(self, draws: Draws, kind: str) -> tuple[str, str]:
        """(question, answer) of one line of ``kind``: the prompt ends where the answer begins."""
        if kind == "addition":
            a, b = _integer(draws, 0, MAX_OPERAND), _integer(draws, 0, MAX_OPERAND)
            line = addition_line(a, b)
            cut = line.index("=") + 1
            return line[:cut], line[cut:]
        if kind in ("echo", "reverse"):
            words = self._words(draws)
            answer = words if kind == "echo" else list(reversed(words))
            return f"{kind} {' '.join(words)} :", " " + " ".join(answer)
        if kind == "fact":
            world = facts()
            name, attr, value = world[_integer(draws, 0, len(world) - 1)]
            return f"the {attr} of {name} is", f" {value}."
        sentence = (
            f"the {_choice(draws, _ADJ)} {_choice(draws, _NOUN)} {_choice(draws, _VERB)} the {_choice(draws, _NOUN)}."
        )
        cut = _integer(draws, 1, 3)
        words = sentence.split(" ")
        return " ".join(words[:cut]), " " + " ".join(words[cut:])

    def _shots(self, draws: Draws) -> int:
        """Worked examples before the question: 0 with probability ~1/3, else Zipf(1.1)-like up to max_shots."""
        if self.max_shots == 0 or draws.random() < 1 / 3:
            return 0
        # Inverse of a continuous power law on [1, max_shots + 1): heavy-tailed like shared-prefix lengths.
        u = draws.random()
        top = float(self.max_shots + 1)
        exponent = 1 - PREFIX_ZIPF
        value = float(math.pow(1 + u * (math.pow(top, exponent) - 1), 1 / exponent))
        return max(1, min(self.max_shots, math.floor(value)))

    def _context(self, draws: Draws, kind: str, shots: int, budget: int) -> str:
        return "".join(self._context_lines(draws, kind, shots, budget))

    def _context_lines(self, draws: Draws, kind: str, shots: int, budget: int) -> list[str]:
        lines: list[str] = []
        used = 0
        for _ in range(shots):
            question, answer = self._example(draws, kind)
            line = question + answer + "\n"
            if used + len(line) > budget:
                break
            lines.append(line)
            used += len(line)
        return lines

    # -- the draw ----------------------------------------------------------------------------------------------

    def draw(self, draws: Draws, *, shared_prefixes: Sequence[str] = ()) -> ChallengeRequest:
        """One request from the distribution, using ``draws``; ``shared_prefixes`` is the pool users share (the
        first is the most popular).

        Every random choice is made first, in a fixed order; then, when :attr:`tokenize` is set, the oldest worked
        examples (and then the shared prefix) are dropped until the prompt and ``max_tokens`` fit in
        :attr:`context_tokens`, as a user's client trims a too-long history.
        """
        kind = KINDS[_weighted(draws, _KIND_WEIGHTS)]
        chat = draws.random() < self.chat_share
        question, _ = self._example(draws, kind)
        reserve = len(question) + 160  # the chat template's headers and a system line fit in this
        prefix = ""
        if shared_prefixes and draws.random() < self.shared_prefix_share:
            prefix = shared_prefixes[_weighted(draws, _zipf_weights(len(shared_prefixes), PREFIX_ZIPF))]
            prefix = prefix[: max(0, self.max_prompt_chars - reserve)]
        budget = max(0, self.max_prompt_chars - reserve - len(prefix))
        lines = self._context_lines(draws, kind, self._shots(draws), budget)
        stop: tuple[str, ...] = ("\n",) if kind in ("addition", "fact") or draws.random() < 0.5 else ()
        system = str(_choice(draws, _SYSTEM)) if draws.random() < 0.5 else None
        newline = draws.random() < 0.5
        greedy = draws.random() < GREEDY_SHARE
        max_tokens = int(_choice(draws, _MAX_TOKENS[kind]))  # type: ignore[call-overload]
        seed = _integer(draws, 0, 2**63 - 1)
        if chat:
            from node.client import CHAT_STOP

            stop = (CHAT_STOP,)

        def assemble(keep: int, with_prefix: bool) -> str:
            body = (prefix if with_prefix else "") + "".join(lines[len(lines) - keep :]) + question
            if chat:
                from node.client import ChatMessage, render_chat

                messages = [ChatMessage(role="user", content=body)]
                if system is not None:
                    messages.insert(0, ChatMessage(role="system", content=system))
                return render_chat(messages)
            return "\n" + body if newline else body  # a line start, as in training and ``held_out_prompts``

        prompt = assemble(len(lines), True)
        if self.tokenize is not None and self.context_tokens is not None:
            room = self.context_tokens - max_tokens
            fits = self.tokenize
            if len(fits(prompt)) > room:
                low, high = 0, len(lines)  # the most recent ``low`` examples (with the prefix) fit, or none do
                while low < high:
                    middle = (low + high + 1) // 2
                    if len(fits(assemble(middle, True))) <= room:
                        low = middle
                    else:
                        high = middle - 1
                prompt = assemble(low, True)
                if len(fits(prompt)) > room:
                    prompt = assemble(0, False)
        return ChallengeRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=TEMPERATURES[0] if greedy else TEMPERATURES[1],
            seed=seed,
            stop=stop,
            kind=kind,
            chat=chat,
        )

    def prefix_pool(self, draws: Draws, size: int = PREFIX_POOL) -> tuple[str, ...]:
        """``size`` shared prefixes (few-shot blocks, optionally after a header line), most popular first."""
        pool: list[str] = []
        for _ in range(size):
            kind = KINDS[_weighted(draws, _KIND_WEIGHTS)]
            shots = _integer(draws, 2, 24)
            pool.append(self._context(draws, kind, shots, self.max_prompt_chars // 2))
        return tuple(pool)


def user_request(rng: random.Random, distribution: PromptDistribution | None = None) -> ChallengeRequest:
    """A user request drawn from ``rng``: what benchmarks and tests send as user traffic (same distribution).

    Users' shared prefixes are modelled by a pool drawn once per ``rng`` seed: call :func:`user_prefix_pool` and
    pass it to :meth:`PromptDistribution.draw` to model them; this helper draws without one.
    """
    return (distribution or PromptDistribution()).draw(rng)


def user_prefix_pool(rng: random.Random, distribution: PromptDistribution | None = None) -> tuple[str, ...]:
    """A pool of prefixes users share (see :meth:`PromptDistribution.prefix_pool`)."""
    return (distribution or PromptDistribution()).prefix_pool(rng)


class ChallengeGenerator:
    """Challenges of one epoch: each from its planned key and the verifier's salt, sharing one epoch prefix pool.

    ``epoch_seed`` is the epoch's seed (``EpochSeed.seed``); ``salt`` the verifier's private :data:`SALT_BYTES`.
    """

    __slots__ = ("_distribution", "_epoch_seed", "_pool", "_salt")

    def __init__(self, epoch_seed: bytes, salt: bytes, distribution: PromptDistribution | None = None) -> None:
        if not isinstance(epoch_seed, bytes) or len(epoch_seed) != 32:
            raise InvalidVerifierInput("epoch_seed", "<redacted>", "exactly 32 bytes")
        if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
            raise InvalidVerifierInput("salt", "<redacted>", f"exactly {SALT_BYTES} bytes")
        self._salt = salt
        self._epoch_seed = epoch_seed
        self._distribution = distribution or PromptDistribution()
        self._pool = self._distribution.prefix_pool(KeyedDraws(b"planetserve/prompts/pool/" + epoch_seed, salt))

    def challenge(self, key: bytes) -> ChallengeRequest:
        """The challenge for a planned challenge's ``key`` (``PlannedChallenge.key``): the same key, the same one."""
        if not isinstance(key, bytes) or len(key) != 32:
            raise InvalidVerifierInput("key", "<redacted>", "exactly 32 bytes")
        draws = KeyedDraws(b"planetserve/prompts/challenge/" + self._epoch_seed + key, self._salt)
        return self._distribution.draw(draws, shared_prefixes=self._pool)

    def __repr__(self) -> str:
        return "ChallengeGenerator(<redacted>)"


def salt_commitment(salt: bytes) -> bytes:
    """``keccak256(salt)``: what the evidence carries to pin the salt without revealing it."""
    from verifier._epoch import keccak256

    return keccak256(salt)


def sealed_size_class(request: CompletionRequest, *, n: int = 4, k: int = 3) -> int:
    """The §6.3 size class the sealed ``request`` travels in over ``n`` cloves (any ``k`` rebuild it).

    Computed by the same code the client sends with (envelope, S-IDA split, class table), so a test can compare
    challenges' and users' classes; the reply key is random, its length fixed, so the class does not depend on it.
    """
    import secrets

    from node.privacy import Envelope, split
    from node.privacy._sizeclass import size_class

    envelope = Envelope(reply_key=secrets.token_bytes(32), body=request.to_bytes()).to_bytes()
    return size_class(len(split(envelope, n, k)[0].to_bytes()))
