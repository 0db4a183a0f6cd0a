"""``ps-node model make|make-variant|eval``: the project's own small models (issue 3)."""

from __future__ import annotations

from cli._main import new_app

app = new_app("Build the project's own small models and weaker variants.")
