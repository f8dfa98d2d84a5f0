import json

import numpy as np
import pytest
import torch

from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.pipeline import VideoPipeline, resolve_model_path


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return VideoPipeline.from_pretrained(tiny_bundle)


def test_output_shape_and_range(pipe):
    out = pipe("a red circle moving left", seed=0, progress=False)
    assert out.videos.shape == (1, 3, 16, 64, 64)
    assert out.videos.min() >= -1 and out.videos.max() <= 1
    assert out.frames[0].shape == (16, 64, 64, 3) and out.frames[0].dtype == np.uint8
    assert out.settings[0]["steps"] == 3 and out.settings[0]["sampler"] == "euler"


def test_same_seed_same_video_and_seed_matters(pipe):
    a = pipe("a blue square", seed=5, progress=False).frames[0]
    b = pipe("a blue square", seed=5, progress=False).frames[0]
    c = pipe("a blue square", seed=6, progress=False).frames[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_video_depends_on_its_own_seed_not_its_batch(pipe):
    single = pipe("a green triangle", seed=3, progress=False).videos[0]
    batch = pipe(["a yellow square", "a green triangle"], seed=[9, 3], progress=False).videos[1]
    torch.testing.assert_close(single, batch, atol=2e-2, rtol=0)


def test_prompt_changes_the_video(pipe):
    a = pipe("a red circle", seed=1, progress=False).videos
    b = pipe("a huge blue square falling on white", seed=1, progress=False).videos
    assert (a - b).abs().mean() > 1e-4


@pytest.mark.parametrize("sampler", ["euler", "unipc", "dpm++"])
def test_samplers_run_and_respect_steps(pipe, sampler):
    calls = []
    pipe("a dot", steps=4, sampler=sampler, progress=False, callback=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (4, 4) and len(calls) == 4


def test_other_frame_counts(pipe):
    assert pipe("a dot", frames=8, progress=False).frames[0].shape == (8, 64, 64, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "frames": 0}, "frames"),
    ({"prompt": "x", "frames": 7}, "multiple"),
    ({"prompt": "x", "guidance": -1}, "guidance"),
    ({"prompt": "x", "sampler": "ddim"}, "sampler"),
    ({"prompt": "x" * 5000}, "longer"),
])
def test_bad_settings_are_refused(pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pipe(progress=False, **kwargs)


def test_unknown_and_corrupt_models(tmp_path, tiny_bundle):
    with pytest.raises(ModelLoadError, match="no vidiffuse model"):
        resolve_model_path(tmp_path / "nowhere")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        VideoPipeline.from_pretrained(broken)


def test_bundle_index(tiny_bundle):
    index = json.loads((tiny_bundle / "model_index.json").read_text())
    assert index["frames"] == 16 and index["text_encoder"] == "minilm"
    assert (tiny_bundle / "transformer" / "diffusion_pytorch_model.safetensors").exists()
