"""Wan 2.x, LTX-Video and CogVideoX, as diffusers pipelines, behind vidiffuse's pipeline surface.

`DiffusersVideoPipeline` wraps a loaded diffusers pipeline so that everything built on `VideoPipeline`
(generate, eval, verify, the server) runs it unchanged: the same call, the same `VideoOutput`, the same
watermark and signed manifest. What differs per family sits in `FAMILIES`.

A model directory is a plain diffusers pipeline directory (what `save_pretrained` writes, or a Hub
snapshot). An optional `vidiffuse.json` beside its `model_index.json` sets what the directory cannot say:

    {"name": "wan-1.3b", "height": 480, "width": 832, "frames": 81, "fps": 16,
     "defaults": {"steps": 30, "guidance": 5.0}, "negative_prompt": "...",
     "offload": "model", "vae_tiling": true, "dtype": "bf16", "cache_threshold": 0.1}

The load options in it (offload, vae_tiling, dtype, quantize, cache_threshold, device) apply wherever the
model is loaded, e.g. by `vidiffuse serve`; arguments to `load` override them.

Longer videos than the model's trained length (`frames` above) are made by last-frame continuation: each
further segment is generated image-to-video from the previous segment's last frame, which is dropped from
the new segment, so the joins repeat no frame. That needs an image-to-video route on the same weights: an
image-to-video model (Wan I2V, LTX, CogVideoX I2V) or LTX-Video, whose text-to-video weights do both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from ..files import sha256_file, vidiffuse_home, write_atomic
from ..pipeline import LIMITS, VideoOutput, VideoPipeline, model_version
from ..video.image import image_sha256, load_image

logger = logging.getLogger(__name__)

SIDECAR = "vidiffuse.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OFFLOAD = ("none", "model", "sequential")
QUANTIZE = ("bnb-4bit", "bnb-8bit", "torchao-int8")
LOAD_OPTIONS = ("offload", "vae_tiling", "dtype", "quantize", "cache_threshold", "device", "height", "width",
                "fps", "name")
MAX_FRAMES = 1024  # with continuation; one segment is at most the model's trained length


@dataclass(frozen=True)
class Family:
    """What one model family needs: its pipeline classes, trained settings and samplers."""

    name: str
    t2v: str  # diffusers pipeline class names
    i2v: str
    height: int  # the trained (default) resolution and length, from the model cards
    width: int
    frames: int
    fps: int
    steps: int
    guidance: float
    samplers: tuple[str, ...]  # "default" is the scheduler the directory ships
    i2v_shares_weights: bool  # the text-to-video weights also do image-to-video (LTX conditions on a latent frame)
    fp32_parts: tuple[str, ...] = ()  # components that stay fp32 when the rest is bf16/fp16 (the model cards' advice)


FAMILIES = {f.name: f for f in (
    Family("wan", "WanPipeline", "WanImageToVideoPipeline", 480, 832, 81, 16, 50, 5.0,
           ("default", "euler", "unipc", "dpm++"), False, fp32_parts=("vae", "image_encoder")),
    Family("ltx", "LTXPipeline", "LTXImageToVideoPipeline", 480, 704, 161, 24, 50, 3.0, ("default", "euler"), True),
    Family("cogvideox", "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", 480, 720, 49, 8, 50, 6.0,
           ("default", "ddim", "dpm"), False),
)}
# diffusers class name -> (family, task)
PIPELINES = {cls: (f.name, task) for f in FAMILIES.values() for cls, task in ((f.t2v, "t2v"), (f.i2v, "i2v"))}


# ---------------------------------------------------------------- finding and naming models


def diffusers_class(path: str | os.PathLike) -> str | None:
    """The diffusers video pipeline class a directory holds (one of `PIPELINES`), else None."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if name in PIPELINES else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(model: str | os.PathLike) -> bool:
    """'Wan-AI/Wan2.1-T2V-1.3B-Diffusers', not an existing local path."""
    return isinstance(model, str) and bool(_HUB_ID.match(model)) and not Path(model).exists()


