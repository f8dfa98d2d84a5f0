"""Video I/O: files on disk <-> ``(C, T, H, W)`` tensors in [-1, 1]."""

from vidiffuse.video.io import encode_video_bytes, frames_to_uint8, read_video, uint8_to_tensor, write_video

__all__ = ["encode_video_bytes", "frames_to_uint8", "read_video", "uint8_to_tensor", "write_video"]
