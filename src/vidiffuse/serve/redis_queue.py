"""The job queue past one machine: job state in Redis, delivery by Dramatiq, workers anywhere.

`RedisJobStore` has the job methods of the SQLite `Store` with the same meaning, so the routes and `run_job`
work on either. API keys stay in the API's SQLite; jobs live in Redis hashes and sorted sets, where every API
server and worker sees them. Videos go to `settings.files_dir`, which must then be a volume every API server
and worker shares (NFS, a cloud file system): a worker writes the MP4 and an API server sends it.

Why Dramatiq: its Redis broker acknowledges a message only when the actor returns, and puts the unacknowledged
messages of a worker that stopped heart-beating back on the queue, so a job survives `kill -9` of its worker.
That is at-least-once delivery; the job lease turns it into exactly-once completion: a delivery claims the job
(`claim(..., job_id=...)`), only the lease holder can `finish` it, and a duplicate delivery of a finished job
just returns. (RQ moves the job of a dead worker to its failed registry instead of running it again; Celery on
Redis redelivers an unacknowledged task only after a one-hour visibility timeout.)

All times (created, leases) come from the Redis server's clock, so machines whose clocks disagree still agree
on whose lease ran out. Every write is one Lua script, atomic on the server.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import uuid
from dataclasses import dataclass

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from pydantic_settings import BaseSettings, SettingsConfigDict

from .settings import ServeSettings
from .store import STATUSES, TERMINAL, ApiKey, Job, LimitExceeded
from .worker import ModelProvider, new_worker_id, run_job, stop_on_signals

logger = logging.getLogger("vidiffuse.serve.redis")
QUEUE_NAME = "videos"
ACTOR_NAME = "generate_video"
SEEN_SECONDS = 2.0  # how often a worker says it is alive and looks for stranded jobs


class RedisQueueSettings(BaseSettings):
    """Tuning of the Redis queue, from VIDIFFUSE_REDIS_* variables. The defaults bring a killed worker's job
    back in about `lease_seconds` (30 s): its lease runs out, and its message is back on the queue by then."""

    model_config = SettingsConfigDict(env_prefix="VIDIFFUSE_REDIS_", extra="ignore")

    namespace: str = "vidiffuse"  # prefix of every Redis key; two services can share one Redis
    # a worker silent this long is dead to the broker, which then requeues its unacknowledged messages. Live
    # workers poll at least once a second; a false "dead" only costs a duplicate message, which the lease absorbs
    heartbeat_seconds: float = 15.0
    # the share of broker commands that also requeue dead workers' messages (Dramatiq's default, 0.001, makes
    # a killed worker's job wait ~15 minutes on an idle cluster; the check is a few cheap commands)
    maintenance_chance: float = 0.1
    # safety net beside the broker: a job stored but never sent (the API died between the two), or running on a
    # lease that ran out this long ago, gets a fresh message from the next worker that looks
    resend_after_seconds: float = 120.0
    stop_timeout_seconds: float = 600.0  # SIGTERM: how long the current job may take to finish


# Every script reads the server clock: leases compare times written by different machines.
_CLOCK = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
local now = tonumber(now_s)
local ns = ARGV[1]
local function f6(x) return string.format('%.6f', x) end
local function job(id) return ns .. ':job:' .. id end
local function jobs(name) return ns .. ':jobs:' .. name end
"""

_CREATE = _CLOCK + """
local id, key_id, request, total = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local by_key = jobs('key:' .. key_id)
local limits = {{60, tonumber(ARGV[6]), 'rate limit'}, {86400, tonumber(ARGV[7]), 'daily quota'}}
for _, l in ipairs(limits) do
  if redis.call('ZCOUNT', by_key, f6(now - l[1]), '+inf') >= l[2] then
    local oldest = redis.call('ZRANGEBYSCORE', by_key, f6(now - l[1]), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    return {'limit', l[3], tostring(l[2]), f6(tonumber(oldest[2]) + l[1] - now)}
  end
end
redis.call('HSET', job(id), 'id', id, 'key_id', key_id, 'status', 'queued', 'request', request, 'created', now_s,
           'step', 0, 'total', total, 'attempts', 0, 'cancel_requested', 0)
redis.call('ZADD', jobs('queued'), now_s, id)
redis.call('ZADD', by_key, now_s, id)
redis.call('ZADD', jobs('unsent'), now_s, id)
return {'ok', now_s}
"""

