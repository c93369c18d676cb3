"""Prometheus metrics, one registry per app (so several apps in one process never collide).

With several worker processes (``aigc serve --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR``) prometheus_client keeps
each worker's values in files there and ``/metrics``, whichever worker answers, sums them over the workers (gauges:
over the live ones).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry_models, multiprocess_dir: str = ""):
        r = self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self.requests = Counter("aigc_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("aigc_request_seconds", "Request latency (to the last byte)", ["route"], buckets=BUCKETS, registry=r)
        self.tokens = Counter("aigc_tokens", "Tokens processed", ["model", "direction"], registry=r)
        self.images = Counter("aigc_images", "Images generated", ["model"], registry=r)
        self.revenue = Counter("aigc_revenue_usd", "Charged to tenants", ["model"], registry=r)
        self.cost = Counter("aigc_compute_cost_usd", "Compute cost of requests", ["model"], registry=r)
        self.refused = Counter("aigc_refused", "Requests refused before running", ["reason"], registry=r)
        queue = Gauge("aigc_queue_depth", "Sequences waiting for a batch slot", ["model"], registry=r, multiprocess_mode="livesum")
        active = Gauge("aigc_active_sequences", "Sequences being decoded", ["model"], registry=r, multiprocess_mode="livesum")
        loaded = Gauge("aigc_models_loaded", "Models resident in memory", registry=r, multiprocess_mode="livesum")
        self._gauges = (queue, active, loaded)
        self._models = registry_models

    def refresh(self) -> None:
        queue, active, loaded = self._gauges
        reg = self._models
        with reg.lock:
            handles = dict(reg.loaded)
        loaded.set(len(handles))
        for name, h in handles.items():
            if hasattr(h, "queue_depth"):
                queue.labels(name).set(h.queue_depth())
                active.labels(name).set(h.active())

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every worker's values summed (multiprocess mode)."""
        self.refresh()
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay counted)."""
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.multiprocess_dir)
