"""First frames for image-to-video: read from a path, a PIL image or an array, and named by a hash."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ..errors import ConfigError


def load_image(image):
    """A path, PIL image or uint8 (H, W, 3) array as an RGB PIL image; ConfigError if it is none of them."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ConfigError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                return f.convert("RGB")
        except FileNotFoundError:
            raise ConfigError(f"image {image} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"cannot read image {image}: {e}") from None
    raise ConfigError(f"an image must be a file path, a PIL image or a uint8 array, not {type(image).__name__}")


def image_sha256(image) -> str:
    """SHA-256 of an RGB image's size and pixels: which first frame a video was conditioned on, format aside."""
    return hashlib.sha256(f"{image.width}x{image.height}\n".encode() + image.tobytes()).hexdigest()
