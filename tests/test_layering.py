"""Layers import downwards only (ARCHITECTURE.md): ``ledger`` never imports ``node``; the kernel imports nothing."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_ledger_does_not_import_node() -> None:
    loaded = _modules_after("import ledger")
    assert not {m for m in loaded if m == "node" or m.startswith("node.")}


def _non_stdlib(loaded: set[str]) -> set[str]:
    """Top-level packages in ``loaded`` beyond the standard library and what a bare interpreter already holds."""
    bare = _modules_after("pass")
    return {m.split(".")[0] for m in loaded - bare} - set(sys.stdlib_module_names)


def test_the_kernel_imports_no_layer_and_no_third_party_package() -> None:
    loaded = _modules_after("import planetserve")
    assert _non_stdlib(loaded) - {"planetserve"} == set()


def test_the_kernel_hashes_with_pycryptodome_only_and_never_a_layer() -> None:
    # keccak (model ids, checksums) is the kernel's one third-party need, imported when first used.
    used = "import planetserve as k; k.ModelId.of('m@v1'); k.parse_address('0x' + 'ab' * 20)"
    extra = _non_stdlib(_modules_after(used))
    assert "Crypto" in extra
    assert not extra & {"node", "ledger", "cli", "verifier", "web3", "eth_utils", "eth_hash", "aiohttp", "torch"}


def test_every_layer_shares_one_root_error() -> None:
    import ledger
    import node
    import planetserve

    assert node.PlanetServeError is planetserve.PlanetServeError
    assert issubclass(ledger.ChainError, planetserve.PlanetServeError)
