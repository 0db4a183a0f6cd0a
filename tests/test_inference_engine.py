"""The Engine conformance suite: every engine must pass it. TensorRT-LLM runs only where it is installed with a GPU."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from node.inference import (
    CHUNK_TOKENS,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineOverloaded,
    EngineTimeout,
    GenerationChunk,
    GenerationRequest,
    InvalidParams,
    SamplingParams,
    ScoreResult,
    TorchEngine,
    chunk_hashes,
    load_engine,
)
from node.inference._modelio import load_tokenizer
from node.inference.testing import ThreadedServer, openai_app

PROMPT = "the red cat sees the dog.\n12+7=19\nthe color of kalo is"
LONG_PROMPT = "\n".join(f"{i}+{i + 3}={2 * i + 3}" for i in range(40)) + "\nthe small bird"


def _trt_ready() -> bool:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture(
    params=[
        "torch",
        "openai-http",
        pytest.param(
            "tensorrt_llm",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not _trt_ready(), reason="tensorrt_llm is not installed or no CUDA GPU"),
            ],
        ),
    ]
)
async def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> AsyncIterator[Engine]:
    config = EngineConfig(max_queue=4, max_running=2)
    if request.param != "openai-http":
        built = load_engine(request.param, tiny_model_dir, config)
        try:
            yield built
        finally:
            await built.close()
        return
    # openai-http: our torch engine behind the OpenAI-compatible test server, in its own thread and event loop.
    upstream: list[TorchEngine] = []

    async def make_app() -> web.Application:
        upstream.append(TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_queue=4, max_running=2)))
        return openai_app(upstream[0], model="ps-test-tiny", tokenizer=load_tokenizer(tiny_model_dir))

    async def stop() -> None:
        await upstream[0].close()

    with ThreadedServer(make_app, on_stop=stop) as server:
        built = load_engine("openai-http", tiny_model_dir, config, upstream=server.url)
        try:
            yield built
        finally:
            await built.close()


async def _collect(engine: Engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def _ids(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _logprobs(chunks: list[GenerationChunk]) -> list[float]:
    return [lp for c in chunks for lp in c.logprobs]


def _text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


async def _cache_settled(engine: TorchEngine) -> None:
    """Wait until the worker has stored the last prompt (it does so just after sending the first token)."""
    for _ in range(200):
        stats = engine.stats()
        if stats.running_requests == 0 and stats.cache_bytes > 0:
            await asyncio.sleep(0.02)
            return
        await asyncio.sleep(0.01)


def _req(rid: str, prompt: str | tuple[int, ...] = PROMPT, **params: object) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt=prompt, params=SamplingParams(**params))  # type: ignore[arg-type]


async def test_generate_streams_deltas_and_only_the_last_chunk_finishes(engine: Engine) -> None:
    chunks = await _collect(engine, _req("a", max_tokens=12, temperature=0))
    assert len(chunks) >= 2
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason in ("stop", "length")
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(_ids(chunks))
    assert all(c.prompt_tokens == chunks[0].prompt_tokens > 0 for c in chunks)
    assert len(_logprobs(chunks)) == len(_ids(chunks))
    assert all(lp <= 0.0 for lp in _logprobs(chunks))


async def test_max_tokens_bounds_the_completion_and_finishes_with_length(engine: Engine) -> None:
    chunks = await _collect(engine, _req("a", max_tokens=5, temperature=0))
    if chunks[-1].finish_reason == "length":
        assert len(_ids(chunks)) == 5
    else:  # an end-of-sequence token came first
        assert len(_ids(chunks)) < 5


async def test_stop_string_cuts_the_text_before_it_and_finishes_with_stop(engine: Engine) -> None:
    full = _text(await _collect(engine, _req("a", max_tokens=24, temperature=0)))
    stop = full[6:8]
    assert len(stop) == 2, "the model must produce some text for this test"
    chunks = await _collect(engine, _req("b", max_tokens=24, temperature=0, stop=[stop]))
    assert chunks[-1].finish_reason == "stop"
    assert _text(chunks) == full[: full.find(stop)]
    assert stop not in _text(chunks)


async def test_temperature_zero_is_deterministic(engine: Engine) -> None:
    first = await _collect(engine, _req("a", max_tokens=16, temperature=0))
    second = await _collect(engine, _req("b", max_tokens=16, temperature=0, seed=5))
    assert _ids(first) == _ids(second)


async def test_same_seed_reproduces_a_sampled_completion_and_another_seed_differs(engine: Engine) -> None:
    a = await _collect(engine, _req("a", max_tokens=24, temperature=1.5, seed=42))
    b = await _collect(engine, _req("b", max_tokens=24, temperature=1.5, seed=42))
    c = await _collect(engine, _req("c", max_tokens=24, temperature=1.5, seed=43))
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7}])
async def test_score_equals_the_logprobs_seen_during_generation(engine: Engine, params: dict[str, object]) -> None:
    request = GenerationRequest(request_id="a", prompt=PROMPT, params=SamplingParams(max_tokens=16, **params))  # type: ignore[arg-type]
    chunks = await _collect(engine, request)
    score = await engine.score(PROMPT, _ids(chunks))
    assert score.token_ids == tuple(_ids(chunks))
    assert score.logprobs == pytest.approx(_logprobs(chunks), abs=1e-4)
    assert score.prompt_tokens == chunks[0].prompt_tokens


async def test_concurrent_requests_each_match_their_solo_output(engine: Engine) -> None:
    # Different lengths, so batched decode steps pad and mask; 4 = max_queue, so all may wait at once.
    prompts = ["3+4=", PROMPT, LONG_PROMPT[:200], LONG_PROMPT]
    solo = [await _collect(engine, _req(f"s{i}", p, max_tokens=12, temperature=0)) for i, p in enumerate(prompts)]
    together = await asyncio.gather(
        *(_collect(engine, _req(f"c{i}", p, max_tokens=12, temperature=0)) for i, p in enumerate(prompts))
    )
    assert [_ids(c) for c in together] == [_ids(c) for c in solo]
    for batched, alone in zip(together, solo, strict=True):
        assert _logprobs(batched) == pytest.approx(_logprobs(alone), abs=1e-4)


async def test_bad_request_id_reuse_and_context_overflow_are_rejected(engine: Engine) -> None:
    stream = engine.generate(_req("dup", max_tokens=50, temperature=0))
    first = await anext(stream)
    assert first.finish_reason is None
    with pytest.raises(InvalidParams) as info:
        await anext(engine.generate(_req("dup", max_tokens=5)))
    assert info.value.param == "request_id"
    await stream.aclose()
    with pytest.raises(InvalidParams) as info:
        await anext(engine.generate(GenerationRequest(request_id="long", prompt=tuple([5] * 5000))))
    assert info.value.param == "prompt"


async def test_closed_engine_refuses_work_and_reports_unhealthy(engine: Engine) -> None:
    assert await engine.check_health()
    await engine.close()
    assert not await engine.check_health()
    with pytest.raises(EngineClosed):
        await anext(engine.generate(_req("a")))


# --------------------------------------------------------------------------------------- torch-specific behaviour
async def test_cancelled_stream_aborts_its_request(torch_engine: TorchEngine) -> None:
    stream = torch_engine.generate(_req("x", max_tokens=400, temperature=0))
    await anext(stream)
    await stream.aclose()
    for _ in range(100):
        if torch_engine.stats().running_requests == 0:
            break
        await asyncio.sleep(0.02)
    assert torch_engine.stats().running_requests == 0


async def test_abort_ends_a_running_stream_with_finish_reason_abort(torch_engine: TorchEngine) -> None:
    chunks: list[GenerationChunk] = []
    async for chunk in torch_engine.generate(_req("x", max_tokens=400, temperature=0)):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert await torch_engine.abort("x")
    assert chunks[-1].finish_reason == "abort"
    assert len(_ids(chunks)) < 400
    assert not await torch_engine.abort("x")


async def test_full_queue_raises_engine_overloaded(tiny_model_dir: Path) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_queue=1, max_running=1))
    try:
        running = engine.generate(_req("r", max_tokens=500, temperature=0))
        await anext(running)
        queued = engine.generate(_req("q", max_tokens=4, temperature=0))

        async def first_queued() -> GenerationChunk:
            return await anext(queued)

        waiter = asyncio.create_task(first_queued())
        for _ in range(100):
            if engine.stats().queued_requests == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().queued_requests == 1
        with pytest.raises(EngineOverloaded) as info:
            await anext(engine.generate(_req("o", max_tokens=4)))
        assert info.value.limit == 1
        await running.aclose()
        assert (await waiter).request_id == "q"
        await queued.aclose()
    finally:
        await engine.close()


async def test_prefix_cache_reuses_shared_prefix_and_output_is_identical(tiny_model_dir: Path) -> None:
    cached = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    plain = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", prefix_cache_bytes=0))
    try:
        prompt_a = LONG_PROMPT + " sees the"
        prompt_b = LONG_PROMPT + " finds a"
        n_a = len(cached.tokenize(prompt_a))
        first = await _collect(cached, _req("a", prompt_a, max_tokens=12, temperature=0))
        assert first[-1].cached_tokens == 0
        before = cached.stats().prefill_tokens_computed
        second = await _collect(cached, _req("b", prompt_b, max_tokens=12, temperature=0))
        n_b = len(cached.tokenize(prompt_b))
        hit = second[-1].cached_tokens
        assert hit > 0 and hit % CHUNK_TOKENS == 0
        assert hit >= (min(n_a, n_b) // CHUNK_TOKENS - 2) * CHUNK_TOKENS
        assert cached.stats().prefill_tokens_computed - before == n_b - hit
        reference = await _collect(plain, _req("b", prompt_b, max_tokens=12, temperature=0))
        assert reference[-1].cached_tokens == 0
        assert _ids(second) == _ids(reference)
        assert _logprobs(second) == pytest.approx(_logprobs(reference), abs=1e-4)
        # Reusing the entry did not corrupt it: the first prompt, served from cache, still gives its first output.
        again = await _collect(cached, _req("a2", prompt_a, max_tokens=12, temperature=0))
        assert again[-1].cached_tokens > 0
        assert _ids(again) == _ids(first)
    finally:
        await cached.close()
        await plain.close()


async def test_stats_advertise_the_chunk_hashes_of_served_prompts(torch_engine: TorchEngine) -> None:
    await _collect(torch_engine, _req("a", LONG_PROMPT, max_tokens=2, temperature=0))
    await _cache_settled(torch_engine)
    stats = torch_engine.stats()
    expected = chunk_hashes(torch_engine.tokenize(LONG_PROMPT))
    assert set(expected) <= set(stats.cached_prefix_hashes)
    assert stats.cache_bytes > 0
    assert stats.model_id.startswith("0x") and len(stats.model_id) == 66
    assert stats.queued_requests == 0 and stats.running_requests == 0


async def test_prefix_cache_evicts_least_recently_used_within_its_byte_bound(tiny_model_dir: Path) -> None:
    probe = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    try:
        await _collect(probe, _req("p", LONG_PROMPT, max_tokens=1, temperature=0))
        await _cache_settled(probe)
        one_entry = probe.stats().cache_bytes
    finally:
        await probe.close()
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", prefix_cache_bytes=one_entry * 2))
    try:
        prompts = [f"{k}{k}{k}\n" + LONG_PROMPT for k in range(3)]
        for i, p in enumerate(prompts):
            await _collect(engine, _req(f"r{i}", p, max_tokens=1, temperature=0))
            assert engine.stats().cache_bytes <= one_entry * 2
        oldest = await _collect(engine, _req("old", prompts[0], max_tokens=1, temperature=0))
        newest = await _collect(engine, _req("new", prompts[2], max_tokens=1, temperature=0))
        assert oldest[-1].cached_tokens == 0
        assert newest[-1].cached_tokens > 0
    finally:
        await engine.close()


async def test_a_stalled_stream_times_out_and_aborts_its_request(tiny_model_dir: Path) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", chunk_timeout_s=1e-4))
    try:
        with pytest.raises(EngineTimeout) as info:
            async for _ in engine.generate(_req("slow", LONG_PROMPT, max_tokens=300, temperature=0)):
                pass
        assert info.value.seconds == 1e-4
        for _ in range(200):
            if engine.stats().running_requests == 0 and engine.stats().queued_requests == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running_requests == 0
    finally:
        await engine.close()


async def test_auto_engine_is_the_torch_engine_without_tensorrt(tiny_model_dir: Path) -> None:
    engine = load_engine("auto", tiny_model_dir)
    try:
        assert isinstance(engine, TorchEngine) == (not _trt_ready())
        assert isinstance(engine, Engine)
    finally:
        await engine.close()


async def test_running_sequences_share_batched_decode_steps(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_running=4))
    batch_sizes: list[int] = []
    original = engine._decode

    def spy(seqs: list[Any]) -> None:
        batch_sizes.append(len(seqs))
        original(seqs)

    monkeypatch.setattr(engine, "_decode", spy)
    try:
        prompts = ["3+4=", PROMPT, LONG_PROMPT[:300], LONG_PROMPT]
        await asyncio.gather(
            *(_collect(engine, _req(f"b{i}", p, max_tokens=10, temperature=0)) for i, p in enumerate(prompts))
        )
        assert batch_sizes and max(batch_sizes) == 4
    finally:
        await engine.close()


# ---------------------------------------------------------------------- scheduler and block cache (issue 13)
async def test_score_under_load_goes_through_the_bounded_queue(engine: Engine) -> None:
    prompt = tuple(range(1, 300))
    solo = await engine.score(prompt, [5, 6, 7])
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.stats().queued_requests)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(engine.score(prompt, [5, 6, 7]) for _ in range(16)), return_exceptions=True)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    overloaded = [r for r in results if isinstance(r, EngineOverloaded)]
    served = [r for r in results if isinstance(r, ScoreResult)]
    assert len(overloaded) + len(served) == 16
    assert overloaded
    if isinstance(engine, TorchEngine):
        assert all(r.limit == 4 == r.queued for r in overloaded)
    assert peak <= 4
    assert served and all(r.logprobs == pytest.approx(solo.logprobs, abs=1e-5) for r in served)


async def test_event_loop_stays_responsive_while_a_long_prompt_is_tokenized(
    engine: Engine, tiny_model_dir: Path
) -> None:
    text = ("the red cat sees the dog. 12+7=19\n" * 8000)[: 4 * 65536]  # 256 KiB: over the context once tokenized
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    # Tokenizing on the loop would stall it for the whole tokenization: time that here, on this machine, now.
    tokenizer = load_tokenizer(tiny_model_dir)
    started = time.perf_counter()
    tokenizer.encode(text, add_special_tokens=False)
    tokenize_s = time.perf_counter() - started
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    with pytest.raises(InvalidParams) as info:
        await anext(engine.generate(_req("huge", text, max_tokens=1)))
    assert info.value.param == "prompt"
    stop.set()
    await ticker
    bound = max(0.05, tokenize_s / 3)
    assert max(gaps) < bound, f"the event loop stalled for {max(gaps) * 1000:.0f} ms (tokenizing: {tokenize_s:.3f} s)"


async def test_chunked_prefill_gives_the_same_tokens_and_logprobs_as_whole_prefill(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunked = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_batch_tokens=16))
    whole = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_batch_tokens=4096))
    chunk_sizes: list[int] = []
    original = chunked._prefill_chunk

    def spy(seq: Any, n: int) -> None:
        chunk_sizes.append(n)
        original(seq, n)

    monkeypatch.setattr(chunked, "_prefill_chunk", spy)
    try:
        n_prompt = len(chunked.tokenize(LONG_PROMPT))
        a = await _collect(chunked, _req("a", LONG_PROMPT, max_tokens=16, temperature=0))
        assert max(chunk_sizes) == 16 and sum(chunk_sizes) == n_prompt
        b = await _collect(whole, _req("b", LONG_PROMPT, max_tokens=16, temperature=0))
        assert _ids(a) == _ids(b)
        assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-5)
        completion = _ids(a)
        chunked.clear_prefix_cache()
        whole.clear_prefix_cache()
        sa, sb = await chunked.score(LONG_PROMPT, completion), await whole.score(LONG_PROMPT, completion)
        assert sa.logprobs == pytest.approx(sb.logprobs, abs=1e-5)
        assert sa.logprobs == pytest.approx(_logprobs(b), abs=1e-5)
    finally:
        await chunked.close()
        await whole.close()


def _kv_tokens(prompt: list[int], chunks: list[GenerationChunk]) -> list[int]:
    """The tokens whose KV the engine computed: the prompt and every generated token but the last."""
    generated = _ids(chunks)
    return prompt + generated[:-1]


async def test_shared_prefix_blocks_are_stored_once(torch_engine: TorchEngine) -> None:
    base = torch_engine.tokenize(LONG_PROMPT * 2)[:600]
    prompts = [base + torch_engine.tokenize(f"\n{i}+{i}={2 * i} the small bird") for i in range(8)]
    results = await asyncio.gather(
        *(_collect(torch_engine, _req(f"p{i}", tuple(p), max_tokens=4, temperature=0)) for i, p in enumerate(prompts))
    )
    await _cache_settled(torch_engine)
    per_prompt = [chunk_hashes(_kv_tokens(p, r)) for p, r in zip(prompts, results, strict=True)]
    distinct = {h for hashes in per_prompt for h in hashes}
    stats = torch_engine.stats()
    assert sum(len(h) for h in per_prompt) > 4 * len(distinct), "the prompts must share most of their blocks"
    assert set(stats.cached_prefix_hashes) == distinct
    assert stats.cache_bytes == len(distinct) * torch_engine.kv_block_bytes


async def test_eviction_never_drops_a_block_in_use(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    try:
        block = probe.kv_block_bytes
        long_ids = probe.tokenize(LONG_PROMPT)
        solo = await _collect(probe, _req("solo", LONG_PROMPT, max_tokens=300, temperature=0))
        assert solo[-1].finish_reason == "length"
    finally:
        await probe.close()
    a_blocks = -(-(len(long_ids) + 300) // CHUNK_TOKENS)
    shorts = [f"{k}{k}{k} " + PROMPT for k in range(3)]
    # Room for the long request plus two spare blocks: the short requests' cached blocks must make way for it.
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", kv_cache_bytes=(a_blocks + 2) * block))
    pool = engine._pool
    evicted: list[int] = []
    original = pool._evict

    def checked_evict(victim: int) -> None:
        in_use = {b for seq in list(engine._running) for b in seq.table}
        assert pool.refs(victim) == 0 and victim not in in_use, "evicted a block in use"
        evicted.append(victim)
        original(victim)

    monkeypatch.setattr(pool, "_evict", checked_evict)
    try:
        for i, prompt in enumerate(shorts):
            await _collect(engine, _req(f"s{i}", prompt, max_tokens=8, temperature=0))
        cached_shorts = set(engine.stats().cached_prefix_hashes)
        assert set(chunk_hashes(engine.tokenize(shorts[0]))) <= cached_shorts
        got: list[GenerationChunk] = []
        async for chunk in engine.generate(_req("long", LONG_PROMPT, max_tokens=300, temperature=0)):
            got.append(chunk)
            assert set(chunk_hashes(long_ids)) <= set(engine.stats().cached_prefix_hashes)
        assert evicted, "the long request had to evict cached blocks"
        assert not set(chunk_hashes(engine.tokenize(shorts[0]))) & set(engine.stats().cached_prefix_hashes)
        assert _ids(got) == _ids(solo)
        assert _logprobs(got) == pytest.approx(_logprobs(solo), abs=1e-5)
    finally:
        await engine.close()


async def test_end_of_sequence_is_reported_with_its_logprob(tiny_model_dir: Path) -> None:
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    try:
        eos = engine._eos
        assert eos is not None
        # Sample until some seed ends with EOS: first whole completions, then (a model trained on run-on text rarely
        # ends one) single tokens at temperature 2, where EOS is drawn with a probability far from zero.
        attempts = [(f"e{seed}", 64, 1.5, seed) for seed in range(20)]
        attempts += [(f"t{seed}", 1, 2.0, seed) for seed in range(4000)]
        for rid, max_tokens, temperature, seed in attempts:
            chunks = await _collect(
                engine, _req(rid, "3+4=", max_tokens=max_tokens, temperature=temperature, seed=seed)
            )
            if chunks[-1].finish_reason == "stop" and chunks[-1].token_ids == (eos,):
                break
        else:
            pytest.fail("no sampled completion ended with end-of-sequence")
        last = chunks[-1]
        assert last.token_ids == (eos,) and len(last.logprobs) == 1 and last.logprobs[0] <= 0.0
        assert last.completion_tokens == len(_ids(chunks))
        score = await engine.score("3+4=", _ids(chunks))
        assert score.logprobs[-1] == pytest.approx(last.logprobs[0], abs=1e-4)
    finally:
        await engine.close()


async def test_garbage_in_unused_block_memory_never_reaches_attention(tiny_model_dir: Path) -> None:
    reference = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    poisoned = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu"))
    try:
        # Padding rows of a partly filled block are read (masked) by batched decode; NaN there would poison it.
        poisoned._pool.keys.fill_(float("nan"))
        poisoned._pool.values.fill_(float("inf"))
        prompts = ["3+4=", PROMPT, LONG_PROMPT[:200]]
        expected = [
            await _collect(reference, _req(f"r{i}", p, max_tokens=10, temperature=0)) for i, p in enumerate(prompts)
        ]
        got = await asyncio.gather(
            *(_collect(poisoned, _req(f"p{i}", p, max_tokens=10, temperature=0)) for i, p in enumerate(prompts))
        )
        assert [_ids(c) for c in got] == [_ids(c) for c in expected]
        for a, b in zip(got, expected, strict=True):
            assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-4)
    finally:
        await reference.close()
        await poisoned.close()


async def test_a_short_prompt_behind_long_prefills_gets_its_first_token_first(tiny_model_dir: Path) -> None:
    # A small budget and ~700-token prompts: the long prefills take ~90 steps, so the short prompt arrives while they
    # are still prefilling even when this shared machine is slow to schedule the test's own coroutine.
    engine = TorchEngine.from_folder(tiny_model_dir, EngineConfig(device="cpu", max_batch_tokens=16))
    order: list[str] = []

    async def first_token(rid: str, prompt: str) -> None:
        async for _ in engine.generate(_req(rid, prompt, max_tokens=2, temperature=0)):
            order.append(rid)
            return

    try:
        longs = [asyncio.create_task(first_token(f"long{i}", f"{i} " + LONG_PROMPT * 2)) for i in range(2)]
        for _ in range(500):  # the long prompts are queued or prefilling before the short one arrives
            stats = engine.stats()
            if stats.queued_requests + stats.running_requests == 2:
                break
            await asyncio.sleep(0.001)
        short = asyncio.create_task(first_token("short", "3+4="))
        await asyncio.gather(*longs, short)
        assert order[0] == "short", f"first tokens arrived in the order {order}"
    finally:
        await engine.close()