_CLAIM = _CLOCK + """
local worker, lease, id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if id == '' then
  local q = redis.call('ZRANGE', jobs('queued'), 0, 0)[1]
  local r = redis.call('ZRANGEBYSCORE', jobs('running'), '-inf', '(' .. now_s, 'LIMIT', 0, 1)[1]
  if q and r then
    if tonumber(redis.call('HGET', job(r), 'created')) < tonumber(redis.call('HGET', job(q), 'created')) then id = r else id = q end
  else
    id = q or r
  end
  if not id then return false end
else
  local status, lease_until = unpack(redis.call('HMGET', job(id), 'status', 'lease_until'))
  if not (status == 'queued' or (status == 'running' and lease_until and tonumber(lease_until) < now)) then
    return false
  end
end
local created = tonumber(redis.call('HGET', job(id), 'created'))
redis.call('HSET', job(id), 'status', 'running', 'lease_owner', worker, 'lease_until', f6(now + lease), 'started', now_s, 'step', 0)
redis.call('HINCRBY', job(id), 'attempts', 1)
redis.call('ZREM', jobs('queued'), id)
redis.call('ZREM', jobs('unsent'), id)
redis.call('ZADD', jobs('running'), f6(now + lease), id)
redis.call('HSET', jobs('queue_wait'), id, f6(now - created))
return id
"""

_HEARTBEAT = _CLOCK + """
local id, worker = ARGV[2], ARGV[3]
local status, owner, cancel = unpack(redis.call('HMGET', job(id), 'status', 'lease_owner', 'cancel_requested'))
if status ~= 'running' or owner ~= worker then return 'lost' end
local lease_until = f6(now + tonumber(ARGV[6]))
redis.call('HSET', job(id), 'step', ARGV[4], 'total', ARGV[5], 'lease_until', lease_until)
redis.call('ZADD', jobs('running'), lease_until, id)
if cancel == '1' then return 'cancel' end
return 'ok'
"""

# ARGV: ns, id, worker, status, then optional fields as name/value pairs ('' = none)
_FINISH = _CLOCK + """
local id, worker, final = ARGV[2], ARGV[3], ARGV[4]
local status, owner, total = unpack(redis.call('HMGET', job(id), 'status', 'lease_owner', 'total'))
if status ~= 'running' or owner ~= worker then return 0 end
redis.call('HSET', job(id), 'status', final, 'finished', now_s, 'result', ARGV[5])
if final == 'succeeded' then redis.call('HSET', job(id), 'step', total) end
redis.call('HDEL', job(id), 'lease_until')
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', job(id), ARGV[i]) else redis.call('HSET', job(id), ARGV[i], ARGV[i + 1]) end
end
redis.call('ZREM', jobs('running'), id)
redis.call('ZADD', jobs(final), now_s, id)
local seconds = redis.call('HGET', job(id), 'generation_seconds')
if seconds then
  redis.call('HSET', jobs('generation_seconds'), id, seconds)
  redis.call('ZADD', jobs('generated'), now_s, id)
end
return 1
"""

_RELEASE = _CLOCK + """
local id, worker = ARGV[2], ARGV[3]
local status, owner, created = unpack(redis.call('HMGET', job(id), 'status', 'lease_owner', 'created'))
if status ~= 'running' or owner ~= worker then return 0 end
redis.call('HSET', job(id), 'status', 'queued', 'step', 0)
redis.call('HDEL', job(id), 'lease_owner', 'lease_until')
redis.call('ZREM', jobs('running'), id)
redis.call('ZADD', jobs('queued'), created, id)
redis.call('ZADD', jobs('unsent'), now_s, id)
return 1
"""

_CANCEL = _CLOCK + """
local id, key_id = ARGV[2], ARGV[3]
local status, owner_key = unpack(redis.call('HMGET', job(id), 'status', 'key_id'))
if owner_key ~= key_id then return 0 end
if status == 'queued' then
  redis.call('HSET', job(id), 'status', 'cancelled', 'finished', now_s)
  redis.call('ZREM', jobs('queued'), id)
  redis.call('ZREM', jobs('unsent'), id)
  redis.call('ZADD', jobs('cancelled'), now_s, id)
elseif status == 'running' then
  redis.call('HSET', job(id), 'cancel_requested', 1)
end
return 1
"""

