"""The client's own tokenizer: prompt chunk hashes are computed locally, so they must use the model's tokenizer.

Only ``tokenizer.json`` of a model folder is read (the ``tokenizers`` library, no weights, no transformers), and the
prompt is encoded exactly as the torch engine encodes it (no special tokens), so the client's chained chunk hashes
equal the model node's block hashes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node.inference import ModelLoadError


def load_tokenizer(model_dir: Path) -> Callable[[str], list[int]]:
    """``encode(text) -> token ids`` for the model in ``model_dir``."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # the client extra may lack it: say what to install
        raise ModelLoadError(path=str(model_dir), reason="the 'tokenizers' package is not installed") from exc
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass for a missing or corrupt file
        raise ModelLoadError(path=str(model_dir), reason="no readable tokenizer.json") from exc

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    return encode
