"""The client ("user node"): one :class:`Client` that routes, retries and sends private requests, and an
OpenAI-compatible HTTP endpoint in front of it.

::

    async with Client(directory_source, ClientConfig(models=("tiny@v1",))) as client:
        async for delta in client.stream(request):
            print(delta.text, end="")

    app = create_openai_app(ClientService(client))   # /v1/models, /v1/completions, /v1/chat/completions
"""

from node.client._chat import CHAT_STOP, ChatMessage, render_chat
from node.client._client import (
    Client,
    ClientConfig,
    ClientService,
    Completion,
    DirectorySource,
    OverlayTransport,
    Transport,
)
from node.client._deadline import with_deadline
from node.client._errors import ClientError, RequestTimeout, UnknownModel
from node.client._openai_app import OpenAIConfig, create_openai_app
from node.client._service import CompletionService, ServedModel
from node.client._tokenizer import load_tokenizer

__all__ = [
    "CHAT_STOP",
    "ChatMessage",
    "Client",
    "ClientConfig",
    "ClientError",
    "ClientService",
    "Completion",
    "CompletionService",
    "DirectorySource",
    "OpenAIConfig",
    "OverlayTransport",
    "RequestTimeout",
    "ServedModel",
    "Transport",
    "UnknownModel",
    "create_openai_app",
    "load_tokenizer",
    "render_chat",
    "with_deadline",
]
