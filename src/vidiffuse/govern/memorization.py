"""Memorization check: does a model reproduce its training clips?

For each generated video, the ``k`` nearest training clips by pixel-space cosine similarity
(:func:`vidiffuse.data.fingerprint.similarity`, in the manner of Carlini et al. 2023, "Extracting Training
Data from Diffusion Models", and Somepalli et al. 2023, "Diffusion Art or Digital Forgery?"): a generation
whose nearest training clip is at or above the threshold is flagged as a copy.

**The threshold (0.99)** was calibrated on the shapes world with :func:`calibrate_threshold` against the
bundled model's training set (20,000 clips, seed 1); the numbers are in :data:`CALIBRATION` and
``benchmarks/results/memorization_calibration.json`` (``scripts/calibrate_memorization.py``):

- copies of training clips re-encoded at H.264 CRF 18 / 28 / 35, brightness +20 at CRF 28, or upscaled
  1.5x at CRF 28 score at least 0.9966 / 0.9958 / 0.9875 / 0.9948 / 0.9970, and their nearest training clip
  is always their source; at 0.99, 98% of the CRF 35 copies and 100% of the others are flagged;
- 1,000 independently generated clips score a median 0.924 against their nearest training clip (p95 0.989,
  p99 0.9958, max 0.9986): the shapes world is small (540 attribute combinations), so 4.4% of fresh clips
  land within about a pixel of some training clip and are flagged although nothing was copied. Compare a
  shapes model's flag rate with that 4.4%, not with zero (a higher threshold trades it for missed copies:
  0.995 flags 1.4% of fresh clips but misses 24% of the CRF 35 copies). On real footage independent clips
  are far apart and the base rate is near zero.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vidiffuse.data.fingerprint import (
    SIMILARITY_THRESHOLD, Fingerprints, fingerprint_arrays, fingerprint_dir, hash_distance, nearest,
)
from vidiffuse.errors import ConfigError
from vidiffuse.files import write_atomic

__all__ = ["CALIBRATION", "METRIC", "calibrate_threshold", "check_memorization", "memorization_report",
           "report_markdown", "shapes_world_fingerprints"]

METRIC = "pixel_cosine_similarity"
METRIC_DEFINITION = ("cosine similarity of 8 frames sampled evenly over each clip, scaled to 16x16 RGB, flattened "
                     "and mean-subtracted (1 = identical pixels up to brightness and contrast)")

# Measured by scripts/calibrate_memorization.py (calibrate_threshold(n_train=20000, n_independent=1000,
# n_copies=200)); the full output is benchmarks/results/memorization_calibration.json.
CALIBRATION = {
    "world": "shapes", "n_train": 20000, "n_independent": 1000, "n_copies_per_kind": 200,
    "independent_nearest_similarity": {"median": 0.9237, "p95": 0.989, "p99": 0.9958, "max": 0.9986},
    "copy_min_similarity": {"reencode_crf18": 0.9966, "reencode_crf28": 0.9958, "reencode_crf35": 0.9875,
                            "brightness+20_crf28": 0.9948, "upscale1.5x_crf28": 0.997},
    "at_threshold_0.99": {"independent_flag_rate": 0.044, "copies_detected": {"reencode_crf35": 0.98, "others": 1.0}},
    "source": "scripts/calibrate_memorization.py -> benchmarks/results/memorization_calibration.json",
}


def memorization_report(generated: Fingerprints, training: Fingerprints, threshold: float = SIMILARITY_THRESHOLD,
                        k: int = 3) -> dict:
    """Nearest training clips of every generated clip, and the generations flagged as copies."""
    if not len(training):
        raise ConfigError("no readable training clips to compare with")
    if not len(generated):
        raise ConfigError("no readable generated videos to check")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    idx, sim = nearest(generated.embeddings, training.embeddings, k)
    rows, flagged = [], []
    for g, (js, ss) in enumerate(zip(idx, sim)):
        neighbours = [{"training": training.names[j], "similarity": round(float(s), 6),
                       "phash_distance": round(hash_distance(generated.hashes[g], training.hashes[j]), 4)}
                      for j, s in zip(js, ss)]
        rows.append({"generated": generated.names[g], "neighbours": neighbours})
        if ss[0] >= threshold:
            flagged.append({"generated": generated.names[g], **neighbours[0]})
    flagged.sort(key=lambda f: -f["similarity"])
    top = sim[:, 0]
    return {
        "metric": METRIC, "metric_definition": METRIC_DEFINITION, "threshold": threshold,
        "threshold_note": ("calibrated on the shapes world: 98-100% of re-encoded, brightness-shifted or rescaled "
                           "copies of training clips score above it; 4.4% of independently generated shapes-world "
                           "clips do too (the world is small), so that is a shapes model's base rate; see "
                           "`calibration`"),
        "calibration": CALIBRATION, "k": min(k, len(training)),
        "n_generated": len(generated), "n_training": len(training), "n_flagged": len(flagged),
        "flag_rate": len(flagged) / len(generated),
        "nearest_similarity": {"max": float(top.max()), "median": float(np.median(top)), "min": float(top.min())},
        "flagged": flagged, "nearest": rows,
        "errors": {"generated": [{"file": n, "error": r} for n, r in generated.errors],
                   "training": [{"file": n, "error": r} for n, r in training.errors]},
    }


def report_markdown(report: dict) -> str:
    """The report as a Markdown page: summary, flagged generations, every generation's nearest clip."""
    lines = [
        "# Memorization check", "",
        f"- Metric: `{report['metric']}` — {report['metric_definition']}",
        f"- Threshold: **{report['threshold']:g}** ({report['threshold_note']})",
        f"- Generated videos: {report['n_generated']}; training clips: {report['n_training']}",
        f"- **Flagged as copies: {report['n_flagged']}** ({report['flag_rate']:.1%})",
        f"- Nearest-neighbour similarity: max {report['nearest_similarity']['max']:.4f}, "
        f"median {report['nearest_similarity']['median']:.4f}, min {report['nearest_similarity']['min']:.4f}",
        "",
    ]
    if report["flagged"]:
        lines += ["## Flagged", "", "| generated | training clip | similarity | pHash distance |", "|---|---|---|---|"]
        lines += [f"| {f['generated']} | {f['training']} | {f['similarity']:.4f} | {f['phash_distance']:.3f} |"
                  for f in report["flagged"]]
        lines.append("")
    lines += ["## Nearest training clips", "", "| generated | nearest training clips (similarity) |", "|---|---|"]
    for row in report["nearest"]:
        cells = ", ".join(f"{n['training']} ({n['similarity']:.4f})" for n in row["neighbours"])
        lines.append(f"| {row['generated']} | {cells} |")
    errors = report["errors"]["generated"] + report["errors"]["training"]
    if errors:
        lines += ["", "## Unreadable files", ""] + [f"- {e['file']}: {e['error']}" for e in errors]
    return "\n".join(lines) + "\n"


