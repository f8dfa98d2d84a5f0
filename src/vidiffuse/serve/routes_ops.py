"""Operations: /healthz (the process answers), /readyz (it can do work now) and Prometheus /metrics."""

from __future__ import annotations

import bisect
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .settings import ServeSettings

router = APIRouter(tags=["operations"])
logger = logging.getLogger("vidiffuse.serve.ops")
# generation takes ~1 s for the bundled model on a laptop CPU and minutes for big models on a GPU
GENERATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class JobsCollector:
    """Job numbers read from the store at scrape time: exact, shared by every API process, and they survive
    restarts (a counter kept in process memory would start over at every deploy)."""

    def __init__(self, jobs, settings: ServeSettings):
        self.jobs, self.settings = jobs, settings

    def collect(self):
        counts = self.jobs.counts()
        yield GaugeMetricFamily("vidiffuse_queue_depth", "Jobs waiting for a worker.", value=counts["queued"])
        by_state = GaugeMetricFamily("vidiffuse_jobs", "Jobs by status.", labels=["status"])
        for status, n in counts.items():
            by_state.add_metric([status], n)
        yield by_state
        yield CounterMetricFamily("vidiffuse_job_errors", "Jobs that failed.", value=counts["failed"])
        yield GaugeMetricFamily("vidiffuse_workers", "Workers seen within the readiness timeout.",
                                value=len(self.jobs.live_workers(self.settings.worker_timeout_seconds)))
        yield _histogram("vidiffuse_generation_seconds", "Seconds from a job's start to its signed MP4.",
                         self.jobs.generation_seconds())
        yield _histogram("vidiffuse_queue_wait_seconds", "Seconds a job waited before a worker took it.",
                         self.jobs.queue_wait_seconds())


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    values = sorted(values)
    buckets = [(floatToGoString(b), bisect.bisect_right(values, b)) for b in GENERATION_BUCKETS]
    return HistogramMetricFamily(name, documentation, buckets=buckets + [("+Inf", len(values))], sum_value=sum(values))


class ServiceMetrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self, jobs, settings: ServeSettings):
        self.registry = CollectorRegistry()
        self.requests = Counter("vidiffuse_http_requests", "HTTP requests.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("vidiffuse_http_request_seconds", "HTTP request latency.", ["route"],
                                 registry=self.registry)
        self.registry.register(JobsCollector(jobs, settings))
        if settings.queue == "sqlite" and settings.monitor:
            try:
                from ..monitor import MonitorCollector, MonitorStore

                self.registry.register(MonitorCollector(MonitorStore(settings.db_path)))
            except Exception:  # drift numbers are an extra; /metrics must work without them
                logger.exception("drift metrics unavailable")

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: no database or no live worker."}})
def readyz(request: Request):
    """Ready to take jobs: the job store answers and a worker with a loaded model was seen recently."""
    settings: ServeSettings = request.app.state.settings
    jobs = request.app.state.jobs
    try:
        jobs.ping()
        workers = jobs.live_workers(settings.worker_timeout_seconds)
    except Exception as e:
        return JSONResponse({"status": "unavailable", "reason": f"job store: {type(e).__name__}"}, status_code=503)
    if not workers:
        return JSONResponse({"status": "unavailable", "reason": "no live worker"}, status_code=503)
    return {"status": "ready", "workers": len(workers), "models": sorted({w["model"] or "?" for w in workers})}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
