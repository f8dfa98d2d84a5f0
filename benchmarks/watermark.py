"""Watermark benchmark: does the mark survive each edit, does it stay silent on unmarked video, what does it cost?

    .venv/bin/python benchmarks/watermark.py --n 112

Generates N videos from the golden prompts with the bundled model, marks them exactly as the pipeline does
(so each video exists marked and unmarked), attacks the marked ones one edit at a time, and runs the detector on
every result, on the unmarked generations and on N real shapes-world clips.
Writes benchmarks/results/watermark.json, watermark.md and watermark.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidiffuse.data import shapes
from vidiffuse.evaluate.suite import load_golden
from vidiffuse.monitor.canary import psnr
from vidiffuse.pipeline import VideoPipeline
from vidiffuse.provenance import watermark as wm
from vidiffuse.provenance.attacks import ATTACKS

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    key = wm.watermark_key()

    items = load_golden(n=args.n)
    pipe = VideoPipeline.from_pretrained(args.model)
    t0 = time.perf_counter()
    out = pipe([it.prompt for it in items], seed=[it.seed for it in items], batch_size=args.batch_size,
               watermark=False, progress=True)
    generate_s = (time.perf_counter() - t0) / len(items)

    marked, payloads, embed_times = [], [], []
    for frames, record in zip(out.frames, out.settings):
        payload = pipe.watermark_payload(record)
        t0 = time.perf_counter()
        marked.append(wm.embed(frames, payload, key))
        embed_times.append(time.perf_counter() - t0)
        payloads.append(payload)
    backgrounds = [it.attributes["background"] for it in items]
    psnrs = [psnr(m, u) for m, u in zip(marked, out.frames)]

    per_attack = {}
    detect_times = []
    for name, attack in ATTACKS.items():
        rows = []
        for video, payload, bg in tqdm(list(zip(marked, payloads, backgrounds)), desc=name, leave=False):
            attacked = attack(video)
            t0 = time.perf_counter()
            d = wm.detect(attacked, key)
            detect_times.append(time.perf_counter() - t0)
            truth = wm.codeword(payload, key)
            bits = np.array(d.bits)
            rows.append({"background": bg, "bit_accuracy": float((bits == truth).mean()),
                         "payload_bit_accuracy": float((bits[: wm.PAYLOAD_BITS] == truth[: wm.PAYLOAD_BITS]).mean()),
                         "detected": d.detected, "correct_payload": d.payload == f"{payload:08x}", "p_value": d.p_value})
        per_attack[name] = summarize(rows)

    unmarked_sets = {"generated, marking off": list(out.frames),
                     "real shapes-world clips": [shapes.generate_example(900_000 + i)[1] for i in range(args.n)]}
    unmarked = {}
    for name, videos in unmarked_sets.items():
        ds = [wm.detect(v, key) for v in tqdm(videos, desc=name, leave=False)]
        unmarked[name] = {"n": len(ds), "false_positives": int(sum(d.detected for d in ds)),
                          "min_p_value": float(min(d.p_value for d in ds)),
                          "median_p_value": float(np.median([d.p_value for d in ds]))}

    result = {"model": args.model, "n": len(items), "threshold_p_value": wm.DETECTION_P_VALUE, "method": wm.METHOD,
              "target_psnr_db": wm.TARGET_PSNR_DB, "bits": {"payload": wm.PAYLOAD_BITS, "check": wm.CHECK_BITS},
              "psnr_db": {"mean": float(np.mean(psnrs)), "min": float(np.min(psnrs))},
              "seconds": {"generate_per_video": generate_s, "embed_per_video": float(np.mean(embed_times)),
                          "detect_per_video": float(np.mean(detect_times))},
              "embed_overhead": float(np.mean(embed_times) / generate_s),
              "attacks": per_attack, "unmarked": unmarked}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "watermark.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "watermark.md").write_text(markdown(result))
    plot(result, OUT / "watermark.png")
    print(markdown(result))


def summarize(rows: list[dict]) -> dict:
    def stats(rs):
        return {"n": len(rs), "bit_accuracy": float(np.mean([r["bit_accuracy"] for r in rs])),
                "payload_bit_accuracy": float(np.mean([r["payload_bit_accuracy"] for r in rs])),
                "detection_rate": float(np.mean([r["detected"] for r in rs])),
                "correct_payload_rate": float(np.mean([r["correct_payload"] for r in rs])),
                "median_p_value": float(np.median([r["p_value"] for r in rs]))}
    by_bg = {bg: stats([r for r in rows if r["background"] == bg]) for bg in sorted({r["background"] for r in rows})}
    return {**stats(rows), "by_background": by_bg}


def markdown(r: dict) -> str:
    lines = [f"# Watermark benchmark ({r['method']}, model {r['model']}, n = {r['n']} generated videos)", "",
             f"Detection threshold p ≤ {r['threshold_p_value']:g}; {r['bits']['payload']} payload bits + "
             f"{r['bits']['check']} check bits; strength chosen per video for PSNR {r['target_psnr_db']} dB.", "",
             f"- PSNR marked vs unmarked: mean {r['psnr_db']['mean']:.1f} dB, min {r['psnr_db']['min']:.1f} dB",
             f"- seconds per video: generation {r['seconds']['generate_per_video']:.3f}, embedding "
             f"{r['seconds']['embed_per_video'] * 1000:.1f} ms ({100 * r['embed_overhead']:.1f}% of generation), "
             f"detection {r['seconds']['detect_per_video'] * 1000:.1f} ms", "",
             "| attack | bit accuracy | payload bit accuracy | detected (p ≤ threshold) | correct payload | detected by background |",
             "|---|---|---|---|---|---|"]
    for name, a in r["attacks"].items():
        by_bg = ", ".join(f"{bg} {v['detection_rate']:.2f}" for bg, v in a["by_background"].items())
        lines.append(f"| {name} | {a['bit_accuracy']:.3f} | {a['payload_bit_accuracy']:.3f} | {a['detection_rate']:.3f} | "
                     f"{a['correct_payload_rate']:.3f} | {by_bg} |")
    lines += ["", "| unmarked set | n | false positives | smallest p-value | median p-value |", "|---|---|---|---|---|"]
    for name, u in r["unmarked"].items():
        lines.append(f"| {name} | {u['n']} | {u['false_positives']} | {u['min_p_value']:.2g} | {u['median_p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["attacks"])
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [r["attacks"][n]["bit_accuracy"] for n in names], 0.4, label="bit accuracy")
    ax.bar(x + 0.2, [r["attacks"][n]["detection_rate"] for n in names], 0.4, label=f"detected at p ≤ {r['threshold_p_value']:g}")
    ax.axhline(0.95, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Watermark robustness, {r['n']} generated videos; PSNR {r['psnr_db']['mean']:.1f} dB")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
