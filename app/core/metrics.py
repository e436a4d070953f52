"""Prometheus metrics of the API process: what it measures itself (inference requests, tokens, latency,
time to first token) and what it reads from the database and the broker at each scrape (experiments by
status, running jobs per training queue, live workers per kind, queue depths).

The scrape-time numbers come from a collector, so they are exact at each scrape and cost nothing between
scrapes. prometheus-client writes the exposition format; nothing here formats text by hand. Labels carry
deployment ids and queue names, never team names; /metrics itself is for platform admins or the
configured `api.metrics_token` (app/api/routes/metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

INFERENCE_REQUESTS = Counter(
    "studio_inference_requests",
    "Generation requests answered, by deployment and outcome (ok or the error code)",
    ["deployment", "outcome"],
    registry=REGISTRY,
)
INFERENCE_TOKENS = Counter(
    "studio_inference_tokens",
    "Tokens of answered generations, by deployment and kind (prompt or completion)",
    ["deployment", "kind"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "studio_inference_request_seconds",
    "Time from a generation request to its whole answer",
    ["deployment"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
FIRST_TOKEN_SECONDS = Histogram(
    "studio_inference_time_to_first_token_seconds",
    "Time from a generation request to its first reply from the worker (first text, or the whole answer)",
    ["deployment"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


class FleetCollector(Collector):
    """Reads the fleet's state at scrape time through `read`, which returns {metric name: [(labels, value)]}."""

    def __init__(self, read: Callable[[], dict[str, list[tuple[dict[str, str], float]]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._read()
        for name, (help_text, label_names) in FLEET_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=label_names)
            for labels, value in values.get(name, []):
                family.add_metric([labels[k] for k in label_names], value)
            yield family

    def describe(self) -> Iterator[Any]:
        return iter(())  # no fixed description: the values are read at scrape time


FLEET_GAUGES: dict[str, tuple[str, list[str]]] = {
    "studio_experiments": ("Experiments by status", ["status"]),
    "studio_running_jobs": ("Running training jobs by training queue (GPU class)", ["queue"]),
    "studio_live_workers": ("Workers heartbeating now, by kind (training, inference)", ["kind"]),
    "studio_queue_depth": ("Messages waiting in each broker queue (Redis brokers)", ["queue"]),
    "studio_model_placements": ("Base models placed on inference workers, by state", ["state"]),
}
