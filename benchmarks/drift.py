"""Drift benchmark: how often does the drift report cry wolf, and how much of a shift does it catch?

    .venv/bin/python benchmarks/drift.py                       # the committed results

Builds pools of observations exactly as the worker records them (`prompt_features`, `video_features`) from
real shapes-world clips and their captions, then resamples windows: a reference of --reference
observations and a current window of --window, both from the same pool (no drift: the false-alarm rate),
or with a share of the current window replaced by shifted observations (detection power). Shifts:

- white_background: clips that all have a white background, captioned as usual (content shift)
- off_world_prompts: prompts about anything but the shapes world, with ordinary clips (prompt shift)
- frozen: the clip's first frame held for all frames (a model that stopped moving)
- noisy: Gaussian pixel noise, std 8 grey levels (a model whose output got grainy)

Writes benchmarks/results/drift.json, drift.md and drift.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidiffuse.data import shapes
from vidiffuse.monitor import compare_windows, prompt_features, video_features
from vidiffuse.monitor.store import Observations
from vidiffuse.pipeline import VideoPipeline

OUT = Path(__file__).parent / "results"
SHIFTS = ("white_background", "off_world_prompts", "frozen", "noisy")


def off_world_prompts(n: int) -> list[str]:
    subjects = ["a cat", "a golden retriever", "two horses", "a parrot", "an old man", "a child", "a sports car",
                "a sailing boat", "a robot", "a chef"]
    actions = ["playing the piano", "eating pasta", "reading a newspaper", "riding a bicycle", "dancing in the rain",
               "walking slowly"]
    places = ["in a kitchen", "on the moon", "at the beach", "in a forest", "in Times Square at night"]
    prompts = [f"{s} {a} {p}" for s in subjects for a in actions for p in places]
    return [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))[:n]]


def observations(pipe, prompts: list[str], videos: list[np.ndarray], batch: int = 32) -> Observations:
    """What `observe_generations` would store, without the database."""
    parts = []
    for i in tqdm(range(0, len(prompts), batch), desc="features", leave=False):
        p, v = prompts[i:i + batch], videos[i:i + batch]
        text, scores, threshold = prompt_features(pipe, p)
        emb, readings, temporal = video_features(v)
        parts.append(Observations(
            ids=np.arange(i, i + len(p)), model_versions=["bench"] * len(p), prompt_embeddings=text.astype(np.float16)
            .astype(np.float32), ood_scores=scores, ood=(scores > threshold).astype(np.float64),
            output_embeddings=emb.astype(np.float16).astype(np.float32),
            attributes={a: [r[a] for r in readings] for a in readings[0]},
            temporal={k: np.array([t[k] for t in temporal]) for k in temporal[0]}))
    return Observations.concat(parts)


def clips(seeds, **attributes) -> tuple[list[np.ndarray], list[str]]:
    videos, captions = [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 99])
        spec = shapes.sample_clip_spec(rng, attributes=attributes)
        videos.append(shapes.render_clip(spec))
        captions.append(shapes.sample_caption(spec, rng))
    return videos, captions


def build_pools(pipe, n_base: int, n_shift: int) -> dict[str, Observations]:
    videos, captions = clips(range(n_base))
    pools = {"base": observations(pipe, captions, videos)}
    white, white_captions = clips(range(10**6, 10**6 + n_shift), background="white")
    pools["white_background"] = observations(pipe, white_captions, white)
    extra, _ = clips(range(2 * 10**6, 2 * 10**6 + n_shift))
    pools["off_world_prompts"] = observations(pipe, off_world_prompts(n_shift), extra)
    frozen = [np.repeat(v[:1], len(v), axis=0) for v in videos[:n_shift]]
    pools["frozen"] = observations(pipe, captions[:n_shift], frozen)
    rng = np.random.default_rng(1)
    noisy = [np.clip(v + rng.normal(0, 8, v.shape), 0, 255).astype(np.uint8) for v in videos[:n_shift]]
    pools["noisy"] = observations(pipe, captions[:n_shift], noisy)
    return pools


def trial(pools: dict[str, Observations], shift: str | None, share: float, n_ref: int, n_cur: int, alpha: float,
          rng: np.random.Generator) -> dict:
    base = pools["base"]
    order = rng.permutation(len(base))
    ref = base.select(order[:n_ref])
    k = round(share * n_cur) if shift else 0
    cur_parts = [base.select(order[n_ref:n_ref + n_cur - k])]
    if k:
        # frozen and noisy pools are made from the first base clips: never mix a clip with its own shifted copy
        pool = pools[shift]
        cur_parts.append(pool.select(rng.choice(len(pool), size=k, replace=False)))
    cur = Observations.concat(cur_parts)
    return compare_windows(ref, cur, alpha=alpha)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=int, default=200)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--base", type=int, default=800, help="observations in the unshifted pool")
    ap.add_argument("--shifted", type=int, default=200, help="observations in each shifted pool")
    ap.add_argument("--null-trials", type=int, default=300)
    ap.add_argument("--trials", type=int, default=40, help="trials per shift and share")
    ap.add_argument("--shares", default="0.1,0.2,0.3,0.5,1.0")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    shares = [float(s) for s in args.shares.split(",")]
    start = time.perf_counter()
    pipe = VideoPipeline.from_pretrained()
    pools = build_pools(pipe, args.base, args.shifted)
    # the frozen and noisy pools are copies of the first `shifted` base clips: keep those out of the windows
    pools["base"] = pools["base"].select(np.arange(args.shifted, args.base))
    feature_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)

    null = [trial(pools, None, 0.0, args.reference, args.window, args.alpha, rng)
            for _ in tqdm(range(args.null_trials), desc="no drift")]
    signals = list(null[0]["signals"])
    results = {"null": {"trials": args.null_trials,
                        "false_alarm_rate": float(np.mean([bool(r["drifted"]) for r in null])),
                        "per_signal": {s: float(np.mean([s in r["drifted"] for r in null])) for s in signals}},
               "shifts": {}}
    for shift in SHIFTS:
        rows = []
        for share in shares:
            runs = [trial(pools, shift, share, args.reference, args.window, args.alpha, rng)
                    for _ in tqdm(range(args.trials), desc=f"{shift} {share:.0%}", leave=False)]
            rows.append({"share": share, "power": float(np.mean([bool(r["drifted"]) for r in runs])),
                         "per_signal": {s: float(np.mean([s in r["drifted"] for r in runs])) for s in signals}})
        results["shifts"][shift] = rows
        print(shift, [(r["share"], r["power"]) for r in rows])
    results["settings"] = {**{k: v for k, v in vars(args).items() if k != "out"}, "signals": signals}
    results["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}
    results["seconds"] = {"features": round(feature_seconds, 1), "total": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "drift.md").write_text(markdown(results, shares))
    plot(results, args.out / "drift.png")
    print(f"false alarms {results['null']['false_alarm_rate']:.3f}; wrote {args.out}/drift.json, drift.md, drift.png")


def top_signals(row: dict, n: int = 3) -> str:
    best = sorted(row["per_signal"].items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{s} {p:.0%}" for s, p in best if p > 0) or "none"


def markdown(results: dict, shares: list[float]) -> str:
    s = results["settings"]
    null = results["null"]
    lines = [
        "# Drift detection: false alarms and power",
        "",
        (f"Reference window {s['reference']}, current window {s['window']}, alpha {s['alpha']} (Holm over "
         f"{len(s['signals'])} signals). Observations are real shapes-world clips and their captions, through the "
         f"worker's own feature code; windows are resampled from pools of {s['base'] - s['shifted']} unshifted "
         f"and {s['shifted']} shifted observations. Made by `benchmarks/drift.py`."),
        "",
        (f"**No drift** ({null['trials']} trials): a report flagged drift in **{null['false_alarm_rate']:.1%}** "
         f"of them (the design bound is {s['alpha']:.0%})."),
        "",
        ("**Shift**: share of the current window replaced by shifted observations; cells give the share of "
         f"{s['trials']} trials flagged."),
        "",
        "| shift | " + " | ".join(f"{x:.0%}" for x in shares) + " | signals that fire at 100% |",
        "|---|" + "---|" * len(shares) + "---|",
    ]
    for shift, rows in results["shifts"].items():
        lines.append(f"| {shift} | " + " | ".join(f"{r['power']:.0%}" for r in rows) + f" | {top_signals(rows[-1])} |")
    lines += ["", "Per-signal false-alarm rate under no drift: " +
              ", ".join(f"{k} {v:.1%}" for k, v in null["per_signal"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for shift, rows in results["shifts"].items():
        ax.plot([r["share"] for r in rows], [r["power"] for r in rows], marker="o", label=shift)
    ax.axhline(results["null"]["false_alarm_rate"], color="gray", ls="--", label="false alarms (no drift)")
    ax.set_xlabel("share of the current window shifted")
    ax.set_ylabel("share of reports that flag drift")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Drift detection, windows {results['settings']['reference']}/{results['settings']['window']}, "
                 f"alpha {results['settings']['alpha']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
