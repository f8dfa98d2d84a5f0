"""Service settings, read from VIDIFFUSE_* environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..files import vidiffuse_home


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDIFFUSE_", extra="ignore")

    home: Path = Field(default_factory=vidiffuse_home)
    # a registered model name (the worker follows `model_alias` in the registry), a bundled name or a directory
    model: str = "shapes"
    model_alias: str = "production"
    queue: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # request limits: what one job may ask for
    max_prompt_chars: int = 500
    max_steps: int = 100
    max_frames: int = 64
    max_guidance: float = 20.0
    # per-key defaults for new keys
    rate_per_minute: int = 60
    quota_per_day: int = 2000

    lease_seconds: float = 30.0  # a worker that stops renewing (killed) loses its job after this long
    poll_seconds: float = 0.05
    worker_timeout_seconds: float = 60.0  # /readyz needs a worker seen this recently
    monitor: bool = True  # drift statistics of prompts and outputs, and the canary
    # ~50 ms of statistics per observed video (5% of a 1 s generation): a quarter of the jobs is plenty for
    # drift tests and keeps the cost near 1%
    monitor_sample_rate: float = Field(0.25, ge=0.0, le=1.0)
    canary_interval_seconds: float = 3600.0  # regenerate the golden set when idle this often; 0: never

    @cached_property
    def state_dir(self) -> Path:
        return self.home / "serve"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "service.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.state_dir / "files"
