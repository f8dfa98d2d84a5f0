"""CLIP-based prompt adherence for real (non-shapes-world) models, from local CLIP weights.

The shapes world has an analyzer that reads the prompt's attributes back from the pixels; a real model
has no such oracle, so prompt adherence is measured the way the text-to-video literature does: the CLIP
similarity between the prompt and the video's frames. Nothing can be downloaded here, so
:class:`CLIPScorer` reads a Hugging Face CLIP directory from a path the user gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.video.io import frames_to_uint8

__all__ = ["CLIPScorer", "sample_frame_indices"]

_WHAT_TO_GIVE = ("give a folder saved with CLIPModel.save_pretrained plus its tokenizer and image processor "
                 "(e.g. openai/clip-vit-base-patch32 downloaded elsewhere and copied here)")


def sample_frame_indices(num_frames: int, n: int) -> np.ndarray:
    """``min(n, num_frames)`` distinct frame indices, one from the centre of each of that many equal segments.

    ``n=1`` picks the middle frame; ``n >= num_frames`` keeps every frame; 16 frames, ``n=8`` -> 1, 3, ..., 15.
    """
    if num_frames < 1:
        raise ConfigError("cannot sample frames from an empty video")
    if n < 1:
        raise ConfigError(f"frames_per_video must be >= 1, got {n}")
    n = min(n, num_frames)
    return np.floor((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)


class CLIPScorer:
    """Per-video prompt adherence: frame-averaged CLIPScore with weight 1, i.e. CLIPSIM on a 0–100 scale.

    For each video, ``frames_per_video`` frames are sampled uniformly (:func:`sample_frame_indices`), and
    the score is ``mean over frames of 100 * max(cos(image_emb(frame), text_emb(prompt)), 0)``.

    Why weight 1 rather than Hessel et al.'s 2.5: the 2.5 of CLIPScore (2021) only stretches the
    typical caption range for readability and does not change any ranking, while the plain cosine is
    what text-to-video papers report: CLIPSIM (introduced with GODIVA, reported on MSR-VTT by
    Make-A-Video and others) is the per-frame CLIP cosine averaged over frames. With weight 1 the value stays in
    [0, 100] (it is also torchmetrics' ``CLIPScore`` convention), and dividing by 100 gives CLIPSIM
    except for the clamp at 0, which only matters for frames CLIP finds anti-aligned with the prompt.
    The clamp is applied per frame, before averaging, as CLIPScore does per image.

    The model is loaded strictly from ``path`` (``local_files_only=True``; nothing is downloaded): a
    Hugging Face CLIP directory with ``config.json`` (``model_type`` "clip"), weights, tokenizer files
    (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``. Weights run
    in float32, in eval mode, without gradients; frames go through the model ``batch_size`` at a time
    and prompts are truncated to the text model's context length (77 tokens for OpenAI CLIP).
    Same inputs, same machine -> the same scores.
    """

    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", frames_per_video: int = 8,
                 batch_size: int = 32):
        if frames_per_video < 1:
            raise ConfigError(f"frames_per_video must be >= 1, got {frames_per_video}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.path = _check_clip_dir(path)
        self.device = torch.device(device)
        self.frames_per_video, self.batch_size = frames_per_video, batch_size
        self.model, self.tokenizer, self.image_processor = _load_clip(self.path)
        self.model.to(self.device).eval()
        # 77 for OpenAI CLIP; prompts longer than the context are truncated rather than rejected
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    # ------------------------------------------------------------------ embeddings

    @torch.inference_mode()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 unit-norm text embeddings."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model.text_model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device))
        emb = self.model.text_projection(out.pooler_output).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    @torch.inference_mode()
    def embed_frames(self, frames: np.ndarray) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 frames -> ``(N, D)`` float32 unit-norm image embeddings, in batches."""
        out = []
        for i in range(0, len(frames), self.batch_size):
            chunk = list(frames[i:i + self.batch_size])
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, torch.float32)).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    # ------------------------------------------------------------------ score

    def __call__(self, videos, prompts: str | Sequence[str]) -> np.ndarray:
        """Scores ``(N,)`` float64 in [0, 100], one per video.

        ``videos``: one uint8 array ``(T, H, W, 3)``, a list of them (lengths and sizes may differ), a
        uint8 array ``(N, T, H, W, 3)``, or a torch tensor ``(B, 3, T, H, W)`` in [-1, 1] (the pipeline's
        convention). ``prompts``: one per video, or a single string scored against every video.
        """
        videos = _as_video_list(videos)
        if isinstance(prompts, str):
            prompts = [prompts] * len(videos)
        prompts = list(prompts)
        if len(prompts) != len(videos):
            raise ConfigError(f"need one prompt per video: got {len(videos)} videos and {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be strings")

        unique = sorted(set(prompts))  # each distinct prompt is encoded once
        row = {p: i for i, p in enumerate(unique)}
        text = self.embed_text(unique)
        frames, owner = [], []
        for i, v in enumerate(videos):
            idx = sample_frame_indices(len(v), self.frames_per_video)
            frames.append(v[idx])
            owner.extend([i] * len(idx))
        image = self.embed_frames(np.concatenate(frames))
        owner_t = torch.as_tensor(owner)
        prompt_of_frame = torch.as_tensor([row[prompts[i]] for i in owner])
        per_frame = 100.0 * (image * text[prompt_of_frame]).sum(-1).clamp(min=0).double().cpu()
        sums = torch.zeros(len(videos), dtype=torch.float64).index_add_(0, owner_t, per_frame)
        counts = torch.bincount(owner_t, minlength=len(videos)).double()
        return (sums / counts).numpy()


