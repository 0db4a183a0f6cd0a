"""``ps-node model make|make-variant|eval``: the project's own small models (issue 3).

Each command parses options, calls one ``node.inference`` function and prints through ``cli._output``; training
progress goes to stderr, results to stdout (``--json`` for machines).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli._main import new_app
from cli._output import emit, info
from cli._progress import StepProgress

app = new_app("Build the project's own small models and weaker variants.")

_Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.", envvar="PS_JSON")]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _print_made(model: Any, path: Path, seconds: float, *, as_json: bool, title: str) -> None:
    """The model's fields; for people, then one last line with nothing but ``name@revision`` to copy."""
    emit(_info_dict(model, path, seconds), as_json=as_json, title=title)
    if not as_json:
        print(f"{model.name}@{model.revision}")


def _info_dict(model: Any, path: Path, seconds: float) -> dict[str, Any]:
    return {
        "model": f"{model.name}@{model.revision}",
        "name": model.name,
        "kind": model.kind,
        "revision": model.revision,
        "model_id": model.model_id,
        "path": str(path),
        "seconds": round(seconds, 2),
    }


@app.command("make")
def make(
    out: Annotated[Path, typer.Option("--out", help="Folder to create (absent or empty).", envvar="PS_MODEL_OUT")],
    quick: Annotated[
        bool, typer.Option("--quick", envvar="PS_MODEL_QUICK", help="Smaller and faster: under a minute on 2 cores.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Training seed.", envvar="PS_MODEL_SEED")] = 0,
    name: Annotated[
        str | None, typer.Option("--name", envvar="PS_MODEL_NAME", help="Model name (default ps-tiny[-quick]).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", envvar="PS_MODEL_STEPS", help="Override the number of training steps.")
    ] = None,
    as_json: _Json = False,
) -> None:
    """Train a small Llama-architecture model on the procedural corpus and save it with its tokenizer."""
    _offline()
    from node.inference import ModelRecipe, make_model

    recipe = ModelRecipe.quick() if quick else ModelRecipe.default()
    changes: dict[str, Any] = {"seed": seed}
    if name is not None:
        changes["name"] = name
    if steps is not None:
        changes["steps"] = steps
    recipe = dataclasses.replace(recipe, **changes)
    started = time.perf_counter()
    info(f"building {recipe.name}: a tokenizer, then {recipe.steps} training steps (seed {recipe.seed})")
    with StepProgress(f"training {recipe.name}") as bar:
        made = make_model(out, recipe, on_step=bar.update)
    _print_made(made, out, time.perf_counter() - started, as_json=as_json, title="model")


@app.command("make-variant")
def make_variant(
    source: Annotated[Path, typer.Option("--from", envvar="PS_VARIANT_FROM", help="The original model folder.")],
    kind: Annotated[
        str,
        typer.Option(
            "--kind", envvar="PS_VARIANT_KIND", help="fewer-layers | half-width | int8 (CPU only) | undertrained | seed"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", envvar="PS_MODEL_OUT", help="Folder to create (absent or empty).")],
    as_json: _Json = False,
) -> None:
    """Derive a cheaper or different model a dishonest node might serve (same tokenizer, different quality).

    half-width, undertrained and seed train a new model (minutes); fewer-layers and int8 take seconds.
    """
    _offline()
    from node.inference import make_variant as build

    started = time.perf_counter()
    with StepProgress(f"variant {kind}") as bar:
        made = build(source, kind, out, on_step=bar.update)
    _print_made(made, out, time.perf_counter() - started, as_json=as_json, title="variant")


@app.command("eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model folder.")],
    problems: Annotated[
        int, typer.Option("--problems", envvar="PS_EVAL_PROBLEMS", help="Held-out arithmetic problems to ask.", min=1)
    ] = 100,
    as_json: _Json = False,
) -> None:
    """Held-out arithmetic accuracy and held-out text perplexity of a model folder."""
    _offline()
    from node.inference import evaluate as run_eval

    result = run_eval(model_dir, n_problems=problems)
    emit(dataclasses.asdict(result), as_json=as_json, title="quality")
