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


def test_the_kernel_imports_no_layer_and_no_third_party_package() -> None:
    loaded = _modules_after("import planetserve")
    ours = {m.split(".")[0] for m in loaded} & {"node", "ledger", "cli", "verifier", "web3", "aiohttp", "torch"}
    assert not ours


def test_every_layer_shares_one_root_error() -> None:
    import ledger
    import node
    import planetserve

    assert node.PlanetServeError is planetserve.PlanetServeError
    assert issubclass(ledger.ChainError, planetserve.PlanetServeError)
