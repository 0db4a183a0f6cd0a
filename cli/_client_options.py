"""Options the routing ``ps-client`` commands share (ask, chat, serve; ``--timeout``: ask and chat), declared once.

Why here: ``cli/client.py`` and ``cli/_client_net.py`` both route requests through a ``node.client.Client``; an option
declared twice drifts (one command's bounds or variable name changes, the other's does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

#: Most model nodes a request may weigh (each weighed node's heartbeat is fetched): far above any sample a client
#: needs (the default is 16), low enough that a typo cannot make every request poll thousands of nodes; 0 means all.
MAX_CANDIDATES = 1024

CandidatesOpt = Annotated[
    int,
    typer.Option(
        "--candidates",
        envvar="PS_CANDIDATES",
        min=0,
        max=MAX_CANDIDATES,
        help="Model nodes weighed per request: a random sample plus the nodes holding the prompt's prefix (0: all).",
    ),
]

#: Most seconds ``ask``/``chat`` may take by default: the OpenAI endpoint's whole-request deadline (a node that keeps
#: sending one token a minute stays within every per-frame timeout; this bounds the whole answer).
DEFAULT_TIMEOUT_S = 300.0

TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        envvar="PS_TIMEOUT",
        min=0.1,
        max=86_400.0,
        help="Most seconds the whole request may take (exit 9 after).",
    ),
]

TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        envvar="PS_TOKENIZER",
        help="A model folder whose tokenizer computes prompt chunk hashes locally (prefix-aware routing).",
    ),
]


def prompt_tokenizer(folder: Path | None) -> Any:
    """The tokenizer of the model folder ``folder`` (None: none, the client then routes without prefix affinity)."""
    if folder is None:
        return None
    from node.client import load_tokenizer  # transformers: only when asked for

    return load_tokenizer(folder)
