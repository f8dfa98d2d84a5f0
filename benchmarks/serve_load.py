"""Load test of `vidiffuse serve`: N jobs from C concurrent clients (one API key each), against the same videos
generated directly in one process. Reports lost/duplicated/unplayable jobs, latency percentiles and the
server's overhead over direct generation.

    .venv/bin/python benchmarks/serve_load.py --jobs 200 --clients 20
    → benchmarks/results/serve/load.{json,md,png}
"""

from __future__ import annotations

import argparse
import asyncio
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
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "serve"


def workload(n: int) -> list[dict]:
    from vidiffuse.evaluate.suite import load_golden

    golden = load_golden()
    return [{"prompt": golden[i % len(golden)].prompt, "seed": 1000 + i} for i in range(n)]


DIRECT = """
import json, sys, time
from pathlib import Path
from vidiffuse.generation import generate_file
from vidiffuse.pipeline import VideoPipeline
jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
pipe = VideoPipeline.from_pretrained("shapes")
generate_file(pipe, "warm-up: a red circle", out / "warmup.mp4", seed=0, progress=False)
start = time.perf_counter()
for i, job in enumerate(jobs):
    generate_file(pipe, job["prompt"], out / f"{i:04d}.mp4", seed=job["seed"], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def direct_generation(jobs: list[dict], tmp: Path) -> float:
    """The same videos, one after another, in one process that loaded the model once: the floor."""
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    out = tmp / "direct"
    out.mkdir()
    env = {**os.environ, "VIDIFFUSE_HOME": str(tmp / "direct-home")}
    done = subprocess.run([sys.executable, "-c", DIRECT, str(spec), str(out)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


async def client(url: str, key: str, jobs: list[dict], results: list[dict], downloads: Path) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=600) as http:
        for job in jobs:
            submitted = time.perf_counter()
            created = await http.post("/v1/videos", json=job)
            created.raise_for_status()
            job_id, final = created.json()["id"], None
            async with http.stream("GET", f"/v1/videos/{job_id}/events") as events:
                async for line in events.aiter_lines():
                    if line.startswith("data: "):
                        final = json.loads(line[6:])
            content = await http.get(f"/v1/videos/{job_id}/content")
            finished = time.perf_counter()
            path = downloads / f"{job_id}.mp4"
            path.write_bytes(content.content)
            results.append({"id": job_id, "status": final["status"] if final else None, "http": content.status_code,
                            "latency": finished - submitted, "file": str(path), "seed": job["seed"]})


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    from vidiffuse.serve.settings import ServeSettings
    from vidiffuse.serve.store import Store
    from vidiffuse.video.io import read_video

    jobs = workload(args.jobs)
    tmp = Path(tempfile.mkdtemp(prefix="vidiffuse-load-"))
    print(f"direct generation of {len(jobs)} videos ...", flush=True)
    direct_seconds = direct_generation(jobs, tmp)
    print(f"  {direct_seconds:.1f} s", flush=True)

    home = tmp / "home"
    settings = ServeSettings(home=home)
    store = Store(settings.db_path)
    keys = [store.create_key(f"client-{c}", rate_per_minute=10_000, quota_per_day=100_000)[1] for c in range(args.clients)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "serve", "--port", str(port), "--workers", "1"],
                              env={**os.environ, "VIDIFFUSE_HOME": str(home)}, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "server.log", "w"), start_new_session=True)
    try:
        wait_ready(url)
        downloads = tmp / "downloads"
        downloads.mkdir()
        results: list[dict] = []
        shares = [jobs[c :: args.clients] for c in range(args.clients)]
        print(f"{len(jobs)} jobs from {args.clients} clients ...", flush=True)
        start = time.perf_counter()

        async def run_all():
            await asyncio.gather(*(client(url, k, share, results, downloads) for k, share in zip(keys, shares)))

        asyncio.run(run_all())
        served_seconds = time.perf_counter() - start
        metrics = httpx.get(url + "/metrics").text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)

    with sqlite3.connect(settings.db_path) as db:
        rows = db.execute("SELECT id, status, attempts, generation_seconds FROM jobs").fetchall()
    statuses = [r[1] for r in rows]
    playable = 0
    for r in results:
        try:
            playable += read_video(r["file"])[0].shape[1] == 16
        except Exception:
            pass
    latencies = np.array([r["latency"] for r in results])
    generation = np.array([r[3] for r in rows if r[3] is not None])
    report = {
        "jobs": len(jobs), "clients": args.clients, "machine": f"{os.cpu_count()} CPU cores",
        "submitted": len(results), "jobs_in_database": len(rows),
        "succeeded": statuses.count("succeeded"), "lost": len(jobs) - len(rows),
        "duplicated": len(rows) - len({r[0] for r in rows}), "extra_attempts": int(sum(r[2] - 1 for r in rows)),
        "playable": playable, "content_http_200": sum(r["http"] == 200 for r in results),
        "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_max_s": float(latencies.max()),
        "served_wall_s": served_seconds, "direct_wall_s": direct_seconds,
        "overhead_vs_direct": served_seconds / direct_seconds - 1,
        "worker_generation_s_sum": float(generation.sum()), "worker_generation_s_median": float(np.median(generation)),
        "throughput_videos_per_s": len(results) / served_seconds,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(report, indent=2))
    (OUT / "metrics_after_load.txt").write_text(metrics)
    lines = ["# `vidiffuse serve` load test", "", f"`benchmarks/serve_load.py --jobs {args.jobs} --clients {args.clients}`, "
             "one worker, embedded SQLite queue, bundled model at default settings.", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items()]
    (OUT / "load.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.sort(latencies), np.linspace(0, 1, len(latencies)), lw=2)
    for q in (50, 95):
        ax.axvline(np.percentile(latencies, q), ls="--", c="gray")
        ax.text(np.percentile(latencies, q), 0.05, f" p{q}", color="gray")
    ax.set_xlabel("seconds from POST to downloaded MP4")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(f"{len(jobs)} jobs, {args.clients} concurrent clients, 1 worker")
    fig.tight_layout()
    fig.savefig(OUT / "load.png", dpi=120)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
