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

from node.inference._corpus import corpus_lines, held_out_problems
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

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

VariantKind = Literal["fewer-layers", "int8", "undertrained", "seed"]
VARIANT_KINDS: tuple[str, ...] = ("fewer-layers", "int8", "undertrained", "seed")
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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "layers", "heads", "steps", "batch_size", "seq_len", "corpus_lines"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParams(param=name, value=value, reason="must be a positive integer")
        if self.hidden_size % self.heads:
            raise InvalidParams(param="heads", value=self.heads, reason="must divide hidden_size")
        if self.vocab_size < 300:
            raise InvalidParams(param="vocab_size", value=self.vocab_size, reason="must be >= 300 (bytes + merges)")

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
        return cls(**{k: v for k, v in raw.items() if k in fields})


#: ``--quick``: under a minute on two CPU cores.
QUICK = ModelRecipe(
    name="ps-tiny-quick", hidden_size=128, layers=4, heads=4, intermediate_size=352, steps=180, batch_size=16
)
#: The default model: a few minutes on two CPU cores.
DEFAULT = ModelRecipe()


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    """Quality of one model folder."""

    model_id: str
    name: str
    kind: str
    #: Exact-match accuracy on held-out addition problems, 0..1.
    arithmetic_accuracy: float
    #: Mean absolute error of the numeric answers (a non-number counts as 100), a graded view of the same test.
    arithmetic_mae: float
    #: Problems evaluated.
    arithmetic_n: int
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
    import os
    import shutil
    import tempfile

    key = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    target = root / f"{recipe.name}-{key}"
    if (target / METADATA_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        make_model(tmp / "model", recipe, progress=progress)
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
    """A weaker model derived from ``source``: "fewer-layers" (first half of the layers), "int8" (weights rounded to
    int8 per output channel, stored dequantized), "undertrained" (same recipe, 1/8 of the steps) or "seed" (same
    recipe, another seed). The tokenizer is kept, so token ids line up with the original for scoring.
    """
    import torch

    if kind not in VARIANT_KINDS:
        raise InvalidParams(param="kind", value=kind, reason=f"one of {', '.join(VARIANT_KINDS)}")
    _check_out(out)
    model, tokenizer, info = load_model(source, device="cpu")
    if info is None:
        raise ModelLoadError(path=str(source), reason="no planetserve.json; only project models have variants")
    base_name = info.name
    recipe_raw = dict(info.recipe)
    if kind in ("undertrained", "seed"):
        recipe = ModelRecipe.from_dict(recipe_raw)
        if kind == "undertrained":
            recipe = dataclasses.replace(recipe, steps=max(1, recipe.steps // 8))
        else:
            recipe = dataclasses.replace(recipe, seed=recipe.seed + 1)
        return make_model(
            out, recipe, tokenizer=tokenizer, kind=kind, name=f"{base_name}-{kind}", progress=progress, on_step=on_step
        )
    if kind == "fewer-layers":
        keep = max(1, model.config.num_hidden_layers // 2)
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:keep])
        model.config.num_hidden_layers = keep
        recipe_raw["layers"] = keep
    else:  # int8
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
                    w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
    recipe_raw["variant_of"] = info.model_id
    return _save(model, tokenizer, out, f"{base_name}-{kind}", kind, recipe_raw)


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


def _answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new: int = 4) -> str:
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
            out.append(token)
            if "\n" in tokenizer.decode(out):
                break
            inp = torch.tensor([[token]])
    return str(tokenizer.decode(out)).split("\n")[0].strip()


def evaluate(path: Path, *, n_problems: int = 100, eval_lines: int = 400) -> EvalResult:
    """Held-out arithmetic exact-match accuracy and held-out text perplexity of a model folder."""
    started = time.perf_counter()
    model, tokenizer, info = load_model(path, device="cpu")
    problems = held_out_problems(n_problems)
    # Each problem starts a line, as in training (a bare "a+b=" at the start of the context is out of distribution).
    answers = [(_answer(model, tokenizer, "\n" + prompt), answer) for prompt, answer in problems]
    correct = sum(got == want for got, want in answers)
    errors = [min(abs(int(got) - int(want)), 100) if got.isdigit() else 100 for got, want in answers]
    text = "\n".join(corpus_lines(99_991, eval_lines, held_out=True)) + "\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    window = int(info.recipe.get("seq_len", 96)) if info else 96
    ppl, n_tokens = _perplexity(model, ids, window)
    return EvalResult(
        model_id=info.model_id if info else "",
        name=info.name if info else path.name,
        kind=info.kind if info else "unknown",
        arithmetic_accuracy=correct / max(len(problems), 1),
        arithmetic_mae=sum(errors) / max(len(errors), 1),
        arithmetic_n=len(problems),
        perplexity=ppl,
        eval_tokens=n_tokens,
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - started,
    )


def read_model_info(path: Path) -> ModelInfo:
    """``planetserve.json`` of a project model folder (``ModelLoadError`` when absent)."""
    info = read_info(path)
    if info is None:
        raise ModelLoadError(path=str(path), reason="no planetserve.json")
    return info
