import json
import logging

import numpy as np
import pytest
import torch

from vidiffuse.data.folder import VideoFolderDataset
from vidiffuse.errors import ConfigError
from vidiffuse.video import frames_to_uint8, write_video

SIZE, FRAMES, FPS = 32, 8, 8


def ramp(n, h, w, base, step):
    """Grey frames whose brightness encodes the frame index: base + step * i."""
    levels = (base + step * np.arange(n)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy()


def brightness(video: torch.Tensor) -> np.ndarray:
    return frames_to_uint8(video).reshape(video.shape[1], -1).mean(axis=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "ramp24.mp4", ramp(48, 64, 64, 16, 4), fps=24)  # 2 s
    write_video(root / "sub" / "wide30.mp4", ramp(60, 96, 128, 20, 3), fps=30)  # 2 s, landscape
    write_video(root / "short8.mp4", ramp(4, 64, 64, 40, 30), fps=8)  # 0.5 s: shorter than a clip
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    rows = [
        ("ramp24.mp4", "a ramp at 24 fps"),
        ("sub/wide30.mp4", "a wide ramp, 30 fps"),
        ("short8.mp4", "short"),
        ("corrupt.mp4", "broken"),
        ("missing.mp4", "not there"),
    ]
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    (root / "other.csv").write_text("file,caption\n" + "".join(f'{f},"{c}"\n' for f, c in rows))
    return root


def make(folder, **kw):
    return VideoFolderDataset(folder, **{"frames": FRAMES, "size": SIZE, "fps": FPS, **kw})


def test_items_shapes_and_captions(folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = make(folder)
    assert len(ds) == 3
    skipped = dict(ds.skipped)
    assert set(skipped) == {str(folder / "corrupt.mp4"), str(folder / "missing.mp4")}
    assert "not found" in skipped[str(folder / "missing.mp4")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt.mp4" in warnings[0].getMessage()

    items = [ds[i] for i in range(len(ds))]
    assert [it["caption"] for it in items] == ["a ramp at 24 fps", "a wide ramp, 30 fps", "short"]
    assert items[1]["path"] == str(folder / "sub" / "wide30.mp4")
    for it in items:
        v = it["video"]
        assert v.shape == (3, FRAMES, SIZE, SIZE) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1


def test_csv_captions_match_jsonl(folder):
    a, b = make(folder), make(folder, captions=folder / "other.csv")
    assert [c.caption for c in a.clips] == [c.caption for c in b.clips]
    assert torch.equal(a[1]["video"], b[1]["video"])
    # a relative captions path is resolved against root
    assert len(make(folder, captions="other.csv")) == 3


def test_fps_resampling_picks_nearest_frames(folder):
    ds = make(folder)
    for epoch in range(3):
        ds.set_epoch(epoch)
        # 24 -> 8 fps: every third source frame, 4 brightness levels apart
        steps = np.diff(brightness(ds[0]["video"]))
        np.testing.assert_allclose(steps, 3 * 4, atol=1.5)
        # 30 -> 8 fps: 3.75 source frames per output frame, so steps of 3 or 4 frames (3 levels each)
        frames_per_step = np.diff(brightness(ds[1]["video"])) / 3
        assert np.all(np.isclose(frames_per_step, 3, atol=0.4) | np.isclose(frames_per_step, 4, atol=0.4))
        assert frames_per_step.sum() == pytest.approx(3.75 * (FRAMES - 1), abs=1.5)


def test_short_clip_repeats_last_frame(folder):
    b = brightness(make(folder)[2]["video"])
    np.testing.assert_allclose(b[:4], 40 + 30 * np.arange(4), atol=1.5)
    np.testing.assert_allclose(b[4:], b[3], atol=0.01)


def test_deterministic_per_seed_and_epoch(folder):
    a, b = make(folder, seed=3), make(folder, seed=3)
    assert torch.equal(a[0]["video"], b[0]["video"])
    assert torch.equal(a[0]["video"], a[0]["video"])
    starts = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        starts.add(round(float(brightness(a[0]["video"])[0])))
    assert len(starts) > 1, "clip start should change with the epoch"


def test_file_unreadable_at_read_time_falls_back(folder, tmp_path):
    for name in ("ramp24.mp4", "short8.mp4"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "captions.jsonl").write_text(
        '{"file": "ramp24.mp4", "caption": "a"}\n{"file": "short8.mp4", "caption": "b"}\n'
    )
    ds = make(tmp_path)
    (tmp_path / "ramp24.mp4").write_bytes(b"\x00" * 500)  # broken after probing
    item = ds[0]
    assert item["caption"] == "b"
    assert str(tmp_path / "ramp24.mp4") in dict(ds.skipped)
    assert len(ds) == 2 and ds[1]["caption"] == "b"


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="captions"):
        VideoFolderDataset(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.mp4"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        VideoFolderDataset(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.mp4", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="no usable videos"):
        VideoFolderDataset(tmp_path)
    with pytest.raises(ConfigError):
        VideoFolderDataset(tmp_path, frames=0)
