"""Few-step distillation: `vidiffuse distill` turns a model that samples in 20 UniPC steps with classifier-free
guidance (40 denoiser passes a video) into a student that samples in 1–4 Euler steps, one pass a step, and
gives it a small decoder.

    vidiffuse distill shapes --out my-distilled --student-steps 2

Method: guided rectified-flow distillation (reflow: Liu et al. 2022, "Flow Straight and Fast"; with the
teacher's guidance folded into its samples as in InstaFlow, Liu et al. 2023).
1. Pairs: the teacher samples `pairs` latent videos at its own default settings, guidance included, from
   seeded noise z and captions drawn from the shapes world's caption generator. Each (z, caption, x₀) is a
   pair; the latents are kept (`work/pairs/`, in chunks, so a stopped run resumes where it was).
2. Student: initialised from the teacher, it learns the straight path from each z to its x₀: at
   x_t = (1 − t)·x₀ + t·z it predicts v = z − x₀ (MSE), for t on the grid its own k-step Euler sampler
   visits (`diffusion.sampling.set_steps`: 1, 1 − 1/k, …) and, for the rest of a batch, t drawn as in
   training. A straight path is integrated exactly by Euler steps, so k steps suffice; the guidance is in
   the targets, so the student samples with guidance 1: one denoiser pass a step instead of two.
3. Decoder: with 1–4 denoiser passes, the autoencoder's decoder becomes most of a video's time. A
   `TinyDecoder` (diffusers' DecoderTiny, the TAESD design) learns to decode the autoencoder's latents of
   shapes-world clips back to their frames, and the student's own samples to the frames the autoencoder's
   decoder makes of them, pixels weighted towards the object as the autoencoder was.

The bundled `shapes-distilled` was made on a GPU by `scripts/gpu_compress.py`: reflow as above on 12k pairs
(650 steps × 512), then 770 steps × 256 of distribution matching (DMD, Yin et al. 2024;
`distribution_matching_loss` here): the student's own samples are pulled towards where the guided teacher
puts them and away from where a second, "fake" velocity model that follows the student puts them. Reflow's
regression alone learns the average of what the teacher draws from nearby noise: at 2 steps it blurs the
small object's outline, and a blurred outline reads as another shape. DMD is not a stage of
`vidiffuse distill` because the CPU-sized tries failed: continuing the bundled student at batch 8 (lr 2e-5,
bf16 autocast, 1.2 s a step) took its golden-set shape adherence from 84% to 53% in 300 steps, and with the
fake model fitted first and two fake steps per student step (lr 1e-5) to 80% in 200.

Why reflow: progressive distillation needs log₂(20) rounds of training, each its own run; consistency
distillation takes an ODE-solver step with the teacher (two guided passes) for every training sample, every
step; distribution matching trains a second "fake score" network beside the student (twice the memory and
compute). Reflow pays for the teacher once, in the pairs, and then is plain regression — the cheapest of
them to reach 1–4 steps on a 2-core CPU. Its cost: the student can only be as good as the pairs cover the
prompts (a few thousand captions of one small world do), and its videos differ from the teacher's for the
same seed (it learns the teacher's outputs on average over nearby noise, not each one exactly).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from ..data import shapes
from ..errors import ConfigError
from ..files import atomic_directory, write_atomic
from .prune import DEFAULT_DATA, _lr, _made_by, _read_jsonl, _rng, adherence_probe, derived_model, recovery_data

FORMAT = "vidiffuse-distilled-v1"
RECORD = "distill.json"  # in the distilled model's training/ folder
STUDENT_LOG = "student_metrics.jsonl"
DECODER_LOG = "decoder_metrics.jsonl"
PAIR_CHUNK = 32  # pairs per file in work/pairs: what a stopped run loses at most
DEFAULT_RUN = {
    "pairs": 2048, "student_steps": 2, "seed": 0,
    # the student: AdamW with warmup and cosine decay, an EMA of its weights
    "steps": 1500, "batch_size": 16, "lr": 1e-4, "warmup": 50, "min_lr_ratio": 0.1, "ema_decay": 0.995,
    "grad_clip": 1.0, "grid_share": 0.75, "checkpoint_every": 100, "eval_every": 500, "eval_prompts": 32,
    "log_every": 10,
    # the decoder: frames per batch, from scratch
    "decoder_steps": 2000, "decoder_batch": 64, "decoder_lr": 2e-3, "decoder_width": 32,
    "decoder_foreground_weight": 8.0, "decoder_student_videos": 512,
}


def check_run(run: dict) -> dict:
    """The distillation settings with defaults filled in; absurd values raise ConfigError."""
    unknown = sorted(set(run) - set(DEFAULT_RUN))
    if unknown:
        raise ConfigError(f"unknown distillation setting(s): {', '.join(unknown)}")
    run = {**DEFAULT_RUN, **run}
    if not 1 <= int(run["student_steps"]) <= 4:
        raise ConfigError(f"the student samples in 1 to 4 steps, got {run['student_steps']}")
    for key in ("pairs", "batch_size", "decoder_batch", "decoder_width"):
        if int(run[key]) < 1:
            raise ConfigError(f"{key} must be at least 1, got {run[key]}")
    for key in ("steps", "decoder_steps", "decoder_student_videos"):
        if int(run[key]) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {run[key]}")
    if not 0 <= float(run["grid_share"]) <= 1:
        raise ConfigError(f"grid_share must be between 0 and 1, got {run['grid_share']}")
    return run


# ---------------------------------------------------------------- pairs


def pair_prompts(n: int, seed: int) -> list[str]:
    """Captions of the world's generator (version 1, the teacher's; some attributes left unsaid, as in
    training) for `n` pairs."""
    prompts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0xD157])
        prompts.append(shapes.sample_caption(shapes.sample_clip_spec(rng), rng))
    return prompts


def plain_captions(n: int, seed: int, stream: int) -> list[str]:
    """What the prompt reader writes for the denoiser (`shapes.plain_caption`, each attribute left unsaid as
    often as in training) for `n` random clips of the world."""
    captions = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, stream])
        captions.append(shapes.plain_caption(shapes.stated_attributes(shapes.sample_clip_spec(rng), rng)))
    return captions


def pair_seeds(n: int, seed: int) -> list[int]:
    """The noise seed of each pair; far from the seeds the golden set and benchmarks use."""
    return [10_000_000 * (seed + 1) + i for i in range(n)]


def pair_noise(pipe, seeds: list[int]) -> torch.Tensor:
    """The initial noise of these seeds, exactly as the pipeline draws it."""
    from ..pipeline import vae_scale_factor

    side = pipe.size // vae_scale_factor(pipe.vae)
    shape = (pipe.vae.config.latent_channels, pipe.frames, side, side)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def teacher_pairs(pipe, n: int, seed: int, work: Path, progress: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """x₀ latents (bf16) the teacher samples at its defaults for `pair_prompts` and `pair_seeds`, chunk by chunk."""
    from tqdm import tqdm

    prompts, seeds = pair_prompts(n, seed), pair_seeds(n, seed)
    folder = work / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: pipe.defaults[k] for k in ("steps", "guidance", "sampler")}
    record = folder / "settings.json"
    expected = json.dumps({"teacher": pipe.version, **settings, "seed": seed}, sort_keys=True)
    if record.is_file() and record.read_text() != expected:
        raise ConfigError(f"{folder} holds pairs of another teacher or settings; use another work folder")
    write_atomic(record, expected.encode())
    chunks = range(math.ceil(n / PAIR_CHUNK))
    todo = [k for k in chunks if not (folder / f"{k:05d}.safetensors").is_file()]
    if todo:
        progress(f"teacher: sampling {min(n, len(todo) * PAIR_CHUNK)} of {n} pairs at {settings}")
    for k in tqdm(todo, desc="teacher pairs", unit="chunk", disable=not todo):
        rows = slice(k * PAIR_CHUNK, min(n, (k + 1) * PAIR_CHUNK))
        x0 = pipe(prompts[rows], seed=seeds[rows], batch_size=16, progress=False, output_type="latent", **settings)
        write_atomic(folder / f"{k:05d}.safetensors", save({"x0": x0.to(torch.bfloat16).contiguous()}))
    x0 = torch.cat([load_file(folder / f"{k:05d}.safetensors")["x0"] for k in chunks])
    emb = pipe.text_encoder.encode(pipe.denoiser_prompts(prompts) or prompts)  # what the teacher read for them
    return {"x0": x0, "seeds": torch.tensor(seeds), "tokens": emb.tokens.to(torch.bfloat16), "mask": emb.mask,
            "pooled": emb.pooled.to(torch.bfloat16)}


# ---------------------------------------------------------------- the student


def student_grid(steps: int) -> torch.Tensor:
    """The noise levels a `steps`-step Euler sampler evaluates the student at."""
    from ..diffusion.sampling import make_scheduler, set_steps

    scheduler = make_scheduler("euler")
    set_steps(scheduler, steps)
    return scheduler.sigmas[:-1].float()


def reflow_batch(pairs: dict, noise: torch.Tensor, grid: torch.Tensor, grid_share: float, batch_size: int,
                 gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """The student's inputs at x_t on the straight path between noise and the teacher's x₀, and its target."""
    from ..diffusion.flow import interpolate, sample_t

    idx = torch.randint(len(pairs["x0"]), (batch_size,), generator=gen)
    on_grid = torch.rand(batch_size, generator=gen) < grid_share
    t = torch.where(on_grid, grid[torch.randint(len(grid), (batch_size,), generator=gen)], sample_t(batch_size, gen))
    x0, z = pairs["x0"][idx].float(), noise[idx]
    inputs = {"hidden_states": interpolate(x0, z, t), "timestep": t * 1000,
              "encoder_hidden_states": pairs["tokens"][idx].float(), "encoder_attention_mask": pairs["mask"][idx],
              "pooled_projections": pairs["pooled"][idx].float()}
    return inputs, z - x0


def euler_steps(model: nn.Module, z: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
    """The student's sampler, differentiable: `steps` Euler steps from t = 1 on `student_grid` (what the
    pipeline's Euler sampler computes at guidance 1 and shift 1)."""
    grid = student_grid(steps).tolist() + [0.0]
    x = z
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * model(x, torch.full((len(z),), t * 1000, device=z.device), **cond).sample.float()
    return x