# Jobs that need a fresh message: stored but never sent, or running on a lease that ran out long ago. Each one
# returned is stamped, so several workers sweeping at once send one message, not one each.
_STRANDED = _CLOCK + """
local before = f6(now - tonumber(ARGV[2]))
local found = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', jobs('unsent'), '-inf', before, 'LIMIT', 0, 100)) do
  if redis.call('HGET', job(id), 'status') == 'queued' then
    redis.call('ZADD', jobs('unsent'), now_s, id)
    table.insert(found, id)
  else
    redis.call('ZREM', jobs('unsent'), id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', jobs('running'), '-inf', before, 'LIMIT', 0, 100)) do
  local resent = redis.call('HGET', job(id), 'resent')
  if not resent or tonumber(resent) < tonumber(before) then
    redis.call('HSET', job(id), 'resent', now_s)
    table.insert(found, id)
  end
end
return found
"""

_WORKER_SEEN = _CLOCK + """
redis.call('ZADD', ns .. ':workers', now_s, ARGV[2])
if ARGV[3] == '' then redis.call('HDEL', ns .. ':workers:model', ARGV[2]) else redis.call('HSET', ns .. ':workers:model', ARGV[2], ARGV[3]) end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ns .. ':workers', '-inf', f6(now - 86400))) do
  redis.call('ZREM', ns .. ':workers', id)
  redis.call('HDEL', ns .. ':workers:model', id)
end
"""

_LIVE_WORKERS = _CLOCK + """
local out = {}
local seen = redis.call('ZRANGEBYSCORE', ns .. ':workers', f6(now - tonumber(ARGV[2])), '+inf', 'WITHSCORES')
for i = 1, #seen, 2 do
  table.insert(out, seen[i])
  table.insert(out, seen[i + 1])
  table.insert(out, redis.call('HGET', ns .. ':workers:model', seen[i]) or '')
end
return out
"""


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def job_from_hash(h: dict[str, str]) -> Job:
    return Job(id=h["id"], key_id=h["key_id"], status=h["status"], request=json.loads(h["request"]),
               created=float(h["created"]), started=_float(h.get("started")), finished=_float(h.get("finished")),
               step=int(h.get("step", 0)), total=int(h.get("total", 0)), attempts=int(h.get("attempts", 0)),
               lease_owner=h.get("lease_owner"), lease_until=_float(h.get("lease_until")),
               cancel_requested=h.get("cancel_requested") == "1",
               generation_seconds=_float(h.get("generation_seconds")), file=h.get("file"),
               result=json.loads(h["result"]) if h.get("result") else {}, error=h.get("error"))


def make_broker(settings: ServeSettings, queue: RedisQueueSettings) -> RedisBroker:
    # Only Retries among Dramatiq's default middleware: no TimeLimit (a generation on a big model may outlast
    # any fixed limit; the lease tells a live job from a dead one) and no AgeLimit (a queued job never expires).
    # Retries without a maximum: a delivery either moves its job forward or finds it final and returns.
    return RedisBroker(url=settings.redis_url, namespace=f"{queue.namespace}:dramatiq",
                       heartbeat_timeout=int(queue.heartbeat_seconds * 1000),
                       maintenance_chance=max(1, min(1_000_000, int(queue.maintenance_chance * 1_000_000))),
                       middleware=[Retries(max_retries=None, min_backoff=1_000, max_backoff=300_000)])


