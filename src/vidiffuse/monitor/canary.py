"""The canary: regenerate a few golden prompts with fixed seeds and check they still come out the same.

Same seed, same settings, same machine → the same video (DESIGN.md §2), so any change in the output of
a fixed prompt and seed means something under the model changed: its weights in memory, a library's
numerics, a quantization or cache setting. Drift tests need hundreds of jobs to see a shift; the canary
sees one in a single run.

A reference file (safetensors) holds the golden videos as uint8 and their video-encoder embeddings; its
metadata names the model and version, the prompts, seeds and settings, and each video's SHA-256. A video
matches its reference when it is bit-identical, or when its PSNR is at least `psnr_threshold` dB AND
its embedding moved by at most `embedding_threshold` (relative L2 distance): float differences between
machines and batch sizes pass, a real change of the model fails (numbers at DEFAULT_PSNR_DB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelLoadError
from ..files import vidiffuse_home, write_atomic
from .store import MonitorStore

logger = logging.getLogger(__name__)

REFERENCE_FORMAT = "1"
# Measured on the bundled model (4 golden prompts, 20 UniPC steps, 2 CPU cores; per video): another thread
# count gives bit-identical videos, another batch size 89-96 dB (a few values off by one). Gaussian noise
# on one attention weight matrix (blocks.0.attn.kv), as a share of its std: 0.01% gives 80-91 dB, 0.1% 71-83 dB,
# 1% 57-72 dB, 10% 40-62 dB. 60 dB (RMS error 0.25 grey level) passes the float noise with ~30 dB to spare, and a run
# fails as soon as one video falls below it: here from ~1% noise on a single weight matrix. Differences
# between CPU models or GPUs were not measured (no second machine): make the reference on the machine
# that serves, or lower the threshold if a reference made on one machine is checked on another.
DEFAULT_PSNR_DB = 60.0
DEFAULT_EMBEDDING_DISTANCE = 0.02


def default_reference_path(pipe) -> Path:
    """`$VIDIFFUSE_HOME/monitor/canary/<model>@<version>.safetensors`: one reference per model version."""
    label = re.sub(r"[^A-Za-z0-9._@-]+", "_", f"{pipe.name}@{pipe.version}")
    return vidiffuse_home() / "monitor" / "canary" / f"{label}.safetensors"


def _sha256(video: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(video).tobytes()).hexdigest()


def _embed(videos) -> np.ndarray:
    from .observe import video_features

    return video_features(videos, temporal=())[0]


def _generate(pipe, prompts: list[str], seeds: list[int], settings: dict, batch_size: int) -> list[np.ndarray]:
    out = pipe(prompts, seed=seeds, steps=settings["steps"], guidance=settings["guidance"],
               sampler=settings["sampler"], frames=settings["frames"], batch_size=batch_size, progress=False)
    return [np.asarray(f) for f in out.frames]


def make_canary_reference(pipe, path: str | os.PathLike, n: int = 8, golden: str | None = None,
                          steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                          batch_size: int = 8) -> Path:
    """Generate `n` golden prompts (evenly spaced over the set, fixed seeds) and write the reference file.

    Settings default to the model's; the reference records them, and every canary run uses them.
    """
    from ..evaluate.suite import GOLDEN_SET, load_golden

    golden = golden or GOLDEN_SET
    items = load_golden(golden, n)
    settings = {"steps": int(pipe.defaults["steps"] if steps is None else steps),
                "guidance": float(pipe.defaults["guidance"] if guidance is None else guidance),
                "sampler": str(pipe.defaults["sampler"] if sampler is None else sampler),
                "frames": int(pipe.frames)}
    videos = _generate(pipe, [i.prompt for i in items], [i.seed for i in items], settings, batch_size)
    metadata = {
        "vidiffuse_canary": REFERENCE_FORMAT,
        "model_name": str(pipe.name),
        "model_version": str(pipe.version),
        "golden_set": golden,
        "items": json.dumps([{"id": i.id, "prompt": i.prompt, "seed": i.seed} for i in items]),
        "settings": json.dumps(settings, sort_keys=True),
        "batch_size": str(batch_size),
        "sha256": json.dumps([_sha256(v) for v in videos]),
        "created": str(time.time()),
    }
    from safetensors.numpy import save

    tensors = {"videos": np.stack(videos), "embeddings": _embed(videos)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, save(tensors, metadata=metadata))


def load_canary_reference(path: str | os.PathLike) -> dict:
    """The reference's metadata (parsed) with `videos` (n, T, H, W, 3) uint8 and `embeddings` (n, D)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            videos, embeddings = f.get_tensor("videos"), f.get_tensor("embeddings")
        if meta.get("vidiffuse_canary") != REFERENCE_FORMAT:
            raise KeyError("vidiffuse_canary")
        ref = {**meta, "items": json.loads(meta["items"]), "settings": json.loads(meta["settings"]),
               "sha256": json.loads(meta["sha256"]), "batch_size": int(meta["batch_size"]),
               "videos": videos, "embeddings": embeddings, "path": str(path)}
    except KeyError as e:
        raise ModelLoadError(f"{path} is not a vidiffuse canary reference (no {e.args[0]!r})") from None
    except Exception as e:  # safetensors raises its own types for corrupt files, OSError for missing ones
        raise ModelLoadError(f"cannot read the canary reference {path}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None
    if (videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3
            or not len(videos) == len(ref["items"]) == len(embeddings) == len(ref["sha256"])):
        raise ModelLoadError(f"the canary reference {path} is malformed: videos {videos.dtype} {videos.shape}")
    if [_sha256(v) for v in videos] != ref["sha256"]:
        raise ModelLoadError(f"the canary reference {path} is corrupt: its videos do not match their SHA-256")
    return ref


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos in dB; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _mismatch(pipe, ref: dict) -> str | None:
    want = (ref["model_name"], ref["model_version"])
    have = (str(pipe.name), str(pipe.version))
    if want != have:
        return (f"reference made for model {want[0]} version {want[1]}, this is {have[0]} version {have[1]}; "
                f"make a new reference (vidiffuse monitor canary-reference)")
    if ref["videos"].shape[1] != ref["settings"]["frames"] or list(ref["videos"].shape[2:4]) != _frame_size(pipe):
        return f"reference videos are {ref['videos'].shape[1:4]} (T, H, W), this model makes {_frame_size(pipe)}"
    return None


def _frame_size(pipe) -> list[int]:
    size = pipe.size
    return [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size), int(size)]


