"""Fréchet Video Distance: Gaussian statistics of I3D features, their Fréchet distance and a bootstrap CI.

FVD (Unterthiner et al., 2018) fits a Gaussian to the features of real and of generated videos and
reports the Fréchet distance between the two. The feature network is I3D trained on Kinetics-400;
nothing can be downloaded here, so :class:`I3DFeatureExtractor` reads weights from a path the user gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from vidiffuse.errors import ConfigError, ModelLoadError

__all__ = [
    "I3DFeatureExtractor",
    "feature_stats",
    "frechet_distance",
    "fvd_from_features",
    "preprocess_for_i3d",
    "register_feature_model",
    "registered_feature_models",
]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    Follows the pytorch-fid reference: where the square root of the product is not finite
    (near-singular covariances, e.g. fewer samples than feature dimensions) ``eps * I`` is added to
    both covariances, and a small imaginary part left by numerical error is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ConfigError(f"Fréchet distance needs means of one length d and d×d covariances; got "
                          f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a singular product is expected with rank-deficient covariances; the eps retry handles it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ConfigError(f"covariances too ill-conditioned for the Fréchet distance (imaginary part "
                              f"{np.abs(covmean.imag).max():.3g}); use more samples")
        covmean = covmean.real
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    # a distance is never negative; identical statistics can land a rounding error below zero
    return max(float(fd), 0.0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of features ``(N, D)``, in float64."""
    x = _as_features(features, "features")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (samples, dims); got shape {x.shape}")
    if x.shape[0] < 2:
        raise ConfigError(f"{name}: need at least 2 samples for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return x


def _covariance_factor(x: np.ndarray) -> np.ndarray:
    """A matrix ``A`` with ``A.T @ A == cov(x)``, at most (D, D) rows."""
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    return np.linalg.qr(a, mode="r") if len(a) > a.shape[1] else a


def _frechet_distance_of_samples(x: np.ndarray, y: np.ndarray) -> float:
    """``frechet_distance(*feature_stats(x), *feature_stats(y))`` without a matrix square root.

    For covariance factors ``S1 = A1ᵀA1`` and ``S2 = A2ᵀA2`` the eigenvalues of ``S1 S2`` are the squared
    singular values of ``A1 A2ᵀ``, so ``tr((S1 S2)^½)`` is the nuclear norm of ``A1 A2ᵀ``. At D = 400 this is
    about 10× faster than ``sqrtm`` and exact for singular covariances: a 200-round bootstrap takes seconds.
    """
    a, b = _covariance_factor(x), _covariance_factor(y)
    diff = x.mean(axis=0) - y.mean(axis=0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return max(float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * tr_covmean), 0.0)


def fvd_from_features(real: np.ndarray, fake: np.ndarray, bootstrap: int = 200, seed: int = 0) -> dict:
    """FVD between real and generated features ``(N, D)``, with a 95% bootstrap interval.

    Each bootstrap round resamples both sets with replacement and recomputes the distance. Resampling
    adds estimation noise, and noise raises a Fréchet distance, so raw percentiles sit above the
    estimate when the sets are close; the interval is the 2.5–97.5 percentile spread recentred on the
    point estimate by the bootstrap median, which always contains it. ``bootstrap=0`` skips the interval
    (``ci95`` is None). The same seed gives the same interval.

    Returns ``{"fvd": float, "n_real": int, "n_fake": int, "ci95": [lo, hi] | None}``.
    """
    real, fake = _as_features(real, "real features"), _as_features(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ConfigError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0, got {bootstrap}")
    fvd = frechet_distance(*feature_stats(real), *feature_stats(fake))
    ci = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        boots = [_frechet_distance_of_samples(real[rng.integers(0, len(real), len(real))],
                                              fake[rng.integers(0, len(fake), len(fake))])
                 for _ in range(bootstrap)]
        lo, med, hi = (float(q) for q in np.percentile(boots, [2.5, 50, 97.5]))
        ci = [max(fvd + lo - med, 0.0), fvd + hi - med]
    return {"fvd": fvd, "n_real": len(real), "n_fake": len(fake), "ci95": ci}


# ---------------------------------------------------------------- feature network

_FEATURE_MODELS: dict[str, Callable[[], torch.nn.Module]] = {}


def register_feature_model(name: str, factory: Callable[[], torch.nn.Module] | None = None):
    """Register a module factory under ``name`` so a safetensors state dict can be loaded into it.

    Use as ``register_feature_model("i3d", InceptionI3d)`` or as a decorator on a class or function.
    The module is called as ``model(x)`` on preprocessed input and must return ``(B, D)`` features.
    """
    def add(f: Callable[[], torch.nn.Module]):
        _FEATURE_MODELS[name] = f
        return f

    return add if factory is None else add(factory)


def registered_feature_models() -> list[str]:
    return sorted(_FEATURE_MODELS)


def preprocess_for_i3d(videos: torch.Tensor, size: int = 224, frames: int | None = 16) -> torch.Tensor:
    """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, 3, frames, size, size)`` float32 in [-1, 1].

    Keeps the first ``frames`` frames (None keeps all), clamps to [-1, 1] and resizes every frame to
    ``size × size`` with bilinear interpolation (``align_corners=False``, no antialiasing, as the
    StyleGAN-V/fvd-comparison preprocessing does). Non-square frames are stretched, not cropped.
    """
    _check_videos(videos)
    b, c, t, h, w = videos.shape
    if frames is not None:
        if t < frames:
            raise ConfigError(f"FVD features need clips of at least {frames} frames; got {t}")
        t = frames
    x = videos[:, :, :t].float().clamp(-1, 1).transpose(1, 2).reshape(b * t, c, h, w)
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(b, t, c, size, size).transpose(1, 2).contiguous()


def _check_videos(videos: torch.Tensor) -> None:
    if not torch.is_tensor(videos) or videos.ndim != 5 or videos.shape[1] != 3:
        raise ConfigError(f"videos must be a (B, 3, T, H, W) tensor; got {tuple(getattr(videos, 'shape', ()))}")
    if videos.shape[0] == 0:
        raise ConfigError("no videos to embed")


class I3DFeatureExtractor:
    """I3D video features for FVD, from local weights.

    Two kinds of file:

    - a TorchScript I3D (``architecture=None``), e.g. the ``i3d_torchscript.pt`` used by StyleGAN-V and
      fvd-comparison (a port of the Kinetics-400 I3D of the original TF FVD). It is called as
      ``model(x, rescale=False, resize=False, return_features=True)``: with both flags off the model
      expects exactly what :func:`preprocess_for_i3d` produces and returns the 400-d pre-softmax
      features. (StyleGAN-V itself passes uint8-range frames with ``rescale=True, resize=True`` and lets
      the model do the same scaling and resizing; preprocessing here keeps it in one visible place.)
    - a safetensors state dict (``architecture=`` a name given to :func:`register_feature_model`):
      the registered factory builds the module, the weights are loaded strictly, and it is called as
      ``model(x)``.

    Preprocessing, applied per batch: the first ``frames`` (16) frames, values clamped to [-1, 1], every
    frame resized to 224 × 224 with bilinear interpolation. ``__call__`` takes ``(B, 3, T, H, W)`` float
    in [-1, 1] and returns ``(B, D)`` float64 features, running ``batch_size`` videos at a time.
    """

    def __init__(self, path: str | Path | None, architecture: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 8, frames: int | None = 16, size: int = 224):
        if path is None or str(path) == "":
            raise ModelLoadError("FVD needs I3D weights: pass the path of i3d_torchscript.pt or a safetensors "
                                 "state dict (no model can be downloaded here)")
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"I3D weights not found: {path}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.frames, self.size = frames, size
        self.torchscript = architecture is None
        self.model = self._load_torchscript(path) if self.torchscript else self._load_state_dict(path, architecture)
        self.model.eval()

    def _load_torchscript(self, path: Path) -> torch.nn.Module:
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch 2.13, but it is the format the public I3D ships in
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=self.device)
        except Exception as e:  # torch raises bare RuntimeErrors for truncated or non-TorchScript files
            hint = " (a safetensors state dict needs architecture=...)" if path.suffix == ".safetensors" else ""
            raise ModelLoadError(f"cannot load TorchScript I3D from {path}{hint}: {e}") from e

    def _load_state_dict(self, path: Path, architecture: str) -> torch.nn.Module:
        from safetensors.torch import load_file

        if architecture not in _FEATURE_MODELS:
            raise ConfigError(f"unknown feature model {architecture!r}; registered: {registered_feature_models()}")
        try:
            state = load_file(str(path), device=str(self.device))
        except Exception as e:
            raise ModelLoadError(f"cannot read safetensors state dict {path}: {e}") from e
        model = _FEATURE_MODELS[architecture]()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing/unexpected keys or shape mismatches
            raise ModelLoadError(f"{path} does not fit feature model {architecture!r}: {e}") from e
        return model.to(self.device)

    @torch.inference_mode()
    def __call__(self, videos: torch.Tensor) -> np.ndarray:
        _check_videos(videos)
        out = []
        for i in range(0, len(videos), self.batch_size):
            x = preprocess_for_i3d(videos[i:i + self.batch_size], self.size, self.frames).to(self.device)
            y = self.model(x, rescale=False, resize=False, return_features=True) if self.torchscript else self.model(x)
            out.append(y.reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out)
