"""Prometheus metrics of one node (its own registry, so several nodes in one process don't mix)."""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters and histograms named ``radflash_serve_*``; :meth:`render` is ``GET /metrics``."""

    def __init__(self) -> None:
        from radflash.util.optional import require

        require("prometheus_client", extra="serve", purpose="radflash serve's /metrics")
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("radflash_serve_requests", "Instances offered to the node, by intake and outcome",
                                ["intake", "status"], registry=r)
        self.queue_depth = Gauge("radflash_serve_queue_depth", "Instances accepted and not yet scored", registry=r)
        self.in_batch = Gauge("radflash_serve_in_batch", "Instances in the batch being computed", registry=r)
        self.queue_time = Histogram("radflash_serve_queue_seconds", "From release to the queue to the start of "
                                    "its batch", buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("radflash_serve_compute_seconds", "Decode + inference time of one batch",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("radflash_serve_end_to_end_seconds", "From receipt of an instance to its results held "
                             "by every forward target", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("radflash_serve_batch_size", "Instances per batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.results = Counter("radflash_serve_results", "Instances leaving the model, by outcome", ["status"],
                               registry=r)
        self.forwarded = Counter("radflash_serve_forwarded", "Results delivered", ["target"], registry=r)
        self.forward_retries = Counter("radflash_serve_forward_retries", "Failed deliveries that will be retried",
                                       ["target"], registry=r)
        self.dead_letters = Counter("radflash_serve_dead_letters", "Deliveries given up (dead-letter table)",
                                    ["target"], registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, **labels: Any) -> float:
        """One sample's current value (tests, ``bench serve``)."""
        value = self.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value