def distribution_matching_loss(student: nn.Module, teacher: nn.Module, fake: nn.Module,
                               fake_optimizer: torch.optim.Optimizer, z: torch.Tensor, cond: dict, uncond: dict,
                               x0: torch.Tensor, steps: int, guidance: float, regression: float,
                               gen: torch.Generator, grad_clip: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One step of distribution matching (DMD, Yin et al. 2024); returns the student's loss and its parts.

    The student samples x̂ from noise `z` in `steps` Euler steps. x̂, noised to a random t, is denoised by the
    guided teacher (where the data distribution puts x̂) and by a "fake" velocity model that follows the
    student's own samples (where the student's distribution puts it); x̂ is pulled along their difference,
    normalised per sample as in DMD. `regression` weighs an MSE to the teacher's own sample `x0` for `z`, which
    keeps every mode the teacher draws. The fake model is trained here, one flow-matching step on the
    detached x̂, so that it keeps following the student."""
    from ..diffusion.flow import interpolate

    b, dev = len(z), z.device
    x_hat = euler_steps(student, z, cond, steps)
    sample = x_hat.detach()
    t = 0.02 + 0.96 * torch.rand(b, device=dev, generator=gen)
    per_sample = t.view(-1, *([1] * (z.ndim - 1)))
    x_t = interpolate(sample, torch.randn(sample.shape, device=dev, generator=gen), t)
    with torch.no_grad():
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        v_u, v_c = teacher(torch.cat([x_t, x_t]), t.repeat(2) * 1000, **both).sample.float().chunk(2)
        real = x_t - per_sample * (v_u + guidance * (v_c - v_u))  # x₀ as the guided teacher sees it
        fake_x0 = x_t - per_sample * fake(x_t, t * 1000, **cond).sample.float()
        weight = (sample - real).abs().mean(dim=tuple(range(1, z.ndim)), keepdim=True).clamp_min(1e-3)
        grad = torch.nan_to_num((fake_x0 - real) / weight)
    dmd = 0.5 * (x_hat - (sample - grad)).pow(2).mean()
    to_pairs = (x_hat - x0.float()).pow(2).mean()
    t_fake = torch.sigmoid(torch.randn(b, device=dev, generator=gen))
    noise = torch.randn(sample.shape, device=dev, generator=gen)
    fake_loss = (fake(interpolate(sample, noise, t_fake), t_fake * 1000, **cond).sample.float() - (noise - sample)).pow(2).mean()
    fake_loss.backward()
    torch.nn.utils.clip_grad_norm_(fake.parameters(), grad_clip)
    fake_optimizer.step()
    fake_optimizer.zero_grad(set_to_none=True)
    parts = {"dmd": float(dmd.detach()), "regression": float(to_pairs.detach()), "fake": float(fake_loss.detach())}
    return dmd + regression * to_pairs, parts


def train_loop(model: nn.Module, loss_fn: Callable[[nn.Module, int], torch.Tensor], run: dict, work: Path, name: str,
               evaluate: Callable[[nn.Module], dict] | None, resume: bool, say: Callable[[str], None],
               ema_decay: float | None = None) -> nn.Module:
    """AdamW with warmup and cosine decay, an EMA, atomic checkpoints in `work/<name>-checkpoint`, metrics in
    `work/<name>_metrics.jsonl`; returns the EMA. `run` holds steps, batch_size, lr, warmup, min_lr_ratio,
    grad_clip, checkpoint_every, eval_every, log_every."""
    from tqdm import tqdm

    from ..train.checkpoint import resume_step, save_checkpoint

    ckpt, log = work / f"{name}-checkpoint", work / f"{name}_metrics.jsonl"
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(run["lr"]), weight_decay=0.0, betas=(0.9, 0.99))
    steps = int(run["steps"])
    start = resume_step(ckpt, model, ema, optimizer, resume, name, work)
    if start:
        say(f"{name}: resuming at step {start}")

    def write(record: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if start == 0 and evaluate is not None and not any("eval" in r for r in _read_jsonl(log)):
        write({"step": 0, "eval": evaluate(ema)})
    t_last, n_last = time.perf_counter(), start
    decay_cap = float(run["ema_decay"] if ema_decay is None else ema_decay)
    bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True)
    for step in range(start, steps):
        lr = _lr(step, run)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(model, step)
        loss.backward()
        loss = float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(run["grad_clip"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(decay_cap, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        done = step + 1
        bar.update(1)
        if done % int(run["log_every"]) == 0 or done == steps:
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            bar.set_postfix(loss=f"{loss:.4f}")
            write({"step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "steps_per_s": rate,
                   "time": time.time()})
        if done % int(run["checkpoint_every"]) == 0 or done == steps:
            save_checkpoint(ckpt, model, ema, optimizer, {"step": done, "run": run})
        if evaluate is not None and (done % int(run["eval_every"]) == 0 or done == steps):
            result = evaluate(ema)
            write({"step": done, "eval": result})
            say(f"{name} step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    bar.close()
    return ema


def distill_student(pipe, pairs: dict, run: dict, work: Path, resume: bool, say) -> nn.Module:
    teacher = pipe.transformer.float().eval()
    student = copy.deepcopy(teacher)
    grid = student_grid(int(run["student_steps"]))
    noise = pair_noise(pipe, pairs["seeds"].tolist())
    batch_size, share, seed = int(run["batch_size"]), float(run["grid_share"]), int(run["seed"])

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        inputs, target = reflow_batch(pairs, noise, grid, share, batch_size, _rng(seed, step, 0))
        return (model(**inputs).sample.float() - target).pow(2).mean()

    probe = None
    if int(run["eval_prompts"]):
        student_pipe = _with_defaults(pipe, student_defaults(run))
        probe = adherence_probe(student_pipe, int(run["eval_prompts"]))
    return train_loop(student, loss, run, work, "student", probe, resume, say)


def student_defaults(run: dict) -> dict:
    return {"steps": int(run["student_steps"]), "guidance": 1.0, "sampler": "euler", "shift": 1.0}


def _with_defaults(pipe, defaults: dict):
    from ..pipeline import VideoPipeline

    other = VideoPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, frames=pipe.frames, size=pipe.size, fps=pipe.fps,
                          defaults=defaults, name=pipe.name)
    other.decoder = pipe.decoder
    return other


# ---------------------------------------------------------------- the decoder


def decoder_data(pipe, data_cfg: dict, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N·T, c, h, w) as the decoder reads them, frames (N·T, 3, H, W) uint8) of the same clips."""
    from ..train.data import frame_pool

    latents = recovery_data(pipe, data_cfg, cache)["latents"]  # (N, c, T, h, w), scaled for diffusion
    z = latents.transpose(1, 2).flatten(0, 1)
    frames = frame_pool(data_cfg, pipe.frames, pipe.size, cache)
    if len(frames) != len(z):
        raise ConfigError(f"decoder data: {len(frames)} frames but {len(z)} latent frames")
    return z, frames


