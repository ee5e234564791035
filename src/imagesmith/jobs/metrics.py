"""Prometheus metrics, in a registry of their own per app (so tests can run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imagesmith.jobs.store import JobStatus
from imagesmith.sources.base import SourceState, SourceStatus
from imagesmith.uncompiled_calls import uncompiled_calls

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


def gpu_memory() -> dict[str, float]:
    """Allocated and reserved CUDA memory in bytes; empty where there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "allocated": float(torch.cuda.memory_allocated()),
        "reserved": float(torch.cuda.memory_reserved()),
    }


class _LiveCollector(Collector):
    """Values read at scrape time: the store is the truth for queue depth and job counts."""

    def __init__(self, counts: Callable[[], dict[JobStatus, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counts = self._counts()
        depth = GaugeMetricFamily("imagesmith_queue_depth", "Jobs waiting in the queue (not yet running).")
        depth.add_metric([], counts[JobStatus.QUEUED])
        yield depth
        jobs = GaugeMetricFamily("imagesmith_jobs", "Jobs in the store by status.", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status.value], count)
        yield jobs
        memory = GaugeMetricFamily(
            "imagesmith_gpu_memory_bytes", "CUDA memory held by torch.", labels=["kind"]
        )
        for kind, value in gpu_memory().items():
            memory.add_metric([kind], value)
        yield memory
        uncompiled = CounterMetricFamily(
            "imagesmith_uncompiled_calls",
            "Calls of compiled modules that ran uncompiled after the warm-up (a shape it did not compile), by "
            "kind: one_image, batched (UNet passes), decode.",
            labels=["kind"],
        )
        for kind, calls in sorted(uncompiled_calls().items()):
            uncompiled.add_metric([kind], calls)
        yield uncompiled


class _StockCollector(Collector):
    """The stock source's quota and counters, read from its status at scrape time (none when not configured)."""

    def __init__(self, status: Callable[[], SourceStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._status()
        if status.state is SourceState.NOT_CONFIGURED:
            return
        info = status.info
        quota = info.get("quota") or {}
        for key, text in (("remaining", "left in the current window"), ("limit", "per window")):
            gauge = GaugeMetricFamily(f"imagesmith_pexels_quota_{key}", f"Pexels API requests {text}.")
            if quota.get(key) is not None:
                gauge.add_metric([], quota[key])
            yield gauge
        blocked = GaugeMetricFamily(
            "imagesmith_pexels_blocked", "1 while calls to Pexels are held back (quota)."
        )
        blocked.add_metric([], 1.0 if info.get("blocked") else 0.0)
        yield blocked
        searches = CounterMetricFamily(
            "imagesmith_pexels_searches", "Pexels searches by where they were answered.", labels=["origin"]
        )
        searches.add_metric(["api"], info.get("api_searches", 0))
        searches.add_metric(["cache"], info.get("cache_hits", 0))
        yield searches
        served = CounterMetricFamily("imagesmith_pexels_photos_served", "Pexels photos served.")
        served.add_metric([], info.get("photos_served", 0))
        yield served
        errors = CounterMetricFamily(
            "imagesmith_pexels_errors", "Stock fetches that failed, by reason.", labels=["reason"]
        )
        for reason, count in sorted((info.get("errors") or {}).items()):
            errors.add_metric([reason], count)
        yield errors


class Metrics:
    def __init__(
        self,
        counts: Callable[[], dict[JobStatus, int]],
        stock_status: Callable[[], SourceStatus] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "imagesmith_stage_seconds",
            "Seconds per generation stage (base, refine, decode, ...).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "imagesmith_jobs_finished",
            "Jobs finished since start, by outcome.",
            ["status"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "imagesmith_job_seconds",
            "Seconds from start to finish of a job run.",
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.source_attempts = Counter(
            "imagesmith_source_attempts",
            "Sources tried for jobs, by source and outcome ('served', or why it passed: no_results, ...).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "imagesmith_batch_images",
            "Images per pipeline pass when compatible jobs run together (batches of 2 or more jobs).",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(counts))
        if stock_status is not None:
            self.registry.register(_StockCollector(stock_status))
