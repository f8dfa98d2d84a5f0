"""What the worker records about each generation, for drift detection.

Per video: the prompt's pooled MiniLM embedding and its OOD score (the model's `PromptOOD` reference),
the output's shapes-world video-encoder embedding (the FVD features) and the attributes its heads read
(background, colour, shape, size, direction), and a few temporal metrics. Cheap enough to run after every
job: ~50 ms a video on 2 CPU cores (text 13 ms, video encoder 8 ms, temporal metrics 30 ms), about 5% of
the bundled model's ~1 s generation.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .store import MonitorStore

# motion_smoothness is left out by default: at 24 ms a video it alone would cost half of the budget,
# and dynamic_degree and temporal_flicker already watch motion
TEMPORAL_SIGNALS = ("temporal_flicker", "subject_consistency", "background_consistency", "dynamic_degree")
# temporal statistics of large videos (diffusers backends) are taken on a reduced copy, so a 480p,
# 81-frame video costs about what a shapes clip does; drift only compares like with like
MAX_SIDE, MAX_FRAMES = 128, 32

_lock = threading.Lock()


@functools.cache
def _video_encoder():
    from ..evaluate.shapes_encoder import load_shapes_video_encoder

    return load_shapes_video_encoder()


@functools.cache
def _fallback_text_encoder():
    """For pipelines without a vidiffuse text encoder (diffusers backends): the bundled MiniLM."""
    from ..text.encoders import load_text_encoder

    return load_text_encoder("minilm", max_length=32)


def prompt_features(pipe, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Pooled, L2-normalised text embeddings (n, D), OOD scores (n,) or None, and the OOD threshold.

    The scores are `PromptOOD.score`'s, computed from the same embeddings so each prompt is encoded once.
    """
    import torch

    encoder = getattr(pipe, "text_encoder", None) or _fallback_text_encoder()
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(encoder.encode(list(prompts)).pooled.float(), dim=-1)
        scorer = getattr(pipe, "ood_reference", None) if getattr(pipe, "text_encoder", None) is not None else None
        if scorer is None:
            return pooled.numpy(), None, None
        nearest = (pooled @ scorer.reference.T).topk(scorer.k, dim=1).values.double().mean(dim=1)
    return pooled.numpy(), (1 - nearest).numpy(), float(scorer.threshold)


def _reduced(video: np.ndarray) -> np.ndarray:
    import cv2

    t, h, w = video.shape[:3]
    if t > MAX_FRAMES:
        video = video[np.linspace(0, t - 1, MAX_FRAMES).round().astype(int)]
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        video = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in video])
    return video


def video_features(videos: Sequence[np.ndarray], temporal: Sequence[str] = TEMPORAL_SIGNALS
                   ) -> tuple[np.ndarray, list[dict[str, str]], list[dict[str, float]]]:
    """Of uint8 (T, H, W, 3) videos: video-encoder embeddings (n, 128), the shapes-world attributes its
    heads read (background, colour, shape, size, direction) and the named temporal metrics."""
    import torch

    from ..evaluate import temporal as temporal_module
    from ..evaluate.shapes_encoder import shapes_video_features

    unknown = [name for name in temporal if name not in temporal_module.__all__ or name == "temporal_metrics"]
    if unknown:
        known = (*TEMPORAL_SIGNALS, "motion_smoothness")
        raise ConfigError(f"unknown temporal metric(s) {unknown}; choose from {', '.join(known)}")
    checked = []
    for v in videos:
        v = np.asarray(v)
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or len(v) < 3:
            raise ConfigError(f"a video to observe must be uint8 (T, H, W, 3) with T >= 3; got {v.dtype} {v.shape}")
        checked.append(_reduced(v))
    encoder = _video_encoder()
    with _lock, torch.no_grad():  # the encoder is shared by the threads of one process
        embeddings = shapes_video_features(checked, encoder)
        logits = encoder.classify(torch.from_numpy(embeddings).float())
    readings = [{a: str(encoder.classes[a][int(logits[a][i].argmax())]) for a in logits} for i in range(len(checked))]
    rows = [{name: float(getattr(temporal_module, name)(v)) for name in temporal} for v in checked]
    return embeddings.astype(np.float32), readings, rows


def observe_generations(store: MonitorStore, pipe, prompts: Sequence[str], videos: Sequence[np.ndarray],
                        job_ids: Sequence[str | None] | None = None,
                        temporal: Sequence[str] = TEMPORAL_SIGNALS) -> list[int]:
    """Record several generations at once (text and video encoders run batched); returns the row ids."""
    prompts, videos = list(prompts), list(videos)
    job_ids = list(job_ids) if job_ids is not None else [None] * len(prompts)
    if not (len(prompts) == len(videos) == len(job_ids)):
        raise ConfigError(f"{len(prompts)} prompts, {len(videos)} videos and {len(job_ids)} job ids do not pair up")
    if not prompts:
        return []
    text, scores, threshold = prompt_features(pipe, prompts)
    embeddings, readings, rows = video_features(videos, temporal)
    version = getattr(pipe, "version", "unversioned")
    ids = []
    for i, job_id in enumerate(job_ids):
        score = None if scores is None else float(scores[i])
        ids.append(store.add_observation(text[i], embeddings[i], rows[i], attributes=readings[i], model_version=version,
                                         ood_score=score, ood=None if score is None else score > threshold,
                                         job_id=job_id))
    return ids


def observe_generation(store: MonitorStore, pipe, prompt: str, video_uint8: np.ndarray, job_id: str | None = None,
                       temporal: Sequence[str] = TEMPORAL_SIGNALS) -> None:
    """Record one generation: prompt embedding and OOD flag, output embedding, temporal metrics.

    Raises on bad input or an unwritable database; a server should log that and keep the job's result.
    """
    observe_generations(store, pipe, [prompt], [video_uint8], [job_id], temporal)
