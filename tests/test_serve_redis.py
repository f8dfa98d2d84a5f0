"""The Redis job queue (Dramatiq workers) against a real redis-server: the store's contract, then the HTTP API with
`vidiffuse worker` processes, one of them killed with SIGKILL mid-job and its job taken over by the other."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")
dramatiq = pytest.importorskip("dramatiq")

from vidiffuse.serve.redis_queue import QUEUE_NAME, RedisJobStore, handle_delivery  # noqa: E402
from vidiffuse.serve.settings import ServeSettings  # noqa: E402
from vidiffuse.serve.store import ApiKey, LimitExceeded  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_redis(url: str, seconds: float = 10.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            client.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """VIDIFFUSE_TEST_REDIS_URL (a Redis these tests may wipe; .ci/run starts one), else a redis-server of our own."""
    url = os.environ.get("VIDIFFUSE_TEST_REDIS_URL")
    if url:
        _wait_for_redis(url)
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("no redis-server: install it (apt-get install redis-server) or set VIDIFFUSE_TEST_REDIS_URL")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture
def store(redis_url, tmp_path):
    s = RedisJobStore(ServeSettings(queue="redis", redis_url=redis_url, home=tmp_path))
    yield s
    s.close()


def key(rate=100, quota=1000, id="k1") -> ApiKey:
    return ApiKey(id, id, 0.0, None, rate, quota)


def new_job(store, k=None, seed=0):
    return store.create_job(k or key(), {"prompt": "a red circle", "seed": seed}, total=10)


# -- the store ------------------------------------------------------------------------------------------------------
def test_claim_heartbeat_finish_exactly_once(store):
    job = new_job(store)
    assert store.broker.do_qsize(QUEUE_NAME) == 1  # creating a job sends its message
    assert store.get_job(job.id).status == "queued" and store.counts()["queued"] == 1

    a = store.claim("worker-a", 30, job_id=job.id)
    assert (a.status, a.lease_owner, a.attempts) == ("running", "worker-a", 1)
    assert store.claim("worker-b", 30, job_id=job.id) is None  # a live lease keeps it
    assert store.claim("worker-b", 30) is None
    assert store.heartbeat(job.id, "worker-a", 4, 10, 30) == "ok"
    assert store.heartbeat(job.id, "worker-b", 4, 10, 30) == "lost"
    assert store.get_job(job.id).step == 4

    assert not store.finish(job.id, "worker-b", "succeeded")  # not the lease holder
    assert store.finish(job.id, "worker-a", "succeeded", file="/v.mp4", result={"model": "m"}, generation_seconds=1.25)
    assert not store.finish(job.id, "worker-a", "failed", error="late")  # already final: nothing changes
    done = store.get_job(job.id)
    assert (done.status, done.step, done.file, done.result, done.error, done.lease_until) == \
        ("succeeded", 10, "/v.mp4", {"model": "m"}, None, None)
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert store.generation_seconds() == [1.25] and store.typical_generation_seconds() == 1.25
    assert len(store.queue_wait_seconds()) == 1 and 0 <= store.queue_wait_seconds()[0] < 5
    assert store.heartbeat(job.id, "worker-a", 10, 10, 30) == "lost"


def test_expired_lease_is_claimed_again_and_the_old_holder_loses(store):
    job = new_job(store)
    store.claim("worker-a", 0.3, job_id=job.id)
    time.sleep(0.4)  # worker-a "died": no heartbeat
    b = store.claim("worker-b", 30)
    assert (b.id, b.lease_owner, b.attempts, b.step) == (job.id, "worker-b", 2, 0)
    assert store.heartbeat(job.id, "worker-a", 5, 10, 30) == "lost"  # it was only slow: it must stop now
    assert not store.finish(job.id, "worker-a", "succeeded")
    assert store.finish(job.id, "worker-b", "succeeded")
    assert store.get_job(job.id).lease_owner == "worker-b"


def test_release_requeues_with_a_message(store):
    job = new_job(store)
    store.broker.flush(QUEUE_NAME)
    store.claim("worker-a", 30)
    store.release(job.id, "worker-b")  # not the holder: nothing happens
    assert store.get_job(job.id).status == "running" and store.broker.do_qsize(QUEUE_NAME) == 0
    store.release(job.id, "worker-a")
    again = store.get_job(job.id)
    assert (again.status, again.lease_owner, again.step) == ("queued", None, 0)
    assert store.broker.do_qsize(QUEUE_NAME) == 1


def test_cancel_queued_and_running(store):
    queued, running = new_job(store, seed=1), new_job(store, seed=2)
    store.claim("worker-a", 30, job_id=running.id)
    assert store.cancel_job(queued.id, "someone-else") is None  # another key's job: as if it did not exist
    assert store.get_job(queued.id).status == "queued"

    assert store.cancel_job(queued.id, "k1").status == "cancelled"
    assert store.claim("worker-b", 30, job_id=queued.id) is None  # its message, delivered later, finds it final
    flagged = store.cancel_job(running.id, "k1")
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.heartbeat(running.id, "worker-a", 3, 10, 30) == "cancel"
    assert store.finish(running.id, "worker-a", "cancelled")
    assert store.counts()["cancelled"] == 2


def test_rate_limit_holds_across_api_servers_under_concurrency(redis_url, tmp_path):
    # two stores: two API servers on different machines, eight requests at once on each
    stores = [RedisJobStore(ServeSettings(queue="redis", redis_url=redis_url, home=tmp_path)) for _ in range(2)]
    k, accepted, refused = key(rate=5), [], []

    def submit(s):
        try:
            accepted.append(new_job(s, k))
        except LimitExceeded as e:
            refused.append(e)

    threads = [threading.Thread(target=submit, args=(stores[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 5 and len(refused) == 11
    assert "rate limit of 5 jobs reached" in str(refused[0]) and 1 <= refused[0].retry_after <= 60
    new_job(stores[0], key(quota=2, id="k2"))
    new_job(stores[1], key(quota=2, id="k2"))
    with pytest.raises(LimitExceeded, match="daily quota of 2 jobs reached"):
        new_job(stores[0], key(quota=2, id="k2"))
    for s in stores:
        s.close()


def test_listing_position_results_and_workers(store):
    jobs = [new_job(store, seed=i) for i in range(3)]
    new_job(store, key(id="k2"))
    assert [j.id for j in store.list_jobs("k1")] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list_jobs("k1", limit=1, offset=1)] == [jobs[1].id]
    assert [store.queue_position(j) for j in jobs] == [0, 1, 2]
    assert store.get_job(jobs[0].id, "k2") is None and store.get_job(jobs[0].id, "k1").request["seed"] == 0

    store.set_result(jobs[0].id, model="m")
    store.set_result(jobs[0].id, provenance={"watermark": {"p_value": 1e-12}})
    assert store.get_job(jobs[0].id).result == {"model": "m", "provenance": {"watermark": {"p_value": 1e-12}}}

    store.worker_seen("w1", "shapes")
    store.worker_seen("w2")
    assert sorted((w["id"], w["model"]) for w in store.live_workers(10)) == [("w1", "shapes"), ("w2", None)]
    time.sleep(1.0)
    store.worker_seen("w2")
    assert [w["id"] for w in store.live_workers(0.7)] == ["w2"]
    store.ping()


def test_delivery_of_a_final_busy_or_unknown_job(store, tmp_path):
    settings = store.settings.model_copy(update={"lease_seconds": 20})
    done, busy = new_job(store, seed=1), new_job(store, seed=2)
    store.claim("w", 20, job_id=done.id)
    store.finish(done.id, "w", "succeeded")
    # a duplicate delivery of a finished job returns (acknowledging the message) without running anything
    assert handle_delivery(store, settings, None, "other", done.id) == "succeeded"
    assert store.get_job(done.id).attempts == 1
    # a job another worker holds: try again about when that lease would end
    store.claim("w", 3, job_id=busy.id)
    with pytest.raises(dramatiq.Retry) as retry:
        handle_delivery(store, settings, None, "other", busy.id)
    assert 500 <= retry.value.delay <= 3500  # what is left of the 3 s lease, plus half a second
    assert handle_delivery(store, settings, None, "other", "0" * 32) == "unknown"


def test_stranded_jobs_get_a_fresh_message(store, monkeypatch):
    # the API stored the job but could not send its message: the client still gets the job
    def broken_send(*args, **kwargs):
        raise redis.ConnectionError("redis went away")

    monkeypatch.setattr(store.actor, "send", broken_send)
    unsent = new_job(store, seed=1)
    monkeypatch.undo()
    assert store.get_job(unsent.id).status == "queued" and store.broker.do_qsize(QUEUE_NAME) == 0
    # a running job whose lease ran out and whose message is gone (say, a Redis failover lost it)
    lost = new_job(store, seed=2)
    store.claim("w", 0.1, job_id=lost.id)
    store.broker.flush(QUEUE_NAME)
    time.sleep(0.2)

    assert store.resend_stranded(after_seconds=60) == []  # not stranded for long enough yet
    assert sorted(store.resend_stranded(after_seconds=0.05)) == sorted([unsent.id, lost.id])
    assert store.broker.do_qsize(QUEUE_NAME) == 2
    assert store.resend_stranded(after_seconds=0.05) == []  # once per period, however many workers sweep


# -- end to end: HTTP API + `vidiffuse worker` processes on Redis -------------------------------------------------
def _start_worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "worker"], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


def _wait(predicate, seconds: float, what: str, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text()[-4000:]}")


def _pid(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 2)[1])  # new_worker_id(): host-pid-random


def test_http_api_with_dramatiq_workers_survives_kill_9(redis_url, tmp_path):
    from fastapi.testclient import TestClient

    from vidiffuse.serve.app import create_app

    home, log = tmp_path / "home", tmp_path / "workers.log"
    settings = ServeSettings(queue="redis", redis_url=redis_url, home=home, lease_seconds=3, worker_timeout_seconds=5)
    app = create_app(settings)
    jobs = app.state.jobs
    _, secret = app.state.keys.create_key("e2e", rate_per_minute=100)
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/readyz").status_code == 503  # no worker yet

    # workers as on other machines: they share only Redis and the files volume (here the same home)
    env = {**os.environ, "VIDIFFUSE_QUEUE": "redis", "VIDIFFUSE_REDIS_URL": redis_url, "VIDIFFUSE_HOME": str(home),
           "VIDIFFUSE_LEASE_SECONDS": "3", "VIDIFFUSE_REDIS_HEARTBEAT_SECONDS": "2",
           "VIDIFFUSE_REDIS_MAINTENANCE_CHANCE": "1", "VIDIFFUSE_REDIS_RESEND_AFTER_SECONDS": "600"}
    workers = [_start_worker(env, log) for _ in range(2)]
    try:
        _wait(lambda: client.get("/readyz").json().get("workers") == 2, 90, "two workers to be ready", log)
        long_id = client.post("/v1/videos", json={"prompt": "a large red circle moving right", "seed": 1,
                                                  "steps": 40}).json()["id"]
        holder = _wait(lambda: (j := jobs.get_job(long_id)).step >= 5 and j.lease_owner, 60, "the job to run", log)
        victim = next(w for w in workers if w.pid == _pid(holder))
        victim.kill()  # SIGKILL mid-job: no cleanup, no acknowledgement of its message
        victim.wait()
        killed_at = time.time()
        assert jobs.get_job(long_id).status == "running"
        workers.remove(victim)

        again = _wait(lambda: (j := jobs.get_job(long_id)).attempts >= 2 and j, 60, "the killed job to restart", log)
        recovery = again.started - killed_at
        print(f"\nkilled worker's job claimed again by the other worker {recovery:.1f} s after SIGKILL "
              f"(lease 3 s, broker heartbeat 2 s)")
        assert recovery < 30 and _pid(again.lease_owner) != victim.pid
        ids = [long_id] + [client.post("/v1/videos", json={"prompt": p, "seed": 7, "steps": 8}).json()["id"]
                           for p in ("a small blue square moving up", "a green triangle", "a yellow circle on white")]
        _wait(lambda: jobs.counts()["succeeded"] == 4, 90, "all jobs to finish", log)

        out = {i: client.get(f"/v1/videos/{i}").json() for i in ids}
        assert all(o["status"] == "succeeded" and o["progress"]["fraction"] == 1.0 for o in out.values()), out
        assert jobs.get_job(long_id).attempts == 2 and all(jobs.get_job(i).attempts == 1 for i in ids[1:])
        files = sorted(p.stem for p in settings.files_dir.rglob("*.mp4"))
        assert files == sorted(ids)  # one video per job, none twice
        video = client.get(f"/v1/videos/{long_id}/content")
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 1000

        # duplicate deliveries of finished jobs are acknowledged without running anything
        finished = {i: jobs.get_job(i).finished for i in ids}
        for i in ids[:2]:
            jobs.send(i)
        _wait(lambda: jobs.broker.do_qsize(QUEUE_NAME) == 0, 30, "every message to be acknowledged", log)
        assert {i: jobs.get_job(i).finished for i in ids} == finished
        assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 4, "failed": 0, "cancelled": 0}

        metrics = client.get("/metrics").text
        assert 'vidiffuse_jobs{status="succeeded"} 4.0' in metrics and "vidiffuse_queue_depth 0.0" in metrics
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)  # graceful: finish the current job (none now), then exit
        try:
            assert [w.wait(60) for w in workers] == [0], log.read_text()[-4000:]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
            jobs.close()
