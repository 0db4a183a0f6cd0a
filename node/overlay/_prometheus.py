"""Prometheus metrics of one node at ``GET /metrics``, with the ``prometheus-client`` library.

Each application owns its own ``CollectorRegistry`` (no process-global state: two nodes in one process, as in the
tests, never mix their numbers). Packet counters are read from the node's :class:`OverlayMetrics` at scrape time, so
there is one source of truth; a model node adds request latency and TTFT histograms, token counters and the engine's
queue gauges. Labels are reject reasons, roles and finish reasons only: never prompt data, keys or peers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.inference import EngineStats
from node.overlay._metrics import OverlayMetrics

#: Where a node serves its metrics (the Prometheus convention).
METRICS_PATH = "/metrics"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _OverlayCollector(Collector):
    def __init__(self, metrics: OverlayMetrics, role: str) -> None:
        self._metrics = metrics
        self._role = role

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        for name, value, doc in (
            ("planetserve_packets_received", m.requests, "Onion packets received."),
            ("planetserve_packets_forwarded", m.forwarded, "Packets forwarded to a next hop."),
            ("planetserve_cloves_delivered", m.delivered, "Cloves delivered at this destination."),
            ("planetserve_reply_streams_completed", m.streams_completed, "Reply streams read to their end."),
            ("planetserve_reply_streams_aborted", m.streams_aborted, "Reply streams cut short."),
            ("planetserve_messages_served", m.messages_served, "Requests rebuilt and served."),
        ):
            family = CounterMetricFamily(name, doc, labels=["role"])
            family.add_metric([self._role], value)
            yield family
        rejects = CounterMetricFamily("planetserve_packets_rejected", "Rejected packets by reason.", labels=["reason"])
        for reason, count in m.rejected.items():
            rejects.add_metric([reason.value], count)
        yield rejects


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, value, doc in (
            ("planetserve_engine_queued_requests", s.queued_requests, "Requests waiting for admission."),
            ("planetserve_engine_running_requests", s.running_requests, "Requests being generated."),
            ("planetserve_engine_queued_tokens", s.queued_tokens, "Tokens of work waiting."),
            ("planetserve_engine_cache_bytes", s.cache_bytes, "Bytes held by the prefix cache."),
            ("planetserve_engine_tokens_per_second", s.tokens_per_second, "Generated tokens per second, recent."),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, value, doc in (
            ("planetserve_engine_prefill_tokens_computed", s.prefill_tokens_computed, "Prompt tokens prefilled."),
            ("planetserve_engine_prefill_tokens_cached", s.prefill_tokens_cached, "Prompt tokens from the cache."),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class NodeMetrics:
    """One node's Prometheus registry; also a request observer for model nodes (``completion_handler``)."""

    def __init__(self, overlay: OverlayMetrics, *, role: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_OverlayCollector(overlay, role))
        self._latency = Histogram(
            "planetserve_request_seconds",
            "Model node: request duration, first byte in to last chunk out.",
            ["finish_reason"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "planetserve_ttft_seconds",
            "Model node: time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tokens = Counter("planetserve_tokens", "Model node: tokens processed.", ["kind"], registry=self.registry)

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Model nodes: expose the engine's queue and cache gauges (read at scrape time)."""
        self.registry.register(_EngineCollector(stats))

    # RequestObserver
    def started(self, prompt: str) -> None:
        return None

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def finished(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish_reason: str, seconds: float
    ) -> None:
        # finish_reason is one of a small fixed set (stop, length, abort, or an engine error code): bounded labels.
        self._latency.labels(finish_reason=finish_reason[:32]).observe(seconds)
        self._tokens.labels(kind="prompt").inc(prompt_tokens)
        self._tokens.labels(kind="cached").inc(cached_tokens)
        self._tokens.labels(kind="completion").inc(completion_tokens)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def metrics_route(metrics: NodeMetrics) -> web.RouteDef:
    """``GET /metrics`` serving ``metrics``."""

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    return web.get(METRICS_PATH, handle)
