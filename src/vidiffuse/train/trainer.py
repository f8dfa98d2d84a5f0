"""`vidiffuse train`: one loop for the three parts of the default model.

Stage 1 (`task = "autoencoder"`) trains a small per-frame AutoencoderKL (diffusers) so that stage 2
(`task = "denoiser"`) runs diffusion in a 48x smaller latent space — the sample efficiency the naive
pixel-space recipe lacked (DESIGN.md §6). `task = "reader"` trains the prompt reader that rewrites a
prompt into the captions' plain words before the denoiser reads it (train/reader.py).

With a [lora] section (or `--lora`) either stage trains a LoRA adapter on a frozen base model instead
(train/lora.py).

Every random draw of a step (which examples, which noise, which t) is seeded by (seed, step), so a
resumed run continues exactly where a killed one stopped, and any process layout — one process, N DDP or
FSDP processes (train/distributed.py), `grad_accum` micro-batches — trains on the same global batch with
the same noise: the loss curve is the same to float tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import shapes
from ..data.manifest import canonical_json, manifest_sha256, training_data_manifest
from ..diffusion.flow import flow_matching_loss, sample_t
from ..errors import ConfigError
from ..files import sha256_file, write_atomic
from ..models.transformer import first_frame_condition
from ..pipeline import model_version, vae_scale_factor
from ..precision import autocast, use_bf16
from . import distributed
from .checkpoint import has_checkpoint, read_checkpoint, write_checkpoint
from .data import extra_colors, frame_pool, latent_dataset, shapes_specs
from .lora import LORA_DIR, DiffusersLoraTask, attach, base_record, export_lora, load_base, lora_section
from .reader import ReaderTask

DEFAULT_RUN = {
    "seed": 0, "steps": 1000, "batch_size": 32, "lr": 3e-4, "warmup": 100, "weight_decay": 0.0,
    "ema_decay": 0.999, "grad_clip": 1.0, "checkpoint_every": 200, "eval_every": 500, "log_every": 10,
    "precision": "auto", "threads": 0, "compile": False,
    # scale-out (train/distributed.py): micro-batches per step, recomputed activations, process layout
    "grad_accum": 1, "gradient_checkpointing": False, "strategy": "ddp", "device": "auto",
}


def load_config(path: str | Path, lora: bool = False) -> dict:
    """Read a training config; `lora` (the --lora flag) trains an adapter even without a [lora] section."""
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if lora or "lora" in cfg:
        cfg["lora"] = lora_section(cfg, path)
        cfg.setdefault("run", {}).setdefault("task", "denoiser")
    run = {**DEFAULT_RUN, **cfg.get("run", {})}
    if run.get("task") not in TASKS:
        raise ConfigError(f"{path}: [run] task must be one of {', '.join(map(repr, TASKS))}")
    for key in ("steps", "batch_size"):
        if int(run[key]) <= 0:
            raise ConfigError(f"{path}: [run] {key} must be positive, got {run[key]}")
    if "out_dir" not in run:
        raise ConfigError(f"{path}: [run] out_dir is required")
    use_bf16(run["precision"])  # rejects an unknown precision before any data is built
    distributed.check_run(run, str(path))
    if int(run["batch_size"]) % int(run["grad_accum"]):
        raise ConfigError(f"{path}: [run] batch_size {run['batch_size']} must be divisible by grad_accum {run['grad_accum']}")
    if "lora" in cfg and run["strategy"] == "fsdp":
        raise ConfigError(f"{path}: LoRA trains a few MB of weights; use strategy = \"ddp\" (FSDP is for models "
                          "that do not fit one device)")
    if run["compile"] and run["strategy"] == "fsdp":
        raise ConfigError(f"{path}: compile = true is not supported with strategy = \"fsdp\"")
    cfg["run"] = run
    cfg.setdefault("data", {}).setdefault("num_clips", 1000)
    if run["task"] == "reader" and cfg["data"].get("kind", "shapes") != "shapes":
        raise ConfigError(f'{path}: [run] task = "reader" learns from the attributes each shapes-world caption '
                          'states: [data] kind must be "shapes"')
    cfg.setdefault("model", {})
    return cfg


def _rng(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


class AutoencoderTask:
    device = torch.device("cpu")
    base = None  # the base model's pipeline, for a LoRA run
    carry = None

    def __init__(self, cfg: dict, out_dir: Path, base=None):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        frames, size = int(cfg["data"].get("frames", shapes.FRAMES)), int(cfg["data"].get("size", shapes.SIZE))
        self.frames = frame_pool(cfg["data"], frames, size, out_dir.parent / "cache")
        self.num_examples = len(self.frames)
        self.extra_colors = extra_colors(cfg["data"]) if cfg["data"].get("kind", "shapes") == "shapes" else []
        if base is None:
            model_cfg = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                         "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 64, 64, 64],
                         "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
                         "mid_block_add_attention": False, **cfg["model"]}
            self.model = AutoencoderKL(**model_cfg)
        else:
            self._init_lora(cfg, base, frames)
        self.kl_weight = float(cfg["run"].get("kl_weight", 1e-6))
        self.fg_weight = float(cfg["run"].get("foreground_weight", 0.0))
        held_out = {**cfg["data"], "num_clips": 32, "seed": int(cfg["data"].get("seed", 0)) + 10_000}
        self.eval_clips = frame_pool(held_out, frames, size, out_dir.parent / "cache").view(32, frames, 3, size, size)

    def _init_lora(self, cfg: dict, base, frames: int) -> None:
        """Adapt the base model's autoencoder. Frames of the colours it already knows keep their latents
        (`preserve_weight` × squared distance to the base encoder's), so the base denoiser, trained on
        those latents, still reads them; frames of new colours are free to move."""
        if not hasattr(base, "text_encoder") or base.text_encoder is None:
            raise ConfigError("an autoencoder LoRA needs a vidiffuse model as [lora] base")
        self.base = base
        self.model = base.vae.float().train()
        self.preserve = float(1.0 if cfg["lora"]["preserve_weight"] is None else cfg["lora"]["preserve_weight"])
        self.anchor = None
        if self.preserve > 0 and self.extra_colors:
            new = torch.tensor([spec.color in self.extra_colors for spec, _ in shapes_specs(cfg["data"])])
            self.keep = (~new).repeat_interleave(frames)
            with torch.no_grad(), autocast(cfg["run"]["precision"]):
                self.anchor = torch.cat([self.model.encode(chunk.float().div(127.5).sub(1)).latent_dist.mean.to(torch.bfloat16)
                                         for chunk in tqdm(self.frames.split(256), desc="base latents")])
        self.lora_params = attach(self.model, cfg["lora"])

    def lora_parts(self, ema) -> dict:
        return {"vae": ema}

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part) -> torch.Tensor:
        x = self.frames[idx[part]].float().div(127.5).sub(1).to(self.device)
        posterior = model.encode(x).latent_dist
        noise = torch.randn((len(idx), *posterior.mean.shape[1:]), generator=gen)[part].to(self.device)
        z = posterior.mean + posterior.std * noise
        rec = model.decode(z).sample.float()
        err = rec - x
        # small objects on plain backgrounds are a few % of the pixels: weight the pixels that differ from
        # the frame's border colour, or the autoencoder settles for blurry blobs (seen at 500 steps)
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 0], x[..., -1]], dim=-1).median(dim=-1).values
        foreground = ((x - border[..., None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()
        weight = 1 + self.fg_weight * foreground
        err = err * weight / weight.mean(dim=(1, 2, 3), keepdim=True)
        loss = err.abs().flatten(1).mean(1) + err.pow(2).flatten(1).mean(1) + self.kl_weight * posterior.kl()
        if self.base is not None and self.anchor is not None:
            rows = idx[part]
            drift = (posterior.mean.float() - self.anchor[rows].float().to(self.device)).pow(2).flatten(1).mean(1)
            loss = loss + self.preserve * drift * self.keep[rows].float().to(self.device)
        return loss

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        clips = self.eval_clips
        n, t = clips.shape[:2]
        x = clips.flatten(0, 1).float().div(127.5).sub(1)
        with autocast(self.cfg["run"]["precision"]):
            rec = model.decode(model.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = (rec - x).pow(2).mean().item()
        rec_u8 = ((rec + 1) * 127.5).round().byte().view(n, t, 3, *x.shape[-2:]).permute(0, 1, 3, 4, 2).numpy()
        extra = self.extra_colors
        truth = [shapes.analyze_video(c.permute(0, 2, 3, 1).numpy(), extra) for c in clips]
        readings = [shapes.analyze_video(r, extra) for r in rec_u8]
        agree = {a: float(np.mean([r[a] == tr[a] for r, tr in zip(readings, truth)])) for a in shapes.ATTRIBUTES}
        for color in extra:  # how well the new colours come back through the autoencoder
            hits = [r["color"] == color for r, tr in zip(readings, truth) if tr["color"] == color]
            if hits:
                agree[f"color_{color}"] = float(np.mean(hits))
        return {"psnr": 10 * math.log10(4 / max(mse, 1e-12)), **{f"agree_{a}": v for a, v in agree.items()}}

    def export(self, ema, out: Path) -> None:
        with torch.no_grad(), autocast(self.cfg["run"]["precision"]):
            x = self.frames[torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(0))[:1024]]
            z = ema.encode(x.float().div(127.5).sub(1)).latent_dist.mode().float()
        ema.register_to_config(scaling_factor=float(1.0 / z.std()))
        ema.save_pretrained(out)


class DenoiserTask:
    data_manifest_sha256: str | None = None  # set by train() before export
    fine_tuned_from: dict | None = None  # {"name", "version"} of an init_from run's start, set by train()
    device = torch.device("cpu")

    def __init__(self, cfg: dict, out_dir: Path, base=None, device: torch.device = torch.device("cpu")):
        from diffusers import AutoencoderKL

        from ..models.transformer import VideoDiT
        from ..text.encoders import load_text_encoder

        self.cfg = cfg
        data = cfg["data"]
        self.base, self.carry = base, None
        self.extra_colors = extra_colors(data) if data.get("kind", "shapes") == "shapes" else []
        if base is None:
            self.frames, self.size = int(data.get("frames", shapes.FRAMES)), int(data.get("size", shapes.SIZE))
            vae_path = Path(cfg["autoencoder"]["path"])
            self.vae = AutoencoderKL.from_pretrained(vae_path).eval()
            text = cfg.get("text", {})
            self.text_encoder = load_text_encoder(text.get("encoder", "minilm"), text.get("path"),
                                                  max_length=int(text.get("max_length", 24)))
            vae_id = sha256_file(vae_path / "diffusion_pytorch_model.safetensors")
            self.sampling = cfg.get("sampling", {})
        else:  # LoRA: everything but the adapter comes from the base model
            self.frames, self.size = base.frames, base.size
            self.vae, self.text_encoder = base.vae.float().eval(), base.text_encoder
            vae_id = sha256_file(base.path / "vae" / "diffusion_pytorch_model.safetensors")
            if cfg["lora"].get("vae"):
                vae_id += "+" + self._carry_autoencoder_lora(cfg["lora"]["vae"], base)
            self.sampling = {**base.defaults, **cfg.get("sampling", {})}
        self.data = latent_dataset(data, self.frames, self.size, self.vae, self.text_encoder,
                                   out_dir.parent / "cache", vae_id=vae_id, device=device,
                                   precision=cfg["run"]["precision"])  # a run in fp32 encodes its data in fp32 too
        self.num_examples = len(self.data["caption_clip"])
        self.empty = self.text_encoder.encode([""])
        if base is None and cfg["run"].get("init_from"):  # fine-tune every weight of a trained denoiser
            self.model = VideoDiT.from_pretrained(init_path(cfg) / "transformer").float().train()
            if cfg["model"].get("image_conditioning") and not self.model.config.image_conditioning:
                self.model = VideoDiT.with_image_conditioning(self.model).train()  # text-to-video → image-to-video
        elif base is None:
            self.model = VideoDiT(in_channels=self.vae.config.latent_channels, text_dim=self.text_encoder.dim,
                                  sample_frames=self.frames, sample_size=self.size // vae_scale_factor(self.vae),
                                  **cfg["model"])
        else:
            self.model = base.transformer.float().train()
            self._init_preservation(cfg, data)
            self.lora_params = attach(self.model, cfg["lora"])
        run = cfg["run"]
        self.p_uncond = float(run.get("p_uncond", 0.1))
        # image-to-video: each example is conditioned on its own first frame, except a share `p_no_image`
        # trained on text alone, so the model keeps doing text-to-video too
        self.image_conditioning = bool(getattr(self.model.config, "image_conditioning", False))
        self.p_no_image = float(run.get("p_no_image", 0.1))
        if self.image_conditioning and self.teacher is not None:
            raise ConfigError("[lora] preserve_weight with extra colours is not supported on an image-to-video "
                              "base; set preserve_weight = 0")
        self.t_mean, self.t_std, self.t_shift = (float(run.get(k, d)) for k, d in
                                                 (("t_mean", 0.0), ("t_std", 1.0), ("t_shift", 1.0)))

    def _carry_autoencoder_lora(self, path: str, base) -> str:
        """Train on the latents of an autoencoder LoRA (whose adapter the exported LoRA then carries)."""
        from ..models import lora as lora_io

        self.carry = lora_io.read_lora(path)
        lora_io.check_base(self.carry, base.base_version, base.name)
        if "vae" not in self.carry.components:
            raise ConfigError(f"[lora] vae = {path!r} holds no autoencoder ('vae') adapter")
        lora_io.load_into(self.vae, self.carry, "vae", "default")
        return self.carry.digest

    teacher = None

    def _init_preservation(self, cfg: dict, data: dict) -> None:
        """[lora] preserve_weight > 0 with extra colours: on clips of the colours the model knows, the adapted
        denoiser is also pulled towards the frozen base denoiser's prediction (prior preservation), so what
        it knew drifts less than replaying those clips alone allows."""
        self.preserve = float(cfg["lora"]["preserve_weight"] or 0.0)
        if self.preserve <= 0 or not self.extra_colors:
            return
        known = torch.tensor([spec.color not in self.extra_colors for spec, _ in shapes_specs(data)])
        self.known_caption = known[self.data["caption_clip"]]
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def lora_parts(self, ema) -> dict:
        return {"transformer": ema}

    def _draw(self, idx: torch.Tensor, gen: torch.Generator, part) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a global batch: x0, noise, t and conditioning on the training device, and their
        example indices."""
        d, dev = self.data, self.device
        # draw the whole global batch's randomness, then keep this rank's part of it
        drop = (torch.rand(len(idx), generator=gen) < self.p_uncond)[part]
        noise = torch.randn((len(idx), *d["latents"].shape[1:]), generator=gen)[part]
        t = sample_t(len(idx), gen, self.t_mean, self.t_std, self.t_shift)[part]
        # drawn last, and only by image-to-video runs: text-to-video runs keep their random stream
        image = (torch.rand(len(idx), generator=gen) >= self.p_no_image)[part] if self.image_conditioning else None
        idx = idx[part]
        x0 = d["latents"][d["caption_clip"][idx]].float()
        tokens, mask, pooled = d["tokens"][idx].float(), d["mask"][idx].clone(), d["pooled"][idx].float()
        tokens[drop], mask[drop], pooled[drop] = self.empty.tokens[0], self.empty.mask[0], self.empty.pooled[0]
        cond = {"encoder_hidden_states": tokens.to(dev), "encoder_attention_mask": mask.to(dev),
                "pooled_projections": pooled.to(dev)}
        if image is not None:  # the latents are per frame, so frame 0's latent is the first frame's encoding
            cond["condition"] = first_frame_condition(x0[:, :, 0], x0.shape[2], image).to(dev)
        return x0.to(dev), noise.to(dev), t.to(dev), cond, idx

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part) -> torch.Tensor:
        if self.teacher is not None:
            return self._loss_with_preservation(model, idx, gen, part)
        x0, noise, t, cond, _ = self._draw(idx, gen, part)
        if self.image_conditioning:
            return self._image_to_video_loss(model, x0, noise, t, cond)
        return flow_matching_loss(model, x0, noise, t, **cond)

    @staticmethod
    def _image_to_video_loss(model, x0, noise, t, cond) -> torch.Tensor:
        """Flow matching with the given first frame clean in the input (as LTX-Video conditions on frames):
        the model learns to continue a frame it sees, not to redraw it; frame 0's loss is left out there,
        since its noise is not in the input to predict."""
        from ..diffusion.flow import interpolate
        from ..diffusion.sampling import hold_first_frame

        given = cond["condition"][:, -1, 0].flatten(1).any(1)  # the mask channel
        xt = hold_first_frame(interpolate(x0, noise, t), x0[:, :, 0], given)
        err = (model(xt, t * 1000, **cond).sample.float() - (noise - x0).float()).pow(2)
        weight = torch.ones_like(err)
        weight[given, :, 0] = 0
        return (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)

    def _loss_with_preservation(self, model, idx: torch.Tensor, gen: torch.Generator, part) -> torch.Tensor:
        from ..diffusion.flow import interpolate

        dev = self.device
        x0, noise, t, cond, idx = self._draw(idx, gen, part)
        xt = interpolate(x0, noise, t)
        pred = model(xt, t * 1000, **cond).sample.float()
        loss = (pred - (noise - x0)).pow(2).flatten(1).mean(1)
        known = self.known_caption[idx].to(dev)
        if known.any():
            self.teacher.to(dev)
            with torch.no_grad():
                target = self.teacher(xt[known], t[known] * 1000, **{k: v[known] for k, v in cond.items()}).sample.float()
            drift = torch.zeros_like(loss)
            drift[known] = (pred[known] - target).pow(2).flatten(1).mean(1)
            loss = loss + self.preserve * drift
        return loss

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from ..pipeline import VideoPipeline

        pipe = VideoPipeline(transformer=model, vae=self.vae, text_encoder=self.text_encoder,
                             frames=self.frames, size=self.size, defaults=self.sampling)
        if self.image_conditioning:
            from ..evaluate.image_to_video import score_image_to_video

            n = int(self.cfg["run"].get("eval_prompts", 24))
            return {**{f"text_{k}": v for k, v in self._text_to_video_scores(pipe).items()},
                    **{f"image_{k}": v for k, v in score_image_to_video(pipe, n)["overall"].items()}}
        return self._text_to_video_scores(pipe)

    def _text_to_video_scores(self, pipe) -> dict:
        extra = self.extra_colors
        prompts, truth = eval_prompts(int(self.cfg["run"].get("eval_prompts", 24)), extra_colors=extra)
        videos = pipe(prompts, seed=0, progress=False).frames
        readings = [shapes.analyze_video(v, extra) for v in videos]
        old = [(r, tr) for r, tr in zip(readings, truth) if tr["color"] not in extra]
        scores = {f"acc_{a}": float(np.mean([r[a] == tr[a] for r, tr in old])) for a in shapes.ATTRIBUTES}
        for color in extra:  # prompts asking for a new colour: that colour, and the other attributes
            asked = [(r, tr) for r, tr in zip(readings, truth) if tr["color"] == color]
            scores[f"acc_color_{color}"] = float(np.mean([r["color"] == color for r, _ in asked]))
            scores[f"acc_others_{color}"] = float(np.mean([r[a] == tr[a] for r, tr in asked for a in shapes.ATTRIBUTES
                                                           if a != "color"]))
        return scores

    def export(self, ema, out: Path) -> None:
        from ..pipeline import save_bundle

        save_bundle(out, transformer=ema, vae=self.vae, text_encoder=self.text_encoder, frames=self.frames,
                    size=self.size, defaults=self.cfg.get("sampling", {}),
                    extra={"training_data_manifest_sha256": self.data_manifest_sha256,
                           **({"fine_tuned_from": self.fine_tuned_from} if self.fine_tuned_from else {})})


