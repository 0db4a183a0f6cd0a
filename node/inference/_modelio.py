"""Model folders: loading them with clear errors, their metadata, revision and on-chain id.

A model folder is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``) plus the tokenizer files and
``planetserve.json`` (name, revision, id, how it was made). The revision is a hash of the weights, so two folders with
the same weights have the same id whatever their file layout; the id is ``keccak(name@revision)``, the kernel's
:class:`~planetserve.ModelId` (the ``bytes32`` the registry stores, written as 0x-hex in ``planetserve.json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.inference._errors import InvalidParams, ModelLoadError
from planetserve import InvalidValue, ModelId

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

#: Metadata file written next to the weights.
METADATA_FILE = "planetserve.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What ``planetserve.json`` records about a model folder."""

    #: Human name, e.g. "ps-tiny"; with the revision it forms the on-chain id.
    name: str
    #: 40 hex characters: sha256 of the weights in canonical order, truncated.
    revision: str
    #: keccak of ``name@revision`` (read from the file's 0x-hex and checked).
    model_id: ModelId
    #: How it was made: "base" or a variant kind ("fewer-layers", "int8", "undertrained", "seed").
    kind: str
    #: Everything needed to rebuild it (corpus seed, sizes, steps); opaque to the engine.
    recipe: dict[str, Any]


def model_id_for(name: str, revision: str) -> ModelId:
    """The registry's model id of ``name`` at ``revision``: :meth:`planetserve.ModelId.of` of ``name@revision``."""
    try:
        return ModelId.of(f"{name}@{revision}", param="name")
    except InvalidValue as exc:
        raise InvalidParams(param="name", value=name, reason="a model name is 1-128 of A-Z a-z 0-9 . _ / -") from exc


def weights_revision(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the weights: names, dtypes, shapes and bytes, in sorted name order (40 hex chars)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(repr(tuple(tensor.shape)).encode())
        h.update(tensor.view(-1).view(dtype=_u8()).numpy().tobytes())
    return h.hexdigest()[:40]


def _u8() -> torch.dtype:
    import torch

    return torch.uint8


def read_info(path: Path) -> ModelInfo | None:
    """The folder's ``planetserve.json``, or None when absent (a foreign HF folder still loads)."""
    meta = path / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        raw = json.loads(meta.read_text())
        return ModelInfo(
            name=str(raw["name"]),
            revision=str(raw["revision"]),
            model_id=ModelId.parse(raw["model_id"], param="model_id"),
            kind=str(raw.get("kind", "base")),
            recipe=dict(raw.get("recipe", {})),
        )
    except (OSError, ValueError, KeyError, TypeError, InvalidValue) as exc:
        raise ModelLoadError(path=str(path), reason=f"{METADATA_FILE} is unreadable ({type(exc).__name__})") from exc


def write_info(path: Path, info: ModelInfo) -> None:
    """Write ``planetserve.json``."""
    payload = {
        "name": info.name,
        "revision": info.revision,
        "model_id": info.model_id,
        "kind": info.kind,
        "recipe": info.recipe,
    }
    (path / METADATA_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def check_folder(path: Path) -> None:
    """Raise ``ModelLoadError`` unless ``path`` looks like a loadable model folder."""
    if not path.exists():
        raise ModelLoadError(path=str(path), reason="folder does not exist")
    if not path.is_dir():
        raise ModelLoadError(path=str(path), reason="not a folder")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(path=str(path), reason=f"missing {', '.join(missing)}")


def quiet_transformers() -> None:
    """Turn off transformers' progress bars: they write to stderr, which belongs to our diagnostics."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The folder's fast tokenizer, offline."""
    from transformers import PreTrainedTokenizerFast

    check_folder(path)
    try:
        tok: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # the tokenizers library raises bare Exceptions on corrupt files
        raise ModelLoadError(path=str(path), reason=f"tokenizer is corrupt ({type(exc).__name__})") from exc
    return tok


def load_model(path: Path, *, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerFast, ModelInfo | None]:
    """Load weights, tokenizer and metadata from ``path``; every failure becomes ``ModelLoadError``."""
    import os

    check_folder(path)  # before the (slow) transformers import, so a wrong path fails fast
    info = read_info(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from node.inference._quant import INT8_DYNAMIC, load_int8, quantization_of

    quiet_transformers()
    tokenizer = load_tokenizer(path)
    quantization = quantization_of(path)
    if quantization == INT8_DYNAMIC:
        model = load_int8(path)  # int8 kernels exist for CPU only: the device must be "cpu"
    elif quantization is not None:
        raise ModelLoadError(path=str(path), reason=f"unknown quantization {quantization[:32]!r}")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # safetensors/json/transformers raise many unrelated types on corrupt files
            raise ModelLoadError(
                path=str(path), reason=f"weights or config are corrupt ({type(exc).__name__})"
            ) from exc
    if quantization is not None and device != "cpu":
        raise ModelLoadError(path=str(path), reason=f"int8 dynamic quantization runs on CPU only, not {device}")
    model = model.to(device)  # type: ignore[arg-type]  # transformers' typed wrapper rejects str devices
    model.eval()
    if model.config.vocab_size < len(tokenizer):
        raise ModelLoadError(path=str(path), reason="tokenizer is larger than the model's vocabulary")
    return model, tokenizer, info
