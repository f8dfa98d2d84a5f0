"""A dataset of real footage: a folder of video files plus a captions file."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from vidiffuse.errors import ConfigError, VideoReadError
from vidiffuse.video.io import error_reason, probe_video, uint8_to_tensor

__all__ = ["VideoFolderDataset"]

log = logging.getLogger(__name__)

_READ_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError)


@dataclass(frozen=True)
class _Clip:
    path: Path
    caption: str
    duration: float | None  # seconds; None when the container does not say
    fps: float | None
    width: int
    height: int


def _load_captions(path: Path) -> list[tuple[str, str]]:
    """``(file, caption)`` pairs from a JSONL or CSV file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read captions file {path}: {e}") from e
    pairs = []
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(text.splitlines())
        if not {"file", "caption"} <= set(rows.fieldnames or ()):
            raise ConfigError(f"captions file {path}: CSV needs columns 'file,caption', got {rows.fieldnames}")
        for row in rows:
            pairs.append((row["file"], row["caption"] or ""))
        return pairs
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pairs.append((str(rec["file"]), str(rec.get("caption") or "")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"captions file {path}, line {n}: expected {{\"file\": ..., \"caption\": ...}}") from e
    return pairs


def _probe(path: Path, caption: str) -> _Clip:
    """Container headers only (no decoding) so construction stays cheap on large folders."""
    info = probe_video(path)
    return _Clip(path, caption, info["duration_s"], info["fps"], info["width"], info["height"])


class VideoFolderDataset(Dataset):
    """Random fixed-length clips from a folder of videos, resampled to ``fps`` and cropped to ``size``.

    Items are ``{"video": (C, frames, size, size) float in [-1, 1], "caption": str, "path": str}``.
    Missing or unreadable files are skipped and listed in :attr:`skipped` as ``(path, reason)``.
    """

    def __init__(self, root, captions=None, frames: int = 16, size: int = 64, fps: float = 8, seed: int = 0):
        if frames < 1 or size < 1 or fps <= 0:
            raise ConfigError(f"frames, size and fps must be positive, got {frames=}, {size=}, {fps=}")
        self.root = Path(root)
        self.frames, self.size, self.fps, self.seed = frames, size, float(fps), seed
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()

        if captions is None:
            found = [p for p in (self.root / "captions.jsonl", self.root / "captions.csv") if p.is_file()]
            if not found:
                raise ConfigError(f"no captions.jsonl or captions.csv in {self.root}")
            captions = found[0]
        captions = Path(captions)
        if not captions.is_absolute() and not captions.exists():
            captions = self.root / captions

        self.clips: list[_Clip] = []
        for rel, caption in _load_captions(captions):
            path = self.root / rel
            try:
                self.clips.append(_probe(path, caption))
            except (VideoReadError, *_READ_ERRORS) as e:
                self.skipped.append((str(path), error_reason(e)))
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d videos: %s",
                self.root,
                len(self.skipped),
                len(self.skipped) + len(self.clips),
                "; ".join(f"{p} ({r})" for p, r in self.skipped),
            )
        if not self.clips:
            raise ConfigError(f"no usable videos in {self.root} (listed in {captions})")

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Draw different clip start times each epoch, reproducibly."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        n = len(self.clips)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} videos")
        i %= n
        # A file can probe fine yet fail to decode; fall back to the next readable one so training continues.
        for j in (k % n for k in range(i, i + n)):
            if j in self._bad:
                continue
            clip = self.clips[j]
            try:
                video = self._read_clip(clip, np.random.default_rng([self.seed, j, self.epoch]))
            except (VideoReadError, *_READ_ERRORS) as e:
                self._bad.add(j)
                self.skipped.append((str(clip.path), error_reason(e)))
                log.warning("%s: unreadable, skipping: %s", clip.path, error_reason(e))
                continue
            return {"video": video, "caption": clip.caption, "path": str(clip.path)}
        raise VideoReadError(f"cannot read video {self.root}: none of the {n} videos is readable")

    def _read_clip(self, clip: _Clip, rng: np.random.Generator) -> torch.Tensor:
        span = self.frames / self.fps
        latest = max(0.0, (clip.duration or 0.0) - span)
        start = float(rng.uniform(0.0, latest)) if latest > 0 else 0.0
        targets = start + np.arange(self.frames) / self.fps

        out: list[np.ndarray] = []
        prev_t = prev_frame = prev_img = None  # last frame seen; converted only if picked
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if start > 0:
                # Seeking lands on the keyframe at or before the target; decoding forward from there is exact.
                container.seek(int((start + origin) / stream.time_base), stream=stream, backward=True)
            src_dt = 1.0 / clip.fps if clip.fps else 0.0
            for k, frame in enumerate(container.decode(stream)):
                t = frame.time - origin if frame.time is not None else start + k * src_dt
                if t < start - src_dt:
                    continue
                # Timestamps rise, so the nearest frame to a target is the first one at or past it, or the one before.
                img = None
                while len(out) < self.frames and t >= (target := targets[len(out)]):
                    if prev_frame is not None and target - prev_t < t - target:
                        prev_img = prev_img if prev_img is not None else self._to_image(prev_frame)
                        out.append(prev_img)
                    else:
                        img = img if img is not None else self._to_image(frame)
                        out.append(img)
                if len(out) == self.frames:
                    break
                prev_t, prev_frame, prev_img = t, frame, img
        if len(out) < self.frames:
            if prev_frame is None:
                raise VideoReadError(f"no decodable frames after {start:.2f}s")
            # The clip ran out before the last targets: repeat its final frame.
            out += [prev_img if prev_img is not None else self._to_image(prev_frame)] * (self.frames - len(out))
        return uint8_to_tensor(np.stack(out))

    def _to_image(self, frame: av.VideoFrame) -> np.ndarray:
        return self._resize_crop(frame.to_ndarray(format="rgb24"))

    def _resize_crop(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        # INTER_AREA averages when shrinking (no aliasing); when enlarging it degrades to nearest, so use linear.
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return img[top : top + self.size, left : left + self.size]
