"""Calibrate the memorization/dedup similarity threshold on the shapes world and time fingerprinting.

    .venv/bin/python scripts/calibrate_memorization.py --out benchmarks/results/memorization_calibration.json

Writes the nearest-neighbour similarity of fresh clips against the bundled model's training set (seed 1,
20,000 clips) next to that of re-encoded copies of training clips, per candidate threshold; plus the
fingerprinting speed of MP4 files on disk (decode + hash + embed) on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from vidiffuse.data.fingerprint import fingerprint_dir
from vidiffuse.data.shapes import synthesize
from vidiffuse.files import write_atomic
from vidiffuse.govern.memorization import calibrate_threshold


def file_speed(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp), n, seed=3, progress=False)
        start = time.perf_counter()
        fp = fingerprint_dir(tmp)
        seconds = time.perf_counter() - start
    return {"clips": len(fp), "seconds": round(seconds, 3), "clips_per_s": round(len(fp) / seconds, 1),
            "clip": "16 frames 64x64 H.264 MP4", "machine": f"{platform.processor() or platform.machine()}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-independent", type=int, default=1000)
    ap.add_argument("--n-copies", type=int, default=200)
    ap.add_argument("--speed-clips", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memorization_calibration.json"))
    args = ap.parse_args()
    start = time.perf_counter()
    result = calibrate_threshold(args.n_train, args.n_independent, args.n_copies, progress=print)
    result["calibration_seconds"] = round(time.perf_counter() - start, 1)
    result["fingerprint_speed_files"] = file_speed(args.speed_clips)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
