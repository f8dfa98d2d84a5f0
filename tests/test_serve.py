"""The HTTP service on the embedded SQLite queue: keys, limits, jobs end to end, exactly-once under kill -9."""

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vidiffuse.serve.settings import ServeSettings
from vidiffuse.serve.store import LimitExceeded, Store
from vidiffuse.video.io import frames_to_uint8, read_video

PROMPT = "a large red circle moving right on a black background"


# -- the store on its own ------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "service.sqlite3")


def test_a_killed_workers_job_is_taken_over_and_completed_exactly_once(store):
    key, _ = store.create_key("k")
    job = store.create_job(key, {"prompt": "p", "seed": 1}, total=4)
    first = store.claim("w1", lease_seconds=0.2)
    assert first.id == job.id and first.attempts == 1
    assert store.heartbeat(job.id, "w1", 1, 4, lease_seconds=0.2) == "ok"
    assert store.claim("w2", lease_seconds=5) is None  # w1's lease still runs
    time.sleep(0.3)  # w1 "died": no more heartbeats
    second = store.claim("w2", lease_seconds=5)
    assert second.id == job.id and second.attempts == 2 and second.step == 0
    assert store.heartbeat(job.id, "w1", 2, 4, lease_seconds=5) == "lost"
    assert not store.finish(job.id, "w1", "succeeded", file="x")
    assert store.finish(job.id, "w2", "succeeded", file="y", generation_seconds=1.5)
    assert not store.finish(job.id, "w2", "succeeded", file="z")
    done = store.get_job(job.id)
    assert (done.status, done.file, done.step) == ("succeeded", "y", 4)
    assert store.counts()["succeeded"] == 1 and store.generation_seconds() == [1.5]


def test_cancel_stops_queued_jobs_at_once_and_running_ones_at_their_next_step(store):
    key, _ = store.create_key("k")
    queued = store.create_job(key, {"prompt": "p", "seed": 1}, total=4)
    running = store.create_job(key, {"prompt": "q", "seed": 1}, total=4)
    store.claim("w", 30, job_id=running.id)
    assert store.cancel_job(queued.id, key.id).status == "cancelled"
    assert store.cancel_job(running.id, key.id).status == "running"
    assert store.heartbeat(running.id, "w", 2, 4, 30) == "cancel"
    assert store.claim("w", 30) is None  # a cancelled job is never picked up
    other, _ = store.create_key("other")
    assert store.cancel_job(running.id, other.id) is None  # not theirs


def test_rate_limit_and_daily_quota_are_enforced_per_key(store):
    key, _ = store.create_key("slow", rate_per_minute=2, quota_per_day=3)
    other, _ = store.create_key("other", rate_per_minute=2)
    for _ in range(2):
        store.create_job(key, {"prompt": "p"}, 1)
    with pytest.raises(LimitExceeded, match="rate limit of 2") as e:
        store.create_job(key, {"prompt": "p"}, 1)
    assert 1 <= e.value.retry_after <= 60
    store.create_job(other, {"prompt": "p"}, 1)  # limits are per key
    with sqlite3.connect(store.path) as db:  # the minute has passed; the day has not
        db.execute("UPDATE jobs SET created=created-120 WHERE key_id=?", (key.id,))
    store.create_job(key, {"prompt": "p"}, 1)
    with pytest.raises(LimitExceeded, match="daily quota of 3"):
        store.create_job(key, {"prompt": "p"}, 1)


def test_keys_are_stored_hashed_and_revocation_takes_effect(store):
    key, secret = store.create_key("alice")
    assert secret.startswith("vdf_") and len(secret) > 40
    assert secret.encode() not in store.path.read_bytes()
    assert store.authenticate(secret).id == key.id
    assert store.authenticate(secret + "x") is None
    store.revoke_key("alice")
    assert store.authenticate(secret) is None