class RedisJobStore:
    """Jobs in Redis, shared by every API server and worker; `create_job` also sends the Dramatiq message."""

    def __init__(self, settings: ServeSettings, queue: RedisQueueSettings | None = None):
        self.settings = settings
        self.queue = queue or RedisQueueSettings()
        self.ns = self.queue.namespace
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self._scripts = {name: self.redis.register_script(src) for name, src in (
            ("create", _CREATE), ("claim", _CLAIM), ("heartbeat", _HEARTBEAT), ("finish", _FINISH),
            ("release", _RELEASE), ("cancel", _CANCEL), ("stranded", _STRANDED), ("worker_seen", _WORKER_SEEN),
            ("live_workers", _LIVE_WORKERS))}
        self.broker = make_broker(settings, self.queue)
        self.actor = dramatiq.actor(generate_video, broker=self.broker, actor_name=ACTOR_NAME, queue_name=QUEUE_NAME)

    def _run(self, script: str, *args) -> object:
        return self._scripts[script](args=[self.ns, *args])

    def _job_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def _jobs_key(self, name: str) -> str:
        return f"{self.ns}:jobs:{name}"

    def now(self) -> float:
        """The Redis server's clock, the one leases are measured on."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.broker.close()
        self.redis.close()

    # -- jobs: the API side -------------------------------------------------------------------------------
    def create_job(self, key: ApiKey, request: dict, total: int) -> Job:
        """Queue a job unless the key is over its rate (per minute) or quota (per day): checked and stored in one
        script, so concurrent requests on any number of API servers cannot overshoot. Then send its message."""
        job_id = uuid.uuid4().hex
        reply = self._run("create", job_id, key.id, json.dumps(request), total, key.rate_per_minute, key.quota_per_day)
        if reply[0] == "limit":
            raise LimitExceeded(f"{reply[1]} of {reply[2]} jobs reached", retry_after=float(reply[3]))
        job = Job(job_id, key.id, "queued", request, float(reply[1]), total=total)
        try:
            self.send(job_id)
        except redis.RedisError:
            # the job is stored: a worker's sweep sends it (resend_after_seconds), so the client still gets its id
            logger.exception("could not send job %s to the queue now; a worker will pick it up later", job_id)
        return job

    def send(self, job_id: str) -> None:
        """One Dramatiq message for the job. More than one is harmless: only one delivery can claim it."""
        self.actor.send(job_id)
        self.redis.zrem(self._jobs_key("unsent"), job_id)

    def queue_position(self, job: Job) -> int:
        return self.redis.zcount(self._jobs_key("queued"), "-inf", f"({job.created!r}")

    def get_job(self, job_id: str, key_id: str | None = None) -> Job | None:
        h = self.redis.hgetall(self._job_key(job_id))
        if not h or (key_id is not None and h["key_id"] != key_id):
            return None
        return job_from_hash(h)

    def list_jobs(self, key_id: str, limit: int = 50, offset: int = 0) -> list[Job]:
        ids = self.redis.zrevrange(self._jobs_key(f"key:{key_id}"), offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job_key(job_id))
        return [job_from_hash(h) for h in pipe.execute() if h]

    def cancel_job(self, job_id: str, key_id: str) -> Job | None:
        """Queued: cancelled at once (its message, when delivered, finds it final). Running: flagged; the worker
        stops at its next step."""
        self._run("cancel", job_id, key_id)
        return self.get_job(job_id, key_id)

    def set_result(self, job_id: str, **result) -> None:
        """Merge facts learned after the job finished (e.g. the provenance check) into its result."""
        key = self._job_key(job_id)

        def merge(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(key):
                return
            current = pipe.hget(key, "result")
            merged = {**(json.loads(current) if current else {}), **result}
            pipe.multi()
            pipe.hset(key, "result", json.dumps(merged))

        self.redis.transaction(merge, key)

    # -- jobs: the worker side ----------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_seconds: float, job_id: str | None = None) -> Job | None:
        """This job (or, without `job_id`, the oldest one) if it is queued or its worker stopped renewing the lease."""
        claimed = self._run("claim", worker_id, lease_seconds, job_id or "")
        return self.get_job(claimed) if claimed else None

    def heartbeat(self, job_id: str, worker_id: str, step: int, total: int, lease_seconds: float) -> str:
        """Renew the lease and record progress. Returns 'ok', 'cancel' (the client asked) or 'lost'."""
        return self._run("heartbeat", job_id, worker_id, step, total, lease_seconds)

    def finish(self, job_id: str, worker_id: str, status: str, *, file: str | None = None, result: dict | None = None,
               error: str | None = None, generation_seconds: float | None = None) -> bool:
        """The one transition to a final state; False when this worker no longer holds the job."""
        assert status in TERMINAL
        fields = {"file": file, "error": error, "generation_seconds": generation_seconds}
        pairs = [v for name, value in fields.items() for v in (name, "" if value is None else str(value))]
        return self._run("finish", job_id, worker_id, status, json.dumps(result or {}), *pairs) == 1

    def release(self, job_id: str, worker_id: str) -> None:
        """Give a job back to the queue (worker shutting down mid-job), with a fresh message to carry it."""
        if self._run("release", job_id, worker_id) == 1:
            self.send(job_id)

    def resend_stranded(self, after_seconds: float | None = None) -> list[str]:
        """Send a message for every job that has none on its way: stored but never sent (the API died between
        storing and sending), or running on a lease that ran out `after_seconds` ago (its message lost with a
        failed Redis, say). The broker's own redelivery normally comes long before this."""
        after = self.queue.resend_after_seconds if after_seconds is None else after_seconds
        stranded = self._run("stranded", after)
        for job_id in stranded:
            logger.warning("resending stranded job", extra={"event": "job_resent", "job_id": job_id})
            self.send(job_id)
        return stranded

    def worker_seen(self, worker_id: str, model: str | None = None) -> None:
        self._run("worker_seen", worker_id, model or "")

    def live_workers(self, within_seconds: float) -> list[dict]:
        flat = self._run("live_workers", within_seconds)
        return [{"id": flat[i], "last_seen": float(flat[i + 1]), "model": flat[i + 2] or None}
                for i in range(0, len(flat), 3)]

    # -- numbers for /metrics -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self._jobs_key(status))
        return dict(zip(STATUSES, pipe.execute()))

    def generation_seconds(self) -> list[float]:
        return [float(v) for v in self.redis.hvals(self._jobs_key("generation_seconds"))]

    def typical_generation_seconds(self, last: int = 50) -> float | None:
        """Median generation time of the last `last` jobs: the ETA of a job that has not started."""
        ids = self.redis.zrevrange(self._jobs_key("generated"), 0, last - 1)
        values = [float(v) for v in self.redis.hmget(self._jobs_key("generation_seconds"), ids) if v] if ids else []
        return statistics.median(values) if values else None

    def queue_wait_seconds(self) -> list[float]:
        return [float(v) for v in self.redis.hvals(self._jobs_key("queue_wait"))]


