"""The torch engine's load figures that heartbeats carry (``EngineStats.decode_backlog_tokens`` and
``seconds_per_decode_token``; ``docs/forwarding.md``)."""

from __future__ import annotations

import asyncio

from node.inference import GenerationRequest, SamplingParams, TorchEngine


async def test_the_decode_backlog_counts_tokens_still_to_generate_and_the_decode_time_is_measured(
    torch_engine: TorchEngine,
) -> None:
    assert torch_engine.stats().decode_backlog_tokens == 0
    assert torch_engine.stats().seconds_per_decode_token == 0.0  # nothing decoded yet
    seen: list[tuple[int, int]] = []  # (tokens generated so far, backlog the engine reported then)

    async def consume(rid: str) -> None:
        params = SamplingParams(max_tokens=40, temperature=0.0)
        request = GenerationRequest(request_id=rid, prompt="12+07=19\n03+04=", params=params)
        async for chunk in torch_engine.generate(request):
            if rid == "a":
                seen.append((chunk.completion_tokens, torch_engine.stats().decode_backlog_tokens))

    await asyncio.wait_for(asyncio.gather(consume("a"), consume("b")), timeout=60)
    # While both decoded, the backlog was at most both requests' remaining tokens and shrank as they generated.
    assert seen and all(0 <= backlog <= 2 * 40 - done for done, backlog in seen)
    assert max(backlog for _, backlog in seen) > 0 and seen[0][1] >= seen[-1][1]
    stats = torch_engine.stats()
    assert stats.decode_backlog_tokens == 0
    assert 0.0 < stats.seconds_per_decode_token < 5.0
