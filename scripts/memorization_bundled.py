"""Memorization check of the bundled `shapes` model against the training set it was trained on.

    .venv/bin/python scripts/memorization_bundled.py --n 96 --out benchmarks/results/memorization-shapes

The denoiser's training clips are not on disk: they are re-rendered from the seeds in the model's
`training/data_manifest.json` and fingerprinted in memory. Generations come from fully specified prompts
(`train.trainer.eval_prompts`). Compare the flag rate with the shapes world's base rate of 4.4% (independent
clips flagged at 0.99, `benchmarks/results/memorization_calibration.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vidiffuse.data.fingerprint import SIMILARITY_THRESHOLD, fingerprint_arrays
from vidiffuse.files import write_atomic
from vidiffuse.govern.memorization import memorization_report, report_markdown, shapes_world_fingerprints
from vidiffuse.pipeline import VideoPipeline, resolve_model_path
from vidiffuse.train.trainer import eval_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memorization-shapes"))
    args = ap.parse_args()
    manifest = json.loads((resolve_model_path(args.model) / "training" / "data_manifest.json").read_text())
    source = next(g for g in manifest["generator"] if g["stage"] == "denoiser")
    start = time.perf_counter()
    training, _ = shapes_world_fingerprints(source["num_clips"], source["seed"])
    print(f"fingerprinted {len(training)} training clips in {time.perf_counter() - start:.0f} s")
    pipe = VideoPipeline.from_pretrained(args.model)
    prompts, _ = eval_prompts(args.n, seed=2024)
    videos = []
    for i in range(0, args.n, args.batch_size):
        videos += list(pipe(prompts[i:i + args.batch_size], seed=i, progress=False).frames)
    names = [f"{i:04d}: {p}" for i, p in enumerate(prompts)]
    report = memorization_report(fingerprint_arrays(videos, names), training, SIMILARITY_THRESHOLD, k=3)
    report.update(model=args.model, training_data=source, prompts="train.trainer.eval_prompts(n, seed=2024)",
                  shapes_world_base_flag_rate=0.044)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "memorization.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "memorization.md", report_markdown(report))
    print(f"{report['n_flagged']} of {report['n_generated']} flagged ({report['flag_rate']:.1%}; base rate 4.4%); "
          f"nearest similarity {report['nearest_similarity']}")


if __name__ == "__main__":
    main()
