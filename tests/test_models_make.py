"""The project's own models: reproducible by recipe, identified by keccak(name@revision), loadable only when intact,
and their weaker variants measurably worse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eth_utils.crypto import keccak

from node.inference import (
    InvalidParams,
    ModelLoadError,
    ModelRecipe,
    TorchEngine,
    evaluate,
    make_model,
    make_variant,
    read_info,
)
from node.inference._corpus import (
    MAX_OPERAND,
    MAX_PROMPTS,
    corpus_lines,
    held_out_problems,
    held_out_prompts,
    is_held_out,
    is_held_out_text,
)

MICRO = ModelRecipe(
    name="ps-micro",
    vocab_size=300,
    hidden_size=32,
    layers=2,
    heads=2,
    intermediate_size=64,
    max_position=256,
    steps=6,
    batch_size=4,
    seq_len=32,
    corpus_lines=400,
)


def test_corpus_is_deterministic_and_never_trains_on_held_out_sums() -> None:
    assert corpus_lines(5, 200) == corpus_lines(5, 200)
    assert corpus_lines(5, 200) != corpus_lines(6, 200)
    for line in corpus_lines(1, 3000):
        if "+" in line:
            a, rest = line.split("+")
            assert not is_held_out(int(a), int(rest.split("=")[0]))
    problems = held_out_problems(50)
    assert len(problems) == 50 and all(p.endswith("=") for p, _ in problems)
    assert all(is_held_out(*map(int, p[:-1].split("+"))) for p, _ in problems)
    assert MAX_OPERAND >= 9


def test_corpus_trains_on_copy_and_reverse_but_never_on_held_out_payloads() -> None:
    lines = corpus_lines(2, 3000)
    tasks = [line for line in lines if line.startswith(("echo ", "reverse "))]
    assert len(tasks) > 600
    for line in tasks:
        verb, rest = line.split(" ", 1)
        payload, answer = rest.split(" : ")
        assert not is_held_out_text(payload)
        assert answer == (payload if verb == "echo" else " ".join(reversed(payload.split())))
    assert all(line[2] == "+" and line[5] == "=" for line in lines if "+" in line), "addition is zero-padded"


def test_held_out_prompts_have_distinct_answers_and_come_from_the_held_out_sets() -> None:
    prompts = held_out_prompts(100)
    assert prompts == held_out_prompts(100) and len(prompts) == 100
    assert len({answer for _, answer in prompts}) == 100
    for prompt, answer in prompts:
        assert prompt.startswith("\n")
        if "+" in prompt:
            a, b = map(int, prompt[1:-1].split("+"))
            assert is_held_out(a, b) and int(answer) == a + b
        else:
            assert is_held_out_text(prompt.split(" ", 1)[1].removesuffix(" :"))
    assert sum("+" in p for p, _ in prompts) == 40
    with pytest.raises(ValueError, match="n must be"):
        held_out_prompts(MAX_PROMPTS + 1)


def test_same_recipe_gives_the_same_revision_and_id_is_keccak_of_name_at_revision(tmp_path: Path) -> None:
    first = make_model(tmp_path / "a", MICRO)
    second = make_model(tmp_path / "b", MICRO)
    other = make_model(tmp_path / "c", ModelRecipe.from_dict({**MICRO.to_dict(), "seed": 1}))
    assert first.revision == second.revision and len(first.revision) == 40
    assert other.revision != first.revision
    assert first.model_id == "0x" + keccak(text=f"ps-micro@{first.revision}").hex()
    assert read_info(tmp_path / "a") == first
    assert (tmp_path / "a" / "config.json").is_file() and (tmp_path / "a" / "model.safetensors").is_file()


def test_output_folder_must_be_absent_or_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(InvalidParams) as info:
        make_model(tmp_path, MICRO)
    assert info.value.param == "out"


def test_recipe_rejects_inconsistent_sizes() -> None:
    with pytest.raises(InvalidParams) as info:
        ModelRecipe(hidden_size=100, heads=3)
    assert info.value.param == "heads"


def test_recipe_written_before_the_corpus_was_versioned_is_refused_not_silently_retrained() -> None:
    old = {k: v for k, v in MICRO.to_dict().items() if k != "corpus_version"}
    with pytest.raises(InvalidParams) as info:
        ModelRecipe.from_dict(old)
    assert info.value.param == "corpus_version"
    assert ModelRecipe.from_dict(MICRO.to_dict()) == MICRO


@pytest.fixture(scope="module")
def variants(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    out = {"base": tiny_model_dir}
    for kind in ("fewer-layers", "int8", "undertrained"):
        make_variant(tiny_model_dir, kind, root / kind)
        out[kind] = root / kind
    return out


def test_variants_keep_the_tokenizer_change_the_id_and_are_measurably_worse(variants: dict[str, Path]) -> None:
    results = {kind: evaluate(path, n_problems=4, eval_lines=120) for kind, path in variants.items()}
    base = results["base"]
    ids = {r.model_id for r in results.values()}
    assert len(ids) == len(results), "every variant has its own model id"
    assert results["fewer-layers"].perplexity > base.perplexity * 1.05
    assert results["undertrained"].perplexity > base.perplexity * 1.05
    assert results["int8"].perplexity != base.perplexity
    assert results["fewer-layers"].parameters < base.parameters
    for kind, path in variants.items():
        assert (path / "tokenizer.json").read_text() == (variants["base"] / "tokenizer.json").read_text(), kind
        info = read_info(path)
        assert info is not None and info.kind == kind


async def test_int8_variant_log_probs_differ_from_the_original(variants: dict[str, Path]) -> None:
    base = TorchEngine.from_folder(variants["base"])
    quant = TorchEngine.from_folder(variants["int8"])
    try:
        text = "12+7=19\nthe red cat sees the dog."
        a = await base.score("the color of", text)
        b = await quant.score("the color of", text)
        diffs = [abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)]
        assert 0 < max(diffs) < 1.0
    finally:
        await base.close()
        await quant.close()


def test_unknown_variant_kind_and_foreign_folder_are_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams) as info:
        make_variant(tiny_model_dir, "bigger", tmp_path / "v")
    assert info.value.param == "kind"
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    (foreign / "planetserve.json").unlink()
    with pytest.raises(ModelLoadError, match=r"planetserve\.json"):
        make_variant(foreign, "int8", tmp_path / "v2")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("absent", "does not exist"),
        ("no-weights", "missing model.safetensors"),
        ("bad-config", "corrupt"),
        ("truncated-weights", "corrupt"),
        ("bad-tokenizer", "tokenizer is corrupt"),
        ("bad-metadata", "planetserve.json"),
    ],
)
def test_missing_or_corrupt_model_folder_is_a_clear_model_load_error(
    tiny_model_dir: Path, tmp_path: Path, damage: str, reason: str
) -> None:
    folder = tmp_path / "m"
    if damage != "absent":
        shutil.copytree(tiny_model_dir, folder)
    if damage == "no-weights":
        (folder / "model.safetensors").unlink()
    elif damage == "bad-config":
        (folder / "config.json").write_text("{not json")
    elif damage == "truncated-weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad-tokenizer":
        (folder / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    elif damage == "bad-metadata":
        (folder / "planetserve.json").write_text("[]")
    with pytest.raises(ModelLoadError) as info:
        TorchEngine.from_folder(folder)
    assert reason in str(info.value)
    assert info.value.code.startswith("model")


def test_model_id_agrees_with_the_ledger_registry_id(tiny_model_dir: Path) -> None:
    from ledger import model_id

    info = read_info(tiny_model_dir)
    assert info is not None
    assert model_id(f"{info.name}@{info.revision}") == info.model_id