def test_keys_cli_prints_the_key_once_and_refuses_duplicates(tmp_path):
    env = {**os.environ, "VIDIFFUSE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "vidiffuse.cli", "keys"]
    made = subprocess.run(cmd + ["create", "bob", "--rate", "5"], env=env, capture_output=True, text=True)
    assert made.returncode == 0 and made.stdout.strip().startswith("vdf_")
    again = subprocess.run(cmd + ["create", "bob"], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip() == "error: a key named 'bob' already exists"
    listed = subprocess.run(cmd + ["list"], env=env, capture_output=True, text=True)
    assert "bob" in listed.stdout and made.stdout.strip() not in listed.stdout
    gone = subprocess.run(cmd + ["revoke", "nobody"], env=env, capture_output=True, text=True)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr


# -- the API with a real worker ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from vidiffuse.serve.app import create_app
    from vidiffuse.serve.worker import run_worker

    settings = ServeSettings(home=tmp_path_factory.mktemp("serve-home"), max_steps=60, monitor=False)
    app = create_app(settings)
    keys = app.state.keys
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, kwargs={"settings": settings, "stop": stop}, daemon=True)
    worker.start()
    _, alice = keys.create_key("alice", rate_per_minute=100)
    _, bob = keys.create_key("bob", rate_per_minute=100)
    with TestClient(app) as client:
        deadline = time.time() + 120
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline and worker.is_alive(), "the worker never became ready"
            time.sleep(0.2)
        yield client, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}, settings
    stop.set()
    worker.join(60)


def wait_for(client, job_id, auth, timeout=120.0) -> dict:
    deadline = time.time() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            return job
        time.sleep(0.1)


def test_requests_without_a_valid_key_are_refused(service):
    client, *_ = service
    assert client.get("/v1/videos").status_code == 401
    bad = client.post("/v1/videos", json={"prompt": PROMPT}, headers={"Authorization": "Bearer vdf_nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "   "}, "prompt: must not be blank"),
    ({"prompt": PROMPT, "steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"prompt": PROMPT, "steps": 61}, "steps: at most 60 on this server"),
    ({"prompt": PROMPT, "frames": 1000}, "frames: Input should be less than or equal to 64"),
    ({"prompt": PROMPT, "sampler": "ddim"}, "sampler: Input should be"),
    ({"prompt": PROMPT, "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"prompt": PROMPT, "model": "../../etc"}, "model: Extra inputs are not permitted"),
    ({"prompt": "x" * 600}, "prompt: at most 500 characters on this server"),
])
def test_bad_settings_get_a_422_with_one_readable_line(service, body, message):
    client, alice, *_ = service
    response = client.post("/v1/videos", json=body, headers=alice)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_non_finite_guidance_is_refused(service):
    client, alice, *_ = service
    response = client.post("/v1/videos", content='{"prompt": "a red circle", "guidance": NaN}', headers=alice)
    assert response.status_code == 422


def test_a_job_runs_to_a_signed_watermarked_mp4_that_only_its_key_can_see(service):
    from vidiffuse.provenance.verify import verify_file

    client, alice, bob, settings = service
    created = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 6, "seed": 7}, headers=alice)
    assert created.status_code == 202
    job = created.json()
    assert job["status"] in ("queued", "running") and job["request"]["seed"] == 7
    job = wait_for(client, job["id"], alice)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"step": 6, "total": 6, "fraction": 1.0} and job["eta_seconds"] is None
    assert job["model"] == "shapes" and len(job["model_version"]) == 12
    content = client.get(job["content_url"], headers=alice)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    path = settings.home / "downloaded.mp4"
    path.write_bytes(content.content)
    assert read_video(path)[0].shape == (3, 16, 64, 64)
    checked = verify_file(path)
    assert checked["watermark"]["detected"] and checked["manifest"]["valid"] and not checked["manifest"]["tampered"]
    provenance = client.get(f"/v1/videos/{job['id']}/provenance", headers=alice).json()
    assert provenance["watermark"]["payload"] == checked["watermark"]["payload"]
    # another key cannot tell this job exists
    for method, url in (("GET", f"/v1/videos/{job['id']}"), ("GET", job["content_url"]),
                        ("DELETE", f"/v1/videos/{job['id']}"), ("GET", f"/v1/videos/{job['id']}/events")):
        assert client.request(method, url, headers=bob).status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/v1/videos", headers=bob).json()["jobs"]]
    assert job["id"] in [j["id"] for j in client.get("/v1/videos", headers=alice).json()["jobs"]]


def test_same_seed_through_the_api_gives_the_same_video(service):
    client, alice, _, settings = service
    frames = []
    for i in range(2):
        job = client.post("/v1/videos", json={"prompt": "a small blue square moving up on a gray background",
                                              "steps": 5, "seed": 11}, headers=alice).json()
        assert wait_for(client, job["id"], alice)["status"] == "succeeded"
        path = settings.home / f"same-{i}.mp4"
        path.write_bytes(client.get(f"/v1/videos/{job['id']}/content", headers=alice).content)
        frames.append(frames_to_uint8(read_video(path)[0]))
    np.testing.assert_array_equal(frames[0], frames[1])


def test_progress_streams_as_server_sent_events_until_done(service):
    client, alice, *_ = service
    job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 30, "seed": 3}, headers=alice).json()
    events = []
    with client.stream("GET", f"/v1/videos/{job['id']}/events", headers=alice) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    steps = [e["progress"]["step"] for e in events]
    assert events[-1]["status"] == "succeeded" and steps[-1] == 30
    assert steps == sorted(steps) and len(set(steps)) >= 3  # it moved, and never backwards
    assert any(e["status"] == "running" and e["eta_seconds"] is not None for e in events)


