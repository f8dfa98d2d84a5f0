"""`task = "reader"`: a `PromptReader` (text/reader.py) trained on the captions of a shapes [data] section, each
labelled with the attributes it states. Text only: no clip is rendered, and a step takes milliseconds; encoding
the captions with the text encoder once, at the start, is most of the run's time.

The exported directory goes into a model directory as its `prompt_reader/` (README, "Prompts in phrasings the
denoiser never saw: the prompt reader").
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..files import atomic_directory
from ..precision import autocast
from ..text.encoders import load_text_encoder
from ..text.reader import PromptReader, shapes_vocabulary
from .data import extra_colors, shapes_captions


class ReaderTask:
    device = torch.device("cpu")
    base = None
    carry = None
    data_manifest_sha256: str | None = None
    fine_tuned_from = None

    def __init__(self, cfg: dict, out_dir: Path, base=None):
        data = cfg["data"]
        if base is not None:
            raise ConfigError("a prompt reader is trained whole: remove the [lora] section")
        self.cfg = cfg
        text = cfg.get("text", {})
        self.text_encoder = load_text_encoder(text.get("encoder", "minilm"), text.get("path"))
        self.model = PromptReader(attributes=shapes_vocabulary(extra_colors(data)), text_dim=self.text_encoder.dim,
                                  **cfg["model"])
        self.tokens, self.mask, self.labels = self._examples(data, "encode captions")
        self.num_examples = len(self.labels)
        # captions of other clips, in the same phrasings: how well the reader generalises beyond its examples
        held_out = {**data, "num_clips": int(cfg["run"].get("eval_clips", 500)), "seed": int(data.get("seed", 0)) + 10_000}
        self.eval_tokens, self.eval_mask, self.eval_labels = self._examples(held_out, "encode eval captions")

    def _examples(self, data: dict, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captions, stated = shapes_captions(data)
        length = self.model.config.max_length
        parts = [self.text_encoder.encode(captions[i:i + 256], max_length=length)
                 for i in tqdm(range(0, len(captions), 256), desc=desc)]
        return (torch.cat([p.tokens.to(torch.bfloat16) for p in parts]), torch.cat([p.mask for p in parts]),
                self.model.labels(stated))

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part) -> torch.Tensor:
        rows = idx[part]
        return PromptReader.loss(model(self.tokens[rows].float(), self.mask[rows]), self.labels[rows])

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        with autocast(self.cfg["run"]["precision"]):
            logits = model(self.eval_tokens.float(), self.eval_mask)
        return {f"acc_{a}": float((x.argmax(-1) == self.eval_labels[:, k]).float().mean())
                for k, (a, x) in enumerate(logits.items())}

    def export(self, ema, out: Path) -> None:
        with atomic_directory(out) as tmp:
            ema.save_pretrained(tmp)
