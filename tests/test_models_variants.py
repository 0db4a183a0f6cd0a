"""Cheating variants are real (an int8 file with int8 kernels, a half-width model) and load through the torch engine;
the cheating engine wrappers cheat exactly as documented (canned, replay, a seeded fraction on a second engine)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from node.inference import (
    GenerationRequest,
    InvalidParams,
    ModelLoadError,
    SamplingParams,
    TorchEngine,
    make_variant,
    read_info,
)
from node.inference._cheats import CANNED_LOGPROB
from node.inference._modelio import load_model
from node.inference._quant import INT8_DYNAMIC, QUANT_KEY
from node.inference._training import distinct_continuations
from node.inference.testing import CheatConfig, CheatingEngine


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "m"
    make_variant(tiny_model_dir, "int8", out)
    return out


async def _greedy(engine: TorchEngine | CheatingEngine, prompt: str, rid: str, max_tokens: int = 6) -> list[int]:
    ids: list[int] = []
    request = GenerationRequest(
        request_id=rid, prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    async for chunk in engine.generate(request):
        ids.extend(chunk.token_ids)
    return ids


def test_int8_variant_file_is_smaller_and_every_linear_is_an_int8_kernel(tiny_model_dir: Path, int8_dir: Path) -> None:
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    int8_bytes = (int8_dir / "model.safetensors").stat().st_size
    assert int8_bytes < 0.6 * base_bytes
    with safe_open(str(int8_dir / "model.safetensors"), framework="pt") as handle:
        assert (handle.metadata() or {})[QUANT_KEY] == INT8_DYNAMIC
        int8_keys = [k for k in handle.keys() if k.endswith(".weight_int8")]  # noqa: SIM118 (safe_open is not a dict)
        assert int8_keys and all(handle.get_tensor(k).dtype == torch.int8 for k in int8_keys)
    model, _, info = load_model(int8_dir)
    quantized = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quantized))]
    assert linears and all(isinstance(m, quantized) for m in linears)
    assert len(int8_keys) == len(linears)
    assert info is not None and info.kind == "int8" and info.recipe["quantization"] == INT8_DYNAMIC


async def test_int8_variant_generates_through_the_torch_engine_close_to_but_not_equal_to_the_base(
    tiny_model_dir: Path, int8_dir: Path
) -> None:
    base = TorchEngine.from_folder(tiny_model_dir)
    quant = TorchEngine.from_folder(int8_dir)
    try:
        assert base.model_id != quant.model_id
        ids = await _greedy(quant, "\n12+7=", "q")
        assert len(ids) >= 1
        text = "12+7=19\nthe red cat sees the dog."
        a, b = await base.score("\n", text), await quant.score("\n", text)
        diffs = [abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)]
        assert 0 < max(diffs) < 1.0
    finally:
        await base.close()
        await quant.close()


def test_int8_folder_with_a_missing_tensor_or_unknown_quantization_is_a_model_load_error(
    int8_dir: Path, tmp_path: Path
) -> None:
    import shutil

    for damage in ("missing-scale", "unknown-marker"):
        folder = tmp_path / damage
        shutil.copytree(int8_dir, folder)
        tensors = load_file(str(folder / "model.safetensors"))
        marker = INT8_DYNAMIC
        if damage == "missing-scale":
            del tensors[next(k for k in tensors if k.endswith(".weight_scale"))]
        else:
            marker = "int3-magic"
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", QUANT_KEY: marker})
        with pytest.raises(ModelLoadError) as info:
            TorchEngine.from_folder(folder)
        assert ("do not fit" if damage == "missing-scale" else "unknown quantization") in str(info.value)


async def test_half_width_variant_is_a_smaller_model_of_the_same_recipe_and_serves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    made = make_variant(tiny_model_dir, "half-width", tmp_path / "half")
    base_info = read_info(tiny_model_dir)
    assert base_info is not None
    assert made.recipe["hidden_size"] == base_info.recipe["hidden_size"] // 2
    assert made.recipe["variant_of"] == base_info.model_id and made.kind == "half-width"
    assert (tmp_path / "half" / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    engine = TorchEngine.from_folder(tmp_path / "half")
    try:
        assert len(await _greedy(engine, "\n3+4=", "h")) >= 1
    finally:
        await engine.close()


def test_variants_are_made_from_a_base_model_only(int8_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams) as info:
        make_variant(int8_dir, "fewer-layers", tmp_path / "v")
    assert info.value.param == "source"


def test_distinct_continuations_of_one_repeated_prompt_is_zero(tiny_model_dir: Path) -> None:
    model, tok, _ = load_model(tiny_model_dir)
    distinct, first_lines, texts = distinct_continuations(model, tok, ["\n12+7="] * 3, max_new=4)
    assert distinct == 0.0 and first_lines == 0.0 and len(set(texts)) == 1


async def test_canned_cheater_answers_every_prompt_with_the_same_text_cut_to_max_tokens(tiny_model_dir: Path) -> None:
    honest = TorchEngine.from_folder(tiny_model_dir)
    cheat = CheatingEngine(
        honest,
        CheatConfig(mode="canned", canned_text=" 7 and more words here"),
        tokenize=honest.tokenize,
        detokenize=honest.detokenize,
    )
    try:
        assert cheat.model_id == honest.model_id and "CHEATING" in repr(cheat)
        canned = honest.tokenize(" 7 and more words here")
        for i, prompt in enumerate(("\n1+2=", "\necho ka lo :")):
            request = GenerationRequest(request_id=f"c{i}", prompt=prompt, params=SamplingParams(max_tokens=3))
            chunks = [c async for c in cheat.generate(request)]
            assert len(chunks) == 1 and chunks[0].finish_reason == "length"
            assert list(chunks[0].token_ids) == canned[:3]
            assert chunks[0].logprobs == (CANNED_LOGPROB,) * 3
            assert chunks[0].prompt_tokens == len(honest.tokenize(prompt))
        assert cheat.cheated_requests == 2 == cheat.served_requests
    finally:
        await cheat.close()


async def test_replay_cheater_answers_with_an_earlier_honest_answer_to_another_prompt(tiny_model_dir: Path) -> None:
    reference = TorchEngine.from_folder(tiny_model_dir)
    honest = TorchEngine.from_folder(tiny_model_dir)
    cheat = CheatingEngine(honest, CheatConfig(mode="replay"), tokenize=honest.tokenize, detokenize=honest.detokenize)
    try:
        first = await _greedy(cheat, "\n12+7=", "r0")  # nothing to replay yet: honest, and remembered
        assert first == await _greedy(reference, "\n12+7=", "x0")
        second = await _greedy(cheat, "\nthe color of", "r1")
        assert second == first
        assert cheat.decisions == (("r0", False), ("r1", True))
    finally:
        await cheat.close()
        await reference.close()


async def test_fractional_cheater_substitutes_a_second_real_engine_on_the_seeded_20_percent(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The cheaper model of the same recipe with fewer layers (the tiny test model's int8 twin answers identically).
    make_variant(tiny_model_dir, "fewer-layers", tmp_path / "fewer")
    honest = TorchEngine.from_folder(tiny_model_dir)
    substitute = TorchEngine.from_folder(tmp_path / "fewer")
    cheat = CheatingEngine(honest, CheatConfig(mode="substitute", fraction=0.2, seed=11), substitute=substitute)
    prompts = [f"\n{a}+{b}=" for a in range(4) for b in range(10)]
    try:
        honest_answers = {p: await _greedy(honest, p, f"h{i}", 24) for i, p in enumerate(prompts)}
        cheap_answers = {p: await _greedy(substitute, p, f"s{i}", 24) for i, p in enumerate(prompts)}
        got = [await _greedy(cheat, p, f"c{i}", 24) for i, p in enumerate(prompts)]
        draw = random.Random(11)
        expected = [draw.random() < 0.2 for _ in prompts]
        assert [cheated for _, cheated in cheat.decisions] == expected
        assert 4 <= sum(expected) <= 12 and cheat.cheated_requests == sum(expected)
        for prompt, answer, cheated in zip(prompts, got, expected, strict=True):
            assert answer == (cheap_answers[prompt] if cheated else honest_answers[prompt])
        assert any(honest_answers[p] != cheap_answers[p] for p in prompts), "the substitute must differ somewhere"
    finally:
        await cheat.close()


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"), ({"mode": "lazy"}, "mode")],
)
def test_cheat_config_rejects_bad_values(changes: dict[str, object], param: str) -> None:
    fields: dict[str, object] = {"mode": "canned"} | changes
    with pytest.raises(InvalidParams) as info:
        CheatConfig(**fields)  # type: ignore[arg-type]
    assert info.value.param == param


async def test_substitute_mode_needs_a_second_engine_and_canned_a_tokenizer(tiny_model_dir: Path) -> None:
    honest = TorchEngine.from_folder(tiny_model_dir)
    try:
        with pytest.raises(InvalidParams) as info:
            CheatingEngine(honest, CheatConfig(mode="substitute"))
        assert info.value.param == "substitute"
        with pytest.raises(InvalidParams) as info:
            CheatingEngine(honest, CheatConfig(mode="canned"))
        assert info.value.param == "tokenize"
    finally:
        await honest.close()
