"""``ps-client chat`` and ``ps-client serve``: the chat template and the OpenAI-compatible endpoint, both over the
``Client``.

Both read the registry through the event indexer (``--rpc-url``, ``--deployment``, ``--db``) and send every request
privately (S-IDA cloves over onion paths) through one :class:`node.client.Client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer
from platformdirs import user_data_dir

from cli._client_options import DEFAULT_TIMEOUT_S, CandidatesOpt, TimeoutOpt, TokenizerOpt, prompt_tokenizer
from cli._client_wallet import ClientStateDir
from cli._main import new_app
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl
from cli._output import emit, info

app = new_app("Chat and serve the OpenAI-compatible endpoint.")

DbOpt = Annotated[str | None, typer.Option("--db", envvar="PS_INDEX_DB", help="SQLAlchemy URL of the registry index.")]


def _db(db: str | None) -> str:
    if db is not None:
        return db
    folder = Path(user_data_dir("planetserve")) / "client"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"sqlite:///{folder / 'index.sqlite'}"


def client_wallet(rpc_url: str, deployment: Path | None, state_dir: Path | None = None) -> Any:
    """The client's wallet when ``PS_PRIVATE_KEY`` holds its key: one channel per paid model node, opened on demand
    with ``PS_DEPOSIT`` ETH (default 0.01) while at most ``PS_BUDGET`` ETH (default 0.05) is held in channels
    (``PS_FRESH_ADDRESSES=1``: each new channel from a fresh address). Its book persists in the client state
    directory (``--state-dir``/``PS_STATE_DIR``), so later commands continue the same channels. Without a key only
    free nodes answer (a paid one says ``payment_required``)."""
    if not os.environ.get("PS_PRIVATE_KEY"):
        return None
    from cli._client_wallet import env_wallet

    return env_wallet(rpc_url, deployment, state_dir)


@contextlib.asynccontextmanager
async def _client(
    rpc_url: str,
    deployment: Path | None,
    db: str | None,
    models: tuple[str, ...],
    tokenizer: Path | None,
    state_dir: Path | None = None,
    candidates: int = 16,
) -> AsyncIterator[Any]:
    """The command's ``Client``; on the way out it closes the client, then its wallet (the queued book writes
    written, a failed one raised) and its registry index, however the command ends."""
    from node.client import Client, ClientConfig
    from node.client._registry import RegistryDirectory

    directory = RegistryDirectory(rpc_url, deployment=deployment, db_url=_db(db))
    try:
        wallet = client_wallet(rpc_url, deployment, state_dir)
        try:
            client = Client(
                directory,
                ClientConfig(models=models, candidates=candidates),
                tokenizer=prompt_tokenizer(tokenizer),
                reputation=directory.reputation,
                wallet=wallet,
            )
            async with client:
                yield client
        finally:
            if wallet is not None:
                await asyncio.to_thread(wallet.close)
    finally:
        directory.close()


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="Your message ('-' reads it from stdin).")],
    model: Annotated[str, typer.Option("--model", envvar="PS_MODEL", help="NAME@REVISION or a 0x model id.")],
    system: Annotated[
        str | None, typer.Option("--system", envvar="PS_SYSTEM", help="A system message before yours.")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", envvar="PS_MAX_TOKENS", min=1, max=4096, help="Most tokens to generate.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", envvar="PS_TEMPERATURE", min=0.0, max=2.0, help="0 is greedy.")
    ] = 0.0,
    seed: Annotated[
        int | None, typer.Option("--seed", envvar="PS_SEED", min=0, help="Sampling seed (default: a fresh one).")
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", envvar="PS_STREAM", help="Print the reply as it is generated.")
    ] = True,
    tokenizer: TokenizerOpt = None,
    db: DbOpt = None,
    candidates: CandidatesOpt = 16,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with a model privately, under the documented chat template (docs/openai.md)."""
    import secrets

    from node.client import CHAT_STOP, ChatMessage, render_chat, with_deadline
    from node.overlay import CompletionRequest

    text = sys.stdin.read() if message == "-" else message
    messages = [
        *([ChatMessage(role="system", content=system)] if system else []),
        ChatMessage(role="user", content=text),
    ]
    prompt = render_chat(messages)  # raises InvalidParams naming the message at fault
    names = (model,) if "@" in model else ()

    async def go() -> dict[str, Any]:
        async with _client(rpc_url, deployment, db, names, tokenizer, state_dir, candidates) as client:
            served = await client.resolve(model)
            request = CompletionRequest(
                model=served.model_id,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed if seed is not None else secrets.randbelow(2**63),
                stop=(CHAT_STOP,),
            )
            pieces: list[str] = []
            last: Any = None
            async for delta in with_deadline(client.stream(request), timeout):
                pieces.append(delta.text)
                last = delta
                if stream and not as_json:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
            reply = "".join(pieces)
            if not as_json:
                sys.stdout.write(("" if stream else reply) + "\n")
            return {
                "model": served.name,
                "reply": reply,
                "finish_reason": last.finish_reason,
                "usage": {
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                    "cached_tokens": last.cached_tokens,
                },
            }

    result = asyncio.run(go())
    if as_json:
        emit(result, as_json=True)


@app.command()
def serve(
    port: Annotated[int, typer.Option("--port", envvar="PS_OPENAI_PORT", min=0, max=65535, help="0: any free.")] = 8080,
    host: Annotated[str, typer.Option("--host", envvar="PS_OPENAI_HOST", help="Address to listen on.")] = "127.0.0.1",
    model: Annotated[
        list[str] | None, typer.Option("--model", envvar="PS_MODEL", help="NAME@REVISION to serve by name (repeat).")
    ] = None,
    tokenizer: TokenizerOpt = None,
    db: DbOpt = None,
    candidates: CandidatesOpt = 16,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) until Ctrl-C.

    Set ``PS_OPENAI_API_KEY`` to require that bearer key from callers (the endpoint is for 127.0.0.1 otherwise).
    """
    from aiohttp import web

    from node.client import ClientService, OpenAIConfig, create_openai_app

    config = OpenAIConfig(api_key=os.environ.get("PS_OPENAI_API_KEY") or None)

    async def go() -> None:
        async with _client(rpc_url, deployment, db, tuple(model or ()), tokenizer, state_dir, candidates) as client:
            service = ClientService(client)
            await service.refresh()
            runner = web.AppRunner(create_openai_app(service, config), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0]
            base_url = f"http://{bound[0]}:{bound[1]}/v1"
            emit({"base_url": base_url, "models": [m.name for m in service.models()]}, as_json=as_json, title="serving")
            if not as_json:
                info("press Ctrl-C to stop")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                while not stop.is_set():
                    try:
                        async with asyncio.timeout(5.0):
                            await stop.wait()
                    except TimeoutError:
                        await service.refresh()
            finally:
                await runner.cleanup()

    asyncio.run(go())
    info("stopped")
