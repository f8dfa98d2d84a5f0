"""Shrink a training checkpoint to bf16 so it can be committed and resumed in a later sitting.

    .venv/bin/python scripts/compact_checkpoint.py runs/shapes-dit/checkpoint checkpoints/shapes-dit

`vidiffuse train --resume` loads it unchanged: the optimizer and the modules cast the tensors back to
their fp32 parameters. The continuation is then not bit-exact (one bf16 rounding of weights and Adam
moments) but follows the same run; a checkpoint written by the trainer itself resumes exactly.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidiffuse.files import atomic_directory


def main(src: Path, dst: Path) -> None:
    with atomic_directory(dst) as tmp:
        for name in ("model", "ema", "optimizer"):
            tensors = load_file(src / f"{name}.safetensors")
            save_file({k: v.to(torch.bfloat16) if v.is_floating_point() and v.ndim else v for k, v in tensors.items()},
                      tmp / f"{name}.safetensors")
        shutil.copy(src / "state.json", tmp / "state.json")
    print(f"{src} -> {dst}: {sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.0f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