def check_memorization(generated_dir: str | os.PathLike, train_dir: str | os.PathLike,
                       threshold: float = SIMILARITY_THRESHOLD, k: int = 3, out_dir: str | os.PathLike | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Fingerprint both folders, build the report and, with ``out_dir``, write memorization.json and .md."""
    generated_dir, train_dir = Path(generated_dir), Path(train_dir)
    for path, what in ((generated_dir, "generated videos folder"), (train_dir, "training folder")):
        if not path.is_dir():
            raise ConfigError(f"{what} not found: {path}" if not path.exists() else f"{what} is not a folder: {path}")
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    report = memorization_report(fingerprint_dir(generated_dir, progress), fingerprint_dir(train_dir, progress),
                                 threshold, k)
    report["generated_dir"], report["train_dir"] = str(generated_dir), str(train_dir)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "memorization.json", json.dumps(report, indent=2) + "\n")
        write_atomic(out / "memorization.md", report_markdown(report))
    return report


# ---------------------------------------------------------------- calibration


def _reencode(video: np.ndarray, crf: int, brightness: int = 0, scale: float = 1.0) -> np.ndarray:
    import av
    import cv2

    from vidiffuse.video.io import encode_video_bytes

    if brightness:
        video = np.clip(video.astype(np.int16) + brightness, 0, 255).astype(np.uint8)
    if scale != 1.0:
        side = round(video.shape[1] * scale / 2) * 2
        video = np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_LINEAR) for f in video])
    with av.open(io.BytesIO(encode_video_bytes(video, crf=crf))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def shapes_world_fingerprints(n: int, seed: int, keep=()) -> tuple[Fingerprints, dict[int, np.ndarray]]:
    """Fingerprints of the shapes-world training set ``(num_clips=n, seed)`` as the trainer draws it
    (clip ``i`` named ``"clip {i}"``), plus the pixels of the clips in ``keep``. Rendered in chunks:
    20,000 clips would take 4 GB as pixels."""
    from vidiffuse.data import shapes
    from vidiffuse.train.data import shapes_specs

    specs = [spec for spec, _ in shapes_specs({"num_clips": n, "seed": seed})]
    parts, kept = [], {}
    for start in range(0, n, 1000):
        clips = [shapes.render_clip(spec) for spec in specs[start:start + 1000]]
        kept.update({i: clips[i - start] for i in keep if start <= i < start + len(clips)})
        parts.append(fingerprint_arrays(clips))
    return Fingerprints([f"clip {i}" for i in range(n)], np.concatenate([p.embeddings for p in parts]),
                        np.concatenate([p.hashes for p in parts])), kept


COPY_KINDS = {
    "reencode_crf18": {"crf": 18},
    "reencode_crf28": {"crf": 28},
    "reencode_crf35": {"crf": 35},
    "brightness+20_crf28": {"crf": 28, "brightness": 20},
    "upscale1.5x_crf28": {"crf": 28, "scale": 1.5},
}


def calibrate_threshold(n_train: int = 20000, n_independent: int = 1000, n_copies: int = 200, train_seed: int = 1,
                        independent_seed: int = 10_001, thresholds=(0.98, 0.985, 0.99, 0.995),
                        progress: Callable[[str], None] | None = None) -> dict:
    """Nearest-neighbour similarity of fresh shapes-world clips vs. re-encoded copies of training clips.

    The training set is the shapes world as the trainer draws it (``train.data.shapes_specs``) with the
    bundled denoiser's seed; independent clips use another seed; copies are training clips put through
    :data:`COPY_KINDS`. Returns the distributions and, per candidate threshold, the share of independent
    clips flagged (false positives) and of copies flagged with the right source (detections).
    """
    say = progress or (lambda _m: None)

    picked = np.random.default_rng(0).choice(n_train, size=min(n_copies, n_train), replace=False)
    say(f"rendering and fingerprinting {n_train} training clips")
    train, sources = shapes_world_fingerprints(n_train, train_seed, keep=set(picked.tolist()))
    copies = {kind: fingerprint_arrays([_reencode(sources[i], **args) for i in picked.tolist()])
              for kind, args in COPY_KINDS.items()}
    say(f"fingerprinting {n_independent} independent clips")
    independent, _ = shapes_world_fingerprints(n_independent, independent_seed)

    def stats(sim: np.ndarray) -> dict:
        q = np.quantile(sim, [0.0, 0.01, 0.05, 0.5, 0.95, 0.99, 1.0])
        return dict(zip(("min", "p1", "p5", "median", "p95", "p99", "max"), map(float, q.round(6))))

    _, ind_sim = nearest(independent.embeddings, train.embeddings, 1)
    result = {"metric": METRIC, "metric_definition": METRIC_DEFINITION, "n_train": n_train, "train_seed": train_seed,
              "n_independent": n_independent, "independent_seed": independent_seed, "n_copies": len(picked),
              "independent_nearest_similarity": stats(ind_sim[:, 0]), "copies": {}, "by_threshold": {}}
    copy_hits = {}
    for kind, fp in copies.items():
        idx, sim = nearest(fp.embeddings, train.embeddings, 1)
        result["copies"][kind] = {**stats(sim[:, 0]), "nearest_is_source": float((idx[:, 0] == picked).mean())}
        copy_hits[kind] = (sim[:, 0], idx[:, 0] == picked)
    for t in thresholds:
        result["by_threshold"][str(t)] = {
            "independent_flag_rate": float((ind_sim[:, 0] >= t).mean()),
            **{f"{kind}_detected": float(((s >= t) & right).mean()) for kind, (s, right) in copy_hits.items()},
        }
    return result
