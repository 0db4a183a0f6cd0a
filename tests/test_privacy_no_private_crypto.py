"""No module of ours reaches into a crypto library's private names (issue 9: they break when the library changes
its internals, as pycryptodome's raw API did once ``cffi`` became importable)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Packages whose private names are off limits.
CRYPTO_PACKAGES = ("Crypto", "Cryptodome", "cryptography", "nacl")
SOURCES = sorted(p for d in ("node", "cli", "ledger") for p in (ROOT / d).rglob("*.py"))


def _is_crypto(module: str) -> bool:
    return module.split(".")[0] in CRYPTO_PACKAGES


def private_crypto_imports(source: str) -> list[str]:
    """Every import in ``source`` of a private crypto module or name (``_x`` anywhere in the dotted path or the
    imported name), and every attribute access ``Crypto._x`` / ``cryptography._x``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_crypto(alias.name) and any(part.startswith("_") for part in alias.name.split(".")):
                    found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and _is_crypto(node.module):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(node.module)
            found.extend(f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in CRYPTO_PACKAGES:
                found.append(f"{base.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from Crypto.Util._raw_api import VoidPointer",
        "from Crypto.Cipher._mode_gcm import _GHASH",
        "from Crypto.Protocol.DH import _compute_ecdh",
        "import cryptography.hazmat._oid",
        "import Crypto\nx = Crypto._raw_api",
    ],
)
def test_the_checker_catches_private_imports(source: str) -> None:
    assert private_crypto_imports(source)


def test_the_checker_allows_public_imports() -> None:
    assert not private_crypto_imports(
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\nfrom Crypto.Cipher import AES\nimport hmac"
    )


def test_no_source_module_imports_a_private_crypto_name() -> None:
    assert SOURCES, "no sources found"
    offenders = {str(p.relative_to(ROOT)): found for p in SOURCES if (found := private_crypto_imports(p.read_text()))}
    assert offenders == {}
    assert not any("_raw_api" in p.read_text() for p in SOURCES)
