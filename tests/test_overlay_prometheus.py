"""``GET /metrics``: Prometheus text from the ``prometheus-client`` library, one registry per node, no prompt data."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.inference import EngineConfig, TorchEngine
from node.overlay import CompletionRequest, OverlayConfig, complete
from node.overlay._serve import create_model_app
from node.privacy import select_paths
from node.testing import LocalNetwork, LocalNode, serve_ephemeral

PROMPT = "a secret prompt 3+4="


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def _scrape(session: aiohttp.ClientSession, endpoint: str) -> str:
    async with session.get(endpoint + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        return await response.text()


async def test_nodes_expose_prometheus_counters_histograms_and_rejects_without_prompt_data(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))

    async def unused(_body: bytes) -> AsyncIterator[bytes]:
        yield b""

    async with LocalNetwork(relays=3, handler=unused) as net, aiohttp.ClientSession() as session:
        config = OverlayConfig(x25519_secret=secrets.token_bytes(32), role="model")
        app = create_model_app(config, engine, peers=net.peers)
        runner, endpoint = await serve_ephemeral(app)
        model = LocalNode(name="m", config=config, app=app, runner=runner, endpoint=endpoint)
        net.peers.add(model.peer())
        try:
            request = CompletionRequest(model=engine.model_id, prompt=PROMPT, max_tokens=4, temperature=0.0)
            paths = select_paths(net.descriptors(), 4, 3)
            with caplog.at_level(logging.INFO, logger="node.overlay"):
                deltas = [d async for d in complete(session, request, paths, model.peer())]
            async with session.post(net.relay_nodes[0].endpoint + "/overlay/v1/onion", data=b"\x02junk") as junk:
                assert junk.status == 400

            model_text = await _scrape(session, endpoint)
            relay_text = await _scrape(session, net.relay_nodes[0].endpoint)
        finally:
            await model.stop()
    assert PROMPT not in model_text and "secret" not in model_text
    m = _samples(model_text)
    assert m[("planetserve_messages_served_total", (("role", "model"),))] == 1
    assert m[("planetserve_request_seconds_count", (("finish_reason", deltas[-1].finish_reason or ""),))] == 1
    assert m[("planetserve_ttft_seconds_count", ())] == 1
    assert m[("planetserve_tokens_total", (("kind", "completion"),))] == deltas[-1].completion_tokens
    assert ("planetserve_engine_queued_requests", ()) in m
    r = _samples(relay_text)
    assert r[("planetserve_packets_rejected_total", (("reason", "too_short"),))] >= 1
    assert r[("planetserve_packets_forwarded_total", (("role", "relay"),))] >= 1
    # One registry per node: the relay has no model-node series.
    assert not any(name.startswith("planetserve_request_seconds") for name, _ in r)
    # One log line per request on the model node, with its counts and no prompt text (what an operator watches).
    lines = [r.getMessage() for r in caplog.records if r.name == "node.overlay._completion"]
    served = [line for line in lines if line.startswith("request ")]
    assert len(served) == 1, lines
    assert f"{deltas[-1].completion_tokens} generated" in served[0]
    assert not any("secret" in r.getMessage() or "3+4" in r.getMessage() for r in caplog.records)
