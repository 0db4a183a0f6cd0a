"""The chat template: how a list of chat messages becomes one prompt for a model that has none of its own.

The project's models are plain causal language models trained on generated text; they ship no chat template. Ours
is deliberately simple and documented in ``docs/openai.md``::

    ### System:
    You are terse.
    ### User:
    What is 3+4?
    ### Assistant:

Each message is a header line ``### <Role>:`` followed by its content and a newline; the prompt ends with the
assistant header, so the model continues as the assistant. Generation stops at the next header (:data:`CHAT_STOP`),
which the endpoint adds to the caller's stop strings. A content that itself contains a header line is rejected rather
than escaped: a user could otherwise forge a system turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from node.inference import InvalidParams

ChatRole = Literal["system", "user", "assistant"]

#: The header that starts each turn (``### User:`` ...). Part of the template's public definition.
_HEADER = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}
#: The stop string the endpoint adds to every chat request: the start of the next turn.
CHAT_STOP = "\n###"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One chat turn."""

    role: ChatRole
    """Who speaks: ``system``, ``user`` or ``assistant``."""
    content: str
    """What is said (private: never logged)."""

    def __repr__(self) -> str:
        return f"ChatMessage(role={self.role!r}, content=<{len(self.content)} chars>)"


def render_chat(messages: Sequence[ChatMessage]) -> str:
    """The prompt for ``messages`` (at least one, the last not from the assistant) under our template."""
    if not messages:
        raise InvalidParams(param="messages", value=0, reason="at least one message")
    if messages[-1].role == "assistant":
        raise InvalidParams(param="messages", value="assistant", reason="the last message must not be the assistant's")
    parts: list[str] = []
    for index, message in enumerate(messages):
        if "\n###" in "\n" + message.content:
            raise InvalidParams(
                param=f"messages.{index}.content", value="###", reason="a line may not start with '###' (a turn header)"
            )
        parts.append(f"{_HEADER[message.role]}\n{message.content}\n")
    parts.append(f"{_HEADER['assistant']}\n")
    return "".join(parts)
