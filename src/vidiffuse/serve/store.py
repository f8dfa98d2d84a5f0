"""Durable state of the service: API keys and jobs in one SQLite database (WAL).

A job is claimed under a lease that the worker renews at every sampling step. A worker killed mid-job stops
renewing, its lease runs out and the next claim takes the job again; `finish` only succeeds for the lease
holder, so a job is completed exactly once however many times it was started. Generation is seeded, so a
restarted job writes the same video.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VidiffuseError

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
KEY_PREFIX = "vdf_"
JOB_ID_LENGTH = 32  # uuid4 hex

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL,
    rate_per_minute INTEGER NOT NULL,
    quota_per_day INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    generation_seconds REAL,
    file TEXT,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, created);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs(key_id, created);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    model TEXT
);
"""


class ApiKeyError(VidiffuseError):
    """An API-key operation that cannot be done (duplicate name, unknown key)."""


class LimitExceeded(VidiffuseError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1.0, retry_after)


@dataclass
class ApiKey:
    id: str
    name: str
    created: float
    revoked: float | None
    rate_per_minute: int
    quota_per_day: int


@dataclass
class Job:
    id: str
    key_id: str
    status: str
    request: dict
    created: float
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total: int = 0
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    generation_seconds: float | None = None
    file: str | None = None
    result: dict = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["request"] = json.loads(d["request"])
        d["result"] = json.loads(d["result"]) if d["result"] else {}
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


