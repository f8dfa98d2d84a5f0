"""PromptReader: reads a free-form prompt into the shapes world's attributes and writes it back in the plain words
every training caption uses, for the denoiser.

Why a reader in front of the denoiser: a denoiser learns what words mean only from the flow-matching loss on its
training captions, and the bundled one reads phrasings it never saw poorly ("proceeds leftward" is drawn moving
left 61% of the time), while a small classifier on the same MiniLM token embeddings, trained on those captions
with the attributes they state as labels, reads them almost without error (benchmarks/text_reading.py). It is
the idea of Wan 2.1's and CogVideoX's prompt extension (a language model rewrites the user's prompt into the
style of the training captions), done by a model of 0.4 M weights that runs offline in milliseconds.

Each attribute gets a softmax over its values plus one more class, "unsaid": a prompt that leaves the size
open gets a caption that leaves it open, and the denoiser draws it as it learned to for unsaid attributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..data import shapes


def shapes_vocabulary(extra_colors: list[str] | tuple = ()) -> dict[str, list[str]]:
    """Each attribute's values, in `shapes.ATTRIBUTES` order: what a reader of the shapes world tells apart."""
    values = {"background": list(shapes.BACKGROUNDS), "color": list(shapes.palette(extra_colors)),
              "shape": list(shapes.SHAPES), "size": list(shapes.SIZES), "direction": list(shapes.DIRECTIONS)}
    return {a: values[a] for a in shapes.ATTRIBUTES}


class PromptReader(ModelMixin, ConfigMixin):
    """Attention pooling (learned queries) over a prompt's token embeddings, then one linear head per attribute."""

    @register_to_config
    def __init__(self, attributes: dict[str, list[str]], text_dim: int = 384, queries: int = 8, max_length: int = 48):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.query = nn.Parameter(torch.randn(queries, text_dim) * 0.05)
        self.key = nn.Linear(text_dim, text_dim)
        self.value = nn.Linear(text_dim, text_dim)
        self.heads = nn.ModuleDict({a: nn.Linear(queries * text_dim, len(values) + 1) for a, values in attributes.items()})

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, logits (B, values + 1); the last class is "unsaid"."""
        tokens = self.norm(tokens.to(self.query.dtype))
        scores = torch.einsum("qd,bld->bql", self.query, self.key(tokens)) / tokens.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask.bool()[:, None], float("-inf")).softmax(-1)
        pooled = torch.einsum("bql,bld->bqd", weights, self.value(tokens)).flatten(1)
        return {a: head(pooled) for a, head in self.heads.items()}

    def labels(self, stated: list[dict[str, str | None]]) -> torch.Tensor:
        """(B, attributes) class indices of attribute dicts (None → "unsaid"): the training targets."""
        vocab = self.config.attributes
        return torch.tensor([[len(vocab[a]) if said.get(a) is None else vocab[a].index(said[a]) for a in vocab]
                             for said in stated])

    @staticmethod
    def loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Per example, the sum over attributes of the cross-entropy."""
        return sum(F.cross_entropy(x.float(), labels[:, k], reduction="none") for k, x in enumerate(logits.values()))

    @torch.no_grad()
    def read(self, text_encoder, prompts: list[str]) -> list[dict[str, str | None]]:
        """What each prompt asks for: {attribute: value, or None where it leaves the attribute open}."""
        emb = text_encoder.encode(list(prompts), max_length=self.config.max_length)
        logits = self(emb.tokens, emb.mask)
        vocab = self.config.attributes
        picks = {a: x.argmax(-1).tolist() for a, x in logits.items()}
        return [{a: (vocab[a][picks[a][i]] if picks[a][i] < len(vocab[a]) else None) for a in vocab}
                for i in range(len(prompts))]

    def rewrite(self, text_encoder, prompts: list[str]) -> list[str]:
        """The prompts as the denoiser reads them best: `shapes.plain_caption` of what they ask for."""
        return [shapes.plain_caption(attrs) for attrs in self.read(text_encoder, prompts)]
