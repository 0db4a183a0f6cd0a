"""Making the project's own models: tokenizer, tiny Llama, CPU training, weaker variants and evaluation.

No downloads, ever: the tokenizer is trained locally with ``tokenizers`` on the procedural corpus, the model is a
freshly initialised ``LlamaForCausalLM``, and everything is a function of a :class:`ModelRecipe` (seed included), so a
folder can be rebuilt from its ``planetserve.json``. Variants model what a dishonest node might serve instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from node.inference._corpus import CORPUS_VERSION, corpus_lines, held_out_problems, held_out_prompts
from node.inference._errors import InvalidParams, ModelLoadError
from node.inference._modelio import (
    METADATA_FILE,
    ModelInfo,
    load_model,
    model_id_for,
    read_info,
    weights_revision,
    write_info,
)
from planetserve import ModelId

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

VariantKind = Literal["fewer-layers", "half-width", "int8", "undertrained", "seed"]
VARIANT_KINDS: tuple[str, ...] = ("fewer-layers", "half-width", "int8", "undertrained", "seed")
_SPECIALS = ["<|endoftext|>", "<|pad|>"]
#: ``on_step(steps_done, steps_total, loss)``: called after each training step (feeds a progress bar).
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecipe:
    """Everything that determines a model (same recipe + same machine → same weights)."""

    name: str = "ps-tiny"
    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 256
    layers: int = 4
    heads: int = 8
    intermediate_size: int = 704
    #: Context length (RoPE positions); training windows are ``seq_len`` long.
    max_position: int = 2048
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 96
    lr: float = 3e-3
    corpus_lines: int = 40_000
    #: The corpus generator's version (``_corpus.CORPUS_VERSION``): only the current one can be trained.
    corpus_version: int = CORPUS_VERSION

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "layers", "heads", "steps", "batch_size", "seq_len", "corpus_lines"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParams(param=name, value=value, reason="must be a positive integer")
        if self.hidden_size % self.heads:
            raise InvalidParams(param="heads", value=self.heads, reason="must divide hidden_size")
        if self.vocab_size < 300:
            raise InvalidParams(param="vocab_size", value=self.vocab_size, reason="must be >= 300 (bytes + merges)")
        if self.corpus_version != CORPUS_VERSION:
            raise InvalidParams(
                param="corpus_version", value=self.corpus_version, reason=f"only version {CORPUS_VERSION} exists"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form stored in ``planetserve.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def quick(cls) -> ModelRecipe:
        """``--quick``: under a minute on two CPU cores."""
        return QUICK

    @classmethod
    def default(cls) -> ModelRecipe:
        """The default model: a few minutes on two CPU cores."""
        return DEFAULT

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelRecipe:
        """Inverse of ``to_dict`` (unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        # A recipe written before the corpus was versioned was trained on version 1, which no longer exists.
        return cls(**{"corpus_version": 1} | {k: v for k, v in raw.items() if k in fields})


#: ``--quick``: under a minute on two CPU cores.
QUICK = ModelRecipe(
    name="ps-tiny-quick", hidden_size=128, layers=4, heads=4, intermediate_size=352, steps=180, batch_size=16
)
#: The default model, the one worth verifying: its greedy answers depend on the prompt (copy, reverse, addition).
#: 1000 steps of 32 x 64 tokens at width 128, about 0.24 CPU-seconds a step on one core: about 4 CPU-minutes. Fewer
#: steps are not enough: addition's units digit is learned in a jump while the learning rate is still high (around
#: step 350 of this schedule); with a 600-step schedule it never was (0% exact, tens digit right).
DEFAULT = ModelRecipe(
    hidden_size=128, layers=4, heads=4, intermediate_size=384, steps=1000, batch_size=32, seq_len=64, lr=3e-3
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    """Quality of one model folder."""

    #: The folder's model id (``ModelId.ZERO`` without metadata).
    model_id: ModelId
    name: str
    kind: str
    #: Exact-match accuracy on held-out addition problems, 0..1.
    arithmetic_accuracy: float
    #: Mean absolute error of the numeric answers (a non-number counts as 100), a graded view of the same test.
    arithmetic_mae: float
    #: Problems evaluated.
    arithmetic_n: int
    #: Fraction of held-out prompts (``_corpus.held_out_prompts``) whose greedy continuation (``CONTINUATION_TOKENS``
    #: tokens) no other prompt shares, 0..1; a model that ignores its prompt scores 1/n.
    distinct_continuations: float
    #: The same over the first line of each continuation only (the answer), 0..1; additions with equal sums collide.
    distinct_answers: float
    #: Exact-match accuracy of the first line on those prompts (addition, echo, reverse), 0..1.
    prompt_accuracy: float
    #: Held-out prompts evaluated.
    prompts_n: int
    #: Per-token perplexity on held-out corpus text (lower is better).
    perplexity: float
    #: Tokens the perplexity was measured on.
    eval_tokens: int
    parameters: int
    seconds: float


def train_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with single-digit pre-splitting (so arithmetic is learnable), trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=_SPECIALS[0], pad_token=_SPECIALS[1]
    )


def _new_model(recipe: ModelRecipe, vocab: int) -> PreTrainedModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_position,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config)


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    recipe: ModelRecipe,
    progress: Callable[[str], None] | None,
    on_step: StepCallback | None = None,
) -> None:
    import torch

    text = "\n".join(corpus_lines(recipe.seed, recipe.corpus_lines)) + "\n"
    stream = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if stream.numel() <= recipe.seq_len + 1:
        raise InvalidParams(param="corpus_lines", value=recipe.corpus_lines, reason="corpus shorter than one window")
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, recipe.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    offsets = torch.arange(recipe.seq_len + 1)
    for step in range(recipe.steps):
        starts = torch.randint(0, stream.numel() - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets[None, :]]
        # transformers shifts the labels itself, so labels == inputs gives next-token prediction.
        out = model(input_ids=batch, labels=batch, use_cache=False)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, recipe.steps, float(loss.detach()))
        if progress and (step % 100 == 0 or step == recipe.steps - 1):
            progress(f"step {step + 1}/{recipe.steps} loss {float(loss.detach()):.3f}")
    model.eval()  # type: ignore[no-untyped-call]


