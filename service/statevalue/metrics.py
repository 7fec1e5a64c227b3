"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from statevalue.numca_store import StoreStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)
# Actual over predicted queue wait: 1 is a perfect prediction.
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


class Metrics:
    """The ``statevalue_*`` metrics. One instance per server so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux).
        ProcessCollector(registry=r)
        self.requests = Counter(
            "statevalue_requests",
            "Requests by front end, RPC and status.",
            ["frontend", "rpc", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "statevalue_request_seconds",
            "End-to-end request latency.",
            ["frontend", "rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.method_requests = Counter(
            "statevalue_method_requests",
            "Estimate requests per estimator method.",
            ["method"],
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "statevalue_queue_wait_seconds",
            "Time from admission to the request's first forward batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_predicted_seconds = Histogram(
            "statevalue_queue_wait_predicted_seconds",
            "Queue wait that admission predicted, for requests queued behind others "
            "(predictions under 0.1 s are left out).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_ratio = Histogram(
            "statevalue_queue_wait_ratio",
            "Actual over predicted queue wait of the same requests (1 = exact).",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "statevalue_forward_seconds",
            "Forward pass time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.estimator_seconds = Histogram(
            "statevalue_estimator_seconds",
            "Estimator + advantage time per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "statevalue_batch_requests",
            "Requests merged into one forward batch.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "statevalue_batch_sequences",
            "Sequences per forward batch.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "statevalue_batch_tokens",
            "Tokens per forward batch.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "statevalue_queue_depth",
            "Requests waiting for the model.",
            registry=r,
        )
        self.queue_tokens = Gauge(
            "statevalue_queue_tokens",
            "Tokens waiting for the model.",
            registry=r,
        )
        self.throughput = Gauge(
            "statevalue_throughput_tokens_per_second",
            "Measured model throughput that admission uses to estimate queue waits.",
            registry=r,
        )
        self.micro_batch_tokens = Gauge(
            "statevalue_micro_batch_tokens",
            "Tokens a forward micro-batch takes now: about micro_batch_seconds of model work.",
            registry=r,
        )
        self.tokens = Counter(
            "statevalue_tokens",
            "Tokens run through the model.",
            registry=r,
        )
        self.weight_update_bytes = Counter(
            "statevalue_weight_update_bytes",
            "Bytes of weights received from the trainer's memory (UpdateWeights), by "
            "transport (distributed, shared_memory).",
            ["transport"],
            registry=r,
        )
        self.weight_swap_seconds = Histogram(
            "statevalue_weight_swap_seconds",
            "Time the model spent swapping in new weights (no forward step runs meanwhile).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "statevalue_model_info",
            "The served model (value is always 1).",
            ["name", "version"],
            registry=r,
        )

    def watch_numca_store(self, stats: Callable[[], StoreStats]) -> None:
        """Report the Numca store's size and counters, read at each scrape."""
        self.registry.register(_NumcaStoreCollector(stats))

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NumcaStoreCollector(Collector):
    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats.tables is not None:
            yield GaugeMetricFamily(
                "statevalue_numca_tables", "Prompt tables the Numca store holds.", stats.tables
            )
        if stats.bytes is not None:
            yield GaugeMetricFamily(
                "statevalue_numca_store_bytes",
                "Approximate memory of the Numca store (Redis store: the Redis server's "
                "used_memory).",
                stats.bytes,
            )
        groups = CounterMetricFamily(
            "statevalue_numca_groups",
            "Groups this replica sent to the Numca store: counted, or repeated (a key "
            "already counted, e.g. a retry) and so not counted again.",
            labels=["outcome"],
        )
        groups.add_metric(["counted"], stats.counted)
        groups.add_metric(["repeated"], stats.repeated)
        yield groups
