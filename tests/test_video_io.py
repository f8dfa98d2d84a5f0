import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from vidiffuse.errors import VideoReadError, VideoWriteError
from vidiffuse.video import encode_video_bytes, frames_to_uint8, read_video, uint8_to_tensor, write_video


def smooth_clip(t=16, h=64, w=64) -> torch.Tensor:
    """A moving colour gradient: realistic enough that H.264 at crf 18 is near lossless."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frames = [torch.stack([torch.sin(2 * x + 0.3 * i), torch.cos(2 * y - 0.2 * i), x * y]) for i in range(t)]
    return torch.stack(frames, dim=1) * 0.8  # (C, T, H, W)


def write_with_pyav(path, codec, fmt, n=6, size=(48, 32), fps=10, options=None):
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps, options=options or {})
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())


def temp_files(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_uint8_tensor_round_trip_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    t = uint8_to_tensor(frames)
    assert t.shape == (3, 5, 7, 9) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    np.testing.assert_array_equal(frames_to_uint8(t), frames)


def test_write_read_round_trip(tmp_path):
    video = smooth_clip()
    out = write_video(tmp_path / "clip.mp4", video, fps=8)
    assert out == tmp_path / "clip.mp4" and out.stat().st_size > 0
    assert temp_files(tmp_path) == []

    back, fps = read_video(out)
    assert back.shape == video.shape and back.dtype == torch.float32
    assert fps == pytest.approx(8)
    assert back.min() >= -1 and back.max() <= 1
    assert (back - video).abs().mean() < 0.03

    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.format.name == "yuv420p"
        assert s.average_rate == 8 and s.frames == 16
        assert float(s.duration * s.time_base) == pytest.approx(2.0)

    assert read_video(out, max_frames=5)[0].shape == (3, 5, 64, 64)


def test_write_uint8_and_bytes_match(tmp_path):
    frames = frames_to_uint8(smooth_clip(t=4, h=32, w=32))
    data = encode_video_bytes(frames, fps=12)
    assert data[4:8] == b"ftyp"
    path = write_video(tmp_path / "a.mp4", frames, fps=12)
    assert path.read_bytes() == data
    back, fps = read_video(path)
    assert fps == pytest.approx(12)
    # 4:2:0 halves chroma resolution, which costs a few levels on a saturated 32x32 gradient
    assert np.abs(frames_to_uint8(back).astype(int) - frames).mean() < 6


def test_encoding_is_reproducible(tmp_path):
    video = smooth_clip(t=4, h=32, w=32)
    first = encode_video_bytes(video)
    path = write_video(tmp_path / "other.mp4", smooth_clip(t=8))
    for _ in range(5):
        read_video(path)  # interleaved decodes once perturbed PyAV's implicit pixel conversion
        assert encode_video_bytes(video) == first


def test_odd_size_is_padded_to_even(tmp_path):
    video = smooth_clip(t=3, h=33, w=47)
    back, _ = read_video(write_video(tmp_path / "odd.mp4", video))
    assert back.shape == (3, 3, 34, 48)
    assert (back[:, :, :33, :47] - video).abs().mean() < 0.05
    # the padding repeats the edge rather than adding a black border
    assert (back[:, :, 33, :47] - video[:, :, 32]).abs().mean() < 0.1


@pytest.mark.parametrize(
    ("name", "codec", "fmt", "options"),
    [
        ("clip.webm", "libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"}),
        ("clip8.webm", "libvpx", "webm", {"deadline": "realtime", "cpu-used": "16"}),
        ("clip.mov", "libx264", "mov", {"preset": "ultrafast"}),
    ],
)
def test_reads_other_containers(tmp_path, name, codec, fmt, options):
    path = tmp_path / name
    write_with_pyav(path, codec, fmt, n=6, size=(48, 32), fps=10, options=options)
    video, fps = read_video(path)
    assert video.shape == (3, 6, 32, 48)
    assert fps == pytest.approx(10)
    assert video.min() >= -1 and video.max() <= 1


def test_bad_files_raise_video_read_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(encode_video_bytes(smooth_clip(t=4, h=32, w=32))[:200])
    for path in (tmp_path / "missing.mp4", empty, noise, text, truncated, tmp_path):
        with pytest.raises(VideoReadError, match="cannot read video") as info:
            read_video(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(VideoReadError, match="no video stream"):
        read_video(path)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VideoWriteError, match="cannot write video"):
        write_video(blocker / "out.mp4", smooth_clip(t=2, h=16, w=16))
    assert temp_files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_leaves_no_temp_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(VideoWriteError):
            write_video(ro / "out.mp4", smooth_clip(t=2, h=16, w=16))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_failed_overwrite_keeps_old_file(tmp_path):
    path = write_video(tmp_path / "keep.mp4", smooth_clip(t=2, h=16, w=16))
    before = path.read_bytes()
    with pytest.raises(VideoWriteError):
        write_video(path, torch.full((3, 2, 16, 16), float("nan")))
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 4, 16, 16),
        torch.zeros(4, 16, 16),
        torch.zeros(3, 0, 16, 16),
        np.zeros((2, 16, 16, 3), np.float32),
    ],
)
def test_bad_input_raises_video_write_error(tmp_path, bad):
    with pytest.raises(VideoWriteError):
        write_video(tmp_path / "bad.mp4", bad)
    assert list(tmp_path.iterdir()) == []
