"""Text → video: the one entry point that the CLI, the server and evaluation all call.

prompt → text encoder → sampler ⟲ denoiser (latent space) → autoencoder decode → uint8 frames.

A model directory ("bundle") is laid out like a diffusers pipeline:

    model_index.json        frames, size, fps, text encoder, sampling defaults
    transformer/            VideoDiT  (config.json + diffusion_pytorch_model.safetensors)
    vae/                    AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)
    decoder/                optional: a TinyDecoder that decodes in the autoencoder's place (a distilled model)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .diffusion.sampling import SAMPLERS, make_scheduler, sample
from .errors import ConfigError, ModelLoadError
from .files import atomic_directory
from .precision import autocast
from .models.transformer import first_frame_condition
from .text.encoders import TextEncoder, load_text_encoder
from .provenance import watermark as wm
from .video.image import image_sha256, load_image
from .video.io import frames_to_uint8, uint8_to_tensor

if TYPE_CHECKING:
    from .evaluate.ood import PromptOOD

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
# shapes-pruned: compress/prune.py; shapes-distilled: compress/distill.py; shapes-i2v: configs/shapes_i2v.toml
BUNDLED = {name: WEIGHTS_DIR / name for name in ("shapes", "shapes-pruned", "shapes-distilled", "shapes-i2v")}
DEFAULT_MODEL = "shapes"
READER_DIR = "prompt_reader"  # a model directory's optional PromptReader (text/reader.py)
SAMPLING_DEFAULTS = {"steps": 20, "guidance": 4.0, "sampler": "unipc", "shift": 1.0}
LIMITS = {"steps": (1, 500), "guidance": (0.0, 30.0), "frames": (2, 64), "prompt_chars": 1000}


def vae_scale_factor(vae) -> int:
    """How many pixels one latent cell spans per side (each encoder block but the last halves the size)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A short name of a bundled model ('shapes') or a directory."""
    if model is None:
        model = DEFAULT_MODEL
    path = BUNDLED.get(str(model), Path(model))
    if not (path / "model_index.json").is_file():
        from .backends import download, looks_like_hub_id

        if looks_like_hub_id(model):  # e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers, from the Hub cache or the Hub
            return download(str(model))
        known = ", ".join(BUNDLED)
        raise ModelLoadError(f"no vidiffuse model at {path} (model_index.json missing); "
                             f"give a model directory or one of: {known}")
    return path


def model_version(path: Path, index: dict | None = None) -> str:
    """model_index.json's "version", else the first 12 hex digits of the SHA-256 of the denoiser's weights."""
    index = index if index is not None else json.loads((Path(path) / "model_index.json").read_text())
    if index.get("version"):
        return str(index["version"])
    weights = Path(path) / "transformer" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return "unversioned"
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def watermark_model_label(name: str, version: str) -> str:
    """What the watermark's 16 model bits are a hash of."""
    return f"{name}@{version}"


@dataclass
class VideoOutput:
    frames: list[np.ndarray]  # per video, uint8 (T, H, W, 3)
    videos: torch.Tensor  # (B, C, T, H, W) float in [-1, 1]
    settings: list[dict]