@torch.no_grad()
def student_decoder_data(pipe, student: nn.Module, run: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, frames) as `decoder_data` returns them, of `decoder_student_videos` videos the student samples
    for the plain captions the prompt reader writes, each latent frame paired with the autoencoder decoder's
    frame of it: the tiny decoder then learns the latents it will be given, which sit a little off the
    autoencoder's own (a decoder trained on encoded clips alone read 5 points fewer shapes from the CPU-made
    student's samples than the autoencoder's decoder did)."""
    from ..video.io import frames_to_uint8

    n, seed = int(run["decoder_student_videos"]), int(run["seed"])
    captions = plain_captions(n, seed, 0xDEC0)
    student_pipe = _with_defaults(pipe, student_defaults(run))
    student_pipe.transformer, student_pipe.decoder = student.eval(), None
    latents = student_pipe(captions, seed=pair_seeds(n, seed + 1), batch_size=16, output_type="latent")
    frames = torch.cat([torch.from_numpy(frames_to_uint8(video)).permute(0, 3, 1, 2)
                        for chunk in latents.split(16) for video in student_pipe.decode(chunk)])
    return latents.transpose(1, 2).flatten(0, 1), frames


def train_decoder(pipe, data_cfg: dict, run: dict, work: Path, resume: bool, say,
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """A TinyDecoder trained from scratch on the frames of `data_cfg`'s clips and their latents, and on `extra`
    (`student_decoder_data`) when given; scored on the last clips' frames."""
    from ..models.tiny_decoder import TinyDecoder

    z_scaled, frames = decoder_data(pipe, data_cfg, work / "cache")
    torch.manual_seed(int(run["seed"]))
    blocks = int(round(math.log2(pipe.size // z_scaled.shape[-1]))) + 1
    decoder = TinyDecoder(latent_channels=z_scaled.shape[1], width=int(run["decoder_width"]),
                          num_blocks=(2,) + (1,) * (blocks - 2) + (0,), scaling_factor=pipe.vae.config.scaling_factor)
    scale, fg_weight = float(pipe.vae.config.scaling_factor), float(run["decoder_foreground_weight"])
    batch, seed = int(run["decoder_batch"]), int(run["seed"])
    clips = len(frames) // pipe.frames
    held_clips = min(32, max(1, clips // 8))  # the last clips' frames: scored, never trained on
    held_out = torch.arange(len(frames) - held_clips * pipe.frames, len(frames))

    train_z, train_frames = z_scaled[: len(frames) - len(held_out)], frames[: len(frames) - len(held_out)]
    if extra is not None:
        train_z, train_frames = torch.cat([train_z, extra[0].to(train_z.dtype)]), torch.cat([train_frames, extra[1]])

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        idx = torch.randint(len(train_frames), (batch,), generator=_rng(seed, step, 3))
        x = train_frames[idx].float().div(127.5).sub(1)
        err = model.decode(train_z[idx].float() / scale).sample - x
        # the object is a few % of the pixels: weight where a frame differs from its border colour
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 0], x[..., -1]], dim=-1).median(dim=-1).values
        weight = 1 + fg_weight * ((x - border[..., None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = err * weight / weight.mean(dim=(1, 2, 3), keepdim=True)
        return err.abs().mean() + err.pow(2).mean()

    @torch.no_grad()
    def psnr(model: nn.Module) -> dict:
        x = frames[held_out].float().div(127.5).sub(1)
        rec = model.decode(z_scaled[held_out].float() / scale).sample.clamp(-1, 1)
        ref = pipe.vae.decode(z_scaled[held_out].float() / scale).sample.clamp(-1, 1)
        return {"psnr": 10 * math.log10(4 / max(float((rec - x).pow(2).mean()), 1e-12)),
                "psnr_autoencoder": 10 * math.log10(4 / max(float((ref - x).pow(2).mean()), 1e-12))}

    decoder_run = {**run, "steps": int(run["decoder_steps"]), "lr": float(run["decoder_lr"]), "warmup": 100,
                   "eval_every": max(1, int(run["decoder_steps"]) // 4)}
    return train_loop(decoder, loss, decoder_run, work, "decoder", psnr, resume, say, ema_decay=0.999)


# ---------------------------------------------------------------- the model


def distill_model(model: str | os.PathLike | None, out: str | os.PathLike, run: dict | None = None,
                  data: dict | None = None, work_dir: str | os.PathLike | None = None, resume: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Distil a vidiffuse model directory into a few-step student with a tiny decoder, written to `out`
    (a model directory whose defaults are the student's). The pairs, the data cache and the checkpoints
    live in `work_dir` (default `<out>.work`); `resume` continues a stopped run from them."""
    from ..models.transformer import VideoDiT
    from ..pipeline import VideoPipeline, resolve_model_path

    run = check_run(run or {})
    say = progress or (lambda message: None)
    data_cfg = {**DEFAULT_DATA, **(data or {})}
    source = resolve_model_path(model)
    pipe = VideoPipeline.from_pretrained(source)
    if not isinstance(pipe.transformer, VideoDiT) or pipe.index.get("quantization"):
        raise ConfigError(f"distillation starts from a float VideoDiT model, not {source}")
    if pipe.index.get("distilled_from"):
        raise ConfigError(f"{source} is already distilled (from {pipe.index['distilled_from']['name']})")
    out = Path(out)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out must differ from the source model directory {source}")
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    with _timed(work, "pairs"):
        pairs = teacher_pairs(pipe, int(run["pairs"]), int(run["seed"]), work, say)
    with _timed(work, "student"):
        student = distill_student(pipe, pairs, run, work, resume, say)
    with _timed(work, "decoder"):
        extra = student_decoder_data(pipe, student, run) if int(run["decoder_student_videos"]) else None
        decoder = train_decoder(pipe, data_cfg, run, work, resume, say, extra)
    teacher_version = pipe.version
    record = {"format": FORMAT, "method": "guided rectified-flow distillation (reflow) + TinyDecoder",
              "teacher": {"name": pipe.name, "version": teacher_version,
                          **{k: pipe.defaults[k] for k in ("steps", "guidance", "sampler")}},
              "student": student_defaults(run), "run": run, "decoder_data": data_cfg,
              # wall-clock seconds per stage, summed over the invocations a resumed run took
              "seconds": json.loads((work / TIMINGS).read_text()),
              "student_last_eval": _last_eval(work / STUDENT_LOG),
              # step 0 of the student's log: the teacher's weights sampled at the student's settings
              "untrained_student_eval": _first_eval(work / STUDENT_LOG),
              "decoder_last_eval": _last_eval(work / DECODER_LOG)}
    save_distilled(pipe, student, decoder, out, record, logs=[work / STUDENT_LOG, work / DECODER_LOG])
    return {"source": str(source), "out": str(out), "work_dir": str(work), **record}


TIMINGS = "seconds.json"


@contextlib.contextmanager
def _timed(work: Path, stage: str):
    """Add the time spent in `stage` to work/seconds.json, so a resumed run's record counts every invocation."""
    path = work / TIMINGS
    started = time.perf_counter()
    try:
        yield
    finally:
        spent = json.loads(path.read_text()) if path.is_file() else {}
        spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - started
        write_atomic(path, json.dumps(spent).encode())


def _first_eval(log: Path) -> dict | None:
    evals = [r["eval"] for r in _read_jsonl(log) if "eval" in r]
    return evals[0] if evals else None


def _last_eval(log: Path) -> dict | None:
    evals = [r["eval"] for r in _read_jsonl(log) if "eval" in r]
    return evals[-1] if evals else None


def save_distilled(source_pipe, student: nn.Module, decoder: nn.Module, out: Path, record: dict, logs=()) -> Path:
    """A model directory: the source's autoencoder (for encoding) and settings, the student (bf16, as every
    bundled denoiser), `decoder/`, the student's sampling defaults and `training/distill.json`."""
    source = Path(source_pipe.path)
    index = {k: v for k, v in source_pipe.index.items() if k != "version"}
    index.update(name=out.name, defaults=record["student"],
                 distilled_from={"name": record["teacher"]["name"], "version": record["teacher"]["version"]})
    with atomic_directory(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("transformer", "decoder", "README.md", "*.tmp", "*.old"))
        copy.deepcopy(student).to(torch.bfloat16).save_pretrained(tmp / "transformer")
        decoder.save_pretrained(tmp / "decoder")
        for part in ("transformer", "decoder"):  # diffusers records a local path there: it differs per checkout
            config = tmp / part / "config.json"
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                          if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
        digest = hashlib.sha256()
        for part in ("transformer", "decoder"):
            digest.update((tmp / part / "diffusion_pytorch_model.safetensors").read_bytes())
        index["version"] = digest.hexdigest()[:12]  # the student and its decoder together
        (tmp / "training").mkdir(exist_ok=True)
        (tmp / "training" / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for log in logs:
            if Path(log).is_file():
                shutil.copyfile(log, tmp / "training" / Path(log).name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(index, record))
    return out


def model_card(index: dict, record: dict) -> str:
    t, s, run = record["teacher"], record["student"], record["run"]
    watch = record.get("student_last_eval") or {}
    untrained = record.get("untrained_student_eval") or {}
    dec = record.get("decoder_last_eval") or {}
    fmt = lambda d: ", ".join(f"{k.removeprefix('acc_')} {v:.2f}" for k, v in d.items()) or "not measured"  # noqa: E731
    recipe = record.get("recipe")
    stages = (", then ".join(f"{stage} {n} steps" for stage, n in recipe["steps"].items()) if recipe
              else f"{run['steps']} steps × batch {run['batch_size']}")
    return "\n".join([
        f"# {index['name']} — a few-step student of {t['name']} ({t['version']})",
        "",
        f"Made by {_made_by(record, 'vidiffuse distill', 'compress/distill.py')}. The teacher samples with {t['sampler']} in {t['steps']} "
        f"steps at guidance {t['guidance']} ({2 * t['steps']} denoiser passes a video); this model samples with Euler in "
        f"{s['steps']} step(s) at guidance 1 ({s['steps']} pass(es)), and decodes with its own `decoder/` "
        "(a TinyDecoder) instead of the autoencoder's decoder. `vae/` is the teacher's, for encoding.",
        "",
        f"- Student: {record['method']}, initialised from the teacher, on {run['pairs']} teacher samples (pairs of "
        f"noise and latent video); {stages}.",
        f"- Decoder: {run['decoder_steps']} steps × {run['decoder_batch']} frames of shapes-world clips"
        + (f" and of {run['decoder_student_videos']} of the student's samples as the autoencoder decodes them"
           if run.get("decoder_student_videos") else "") + ", from scratch; "
        f"held-out PSNR {dec.get('psnr', float('nan')):.1f} dB (the autoencoder's decoder: "
        f"{dec.get('psnr_autoencoder', float('nan')):.1f} dB).",
        f"- Watch-set adherence ({run['eval_prompts']} training-style prompts, the student's settings): the teacher's "
        f"weights before distillation {fmt(untrained)}; the student {fmt(watch)}.",
        "",
        "Speed and quality next to the teacher: `vidiffuse bench --variants fp32,distilled` "
        "(benchmarks/results/compress). Limits: only the teacher's world; its videos for a seed differ "
        "from the teacher's for that seed.",
        "",
    ])


def format_report(report: dict) -> str:
    t, s = report["teacher"], report["student"]
    fmt = lambda d: ", ".join(f"{k.removeprefix('acc_')} {v:.2f}" for k, v in (d or {}).items()) or "not measured"  # noqa: E731
    dec = report.get("decoder_last_eval") or {}
    return "\n".join([
        f"distilled {t['name']} ({t['steps']} {t['sampler']} steps, guidance {t['guidance']}) into a "
        f"{s['steps']}-step Euler student without guidance",
        "time (all invocations): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["seconds"].items()),
        f"watch set at the student's settings, before: {fmt(report.get('untrained_student_eval'))}",
        f"after: {fmt(report.get('student_last_eval'))}",
        f"decoder held-out PSNR {dec.get('psnr', float('nan')):.1f} dB (autoencoder {dec.get('psnr_autoencoder', float('nan')):.1f} dB)",
        f"wrote {report['out']}",
    ])


BUNDLED_DISTILLED = "shapes-distilled"


def distilled_parts_for(pipe, model: str | os.PathLike | None = None) -> tuple[nn.Module, nn.Module | None, dict, dict]:
    """The student denoiser, decoder and sampling settings of a distilled model directory (default: the bundled
    `shapes-distilled`), checked to have been distilled from `pipe`'s own model: the bench's `distilled` variant.

    Returns (student, decoder, settings, what to report)."""
    from ..models.tiny_decoder import TinyDecoder
    from ..models.transformer import VideoDiT

    path, index = derived_model(pipe, model or BUNDLED_DISTILLED, "distilled", "distillation")
    student = VideoDiT.from_pretrained(path / "transformer", torch_dtype=torch.float32).eval()
    decoder = None
    if (path / "decoder" / "config.json").is_file():
        decoder = TinyDecoder.from_pretrained(path / "decoder").eval().to(memory_format=torch.channels_last)
    settings = {k: index["defaults"][k] for k in ("steps", "guidance", "sampler")}
    return student, decoder, settings, {"model": path.name, **settings, "decoder": "tiny" if decoder else "autoencoder"}
