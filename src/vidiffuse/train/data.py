"""Training data: what each training task reads, built once and cached as safetensors.

- autoencoder: individual frames (the autoencoder works frame by frame);
- denoiser: latent clips (frames encoded by the trained autoencoder) with their prompts' text
  embeddings, so a training step spends its time on the denoiser, not on re-encoding.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from ..data import shapes
from ..files import write_atomic
from ..precision import autocast


def extra_colors(data_cfg: dict) -> list[str]:
    """The opt-in colours (`shapes.EXTRA_COLORS`) a shapes [data] section adds to the world: `extra_colors`."""
    names = list(data_cfg.get("extra_colors", []))
    shapes.palette(names)  # unknown names fail here, as a ConfigError
    return names


def caption_version(data_cfg: dict) -> int:
    """The caption vocabulary a shapes [data] section asks for: `caption_version` (default 1)."""
    version = data_cfg.get("caption_version", 1)
    if version not in shapes.CAPTION_VERSIONS:
        from ..errors import ConfigError

        raise ConfigError(f"[data] caption_version must be one of {', '.join(map(str, shapes.CAPTION_VERSIONS))}, "
                          f"got {version!r}")
    return int(version)


def shapes_specs(data_cfg: dict, frames: int = shapes.FRAMES, size: int = shapes.SIZE):
    """Yields (ClipSpec, captions) of a `kind = "shapes"` [data] section, without rendering (cheap).

    With `extra_colors = ["pink"]`, a share `extra_color_share` of the clips (default: as often as each v1
    colour) gets one of those colours; the other clips are exactly the v1 world's clips of the same seeds.
    """
    for spec, captions in _shapes_clips(data_cfg, frames, size):
        yield spec, [caption for caption, _ in captions]


def shapes_captions(data_cfg: dict) -> tuple[list[str], list[dict[str, str | None]]]:
    """Every caption of a shapes [data] section, in order, and the attributes each states (None: left unsaid):
    a prompt reader's training examples and labels (train/reader.py)."""
    frames, size = int(data_cfg.get("frames", shapes.FRAMES)), int(data_cfg.get("size", shapes.SIZE))
    pairs = [pair for _, captions in _shapes_clips(data_cfg, frames, size) for pair in captions]
    return [caption for caption, _ in pairs], [said for _, said in pairs]


def _shapes_clips(data_cfg: dict, frames: int, size: int):
    """Yields (ClipSpec, [(caption, the attributes it states)]) of a shapes [data] section."""
    seed, drop = int(data_cfg.get("seed", 0)), float(data_cfg.get("caption_drop_prob", 0.15))
    version = caption_version(data_cfg)
    extra = extra_colors(data_cfg)
    share = float(data_cfg.get("extra_color_share", len(extra) / (len(shapes.COLORS) + len(extra))))
    for i in range(int(data_cfg["num_clips"])):
        rng = np.random.default_rng([seed, i, 0x5EED])
        fixed = None
        if extra:
            pick = np.random.default_rng([seed, i, 0xC0105])  # its own stream: the clip's own draws are unchanged
            if pick.random() < share:
                fixed = {"color": extra[int(pick.integers(len(extra)))]}
        spec = shapes.sample_clip_spec(rng, frames, size, attributes=fixed)
        captions = []
        for _ in range(int(data_cfg.get("captions_per_clip", 1))):
            said = shapes.stated_attributes(spec, rng, drop)
            captions.append((shapes.make_caption(said, rng, version), said))
        yield spec, captions


