"""Genuinely int8 models: torch dynamic quantization of every Linear layer, saved as int8 in safetensors.

Why it exists: a dishonest node's cheapest trick is to serve a quantized copy of the registered model. To test a
verifier against that, the copy must be what such a node would run: int8 weights on disk (about a quarter of the
Linear bytes) and int8 matrix kernels at run time (``torch.ao.nn.quantized.dynamic.Linear``: activations are quantized
per batch, the product runs in int8 with int32 accumulation through fbgemm/qnnpack), not fp32 weights rounded to a
grid, which change nothing a node pays for.

The file stays safetensors (no pickle): each quantized layer ``L`` stores ``L.weight_int8`` (int8, [out, in]) and
``L.weight_scale`` (float32, per output channel, symmetric so zero points are 0), plus ``L.bias`` when it has one;
every other tensor (embeddings, norms) is stored as it was. The safetensors metadata key ``planetserve_quantization``
says so, and ``_modelio.load_model`` rebuilds the modules from it.

torch marks ``torch.ao.quantization`` as deprecated in favour of torchao (not installed, and not needed for CPU
int8); it still works in torch 2.13, and its deprecation warnings are silenced only around the two calls that raise
them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from node.inference._errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers import PreTrainedModel

#: Value of the safetensors metadata key ``planetserve_quantization`` for these files.
INT8_DYNAMIC = "int8-dynamic"
#: The metadata key.
QUANT_KEY = "planetserve_quantization"


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """Silence torch's deprecation notices for eager-mode quantization (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        yield


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a dynamically quantized int8 Linear, per channel."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quiet_deprecation():
        quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return model


def _quantized_linears(model: torch.nn.Module) -> dict[str, DynamicLinear]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of ``model`` including those packed inside quantized Linears (which ``parameters()`` skips)."""
    total = sum(p.numel() for p in model.parameters())
    for module in _quantized_linears(model).values():
        total += int(module.weight().numel())  # type: ignore[no-untyped-call]
    return total


def int8_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors a quantized ``model`` is saved as (see the module docstring)."""
    linears = _quantized_linears(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        weight, bias = module.weight(), module.bias()  # type: ignore[no-untyped-call]
        out[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        out[f"{name}.weight_scale"] = weight.q_per_channel_scales().float().contiguous()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().contiguous()
    prefixes = tuple(f"{name}." for name in linears)
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefixes):
            out[key] = tensor.detach().contiguous()
    return out


def save_int8(model: PreTrainedModel, out: Path) -> dict[str, torch.Tensor]:
    """Write ``config.json`` and an int8 ``model.safetensors`` for a quantized ``model``; returns the tensors."""
    from safetensors.torch import save_file

    tensors = int8_tensors(model)
    model.config.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", QUANT_KEY: INT8_DYNAMIC})
    return tensors


def quantization_of(path: Path) -> str | None:
    """The folder's ``planetserve_quantization`` marker, or None for an ordinary checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:  # corrupt header: let the ordinary loader report it with its own reason
        return None
    return meta.get(QUANT_KEY)


def load_int8(path: Path) -> PreTrainedModel:
    """Rebuild a model saved by ``save_int8``: fp32 skeleton from the config, quantized Linears, saved values."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors/json raise many unrelated types on corrupt files
        raise ModelLoadError(path=str(path), reason=f"weights or config are corrupt ({type(exc).__name__})") from exc
    model = quantize_int8(AutoModelForCausalLM.from_config(config))  # type: ignore[no-untyped-call]
    linears = _quantized_linears(model)
    try:
        with _quiet_deprecation():
            for name, module in linears.items():
                ints, scales = tensors.pop(f"{name}.weight_int8"), tensors.pop(f"{name}.weight_scale")
                zeros = torch.zeros(scales.numel(), dtype=torch.long)
                # Re-quantizing int * scale with the same scale gives back exactly the stored integers.
                weight = torch.quantize_per_channel(
                    ints.float() * scales[:, None], scales.double(), zeros, 0, torch.qint8
                )
                module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
            # The quantized modules insist on their own state-dict keys, so the other tensors are copied one by one.
            params = dict(model.named_parameters())
            if set(params) != set(tensors):
                raise KeyError(f"{len(set(params) ^ set(tensors))} tensors differ")
            with torch.no_grad():
                for key, value in tensors.items():
                    params[key].copy_(value)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            path=str(path), reason=f"int8 weights do not fit the config ({type(exc).__name__})"
        ) from exc
    model.eval()  # type: ignore[no-untyped-call]
    return model
