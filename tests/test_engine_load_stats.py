"""The torch engine's load figures that heartbeats carry (``EngineStats.decode_backlog_tokens``,
``seconds_per_decode_token`` and ``seconds_per_prefill_token``; ``docs/forwarding.md``)."""

from __future__ import annotations

import asyncio

import pytest

from node.inference import GenerationRequest, SamplingParams, TorchEngine
from node.inference._prefill_fit import PrefillFit


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


async def test_the_prefill_speed_is_reported_once_steps_of_different_sizes_were_timed(
    torch_engine: TorchEngine,
) -> None:
    assert torch_engine.stats().seconds_per_prefill_token == 0.0  # nothing prefilled yet
    params = SamplingParams(max_tokens=1, temperature=0.0)
    # Prompts of about 8 and 300 tokens in turn, none sharing a cached prefix: the slope is identified.
    for i in range(10):
        lines = 1 if i % 2 == 0 else 40
        prompt = "".join(f"{(i * 41 + k) % 90 + 10}+{k % 90 + 10}=\n" for k in range(lines))
        request = GenerationRequest(request_id=f"p{i}", prompt=prompt, params=params)
        async with asyncio.timeout(60):
            async for _ in torch_engine.generate(request):
                pass
    # Seconds per further prompt token (the quick model takes well under 10 ms a token, even on a loaded machine).
    assert 0.0 < torch_engine.stats().seconds_per_prefill_token < 0.01


def test_the_prefill_speed_is_the_slope_of_a_steps_time_in_its_tokens_not_the_fixed_cost_spread_over_few() -> None:
    # Steps costing 2 ms fixed plus 0.05 ms a token: short prompts alone would read 2.05 ms a token as a plain mean.
    fit = PrefillFit()
    fit.add(1, 0.002 + 0.05e-3)
    assert fit.slope() == 0.0  # one step: nothing identified, the node reports "unknown"
    for tokens in (1, 512, 40, 300, 8, 512, 100):
        fit.add(tokens, 0.002 + 0.05e-3 * tokens)
    assert fit.slope() == pytest.approx(0.05e-3, rel=1e-6)
    same = PrefillFit()
    for _ in range(10):
        same.add(512, 0.0276)
    assert same.slope() == 0.0  # every step the same size: the slope is not identified
