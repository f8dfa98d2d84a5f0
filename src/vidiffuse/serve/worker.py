"""The worker: claims jobs, generates, writes the signed MP4, records the outcome exactly once.

`run_job` is shared by both queues: the embedded SQLite loop (`run_worker`) and the Dramatiq actor on Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from ..errors import VidiffuseError
from .settings import ServeSettings
from .store import Job, Store

logger = logging.getLogger("vidiffuse.serve.worker")
HEARTBEAT_SECONDS = 0.25  # how often progress and the lease reach the database; per-step writes would cost ~3%


class StopJob(Exception):
    """The job must stop mid-generation: the client cancelled, or this worker lost its lease."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ModelProvider:
    """The pipeline jobs run on. It follows the registry alias (e.g. `production`) and switches models only
    between jobs, so a promotion or rollback never disturbs a generation in progress."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._loaded: tuple[Path, object] | None = None
        self.label = settings.model

    def resolve(self) -> tuple[str, Path]:
        from ..pipeline import resolve_model_path
        from ..registry import ModelRegistry

        version = ModelRegistry(self.settings.home / "registry").resolve(self.settings.model, self.settings.model_alias)
        if version is not None:
            return f"{version.name}@{version.version}", Path(version.path)
        return self.settings.model, resolve_model_path(self.settings.model)

    def get(self):
        from ..pipeline import VideoPipeline

        label, path = self.resolve()
        if self._loaded is None or self._loaded[0] != path:
            pipe = VideoPipeline.from_pretrained(path)
            if self._loaded is not None:
                logger.info("switching model", extra={"event": "model_switch", "from": self.label, "to": label})
            self._loaded, self.label = (path, pipe), label
        return self._loaded[1]


def job_output_path(settings: ServeSettings, job: Job) -> Path:
    return settings.files_dir / job.key_id / f"{job.id}.mp4"


def run_job(store: Store, settings: ServeSettings, provider: ModelProvider, job: Job, worker_id: str) -> str:
    """Generate one claimed job. Returns its final status, or 'lost' when another worker owns it now."""
    from ..generation import generate_file

    request = job.request
    last_beat = 0.0

    def on_step(step: int, total: int) -> None:
        nonlocal last_beat
        now = time.monotonic()
        if now - last_beat < HEARTBEAT_SECONDS and step < total:
            return
        last_beat = now
        state = store.heartbeat(job.id, worker_id, step, total, settings.lease_seconds)
        if state != "ok":
            raise StopJob(state)

    started = time.perf_counter()
    try:
        pipe = provider.get()
        out = job_output_path(settings, job)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = generate_file(pipe, request["prompt"], out, cache_threshold=request.get("cache_threshold"),
                               seed=request["seed"], steps=request.get("steps"), guidance=request.get("guidance"),
                               sampler=request.get("sampler"), frames=request.get("frames"), progress=False,
                               callback=on_step)
        seconds = time.perf_counter() - started
        result = {"model": provider.label, "model_version": pipe.version,
                  "settings": {k: record[k] for k in ("seed", "steps", "guidance", "sampler", "frames") if k in record},
                  "watermark": record.get("watermark")}
        status = "succeeded" if store.finish(job.id, worker_id, "succeeded", file=str(out), result=result,
                                             generation_seconds=seconds) else "lost"
        if status == "succeeded" and settings.monitor and sampled(job.id, settings.monitor_sample_rate):
            observe(store, pipe, request["prompt"], out, job.id)  # after `finish`: the client is not kept waiting
    except StopJob as stop:
        if stop.reason == "cancel":
            status = "cancelled" if store.finish(job.id, worker_id, "cancelled") else "lost"
        else:
            status = "lost"
    except VidiffuseError as e:  # a setting this model cannot do: the client's error, told in one line
        status = "failed" if store.finish(job.id, worker_id, "failed", error=str(e)) else "lost"
    except Exception as e:  # a bug or a broken model: logged in full here, one line for the client
        logger.exception("job %s failed", job.id)
        status = "failed" if store.finish(job.id, worker_id, "failed", error=f"internal error: {type(e).__name__}") else "lost"
    logger.info("job finished", extra={"event": "job_finished", "job_id": job.id, "status": status,
                                       "seconds": round(time.perf_counter() - started, 3), "attempt": job.attempts})
    return status


def observe(store: Store, pipe, prompt: str, file: Path, job_id: str) -> None:
    """Drift statistics of what was asked and what came out; a failure here never fails the job."""
    try:
        from ..monitor import MonitorStore, observe_generation
        from ..video.io import frames_to_uint8, read_video

        # what the client received (after H.264), not the frames before encoding
        frames = frames_to_uint8(read_video(file)[0])
        observe_generation(MonitorStore(store.path), pipe, prompt, frames, job_id=job_id)
    except Exception:
        logger.exception("could not record drift statistics for job %s", job_id)


def sampled(job_id: str, rate: float) -> bool:
    """A fixed share of jobs, chosen by id: the same job is in or out on every worker and every retry."""
    return int(job_id[:8], 16) / 0xFFFFFFFF < rate


def maybe_run_canary(store: Store, settings: ServeSettings, provider: ModelProvider) -> None:
    """Between jobs, when the last canary is older than the interval: regenerate the golden set and compare."""
    if not (settings.monitor and settings.canary_interval_seconds > 0):
        return
    try:
        from ..monitor import MonitorStore, canary_due, run_canary

        monitor = MonitorStore(store.path)
        if canary_due(monitor, settings.canary_interval_seconds):
            result = run_canary(provider.get(), monitor)
            log = logger.info if result.get("passed") else logger.warning
            log("canary finished", extra={"event": "canary", "passed": result.get("passed"),
                                          "status": result.get("status"), "worst_psnr_db": result.get("worst_psnr_db")})
    except Exception:
        logger.exception("the canary could not run")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask the worker to stop after its current job (signals reach only the main thread)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())


def run_worker(settings: ServeSettings | None = None, stop: threading.Event | None = None,
               max_jobs: int | None = None, worker_id: str | None = None) -> int:
    """Claim and run jobs until stopped (SIGTERM/SIGINT finish the current job first). Returns jobs run."""
    settings = settings or ServeSettings()
    stop = stop or threading.Event()
    worker_id = worker_id or new_worker_id()
    stop_on_signals(stop)
    store = Store(settings.db_path)
    provider = ModelProvider(settings)
    provider.get()  # load before announcing ourselves: /readyz means a worker can generate now
    logger.info("worker ready", extra={"event": "worker_ready", "worker": worker_id, "model": provider.label})
    done, last_seen = 0, 0.0
    canary_after = time.monotonic() + settings.canary_interval_seconds
    while not stop.is_set() and (max_jobs is None or done < max_jobs):
        if time.monotonic() - last_seen > 2.0:
            store.worker_seen(worker_id, provider.label)
            last_seen = time.monotonic()
        job = store.claim(worker_id, settings.lease_seconds)
        if job is None:
            if time.monotonic() >= canary_after:  # never right at start: queued jobs come first
                maybe_run_canary(store, settings, provider)
                canary_after = time.monotonic() + settings.canary_interval_seconds
            stop.wait(settings.poll_seconds)
            continue
        run_job(store, settings, provider, job, worker_id)
        done += 1
    return done
