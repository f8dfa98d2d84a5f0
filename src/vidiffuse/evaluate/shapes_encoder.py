"""A small video encoder trained on the shapes world, the feature network for FVD on the default model.

FVD is only as meaningful as its features. The standard I3D cannot be downloaded here, and Kinetics
features say little about coloured shapes on flat backgrounds anyway, so the project trains its own
encoder: a 3-D convnet that learns to read every shapes-world attribute (background, colour, shape,
size, direction) from pixels. Its embedding separates videos along exactly the factors the world
varies, so FVD on it measures above all whether generated clips have the world's content and motion
in the world's proportions; frozen or shuffled frames and clips that are not of the world at all move
it far. Training augments only faintly, so codec noise and a soft decoder barely count; heavy noise
or blur within otherwise correct clips counts, but much less than wrong content does.

The bundled weights live in ``vidiffuse/weights/shapes_video_encoder`` and are rebuilt by
``scripts/train_shapes_video_encoder.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vidiffuse.data import shapes
from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.evaluate.fvd import fvd_from_features
from vidiffuse.files import atomic_directory
from vidiffuse.video.io import uint8_to_tensor

__all__ = [
    "DEFAULT_ENCODER_PATH",
    "HELDOUT_SEED_START",
    "ShapesVideoEncoder",
    "load_shapes_video_encoder",
    "shapes_video_features",
    "train_shapes_video_encoder",
]

DEFAULT_ENCODER_PATH = Path(__file__).parents[1] / "weights" / "shapes_video_encoder"
# Training draws clip seeds below 2**40 (run seed × 2**32 + clip index); held-out clips, for the
# accuracy logged during training and for tests, start here and so are never trained on.
HELDOUT_SEED_START = 1 << 40
_SEEDS_PER_RUN = 1 << 32
# Training augmentation: pixel noise std (in [-1, 1] units) and Gaussian blur sigma (px at 64×64).
# About what H.264 and a slightly soft decoder leave behind; far below what FVD should penalise.
_MAX_NOISE, _BLUR_RANGE = 0.03, (0.3, 0.7)


class ShapesVideoEncoder(ModelMixin, ConfigMixin):
    """3-D convnet: ``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, embed_dim)`` embedding, plus attribute heads.

    Frames are area-downsampled to ``sample_size`` first: the world's smallest detail (a 12 px shape
    moving 1.6 px a frame) survives halving, and it makes every convolution four times cheaper. Each
    block after the first halves time, height and width with a strided convolution, so the last one
    sees a few frames of motion at once. Global mean and max pooling, concatenated, and a linear
    projection give the embedding: the mean alone dilutes a small shape in a large background, the
    max reads it wherever it is. One linear head per attribute reads the embedding (linear, so the
    classes are separated along straight lines in it, which is what a Gaussian fit in FVD can see).
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (16, 32, 64, 128),
        layers_per_block: tuple[int, ...] = (1, 2, 2, 1),
        embed_dim: int = 128,
        norm_num_groups: int = 8,
        sample_size: int = 32,
        backgrounds: tuple[str, ...] = tuple(shapes.BACKGROUNDS),
        colors: tuple[str, ...] = tuple(shapes.COLORS),
        shape_names: tuple[str, ...] = shapes.SHAPES,
        sizes: tuple[str, ...] = tuple(shapes.SIZES),
        directions: tuple[str, ...] = shapes.DIRECTIONS,
    ):
        super().__init__()
        if len(block_out_channels) != len(layers_per_block) or min(layers_per_block) < 1:
            raise ConfigError(f"need one layer count >= 1 per block; got {block_out_channels}, {layers_per_block}")
        layers, c_in = [], 3
        for i, (c_out, n) in enumerate(zip(block_out_channels, layers_per_block)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers += [nn.Conv3d(c_in, c_out, 3, stride, 1), nn.GroupNorm(norm_num_groups, c_out), nn.SiLU()]
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * c_in, embed_dim)
        self.classes = dict(zip(shapes.ATTRIBUTES, (backgrounds, colors, shape_names, sizes, directions)))
        self.heads = nn.ModuleDict({a: nn.Linear(embed_dim, len(c)) for a, c in self.classes.items()})

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = videos.clamp(-1, 1)
        s = self.config.sample_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(x.shape[2], s, s), mode="area")
        x = self.body(x).flatten(2)
        return self.proj(torch.cat([x.mean(-1), x.amax(-1)], dim=-1))

    def classify(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, in the order of that attribute's class list in the config."""
        return {a: head(embedding) for a, head in self.heads.items()}


def load_shapes_video_encoder(path: str | Path | None = None) -> ShapesVideoEncoder:
    """The encoder saved at ``path`` (default: the bundled weights), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_ENCODER_PATH
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no shapes video encoder at {path} (config.json missing)")
    try:
        encoder = ShapesVideoEncoder.from_pretrained(path)
    except Exception as e:  # diffusers and safetensors raise assorted types for missing or corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load shapes video encoder from {path}: {reason}") from e
    return encoder.eval()


def _as_video_batches(videos, batch_size: int):
    """Yield ``(B, 3, T, H, W)`` float32 batches from a tensor or from uint8 ``(T, H, W, 3)`` arrays."""
    if torch.is_tensor(videos):
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ConfigError(f"videos must be a (B, 3, T, H, W) tensor; got {tuple(videos.shape)}")
        for i in range(0, len(videos), batch_size):
            yield videos[i:i + batch_size].float()
        return
    for i in range(0, len(videos), batch_size):
        chunk = [np.asarray(v) for v in videos[i:i + batch_size]]
        bad = next((v for v in chunk if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3), None)
        if bad is not None:
            raise ConfigError(f"videos must be uint8 (T, H, W, 3) arrays; got {bad.dtype} {bad.shape}")
        yield torch.stack([uint8_to_tensor(v) for v in chunk])


@torch.no_grad()
def shapes_video_features(videos: torch.Tensor | Sequence[np.ndarray], encoder: ShapesVideoEncoder | None = None,
                          batch_size: int = 64) -> np.ndarray:
    """Embeddings ``(N, D)`` float64 of videos, for :func:`vidiffuse.evaluate.fvd_from_features`.

    ``videos``: a float tensor ``(N, 3, T, H, W)`` in [-1, 1], or a sequence of uint8 ``(T, H, W, 3)``
    arrays. ``encoder`` defaults to the bundled weights.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(videos) == 0:
        raise ConfigError("no videos to embed")
    encoder = load_shapes_video_encoder() if encoder is None else encoder
    encoder.eval()
    device, dtype = encoder.device, encoder.dtype
    out = [encoder(x.to(device, dtype)).double().cpu().numpy() for x in _as_video_batches(videos, batch_size)]
    return np.concatenate(out)


# ---------------------------------------------------------------- training


def _clips(seeds, classes: dict[str, Sequence[str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shapes-world clips as a float batch and their attribute labels (indices into ``classes``)."""
    videos, labels = [], {a: [] for a in shapes.ATTRIBUTES}
    for seed in seeds:
        spec, video, _ = shapes.generate_example(int(seed))
        videos.append(uint8_to_tensor(video))
        for a, value in spec.attributes().items():
            labels[a].append(list(classes[a]).index(value))
    return torch.stack(videos), {a: torch.tensor(v) for a, v in labels.items()}


def _gaussian_blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=videos.dtype) / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # one separable kernel per channel
    b, c, t, h, w = videos.shape
    x = videos.transpose(1, 2).reshape(b * t, c, h, w)
    # replicate padding: the border is background, so the blur does not darken the frame's edges
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(3, 1, 1, -1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(3, 1, -1, 1), groups=3)
    return x.reshape(b, t, c, h, w).transpose(1, 2)


def _augment(videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur a third of the clips faintly and add faint pixel noise to half of them.

    Without it the encoder reads attributes from exact colour values and anti-aliased edges, and its
    features jump at the first codec artefact. It stays faint: whatever the encoder is taught to ignore,
    FVD on its features cannot penalise.
    """
    b = len(videos)
    out = videos.clone()
    lo, hi = _BLUR_RANGE
    for i in torch.nonzero(torch.rand(b, generator=generator) < 1 / 3).flatten().tolist():
        out[i:i + 1] = _gaussian_blur(out[i:i + 1], lo + (hi - lo) * torch.rand((), generator=generator).item())
    noise = _MAX_NOISE * torch.rand(b, generator=generator) * (torch.rand(b, generator=generator) < 0.5)
    out += noise.view(b, 1, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    return out.clamp(-1, 1)


@torch.no_grad()
def _accuracy(encoder: ShapesVideoEncoder, videos: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = encoder.classify(torch.from_numpy(shapes_video_features(videos, encoder)).float())
    return {a: round(float((logits[a].argmax(-1) == labels[a]).float().mean()), 4) for a in shapes.ATTRIBUTES}


def _fvd_calibration(encoder: ShapesVideoEncoder, real: torch.Tensor, other_real: torch.Tensor) -> dict[str, float]:
    """FVD from ``real`` to a second real set and to degraded copies of ``real``: the scale a user needs
    to read an FVD from this encoder (an FVD of two real sets is not zero at a finite sample size)."""
    g = torch.Generator().manual_seed(0)
    variants = {
        "real (other clips)": other_real,
        "noise std 0.5": (real + 0.5 * torch.randn(real.shape, generator=g)).clamp(-1, 1),
        "blur sigma 2 px": _gaussian_blur(real, 2.0),
        "frames shuffled": torch.stack([v[:, torch.randperm(v.shape[1], generator=g)] for v in real]),
        "first frame held": real[:, :, :1].expand_as(real),
        "uniform noise": torch.rand(real.shape, generator=g) * 2 - 1,
    }
    ref = shapes_video_features(real, encoder)
    return {name: round(fvd_from_features(ref, shapes_video_features(v, encoder), bootstrap=0)["fvd"], 1)
            for name, v in variants.items()}


def train_shapes_video_encoder(out_dir: str | Path, steps: int = 600, batch_size: int = 32, seed: int = 0,
                               lr: float = 2e-3, eval_every: int = 50, eval_clips: int = 256,
                               encoder_config: dict | None = None, progress: bool = True) -> dict[str, float]:
    """Train the encoder on freshly generated clips and write it to ``out_dir``; returns held-out accuracy.

    Every step draws ``batch_size`` new clips (seeds ``seed * 2**32 + k``), so the run never sees a clip
    twice, and the same seed on the same machine and thread count gives the same weights. ``out_dir`` is
    written atomically: ``config.json``, safetensors weights, ``training_log.jsonl`` (loss and held-out
    accuracy per attribute every ``eval_every`` steps) and a model card with an FVD calibration table.
    ``encoder_config`` overrides :class:`ShapesVideoEncoder` arguments (the class lists must stay those
    of the shapes world).
    """
    from tqdm import tqdm

    if not 0 <= seed < (1 << 8):
        raise ConfigError(f"seed must be in [0, 256) so training clips stay below the held-out seeds; got {seed}")
    if steps < 1 or batch_size < 2 or eval_every < 1 or eval_clips < 1:
        raise ConfigError("steps, eval_every and eval_clips must be >= 1 and batch_size >= 2")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = ShapesVideoEncoder(**(encoder_config or {}))
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    # linear warm-up, then cosine decay to zero: the last steps settle the weights that get shipped
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    heldout = _clips(range(HELDOUT_SEED_START, HELDOUT_SEED_START + eval_clips), encoder.classes)
    log, losses, start = [], [], time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="shapes encoder", disable=not progress)
    for step in bar:
        encoder.train()
        first = seed * _SEEDS_PER_RUN + (step - 1) * batch_size
        videos, labels = _clips(range(first, first + batch_size), encoder.classes)
        logits = encoder.classify(encoder(_augment(videos, generator)))
        loss = sum(F.cross_entropy(logits[a], labels[a]) for a in shapes.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0 or step == steps:
            log.append({"step": step, "loss": round(float(np.mean(losses)), 4),
                        "heldout_accuracy": _accuracy(encoder, *heldout),
                        "seconds": round(time.perf_counter() - start, 1)})
            losses = []
            if progress:
                bar.write(json.dumps(log[-1]))
    encoder.eval()
    other = _clips(range(HELDOUT_SEED_START + eval_clips, HELDOUT_SEED_START + 2 * eval_clips), encoder.classes)[0]
    calibration = _fvd_calibration(encoder, heldout[0], other)
    with atomic_directory(out_dir) as tmp:
        encoder.save_pretrained(tmp)
        (tmp / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (tmp / "README.md").write_text(
            _model_card(encoder, log[-1], calibration, steps, batch_size, seed, lr, eval_clips))
    return log[-1]["heldout_accuracy"]


def _model_card(encoder: ShapesVideoEncoder, last: dict, calibration: dict[str, float], steps: int, batch_size: int,
                seed: int, lr: float, eval_clips: int) -> str:
    cfg = encoder.config
    n_params = sum(p.numel() for p in encoder.parameters())
    accuracy = last["heldout_accuracy"]
    rows = "\n".join(f"| {a} | {len(encoder.classes[a])} | {accuracy[a]:.3f} |" for a in shapes.ATTRIBUTES)
    fvd_rows = "\n".join(f"| {name} | {fvd} |" for name, fvd in calibration.items())
    return f"""# shapes_video_encoder — FVD features for the shapes world

A small 3-D convnet trained by this project to read the shapes world (DESIGN.md §3) from pixels. Its
{cfg.embed_dim}-d embedding is the feature space `vidiffuse.evaluate.shapes_encoder.shapes_video_features`
returns for FVD (`fvd_from_features`) on shapes-world videos, where the usual I3D cannot be downloaded.
Trained on generated clips only. **Not for** real footage: its features mean nothing outside this world.

## Architecture
`ShapesVideoEncoder` (diffusers ModelMixin/ConfigMixin), {n_params:,} parameters, float32 safetensors.
Input `(B, 3, T, H, W)` in [-1, 1] (trained on 16 frames of 64×64), area-downsampled to
{cfg.sample_size}×{cfg.sample_size}; Conv3d/GroupNorm/SiLU blocks with channels {list(cfg.block_out_channels)}
and layers per block {list(cfg.layers_per_block)}, each block after the first halving T, H and W; global
mean and max pooling; a linear projection to the **{cfg.embed_dim}-d embedding** (the FVD feature); one
linear classification head per attribute on the embedding (training only).

## Training
{steps} steps × batch {batch_size} of freshly generated clips (seed {seed}), cross-entropy summed over the
five attributes, AdamW lr {lr}, warm-up and cosine decay, fp32 on {torch.get_num_threads()} CPU thread(s)
({last['seconds']:.0f} s). Faint augmentation: pixel noise (std ≤ {_MAX_NOISE} in [-1, 1] units) on half the
clips, Gaussian blur (σ {_BLUR_RANGE[0]}–{_BLUR_RANGE[1]} px) on a third. Reproduce:

    .venv/bin/python scripts/train_shapes_video_encoder.py --steps {steps} --batch-size {batch_size} --seed {seed}

## Held-out accuracy ({eval_clips} clips never trained on, final step)

| attribute | classes | accuracy |
|---|---|---|
{rows}

Per-step loss and accuracy: `training_log.jsonl`.

## Reading an FVD from it

FVD from {eval_clips} held-out real clips to {eval_clips} others, and to degraded copies of the same clips:

| second set | FVD |
|---|---|
{fvd_rows}

Two real sets differ by chance in how often each colour, shape and motion occurs, and the embedding
spreads exactly those apart, so real-vs-real FVD stays well above zero and grows fast as the sets
shrink: compare models only at the same, large number of clips ({eval_clips} here). Faint noise, blur and
H.264 compression barely move the features, by design; heavy noise or blur within otherwise correct
clips moves them much less than wrong content or broken motion does.
"""
