"""Image-to-video benchmark: does `shapes-i2v` start from the frame it is given and do what the prompt says?

    .venv/bin/python benchmarks/image_to_video.py --n 200

Held-out shapes-world clips (evaluate/image_to_video.py): the first frame is the image, a caption of the clip
is the prompt. Rows:
- image + full prompt: the prompt restates what the image shows and says how it moves;
- image + motion-only prompt: colour, shape, size and background unsaid, only the image shows them;
- no image, full prompt: the same model used as text-to-video;
- the bundled text-to-video `shapes` model on the full prompts: where a model that cannot see the image starts.
Writes benchmarks/results/image_to_video/{results.json, results.md, results.png, samples.png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vidiffuse.data import shapes
from vidiffuse.evaluate.image_to_video import examples, score_videos
from vidiffuse.pipeline import VideoPipeline

OUT = Path(__file__).parent / "results" / "image_to_video"
MOTION_ONLY = ("background", "color", "shape", "size")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes-i2v")
    ap.add_argument("--baseline", default="shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    full, motion = examples(args.n), examples(args.n, unsaid=MOTION_ONLY)
    seeds = list(range(args.n))

    def run(p, items, with_image):
        t0 = time.perf_counter()
        out = p([it["prompt"] for it in items], seed=seeds, batch_size=args.batch_size, progress=True,
                image=[it["image"] for it in items] if with_image else None)
        seconds = (time.perf_counter() - t0) / len(items)
        return out.frames, {**score_videos(out.frames, items)["overall"], "seconds_per_video": seconds}

    rows, samples = {}, None
    frames, rows["image + full prompt"] = run(pipe, full, True)
    samples = frames[:6]
    _, rows["image + motion-only prompt"] = run(pipe, motion, True)
    _, rows["no image, full prompt"] = run(pipe, full, False)
    _, rows[f"text-to-video `{args.baseline}`, full prompt"] = run(VideoPipeline.from_pretrained(args.baseline), full, False)
    result = {"model": args.model, "version": pipe.version, "baseline": args.baseline, "n": args.n,
              "sampling": {k: pipe.defaults[k] for k in ("steps", "guidance", "sampler")}, "rows": rows,
              "prompts_example": {"full": full[0]["prompt"], "motion_only": motion[0]["prompt"]}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "results.md").write_text(markdown(result))
    plot(result, OUT / "results.png")
    sample_sheet(full[:6], samples, OUT / "samples.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Image-to-video: `{r['model']}` ({r['version']}), {r['n']} held-out shapes-world clips", "",
             "Made by `benchmarks/image_to_video.py`. The image is each clip's first frame; sampling "
             f"{r['sampling']}. Example prompts: full \"{r['prompts_example']['full']}\", motion-only "
             f"\"{r['prompts_example']['motion_only']}\".", "",
             "Attributes are read from the pixels by the world's analyzer and compared with the clip's. *Start error*: "
             "median distance (pixels, 64×64 frames) between where the object's path through frames 1–15 starts and where the image shows it; "
             "*within 3 px*: the share of videos whose path starts that close (a miss, or no path found, counts against).", "",
             "| row | background | colour | shape | size | direction | first-frame PSNR (dB) | start error (px) | within 3 px | s/video |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m['acc_' + a]:.3f}" for a in shapes.ATTRIBUTES)
                     + f" | {m['first_frame_psnr']:.1f} | {m['start_error_px']:.1f} | {m['start_within_3px']:.2f} | {m['seconds_per_video']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["rows"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(shapes.ATTRIBUTES))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [r["rows"][name]["acc_" + a] for a in shapes.ATTRIBUTES],
               width, label=name.replace("`", ""))
    ax.set_xticks(x, shapes.ATTRIBUTES)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share read right from the pixels")
    ax.legend(fontsize=8, loc="lower left")
    ax2.bar(range(len(names)), [r["rows"][n]["start_error_px"] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax2.set_xticks(range(len(names)), [str(i + 1) for i in range(len(names))])
    ax2.set_ylabel("start error, median px")
    fig.suptitle(f"Image-to-video, {r['model']}, {r['n']} held-out clips")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sample_sheet(items: list[dict], videos: list[np.ndarray], path: Path) -> None:
    """Per row: the given image, then generated frames 0, 5, 10 and 15."""
    from PIL import Image

    rows = [np.concatenate([it["image"], np.full((it["image"].shape[0], 4, 3), 255, np.uint8)]
                           + [np.pad(v[k], ((0, 0), (0, 2), (0, 0)), constant_values=255) for k in (0, 5, 10, 15)], axis=1)
            for it, v in zip(items, videos)]
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, 0), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    main()
