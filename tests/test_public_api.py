"""Each package's public surface is pinned: a change to ``__all__`` must be a deliberate edit here."""

from __future__ import annotations

import importlib

import pytest

EXPECTED: dict[str, list[str]] = {
    "node": ["PlanetServeError"],
}


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_public_surface_is_pinned_and_sorted(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{package}.__all__ is not sorted"
    assert exported == EXPECTED[package]
    for name in exported:
        assert hasattr(module, name), f"{package}.{name} is exported but missing"
