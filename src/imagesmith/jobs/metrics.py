"""Prometheus metrics, in a registry of their own per app (so tests can run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagesmith.jobs.store import JobStatus

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

    def collect(self) -> Iterator[GaugeMetricFamily]:
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


class Metrics:
    def __init__(self, counts: Callable[[], dict[JobStatus, int]]) -> None:
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
        self.registry.register(_LiveCollector(counts))
