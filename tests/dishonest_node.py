"""Run inside a ``ps-node serve`` process (``NodeSpec.prelude``) to make it a model node that under-reports its
load: its signed heartbeat always says idle (no queue, nothing running), and its engine runs one request at a time,
so requests really wait there. Everything else is the real node."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from node.inference import EngineConfig, EngineStats


def _zero_load(stats: Callable[[], EngineStats]) -> Callable[[], EngineStats]:
    return lambda: dataclasses.replace(
        stats(), queued_requests=0, running_requests=0, queued_tokens=0, decode_backlog_tokens=0
    )


def install(*, max_running: int = 1) -> None:
    """Patch this process's ``ps-node serve`` before it starts."""
    import cli._node_serve as serve
    from node.overlay import _heartbeat

    honest = _heartbeat.HeartbeatPublisher

    class UnderReporting(honest):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            kwargs["stats"] = _zero_load(kwargs["stats"])
            super().__init__(**kwargs)

    # setattr: these replace module attributes the CLI reads when it builds the node (the patch is the point).
    setattr(_heartbeat, "HeartbeatPublisher", UnderReporting)  # noqa: B010
    one_at_a_time = functools.partial(EngineConfig, max_running=max_running)
    setattr(serve, "EngineConfig", one_at_a_time)  # noqa: B010


#: The ``NodeSpec.prelude`` that installs it.
PRELUDE = "from tests.dishonest_node import install; install()"
