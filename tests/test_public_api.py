"""Each package's public surface is pinned: a change to ``__all__`` must be a deliberate edit here."""

from __future__ import annotations

import importlib

import pytest

EXPECTED: dict[str, list[str]] = {
    "ledger": [
        "Anvil",
        "AnvilConfig",
        "Artifact",
        "ArtifactsMissing",
        "ChainError",
        "ChainNotReachable",
        "ChainUnavailable",
        "ContractRevert",
        "Deployment",
        "DeploymentNotFound",
        "IndexedNode",
        "Indexer",
        "IndexerError",
        "InsufficientFunds",
        "InvalidChainInput",
        "NodeInfo",
        "NodeRegistry",
        "OperatorKeyError",
        "RegistryParams",
        "Role",
        "SyncReport",
        "TransactionFailed",
        "TxReceipt",
        "UnknownRevert",
        "Wei",
        "WrongChainId",
        "checksum",
        "connect",
        "default_deployment_path",
        "deploy_all",
        "dev_account",
        "format_eth",
        "load_artifact",
        "load_deployment",
        "model_id",
        "open_registry",
        "parse_eth",
    ],
    "node": ["IdentityError", "NodeIdentity", "PlanetServeError"],
    "node.inference": [
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
    ],
}


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_public_surface_is_pinned_and_sorted(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{package}.__all__ is not sorted"
    assert exported == EXPECTED[package]
    for name in exported:
        assert hasattr(module, name), f"{package}.{name} is exported but missing"
