"""``ps-client``: send private requests to the PlanetServe network.

``ps-client ask`` resolves the model on chain, picks a routable model node and relay paths from the registry (via the
event indexer), seals the prompt into S-IDA cloves over onion paths, and streams the reply text to stdout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from platformdirs import user_data_dir

from cli import _client_net, _client_recover, _client_wallet
from cli._client_options import DEFAULT_TIMEOUT_S, CandidatesOpt, TimeoutOpt, TokenizerOpt, prompt_tokenizer
from cli._client_wallet import ClientStateDir
from cli._main import new_app, run
from cli._node_chain import DEFAULT_RPC_URL, DeploymentOpt, JsonOpt, RpcUrl, default_index_db, open_chain
from cli._output import emit, info
from node.inference import InvalidParams
from planetserve import InvalidValue, ModelId

app = new_app("Send private requests to the PlanetServe network.", root=True)
app.add_typer(_client_net.app)
app.add_typer(_client_wallet.app)
app.add_typer(_client_recover.app)


@app.command()
def version() -> None:
    """Print the installed PlanetServe version."""
    from importlib.metadata import version as _version

    print(_version("planetserve"))


def _model_id(model: str) -> ModelId:
    """``NAME@REVISION`` or a 0x id to the model id (``InvalidValue`` when it is neither)."""
    return ModelId.of(model) if "@" in model else ModelId(model)


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).")],
    model: Annotated[str, typer.Option("--model", envvar="PS_MODEL", help="NAME@REVISION or a 0x model id.")],
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", envvar="PS_MAX_TOKENS", help="Most tokens to generate.")
    ] = 32,
    temperature: Annotated[
        float, typer.Option("--temperature", envvar="PS_TEMPERATURE", help="0 (greedy) to 2.")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", envvar="PS_SEED", help="Sampling seed.")] = None,
    paths: Annotated[int, typer.Option("--paths", envvar="PS_PATHS", help="Cloves and paths, n.")] = 4,
    threshold: Annotated[int, typer.Option("--threshold", envvar="PS_THRESHOLD", help="Cloves that rebuild, k.")] = 3,
    hops: Annotated[int, typer.Option("--hops", envvar="PS_HOPS", help="Relays per path, L.")] = 3,
    attempts: Annotated[
        int, typer.Option("--attempts", envvar="PS_ATTEMPTS", help="Routes tried when relays are dead (1: no retry).")
    ] = 2,
    db: Annotated[
        str | None, typer.Option("--db", envvar="PS_INDEX_DB", help="SQLAlchemy URL of the registry index.")
    ] = None,
    tokenizer: TokenizerOpt = None,
    candidates: CandidatesOpt = 16,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    state_dir: ClientStateDir = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a model privately: the reply streams to stdout as it is generated."""
    from cli._client_net import client_wallet
    from ledger import Indexer
    from node.client import Client, ClientConfig, OverlayTransport, with_deadline
    from node.client._policy import NEUTRAL_REPUTATION
    from node.overlay import ClientSettings, CompletionRequest, Directory, Route
    from node.overlay._completion import MAX_PROMPT_CHARS

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text or len(text) > MAX_PROMPT_CHARS:
        raise InvalidParams(param="prompt", value=len(text), reason=f"1..{MAX_PROMPT_CHARS} characters")
    try:
        wanted = _model_id(model)
    except InvalidValue as exc:
        raise InvalidParams(param="model", value=model, reason="NAME@REVISION or 0x + 64 hex") from exc
    request = CompletionRequest(model=wanted, prompt=text, max_tokens=max_tokens, temperature=temperature, seed=seed)
    request.sampling()  # ranges checked here, before any network work (raises InvalidParams naming the option)
    if attempts < 1:
        raise InvalidParams(param="attempts", value=attempts, reason="at least 1")
    settings = ClientSettings(n=paths, k=threshold)
    config = ClientConfig(paths=paths, hops=hops, attempts=attempts, candidates=candidates)
    dep, registry = open_chain(rpc_url, deployment, None)
    if db is None:
        db = default_index_db(Path(user_data_dir("planetserve")) / "client", dep.chain_id)
    with Indexer(registry, dep, db) as indexer:
        indexer.sync()
        indexed = indexer.nodes()
        directory = Directory.from_registry(indexed)
    # On-chain reputation (fixed point, 1e6 = 1.0) as a weight and a floor, as every routing client reads it.
    reputations = {n.operator: n.reputation / 1e6 for n in indexed}
    routes: list[Route] = []

    def on_route(route: Route) -> None:
        routes.append(route)
        again = " (re-routed around unreachable relays)" if len(routes) > 1 else ""
        info(f"model node {route.destination.operator}; {paths} paths of {hops} relays{again}")

    async def go() -> dict[str, Any]:
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        last: Any = None
        wallet = client_wallet(rpc_url, deployment, state_dir)
        try:
            client = Client(
                directory,
                config,
                transport=OverlayTransport(settings),
                tokenizer=prompt_tokenizer(tokenizer),
                reputation=lambda operator: reputations.get(operator, NEUTRAL_REPUTATION),
                on_route=on_route,
                wallet=wallet,
            )
            async with client:
                async for delta in with_deadline(client.stream(request), timeout):
                    if first is None:
                        first = time.perf_counter() - started
                    pieces.append(delta.text)
                    last = delta
                    if not as_json:
                        sys.stdout.write(delta.text)
                        sys.stdout.flush()
        finally:
            if wallet is not None:  # the settle of this request is queued: written before the command ends
                await asyncio.to_thread(wallet.close)
        if not as_json:
            sys.stdout.write("\n")
        return {
            "text": "".join(pieces),
            "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "cached_tokens": last.cached_tokens,
            "model_node": routes[-1].destination.operator,
            "paths": [[r.operator for r in p] for p in routes[-1].paths],
            "routes_tried": len(routes),
            "first_delta_s": round(first or 0.0, 4),
            "total_s": round(time.perf_counter() - started, 4),
        }

    result = asyncio.run(go())
    if as_json:
        emit(result, as_json=True)


main = run(app)
