"""Load the compiled contract artefacts that ``scripts/compile_contracts.js`` writes into ``build/contracts``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ledger._errors import ArtifactsMissing

#: The repository root (artefacts are build outputs of this checkout, not package data).
_ROOT = Path(__file__).resolve().parent.parent


def artifacts_dir() -> Path:
    """Where compiled artefacts live: ``$PS_ARTIFACTS_DIR`` or ``<repo>/build/contracts``."""
    return Path(os.environ.get("PS_ARTIFACTS_DIR", _ROOT / "build" / "contracts"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact:
    """One compiled contract."""

    #: The Solidity contract name.
    name: str
    #: The ABI, as solc emits it.
    abi: tuple[dict[str, Any], ...]
    #: Creation bytecode, 0x-prefixed hex.
    bytecode: str
    #: Runtime bytecode, 0x-prefixed hex.
    deployed_bytecode: str

    @property
    def abi_hash(self) -> str:
        """sha256 of the canonical ABI JSON: a deployment records it to detect a stale build."""
        canonical = json.dumps(list(self.abi), sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(canonical.encode()).hexdigest()


@cache
def load_artifact(name: str) -> Artifact:
    """Read ``build/contracts/<name>.json``; raises ``ArtifactsMissing`` (telling to run ``make bootstrap``)."""
    path = artifacts_dir() / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactsMissing(str(path)) from None
    except (OSError, ValueError) as exc:
        raise ArtifactsMissing(str(path)) from exc
    return Artifact(
        name=name,
        abi=tuple(data["abi"]),
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
    )
