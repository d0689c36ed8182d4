"""Prometheus metrics of `dgkit serve`, at GET /metrics (prometheus_client, the `serve` extra).

Each app has its own registry, so that several apps in one process count apart. Errors are the
requests whose `status` label is 400 or more.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

# Seconds: a cached small request takes ~1 ms; a request waiting for room can take the timeout.
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dgkit_requests", "HTTP requests answered, by endpoint (route) "
                                "and status; 'disconnected' when the client left first",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("dgkit_request_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("dgkit_queue_seconds", "Time a request's images waited for "
                               "their model call", buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("dgkit_preprocess_seconds", "Time to check, decode and "
                                    "preprocess one request's encoded images",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("dgkit_inference_seconds", "Time of one model call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("dgkit_batch_size", "Images per model call",
                                    buckets=BATCH_BUCKETS, registry=r)

    def observe_request(self, endpoint: str, status: str, seconds: float) -> None:
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, images: int, seconds: float, waits: list[float]) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)
        for wait in waits:
            self.queue.observe(wait)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its media type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