def init_path(cfg: dict) -> Path:
    """The model directory whose denoiser a `[run] init_from` run starts from; its autoencoder must be the
    config's, or the weights would be fine-tuned on latents they never saw."""
    from ..pipeline import resolve_model_path

    from safetensors.torch import load_file

    path = resolve_model_path(cfg["run"]["init_from"])
    ours = Path(cfg.get("autoencoder", {}).get("path", "")) / "diffusion_pytorch_model.safetensors"
    theirs = load_file(path / "vae" / "diffusion_pytorch_model.safetensors")
    same = ours.is_file() and (mine := load_file(ours)).keys() == theirs.keys() and all(
        torch.equal(mine[k], theirs[k]) for k in theirs)
    if not same:
        raise ConfigError(f"[run] init_from = {cfg['run']['init_from']!r}: [autoencoder] path must be that model's "
                          f"autoencoder ({path / 'vae'})")
    return path


def eval_prompts(n: int, seed: int = 1234, extra_colors: list[str] | tuple = ()) -> tuple[list[str], list[dict]]:
    """A fixed set of fully specified prompts with their attributes, for watching quality while training.

    With `extra_colors`, every other prompt asks for one of them (the v1 prompts stay as they were).
    """
    rng = np.random.default_rng(seed)
    prompts, truth = [], []
    for i in range(n):
        spec = shapes.sample_clip_spec(rng)
        attrs = spec.attributes()
        if extra_colors and i % 2:
            attrs["color"] = extra_colors[(i // 2) % len(extra_colors)]
        prompts.append(shapes.make_caption(attrs, rng))
        truth.append(attrs)
    return prompts, truth


TASKS = {"autoencoder": AutoencoderTask, "denoiser": DenoiserTask, "reader": ReaderTask}


DATA_MANIFEST = "data_manifest.json"


def _data_manifest(cfg: dict, base=None) -> dict:
    """What this run trains on (licence-checked for folder data), plus the autoencoder's data for a denoiser
    and, for a LoRA, the base model's."""
    data = cfg["data"]
    frames, size = int(data.get("frames", shapes.FRAMES)), int(data.get("size", shapes.SIZE))
    manifest = training_data_manifest(data, frames, size, cfg["run"]["task"])
    extra = extra_colors(data) if data.get("kind", "shapes") == "shapes" else []
    if extra:  # the opt-in colours change the clips: the manifest must say so
        for entry in manifest.get("generator", []):
            entry["extra_colors"] = extra
            entry["extra_color_share"] = float(data.get("extra_color_share",
                                                        len(extra) / (len(shapes.COLORS) + len(extra))))
            entry["extra_color_scheme"] = "clip i gets extra_colors[k] when numpy.random.default_rng([seed, i, 0xC0105]) says so"
    upstream = Path(cfg.get("autoencoder", {}).get("path", "")) / "training" / DATA_MANIFEST
    if cfg["run"]["task"] == "denoiser" and upstream.is_file():
        manifest["upstream_manifests"] = {"autoencoder": sha256_file(upstream)}
    if base is not None:
        manifest.setdefault("upstream_manifests", {})["base_model"] = base_record(base)
    if cfg["run"].get("init_from"):  # the starting weights' own training data is part of this model's
        path = init_path(cfg)
        index = json.loads((path / "model_index.json").read_text())
        manifest.setdefault("upstream_manifests", {})["init_from"] = {
            "name": str(cfg["run"]["init_from"]), "version": model_version(path, index),
            "training_data_manifest_sha256": index.get("training_data_manifest_sha256")}
    return manifest


def _record_manifest(manifest: dict, out: Path, resume: bool) -> str:
    """Write the run's data manifest; a resumed run must still be reading the same data."""
    digest, path = manifest_sha256(manifest), out / DATA_MANIFEST
    if resume and path.is_file() and sha256_file(path) != digest:
        raise ConfigError(f"the training data changed since this run started ({path} no longer matches the data); "
                          "start a new run (another out_dir) to train on the new data")
    write_atomic(path, canonical_json(manifest))
    return digest


def _train_autocast(device: torch.device, precision: str):
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16, enabled=precision != "fp32")
    return autocast(precision)


def train(config_path: str | Path, resume: bool = False, max_steps: int | None = None, lora: bool = False,
          steps: int | None = None) -> Path:
    """Run (or resume) the training described by a TOML config; returns the exported model (or LoRA) directory.

    `lora` (the --lora flag) trains a LoRA adapter as if the config had a [lora] section with the defaults.
    `steps` replaces the config's [run] steps (scripts/train_within.py sets it from a time budget).
    """
    cfg = load_config(config_path, lora=lora)
    run = cfg["run"]
    if steps is not None:
        run["steps"] = int(steps)
    layout = distributed.init(run)
    rank, world = layout.rank, layout.world
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    seed, steps, batch = int(run["seed"]), int(run["steps"]), int(run["batch_size"])
    accum = int(run["grad_accum"])
    if batch % (world * accum):
        raise ConfigError(f"batch_size {batch} must be divisible by the number of processes ({world}) "
                          f"times grad_accum ({accum})")
    out = Path(run["out_dir"])
    ckpt_dir = out / "checkpoint"
    if layout.main:
        out.mkdir(parents=True, exist_ok=True)
        if has_checkpoint(ckpt_dir) and not resume:
            raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another out_dir")
    base = None
    if "lora" in cfg:
        base = load_base(cfg["lora"]["base"])
        cfg["data"].setdefault("frames", base.frames)
        cfg["data"].setdefault("size", base.size if isinstance(base.size, int) else min(base.size))
    # before any data is built: refused licences must stop the run, not an hour of latent encoding
    data_manifest = _data_manifest(cfg, base)
    data_digest = _record_manifest(data_manifest, out, resume) if layout.main else manifest_sha256(data_manifest)
    torch.manual_seed(seed)  # model initialisation
    task = _make_task(cfg, out, base, layout.device)
    task.data_manifest_sha256 = data_digest
    init = data_manifest.get("upstream_manifests", {}).get("init_from")
    if init:  # the manifest already resolved and hashed the starting model
        task.fine_tuned_from = {"name": init["name"], "version": init["version"]}
    task.device = layout.device
    model = task.model.to(layout.device)
    if run["gradient_checkpointing"]:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trained = set(distributed.trained_names(model))
    partial = base is not None  # a LoRA run keeps only its adapter's weights in checkpoints
    # evaluation and export run on an unsharded CPU copy when training is sharded or on a GPU
    template = (copy.deepcopy(model).cpu().eval().requires_grad_(False)
                if layout.main and (layout.sharded or layout.device.type != "cpu") else None)
    step_model = distributed.wrap(model, ema, layout)
    ema_pairs = [(pe, p) for pe, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(run["lr"]),
                                  weight_decay=float(run["weight_decay"]), betas=(0.9, 0.99))
    start = 0
    if resume and has_checkpoint(ckpt_dir):
        model_state, ema_state, optimizer_state, state = read_checkpoint(ckpt_dir)
        distributed.load_state(model, model_state, layout, partial)
        distributed.load_state(ema, ema_state, layout, partial)
        distributed.load_optimizer_state(model, optimizer, optimizer_state, layout)
        start = int(state["step"])
    if run["compile"]:
        step_model = torch.compile(step_model)

    def unsharded_ema():
        """The EMA weights as one CPU module (collective when sharded: every process calls this)."""
        if template is None and not layout.sharded:
            return ema
        state = distributed.full_state(ema, layout)
        if template is not None:
            template.load_state_dict(state)
        return template

    n_examples = task.num_examples
    train_autocast = _train_autocast(layout.device, run["precision"])
    metrics_path = out / "metrics.jsonl"
    end = steps if max_steps is None else min(steps, start + max_steps)
    # this process's rows of every global batch, in `accum` micro-batches
    mine = torch.arange(batch)[rank::world]
    micro_batches = mine.chunk(accum)
    bar = tqdm(total=steps, initial=start, desc=f"train {run['task']}{' lora' if partial else ''}",
               disable=not layout.main, dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), start
    for step in range(start, end):
        lr = float(run["lr"]) * min(1.0, (step + 1) / max(1, int(run["warmup"])))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(n_examples, (batch,), generator=_rng(seed, step, 0))
        loss = torch.zeros((), device=layout.device)
        for j, rows in enumerate(micro_batches):
            with distributed.sync_gradients(step_model, model, layout, sync=j == accum - 1):
                with train_autocast:
                    # the same (seed, step) noise whatever the layout; each micro-batch keeps its rows of it
                    part_loss = task.loss(step_model, idx, _rng(seed, step, 1), rows).sum() / len(mine)
                part_loss.backward()
            loss += part_loss.detach().float()
        grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], float(run["grad_clip"])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(float(run["ema_decay"]), (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in ema_pairs:
                p_ema.lerp_(p, 1 - decay)
        done = step + 1
        loss = float(distributed.mean_over_processes(loss, layout))
        if layout.main:
            bar.update(1)
            if done % int(run["log_every"]) == 0 or done == end:
                now = time.perf_counter()
                rate = (done - n_last) * batch / (now - t_last)
                t_last, n_last = now, done
                record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate,
                          "time": time.time()}
                bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:.1f}")
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        if done % int(run["checkpoint_every"]) == 0 or done == end:
            if layout.main or layout.sharded:  # gathering shards is collective
                names = trained if partial else None
                states = (distributed.full_state(model, layout, names), distributed.full_state(ema, layout, names),
                          distributed.optimizer_state(model, optimizer, layout))
                if layout.main:
                    write_checkpoint(ckpt_dir, *states, {"step": done, "config": cfg,
                                                         "training_data_manifest_sha256": data_digest,
                                                         "layout": {"processes": world, "strategy": layout.strategy,
                                                                    "grad_accum": accum}})
        if done % int(run["eval_every"]) == 0 or done == steps:
            if layout.main or layout.sharded:
                eval_model = unsharded_ema()
                if layout.main:
                    result = {"step": done, "eval": task.evaluate(eval_model)}
                    tqdm.write(json.dumps(result))
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    bar.close()
    final = out / (LORA_DIR if partial else "model")
    if end == steps:
        final_ema = unsharded_ema() if (layout.main or layout.sharded) else None
        if layout.main:
            training_files = {"training/config.json": json.dumps(cfg, indent=1, default=str) + "\n",
                              "training/" + DATA_MANIFEST: canonical_json(data_manifest)}
            if partial:
                if metrics_path.is_file():
                    training_files["training/metrics.jsonl"] = metrics_path.read_text()
                info = {"format_version": 1, "base_model": base_record(task.base),
                        "training_data_manifest_sha256": data_digest, "task": run["task"],
                        "rank": int(cfg["lora"]["rank"]), "alpha": cfg["lora"]["alpha"] or int(cfg["lora"]["rank"]),
                        "steps": steps, "batch_size": batch, "seed": seed}
                export_lora(final, task.lora_parts(final_ema), info, carry=task.carry, files=training_files)
            else:
                task.export(final_ema, final)
                (final / "training").mkdir(exist_ok=True)
                write_atomic(final / "training" / DATA_MANIFEST, canonical_json(data_manifest))
    distributed.barrier(layout)
    return final


def _make_task(cfg: dict, out: Path, base, device: torch.device):
    task = cfg["run"]["task"]
    from ..backends import DiffusersVideoPipeline

    if isinstance(base, DiffusersVideoPipeline):
        if task != "denoiser":
            raise ConfigError(f"a LoRA on {base.name} trains its denoiser: set [run] task = \"denoiser\"")
        return DiffusersLoraTask(cfg, out, base)
    if task == "denoiser":  # its training data is encoded on the training device
        return DenoiserTask(cfg, out, base, device)
    return TASKS[task](cfg, out, base=base)
