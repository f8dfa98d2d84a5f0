import json

import numpy as np
import pytest

from vidiffuse.data import shapes
from vidiffuse.video import read_video
from vidiffuse.video.io import frames_to_uint8


def test_generation_is_deterministic():
    a = shapes.generate_example(7)
    b = shapes.generate_example(7)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], shapes.generate_example(8)[1])


def test_clips_follow_the_spec():
    for seed in range(200):
        spec, video, _ = shapes.generate_example(seed)
        assert video.shape == (16, 64, 64, 3) and video.dtype == np.uint8
        bg = np.array(shapes.BACKGROUNDS[spec.background])
        # every corner pixel of every frame is background: nothing leaves the frame
        assert (video[:, [0, 0, -1, -1], [0, -1, 0, -1]] == bg).all()
        if spec.direction != "still":
            assert shapes.SPEED_RANGE[0] <= spec.speed <= shapes.SPEED_RANGE[1]
        # whole shape inside every frame: the object never touches the border rows/columns
        d = shapes.SIZES[spec.size] / 2
        vx, vy = shapes._VELOCITY[spec.direction]
        for t in (0, 15):
            cx, cy = spec.x0 + vx * spec.speed * t, spec.y0 + vy * spec.speed * t
            assert d <= cx <= 64 - d and d <= cy <= 64 - d


def test_analyzer_reads_back_every_attribute():
    hits = {a: 0 for a in shapes.ATTRIBUTES}
    n = 300
    for seed in range(1000, 1000 + n):
        spec, video, _ = shapes.generate_example(seed)
        reading = shapes.analyze_video(video)
        for a in shapes.ATTRIBUTES:
            hits[a] += reading[a] == getattr(spec, a)
        assert min(reading["stability"].values()) == 1.0
    assert all(h == n for h in hits.values()), hits


def test_analyzer_survives_h264(tmp_path):
    from vidiffuse.video import write_video

    for seed in range(20):
        spec, video, _ = shapes.generate_example(seed)
        write_video(tmp_path / "c.mp4", video)
        decoded = frames_to_uint8(read_video(tmp_path / "c.mp4")[0])
        assert {a: shapes.analyze_video(decoded)[a] for a in shapes.ATTRIBUTES} == spec.attributes()


def test_analyzer_on_empty_and_noise():
    blank = np.zeros((16, 64, 64, 3), np.uint8)
    r = shapes.analyze_video(blank)
    assert r["background"] == "black" and r["shape"] is None and r["direction"] is None
    noise = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    shapes.analyze_video(noise)  # must not raise


def test_captions_vary_and_name_the_attributes():
    rng = np.random.default_rng(0)
    spec = shapes.ClipSpec("white", "blue", "square", "small", "left", 1.8, 30, 30)
    captions = {shapes.make_caption(spec.attributes(), rng) for _ in range(200)}
    assert len(captions) > 100
    for c in captions:
        low = c.lower()
        assert any(w in low for w in ("white",)), c
        assert any(w in low for w in shapes._SYN["color"]["blue"]), c
        assert any(w in low for w in ("left",)), c
    unsaid = shapes.make_caption({"shape": "circle", "direction": "left"}, rng).lower()
    assert not any(c in unsaid for c in shapes.COLORS) and "background" not in unsaid


def test_caption_version_2_adds_path_phrasings_and_version_1_is_unchanged():
    from vidiffuse.errors import ConfigError
    from vidiffuse.train.data import shapes_specs

    attrs = shapes.ClipSpec("black", "red", "circle", "large", "down", 2.0, 30, 30).attributes()
    v1 = [shapes.make_caption(attrs, np.random.default_rng(s)) for s in range(300)]
    v2 = [shapes.make_caption(attrs, np.random.default_rng(s), version=2) for s in range(300)]
    assert not any(" to bottom" in c or "to the bottom" in c for c in v1)
    paths = [c for c in v2 if "top to" in c or "top towards" in c or "the top to the bottom" in c]
    assert 40 < len(paths) and all("bottom" in c for c in paths)
    # a data section names its version; the default reads the captions every shipped model was trained on
    default = [c for _, cs in shapes_specs({"num_clips": 20, "seed": 3}) for c in cs]
    assert default == [c for _, cs in shapes_specs({"num_clips": 20, "seed": 3, "caption_version": 1}) for c in cs]
    assert default != [c for _, cs in shapes_specs({"num_clips": 20, "seed": 3, "caption_version": 2}) for c in cs]
    with pytest.raises(ConfigError, match="caption_version must be one of 1, 2"):
        next(shapes_specs({"num_clips": 1, "caption_version": 3}))


def test_synthesize_writes_clips_and_captions(tmp_path):
    shapes.synthesize(tmp_path, 5, seed=3, progress=False)
    lines = [json.loads(l) for l in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [l["file"] for l in lines] == [f"{i:06d}.mp4" for i in range(5)]
    video, fps = read_video(tmp_path / lines[0]["file"])
    assert video.shape == (3, 16, 64, 64) and fps == pytest.approx(8)
    assert shapes.analyze_video(frames_to_uint8(video))["color"] == lines[0]["color"]
