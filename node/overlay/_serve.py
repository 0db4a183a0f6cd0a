"""Running a node process: the model node's application (engine included) and the serve-until-stopped loop that
``ps-node serve`` uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from node.inference import Engine
from node.overlay import keys
from node.overlay._app import create_app
from node.overlay._completion import completion_handler
from node.overlay._config import OverlayConfig

log = logging.getLogger(__name__)

#: Seconds open exchanges get to finish when the node stops.
SHUTDOWN_GRACE_S = 5.0


def create_model_app(config: OverlayConfig, engine: Engine) -> web.Application:
    """A model node: the overlay serving completions from ``engine``, which it closes on shutdown."""

    async def engine_ctx(_app: web.Application) -> AsyncIterator[None]:
        yield
        await engine.close()

    app = create_app(config, completion_handler(engine))
    app[keys.OVERLAY_APP][keys.ENGINE_HEALTH] = engine.check_health
    app.cleanup_ctx.append(engine_ctx)
    return app


async def serve_until(
    app: web.Application,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    on_ready: Callable[[str], None],
    shutdown_grace_s: float = SHUTDOWN_GRACE_S,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), call ``on_ready(endpoint)``, and serve until ``stop`` is set."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_grace_s, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        endpoint = f"http://{bound_host}:{bound_port}"
        log.info("serving on %s", endpoint)
        on_ready(endpoint)
        await stop.wait()
    finally:
        await runner.cleanup()