def download(repo_id: str) -> Path:
    """A Hugging Face Hub pipeline's local snapshot (from the cache when offline; HF_HUB_OFFLINE=0 to fetch).

    Only diffusers video pipelines vidiffuse knows are fetched: the class is checked on model_index.json
    before any weights move.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    # read at each call (huggingface_hub reads it once, at import): offline means no network at all
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", local_files_only=offline))
    except Exception as e:  # noqa: BLE001 — offline miss, unknown repo, network: one line for the user
        hint = " (offline: set HF_HUB_OFFLINE=0 to download it)" if offline else ""
        raise ModelLoadError(f"no local model {repo_id!r} and it cannot be fetched from the Hugging Face Hub"
                             f"{hint}: {type(e).__name__}") from None
    bundle = json.loads(index.read_text()).get("_class_name") == "VideoPipeline"  # a vidiffuse model shared on the Hub
    if not bundle and diffusers_class(index.parent) is None:
        raise ModelLoadError(f"{repo_id} is not a pipeline vidiffuse can run; supported: VideoPipeline, "
                             f"{', '.join(PIPELINES)}")
    try:
        if bundle:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id, local_files_only=offline))
        return Path(DiffusionPipeline.download(repo_id, local_files_only=offline))
    except Exception as e:  # noqa: BLE001
        first_line = (str(e).splitlines() or [""])[0]
        raise ModelLoadError(f"cannot fetch {repo_id}: {type(e).__name__}: {first_line}") from None


def model_name(path: Path) -> str:
    """'owner/name' for a Hub cache snapshot (models--owner--name/snapshots/<commit>), else the folder's name."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return path.name


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's content; Hub cache blobs are named by it, local files are hashed once and remembered."""
    target = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    stat = target.stat()
    key = f"{target}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = vidiffuse_home() / "cache" / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(target)
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(memo_file, json.dumps(memo, indent=1))
        except OSError:  # a read-only home only costs hashing again next time
            pass
    return memo[key]


def weights_version(path: Path, index: dict) -> str:
    """The version that names the model in manifests and watermarks: `version` if the directory states one,
    else the first 12 hex digits of a SHA-256 over the denoiser's weights (both experts for Wan 2.2 A14B).

    A single-file denoiser hashes exactly as `pipeline.model_version` does for vidiffuse's own bundles.
    """
    files = sorted(p for sub in ("transformer", "transformer_2") for p in (path / sub).glob("*.safetensors"))
    if index.get("version") or [p.relative_to(path).as_posix() for p in files] == [
            "transformer/diffusion_pytorch_model.safetensors"]:
        return model_version(path, index)
    if not files:
        return "unversioned"
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()} {_file_sha256(p)}\n".encode())
    return digest.hexdigest()[:12]


