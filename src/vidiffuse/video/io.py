"""Video files on disk <-> tensors, through PyAV.

In memory a single video is ``(C, T, H, W)`` float in ``[-1, 1]``; on disk it is H.264 MP4, yuv420p.
Every failure surfaces as :class:`VideoReadError` / :class:`VideoWriteError`, never a raw av exception.
"""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from vidiffuse.errors import VideoReadError, VideoWriteError

__all__ = ["encode_video_bytes", "frames_to_uint8", "probe_video", "read_video", "uint8_to_tensor", "write_video"]


def error_reason(e: BaseException) -> str:
    """The human part of an av/OS error, without the errno and file name FFmpeg appends."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(C, T, H, W)`` float in [-1, 1] -> ``(T, H, W, 3)`` uint8 (values outside the range are clipped)."""
    x = video.detach().to("cpu", torch.float32)
    return ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def uint8_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(C, T, H, W)`` float32 in [-1, 1]; inverse of :func:`frames_to_uint8`."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1)


def _as_uint8_frames(video) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        if video.ndim == 5 and video.shape[0] == 1:  # tolerate a batch of one
            video = video[0]
        if video.ndim != 4 or video.shape[0] != 3:
            raise VideoWriteError(f"expected a video tensor of shape (3, T, H, W), got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise VideoWriteError(f"expected a float video tensor in [-1, 1], got dtype {video.dtype}")
        if not torch.isfinite(video).all():
            raise VideoWriteError("video tensor contains NaN or infinite values")
        frames = frames_to_uint8(video)
    elif isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise VideoWriteError(f"expected a uint8 array of shape (T, H, W, 3), got {video.dtype} {video.shape}")
        frames = video
    else:
        raise VideoWriteError(f"expected a torch.Tensor or numpy array, got {type(video).__name__}")
    if 0 in frames.shape:
        raise VideoWriteError(f"cannot write an empty video of shape (T, H, W, 3) = {frames.shape}")
    # yuv420p subsamples chroma 2x2, so H.264 needs even sizes: pad by repeating the last row/column.
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def encode_video_bytes(video, fps: int = 8, crf: int = 18) -> bytes:
    """Encode a video (tensor ``(C, T, H, W)`` in [-1, 1] or uint8 ``(T, H, W, 3)``) to H.264 MP4 bytes.

    Odd heights/widths are padded up to even by repeating the edge pixels.
    """
    if not (isinstance(fps, int) and fps > 0):
        raise VideoWriteError(f"fps must be a positive integer, got {fps!r}")
    if not 0 <= crf <= 51:
        raise VideoWriteError(f"crf must be in [0, 51], got {crf!r}")
    frames = _as_uint8_frames(video)
    buf = io.BytesIO()
    try:
        with av.open(buf, mode="w", format="mp4") as container:
            # veryfast keeps tiny clips at a few ms; crf sets quality independent of preset.
            # No B-frames and no lookahead: x264's frame-type and macroblock-tree decisions varied from
            # run to run for identical input (seen with PyAV 18), and the same seed must give the same file.
            stream = container.add_stream("libx264", rate=fps, options={
                "crf": str(crf), "preset": "veryfast", "x264-params": "bframes=0:rc-lookahead=0:mbtree=0"})
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, fps)
            # x264's thread pool costs more than it saves on small frames (the common case here).
            stream.codec_context.thread_count = 1 if frames.shape[1] * frames.shape[2] <= 256 * 256 else 0
            for i, arr in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    except (av.FFmpegError, ValueError) as e:
        raise VideoWriteError(f"cannot encode video: {error_reason(e)}") from e
    return buf.getvalue()


def write_video(path, video, fps: int = 8, crf: int = 18) -> Path:
    """Write ``video`` as H.264 MP4 to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path = Path(path)
    data = encode_video_bytes(video, fps=fps, crf=crf)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise VideoWriteError(f"cannot write video {path}: {error_reason(e)}") from e
    return path


def read_video(path, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode the first video stream of any FFmpeg-readable file.

    Returns ``(video, fps)`` with ``video`` of shape ``(C, T, H, W)``, float32 in [-1, 1].
    """
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")

    def fail(reason: str) -> VideoReadError:
        return VideoReadError(f"cannot read video {path}: {reason}")

    if not path.is_file():
        raise fail("no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise fail("file is empty")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == max_frames:
                    break
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        # A decode error after some frames is still an error: a silently truncated clip hides corruption.
        raise fail(error_reason(e)) from e
    if not frames:
        raise fail("no decodable frames")
    if not rate:
        raise fail("unknown frame rate")
    return uint8_to_tensor(np.stack(frames)), float(rate)


def probe_video(path, decode_check: bool = False) -> dict:
    """Size, frame rate, duration, frame count and codec from the container headers, without decoding
    (``decode_check`` also decodes the first frame, as a health check).

    Returns ``{"duration_s", "fps", "width", "height", "frames", "codec"}`` (None where the file does not say);
    raises VideoReadError (reason only; callers add the file) or the av/OS error for unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError("file not found")
    if path.stat().st_size == 0:
        raise VideoReadError("file is empty")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError("no video stream")
        s = container.streams.video[0]
        if not s.width or not s.height:
            raise VideoReadError("unknown frame size")
        rate = s.average_rate or s.guessed_rate
        frames = s.frames or None
        if s.duration is not None and s.time_base:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        elif frames and rate:
            duration = frames / float(rate)
        else:
            duration = None
        codec = s.codec_context.name
        if decode_check and next(container.decode(s), None) is None:
            raise VideoReadError("no decodable frames")
    return {"duration_s": duration, "fps": float(rate) if rate else None, "width": s.width, "height": s.height,
            "frames": frames, "codec": codec}
