"""How far a prompt lies from the captions a model was trained on.

A text-to-video model renders well only what its training captions described. The score of a prompt is
1 − the mean cosine similarity of its pooled text embedding to its k nearest training captions, in the
model's own text encoder's space: low for captions like those the model was trained on, high for text about
anything else. The threshold is calibrated on training-distribution captions outside the reference set,
so that it flags a known, small share (~1%) of in-distribution prompts.

A model directory ships its reference as `ood_reference.safetensors` (scripts/add_ood_reference.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import shapes
from ..errors import ConfigError, ModelLoadError
from ..files import write_atomic
from ..text.encoders import TextEncoder

REFERENCE_FILE = "ood_reference.safetensors"


def shapes_training_captions(data_cfg: dict) -> Iterator[str]:
    """The captions a `kind = "shapes"` [data] section trains on, in order, without rendering the clips."""
    from ..train.data import shapes_specs

    if data_cfg.get("kind", "shapes") != "shapes":
        raise ConfigError(f"captions can only be regenerated for shapes data, not kind {data_cfg.get('kind')!r}")
    frames, size = int(data_cfg.get("frames", shapes.FRAMES)), int(data_cfg.get("size", shapes.SIZE))
    for _, captions in shapes_specs(data_cfg, frames, size):
        yield from captions


def _embed(text_encoder: TextEncoder, prompts: Sequence[str], batch: int = 256) -> torch.Tensor:
    chunks = [text_encoder.encode(list(prompts[i : i + batch])).pooled.float() for i in range(0, len(prompts), batch)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


class PromptOOD:
    """Scores prompts by their distance to a reference sample of a model's training captions."""

    def __init__(self, text_encoder: TextEncoder, reference: torch.Tensor, threshold: float, k: int = 5,
                 percentile: float = 99.0):
        if not 1 <= k <= len(reference):
            raise ConfigError(f"k must be between 1 and the {len(reference)} reference captions, got {k}")
        self.text_encoder = text_encoder
        # stored as fp16: round here too, so a scorer scores the same before saving as after loading
        self.reference = torch.nn.functional.normalize(reference.to(torch.float16).float(), dim=-1)
        self.threshold, self.k, self.percentile = float(threshold), int(k), float(percentile)

    def score(self, prompts: str | Sequence[str]) -> np.ndarray:
        """One score per prompt, float64: 1 − mean cosine similarity to the k nearest reference captions."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return np.zeros(0)
        with torch.no_grad():
            sims = _embed(self.text_encoder, prompts) @ self.reference.T
            nearest = sims.topk(self.k, dim=1).values.double().mean(dim=1)
        return (1 - nearest).numpy()

    def is_ood(self, prompts: str | Sequence[str]) -> np.ndarray:
        return self.score(prompts) > self.threshold

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        path = Path(path)
        metadata = {"threshold": repr(self.threshold), "k": str(self.k), "percentile": repr(self.percentile),
                    "text_encoder": self.text_encoder.name, "max_length": str(self.text_encoder.max_length),
                    "captions": str(len(self.reference))}
        # save_file would create the file readable by its owner only; bytes written here get the usual mode
        return write_atomic(path, save({"embeddings": self.reference.to(torch.float16).contiguous()}, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, text_encoder: TextEncoder) -> "PromptOOD":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                reference = f.get_tensor("embeddings")
            threshold, k, percentile = float(meta["threshold"]), int(meta["k"]), float(meta["percentile"])
            encoder, max_length = meta["text_encoder"], int(meta["max_length"])
        except KeyError as e:
            raise ModelLoadError(f"cannot read the OOD reference {path} (no {e.args[0]!r} in its metadata)") from None
        except Exception as e:  # safetensors raises its own error type for corrupt files, OSError for missing ones
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise ModelLoadError(f"cannot read the OOD reference {path} ({detail})") from None
        if (encoder, max_length) != (text_encoder.name, text_encoder.max_length):
            raise ModelLoadError(f"the OOD reference {path} was built with text encoder {encoder} (max_length "
                                 f"{max_length}), but the model uses {text_encoder.name} (max_length "
                                 f"{text_encoder.max_length}); rebuild it with scripts/add_ood_reference.py")
        if reference.ndim != 2 or reference.shape[1] != text_encoder.dim or not 1 <= k <= len(reference):
            raise ModelLoadError(f"the OOD reference {path} is malformed: embeddings {tuple(reference.shape)}, k {k}")
        return cls(text_encoder, reference, threshold, k, percentile)


def build_reference(text_encoder: TextEncoder, captions: Sequence[str], heldout_captions: Sequence[str], k: int = 5,
                    percentile: float = 99.0) -> PromptOOD:
    """A scorer over `captions`, its threshold the `percentile` of the scores of `heldout_captions`.

    Held-out captions that also occur in the reference are left out of the calibration: they would
    score ~0 and pull the threshold down, while prompts users write are mostly new strings.
    """
    known = set(captions)
    heldout = [c for c in heldout_captions if c not in known]
    if not heldout:
        raise ConfigError("no held-out captions to calibrate the threshold on (all of them are in the reference)")
    scorer = PromptOOD(text_encoder, _embed(text_encoder, list(captions)), threshold=float("inf"), k=k,
                       percentile=percentile)
    scorer.threshold = float(np.percentile(scorer.score(heldout), percentile))
    return scorer


def reference_from_config(text_encoder: TextEncoder, data_cfg: dict, n: int = 4000, n_heldout: int = 2000,
                          k: int = 5, percentile: float = 99.0) -> PromptOOD:
    """Reference: the first `n` distinct training captions; calibration: the next `n_heldout` new ones."""
    captions: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for caption in shapes_training_captions(data_cfg):
        if caption in seen:
            continue
        seen.add(caption)
        (captions if len(captions) < n else heldout).append(caption)
        if len(heldout) == n_heldout:
            break
    else:
        raise ConfigError(f"the training data holds {len(seen)} distinct captions, fewer than the "
                          f"{n} + {n_heldout} needed; lower --n")
    return build_reference(text_encoder, captions, heldout, k=k, percentile=percentile)