def _clip_source(data_cfg: dict, frames: int, size: int):
    """Yields (uint8 video (T,H,W,3), caption) pairs for the configured source."""
    kind = data_cfg.get("kind", "shapes")
    n = int(data_cfg["num_clips"])
    seed = int(data_cfg.get("seed", 0))
    if kind == "shapes":
        specs = shapes_specs(data_cfg, frames, size)
        workers = min(os.cpu_count() or 1, 16)
        if workers < 3 or n < 2000:
            for spec, captions in specs:
                yield shapes.render_clip(spec, frames, size), captions
            return
        # rendering is ~3 ms of single-threaded numpy per clip: spread big datasets over the cores (same order)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_render, ((spec, captions, frames, size) for spec, captions in specs), chunksize=64)
    elif kind == "folder":
        from ..data.folder import VideoFolderDataset
        from ..video.io import frames_to_uint8

        ds = VideoFolderDataset(data_cfg["root"], data_cfg.get("captions"), frames=frames, size=size,
                                fps=int(data_cfg.get("fps", shapes.FPS)), seed=seed)
        for i in range(n):
            item = ds[i % len(ds)]
            if i and i % len(ds) == 0:
                ds.set_epoch(i // len(ds))
            yield frames_to_uint8(item["video"]), [item["caption"]]
    else:
        from ..errors import ConfigError

        raise ConfigError(f"unknown data kind {kind!r} (expected 'shapes' or 'folder')")


def _render(job):
    spec, captions, frames, size = job
    return shapes.render_clip(spec, frames, size), captions


def _cache_path(cache_dir: Path, tag: str, spec: dict) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{tag}-{key}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}))


def frame_pool(data_cfg: dict, frames: int, size: int, cache_dir: Path) -> torch.Tensor:
    """All frames of the configured clips, uint8 (N, 3, H, W)."""
    path = _cache_path(cache_dir, "frames", {**data_cfg, "frames": frames, "size": size})
    if path.exists():
        return load_file(path)["frames"]
    videos = [v for v, _ in tqdm(_clip_source(data_cfg, frames, size), total=int(data_cfg["num_clips"]), desc="frames")]
    pool = torch.from_numpy(np.concatenate(videos)).permute(0, 3, 1, 2).contiguous()
    _save_atomic({"frames": pool}, path)
    return pool


@torch.no_grad()
def latent_dataset(data_cfg: dict, frames: int, size: int, vae, text_encoder, cache_dir: Path,
                   vae_id: str, batch: int = 32, device: torch.device | str = "cpu",
                   precision: str = "auto") -> dict[str, torch.Tensor]:
    """Latent clips (N, C, T, h, w) and, per caption, token embeddings, masks and pooled embeddings.

    `caption_clip[j]` is the clip that caption j describes (a clip may have several captions). The encoders
    run on `device` while encoding and are back on the CPU afterwards.
    """
    path = _cache_path(cache_dir, "latents", {**data_cfg, "frames": frames, "size": size, "vae": vae_id,
                                              "text": text_encoder.name, "L": text_encoder.max_length,
                                              **({"precision": precision} if precision != "auto" else {})})
    if path.exists():
        return load_file(path)
    latents, tokens, masks, pooled, owner = [], [], [], [], []
    n = int(data_cfg["num_clips"])
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    source = _clip_source(data_cfg, frames, size)
    vae.to(device)
    text_encoder.to(device)
    try:
        with tqdm(total=n, desc="encode clips") as bar, \
                (torch.autocast("cuda", torch.bfloat16, enabled=precision != "fp32") if on_gpu else autocast(precision)):
            while bar.n < n:
                chunk = [next(source) for _ in range(min(batch, n - bar.n))]
                x = torch.from_numpy(np.stack([v for v, _ in chunk])).to(device).float().div(127.5).sub(1)
                b, t = x.shape[:2]  # B,T,H,W,3
                x = x.permute(0, 1, 4, 2, 3).reshape(b * t, 3, size, size)
                z = vae.encode(x).latent_dist.mode().float() * vae.config.scaling_factor
                latents.append(z.view(b, t, *z.shape[1:]).transpose(1, 2).to(torch.bfloat16).cpu())
                caps = [c for _, cs in chunk for c in cs]
                owner += [bar.n + i for i, (_, cs) in enumerate(chunk) for _ in cs]
                emb = text_encoder.encode(caps)
                tokens.append(emb.tokens.to(torch.bfloat16).cpu())
                masks.append(emb.mask.cpu())
                pooled.append(emb.pooled.to(torch.bfloat16).cpu())
                bar.update(len(chunk))
    finally:
        vae.to("cpu")
        text_encoder.to("cpu")
    data = {"latents": torch.cat(latents), "tokens": torch.cat(tokens), "mask": torch.cat(masks),
            "pooled": torch.cat(pooled), "caption_clip": torch.tensor(owner)}
    _save_atomic(data, path)
    return data
