"""``ps-node register|stake|unbond|withdraw|status|list``: the node's on-chain life (issue 2)."""

from __future__ import annotations

from cli._main import new_app

app = new_app("Register, stake, unbond and withdraw on chain.")
