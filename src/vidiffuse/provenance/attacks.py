"""The edits a watermark must survive (issue #5): each takes uint8 frames (T, H, W, 3) and returns what a
viewer's copy would decode to after that edit and a fresh H.264 encode."""

from __future__ import annotations

import io

import av
import cv2
import numpy as np

from vidiffuse.video.io import encode_video_bytes

REENCODE_CRF = 23  # libx264's default: what a re-upload would typically get


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def reencode(frames: np.ndarray, crf: int = REENCODE_CRF) -> np.ndarray:
    return decode_mp4(encode_video_bytes(np.ascontiguousarray(frames), crf=crf))


def h264_crf28(frames: np.ndarray) -> np.ndarray:
    return reencode(frames, crf=28)


def downscale_half(frames: np.ndarray) -> np.ndarray:
    t, h, w, _ = frames.shape
    return reencode(np.stack([cv2.resize(f, (w // 2, h // 2), interpolation=cv2.INTER_AREA) for f in frames]))


def crop_10_percent(frames: np.ndarray) -> np.ndarray:
    t, h, w, _ = frames.shape
    dy, dx = round(0.1 * h), round(0.1 * w)
    return reencode(frames[:, dy : h - dy, dx : w - dx])


def drop_every_other_frame(frames: np.ndarray) -> np.ndarray:
    return reencode(frames[::2])


def brightness(factor: float):
    def attack(frames: np.ndarray) -> np.ndarray:
        return reencode(np.clip(frames.astype(np.float32) * factor, 0, 255).round().astype(np.uint8))
    return attack


ATTACKS = {
    "none (H.264 CRF 23)": reencode,
    "H.264 CRF 28": h264_crf28,
    "downscale to half": downscale_half,
    "crop 10% each side": crop_10_percent,
    "drop every other frame": drop_every_other_frame,
    "brightness +10%": brightness(1.1),
    "brightness -10%": brightness(0.9),
}
