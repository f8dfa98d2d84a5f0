"""/v1/videos: submit, watch, fetch and cancel generation jobs. A key sees only its own jobs: another key's
job id answers 404, exactly like one that does not exist."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from .deps import JobsDep, KeyDep, SettingsDep
from .schemas import JobList, JobOut, Problem, VideoRequest, eta
from .store import TERMINAL, Job, LimitExceeded

router = APIRouter(prefix="/v1/videos", tags=["videos"])
JobId = Annotated[str, Path(pattern="^[0-9a-f]{32}$", description="The job id returned by POST /v1/videos.")]
ERRORS = {401: {"model": Problem}, 404: {"model": Problem}}


def _job_out(jobs, job: Job) -> JobOut:
    position = jobs.queue_position(job) if job.status == "queued" else 0
    return JobOut.from_job(job, eta(job, position, jobs.typical_generation_seconds()))


def _own_job(jobs, job_id: str, key) -> Job:
    job = jobs.get_job(job_id, key.id)
    if job is None:
        raise HTTPException(404, f"no video job {job_id}")
    return job


def _check_limits(body: VideoRequest, settings) -> None:
    problems = []
    if len(body.prompt) > settings.max_prompt_chars:
        problems.append(f"prompt: at most {settings.max_prompt_chars} characters on this server")
    if not body.prompt.strip():
        problems.append("prompt: must not be blank")
    if body.steps is not None and body.steps > settings.max_steps:
        problems.append(f"steps: at most {settings.max_steps} on this server")
    if body.frames is not None and body.frames > settings.max_frames:
        problems.append(f"frames: at most {settings.max_frames} on this server")
    if body.guidance is not None and body.guidance > settings.max_guidance:
        problems.append(f"guidance: at most {settings.max_guidance} on this server")
    if problems:
        raise HTTPException(422, "; ".join(problems))


@router.post("", status_code=202, response_model=JobOut,
             responses={**ERRORS, 422: {"model": Problem}, 429: {"model": Problem}})
def create_video(body: VideoRequest, key: KeyDep, jobs: JobsDep, settings: SettingsDep) -> JobOut:
    """Queue a video. Poll GET /v1/videos/{id}, or follow /v1/videos/{id}/events, until it is `succeeded`."""
    _check_limits(body, settings)
    request = body.model_dump(exclude_none=True)
    request.setdefault("seed", secrets.randbelow(2**32))  # recorded, so a retried job makes the same video
    try:
        job = jobs.create_job(key, request, total=body.steps or 0)
    except LimitExceeded as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(int(e.retry_after + 0.999))}) from None
    return _job_out(jobs, job)


@router.get("", response_model=JobList, responses=ERRORS)
def list_videos(key: KeyDep, jobs: JobsDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> JobList:
    """This key's jobs, newest first."""
    return JobList(jobs=[_job_out(jobs, j) for j in jobs.list_jobs(key.id, limit, offset)])


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_video(job_id: JobId, key: KeyDep, jobs: JobsDep) -> JobOut:
    return _job_out(jobs, _own_job(jobs, job_id, key))


@router.delete("/{job_id}", response_model=JobOut, responses={**ERRORS, 409: {"model": Problem}})
def cancel_video(job_id: JobId, key: KeyDep, jobs: JobsDep) -> JobOut:
    """Cancel a queued or running job (a running one stops at its next step)."""
    job = _own_job(jobs, job_id, key)
    if job.status in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id} already {job.status}")
    return _job_out(jobs, jobs.cancel_job(job_id, key.id))


@router.get("/{job_id}/content", response_class=FileResponse, responses={**ERRORS, 409: {"model": Problem}},
            response_description="The MP4 (H.264, signed C2PA manifest, invisible watermark).")
def get_video_content(job_id: JobId, key: KeyDep, jobs: JobsDep, settings: SettingsDep):
    job = _own_job(jobs, job_id, key)
    if job.status != "succeeded":
        raise HTTPException(409, f"job {job_id} is {job.status}, there is no video")
    path = FilePath(job.file).resolve()
    # the path comes from the database, never the request; check it anyway before serving a file
    if not path.is_relative_to(settings.files_dir.resolve()) or not path.is_file():
        raise HTTPException(404, f"the video of job {job_id} is gone")
    return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")


@router.get("/{job_id}/provenance", responses={**ERRORS, 409: {"model": Problem}})
def get_video_provenance(job_id: JobId, key: KeyDep, jobs: JobsDep) -> dict:
    """`vidiffuse verify` on the stored file: watermark (p-value, payload) and C2PA manifest state."""
    from ..provenance.verify import verify_file

    job = _own_job(jobs, job_id, key)
    if job.status != "succeeded":
        raise HTTPException(409, f"job {job_id} is {job.status}, there is no video")
    if "provenance" not in job.result:
        jobs.set_result(job_id, provenance=verify_file(job.file))
        job = _own_job(jobs, job_id, key)
    return job.result["provenance"]


@router.get("/{job_id}/events", responses=ERRORS, response_class=StreamingResponse,
            response_description="Server-sent events: one `job` event (the job JSON) per change, until it finishes.")
async def video_events(job_id: JobId, key: KeyDep, jobs: JobsDep, request: Request):
    _own_job(jobs, job_id, key)

    async def stream():
        last, idle = None, 0.0
        while not await request.is_disconnected():
            job = _own_job(jobs, job_id, key)
            state = (job.status, job.step, job.total)
            if state != last:
                last, idle = state, 0.0
                yield f"event: job\ndata: {json.dumps(_job_out(jobs, job).model_dump())}\n\n"
                if job.status in TERMINAL:
                    return
            elif idle >= 15.0:  # a comment line keeps proxies from closing a quiet stream
                idle = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.2)
            idle += 0.2

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