def test_cancelling_stops_a_job_and_leaves_no_video(service):
    client, alice, *_ = service
    job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 60}, headers=alice).json()
    cancelled = client.delete(f"/v1/videos/{job['id']}", headers=alice)
    assert cancelled.status_code == 200
    final = wait_for(client, job["id"], alice)
    assert final["status"] == "cancelled" and final["progress"]["step"] < 60
    assert client.get(f"/v1/videos/{job['id']}/content", headers=alice).status_code == 409
    assert client.delete(f"/v1/videos/{job['id']}", headers=alice).status_code == 200  # idempotent


def test_metrics_health_and_readiness(service):
    client, *_ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["models"] == ["shapes"]
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    jobs = {s.labels["status"]: s.value for s in families["vidiffuse_jobs"].samples}
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"} and jobs["succeeded"] >= 1
    hist = {(s.name, s.labels.get("le")): s.value for s in families["vidiffuse_generation_seconds"].samples}
    assert hist[("vidiffuse_generation_seconds_count", None)] == jobs["succeeded"]
    assert hist[("vidiffuse_generation_seconds_bucket", "+Inf")] == jobs["succeeded"]
    assert "1800.0" in {s.labels.get("le") for s in families["vidiffuse_generation_seconds"].samples}  # minutes-long jobs fit
    assert families["vidiffuse_queue_depth"].samples[0].value >= 0
    assert any(s.labels.get("route") == "/v1/videos" for s in families["vidiffuse_http_requests"].samples)


def test_openapi_documents_the_api(service):
    client, *_ = service
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"post", "get"} <= set(paths["/v1/videos"]) and "delete" in paths["/v1/videos/{job_id}"]
    assert "/v1/videos/{job_id}/events" in paths and "/metrics" in paths
    docs = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
    assert assets and all(a.startswith("/") and client.get(a).status_code == 200 for a in assets)  # works offline


def test_the_worker_follows_promotions_and_rollbacks_between_jobs_without_failing_any(service):
    from vidiffuse.pipeline import BUNDLED
    from vidiffuse.registry import ModelRegistry

    client, alice, _, settings = service
    registry = ModelRegistry(settings.home / "registry")
    first = registry.register("shapes", BUNDLED["shapes"], description="as bundled")
    second = registry.register("shapes", BUNDLED["shapes"], description="a retrained candidate")
    registry.set_alias("shapes", "production", first.version)
    labels = []
    for change in (None, lambda: registry.promote("shapes", second.version, force=True), lambda: registry.rollback("shapes")):
        job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 20}, headers=alice).json()
        if change is not None:  # the alias moves while the job runs: it finishes on the model it started with
            _wait(lambda: client.get(f"/v1/videos/{job['id']}", headers=alice).json()["status"] != "queued", 60, "start")
            change()
        done = wait_for(client, job["id"], alice)
        assert done["status"] == "succeeded", done
        labels.append(done["model"])
        after = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 2}, headers=alice).json()
        labels.append(wait_for(client, after["id"], alice)["model"])
    assert labels == ["shapes@1", "shapes@1", "shapes@1", "shapes@2", "shapes@2", "shapes@1"]
    actions = [entry["action"] for entry in registry.audit("shapes")]
    assert "rollback" in actions and any(a.startswith("promote") for a in actions)


