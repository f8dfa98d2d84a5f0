"""Engine benchmark: prompt adherence on held-out phrasings, temporal stability, speed, determinism.

    .venv/bin/python benchmarks/engine.py --model shapes --n 200

Held-out phrasing sets 1 and 2 (benchmarks/heldout_prompts.py), each with plain and rare attribute words.

Writes benchmarks/results/engine.json, engine.md and engine_samples.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from heldout_prompts import heldout_prompts  # noqa: E402

from vidiffuse.data import shapes  # noqa: E402
from vidiffuse.pipeline import VideoPipeline  # noqa: E402

OUT = Path(__file__).parent / "results"


def adherence(pipe, prompts, truth, batch_size, **settings) -> tuple[dict, list, float]:
    t0 = time.perf_counter()
    out = pipe(prompts, seed=list(range(len(prompts))), batch_size=batch_size, **settings)
    per_video = (time.perf_counter() - t0) / len(prompts)
    readings = [shapes.analyze_video(v) for v in out.frames]
    acc = {a: float(np.mean([r[a] == t[a] for r, t in zip(readings, truth)])) for a in shapes.ATTRIBUTES}
    stability = {k: float(np.mean([r["stability"][k] for r in readings])) for k in ("color", "shape", "size")}
    return {"accuracy": acc, "stability": stability, "object_found": float(np.mean([r["object_frames"] for r in readings]))}, out.frames, per_video


def contact_sheet(frames: list[np.ndarray], prompts: list[str], path: Path, n: int = 8) -> None:
    import cv2

    rows = [np.concatenate(list(v[::3]), axis=1) for v in frames[:n]]
    sheet = cv2.resize(np.concatenate(rows, axis=0), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), sheet[..., ::-1])
    path.with_suffix(".txt").write_text("\n".join(prompts[:n]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--sampler")
    ap.add_argument("--tag", default="engine")
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("sampler", args.sampler)) if v is not None}
    pipe = VideoPipeline.from_pretrained(args.model)
    pipe("warm-up", progress=False, **settings)
    result = {"model": args.model, "settings": {**pipe.defaults, **settings}, "n": args.n}
    prompts, truth = heldout_prompts(args.n)
    result["heldout"], frames, result["seconds_per_video_batch"] = adherence(pipe, prompts, truth, args.batch_size, progress=True, **settings)
    contact_sheet(frames, prompts, OUT / f"{args.tag}_samples.png")
    rare_prompts, rare_truth = heldout_prompts(max(48, args.n // 4), seed=7, rare_words=True)
    result["heldout_rare_words"], _, _ = adherence(pipe, rare_prompts, rare_truth, args.batch_size, progress=False, **settings)
    set2_prompts, set2_truth = heldout_prompts(args.n, seed=2027, phrasing=2)
    result["heldout_set2"], _, _ = adherence(pipe, set2_prompts, set2_truth, args.batch_size, progress=True, **settings)
    rare2_prompts, rare2_truth = heldout_prompts(max(48, args.n // 4), seed=8, rare_words=True, phrasing=2)
    result["heldout_set2_rare_words"], _, _ = adherence(pipe, rare2_prompts, rare2_truth, args.batch_size, progress=False, **settings)
    a = pipe(prompts[0], seed=11, progress=False, **settings).frames[0]
    b = pipe(prompts[0], seed=11, progress=False, **settings).frames[0]
    result["deterministic"] = bool(np.array_equal(a, b))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).with_name("vidiffuse")), "generate", prompts[1], "-o", f"{tmp}/x.mp4", "--model", args.model]
        cmd += [f"--{k}={v}" for k, v in settings.items()]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        result["cold_generate_seconds"] = time.perf_counter() - t0
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {args.tag}: model `{args.model}`, settings {result['settings']}", "",
             "| prompts | " + " | ".join(shapes.ATTRIBUTES) + " |", "|---" * (len(shapes.ATTRIBUTES) + 1) + "|"]
    for key in ("heldout", "heldout_rare_words", "heldout_set2", "heldout_set2_rare_words"):
        lines.append(f"| {key} | " + " | ".join(f"{result[key]['accuracy'][a]:.3f}" for a in shapes.ATTRIBUTES) + " |")
    lines += ["", f"stability (share of frames agreeing with the clip): {result['heldout']['stability']}",
              f"seconds per video, batch mode: {result['seconds_per_video_batch']:.3f}",
              f"cold-process `vidiffuse generate`: {result['cold_generate_seconds']:.1f} s",
              f"same prompt and seed twice identical: {result['deterministic']}"]
    (OUT / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
