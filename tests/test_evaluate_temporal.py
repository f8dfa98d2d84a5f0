import numpy as np
import pytest

from vidiffuse.data.shapes import generate_example
from vidiffuse.errors import ConfigError
from vidiffuse.evaluate import (
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flicker,
    temporal_metrics,
)


def moving_square(speed=2.0, side=20, frames=16, size=64, background=0, color=(220, 40, 40)):
    video = np.full((frames, size, size, 3), background, np.uint8)
    for t in range(frames):
        x = int(round(4 + speed * t))
        video[t, 22:22 + side, x:x + side] = color
    return video


def moving_clip():
    """A moving clip from the shapes world (seed 7: a large shape moving right)."""
    spec, video, _ = generate_example(7)
    assert spec.direction != "still" and video.shape == (16, 64, 64, 3) and video.dtype == np.uint8
    return video


def test_static_video():
    m = temporal_metrics(np.repeat(moving_square()[:1], 16, axis=0))
    assert m["temporal_flicker"] == 1.0
    assert m["dynamic_degree"] < 0.05
    assert m["motion_smoothness"] == pytest.approx(1.0, abs=1e-6)
    assert m["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert m["background_consistency"] == pytest.approx(1.0, abs=1e-6)


def test_noise_flickers_more_than_smooth_motion():
    noise = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    smooth = moving_square()
    assert temporal_flicker(noise) < 0.8 < 0.95 < temporal_flicker(smooth) < 1.0
    assert motion_smoothness(noise) < motion_smoothness(smooth)


@pytest.mark.parametrize("side", [12, 20])
def test_dynamic_degree_reads_speed(side):
    assert dynamic_degree(moving_square(speed=2.0, side=side)) == pytest.approx(2.0, abs=0.5)
    assert dynamic_degree(moving_square(speed=4.0, side=side)) == pytest.approx(4.0, abs=1.0)


def test_shapes_world_clips():
    video = moving_clip()
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    assert motion_smoothness(video) > 0.9
    assert motion_smoothness(shuffled) < motion_smoothness(video) - 0.02
    assert subject_consistency(shuffled) < subject_consistency(video) - 0.05
    # the background is untouched by the motion, in either order
    assert background_consistency(video) > 0.99 and background_consistency(shuffled) > 0.99
    for seed in range(6):  # every clip of the world, still or moving, interpolates well
        assert motion_smoothness(generate_example(seed)[1]) > 0.9


def test_subject_change_lowers_subject_not_background_consistency():
    video = np.repeat(moving_square()[:1], 16, axis=0)
    recoloured = video.copy()
    recoloured[8:][recoloured[8:].max(axis=-1) > 0] = (40, 80, 220)  # the square turns blue halfway
    # later frames agree with earlier ones by the mean over channels of cos(90° · |Δ| / 255)
    c = np.mean(np.cos(np.pi / 2 * np.abs(np.subtract((220, 40, 40), (40, 80, 220))) / 255))
    assert subject_consistency(recoloured) == pytest.approx((7 + c + 7 * (c + 1) / 2) / 15, abs=1e-4)
    assert background_consistency(recoloured) == pytest.approx(1.0, abs=1e-6)


def test_background_change_lowers_background_consistency():
    video = moving_square(background=128)
    video[8:][(video[8:] == 128).all(axis=-1)] = 255  # gray turns white halfway; cosine of raw values would miss it
    # frames 8-15 agree with the first frame by cos(90° · 127/255), frame 8 also with its predecessor
    c = np.cos(np.pi / 2 * 127 / 255)
    assert background_consistency(video) == pytest.approx((7 + c + 7 * (c + 1) / 2) / 15, abs=1e-4)
    assert background_consistency(moving_square(background=128)) > 0.99


def test_temporal_metrics_keys_and_ranges():
    m = temporal_metrics(moving_clip())
    assert set(m) == {"subject_consistency", "background_consistency", "temporal_flicker",
                      "motion_smoothness", "dynamic_degree"}
    assert all(isinstance(v, float) for v in m.values())
    assert all(0 <= m[k] <= 1 + 1e-6 for k in m if k != "dynamic_degree")
    assert 1.0 < m["dynamic_degree"] < 3.0  # the shapes world moves 1.6-2.0 px per frame


@pytest.mark.parametrize("video", [
    np.zeros((16, 64, 64, 3), np.float32),  # not uint8
    np.zeros((16, 64, 64), np.uint8),  # no channel axis
    np.zeros((2, 64, 64, 3), np.uint8),  # too short to interpolate a frame
])
def test_rejects_bad_video(video):
    with pytest.raises(ConfigError):
        temporal_metrics(video)
