"""`vidiffuse train`: one loop for both stages of the default model.

Stage 1 (`task = "autoencoder"`) trains a small per-frame AutoencoderKL (diffusers) so that stage 2
(`task = "denoiser"`) runs diffusion in a 48x smaller latent space — the sample efficiency the naive
pixel-space recipe lacked (DESIGN.md §6).

Every random draw of a step (which examples, which noise, which t) is seeded by (seed, step), so a
resumed run continues exactly where a killed one stopped, and N DDP ranks split the same global batch
that one process would see.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data import shapes
from ..data.manifest import canonical_json, manifest_sha256, training_data_manifest
from ..diffusion.flow import flow_matching_loss, sample_t
from ..errors import ConfigError
from ..files import write_atomic
from ..pipeline import vae_scale_factor
from ..precision import autocast, use_bf16
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .data import frame_pool, latent_dataset

DEFAULT_RUN = {
    "seed": 0, "steps": 1000, "batch_size": 32, "lr": 3e-4, "warmup": 100, "weight_decay": 0.0,
    "ema_decay": 0.999, "grad_clip": 1.0, "checkpoint_every": 200, "eval_every": 500, "log_every": 10,
    "precision": "auto", "threads": 0,
}


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    run = {**DEFAULT_RUN, **cfg.get("run", {})}
    if run.get("task") not in ("autoencoder", "denoiser"):
        raise ConfigError(f"{path}: [run] task must be 'autoencoder' or 'denoiser'")
    for key in ("steps", "batch_size"):
        if int(run[key]) <= 0:
            raise ConfigError(f"{path}: [run] {key} must be positive, got {run[key]}")
    if "out_dir" not in run:
        raise ConfigError(f"{path}: [run] out_dir is required")
    use_bf16(run["precision"])  # rejects an unknown precision before any data is built
    cfg["run"] = run
    cfg.setdefault("data", {}).setdefault("num_clips", 1000)
    cfg.setdefault("model", {})
    return cfg


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rng(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


class AutoencoderTask:
    def __init__(self, cfg: dict, out_dir: Path):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        frames, size = int(cfg["data"].get("frames", shapes.FRAMES)), int(cfg["data"].get("size", shapes.SIZE))
        self.frames = frame_pool(cfg["data"], frames, size, out_dir.parent / "cache")
        self.num_examples = len(self.frames)
        model_cfg = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                     "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 64, 64, 64],
                     "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
                     "mid_block_add_attention": False, **cfg["model"]}
        self.model = AutoencoderKL(**model_cfg)
        self.kl_weight = float(cfg["run"].get("kl_weight", 1e-6))
        self.fg_weight = float(cfg["run"].get("foreground_weight", 0.0))
        held_out = {**cfg["data"], "num_clips": 32, "seed": int(cfg["data"].get("seed", 0)) + 10_000}
        self.eval_clips = frame_pool(held_out, frames, size, out_dir.parent / "cache").view(32, frames, 3, size, size)

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part: slice) -> torch.Tensor:
        x = self.frames[idx[part]].float().div(127.5).sub(1)
        posterior = model.encode(x).latent_dist
        noise = torch.randn((len(idx), *posterior.mean.shape[1:]), generator=gen)[part]
        z = posterior.mean + posterior.std * noise
        rec = model.decode(z).sample.float()
        err = rec - x
        # small objects on plain backgrounds are a few % of the pixels: weight the pixels that differ from
        # the frame's border colour, or the autoencoder settles for blurry blobs (seen at 500 steps)
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 0], x[..., -1]], dim=-1).median(dim=-1).values
        foreground = ((x - border[..., None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()
        weight = 1 + self.fg_weight * foreground
        err = err * weight / weight.mean(dim=(1, 2, 3), keepdim=True)
        return err.abs().flatten(1).mean(1) + err.pow(2).flatten(1).mean(1) + self.kl_weight * posterior.kl()

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        clips = self.eval_clips
        n, t = clips.shape[:2]
        x = clips.flatten(0, 1).float().div(127.5).sub(1)
        with autocast(self.cfg["run"]["precision"]):
            rec = model.decode(model.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = (rec - x).pow(2).mean().item()
        rec_u8 = ((rec + 1) * 127.5).round().byte().view(n, t, 3, *x.shape[-2:]).permute(0, 1, 3, 4, 2).numpy()
        truth = [shapes.analyze_video(c.permute(0, 2, 3, 1).numpy()) for c in clips]
        agree = {a: float(np.mean([shapes.analyze_video(r)[a] == tr[a] for r, tr in zip(rec_u8, truth)]))
                 for a in shapes.ATTRIBUTES}
        return {"psnr": 10 * math.log10(4 / max(mse, 1e-12)), **{f"agree_{a}": v for a, v in agree.items()}}

    def export(self, ema, out: Path) -> None:
        with torch.no_grad(), autocast(self.cfg["run"]["precision"]):
            x = self.frames[torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(0))[:1024]]
            z = ema.encode(x.float().div(127.5).sub(1)).latent_dist.mode().float()
        ema.register_to_config(scaling_factor=float(1.0 / z.std()))
        ema.save_pretrained(out)


class DenoiserTask:
    data_manifest_sha256: str | None = None  # set by train() before export

    def __init__(self, cfg: dict, out_dir: Path):
        from diffusers import AutoencoderKL

        from ..models.transformer import VideoDiT
        from ..text.encoders import load_text_encoder

        self.cfg = cfg
        data = cfg["data"]
        self.frames, self.size = int(data.get("frames", shapes.FRAMES)), int(data.get("size", shapes.SIZE))
        vae_path = Path(cfg["autoencoder"]["path"])
        self.vae = AutoencoderKL.from_pretrained(vae_path).eval()
        text = cfg.get("text", {})
        self.text_encoder = load_text_encoder(text.get("encoder", "minilm"), text.get("path"),
                                              max_length=int(text.get("max_length", 24)))
        self.data = latent_dataset(data, self.frames, self.size, self.vae, self.text_encoder,
                                   out_dir.parent / "cache", vae_id=_file_sha256(vae_path / "diffusion_pytorch_model.safetensors"))
        self.num_examples = len(self.data["caption_clip"])
        self.empty = self.text_encoder.encode([""])
        self.model = VideoDiT(in_channels=self.vae.config.latent_channels, text_dim=self.text_encoder.dim,
                              sample_frames=self.frames, sample_size=self.size // vae_scale_factor(self.vae), **cfg["model"])
        run = cfg["run"]
        self.p_uncond = float(run.get("p_uncond", 0.1))
        self.t_mean, self.t_std, self.t_shift = (float(run.get(k, d)) for k, d in
                                                 (("t_mean", 0.0), ("t_std", 1.0), ("t_shift", 1.0)))

    def loss(self, model, idx: torch.Tensor, gen: torch.Generator, part: slice) -> torch.Tensor:
        d = self.data
        # draw the whole global batch's randomness, then keep this rank's part of it
        drop = (torch.rand(len(idx), generator=gen) < self.p_uncond)[part]
        noise = torch.randn((len(idx), *d["latents"].shape[1:]), generator=gen)[part]
        t = sample_t(len(idx), gen, self.t_mean, self.t_std, self.t_shift)[part]
        idx = idx[part]
        x0 = d["latents"][d["caption_clip"][idx]].float()
        tokens, mask, pooled = d["tokens"][idx].float(), d["mask"][idx].clone(), d["pooled"][idx].float()
        tokens[drop], mask[drop], pooled[drop] = self.empty.tokens[0], self.empty.mask[0], self.empty.pooled[0]
        return flow_matching_loss(model, x0, noise, t, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                                  pooled_projections=pooled)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        from ..pipeline import VideoPipeline

        pipe = VideoPipeline(transformer=model, vae=self.vae, text_encoder=self.text_encoder,
                             frames=self.frames, size=self.size, defaults=self.cfg.get("sampling", {}))
        prompts, truth = eval_prompts(int(self.cfg["run"].get("eval_prompts", 24)))
        videos = pipe(prompts, seed=0, progress=False).frames
        readings = [shapes.analyze_video(v) for v in videos]
        return {f"acc_{a}": float(np.mean([r[a] == tr[a] for r, tr in zip(readings, truth)])) for a in shapes.ATTRIBUTES}

    def export(self, ema, out: Path) -> None:
        from ..pipeline import save_bundle

        save_bundle(out, transformer=ema, vae=self.vae, text_encoder=self.text_encoder, frames=self.frames,
                    size=self.size, defaults=self.cfg.get("sampling", {}),
                    extra={"training_data_manifest_sha256": self.data_manifest_sha256})


def eval_prompts(n: int, seed: int = 1234) -> tuple[list[str], list[dict]]:
    """A fixed set of fully specified prompts with their attributes, for watching quality while training."""
    rng = np.random.default_rng(seed)
    prompts, truth = [], []
    for _ in range(n):
        spec = shapes.sample_clip_spec(rng)
        prompts.append(shapes.make_caption(spec.attributes(), rng))
        truth.append(spec.attributes())
    return prompts, truth


TASKS = {"autoencoder": AutoencoderTask, "denoiser": DenoiserTask}


DATA_MANIFEST = "data_manifest.json"


def _data_manifest(cfg: dict) -> dict:
    """What this run trains on (licence-checked for folder data), plus the autoencoder's data for a denoiser."""
    data = cfg["data"]
    frames, size = int(data.get("frames", shapes.FRAMES)), int(data.get("size", shapes.SIZE))
    manifest = training_data_manifest(data, frames, size, cfg["run"]["task"])
    upstream = Path(cfg.get("autoencoder", {}).get("path", "")) / "training" / DATA_MANIFEST
    if cfg["run"]["task"] == "denoiser" and upstream.is_file():
        manifest["upstream_manifests"] = {"autoencoder": _file_sha256(upstream)}
    return manifest


