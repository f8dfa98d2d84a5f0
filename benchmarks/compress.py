"""Compression benchmark: every speed-up variant against the plain diffusers loop, on the bundled model.

    .venv/bin/python benchmarks/compress.py     # the committed results: all 256 golden prompts, 1 timed pass, ~20 min

The same as `vidiffuse bench` with the settings the committed results were made with; run it on a quiet
machine (timings on a shared CPU wander by tens of percent). Writes benchmarks/results/compress/bench.json,
bench.md and bench.png. All 256 prompts because the targets compare attributes within 2-3 points: at 128
prompts one attribute's paired 95% interval is about ±6 points, at 256 about ±4.
The compiled variants are left out of the default list: each compiles for a minute per batch shape
(`--variants compile,int8+compile` adds them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vidiffuse.compress.bench import format_summary, run_bench

OUT = Path(__file__).parent / "results" / "compress"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--variants", default="fp32,bf16,int8,cache,pruned,distilled,distilled+int8")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed-offset", type=int, default=0, help="the same prompts on other noise")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    # sampling settings stay the model's defaults (UniPC, 20 steps, guidance 4 for the bundled model)
    report = run_bench(args.model, args.variants, n_prompts=args.n, batch_size=args.batch_size, repeats=args.repeats,
                       out_dir=args.out, seed_offset=args.seed_offset)
    print(format_summary(report))
    print(f"wrote {args.out}/bench.json, bench.md and bench.png")


if __name__ == "__main__":
    main()
