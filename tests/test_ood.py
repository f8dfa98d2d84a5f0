"""Out-of-distribution prompt scores: how far a prompt lies from the model's training captions."""

import itertools
import shutil
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT
from vidiffuse.errors import ModelLoadError
from vidiffuse.evaluate.ood import REFERENCE_FILE, PromptOOD, build_reference, shapes_training_captions
from vidiffuse.pipeline import BUNDLED, VideoPipeline

OFF_WORLD = ["a photorealistic portrait of an astronaut riding a horse on mars", "quarterly revenue spreadsheet"]
DATA = tomllib.loads((ROOT / "configs" / "shapes_denoiser.toml").read_text())["data"]


def unseen_captions(n: int) -> list[str]:
    """Captions from the shapes generator under a data seed the model was not trained on."""
    return list(itertools.islice(shapes_training_captions({**DATA, "seed": 777}), n))


@pytest.fixture(scope="module")
def bundled(text_encoder):
    return PromptOOD.load(BUNDLED["shapes"] / REFERENCE_FILE, text_encoder)


def test_captions_are_the_training_captions():
    from vidiffuse.train.data import _clip_source

    cfg = {**DATA, "num_clips": 3}
    rendered = [c for _, captions in _clip_source(cfg, 16, 64) for c in captions]
    assert list(shapes_training_captions(cfg)) == rendered


def test_bundled_reference_flags_off_world_prompts_only(bundled):
    assert (bundled.k, len(bundled.reference), bundled.percentile) == (5, 4000, 99.0)
    assert 0 < bundled.threshold < 1
    in_dist = bundled.score(unseen_captions(200))
    off = bundled.score(OFF_WORLD)
    assert np.mean(in_dist > bundled.threshold) <= 0.05
    assert bundled.is_ood(OFF_WORLD).all()
    assert off.min() > in_dist.max()
    # deterministic: the same prompts score the same, in another batch and after reloading
    again = PromptOOD.load(BUNDLED["shapes"] / REFERENCE_FILE, bundled.text_encoder)
    # equal to float rounding: oneDNN picks fp32 kernels by batch size on AVX-512, so last digits may differ
    assert np.allclose(again.score(OFF_WORLD), off, rtol=1e-6, atol=0)
    assert np.allclose(bundled.score(OFF_WORLD[1]), off[1:], rtol=1e-6, atol=0)


def test_save_load_round_trip(text_encoder, tmp_path):
    captions = unseen_captions(300)
    scorer = build_reference(text_encoder, captions[:200], captions[200:], k=3, percentile=95)
    assert 0 < np.mean(scorer.is_ood(captions[200:])) <= 0.1  # calibrated on these: ~5% above the threshold
    loaded = PromptOOD.load(scorer.save(tmp_path / REFERENCE_FILE), text_encoder)
    assert (loaded.k, loaded.threshold, loaded.percentile) == (3, scorer.threshold, 95.0)
    assert np.array_equal(loaded.score(OFF_WORLD + captions[:2]), scorer.score(OFF_WORLD + captions[:2]))
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_reference_files_are_model_load_errors(text_encoder, tmp_path):
    good = (BUNDLED["shapes"] / REFERENCE_FILE).read_bytes()
    for name, data in (("garbage", b"not a safetensors file"), ("truncated", good[: len(good) // 2]), ("empty", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelLoadError, match="cannot read the OOD reference") as e:
            PromptOOD.load(tmp_path / name, text_encoder)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="cannot read"):
        PromptOOD.load(tmp_path / "missing.safetensors", text_encoder)
    other_encoder = SimpleNamespace(name="minilm", max_length=32, dim=384)
    with pytest.raises(ModelLoadError, match="rebuild it"):
        PromptOOD.load(BUNDLED["shapes"] / REFERENCE_FILE, other_encoder)


def test_pipeline_scores_prompts_when_the_model_has_a_reference(tiny_bundle, tmp_path):
    assert VideoPipeline.from_pretrained(tiny_bundle).prompt_ood(["a red dot"]) is None
    model = tmp_path / "model"
    shutil.copytree(tiny_bundle, model)
    shutil.copy(BUNDLED["shapes"] / REFERENCE_FILE, model / REFERENCE_FILE)
    checks = VideoPipeline.from_pretrained(model).prompt_ood(["a large red circle moving right on black", OFF_WORLD[0]])
    assert [c["ood"] for c in checks] == [False, True]
    assert checks[0]["score"] < checks[0]["threshold"] == checks[1]["threshold"] < checks[1]["score"]
    (model / REFERENCE_FILE).write_bytes(b"corrupt")
    with pytest.raises(ModelLoadError):
        VideoPipeline.from_pretrained(model).prompt_ood(["a red dot"])
