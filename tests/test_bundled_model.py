"""The shipped `shapes` model: it loads by its short name and its videos show what the prompt asks."""

import numpy as np

from vidiffuse.data import shapes
from vidiffuse.pipeline import BUNDLED, VideoPipeline, resolve_model_path

PROMPTS = [
    ("a large red circle moving right on a black background", dict(size="large", color="red", shape="circle", direction="right", background="black")),
    ("small blue square sliding to the left over white", dict(size="small", color="blue", shape="square", direction="left", background="white")),
    ("a big yellow triangle rising on a gray background", dict(size="large", color="yellow", shape="triangle", direction="up", background="gray")),
    ("a tiny green circle falling against a black backdrop", dict(size="small", color="green", shape="circle", direction="down", background="black")),
    ("a large purple square standing still on white", dict(size="large", color="purple", shape="square", direction="still", background="white")),
    ("a small orange triangle moving right over gray", dict(size="small", color="orange", shape="triangle", direction="right", background="gray")),
    ("a big blue circle moving up on a white background", dict(size="large", color="blue", shape="circle", direction="up", background="white")),
    ("a small red square moving down on black", dict(size="small", color="red", shape="square", direction="down", background="black")),
]


def assert_follows_prompts(videos, floors: dict) -> list[dict]:
    """Each attribute of PROMPTS read back from `videos` at least `floors[attribute]` of the time."""
    readings = [shapes.analyze_video(v) for v in videos]
    for attribute, floor in floors.items():
        accuracy = np.mean([r[attribute] == truth[attribute] for r, (_, truth) in zip(readings, PROMPTS)])
        assert accuracy >= floor, (attribute, accuracy, readings)
    return readings


def test_bundled_model_is_the_default_and_follows_prompts():
    assert resolve_model_path(None) == resolve_model_path("shapes") == BUNDLED["shapes"]
    pipe = VideoPipeline.from_pretrained()
    out = pipe([p for p, _ in PROMPTS], seed=list(range(len(PROMPTS))), progress=False)
    # floors well above chance (background/shape 1/3, colour 1/6, size 1/2, direction 1/5) that the
    # current model clears on these prompts; issue #2's targets are measured by benchmarks/engine.py
    readings = assert_follows_prompts(out.frames, {"background": 0.875, "color": 0.875, "shape": 0.5, "size": 0.75,
                                                   "direction": 0.875})
    # the object keeps its colour, shape and size over time
    assert np.mean([r["stability"]["color"] for r in readings]) > 0.9


def test_bundled_distilled_model_is_a_student_of_the_bundled_model():
    from vidiffuse.compress.distill import distilled_parts_for
    from vidiffuse.models.tiny_decoder import TinyDecoder

    teacher = VideoPipeline.from_pretrained("shapes")
    student = VideoPipeline.from_pretrained("shapes-distilled")
    assert student.index["distilled_from"] == {"name": "shapes", "version": teacher.version}
    assert student.defaults["steps"] == 2 and student.defaults["guidance"] == 1.0
    assert isinstance(student.decoder, TinyDecoder)
    distilled_parts_for(teacher)  # what `vidiffuse bench` checks before running the `distilled` variant
    out = student([p for p, _ in PROMPTS], seed=list(range(len(PROMPTS))), progress=False)
    # floors the student clears on these prompts (its shape lags the teacher's: benchmarks/results/compress)
    assert_follows_prompts(out.frames, {"background": 0.875, "color": 0.875, "shape": 0.5, "size": 0.75,
                                        "direction": 0.875})


def test_bundled_image_to_video_model_starts_from_the_image():
    """shapes-i2v: on held-out first frames, the object's path starts where the image shows it and the
    video shows the image's attributes; a text-to-video model, given the same prompts, starts anywhere."""
    from vidiffuse.evaluate.image_to_video import score_image_to_video

    pipe = VideoPipeline.from_pretrained("shapes-i2v")
    assert pipe.takes_image and pipe.index["fine_tuned_from"]["name"] == "shapes"
    with_image = score_image_to_video(pipe, 8)["overall"]
    # floors the model clears on these 8 (benchmarks/results/image_to_video: 200 clips)
    assert with_image["start_error_px"] < 4.0, with_image
    assert min(with_image[f"acc_{a}"] for a in ("background", "color", "shape", "size")) >= 0.75, with_image
    assert with_image["acc_direction"] >= 0.75, with_image
    text_only = score_image_to_video(pipe, 8, with_image=False)["overall"]
    assert text_only["start_error_px"] > 2 * with_image["start_error_px"], text_only
