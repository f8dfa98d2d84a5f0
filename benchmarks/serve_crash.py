"""Crash test of `vidiffuse serve`: 20 jobs; kill -9 the worker mid-job, then kill -9 the whole server (API and
worker) mid-job, restart it; count how every job ended.

    .venv/bin/python benchmarks/serve_crash.py --jobs 20
    → benchmarks/results/serve/crash.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "serve"
PROMPT = "a large red circle moving right on a black background"


def start_server(env: dict, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "serve", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "a"), start_new_session=True)


def query(db: Path, sql: str, args: tuple = ()) -> list:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (value := predicate()):
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--lease", type=float, default=5.0)
    args = parser.parse_args()
    from vidiffuse.serve.settings import ServeSettings
    from vidiffuse.serve.store import Store
    from vidiffuse.video.io import read_video

    tmp = Path(tempfile.mkdtemp(prefix="vidiffuse-crash-"))
    home = tmp / "home"
    env = {**os.environ, "VIDIFFUSE_HOME": str(home), "VIDIFFUSE_LEASE_SECONDS": str(args.lease)}
    settings = ServeSettings(home=home)
    db = settings.db_path
    _, secret = Store(db).create_key("crash", rate_per_minute=10_000)
    auth = {"Authorization": f"Bearer {secret}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", tmp / "server.log"
    events = []
    server = start_server(env, port, log)
    try:
        wait(lambda: ready(url), 180, "the server")
        ids = [httpx.post(url + "/v1/videos", json={"prompt": PROMPT, "seed": i}, headers=auth).json()["id"]
               for i in range(args.jobs)]
        running = wait(lambda: query(db, "SELECT id, lease_owner FROM jobs WHERE status='running' AND step>0"), 120, "a running job")
        job_id, owner = running[0]
        os.kill(int(owner.split("-")[-2]), signal.SIGKILL)
        events.append({"at": time.time(), "killed": "worker", "job": job_id})
        third = args.jobs // 3
        wait(lambda: query(db, "SELECT COUNT(*) FROM jobs WHERE status='succeeded'")[0][0] >= third, 300, "progress")
        running = wait(lambda: query(db, "SELECT id FROM jobs WHERE status='running' AND step>0"), 120, "a running job")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        events.append({"at": time.time(), "killed": "server and worker", "job": running[0][0]})
        server = start_server(env, port, log)
        wait(lambda: query(db, "SELECT COUNT(*) FROM jobs WHERE status IN ('succeeded','failed','cancelled')")[0][0]
             == args.jobs, 600, "every job")
        api_view = [httpx.get(f"{url}/v1/videos/{i}", headers=auth).json()["status"] for i in ids]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    rows = query(db, "SELECT id, status, attempts, file FROM jobs")
    files = sorted(settings.files_dir.rglob("*.mp4"))
    playable = sum(read_video(f)[0].shape[1] == 16 for f in files)
    report = {
        "jobs": args.jobs, "lease_seconds": args.lease, "kills": events,
        "succeeded": sum(r[1] == "succeeded" for r in rows), "failed": sum(r[1] == "failed" for r in rows),
        "api_reports_succeeded": api_view.count("succeeded"),
        "jobs_started_more_than_once": sum(r[2] > 1 for r in rows), "attempts_total": sum(r[2] for r in rows),
        "video_files": len(files), "one_file_per_job": sorted(f.stem for f in files) == sorted(ids),
        "playable": playable, "staging_files_left": len(list(settings.files_dir.rglob(".*"))),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "crash.json").write_text(json.dumps(report, indent=2))
    lines = ["# `vidiffuse serve` crash test", "", f"`benchmarks/serve_crash.py --jobs {args.jobs}`: kill -9 of the worker "
             "mid-job, then kill -9 of the server process group (API + worker) mid-job, then a restart.", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items() if k != "kills"]
    (OUT / "crash.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