def run_canary(pipe, store: MonitorStore, reference: str | os.PathLike | None = None, n: int = 8,
               psnr_threshold: float = DEFAULT_PSNR_DB, embedding_threshold: float = DEFAULT_EMBEDDING_DISTANCE,
               **reference_settings) -> dict:
    """Regenerate the reference's golden prompts and compare; the result is stored and returned.

    `reference`: a file from `make_canary_reference`; default `default_reference_path(pipe)`. A missing
    file is created first (from `n` golden prompts and `reference_settings`: golden, steps, guidance,
    sampler, batch_size), then checked like any other, which tests that generation is repeatable. An
    existing reference decides the prompts, seeds and settings; `n` is then unused.

    Status: "passed", "failed" (a video does not match) or "reference mismatch" (the reference belongs
    to another model or version: nothing was compared, and `passed` is False).
    """
    started = time.time()
    path = Path(reference) if reference is not None else default_reference_path(pipe)
    created = False
    if not path.is_file():
        logger.warning("no canary reference at %s: creating it from model %s (%s)", path, pipe.name, pipe.version)
        make_canary_reference(pipe, path, n, **reference_settings)
        created = True
    ref = load_canary_reference(path)
    result = {"started": started, "model_name": str(pipe.name), "model_version": str(pipe.version),
              "reference": str(path), "reference_version": ref["model_version"], "reference_created": created,
              "n": len(ref["items"]),
              "thresholds": {"psnr_db": psnr_threshold, "embedding_distance": embedding_threshold},
              "worst_psnr_db": None, "all_exact": None, "max_embedding_distance": None, "videos": [], "reason": None}
    reason = _mismatch(pipe, ref)
    if reason is not None:
        result.update(status="reference mismatch", passed=False, reason=reason, finished=time.time())
        logger.error("canary: %s", reason)
        store.add_canary_run(result)
        return result
    items = ref["items"]
    try:
        videos = _generate(pipe, [i["prompt"] for i in items], [int(i["seed"]) for i in items], ref["settings"],
                           ref["batch_size"])
        embeddings = _embed(videos)
    except Exception as e:  # a canary that cannot run is a failed canary, on the dashboard too
        result.update(status="error", passed=False, reason=f"{type(e).__name__}: {e}", finished=time.time())
        store.add_canary_run(result)
        raise
    rows = []
    for k, (item, video) in enumerate(zip(items, videos)):
        expected = ref["videos"][k]
        if video.shape != expected.shape:
            raise ConfigError(f"canary video {k} is {video.shape}, its reference {expected.shape}")
        exact = bool(np.array_equal(video, expected))
        db = psnr(video, expected)
        e_ref = ref["embeddings"][k].astype(np.float64)
        distance = float(np.linalg.norm(embeddings[k] - e_ref) / max(np.linalg.norm(e_ref), 1e-12))
        match = exact or (db >= psnr_threshold and distance <= embedding_threshold)
        rows.append({"id": item["id"], "prompt": item["prompt"], "seed": item["seed"], "exact": bool(exact),
                     "psnr_db": None if exact else round(db, 3), "embedding_distance": distance, "match": bool(match)})
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    passed = all(r["match"] for r in rows)
    result.update(status="passed" if passed else "failed", passed=passed, videos=rows,
                  all_exact=all(r["exact"] for r in rows), worst_psnr_db=min(finite) if finite else None,
                  max_embedding_distance=max(r["embedding_distance"] for r in rows), finished=time.time())
    if not passed:
        bad = [r["id"] for r in rows if not r["match"]]
        result["reason"] = (f"golden videos {bad} no longer match the reference (worst PSNR "
                            f"{result['worst_psnr_db']} dB, max embedding distance "
                            f"{result['max_embedding_distance']:.4f})")
        logger.error("canary failed: %s", result["reason"])
    store.add_canary_run(result)
    return result


def canary_due(store: MonitorStore, interval_seconds: float) -> bool:
    """Whether the last canary run is older than `interval_seconds` (or there was none): for the worker's
    schedule, checked between jobs."""
    last = store.last_canary_run()
    return last is None or time.time() - float(last["finished"]) >= interval_seconds