def _record_manifest(manifest: dict, out: Path, resume: bool) -> str:
    """Write the run's data manifest; a resumed run must still be reading the same data."""
    digest, path = manifest_sha256(manifest), out / DATA_MANIFEST
    if resume and path.is_file() and _file_sha256(path) != digest:
        raise ConfigError(f"the training data changed since this run started ({path} no longer matches the data); "
                          "start a new run (another out_dir) to train on the new data")
    write_atomic(path, canonical_json(manifest))
    return digest


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(config_path: str | Path, resume: bool = False, max_steps: int | None = None) -> Path:
    """Run (or resume) the training described by a TOML config; returns the exported model directory."""
    cfg = load_config(config_path)
    run = cfg["run"]
    rank, world = _init_distributed()
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    seed, steps, batch = int(run["seed"]), int(run["steps"]), int(run["batch_size"])
    if batch % world:
        raise ConfigError(f"batch_size {batch} must be divisible by the number of processes {world}")
    out = Path(run["out_dir"])
    ckpt_dir = out / "checkpoint"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if has_checkpoint(ckpt_dir) and not resume:
            raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another out_dir")
    # before any data is built: refused licences must stop the run, not an hour of latent encoding
    data_manifest = _data_manifest(cfg)
    data_digest = _record_manifest(data_manifest, out, resume) if rank == 0 else manifest_sha256(data_manifest)
    torch.manual_seed(seed)  # model initialisation
    task = TASKS[run["task"]](cfg, out)
    task.data_manifest_sha256 = data_digest
    model = task.model
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(run["lr"]), weight_decay=float(run["weight_decay"]),
                                  betas=(0.9, 0.99))
    start = 0
    if resume and has_checkpoint(ckpt_dir):
        start = load_checkpoint(ckpt_dir, model, ema, optimizer)["step"]
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if run.get("compile", False):
        ddp_model = torch.compile(ddp_model)
    n_examples = task.num_examples
    train_autocast = autocast(run["precision"])
    metrics_path = out / "metrics.jsonl"
    end = steps if max_steps is None else min(steps, start + max_steps)
    bar = tqdm(total=steps, initial=start, desc=f"train {run['task']}", disable=rank != 0, dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), start
    for step in range(start, end):
        lr = float(run["lr"]) * min(1.0, (step + 1) / max(1, int(run["warmup"])))
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = _rng(seed, step, 0)
        idx = torch.randint(n_examples, (batch,), generator=gen)
        with train_autocast:
            loss = task.loss(ddp_model, idx, _rng(seed, step, 1), slice(rank, None, world)).mean()
        loss.backward()
        loss = loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(run["grad_clip"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(float(run["ema_decay"]), (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        done = step + 1
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        if rank == 0:
            bar.update(1)
            if done % int(run["log_every"]) == 0 or done == end:
                now = time.perf_counter()
                rate = (done - n_last) * batch / (now - t_last)
                t_last, n_last = now, done
                record = {"step": done, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                          "samples_per_s": rate, "time": time.time()}
                bar.set_postfix(loss=f"{float(loss):.4f}", sps=f"{rate:.1f}")
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if done % int(run["checkpoint_every"]) == 0 or done == end:
                save_checkpoint(ckpt_dir, model, ema, optimizer, {"step": done, "config": cfg,
                                                                  "training_data_manifest_sha256": data_digest})
            if done % int(run["eval_every"]) == 0 or done == steps:
                result = {"step": done, "eval": task.evaluate(ema)}
                tqdm.write(json.dumps(result))
                with metrics_path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
    bar.close()
    final = out / "model"
    if rank == 0 and end == steps:
        task.export(ema, final)
        (final / "training").mkdir(exist_ok=True)
        write_atomic(final / "training" / DATA_MANIFEST, canonical_json(data_manifest))
    if world > 1:
        dist.barrier()
    return final
