"""Clip fingerprints for dedup, leakage and memorization checks: perceptual hashes and a pixel embedding.

Per clip, ``SAMPLED_FRAMES`` frames evenly spaced over its length are scaled to ``FRAME_SIDE``² (aspect
ratio ignored, so a rescaled copy lines up with its original) and give:

- ``hashes``: imagehash pHash (64 bits) of each sampled frame — robust to re-encoding and brightness, a
  second opinion reported next to every pair;
- ``embedding``: the sampled frames at ``EMBED_SIDE``² RGB, flattened, minus their mean, divided by their
  norm. The dot product of two embeddings is the pixel-space cosine similarity of the clips (Carlini et al.
  2023 measure memorization in pixel space too); subtracting the mean makes a brightness-shifted copy still
  score as a copy.

:func:`similarity` is the one definition of "how alike two clips are"; :data:`SIMILARITY_THRESHOLD` is the
calibrated line above which two clips count as copies (see :mod:`vidiffuse.govern.memorization`).

Limits: frames are sampled over each clip's whole length, so a copy trimmed to a different length or
mirrored/cropped is not recognised; a clip of one flat colour has no structure and a zero embedding
(similarity 0 to everything) — its pHash distance still shows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import imagehash
import numpy as np
import torch
from PIL import Image

from vidiffuse.errors import VideoReadError
from vidiffuse.video.io import error_reason, probe_video

__all__ = [
    "SAMPLED_FRAMES", "SIMILARITY_THRESHOLD", "VIDEO_SUFFIXES", "Fingerprints", "fingerprint_arrays",
    "fingerprint_files", "fingerprint_frames", "hash_distance", "list_videos", "nearest", "pairs_above",
    "similarity",
]

SAMPLED_FRAMES = 8
FRAME_SIDE = 64  # frames are decoded straight to this size: pHash works on 32x32 anyway
EMBED_SIDE = 16
# Calibrated on the shapes world (govern/memorization.py, `calibrate_threshold`): see its docstring for numbers.
SIMILARITY_THRESHOLD = 0.99
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif"})

_READ_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError, RuntimeError)


def list_videos(root: str | os.PathLike) -> list[Path]:
    """Video files under ``root`` (recursive, by suffix), sorted by relative path; hidden files are skipped."""
    root = Path(root)
    found = [p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class Fingerprints:
    """Fingerprints of N clips; ``errors`` lists ``(name, reason)`` for clips that could not be read."""

    names: list[str]
    embeddings: np.ndarray  # (N, D) float32, zero-mean, unit norm (or all zero for a flat clip)
    hashes: np.ndarray  # (N, SAMPLED_FRAMES) uint64 pHash per sampled frame
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _sample_indices(n: int, k: int = SAMPLED_FRAMES) -> np.ndarray:
    return np.linspace(0, max(n - 1, 0), k).round().astype(int)


def fingerprint_frames(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes (K,) uint64, embedding (D,) float32)`` of one clip given as uint8 ``(T, H, W, 3)``.

    ``frames`` may already be the K sampled frames (T == K) or the whole clip.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    picked = frames[_sample_indices(len(frames))]
    hashes = np.empty(len(picked), dtype=np.uint64)
    small = np.empty((len(picked), EMBED_SIDE, EMBED_SIDE, 3), dtype=np.float32)
    for i, frame in enumerate(picked):
        if frame.shape[:2] != (FRAME_SIDE, FRAME_SIDE):
            frame = cv2.resize(frame, (FRAME_SIDE, FRAME_SIDE), interpolation=cv2.INTER_AREA)
        bits = imagehash.phash(Image.fromarray(frame)).hash.reshape(-1)
        hashes[i] = np.packbits(bits).view(">u8")[0]
        small[i] = cv2.resize(frame, (EMBED_SIDE, EMBED_SIDE), interpolation=cv2.INTER_AREA)
    vec = small.reshape(-1)
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    # a flat clip has no structure to compare: a zero vector scores 0 against everything
    return hashes, (vec / norm if norm > 1e-3 else np.zeros_like(vec))


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_sampled_frames(path: str | os.PathLike, k: int = SAMPLED_FRAMES) -> np.ndarray:
    """``k`` frames evenly spaced over the video, decoded at ``FRAME_SIDE``², uint8 ``(k, S, S, 3)``."""
    path = Path(path)
    total = probe_video(path)["frames"] or _count_frames(path)  # some containers do not state the frame count
    if not total:
        raise VideoReadError("no video frames")
    wanted = _sample_indices(total, k)
    picked: dict[int, np.ndarray] = {}
    last = None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            last = frame
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24", width=FRAME_SIDE, height=FRAME_SIDE)
            if i >= wanted[-1]:
                break
    if last is None:
        raise VideoReadError("no decodable frames")
    # a header may overstate the frame count: fall back to the last frame that decoded
    tail = None
    out = []
    for i in wanted:
        if i not in picked:
            tail = tail if tail is not None else last.to_ndarray(format="rgb24", width=FRAME_SIDE, height=FRAME_SIDE)
        out.append(picked.get(i, tail))
    return np.stack(out)


def _assemble(names, pairs, errors) -> Fingerprints:
    dim = SAMPLED_FRAMES * EMBED_SIDE * EMBED_SIDE * 3
    hashes = np.stack([h for h, _ in pairs]) if pairs else np.zeros((0, SAMPLED_FRAMES), np.uint64)
    emb = np.stack([e for _, e in pairs]).astype(np.float32) if pairs else np.zeros((0, dim), np.float32)
    return Fingerprints(list(names), emb, hashes, list(errors))


def fingerprint_files(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Fingerprints:
    """Fingerprint video files; unreadable ones go to ``errors`` (never raised)."""
    names = [str(p) for p in paths] if names is None else list(names)
    good, pairs, errors = [], [], []
    for n, (path, name) in enumerate(zip(paths, names), 1):
        try:
            pairs.append(fingerprint_frames(read_sampled_frames(path)))
            good.append(name)
        except (VideoReadError, *_READ_ERRORS) as e:
            errors.append((name, error_reason(e)))
        if progress:
            progress(n, len(names))
    return _assemble(good, pairs, errors)


def fingerprint_dir(root: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> Fingerprints:
    """Fingerprints of every video under ``root``, named by their path relative to it."""
    root = Path(root)
    paths = list_videos(root)
    return fingerprint_files(paths, [p.relative_to(root).as_posix() for p in paths], progress)


def fingerprint_arrays(videos: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Fingerprints:
    """Fingerprints of in-memory uint8 ``(T, H, W, 3)`` clips (e.g. rendered shapes-world clips)."""
    names = [f"#{i}" for i in range(len(videos))] if names is None else list(names)
    return _assemble(names, [fingerprint_frames(v) for v in videos], [])


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel-space cosine similarity, ``(N, M)``, of embeddings ``a (N, D)`` and ``b (M, D)``; 1 = identical."""
    return (torch.from_numpy(np.atleast_2d(a)) @ torch.from_numpy(np.atleast_2d(b)).T).numpy()


