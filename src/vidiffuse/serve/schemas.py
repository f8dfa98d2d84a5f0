"""What the HTTP API accepts and returns."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..diffusion.sampling import SAMPLERS
from ..pipeline import LIMITS
from .store import Job

Sampler = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


class VideoRequest(BaseModel):
    """Settings left out take the model's defaults. Hard bounds here; the server's own (tighter) limits are
    checked on top, see `ServeSettings`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=LIMITS["prompt_chars"], examples=["a small red circle moving left on a black background"])
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random if not given; the job records the one used.")
    steps: int | None = Field(None, ge=LIMITS["steps"][0], le=LIMITS["steps"][1])
    guidance: float | None = Field(None, ge=LIMITS["guidance"][0], le=LIMITS["guidance"][1])
    sampler: Sampler | None = None
    frames: int | None = Field(None, ge=LIMITS["frames"][0], le=LIMITS["frames"][1])
    cache_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Step caching (First Block Cache); off if not given.")


class Progress(BaseModel):
    step: int
    total: int
    fraction: float


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: float
    started: float | None
    finished: float | None
    progress: Progress
    eta_seconds: float | None = Field(description="Estimated seconds until the video is ready; null once finished.")
    request: dict
    error: str | None
    model: str | None
    model_version: str | None
    content_url: str | None

    @classmethod
    def from_job(cls, job: Job, eta_seconds: float | None = None) -> "JobOut":
        total = max(job.total, 1)
        return cls(id=job.id, status=job.status, created=job.created, started=job.started, finished=job.finished,
                   progress=Progress(step=job.step, total=job.total, fraction=round(min(job.step / total, 1.0), 4)),
                   eta_seconds=eta_seconds, request=job.request, error=job.error, model=job.result.get("model"),
                   model_version=job.result.get("model_version"),
                   content_url=f"/v1/videos/{job.id}/content" if job.status == "succeeded" else None)


class JobList(BaseModel):
    jobs: list[JobOut]


class Problem(BaseModel):
    detail: str


def eta(job: Job, queue_position: int, typical_seconds: float | None) -> float | None:
    """Running: time per step so far times the steps left. Queued: jobs ahead times a typical job."""
    if job.status == "running" and job.step > 0 and job.started:
        return round((time.time() - job.started) / job.step * (job.total - job.step), 2)
    if typical_seconds is None:
        return None
    if job.status == "running":
        return round(typical_seconds, 2)
    if job.status == "queued":
        return round((queue_position + 1) * typical_seconds, 2)
    return None
