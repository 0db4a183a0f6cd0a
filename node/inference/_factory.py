"""``load_engine``: pick and start an engine by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from node.inference._engine import Engine
from node.inference._errors import InvalidParams
from node.inference._torch_engine import EngineConfig

EngineKind = Literal["torch", "tensorrt_llm", "openai-http", "auto"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "openai-http", "tensorrt_llm", "torch")


def resolve_kind(kind: str) -> str:
    """The concrete engine ``kind`` selects: "auto" → "tensorrt_llm" where it is importable and CUDA is present.

    "openai-http" is never chosen by "auto": it needs an upstream URL.
    """
    if kind not in ENGINE_KINDS:
        raise InvalidParams(param="engine", value=kind, reason=f"one of {', '.join(ENGINE_KINDS)}")
    if kind != "auto":
        return kind
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "torch"
    import torch

    return "tensorrt_llm" if torch.cuda.is_available() else "torch"


def load_engine(
    kind: str, model_dir: str | Path, config: EngineConfig | None = None, *, upstream: str | None = None
) -> Engine:
    """Start the ``kind`` engine ("torch", "tensorrt_llm", "openai-http" or "auto") on ``model_dir``.

    "openai-http" fronts the OpenAI-compatible server at ``upstream`` (required for it, refused for the others);
    ``model_dir`` then supplies only the tokenizer and the model id.
    """
    concrete = resolve_kind(kind)
    if concrete == "openai-http":
        if not upstream:
            raise InvalidParams(param="upstream", value=None, reason="the openai-http engine needs an upstream URL")
        from node.inference._openai_http import OpenAIHttpEngine

        return OpenAIHttpEngine.from_folder(model_dir, upstream, config)
    if upstream:
        raise InvalidParams(param="upstream", value=None, reason="only the openai-http engine takes an upstream")
    if concrete == "tensorrt_llm":
        from node.inference._trtllm import TensorRtLlmEngine

        return TensorRtLlmEngine.from_folder(model_dir, config)
    from node.inference._torch_engine import TorchEngine

    return TorchEngine.from_folder(model_dir, config)
