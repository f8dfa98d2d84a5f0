"""Temporal-quality metrics in the spirit of VBench, computed on CPU from pixels alone (no downloads).

Each metric takes one video, uint8 ``(T, H, W, 3)`` RGB, and returns a float. VBench measures the same
dimensions with learned networks (DINO, CLIP, RAFT, AMT); the stand-ins here use classical vision
(OpenCV Farneback optical flow, pixel statistics), so the numbers follow VBench's definitions and
direction but are not comparable with published VBench scores. They are designed for clips on a plain
background such as the shapes world (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from vidiffuse.errors import ConfigError

__all__ = [
    "background_consistency",
    "dynamic_degree",
    "motion_smoothness",
    "subject_consistency",
    "temporal_flicker",
    "temporal_metrics",
]

# winsize 9 rather than OpenCV's usual 15: the shapes world's objects are 12-24 px wide
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=3, poly_n=5, poly_sigma=1.1, flags=0)
_GRID = 16  # consistency features live on a 16×16 grid: coarse enough to tolerate a few pixels of motion
_SUBJECT_THRESHOLD = 32  # max per-channel difference from the background colour that marks a subject pixel


def _check(video: np.ndarray, min_frames: int = 2) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise ConfigError(f"expected a uint8 video (T, H, W, 3); got {v.dtype} {v.shape}")
    if len(v) < min_frames:
        raise ConfigError(f"this metric needs at least {min_frames} frames; got {len(v)}")
    return v


def _gray(video: np.ndarray) -> list[np.ndarray]:
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) in pixels such that ``a(x) ≈ b(x + flow(x))``."""
    return cv2.calcOpticalFlowFarneback(a, b, None, **_FARNEBACK)


def temporal_flicker(video: np.ndarray) -> float:
    """1 - (mean absolute difference between consecutive frames) / 255; 1 means no change at all.

    VBench's temporal flicker uses this same formula, (255 - mean_abs_diff) / 255, but applies it only
    to videos generated from static-scene prompts, where every change is flicker. On a moving clip the
    motion itself lowers the score, so compare it among clips of similar motion.
    """
    v = _check(video)
    mad = np.mean([np.abs(b.astype(np.int16) - a).mean() for a, b in zip(v[:-1], v[1:])])
    return float((255 - mad) / 255)


