"""The FastAPI application: `create_app(settings)` wires settings, state and routers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from ..errors import VidiffuseError
from . import routes_ops, routes_videos
from .settings import ServeSettings
from .store import Store

STATIC_DIR = Path(__file__).parent / "static"
logger = logging.getLogger("vidiffuse.serve.http")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log pipelines (Loki, ELK, CloudWatch) ingest without parsing rules."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("vidiffuse.serve", "vidiffuse.monitor"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False


def open_job_store(settings: ServeSettings, keys: Store):
    """Jobs live beside the keys in SQLite, or in Redis (with Dramatiq workers) to grow past one machine."""
    if settings.queue == "redis":
        from .redis_queue import RedisJobStore

        return RedisJobStore(settings)
    return keys


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    # FastAPIOffline serves the Swagger UI assets itself: FastAPI's /docs loads them from a CDN, blank offline
    app = FastAPIOffline(title="vidiffuse", version="1", summary="Text-to-video generation as a service: jobs, progress, "
                  "signed and watermarked MP4s.", docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.keys = Store(settings.db_path)
    app.state.jobs = open_job_store(settings, app.state.keys)
    app.state.metrics = routes_ops.ServiceMetrics(app.state.jobs, settings)

    @app.middleware("http")
    async def observe_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        seconds = time.perf_counter() - started
        app.state.metrics.observe_request(request.method, path, response.status_code, seconds)
        logger.info("request", extra={"event": "http_request", "method": request.method, "path": path,
                                      "status": response.status_code, "ms": round(seconds * 1000, 2)})
        return response

    @app.exception_handler(VidiffuseError)
    async def user_error(request: Request, exc: VidiffuseError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # one readable line per problem instead of pydantic's nested structure
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"][1:]) or "body", e["msg"]) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    app.include_router(routes_videos.router)
    app.include_router(routes_ops.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index():
            return FileResponse(STATIC_DIR / "index.html")

    return app
