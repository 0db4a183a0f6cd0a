"""Shared pytest set-up. Each layer keeps its fixtures in its own plugin module under ``tests/fixtures``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
]
