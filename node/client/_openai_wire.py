"""The OpenAI API's request and response shapes, as far as PlanetServe serves them (``docs/openai.md``).

Requests are parsed strictly: a field we do not implement is rejected with its name (``param``) unless it is set to
the value that means "off" (``n: 1``, ``echo: false``, penalties ``0``), so a tool never silently gets behaviour it
did not ask for. Responses carry exactly the fields the official ``openai`` package reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Most characters in a chat message or prompt accepted at the endpoint (the overlay's own limit is the same).
MAX_PROMPT_CHARS = 65_536
#: Most chat messages in one request.
MAX_MESSAGES = 256


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200)
    """``name@revision``, a bare ``name`` (the newest registered revision) or the 0x model id."""
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    """Most tokens to generate."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Softmax temperature; 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus mass kept."""
    top_k: int = Field(default=0, ge=0)
    """Common extension: keep the k most likely tokens; 0 disables."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    """Reproducible sampling. When absent the client draws one (every request carries a seed, see the docs)."""
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = None
    """Up to four stop strings (three for chat: the template adds its own)."""
    stream: bool = False
    """Server-sent events instead of one JSON body."""
    stream_options: dict[str, bool] | None = None
    """``{"include_usage": true}`` adds a last chunk carrying ``usage``."""
    user: str | None = Field(default=None, max_length=256)
    """Accepted and ignored (never logged, never sent to a model node)."""
    n: Literal[1] = 1
    """Only one choice per request."""
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    """Not implemented; only 0 is accepted."""
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    """Not implemented; only 0 is accepted."""
    logit_bias: dict[str, float] | None = None
    """Not implemented; only empty is accepted."""

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        if isinstance(value, str) and not 1 <= len(value) <= 64:
            raise ValueError("a stop string has 1..64 characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options(cls, value: dict[str, bool] | None) -> dict[str, bool] | None:
        if value is not None and set(value) - {"include_usage"}:
            raise ValueError("only include_usage is supported")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionsRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(min_length=1)
    """One prompt (a list of exactly one string is accepted too)."""
    echo: Literal[False] = False
    """Not implemented; only false is accepted."""
    logprobs: None = None
    """Not implemented yet; only null is accepted."""
    suffix: None = None
    """Not implemented; only null is accepted."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        text = value if isinstance(value, str) else value[0]
        if not 1 <= len(text) <= MAX_PROMPT_CHARS:
            raise ValueError(f"a prompt has 1..{MAX_PROMPT_CHARS} characters")
        return value

    def prompt_text(self) -> str:
        """The single prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessageIn(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "developer"]
    """``developer`` is OpenAI's newer name for ``system``."""
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    """Plain text (content parts are not supported)."""
    name: str | None = Field(default=None, max_length=64)
    """Accepted and ignored."""


class ChatCompletionsRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    """The conversation so far."""
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    """OpenAI's newer name for ``max_tokens``; wins when both are set."""
    logprobs: Literal[False] | None = None
    """Not implemented yet; only false/null is accepted."""

    def token_limit(self, default: int) -> int:
        """The most tokens to generate."""
        return self.max_completion_tokens or self.max_tokens or default


class Usage(BaseModel):
    """OpenAI's ``usage`` object, with what this request cost."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(default_factory=dict)
    """``cached_tokens``: prompt tokens the model node served from its prefix cache."""
    cost_wei: str = "0"
    """PlanetServe extension: what this request cost the client's wallet, decimal wei (a string: wei exceed what a
    JSON number holds exactly). A retry that never reached its first node adds nothing; "0" from a free node."""
    price_per_1k_tokens_wei: str = "0"
    """PlanetServe extension: the answering node's registered price, decimal wei per 1000 tokens."""


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, *, cost_wei: int = 0, price_per_1k_tokens: int = 0
) -> dict[str, Any]:
    """The ``usage`` object as JSON-ready data."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens},
        cost_wei=str(cost_wei),
        price_per_1k_tokens_wei=str(price_per_1k_tokens),
    ).model_dump()


def error_body(message: str, *, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (``message``, ``type``, ``param``, ``code``)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
