"""Per-attribute adherence of a distilled student on all 256 golden prompts (fp32): how the bundled
shapes-distilled's student was chosen among a device run's checkpoints (`scripts/gpu_compress.py`).

    python scripts/score_student.py runs/gpu/dmd-half-0.safetensors runs/gpu/dmd-half-1.safetensors
    python scripts/score_student.py --seed-offset 5000 --autoencoder      # the bundled student, other seeds
    python scripts/score_student.py --teacher                             # the teacher at its own defaults

A checkpoint is the student's state dict (in parts, as the device returns it); it samples at the bundled
student's settings and decodes with its TinyDecoder, or with the autoencoder's decoder (`--autoencoder`), which
separates the student's shapes from the decoder's. Prints the adherence and writes each video's hits as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VIDIFFUSE_PRECISION", "fp32")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vidiffuse.compress import distill  # noqa: E402
from vidiffuse.data import shapes  # noqa: E402
from vidiffuse.evaluate.suite import adherence, load_golden  # noqa: E402
from vidiffuse.pipeline import VideoPipeline  # noqa: E402

TEACHER = Path(__file__).resolve().parents[1] / "src" / "vidiffuse" / "weights" / "shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", type=Path, help="the student's safetensors parts (default: the bundled student)")
    parser.add_argument("--teacher", action="store_true", help="score the teacher at its defaults instead")
    parser.add_argument("--autoencoder", action="store_true", help="decode with the autoencoder, not the TinyDecoder")
    parser.add_argument("--seed-offset", type=int, default=0, help="the same prompts on other noise")
    parser.add_argument("--out", type=Path, help="where to write each video's hits (JSON)")
    args = parser.parse_args()

    items = load_golden(n=256)
    pipe = VideoPipeline.from_pretrained(TEACHER)
    settings = {}
    if not args.teacher:
        student, decoder, settings, _ = distill.distilled_parts_for(pipe, None)
        if args.parts:
            state = {}
            for part in args.parts:
                state.update(load_file(part))
            student.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        pipe.transformer, pipe.decoder = student, None if args.autoencoder else decoder
    videos = pipe([i.prompt for i in items], seed=[i.seed + args.seed_offset for i in items], watermark=False,
                  **settings).frames
    scores, hits = adherence(videos, [i.attributes for i in items])
    print({a: round(100 * scores[f"adherence_{a}"], 1) for a in shapes.ATTRIBUTES})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"scores": scores, "hits": hits}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