class VideoPipeline:
    prompt_reader = None  # a PromptReader that rewrites prompts for the denoiser, when the model has one

    def __init__(self, transformer, vae, text_encoder: TextEncoder, frames: int = 16, size: int = 64, fps: int = 8,
                 defaults: dict | None = None, name: str = "custom"):
        self.transformer = transformer.eval()
        # oneDNN's convolutions run ~20% faster on NHWC tensors; decoding is a third of a video's time
        self.vae = vae.eval().to(memory_format=torch.channels_last)
        self.text_encoder = text_encoder
        self.decoder = None  # a TinyDecoder used in place of the autoencoder's decoder, when the model has one
        self.frames, self.size, self.fps, self.name = frames, size, fps, name
        self.defaults = {**SAMPLING_DEFAULTS, **(defaults or {})}
        self._empty = None
        self.path: Path | None = None  # the model directory, when loaded from one
        self.index: dict = {}  # model_index.json, when loaded from a directory

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, **options) -> "VideoPipeline":
        """A vidiffuse bundle, or a diffusers Wan / LTX-Video / CogVideoX pipeline directory (or Hub id);
        `options` are the latter's load options (`backends.load`: dtype, offload, vae_tiling, ...)."""
        from diffusers import AutoencoderKL

        from . import backends
        from .models.transformer import VideoDiT

        path = resolve_model_path(model)
        if backends.diffusers_class(path) is not None:
            return backends.load(path, **options)
        given = sorted(k for k, v in options.items() if v not in (None, False))
        if given:
            raise ConfigError(f"{', '.join(given)}: only for diffusers models (Wan, LTX-Video, CogVideoX), not {path.name}")
        try:
            index = json.loads((path / "model_index.json").read_text())
            if index.get("quantization"):  # written by `vidiffuse quantize`: int8 or bf16 denoiser weights
                from .compress.quantize import load_quantized_transformer

                transformer = load_quantized_transformer(path / "transformer", index["quantization"])
            else:
                transformer = VideoDiT.from_pretrained(path / "transformer", torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(path / "vae")
            decoder = None
            if (path / "decoder" / "config.json").is_file():
                from .models.tiny_decoder import TinyDecoder

                decoder = TinyDecoder.from_pretrained(path / "decoder").eval().to(memory_format=torch.channels_last)
            reader = None
            if (path / READER_DIR / "config.json").is_file():
                from .text.reader import PromptReader

                reader = PromptReader.from_pretrained(path / READER_DIR).eval()
        except ModelLoadError:
            raise
        except Exception as e:  # diffusers raises OSError/ValueError/SafetensorError/JSON errors for bad files
            raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        text_encoder = load_text_encoder(index.get("text_encoder", "minilm"), index.get("text_encoder_path"),
                                         max_length=int(index.get("max_length", 24)))
        pipe = cls(transformer, vae, text_encoder, frames=index["frames"], size=index["size"], fps=index["fps"],
                   defaults=index.get("defaults"), name=index.get("name", path.name))
        pipe.path, pipe.index, pipe.decoder, pipe.prompt_reader = path, index, decoder, reader
        if index.get("quantization") == "int8-dynamic":  # the decoder is saved in float and made int8 here
            from .compress.quantize import decoding_module, quantize_decoder

            quantize_decoder(decoding_module(pipe))
        return pipe

    @functools.cached_property
    def version(self) -> str:
        return model_version(self.path, self.index) if self.path else "unversioned"

    # -- LoRA adapters (models/lora.py): stacked beside the base weights, never merged into them

    @property
    def loras(self) -> dict[str, dict]:
        """The loaded adapters by name: {"path", "sha256", "scale", "components"}."""
        return self.__dict__.setdefault("_loras", {})

    @property
    def base_version(self) -> str:
        """The base model's version, whatever adapters are loaded (`version` names base and adapters)."""
        if "_base_version" not in self.__dict__:
            self._base_version = self.version
        return self._base_version

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Stack a LoRA (a `vidiffuse train` [lora] output or a diffusers LoRA directory) at `scale`; returns
        its adapter name. A LoRA recorded as made for another base model is refused (ModelLoadError)."""
        from .models import lora as lora_io

        lora = lora_io.read_lora(path)
        lora_io.check_base(lora, self.base_version, self.name)
        if "vae" in lora.components and self.decoder is not None:
            raise ConfigError(f"LoRA {path} changes the autoencoder, but {self.name} decodes with its own distilled "
                              "decoder, which the adapter does not reach; use it with the model it was trained on")
        parts = {"transformer": self.transformer, "vae": self.vae}
        unknown = [c for c in lora.components if c not in parts]
        if unknown:
            raise ModelLoadError(f"LoRA {path} changes {', '.join(unknown)}; this pipeline takes adapters on "
                                 f"{', '.join(parts)}")
        name = adapter_name or f"lora{len(self.loras)}"
        if name in self.loras:
            raise ConfigError(f"an adapter named {name!r} is already loaded")
        loaded = []
        try:
            for component in lora.components:
                lora_io.load_into(parts[component], lora, component, name)
                loaded.append(component)
        except Exception:
            for component in loaded:
                parts[component].delete_adapters(name)
            raise
        self.loras[name] = {"path": str(lora.path), "sha256": lora.digest, "scale": float(scale),
                            "components": lora.components}
        self._apply_loras()
        return name

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        if adapter_name not in self.loras:
            raise ConfigError(f"no adapter named {adapter_name!r}; loaded: {', '.join(self.loras) or 'none'}")
        self.loras[adapter_name]["scale"] = float(scale)
        self._apply_loras()

    def unload_lora(self) -> None:
        """Remove every adapter: the model computes with its exact base weights again."""
        from .models import lora as lora_io

        for module in (self.transformer, self.vae):
            lora_io.unload(module)
        self.loras.clear()
        self._apply_loras()

    def _apply_loras(self) -> None:
        from .models import lora as lora_io

        base = self.base_version
        for component, module in (("transformer", self.transformer), ("vae", self.vae)):
            lora_io.set_scales(module, {n: a["scale"] for n, a in self.loras.items() if component in a["components"]})
        if not self.loras:
            self.__dict__["version"] = base
            return
        # the version in watermarks and manifests names the adapters too: base+lora.<hash of files and scales>
        stack = json.dumps([[a["sha256"], a["scale"]] for a in self.loras.values()])
        self.__dict__["version"] = f"{base}+lora.{hashlib.sha256(stack.encode()).hexdigest()[:8]}"

    @functools.cached_property
    def ood_reference(self) -> PromptOOD | None:
        """The model's `PromptOOD` scorer, or None when its directory ships no reference."""
        from .evaluate.ood import REFERENCE_FILE, PromptOOD

        if self.path is None or not (self.path / REFERENCE_FILE).is_file():
            return None
        return PromptOOD.load(self.path / REFERENCE_FILE, self.text_encoder)

    def prompt_ood(self, prompts: str | Sequence[str]) -> list[dict] | None:
        """Per prompt, how far it lies from the training captions: {"score", "threshold", "ood"}.

        None when the model has no reference to compare with.
        """
        scorer = self.ood_reference
        if scorer is None:
            return None
        return [{"score": float(s), "threshold": scorer.threshold, "ood": bool(s > scorer.threshold)}
                for s in scorer.score(prompts)]

    def _validate(self, prompts: Sequence[str], steps: int, guidance: float, frames: int, sampler: str) -> None:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ConfigError("the prompt is empty")
            if len(p) > LIMITS["prompt_chars"]:
                raise ConfigError(f"the prompt is longer than {LIMITS['prompt_chars']} characters")
        for key, value in (("steps", steps), ("guidance", guidance), ("frames", frames)):
            lo, hi = LIMITS[key]
            if not lo <= value <= hi:
                raise ConfigError(f"{key} must be between {lo} and {hi}, got {value}")
        pt = self.transformer.config.patch_size[0]
        if frames % pt:
            raise ConfigError(f"frames must be a multiple of {pt} for this model, got {frames}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

    def _settings(self, prompt, seed, steps, guidance, sampler, frames) -> tuple[list[str], list[int], int, float, str, int]:
        """A call's arguments as lists and numbers, the model's defaults filled in, validated."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [int(seed)] * len(prompts) if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        steps = int(self.defaults["steps"] if steps is None else steps)
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
        sampler = str(self.defaults["sampler"] if sampler is None else sampler)
        frames = int(self.frames if frames is None else frames)
        self._validate(prompts, steps, guidance, frames, sampler)
        return prompts, seeds, steps, guidance, sampler, frames

    def denoiser_prompts(self, prompts: list[str]) -> list[str] | None:
        """What the denoiser reads for `prompts`: the prompt reader's plain rewrite, or None where the prompts
        go in as written (no reader, or a LoRA whose new words the reader never learned is loaded)."""
        if self.prompt_reader is None or self.loras:
            return None
        return self.prompt_reader.rewrite(self.text_encoder, prompts)

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb = self.text_encoder.encode(prompts)
        return {"encoder_hidden_states": emb.tokens, "encoder_attention_mask": emb.mask, "pooled_projections": emb.pooled}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        frames: int | None = None,
        batch_size: int = 8,
        progress: bool = True,
        callback: Callable[[int, int], None] | None = None,
        watermark: bool = True,
        output_type: str = "video",
        image=None,
    ) -> VideoOutput | torch.Tensor:
        """Generate one video per prompt. Each carries an invisible watermark naming the model and the
        generation (see `provenance.watermark`) unless `watermark=False`, which is logged and recorded in
        the returned settings (and from there in the file's signed manifest).

        `image` (a path, PIL image or uint8 array, or a list of them, one per prompt, None for text alone) is
        the first frame, for a model trained with image conditioning (`VideoDiT.with_image_conditioning`, e.g.
        `shapes-i2v`): the video starts from it and the prompt says what happens next. It is centre-cropped to
        a square and resized to the model's size; its hash is recorded in the settings and the watermark.

        `output_type="latent"` returns the sampled latents (B, c, T, h, w) instead, undecoded and unmarked
        (as diffusers pipelines do): for distillation, not for people."""
        if output_type not in ("video", "latent"):
            raise ConfigError(f"output_type must be 'video' or 'latent', got {output_type!r}")
        prompts, seeds, steps, guidance, sampler, frames = self._settings(prompt, seed, steps, guidance, sampler, frames)
        firsts, first_latents, first_given = self._first_frame(image, len(prompts))
        read_as = self.denoiser_prompts(prompts)
        texts = prompts if read_as is None else read_as
        side = self.size // vae_scale_factor(self.vae)
        latent_shape = (self.vae.config.latent_channels, frames, side, side)
        total = len(prompts) * steps
        done_before = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="generate", unit="step", leave=False)
        videos = []
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = texts[start : start + batch_size], seeds[start : start + batch_size]
            # one generator per video: a video depends on its own seed, not on its batch-mates
            noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in chunk_seeds])
            with autocast():
                cond = self._encode_text(chunk)
                if self._empty is None:
                    self._empty = self._encode_text([""])
                uncond = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in self._empty.items()}
                first, given = None, None
                if first_latents is not None:  # the image is in both branches: guidance is on the text alone
                    first, given = first_latents[start : start + batch_size], first_given[start : start + batch_size]
                    cond["condition"] = uncond["condition"] = first_frame_condition(first, frames, given)

                def report(i: int, n: int, base: int = done_before, k: int = len(chunk)) -> None:
                    if bar is not None:
                        bar.n = min(total, base + i * k)
                        bar.refresh()
                    if callback is not None:
                        callback(base // k + i if k else i, total // max(k, 1))

                latents = sample(self.transformer, noise, cond, uncond, make_scheduler(sampler, float(self.defaults["shift"])),
                                 steps, guidance, callback=report, first_frame=first, first_given=given)
                videos.append(latents if output_type == "latent" else self.decode(latents))
            done_before += steps * len(chunk)
        if bar is not None:
            bar.close()
        if output_type == "latent":
            return torch.cat(videos)
        settings = [{"prompt": p, "seed": s, "steps": steps, "guidance": guidance, "sampler": sampler, "frames": frames,
                     "model": self.name} for p, s in zip(prompts, seeds)]
        if read_as is not None:
            for record, text in zip(settings, read_as):
                record["read_as"] = text
        if firsts is not None:
            for record, first in zip(settings, firsts):
                if first is not None:
                    record["image_sha256"] = image_sha256(first)
        return self._finish(torch.cat(videos), settings, watermark)

    @property
    def takes_image(self) -> bool:
        return bool(getattr(self.transformer.config, "image_conditioning", False))

    def _first_frame(self, image, n: int) -> tuple[list | None, torch.Tensor | None, torch.Tensor | None]:
        """For image-to-video, the `n` first frames as given (one image for all, or a list of `n`, where None
        means text alone for that prompt), their latents (n, c, h, w), zero where None, and which prompts
        have one (n,); (None, None, None) without any image."""
        images = list(image) if isinstance(image, (list, tuple)) else [image] * n
        if all(im is None for im in images):
            return None, None, None
        if not self.takes_image:
            raise ConfigError(f"{self.name} is text-to-video only; --image needs an image-to-video model: a VideoDiT "
                              "trained with image conditioning (e.g. shapes-i2v), a diffusers Wan or CogVideoX I2V, "
                              "or LTX-Video")
        if len(images) != n:
            raise ConfigError(f"{n} prompts but {len(images)} images")
        from PIL import Image, ImageOps

        firsts = [None if im is None else load_image(im) for im in images]
        latents = {}
        for i, first in enumerate(firsts):  # one at a time: a video must not depend on which images share its call
            if first is not None:
                square = ImageOps.fit(first, (self.size, self.size), method=Image.Resampling.LANCZOS)
                x = uint8_to_tensor(np.array(square)[None]).transpose(0, 1)  # (1, 3, H, W) in [-1, 1]; a writable copy
                with torch.no_grad():
                    z = self.vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mode()
                latents[i] = z[0].float() * self.vae.config.scaling_factor
        zero = torch.zeros_like(next(iter(latents.values())))
        given = torch.tensor([first is not None for first in firsts])
        return firsts, torch.stack([latents.get(i, zero) for i in range(n)]), given

    def _finish(self, video: torch.Tensor, settings: list[dict], watermark: bool) -> VideoOutput:
        """uint8 frames of `video` (B, C, T, H, W), each marked with its record's payload (or the mark's
        absence logged and recorded); shared by every pipeline class, so all mark alike."""
        frames_u8 = [frames_to_uint8(v) for v in video]
        if watermark:
            for i, record in enumerate(settings):
                payload = self.watermark_payload(record)
                frames_u8[i] = wm.embed(frames_u8[i], payload)
                record["watermark"] = {"enabled": True, "payload": f"{payload:08x}", "method": wm.METHOD}
            video = torch.stack([uint8_to_tensor(f) for f in frames_u8])
        else:
            logger.warning("watermarking is off: %d video(s) from model %r carry no invisible mark", len(settings), self.name)
            for record in settings:
                record["watermark"] = {"enabled": False}
        return VideoOutput(frames_u8, video, settings)

    def watermark_payload(self, record: dict) -> int:
        """16 bits naming this model (name and version), 16 naming the generation (prompt, seed and settings)."""
        fields = {k: record[k] for k in ("prompt", "seed", "steps", "guidance", "sampler", "frames")}
        if "image_sha256" in record:  # image-to-video: the first frame is part of what was asked for
            fields["image_sha256"] = record["image_sha256"]
        generation = json.dumps(fields, sort_keys=True)
        return wm.make_payload(watermark_model_label(self.name, self.version), generation)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, T, h, w) → video (B, 3, T, H, W) in [-1, 1], frame by frame."""
        b, c, t, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * t, c, h, w) / self.vae.config.scaling_factor
        z = z.to(torch.float32).contiguous(memory_format=torch.channels_last)
        decoder = self.decoder or self.vae
        # one video's frames at a time: decoding a whole batch at once ran 1.6x slower on 2 cores
        # (2.34 s against 1.47 s for 8 videos; the activations no longer fit in cache) and held more memory
        x = torch.cat([decoder.decode(chunk).sample.float() for chunk in z.split(t)]).clamp(-1, 1)
        return x.view(b, t, 3, *x.shape[-2:]).transpose(1, 2)


def save_bundle(out: Path, transformer, vae, text_encoder: TextEncoder, frames: int, size: int, fps: int = 8,
                defaults: dict | None = None, name: str | None = None, extra: dict | None = None) -> Path:
    """Write a model directory atomically."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        # bf16 on disk halves the size; weights trained under bf16 autocast lose nothing by it
        copy.deepcopy(transformer).to(torch.bfloat16).save_pretrained(tmp / "transformer")
        vae.save_pretrained(tmp / "vae")
        index = {"_class_name": "VideoPipeline", "name": name or out.name, "frames": frames, "size": size, "fps": fps,
                 "text_encoder": text_encoder.name, "max_length": text_encoder.max_length,
                 "defaults": {**SAMPLING_DEFAULTS, **(defaults or {})}, **(extra or {})}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
