"""Generating to files: one prompt to one MP4, or a JSONL of prompts to a folder of MP4s."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .compress.cache import maybe_step_cache
from .errors import ConfigError, VideoWriteError
from .files import write_atomic
from .pipeline import VideoPipeline
from .provenance.manifest import prompt_sha256, sign_video
from .video.io import write_video

logger = logging.getLogger(__name__)


def check_writable(directory: Path) -> None:
    """Fail before spending minutes on generation, not after."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".vidiffuse-probe-"):
            pass
    except OSError as e:
        raise VideoWriteError(f"cannot write to {directory}: {e.strerror or e}") from None


def check_prompts(pipe: VideoPipeline, prompts: list[str], labels: list[str]) -> list[float | None]:
    """Warn about each prompt far from the model's training captions; their OOD scores (None: no reference).

    Generation goes ahead regardless: a warning says what to expect, the user decides what to do.
    """
    checks = pipe.prompt_ood(prompts)
    if checks is None:
        return [None] * len(prompts)
    for label, check in zip(labels, checks):
        if check["ood"]:
            logger.warning("%s looks out of distribution for model %r (score %.2f > %.2f): expect lower quality",
                        label, pipe.name, check["score"], check["threshold"])
    return [check["score"] for check in checks]


def provenance_record(pipe: VideoPipeline, record: dict) -> dict:
    """What the signed manifest says about one generation: never the prompt, only its hash."""
    settings = {k: record[k] for k in ("seed", "steps", "guidance", "sampler", "frames", "step_cache_threshold",
                                       "image_sha256") if k in record}
    return {"model": {"name": pipe.name, "version": pipe.version},
            "settings": {**settings, "fps": pipe.fps, "size": pipe.size},
            "prompt_sha256": prompt_sha256(record["prompt"]),
            "training_data_manifest_sha256": pipe.index.get("training_data_manifest_sha256"),
            "watermark": record["watermark"]}


def write_generated(pipe: VideoPipeline, path: Path, frames, record: dict) -> None:
    """The MP4 with its signed C2PA manifest; `path` appears only once both are complete."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.unsigned.mp4")
    try:
        write_video(staging, frames, fps=pipe.fps)
        sign_video(staging, provenance_record(pipe, record), title=path.name)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def generate_file(pipe: VideoPipeline, prompt: str, out: Path, watermark: bool = True,
                  cache_threshold: float | None = None, **settings) -> dict:
    """`cache_threshold`: First Block Cache on the denoiser (see `compress.cache`); None: off."""
    out = Path(out)
    check_writable(out.parent)
    check_prompts(pipe, [prompt], ["the prompt"])
    with maybe_step_cache(pipe.transformer, cache_threshold) as cache:
        result = pipe(prompt, watermark=watermark, **settings)
    if cache_threshold is not None:  # cached output differs from uncached: the manifest says which it is
        result.settings[0]["step_cache_threshold"] = cache_threshold
    write_generated(pipe, out, result.frames[0], result.settings[0])
    return {**result.settings[0], "file": str(out), **({"step_cache": cache.as_dict()} if cache else {})}


def read_prompts(path: Path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ConfigError(f'{path}:{n}: each line must be an object with a "prompt" string')
        if "seed" in item and not isinstance(item["seed"], int):
            raise ConfigError(f"{path}:{n}: seed must be an integer")
        if "image" in item:  # image-to-video: a first frame for this line, relative to the prompts file
            if not isinstance(item["image"], str) or not item["image"]:
                raise ConfigError(f'{path}:{n}: "image" must be a file path')
            item["image"] = str(path.parent / item["image"])
        items.append(item)
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def generate_batch(pipe: VideoPipeline | str, prompts_file: Path, out_dir: Path, seed: int = 0, batch_size: int = 8,
                   watermark: bool = True, cache_threshold: float | None = None, **settings) -> Path:
    """Videos 0000.mp4, 0001.mp4, ... in line order, plus generated.jsonl with each one's settings and
    `ood_score` (how far its prompt lies from the training captions; null when the model has no reference).

    `pipe` may be a model name or directory, loaded only once the prompts file has been checked.
    """
    items = read_prompts(prompts_file)
    out_dir = Path(out_dir)
    check_writable(out_dir)
    if not isinstance(pipe, VideoPipeline):
        pipe = VideoPipeline.from_pretrained(pipe)
    prompts = [item["prompt"] for item in items]
    seeds = [int(item.get("seed", seed + i)) for i, item in enumerate(items)]
    names = [f"{i:04d}.mp4" for i in range(len(items))]
    scores = check_prompts(pipe, prompts, [f"prompt {i + 1} ({name})" for i, name in enumerate(names)])
    if any("image" in item for item in items):
        if settings.get("image") is not None:
            raise ConfigError(f"{prompts_file} names images per line: give them there or with --image, not both")
        settings["image"] = [item.get("image") for item in items]
    with maybe_step_cache(pipe.transformer, cache_threshold) as cache:
        result = pipe(prompts, seed=seeds, batch_size=batch_size, watermark=watermark, **settings)
    cache_record = {"step_cache": cache.as_dict()} if cache else {}  # totals over the whole file
    if cache_threshold is not None:
        for record in result.settings:
            record["step_cache_threshold"] = cache_threshold
    records = []
    for name, frames, record, score in zip(names, result.frames, result.settings, scores):
        write_generated(pipe, out_dir / name, frames, record)
        records.append({**record, "file": name, "ood_score": score, **cache_record})
    log = write_atomic(out_dir / "generated.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return log
