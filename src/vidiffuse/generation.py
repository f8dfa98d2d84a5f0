"""Generating to files: one prompt to one MP4, or a JSONL of prompts to a folder of MP4s."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import ConfigError, VideoWriteError
from .pipeline import VideoPipeline
from .video.io import write_video


def check_writable(directory: Path) -> None:
    """Fail before spending minutes on generation, not after."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".vidiffuse-probe-"):
            pass
    except OSError as e:
        raise VideoWriteError(f"cannot write to {directory}: {e.strerror or e}") from None


def generate_file(pipe: VideoPipeline, prompt: str, out: Path, **settings) -> dict:
    out = Path(out)
    check_writable(out.parent)
    result = pipe(prompt, **settings)
    write_video(out, result.frames[0], fps=pipe.fps)
    return {**result.settings[0], "file": str(out)}


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
        items.append(item)
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def generate_batch(pipe: VideoPipeline | str, prompts_file: Path, out_dir: Path, seed: int = 0, batch_size: int = 8,
                   **settings) -> Path:
    """Videos 0000.mp4, 0001.mp4, ... in line order, plus generated.jsonl with each one's settings.

    `pipe` may be a model name or directory, loaded only once the prompts file has been checked.
    """
    items = read_prompts(prompts_file)
    out_dir = Path(out_dir)
    check_writable(out_dir)
    if not isinstance(pipe, VideoPipeline):
        pipe = VideoPipeline.from_pretrained(pipe)
    prompts = [item["prompt"] for item in items]
    seeds = [int(item.get("seed", seed + i)) for i, item in enumerate(items)]
    result = pipe(prompts, seed=seeds, batch_size=batch_size, **settings)
    records = []
    for i, (frames, record) in enumerate(zip(result.frames, result.settings)):
        name = f"{i:04d}.mp4"
        write_video(out_dir / name, frames, fps=pipe.fps)
        records.append({**record, "file": name})
    log = out_dir / "generated.jsonl"
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, log)
    return log
