"""Image-to-video on the shapes world: does a video start from the frame it was given, and do what its prompt says?

Each example is a held-out clip of the world: its first frame is the image, a caption of its attributes is the
prompt. The analyzer reads the generated video's attributes from its pixels. *Start error* is how far (pixels)
the object's path starts from where the image shows it: a straight line is fitted to the object's positions in
frames 1 to T-1 and read at frame 0, so a video that copies the image into frame 0 and then jumps elsewhere
scores as badly as one that ignores the image (a text-to-video model draws the object anywhere). The
first frame is also compared with the image (PSNR).
"""

from __future__ import annotations

import numpy as np

from ..data import shapes
from ..monitor.canary import psnr

HELD_OUT_SEED = 7_000_000  # generate_example seeds; training clips are seeded as [seed, i, 0x5EED], a different stream


def examples(n: int, seed: int = HELD_OUT_SEED, unsaid: tuple[str, ...] = ()) -> list[dict]:
    """`n` (image, prompt, truth) examples; attributes in `unsaid` are left out of the prompt (the image shows them)."""
    out = []
    for i in range(n):
        spec, frames, _ = shapes.generate_example(seed + i)
        attrs = spec.attributes()
        prompt = shapes.make_caption({a: None if a in unsaid else v for a, v in attrs.items()},
                                     np.random.default_rng([seed, i, 0xCA9]))
        out.append({"image": frames[0], "prompt": prompt, "truth": attrs, "start": shapes.locate_object(frames[0])})
    return out


def score_videos(videos: list[np.ndarray], items: list[dict]) -> dict:
    """Per-attribute accuracy, first-frame PSNR and start-position error of generated `videos` for `items`."""
    rows = []
    for video, item in zip(videos, items):
        reading = shapes.analyze_video(video)
        start = path_start(video)
        error = (float(np.hypot(start[0] - item["start"][0], start[1] - item["start"][1]))
                 if start is not None and item["start"] is not None else float("nan"))
        rows.append({**{f"acc_{a}": float(reading[a] == item["truth"][a]) for a in shapes.ATTRIBUTES},
                     "first_frame_psnr": psnr(video[0], item["image"]), "start_error_px": error})
    overall = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    errors = np.array([r["start_error_px"] for r in rows])  # NaN: no path found, counted as a miss below
    overall["start_error_px"] = float(np.nanmedian(errors))
    overall["start_within_3px"] = float(np.mean(errors < 3))  # the object's width is 12 or 24 px
    overall["start_found"] = float(np.mean(~np.isnan(errors)))
    return {"overall": overall, "per_example": rows}


def path_start(video: np.ndarray) -> tuple[float, float] | None:
    """Where the object's straight-line path through frames 1..T-1 is at frame 0; None if it is found in fewer
    than half of them."""
    found = [(k, p) for k in range(1, len(video)) if (p := shapes.locate_object(video[k])) is not None]
    if len(found) < max(3, (len(video) - 1) // 2):
        return None
    t = np.array([k for k, _ in found], dtype=np.float64)
    return tuple(float(np.polyval(np.polyfit(t, [p[axis] for _, p in found], 1), 0)) for axis in (0, 1))


def score_image_to_video(pipe, n: int, seed: int = 0, batch_size: int = 8, with_image: bool = True,
                         unsaid: tuple[str, ...] = ()) -> dict:
    """Generate `n` held-out examples with `pipe` (the first frames as images, unless `with_image` is False)
    and score them."""
    items = examples(n, unsaid=unsaid)
    out = pipe([it["prompt"] for it in items], seed=[seed + i for i in range(n)], batch_size=batch_size,
               image=[it["image"] for it in items] if with_image else None, progress=False, watermark=False)
    return score_videos(out.frames, items)
