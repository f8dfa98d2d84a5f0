"""Train a config within a wall-clock budget (a lent GPU machine for a fixed number of minutes, a night).

A first leg of `--probe-steps` builds the data, trains and checkpoints; its logged samples/s give the step
rate. The run then resumes for as many steps as the rest of the budget holds, keeping `--reserve` seconds
for the final evaluation and export. The learning rate is constant after warm-up, so where the run stops
changes nothing but its length.

    python scripts/train_within.py configs/shapes_denoiser_gpu.toml --budget 480
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vidiffuse.train.trainer import load_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--budget", type=float, required=True, help="seconds for the whole run, data included")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--reserve", type=float, default=60.0, help="seconds kept for the last evaluation and export")
    args = parser.parse_args()
    started = time.monotonic()
    run = load_config(args.config)["run"]
    train(args.config, max_steps=args.probe_steps, steps=10**9)
    records = [json.loads(line) for line in (Path(run["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]  # the first holds compile/warm-up
    steps_per_s = statistics.median(rates) / int(run["batch_size"])
    left = args.budget - (time.monotonic() - started) - args.reserve
    # evaluations every eval_every steps cost time too: the probe leg's share of them is not known, so keep 10%
    total = args.probe_steps + max(0, int(0.9 * left * steps_per_s))
    print(json.dumps({"probe_steps": args.probe_steps, "steps_per_s": round(steps_per_s, 2), "total_steps": total}),
          flush=True)
    out = train(args.config, resume=True, steps=total)
    print(json.dumps({"exported": str(out), "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