def valid_frames(n: int, ratio: int) -> int:
    """The smallest frame count ≥ n that a VAE folding `ratio` frames into a latent frame decodes to: k·ratio + 1."""
    return -(-(n - 1) // ratio) * ratio + 1


def segment_plan(frames: int, segment: int) -> list[int]:
    """New frames per segment: the first gives `segment` frames, each continuation `segment - 1` (its first
    frame repeats the conditioning frame); the last segment is generated whole and trimmed."""
    plan, left = [min(frames, segment)], frames - min(frames, segment)
    while left > 0:
        plan.append(min(left, segment - 1))
        left -= plan[-1]
    return plan


# ---------------------------------------------------------------- the adapter


class DiffusersVideoPipeline(VideoPipeline):
    """A diffusers video pipeline with `VideoPipeline`'s surface: `pipe(prompt, seed=...) -> VideoOutput`.

    Built by `load(...)` (or `VideoPipeline.from_pretrained` on a diffusers directory), not by hand.
    """

    def __init__(self, pipe, family: str, task: str, *, height: int, width: int, frames: int, fps: int,
                 defaults: dict | None = None, name: str = "custom", path: Path | None = None,
                 index: dict | None = None, negative_prompt: str | None = None, cache_threshold: float | None = None,
                 offload: str = "none"):
        # no VideoPipeline.__init__: the diffusers pipeline holds the models, text encoder included
        self.pipe, self.family, self.task = pipe, FAMILIES[family], task
        self.height, self.width, self.frames, self.fps, self.name = height, width, frames, fps, name
        self.size = [height, width] if height != width else height
        self.defaults = {"steps": self.family.steps, "guidance": self.family.guidance, "sampler": "default",
                         **(defaults or {})}
        self.path, self.index = path, index or {}
        self.negative_prompt, self.cache_threshold, self.offload = negative_prompt, cache_threshold, offload
        self.text_encoder = None  # vidiffuse's TextEncoder; this model's own is inside `pipe`
        self._scheduler = pipe.scheduler  # the one the directory ships: the "default" sampler
        self._i2v_pipe = pipe if task == "i2v" else None
        pipe.set_progress_bar_config(disable=True)  # one bar over the whole call instead (see __call__)
        self._check_size(height, width)

    # -- what the rest of vidiffuse reads

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @functools.cached_property
    def version(self) -> str:
        return weights_version(self.path, self.index) if self.path else "unversioned"

    @property
    def ood_reference(self):
        return None  # no training captions to compare prompts with

    @property
    def temporal_ratio(self) -> int:
        """Frames per latent frame."""
        p = self.pipe
        return int(getattr(p, "vae_scale_factor_temporal", None) or getattr(p, "vae_temporal_compression_ratio", 4))

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's downscaling times the denoiser's patch."""
        p = self.pipe
        vae = getattr(p, "vae_scale_factor_spatial", None) or getattr(p, "vae_spatial_compression_ratio", 8)
        patch = getattr(p, "transformer_spatial_patch_size", None) or self.transformer.config.patch_size
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
        return int(vae) * int(patch)

    @property
    def can_continue(self) -> bool:
        """Whether videos longer than `frames` can be made (an image-to-video route on these weights)."""
        return self.task == "i2v" or self.family.i2v_shares_weights

    def _check_size(self, height: int, width: int) -> None:
        m = self.spatial_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ConfigError(f"{self.name} needs a height and width that are positive multiples of {m}, "
                              f"got {height}x{width}")

    # -- generation

    def _validate(self, prompts: Sequence[str], steps: int, guidance: float, frames: int, sampler: str) -> None:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ConfigError("the prompt is empty")
            if len(p) > LIMITS["prompt_chars"]:
                raise ConfigError(f"the prompt is longer than {LIMITS['prompt_chars']} characters")
        for key, value in (("steps", steps), ("guidance", guidance)):
            lo, hi = LIMITS[key]
            if not lo <= value <= hi:
                raise ConfigError(f"{key} must be between {lo} and {hi}, got {value}")
        if not 1 <= frames <= MAX_FRAMES:
            raise ConfigError(f"frames must be between 1 and {MAX_FRAMES}, got {frames}")
        if frames > self.frames and not self.can_continue:
            raise ConfigError(f"{self.name} makes at most {self.frames} frames in one pass, and longer videos need "
                              f"an image-to-video route ({self.family.i2v} weights, or LTX-Video); got {frames}")
        if sampler not in self.family.samplers:
            raise ConfigError(f"unknown sampler {sampler!r} for {self.family.name}; choose one of "
                              f"{', '.join(self.family.samplers)}")

    def scheduler_for(self, sampler: str):
        """The scheduler behind a sampler name: the shipped one, or one built from its settings."""
        base = self._scheduler
        if sampler == "default":
            return base
        if self.family.name == "cogvideox":
            from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

            return {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[sampler].from_config(base.config)
        if self.family.name == "ltx":  # LTX sets its own sigmas and shift: only flow-match Euler takes them
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_config(base.config)
        from ..diffusion.sampling import make_scheduler

        shift = base.config.get("flow_shift") or base.config.get("shift") or 1.0
        return make_scheduler(sampler, float(shift))

    @property
    def i2v_pipe(self):
        """The image-to-video pipeline on these weights (for --image and continuation)."""
        if self._i2v_pipe is None:
            import diffusers

            self._i2v_pipe = getattr(diffusers, self.family.i2v).from_pipe(self.pipe)  # shares every module
            self._i2v_pipe.set_progress_bar_config(disable=True)
            if self.offload != "none":  # the shared modules carry the first pipeline's hooks; these follow them
                _apply_offload(self._i2v_pipe, self.offload)
        return self._i2v_pipe

    def _run(self, pipe, prompts: list[str], generators: list[torch.Generator], frames: int, steps: int,
             guidance: float, scheduler, on_step: Callable[[], None], image=None) -> torch.Tensor:
        """One diffusers call: (B, 3, T, H, W) float in [-1, 1], exactly `frames` long."""
        pipe.scheduler = scheduler
        kwargs = {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": guidance,
                  "num_frames": valid_frames(frames, self.temporal_ratio), "height": self.height, "width": self.width,
                  "generator": generators, "output_type": "pt",
                  "callback_on_step_end": lambda p, i, t, kw: (on_step(), kw)[1]}
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)
        if self.family.name == "ltx":
            kwargs["frame_rate"] = self.fps  # LTX scales its temporal position encoding by it
        if image is not None:
            kwargs["image"] = image
        out = pipe(**kwargs).frames  # (B, T, 3, H, W) in [0, 1]
        return out[:, :frames].permute(0, 2, 1, 3, 4).float().cpu().mul(2).sub(1)

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
        image=None,
    ) -> VideoOutput:
        """Generate one video per prompt, as `VideoPipeline.__call__` does. `image` (a path, PIL image or
        uint8 array) is the first frame for image-to-video; it is required by image-to-video models, and
        LTX-Video takes one with its text-to-video weights. Text-to-video prompts run `batch_size` at a
        time; image-to-video and continuation run one video at a time."""
        prompts, seeds, steps, guidance, sampler, frames = self._settings(prompt, seed, steps, guidance, sampler, frames)
        if isinstance(image, (list, tuple)):
            raise ConfigError(f"{self.name} takes one first frame per call (--image); images per prompt are for "
                              "vidiffuse's own image-to-video models")
        if image is None and self.task == "i2v":
            raise ConfigError(f"{self.name} is an image-to-video model: give the first frame (--image)")
        if image is not None and not self.can_continue:
            raise ConfigError(f"{self.name} is text-to-video only; --image needs an image-to-video model "
                              f"({self.family.i2v}) or LTX-Video")
        first = load_image(image) if image is not None else None
        scheduler = self.scheduler_for(sampler)
        plan = segment_plan(frames, self.frames)
        total = len(prompts) * steps * len(plan)
        done = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="generate", unit="step", leave=False)

        def on_step(k: int) -> None:
            nonlocal done
            done += k
            if bar is not None:
                bar.update(k)
            if callback is not None:
                callback(done, total)

        videos = []
        # one generator per video, on the CPU: a video depends on its own seed, and the same seed gives the
        # same starting noise on any device; continuation segments draw on from the same generator
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        single = batch_size if first is None and len(plan) == 1 else 1
        for start in range(0, len(prompts), single):
            chunk, gens = prompts[start : start + single], generators[start : start + single]
            step = functools.partial(on_step, len(chunk))
            if first is None:
                video = self._run(self.pipe, chunk, gens, plan[0], steps, guidance, scheduler, step)
            else:
                video = self._run(self.i2v_pipe, chunk, gens, plan[0], steps, guidance, scheduler, step, image=first)
            for new in plan[1:]:  # last-frame continuation (one video at a time: single == 1 here)
                last = _to_pil(video[0, :, -1])
                more = self._run(self.i2v_pipe, chunk, gens, new + 1, steps, guidance, scheduler, step, image=last)
                video = torch.cat([video, more[:, :, 1:]], dim=2)
            videos.append(video)
        if bar is not None:
            bar.close()
        settings = [{"prompt": p, "seed": s, "steps": steps, "guidance": guidance, "sampler": sampler,
                     "frames": frames, "model": self.name} for p, s in zip(prompts, seeds)]
        for record in settings:
            if first is not None:
                record["image_sha256"] = image_sha256(first)
            if len(plan) > 1:
                record["segments"] = len(plan)
            if self.cache_threshold is not None:  # cached output differs from uncached: the manifest says which
                record["step_cache_threshold"] = self.cache_threshold
        return self._finish(torch.cat(videos), settings, watermark)


def _to_pil(frame: torch.Tensor):
    """(3, H, W) in [-1, 1] -> RGB PIL image, as the frame will be written (uint8)."""
    from PIL import Image

    from ..video.io import frames_to_uint8

    return Image.fromarray(frames_to_uint8(frame[:, None])[0])


def _apply_offload(pipe, offload: str) -> None:
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()


def _quantization(mode: str, dtype: torch.dtype, components: list[str]):
    """diffusers' PipelineQuantizationConfig for `mode` on the denoiser(s) and the text encoder."""
    import importlib.util

    from diffusers.quantizers import PipelineQuantizationConfig

    if mode.startswith("bnb"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"--quantize {mode} needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU")
        kwargs = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
                  if mode == "bnb-4bit" else {"load_in_8bit": True})
        return PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit" if mode == "bnb-4bit" else "bitsandbytes_8bit",
                                          quant_kwargs=kwargs, components_to_quantize=components)
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"--quantize {mode} needs torchao (pip install torchao)")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return PipelineQuantizationConfig(quant_mapping={c: TorchAoConfig(Int8WeightOnlyConfig())
                                                     for c in components if c.startswith("transformer")})