def test_observed_jobs_feed_the_drift_metrics(tmp_path):
    from vidiffuse.monitor import MonitorStore
    from vidiffuse.serve.app import create_app
    from vidiffuse.serve.worker import run_worker, sampled

    settings = ServeSettings(home=tmp_path, monitor=True, monitor_sample_rate=1.0, canary_interval_seconds=0)
    app = create_app(settings)
    _, secret = app.state.keys.create_key("m")
    auth = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as client:
        ids = [client.post("/v1/videos", json={"prompt": p, "steps": 2}, headers=auth).json()["id"]
               for p in (PROMPT, "a cat astronaut playing jazz in Paris")]
        run_worker(settings, max_jobs=2)
        assert all(wait_for(client, i, auth, timeout=5)["status"] == "succeeded" for i in ids)
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert MonitorStore(settings.db_path).count() == 2
    assert families["vidiffuse_monitor_up"].samples[0].value == 1
    assert {s.labels["signal"] for s in families["vidiffuse_drift_evaluated"].samples} >= {"prompt_embedding", "ood_share"}
    # sampling keeps a fixed share of jobs, decided by id alone
    ids = [f"{i:08x}" + "0" * 24 for i in range(0, 2**32, 2**32 // 4000)]
    share = sum(sampled(i, 0.25) for i in ids) / len(ids)
    assert 0.24 < share < 0.26 and sampled(ids[7], 0.25) == sampled(ids[7], 0.25)


# -- crashes: kill -9 the worker, then the server ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(env, port) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "serve", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _running_worker_pid(db: Path) -> int | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT lease_owner FROM jobs WHERE status='running'").fetchone()
    return int(row[0].split("-")[-2]) if row else None


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_every_job_finishes_exactly_once_when_the_worker_and_then_the_server_are_killed(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "VIDIFFUSE_HOME": str(home), "VIDIFFUSE_LEASE_SECONDS": "2", "VIDIFFUSE_MONITOR": "false"}
    settings = ServeSettings(home=home)
    _, secret = Store(settings.db_path).create_key("load", rate_per_minute=1000)
    auth = {"Authorization": f"Bearer {secret}"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(env, port)
    try:
        _wait(lambda: _get(url + "/readyz") == 200, 120, "the server")
        ids = [httpx.post(url + "/v1/videos", json={"prompt": PROMPT, "steps": 12, "seed": i}, headers=auth).json()["id"]
               for i in range(8)]
        victim = _wait(lambda: _running_worker_pid(settings.db_path), 60, "a running job")
        os.kill(victim, signal.SIGKILL)  # the pool notices and starts a new worker
        _wait(lambda: _count(settings.db_path, "succeeded") >= 3, 120, "progress after the worker was killed")
        os.killpg(server.pid, signal.SIGKILL)  # the server and its worker, all at once
        server.wait()
        server = _start_server(env, port)
        _wait(lambda: _count(settings.db_path, "succeeded") == 8, 180, "all jobs after the restart")
        jobs = [httpx.get(f"{url}/v1/videos/{i}", headers=auth).json() for i in ids]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert [j["status"] for j in jobs] == ["succeeded"] * 8
    with sqlite3.connect(settings.db_path) as conn:
        attempts = dict(conn.execute("SELECT id, attempts FROM jobs").fetchall())
    assert max(attempts.values()) >= 2  # the killed job really was started twice...
    files = sorted((settings.files_dir).rglob("*.mp4"))
    assert sorted(f.stem for f in files) == sorted(ids)  # ...and still ends as one video per job
    assert not list(settings.files_dir.rglob(".*unsigned*"))  # no half-written staging files left behind
    for f in files:
        assert read_video(f)[0].shape[1] == 16


def _get(url) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _count(db: Path, status: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]
