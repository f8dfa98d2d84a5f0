"""Add the out-of-distribution prompt reference to a model directory.

Regenerates the denoiser's training captions from its config's [data] section, embeds a sample of them
with the model's own text encoder, calibrates the flagging threshold on further training captions and
writes MODEL_DIR/ood_reference.safetensors, which `VideoPipeline.prompt_ood` and `vidiffuse generate` use.

    .venv/bin/python scripts/add_ood_reference.py src/vidiffuse/weights/shapes --config configs/shapes_denoiser.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vidiffuse.errors import VidiffuseError
from vidiffuse.evaluate.ood import REFERENCE_FILE, reference_from_config
from vidiffuse.pipeline import VideoPipeline
from vidiffuse.train.trainer import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="model directory (or bundled name) to add the reference to")
    ap.add_argument("--config", type=Path, required=True, help="the denoiser's training config (TOML)")
    ap.add_argument("--n", type=int, default=4000, help="reference captions (fp16, 768 bytes each with MiniLM)")
    ap.add_argument("--heldout", type=int, default=2000, help="further captions that calibrate the threshold")
    ap.add_argument("--k", type=int, default=5, help="nearest reference captions a score averages over")
    ap.add_argument("--percentile", type=float, default=99.0,
                    help="threshold = this percentile of the held-out captions' scores")
    args = ap.parse_args()
    try:
        pipe = VideoPipeline.from_pretrained(args.model_dir)
        data_cfg = load_config(args.config)["data"]
        scorer = reference_from_config(pipe.text_encoder, data_cfg, n=args.n, n_heldout=args.heldout, k=args.k,
                                       percentile=args.percentile)
        out = scorer.save(pipe.path / REFERENCE_FILE)
    except VidiffuseError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {args.n} captions, k={args.k}, "
          f"threshold {scorer.threshold:.3f} (p{args.percentile:g} of {args.heldout} held-out captions)")


if __name__ == "__main__":
    main()