def hash_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of differing pHash bits over the sampled frames of two clips: 0 = same, ~0.5 = unrelated."""
    return float(np.bitwise_count(np.asarray(a) ^ np.asarray(b)).mean() / 64)


_CHUNK = 1024  # rows per matrix product: bounds memory at CHUNK x M floats


def nearest(query: np.ndarray, reference: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar reference rows for every query row: ``(indices (N, k), similarities (N, k))``."""
    k = min(k, len(reference))
    ref = torch.from_numpy(reference)
    idx, sim = [], []
    for start in range(0, len(query), _CHUNK):
        s, i = torch.topk(torch.from_numpy(query[start:start + _CHUNK]) @ ref.T, k, dim=1)
        idx.append(i.numpy())
        sim.append(s.numpy())
    if not idx:
        return np.zeros((0, k), int), np.zeros((0, k), np.float32)
    return np.concatenate(idx), np.concatenate(sim)


def pairs_above(a: np.ndarray, b: np.ndarray | None, threshold: float) -> list[tuple[int, int, float]]:
    """``(i, j, similarity)`` for every pair at or above ``threshold``, best first.

    ``b=None`` compares ``a`` with itself and lists each unordered pair once (``i < j``).
    """
    same = b is None
    ref = torch.from_numpy(a if same else b)
    found = []
    for start in range(0, len(a), _CHUNK):
        sim = torch.from_numpy(a[start:start + _CHUNK]) @ ref.T
        rows, cols = torch.nonzero(sim >= threshold, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if not same or start + r < c:
                found.append((start + r, c, float(sim[r, c])))
    return sorted(found, key=lambda t: (-t[2], t[0], t[1]))