def read_sidecar(path: Path) -> dict:
    """vidiffuse.json beside model_index.json, or {}."""
    file = Path(path) / SIDECAR
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    return data


def load(path: str | os.PathLike, **options) -> DiffusersVideoPipeline:
    """Load a diffusers video pipeline directory. Options (each also settable in vidiffuse.json):

    - `dtype`: "bf16", "fp16" or "fp32" (default: bf16 on a GPU, fp32 on the CPU); Wan keeps its VAE and
      image encoder in fp32, as its model card advises;
    - `device`: "cuda", "cpu", ... (default: cuda when there is one);
    - `offload`: "model" (whole models move to the GPU in turn: ~the largest model's memory) or
      "sequential" (layer by layer: least memory, slowest); needs a GPU;
    - `vae_tiling`: decode (and encode) in tiles and one video at a time: a 720p clip's VAE decode no
      longer dominates peak memory;
    - `quantize`: "bnb-4bit" / "bnb-8bit" (bitsandbytes, denoiser and text encoder) or "torchao-int8"
      (torchao int8 weight-only, denoiser);
    - `cache_threshold`: First Block Cache (diffusers' `FirstBlockCacheConfig`) on the denoiser: skip the
      other blocks at steps whose first block barely changed, e.g. 0.05–0.1; recorded in each manifest;
    - `height`, `width`, `fps`, `name`: override the family's trained defaults.
    """
    import diffusers

    path = Path(path)
    class_name = diffusers_class(path)
    if class_name is None:
        raise ModelLoadError(f"{path} is not a diffusers video pipeline vidiffuse knows ({', '.join(PIPELINES)})")
    unknown = set(options) - set(LOAD_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown load option(s) {', '.join(sorted(unknown))}; known: {', '.join(LOAD_OPTIONS)}")
    sidecar = read_sidecar(path)
    opts = {**{k: sidecar[k] for k in LOAD_OPTIONS if k in sidecar}, **{k: v for k, v in options.items() if v is not None}}
    family_name, task = PIPELINES[class_name]
    family = FAMILIES[family_name]
    has_cuda = torch.cuda.is_available()
    device = opts.get("device") or ("cuda" if has_cuda else "cpu")
    dtype_name = opts.get("dtype") or ("bf16" if device != "cpu" else "fp32")
    if dtype_name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    offload = opts.get("offload") or "none"
    if offload not in OFFLOAD:
        raise ConfigError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    if offload != "none" and not has_cuda:
        raise ConfigError("--offload moves models between the CPU and a GPU, and this machine has no CUDA GPU")
    index = json.loads((path / "model_index.json").read_text())
    kwargs = {"dtype": {"default": dtype, **{p: torch.float32 for p in family.fp32_parts}}
              if dtype != torch.float32 else dtype}
    quantize = opts.get("quantize")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        parts = [k for k in ("transformer", "transformer_2", "text_encoder")
                 if isinstance(index.get(k), list) and index[k][0] is not None]
        kwargs["quantization_config"] = _quantization(quantize, dtype, parts)
    _allow_wan_i2v_without_ftfy()
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(path, **kwargs)
    except (ConfigError, ModelLoadError):
        raise
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/safetensors errors for bad files
        raise ModelLoadError(f"cannot load {class_name} from {path}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None
    if offload != "none":
        _apply_offload(pipe, offload)
    else:
        pipe.to(device)
    if opts.get("vae_tiling"):
        pipe.vae.enable_tiling()
        if hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()
    cache = opts.get("cache_threshold")
    if cache is not None:
        from diffusers.hooks import FirstBlockCacheConfig

        from ..compress.cache import check_threshold

        cache = check_threshold(cache)
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                model.enable_cache(FirstBlockCacheConfig(threshold=cache))
    defaults = {k: v for k, v in (sidecar.get("defaults") or {}).items() if k in ("steps", "guidance", "sampler")}
    frames = sidecar.get("frames", family.frames)
    if not isinstance(frames, int) or frames < 1:
        raise ModelLoadError(f"{path / SIDECAR}: frames must be a positive integer, got {frames!r}")
    adapter = DiffusersVideoPipeline(
        pipe, family_name, task, height=int(opts.get("height", family.height)), width=int(opts.get("width", family.width)),
        frames=frames, fps=int(opts.get("fps", family.fps)), defaults=defaults,
        name=str(opts.get("name") or model_name(path)), path=path, index={**index, **sidecar},
        negative_prompt=sidecar.get("negative_prompt"), cache_threshold=cache, offload=offload)
    ratio = adapter.temporal_ratio
    if (frames - 1) % ratio:
        raise ModelLoadError(f"{path / SIDECAR}: {family_name} makes k·{ratio}+1 frames, not {frames}")
    return adapter


def _allow_wan_i2v_without_ftfy() -> None:
    """diffusers 0.42's Wan image-to-video module calls `ftfy.fix_text` unguarded, where its text-to-video
    module skips it when ftfy is absent; without ftfy, give the former the latter's behaviour."""
    from diffusers.utils import is_ftfy_available

    if is_ftfy_available():
        return
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        logger.info("ftfy is not installed: Wan prompts are not unicode-repaired (pip install ftfy)")
        pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def generation_setup(model: str | os.PathLike, settings: dict, image=None, prompts_file: Path | None = None,
                     **load_options) -> tuple[object, dict]:
    """What `vidiffuse generate` runs on: (pipeline or model name, settings for `generate_file`/`generate_batch`).

    A vidiffuse bundle in batch mode stays a name, loaded by `generate_batch` once it has checked the
    prompts file; a diffusers model is loaded here with `load_options`, after that check. On a diffusers
    model the step cache (`cache_threshold`) is diffusers' own First Block Cache, set at load: its pipelines
    run the prompt and the negative prompt as separate denoiser calls, which vidiffuse's step cache (made
    for one batched call per step) does not expect. `image` goes to the pipeline call.
    """
    from ..generation import read_prompts
    from ..pipeline import resolve_model_path

    settings = dict(settings)
    given = {k: v for k, v in load_options.items() if v not in (None, False)}
    path = resolve_model_path(model)
    if diffusers_class(path) is None:
        if image is not None:  # the bundle checks that it takes a first frame
            settings["image"] = image
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            raise ConfigError(f"{flags}: for diffusers models (Wan, LTX-Video, CogVideoX), not {path.name}")
        return (model if prompts_file is not None else VideoPipeline.from_pretrained(path)), settings
    if prompts_file is not None:
        read_prompts(prompts_file)  # a bad prompts file fails now, not after minutes of loading
    if settings.get("cache_threshold") is not None:
        given["cache_threshold"] = settings["cache_threshold"]
    settings["cache_threshold"] = None
    if image is not None:
        settings["image"] = image
    return load(path, **given), settings