def _save(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path, name: str, kind: str, recipe: dict[str, Any]
) -> ModelInfo:
    from node.inference._modelio import quiet_transformers

    quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    revision = weights_revision(model.state_dict())
    info = ModelInfo(name=name, revision=revision, model_id=model_id_for(name, revision), kind=kind, recipe=recipe)
    write_info(out, info)
    return info


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidParams(param="out", value=str(out), reason="exists and is not an empty folder")


def make_model(
    out: Path,
    recipe: ModelRecipe = DEFAULT,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    kind: str = "base",
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
) -> ModelInfo:
    """Train a model from ``recipe`` and save it to ``out`` (which must be absent or empty).

    ``on_step(done, total, loss)`` is called after every optimiser step (a progress bar's feed); ``progress`` gets
    a line every 100 steps.
    """
    _check_out(out)
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus_lines(0, min(recipe.corpus_lines, 20_000)), recipe.vocab_size)
    model = _new_model(recipe, len(tokenizer))
    _train(model, tokenizer, recipe, progress, on_step)
    return _save(model, tokenizer, out, name or recipe.name, kind, recipe.to_dict())


def ensure_model(recipe: ModelRecipe, root: Path, *, progress: Callable[[str], None] | None = None) -> Path:
    """The folder for ``recipe`` under ``root`` (named by the recipe's hash), trained on first use.

    Benchmarks, the demo and the tests share models this way; a half-built folder is never visible because it is
    trained under a temporary name and renamed into place.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    return built_once(root / f"{recipe.name}-{key}", lambda out: make_model(out, recipe, progress=progress))


def built_once(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, a model folder that ``build(out)`` writes into the empty folder ``out``, built unless it is there.

    It is built under a temporary name beside ``target`` and renamed into place, so a half-built folder is never
    visible; when another process wins the race, its folder (equivalent) is kept."""
    import os
    import shutil
    import tempfile

    if (target / METADATA_FILE).is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(tmp / "model")
        try:
            os.replace(tmp / "model", target)
        except OSError:  # another process won the race; its folder is equivalent
            if not (target / METADATA_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_variant(
    source: Path,
    kind: str,
    out: Path,
    *,
    progress: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
) -> ModelInfo:
    """A cheaper or different model derived from ``source``, the substitutes a dishonest node might serve.

    - "fewer-layers": the first half of the layers, not retrained (saves half the compute, much worse);
    - "half-width": the same recipe at half the hidden and MLP width (and half the heads), trained from scratch;
    - "int8": every Linear dynamically quantized to int8 per output channel: an int8 file and int8 kernels (CPU);
    - "undertrained": the same recipe with 1/8 of the steps;
    - "seed": the same recipe with another seed, a substitute of (nearly) equal quality.

    The tokenizer is kept, so token ids line up with the original for scoring. Retrained kinds cost a training run
    (``progress``/``on_step`` report it).
    """
    import torch

    if kind not in VARIANT_KINDS:
        raise InvalidParams(param="kind", value=kind, reason=f"one of {', '.join(VARIANT_KINDS)}")
    _check_out(out)
    model, tokenizer, info = load_model(source, device="cpu")
    if info is None:
        raise ModelLoadError(path=str(source), reason="no planetserve.json; only project models have variants")
    if info.kind != "base":
        raise InvalidParams(param="source", value=info.kind, reason="variants are made from a base model")
    base_name = info.name
    recipe_raw = dict(info.recipe)
    if kind in ("undertrained", "seed", "half-width"):
        recipe = ModelRecipe.from_dict(recipe_raw)
        if kind == "undertrained":
            recipe = dataclasses.replace(recipe, steps=max(1, recipe.steps // 8))
        elif kind == "seed":
            recipe = dataclasses.replace(recipe, seed=recipe.seed + 1)
        else:
            recipe = dataclasses.replace(
                recipe,
                hidden_size=max(1, recipe.hidden_size // 2),
                intermediate_size=max(1, recipe.intermediate_size // 2),
                heads=max(1, recipe.heads // 2),
            )
        made = make_model(
            out, recipe, tokenizer=tokenizer, kind=kind, name=f"{base_name}-{kind}", progress=progress, on_step=on_step
        )
        return _mark_variant(out, made, info.model_id)
    recipe_raw["variant_of"] = info.model_id
    if kind == "fewer-layers":
        keep = max(1, model.config.num_hidden_layers // 2)
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:keep])
        model.config.num_hidden_layers = keep
        recipe_raw["layers"] = keep
        return _save(model, tokenizer, out, f"{base_name}-{kind}", kind, recipe_raw)
    from node.inference._quant import INT8_DYNAMIC, quantize_int8, save_int8

    out.mkdir(parents=True, exist_ok=True)
    tensors = save_int8(quantize_int8(model), out)
    tokenizer.save_pretrained(str(out))
    recipe_raw["quantization"] = INT8_DYNAMIC
    revision = weights_revision(tensors)
    name = f"{base_name}-{kind}"
    made = ModelInfo(name=name, revision=revision, model_id=model_id_for(name, revision), kind=kind, recipe=recipe_raw)
    write_info(out, made)
    return made


def _mark_variant(out: Path, made: ModelInfo, base_id: str) -> ModelInfo:
    """Record which base a retrained variant stands in for (``recipe.variant_of``), as the derived kinds do."""
    marked = dataclasses.replace(made, recipe={**made.recipe, "variant_of": base_id})
    write_info(out, marked)
    return marked


def _perplexity(model: PreTrainedModel, ids: list[int], window: int) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, chunk[0, 1:, None])[:, 0]
            total += float(logp.sum())
            count += int(logp.numel())
    return math.exp(-total / max(count, 1)), count


#: Tokens of greedy continuation compared by ``distinct_continuations``.
CONTINUATION_TOKENS = 16


def _continue(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new: int) -> list[int]:
    """Greedy continuation of ``prompt`` (at most ``max_new`` tokens, stopping early at end-of-sequence)."""
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out: list[int] = []
    past = None
    inp = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(max_new):
            res = model(input_ids=inp, cache=past, use_cache=True)
            past = res.cache
            token = int(torch.argmax(res.logits[0, -1]))
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            inp = torch.tensor([[token]])
    return out


def _answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new: int = 4) -> str:
    return str(tokenizer.decode(_continue(model, tokenizer, prompt, max_new))).split("\n")[0].strip()


def distinct_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    max_new: int = CONTINUATION_TOKENS,
) -> tuple[float, float, list[str]]:
    """(fraction of prompts with a unique greedy continuation, the same for first lines only, the continuations).

    Why: a verifier is only tested by a model whose output depends on its prompt; the quick model of old answered
    every prompt with the same loop, so a substitute that ignores the prompt would have passed unnoticed.
    """
    from collections import Counter

    texts = [str(tokenizer.decode(_continue(model, tokenizer, p, max_new))) for p in prompts]
    firsts = [t.split("\n")[0] for t in texts]

    def unique(items: list[str]) -> float:
        counts = Counter(items)
        return sum(1 for item in items if counts[item] == 1) / max(len(items), 1)

    return unique(texts), unique(firsts), texts


def evaluate(path: Path, *, n_problems: int = 100, eval_lines: int = 400, n_prompts: int = 100) -> EvalResult:
    """Held-out arithmetic exact match, prompt dependence and held-out text perplexity of a model folder."""
    from node.inference._quant import parameter_count

    started = time.perf_counter()
    model, tokenizer, info = load_model(path, device="cpu")
    problems = held_out_problems(n_problems)
    # Each problem starts a line, as in training (a bare "a+b=" at the start of the context is out of distribution).
    answers = [(_answer(model, tokenizer, "\n" + prompt), answer) for prompt, answer in problems]
    correct = sum(got == want for got, want in answers)
    errors = [min(abs(int(got) - int(want)), 100) if got.isdigit() else 100 for got, want in answers]
    prompts = held_out_prompts(n_prompts)
    distinct, distinct_first, texts = distinct_continuations(model, tokenizer, [p for p, _ in prompts])
    right = sum(text.split("\n")[0].strip() == want.strip() for text, (_, want) in zip(texts, prompts, strict=True))
    text = "\n".join(corpus_lines(99_991, eval_lines, held_out=True)) + "\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    window = int(info.recipe.get("seq_len", 96)) if info else 96
    ppl, n_tokens = _perplexity(model, ids, window)
    return EvalResult(
        model_id=info.model_id if info else ModelId.ZERO,
        name=info.name if info else path.name,
        kind=info.kind if info else "unknown",
        arithmetic_accuracy=correct / max(len(problems), 1),
        arithmetic_mae=sum(errors) / max(len(errors), 1),
        arithmetic_n=len(problems),
        distinct_continuations=distinct,
        distinct_answers=distinct_first,
        prompt_accuracy=right / max(len(prompts), 1),
        prompts_n=len(prompts),
        perplexity=ppl,
        eval_tokens=n_tokens,
        parameters=parameter_count(model),
        seconds=time.perf_counter() - started,
    )


def read_model_info(path: Path) -> ModelInfo:
    """``planetserve.json`` of a project model folder (``ModelLoadError`` when absent)."""
    info = read_info(path)
    if info is None:
        raise ModelLoadError(path=str(path), reason="no planetserve.json")
    return info