def motion_smoothness(video: np.ndarray) -> float:
    """How well each frame is predicted by interpolating its neighbours: 1 - MAE / 255 (1 = perfect).

    Frame t is reconstructed from frames t-1 and t+1: Farneback flows between the neighbours (both
    directions), the half-way flows from the middle frame under a linear-motion model (Super SloMo's
    approximation at t = 1/2), both neighbours backward-warped to the middle and averaged. Smooth,
    constant-velocity motion interpolates well; jerky or shuffled frames do not.

    VBench's motion smoothness follows the same idea with a learned interpolator (AMT): it drops the
    odd frames, re-synthesises them from the even ones and reports (255 - MAE) / 255.
    """
    v = _check(video, 3)
    g = _gray(v)
    h, w = g[0].shape
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=-1)
    frames = v.astype(np.float32)
    errors = []
    for t in range(1, len(v) - 1):
        f01, f10 = _flow(g[t - 1], g[t + 1]), _flow(g[t + 1], g[t - 1])
        to_prev = 0.25 * (f10 - f01)  # flow from the middle frame to frame t-1; to frame t+1 is its negative
        warped = [cv2.remap(frames[s], m[..., 0], m[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                  for s, m in ((t - 1, grid + to_prev), (t + 1, grid - to_prev))]
        errors.append(np.abs((warped[0] + warped[1]) / 2 - frames[t]).mean())
    return float((255 - np.mean(errors)) / 255)


def dynamic_degree(video: np.ndarray, top_fraction: float = 0.05) -> float:
    """Amount of motion in px/frame: per consecutive pair, the mean Farneback flow magnitude over the
    fastest ``top_fraction`` (5%) of pixels, averaged over pairs. 0 for a static video.

    VBench's dynamic degree takes the same top-5% mean of RAFT flow per pair, then thresholds it
    (6 px at 256 px resolution, scaled by size) and reports a binary "dynamic or not" per video; this
    returns the underlying continuous speed instead. The top-5% statistic follows the moving object only
    when it covers at least that share of the frame; smaller movers read slower.
    """
    g = _gray(_check(video))
    speeds = []
    for a, b in zip(g[:-1], g[1:]):
        mag = np.linalg.norm(_flow(a, b), axis=-1).ravel()
        k = max(1, int(mag.size * top_fraction))
        speeds.append(np.partition(mag, mag.size - k)[-k:].mean())
    return float(np.mean(speeds))


# ---------------------------------------------------------------- consistency


def _encode(frame: np.ndarray) -> np.ndarray:
    """Each channel value v as the unit vector at angle v/255 · 90°: (H, W, 6) float32.

    The cosine of raw intensities ignores brightness scaling (a gray background turning white scores 1);
    with this encoding the cosine of two frames is the mean of cos(90° · |Δv| / 255) over their values,
    1 when identical and 0 for black against white.
    """
    angle = frame.astype(np.float32) * np.float32(np.pi / 510)
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)


def _subject_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels that differ from the frame's background colour (the median of a thin border ring)."""
    r = max(1, min(frame.shape[:2]) // 32)
    ring = np.concatenate([frame[:r].reshape(-1, 3), frame[-r:].reshape(-1, 3),
                           frame[:, :r].reshape(-1, 3), frame[:, -r:].reshape(-1, 3)])
    background = np.median(ring, axis=0)
    return np.abs(frame.astype(np.float32) - background).max(axis=-1) > _SUBJECT_THRESHOLD


def _to_grid(x: np.ndarray) -> np.ndarray:
    return cv2.resize(x, (_GRID, _GRID), interpolation=cv2.INTER_AREA).reshape(_GRID, _GRID, -1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float(na == nb)  # two empty features agree; an empty and a non-empty one do not
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def _first_and_previous(n: int, sim: Callable[[int, int], float]) -> float:
    """VBench's aggregation: mean over frames t >= 1 of (sim(first, t) + sim(t-1, t)) / 2."""
    return float(np.mean([(sim(0, t) + sim(t - 1, t)) / 2 for t in range(1, n)]))


def subject_consistency(video: np.ndarray) -> float:
    """Does the subject keep its look from frame to frame? Mean cosine similarity of each frame's subject
    feature to the first frame's and to the previous frame's (VBench's aggregation), in [0, 1].

    Subject feature: the pixels that differ from the frame's median border colour, value-encoded (see
    ``_encode``) and pooled on a 16×16 grid, zero elsewhere. It is position-aware: a subject that changes
    colour, shape or size scores lower, and so does one that jumps or travels far from where it started.
    VBench uses DINO ViT features of the whole frame instead, which capture identity more than position.
    """
    v = _check(video)
    feats = [_to_grid(_encode(f) * _subject_mask(f)[..., None]) for f in v]
    return _first_and_previous(len(v), lambda i, j: _cosine(feats[i], feats[j]))


def background_consistency(video: np.ndarray) -> float:
    """Does the background stay the same? Like :func:`subject_consistency`, on the background: each pair of
    frames is compared on the 16×16 grid cells that hold no subject pixel in either frame.

    Where the border-colour heuristic marks more than half the frame as subject (a textured background),
    nothing is masked. VBench uses CLIP image features of the whole frame instead.
    """
    v = _check(video)
    feats = [_to_grid(_encode(f)) for f in v]
    masks = [_subject_mask(f) for f in v]
    subject = [_to_grid(m.astype(np.float32))[..., 0] > 0 if m.mean() <= 0.5 else np.zeros((_GRID, _GRID), bool)
               for m in masks]

    def sim(i: int, j: int) -> float:
        keep = ~(subject[i] | subject[j])
        if not keep.any():
            keep[:] = True
        return _cosine(feats[i][keep], feats[j][keep])

    return _first_and_previous(len(v), sim)


def temporal_metrics(video: np.ndarray) -> dict[str, float]:
    """All temporal metrics of one video (uint8 (T, H, W, 3), at least 3 frames)."""
    _check(video, 3)
    return {f.__name__: f(video) for f in (subject_consistency, background_consistency, temporal_flicker,
                                          motion_smoothness, dynamic_degree)}
