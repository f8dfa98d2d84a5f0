"""Train the shapes-world video encoder (FVD features) and write it, by default as the bundled weights.

    .venv/bin/python scripts/train_shapes_video_encoder.py --steps 600 --batch-size 32 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vidiffuse.evaluate.shapes_encoder import DEFAULT_ENCODER_PATH, train_shapes_video_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_ENCODER_PATH)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; the same count reproduces the same weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    accuracy = train_shapes_video_encoder(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {args.out}; held-out accuracy {accuracy}")


if __name__ == "__main__":
    main()