# -- the worker ---------------------------------------------------------------------------------------------------
@dataclass
class _WorkerState:
    store: RedisJobStore
    settings: ServeSettings
    provider: ModelProvider
    worker_id: str


_state: _WorkerState | None = None  # one Dramatiq worker per process (Dramatiq's rule), so one state


def generate_video(job_id: str) -> None:
    """The Dramatiq actor: one delivery of one job's message."""
    if _state is None:
        raise RuntimeError("generate_video runs inside a vidiffuse worker (run_redis_worker)")
    handle_delivery(_state.store, _state.settings, _state.provider, _state.worker_id, job_id)


def handle_delivery(store: RedisJobStore, settings: ServeSettings, provider: ModelProvider | None, worker_id: str,
                    job_id: str) -> str:
    """Claim the job and run it. A job already final (a duplicate delivery) or gone returns at once, which
    acknowledges the message; a job another worker holds on a live lease is retried when that lease would end:
    if its worker dies meanwhile, this delivery takes over."""
    job = store.claim(worker_id, settings.lease_seconds, job_id=job_id)
    if job is not None:
        return run_job(store, settings, provider, job, worker_id)
    current = store.get_job(job_id)
    if current is None:
        logger.warning("message for an unknown job", extra={"event": "job_unknown", "job_id": job_id})
        return "unknown"
    if current.status in TERMINAL:
        return current.status
    wait = max(0.0, (current.lease_until or 0.0) - store.now())
    raise dramatiq.Retry(f"job {job_id} is held by {current.lease_owner}", delay=int((wait + 0.5) * 1000))


def run_redis_worker(settings: ServeSettings | None = None, stop: threading.Event | None = None,
                     worker_id: str | None = None, queue: RedisQueueSettings | None = None) -> None:
    """`vidiffuse worker` with VIDIFFUSE_QUEUE=redis: a Dramatiq worker in this process, one job at a time
    (generation uses every core). SIGTERM/SIGINT let the current job finish, then exit."""
    global _state
    settings = settings or ServeSettings()
    stop = stop or threading.Event()
    worker_id = worker_id or new_worker_id()
    stop_on_signals(stop)
    # drift statistics go to a SQLite file beside the jobs; with jobs in Redis there is none the API reads
    settings = settings.model_copy(update={"monitor": False})
    store = RedisJobStore(settings, queue)
    provider = ModelProvider(settings)
    provider.get()  # load before announcing ourselves: /readyz means a worker can generate now
    _state = _WorkerState(store, settings, provider, worker_id)
    worker = dramatiq.Worker(store.broker, worker_threads=1)
    # one message at a time: a second one fetched early would wait behind this job while another worker idles
    worker.queue_prefetch = 1
    worker.start()
    logger.info("worker ready", extra={"event": "worker_ready", "worker": worker_id, "model": provider.label,
                                       "queue": "redis"})
    try:
        while not stop.is_set():
            try:
                store.worker_seen(worker_id, provider.label)
                store.resend_stranded()
            except redis.RedisError as e:  # Redis away for a moment: the broker reconnects, so do we
                logger.warning("redis unavailable", extra={"event": "redis_error", "error": str(e)})
            stop.wait(SEEN_SECONDS)
    finally:
        logger.info("worker stopping", extra={"event": "worker_stopping", "worker": worker_id})
        worker.stop(timeout=int(store.queue.stop_timeout_seconds * 1000))
        _state = None
        store.close()
