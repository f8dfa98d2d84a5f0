"""Direction adherence per motion phrasing on held-out sets 1 and 2 (benchmarks/heldout_prompts.py), for a
model directory or bundled name, or for a training checkpoint's EMA weights loaded into that model.

    .venv/bin/python benchmarks/direction_phrases.py --model shapes --n 48
    .venv/bin/python benchmarks/direction_phrases.py --model shapes --weights runs/X/checkpoint/ema.safetensors

Prints, per set, the share of videos moving the asked way and, per phrasing (named by its first word), how
many of its prompts did. Takes ~1 min per 48 prompts per set on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from heldout_prompts import MOTION, MOTION_2, heldout_prompts  # noqa: E402

from vidiffuse.data import shapes  # noqa: E402
from vidiffuse.pipeline import VideoPipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--weights", help="a checkpoint's ema.safetensors to load into the model's denoiser")
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    if args.weights:
        dtype = next(pipe.transformer.parameters()).dtype
        pipe.transformer.load_state_dict({k: v.to(dtype) for k, v in load_file(args.weights).items()})
    sets = (("set 1", heldout_prompts(args.n), MOTION), ("set 2", heldout_prompts(args.n, seed=2027, phrasing=2), MOTION_2))
    for name, (prompts, truth), motions in sets:
        videos = pipe(prompts, seed=list(range(len(prompts))), batch_size=16, progress=False).frames
        readings = [shapes.analyze_video(v) for v in videos]
        right = [r["direction"] == t["direction"] for r, t in zip(readings, truth)]
        per_phrase = collections.defaultdict(list)
        for prompt, ok, t in zip(prompts, right, truth):
            phrase = next(p for p in motions[t["direction"]] if p in prompt)
            per_phrase[f"{phrase.split()[0]}{' (still)' if t['direction'] == 'still' else ''}"].append(ok)
        print(f"{name}: direction {np.mean(right):.3f}; by phrasing: "
              + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(per_phrase.items())))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