def hash_key(key: str) -> str:
    # keys are 256-bit random tokens, not passwords: a fast hash is enough (no dictionary to attack)
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    """Keys and jobs. One connection per thread; every write is a short IMMEDIATE transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            self._conn().executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise VidiffuseError(f"cannot open the service database {self.path}: {e}") from None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def ping(self) -> None:
        self._read("SELECT 1")

    # -- API keys ---------------------------------------------------------------------------------------
    def create_key(self, name: str, rate_per_minute: int = 30, quota_per_day: int = 1000) -> tuple[ApiKey, str]:
        """A new key; the secret is returned here only, the database keeps its hash."""
        if not name or len(name) > 64:
            raise ApiKeyError("a key name must be 1 to 64 characters")
        if rate_per_minute < 1 or quota_per_day < 1:
            raise ApiKeyError("rate and quota must be at least 1")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(uuid.uuid4().hex[:12], name, time.time(), None, rate_per_minute, quota_per_day)
        try:
            with self._tx() as db:
                db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?)",
                           (key.id, name, hash_key(secret), key.created, None, rate_per_minute, quota_per_day))
        except sqlite3.IntegrityError:
            raise ApiKeyError(f"a key named {name!r} already exists") from None
        return key, secret

    def revoke_key(self, name: str) -> ApiKey:
        with self._tx() as db:
            n = db.execute("UPDATE api_keys SET revoked=? WHERE name=? AND revoked IS NULL", (time.time(), name)).rowcount
        if not n:
            raise ApiKeyError(f"no active key named {name!r}")
        return self.key_by_name(name)

    def key_by_name(self, name: str) -> ApiKey:
        rows = self._read("SELECT id,name,created,revoked,rate_per_minute,quota_per_day FROM api_keys WHERE name=?", (name,))
        if not rows:
            raise ApiKeyError(f"no key named {name!r}")
        return ApiKey(**dict(rows[0]))

    def keys(self) -> list[ApiKey]:
        return [ApiKey(**dict(r)) for r in
                self._read("SELECT id,name,created,revoked,rate_per_minute,quota_per_day FROM api_keys ORDER BY created")]

    def authenticate(self, secret: str) -> ApiKey | None:
        rows = self._read("SELECT id,name,created,revoked,rate_per_minute,quota_per_day FROM api_keys "
                          "WHERE key_sha256=? AND revoked IS NULL", (hash_key(secret),))
        return ApiKey(**dict(rows[0])) if rows else None

    # -- jobs: the API side -------------------------------------------------------------------------------
    def create_job(self, key: ApiKey, request: dict, total: int) -> Job:
        """Queue a job unless the key is over its rate (per minute) or quota (per day): checked and inserted in
        one transaction, so concurrent requests cannot overshoot."""
        job = Job(uuid.uuid4().hex, key.id, "queued", request, time.time(), total=total)
        with self._tx() as db:
            for window, limit, what in ((60.0, key.rate_per_minute, "rate limit"), (86400.0, key.quota_per_day, "daily quota")):
                count, oldest = db.execute("SELECT COUNT(*), MIN(created) FROM jobs WHERE key_id=? AND created>=?",
                                           (key.id, job.created - window)).fetchone()
                if count >= limit:
                    raise LimitExceeded(f"{what} of {limit} jobs reached", retry_after=oldest + window - job.created)
            db.execute("INSERT INTO jobs (id,key_id,status,request,created,total) VALUES (?,?,?,?,?,?)",
                       (job.id, key.id, job.status, json.dumps(request), job.created, total))
        return job

    def queue_position(self, job: Job) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status='queued' AND created<?", (job.created,))[0][0]

    def get_job(self, job_id: str, key_id: str | None = None) -> Job | None:
        sql, args = "SELECT * FROM jobs WHERE id=?", (job_id,)
        if key_id is not None:
            sql, args = sql + " AND key_id=?", (job_id, key_id)
        rows = self._read(sql, args)
        return Job.from_row(rows[0]) if rows else None

    def list_jobs(self, key_id: str, limit: int = 50, offset: int = 0) -> list[Job]:
        rows = self._read("SELECT * FROM jobs WHERE key_id=? ORDER BY created DESC LIMIT ? OFFSET ?", (key_id, limit, offset))
        return [Job.from_row(r) for r in rows]

    def cancel_job(self, job_id: str, key_id: str) -> Job | None:
        """Queued: cancelled at once. Running: flagged; the worker stops at its next step."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND key_id=? AND status='queued'",
                       (now, job_id, key_id))
            db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=? AND key_id=? AND status='running'", (job_id, key_id))
        return self.get_job(job_id, key_id)

    def set_result(self, job_id: str, **result) -> None:
        """Merge facts learned after the job finished (e.g. the provenance check) into its result."""
        with self._tx() as db:
            row = db.execute("SELECT result FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None:
                merged = {**(json.loads(row[0]) if row[0] else {}), **result}
                db.execute("UPDATE jobs SET result=? WHERE id=?", (json.dumps(merged), job_id))

    # -- jobs: the worker side ----------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_seconds: float, job_id: str | None = None) -> Job | None:
        """The oldest queued job, or a running one whose worker stopped renewing its lease."""
        now = time.time()
        with self._tx() as db:
            where = "(status='queued' OR (status='running' AND lease_until<?))"
            args: tuple = (now,)
            if job_id is not None:
                where, args = where + " AND id=?", (now, job_id)
            row = db.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY created LIMIT 1", args).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status='running', lease_owner=?, lease_until=?, attempts=attempts+1, "
                       "started=?, step=0 WHERE id=?", (worker_id, now + lease_seconds, now, row[0]))
        return self.get_job(row[0])

    def heartbeat(self, job_id: str, worker_id: str, step: int, total: int, lease_seconds: float) -> str:
        """Renew the lease and record progress. Returns 'ok', 'cancel' (the client asked) or 'lost'."""
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET step=?, total=?, lease_until=? WHERE id=? AND lease_owner=? AND status='running'",
                           (step, total, time.time() + lease_seconds, job_id, worker_id)).rowcount
            if not n:
                return "lost"
            cancel = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        return "cancel" if cancel else "ok"

    def finish(self, job_id: str, worker_id: str, status: str, *, file: str | None = None, result: dict | None = None,
               error: str | None = None, generation_seconds: float | None = None) -> bool:
        """The one transition to a final state; False when this worker no longer holds the job."""
        assert status in TERMINAL
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET status=?, finished=?, file=?, result=?, error=?, generation_seconds=?, "
                           "step=CASE WHEN ?='succeeded' THEN total ELSE step END, lease_until=NULL "
                           "WHERE id=? AND lease_owner=? AND status='running'",
                           (status, time.time(), file, json.dumps(result or {}), error, generation_seconds, status,
                            job_id, worker_id)).rowcount
        return n == 1

    def release(self, job_id: str, worker_id: str) -> None:
        """Give a job back to the queue (worker shutting down mid-job)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='queued', lease_owner=NULL, lease_until=NULL, step=0 "
                       "WHERE id=? AND lease_owner=? AND status='running'", (job_id, worker_id))

    def worker_seen(self, worker_id: str, model: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO workers VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen, "
                       "model=excluded.model", (worker_id, time.time(), model))

    def live_workers(self, within_seconds: float) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM workers WHERE last_seen>=?", (time.time() - within_seconds,))]

    # -- numbers for /metrics -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        found = {r[0]: r[1] for r in self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")}
        return {s: found.get(s, 0) for s in STATUSES}

    def generation_seconds(self) -> list[float]:
        return [r[0] for r in self._read("SELECT generation_seconds FROM jobs WHERE generation_seconds IS NOT NULL")]

    def typical_generation_seconds(self, last: int = 50) -> float | None:
        """Median generation time of the last `last` jobs: the ETA of a job that has not started."""
        rows = self._read("SELECT generation_seconds FROM jobs WHERE generation_seconds IS NOT NULL "
                          "ORDER BY finished DESC LIMIT ?", (last,))
        return statistics.median(r[0] for r in rows) if rows else None

    def queue_wait_seconds(self) -> list[float]:
        return [r[0] for r in self._read("SELECT started-created FROM jobs WHERE started IS NOT NULL")]
