"""LoRA fine-tuning: `vidiffuse train --config F --lora` (or a [lora] section) trains an adapter on a frozen base.

    [lora]
    base = "shapes"        # a vidiffuse model (name or directory) or a diffusers Wan pipeline directory
    rank = 16              # alpha defaults to the rank (scale 1)
    targets = [...]        # layer-name suffixes; default: models.lora.DEFAULT_TARGETS for the model class
    vae = "runs/x/lora"    # denoiser only: an autoencoder LoRA to train on top of (see below)
    preserve_weight = 1.0  # with [data] extra_colors: keep the base model's behaviour on the colours it knew

The base model's own settings (frames, size, autoencoder, text encoder, sampling defaults) come from its
directory, so a [lora] config needs only [run] and [data]. The result is a LoRA directory
(`models/lora.py`) that records the base model's version and the training data manifest.

A new colour needs the autoencoder as well: the bundled one maps every colour to its nearest training
colour (pink decodes as red, measured in benchmarks/lora_new_color.py), so no change to the denoiser alone
can draw pink. `task = "autoencoder"` with [lora] adapts it, keeping the latents of the colours it knew in
place (`preserve_weight`) so the base denoiser still reads them; a denoiser LoRA with `vae = ...` then
learns on the adapted latents and carries the autoencoder's adapter into its own file.

Diffusers backends: a Wan pipeline directory as `base` trains its transformer on a folder of videos with
captions ([data] kind = "folder", frames = 4k+1), with the pipeline's own VAE and text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..models import lora as lora_io

# preserve_weight (None: 1.0 for an autoencoder, 0 for a denoiser): how strongly what the base model knew is
# kept on the clips of the v1 colours, when [data] adds extra colours (see the tasks in trainer.py)
LORA_DEFAULTS = {"base": "shapes", "rank": 16, "alpha": None, "targets": None, "dropout": 0.0, "vae": None,
                 "preserve_weight": None}
LORA_DIR = "lora"  # under out_dir: where the trained adapter is exported


def lora_section(cfg: dict, path: Path) -> dict:
    section = {**LORA_DEFAULTS, **(cfg.get("lora") or {})}
    unknown = sorted(set(section) - set(LORA_DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown [lora] key(s) {', '.join(unknown)}; known: {', '.join(LORA_DEFAULTS)}")
    if int(section["rank"]) < 1:
        raise ConfigError(f"{path}: [lora] rank must be at least 1, got {section['rank']}")
    return section


def load_base(base: str):
    """The base model as a pipeline: a `VideoPipeline` (vidiffuse bundle) or a `DiffusersVideoPipeline`."""
    from ..pipeline import VideoPipeline

    return VideoPipeline.from_pretrained(base)


def attach(model: torch.nn.Module, section: dict) -> list[torch.nn.Parameter]:
    """A fresh trainable adapter on `model` as [lora] describes it; the base weights are frozen."""
    config = lora_io.lora_config(model, rank=int(section["rank"]), alpha=section["alpha"], targets=section["targets"],
                                 dropout=float(section["dropout"]))
    return lora_io.add_lora(model, config)


def base_record(pipe) -> dict:
    """What a LoRA says about the model it was trained on: checked when it is loaded."""
    record = {"name": pipe.name, "version": pipe.base_version}  # no path: it differs between checkouts
    digest = (pipe.index or {}).get("training_data_manifest_sha256")
    if digest:
        record["training_data_manifest_sha256"] = digest
    return record


def export_lora(out: Path, parts: dict[str, torch.nn.Module], info: dict, carry: lora_io.LoraFile | None = None,
                files: dict[str, str] | None = None) -> Path:
    """Write the trained adapter(s) of `parts` (component → model) as one LoRA directory; `carry` adds the
    components of another LoRA this one was trained on top of (its autoencoder adapter); `files`: relative
    path → text written beside the weights (training config, data manifest, metrics)."""
    tensors, configs = {}, {}
    for component, model in parts.items():
        t, c = lora_io.component_state(model, component)
        tensors.update(t)
        configs[component] = c
    if carry is not None:
        for component in carry.components:
            if component not in parts:
                tensors.update(carry.part(component)[0])
                configs[component] = carry.configs.get(component, {})
        info = {**info, "carried": {"path": str(carry.path), "sha256": carry.digest, "components":
                                    [c for c in carry.components if c not in parts]}}
    return lora_io.write_lora(out, tensors, configs, info, files=files)


class DiffusersLoraTask:
    """LoRA on a diffusers Wan pipeline's transformer: flow matching on the pipeline's own VAE latents and text
    embeddings of a folder of captioned videos (Wan's scheduler is flow-matching Euler: t·1000 timesteps,
    velocity noise − x0, the objective of `diffusion.flow`)."""

    data_manifest_sha256: str | None = None
    carry = None

    def __init__(self, cfg: dict, out_dir: Path, base):
        if base.family.name != "wan":
            raise ConfigError(f"LoRA training on diffusers models supports Wan (flow matching); "
                              f"{base.family.name} is not supported yet")
        self.cfg, self.base = cfg, base
        self.pipe = base.pipe
        data = cfg["data"]
        self.frames = int(data.get("frames", base.frames))
        self.height = self.width = int(data.get("size", min(base.height, base.width)))
        if (self.frames - 1) % base.temporal_ratio:
            raise ConfigError(f"[data] frames must be k·{base.temporal_ratio}+1 for {base.name}, got {self.frames}")
        base._check_size(self.height, self.width)
        self.max_length = int(cfg.get("text", {}).get("max_length", 512))
        self.data = self._encode(data, out_dir.parent / "cache")
        self.num_examples = len(self.data["caption_clip"])
        self.empty = self._text([""])[0]
        self.model = self.pipe.transformer.float().train()
        self.lora_params = attach(self.model, cfg["lora"])
        run = cfg["run"]
        self.p_uncond = float(run.get("p_uncond", 0.1))
        self.t_mean, self.t_std, self.t_shift = (float(run.get(k, d)) for k, d in
                                                 (("t_mean", 0.0), ("t_std", 1.0), ("t_shift", 1.0)))
        self.device = torch.device("cpu")

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_length, device=torch.device("cpu"))
        return embeds.float()

    @torch.no_grad()
    def _encode(self, data: dict, cache_dir: Path) -> dict[str, torch.Tensor]:
        import numpy as np
        from tqdm import tqdm

        from .data import _cache_path, _clip_source, _save_atomic

        vae = self.pipe.vae
        key = {**data, "frames": self.frames, "size": self.height, "base": self.base.base_version,
               "L": self.max_length}
        path = _cache_path(cache_dir, "wan-latents", key)
        if path.exists():
            from safetensors.torch import load_file

            return load_file(path)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        latents, tokens, owner = [], [], []
        n = int(data["num_clips"])
        for i, (video, captions) in enumerate(tqdm(_clip_source(data, self.frames, self.height), total=n,
                                                   desc="encode clips")):
            x = torch.from_numpy(np.ascontiguousarray(video)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
            z = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()
            latents.append(((z - mean) / std).to(torch.bfloat16))
            tokens.append(self._text(captions).to(torch.bfloat16))
            owner += [i] * len(captions)
        out = {"latents": torch.cat(latents), "tokens": torch.cat(tokens), "caption_clip": torch.tensor(owner)}
        _save_atomic(out, path)
        return out

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part) -> torch.Tensor:
        from ..diffusion.flow import flow_matching_loss, sample_t

        d = self.data
        drop = (torch.rand(len(idx), generator=gen) < self.p_uncond)[part]
        noise = torch.randn((len(idx), *d["latents"].shape[1:]), generator=gen)[part]
        t = sample_t(len(idx), gen, self.t_mean, self.t_std, self.t_shift)[part]
        idx = idx[part]
        x0 = d["latents"][d["caption_clip"][idx]].float()
        tokens = d["tokens"][idx].float()
        tokens[drop] = self.empty
        dev = self.device
        return flow_matching_loss(model, x0.to(dev), noise.to(dev), t.to(dev), encoder_hidden_states=tokens.to(dev))

    def lora_parts(self, ema) -> dict:
        return {"transformer": ema}

    def evaluate(self, model) -> dict:
        return {}  # no analyzer for real footage: watch the loss, then look at samples with --lora
