"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qbert_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("qbert_request_latency_seconds", "Request latency, body read to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("qbert_batch_size", "Rows (sequences) per model run",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("qbert_batch_requests", "Requests merged into one model run",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        self.inference = Histogram("qbert_inference_seconds", "Model run time per batch",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("qbert_queue_depth", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.rejected = Counter("qbert_rejected_queue_full", "Requests refused with 503 because the queue was full",
                                registry=self.registry)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