# ---------------------------------------------------------------------- loading


def _check_clip_dir(path) -> Path:
    if path is None or str(path) == "":
        raise ModelLoadError(f"CLIP score needs a local CLIP model directory (nothing can be downloaded here): "
                             f"{_WHAT_TO_GIVE}")
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"CLIP model directory not found: {path}; {_WHAT_TO_GIVE}")
    if not path.is_dir():
        raise ModelLoadError(f"CLIP model path {path} is a file, not a directory; {_WHAT_TO_GIVE}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is not a CLIP model directory (no config.json); {_WHAT_TO_GIVE}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"unreadable config.json in {path}: {e}") from e
    if model_type != "clip":
        raise ModelLoadError(f"{path} holds a {model_type!r} model, not CLIP (model_type 'clip'); {_WHAT_TO_GIVE}")
    # AutoTokenizer silently builds an empty tokenizer when these are absent, so check first
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not ((path / "tokenizer.json").is_file() or has_bpe_files):
        raise ModelLoadError(f"{path} has no CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                             "save it there with CLIPTokenizer.save_pretrained")
    if not (path / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{path} has no image processor (preprocessor_config.json); "
                             "save it there with CLIPImageProcessor.save_pretrained")
    return path


def _load_clip(path: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    # weights in float32: checkpoints are often stored in fp16, which is slow and lossy on this CPU
    # quiet for one clean line on error: the missing/mismatched-key report is raised below instead,
    # and a per-tensor progress bar is noise for a model this size; both settings are restored
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
    except Exception as e:  # missing, truncated or non-safetensors files, shape mismatches
        raise ModelLoadError(f"cannot load CLIP weights from {path}: {_one_line(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if bad:
        # from_pretrained would otherwise fill these with random values and score silently wrong
        raise ModelLoadError(f"CLIP weights in {path} are incomplete ({len(bad)} tensors missing or of the "
                             f"wrong shape, e.g. {bad[0]}); {_WHAT_TO_GIVE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {path}: {_one_line(e)}") from e
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the CLIP image processor from {path}: {_one_line(e)}") from e
    return model, tokenizer, image_processor


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# ---------------------------------------------------------------------- inputs


def _as_video_list(videos) -> list[np.ndarray]:
    if torch.is_tensor(videos):
        if videos.ndim != 5 or videos.shape[1] != 3 or not videos.is_floating_point():
            raise ConfigError(f"a video tensor must be (B, 3, T, H, W) float in [-1, 1]; got "
                              f"{tuple(videos.shape)} {videos.dtype}")
        return [frames_to_uint8(v) for v in videos]
    if isinstance(videos, np.ndarray):
        videos = [videos] if videos.ndim == 4 else list(videos) if videos.ndim == 5 else [videos]
    videos = list(videos)
    if not videos:
        raise ConfigError("no videos to score")
    out = []
    for i, v in enumerate(videos):
        v = np.asarray(v)
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
            raise ConfigError(f"video {i}: expected a uint8 array (T, H, W, 3); got {v.shape} {v.dtype}")
        if v.shape[0] == 0:
            raise ConfigError(f"video {i} has no frames")
        out.append(v)
    return out
