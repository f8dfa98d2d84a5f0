"""VideoDiT's eager forward at another commit against the working tree's: the same weights, whole videos.

    .venv/bin/python benchmarks/eager_forward.py --against 97aabfb

Loads `src/vidiffuse/models/transformer.py` as it was at `--against` (git show) beside the current one, gives
both the bundled model's weights, and times whole videos (prompt to uint8 frames) in fp32 and with the
denoiser's linear layers int8-dynamic, interleaved batch by batch over the first `--n` golden prompts so
that a shared machine's drift lands on both alike. Reports the median seconds per video, the speed-up and the
mean pixel difference between the two codes' videos (0 means the same frames). Writes
benchmarks/results/eager_forward/eager_forward.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from vidiffuse.compress.bench import _pixel_mae, _precision
from vidiffuse.compress.quantize import quantize
from vidiffuse.evaluate.suite import load_golden
from vidiffuse.files import write_atomic
from vidiffuse.pipeline import VideoPipeline

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "results" / "eager_forward"
MODULE = "src/vidiffuse/models/transformer.py"


def transformer_module_at(commit: str, scratch: Path):
    try:
        source = subprocess.run(["git", "show", f"{commit}:{MODULE}"], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: cannot read {MODULE} at {commit!r}: {e.stderr.strip()}")
    path = scratch / f"transformer_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipeline(model: str, code, int8: bool) -> VideoPipeline:
    pipe = VideoPipeline.from_pretrained(model)
    if code is not None:
        other = code.VideoDiT.from_config(pipe.transformer.config)
        other.load_state_dict(pipe.transformer.state_dict())
        pipe.transformer = other.eval()
    if int8:
        quantize(pipe.transformer, "int8-dynamic")  # the denoiser alone, so that only its code differs
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="the commit whose VideoDiT code is the baseline")
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = transformer_module_at(args.against, Path(scratch))
        pipes = {(code, mode): pipeline(args.model, baseline if code == args.against else None, mode == "int8")
                 for code in (args.against, "working tree") for mode in ("fp32", "int8")}
    items = load_golden(n=args.n)
    seconds = {key: [] for key in pipes}
    frames = {key: [] for key in pipes}
    batches = range(0, len(items), args.batch_size)
    with _precision("fp32"), tqdm(total=len(batches) * len(pipes), desc="eager forward", unit="batch") as bar:
        for start in batches:
            chunk = items[start : start + args.batch_size]
            for key, pipe in pipes.items():
                began = time.perf_counter()
                out = pipe([i.prompt for i in chunk], seed=[i.seed for i in chunk], progress=False, watermark=False)
                seconds[key].append((time.perf_counter() - began) / len(chunk))
                frames[key] += out.frames
                bar.update()
    rows = []
    for mode in ("fp32", "int8"):
        before, after = (statistics.median(seconds[(code, mode)][1:]) for code in (args.against, "working tree"))
        mae = _pixel_mae(frames[("working tree", mode)], frames[(args.against, mode)])
        rows.append({"mode": mode, "before_s": before, "after_s": after, "speedup": before / after, "pixel_mae": mae})
    report = {"against": args.against, "model": args.model, "prompts": len(items), "batch_size": args.batch_size,
              "timing": "median s/video over all batches but the first (warm-up), interleaved batch by batch", "rows": rows}
    lines = [f"# VideoDiT eager forward: {args.against} against the working tree", "",
             f"{len(items)} golden prompts, batch {args.batch_size}, the model's default sampling, {report['timing']}; "
             "pixel MAE between the two codes' videos in uint8 levels.", "",
             f"| mode | {args.against} s/video | working tree s/video | speed-up | pixel MAE |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['speedup']:.2f}x | {r['pixel_mae']:.3f} |"
              for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "eager_forward.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "eager_forward.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
