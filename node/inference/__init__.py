"""Inference engines behind one ``Engine`` protocol, the prefix-chunk hashing routing shares, and the project's own
small models.

Importing this package is cheap: torch, transformers and tensorrt_llm load inside the functions that need them.
"""

from node.inference._corpus import held_out_problems
from node.inference._engine import Engine
from node.inference._errors import (
    EngineClosed,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InferenceError,
    InvalidParams,
    ModelLoadError,
)
from node.inference._factory import ENGINE_KINDS, load_engine, resolve_kind
from node.inference._modelio import ModelInfo, model_id_for, read_info
from node.inference._openai_http import OpenAIHttpEngine
from node.inference._prefix import CHUNK_TOKENS, chunk_hashes, longest_match
from node.inference._torch_engine import EngineConfig, TorchEngine
from node.inference._training import (
    EvalResult,
    ModelRecipe,
    ensure_model,
    evaluate,
    make_model,
    make_variant,
)
from node.inference._trtllm import TensorRtLlmEngine
from node.inference._types import EngineStats, GenerationChunk, GenerationRequest, SamplingParams, ScoreResult

__all__ = [
    "CHUNK_TOKENS",
    "ENGINE_KINDS",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineOverloaded",
    "EngineStats",
    "EngineTimeout",
    "EngineUnavailable",
    "EvalResult",
    "GenerationChunk",
    "GenerationRequest",
    "InferenceError",
    "InvalidParams",
    "ModelInfo",
    "ModelLoadError",
    "ModelRecipe",
    "OpenAIHttpEngine",
    "SamplingParams",
    "ScoreResult",
    "TensorRtLlmEngine",
    "TorchEngine",
    "chunk_hashes",
    "ensure_model",
    "evaluate",
    "held_out_problems",
    "load_engine",
    "longest_match",
    "make_model",
    "make_variant",
    "model_id_for",
    "read_info",
    "resolve_kind",
]
