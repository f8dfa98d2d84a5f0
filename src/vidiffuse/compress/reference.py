"""The yardstick for `vidiffuse bench`: a vidiffuse model's weights run through the sampling loop a user
would write with diffusers alone.

What it mirrors, and from where (diffusers 0.42):

- the denoising loop of `WanPipeline.__call__`: ``scheduler.set_timesteps`` (`set_steps`: for flow-match Euler
  with FluxPipeline's even grid, as vidiffuse samples), then per step one transformer
  call for the prompt and a second, separate one for the negative prompt (CFG is not batched),
  ``noise_uncond + g * (noise_cond - noise_uncond)``, ``scheduler.step(...)``; the negative prompt is the
  empty string, encoded like any prompt, as Wan's ``encode_prompt`` does;
- the initial noise from ``diffusers.utils.torch_utils.randn_tensor`` with one generator per video
  (the list-of-generators form every diffusers pipeline accepts);
- decoding with a 2-D image VAE as `AnimateDiffPipeline.decode_latents` does it: divide by
  ``scaling_factor``, fold frames into the batch, ``vae.decode`` in chunks of 16 frames, then
  ``VideoProcessor.postprocess_video`` and the ``(x * 255).round()`` of ``numpy_to_pil``;
- fp32 weights, default memory format, no autocast, no torch.compile, no caching.

One deviation, so that the two loops make the same video for every setting: CFG runs whenever
``guidance != 1`` (vidiffuse's rule) where Wan uses ``guidance > 1``; they agree for every guidance
above 1, the range anyone samples with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..diffusion.sampling import make_scheduler, set_steps
from ..errors import ConfigError, ModelLoadError
from ..pipeline import SAMPLING_DEFAULTS, resolve_model_path, vae_scale_factor
from ..text.encoders import TextEncoder, load_text_encoder

DECODE_CHUNK_FRAMES = 16  # AnimateDiffPipeline's decode_chunk_size default


@dataclass
class ReferenceOutput:
    frames: list[np.ndarray]  # per video, uint8 (T, H, W, 3)
    videos: torch.Tensor  # (B, C, T, H, W) float in [-1, 1], before quantisation to uint8


class ReferenceLoop:
    """``ReferenceLoop.from_pretrained("shapes")(prompts, seeds, steps=, guidance=, sampler=)``."""

    def __init__(self, transformer, vae, text_encoder: TextEncoder, frames: int, size: int, defaults: dict):
        from diffusers.video_processor import VideoProcessor

        self.transformer, self.vae, self.text_encoder = transformer.eval(), vae.eval(), text_encoder
        self.frames, self.size = frames, size
        self.defaults = {**SAMPLING_DEFAULTS, **defaults}
        self.video_processor = VideoProcessor(vae_scale_factor=vae_scale_factor(vae))

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None,
                        text_encoder: TextEncoder | None = None) -> "ReferenceLoop":
        """Load a vidiffuse model directory with diffusers' own loaders. `text_encoder` lets a caller
        that already holds the model's encoder share it instead of loading a second copy."""
        from diffusers import AutoencoderKL

        from ..models.transformer import VideoDiT

        path: Path = resolve_model_path(model)
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {path / 'model_index.json'}: {e}") from None
        if index.get("quantization"):
            raise ModelLoadError(f"{path} holds a {index['quantization']} denoiser, which plain diffusers cannot load; "
                                 f"give the float model it came from (the bench's int8/bf16 variants quantize it)")
        try:
            transformer = VideoDiT.from_pretrained(path / "transformer", torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32)
        except Exception as e:  # diffusers raises OSError/ValueError/SafetensorError/JSON errors for bad files
            raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        if text_encoder is None:
            text_encoder = load_text_encoder(index.get("text_encoder", "minilm"), index.get("text_encoder_path"),
                                             max_length=int(index.get("max_length", 24)))
        return cls(transformer, vae, text_encoder, frames=int(index["frames"]), size=int(index["size"]),
                   defaults=index.get("defaults") or {})

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb = self.text_encoder.encode(prompts)
        return {"encoder_hidden_states": emb.tokens, "encoder_attention_mask": emb.mask, "pooled_projections": emb.pooled}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = 1 / self.vae.config.scaling_factor * latents
        batch, channels, num_frames, height, width = latents.shape
        latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, channels, height, width)
        video = torch.cat([self.vae.decode(latents[i : i + DECODE_CHUNK_FRAMES]).sample
                           for i in range(0, latents.shape[0], DECODE_CHUNK_FRAMES)])
        return video[None, :].reshape((batch, num_frames, -1) + video.shape[2:]).permute(0, 2, 1, 3, 4).float()

    @torch.no_grad()
    def denoise(self, prompts: list[str], seeds: Sequence[int], steps: int, guidance: float, sampler: str) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        do_cfg = guidance != 1.0
        prompt_embeds = self.encode_prompt(prompts)
        negative_embeds = self.encode_prompt([""] * len(prompts)) if do_cfg else None
        side = self.size // vae_scale_factor(self.vae)
        shape = (len(prompts), self.vae.config.latent_channels, self.frames, side, side)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = randn_tensor(shape, generator=generators, dtype=torch.float32)

        scheduler = make_scheduler(sampler, float(self.defaults["shift"]))
        set_steps(scheduler, steps)
        for t in scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            noise_pred = self.transformer(hidden_states=latents, timestep=timestep, **prompt_embeds,
                                          return_dict=False)[0]
            if do_cfg:
                noise_uncond = self.transformer(hidden_states=latents, timestep=timestep, **negative_embeds,
                                                return_dict=False)[0]
                noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], seeds: int | Sequence[int] = 0, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, batch_size: int = 8) -> ReferenceOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [int(seeds)] * len(prompts) if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        steps = int(self.defaults["steps"] if steps is None else steps)
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
        sampler = str(self.defaults["sampler"] if sampler is None else sampler)
        videos, frames = [], []
        for start in range(0, len(prompts), batch_size):
            latents = self.denoise(prompts[start : start + batch_size], seeds[start : start + batch_size],
                                   steps, guidance, sampler)
            video = self.decode_latents(latents)
            as_np = self.video_processor.postprocess_video(video, output_type="np")  # (B, T, H, W, 3) in [0, 1]
            frames += list((as_np * 255).round().astype(np.uint8))
            videos.append(video.clamp(-1, 1))
        return ReferenceOutput(frames, torch.cat(videos))
