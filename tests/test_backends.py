"""Diffusers backends (Wan 2.x, LTX-Video, CogVideoX) through vidiffuse's whole path, on tiny random-weight
pipelines the tests build themselves (no download): load by directory, generate, watermark, sign, verify."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vidiffuse.backends import DiffusersVideoPipeline, weights_version
from vidiffuse.backends.diffusers_backend import model_name, segment_plan, valid_frames
from vidiffuse.backends.tiny import KINDS, build_tiny
from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.generation import generate_file
from vidiffuse.pipeline import VideoPipeline, model_version

from conftest import ROOT

FAMILY_TASK = {"wan": ("wan", "t2v"), "wan-i2v": ("wan", "i2v"), "ltx": ("ltx", "t2v"), "ltx-i2v": ("ltx", "i2v"),
               "cogvideox": ("cogvideox", "t2v"), "cogvideox-i2v": ("cogvideox", "i2v")}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """kind -> a saved tiny diffusers pipeline directory, built on first use."""
    root = tmp_path_factory.mktemp("tiny-backends")
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build_tiny(kind, root / kind)
        return built[kind]

    return get


@pytest.fixture(scope="module")
def first_frame(tmp_path_factory):
    """A 64×64 PNG with mid-tone shapes, the first frame for image-to-video."""
    path = tmp_path_factory.mktemp("image") / "first.png"
    y, x = np.mgrid[:64, :64]
    img = np.stack([100 + x, 90 + y, 140 - (x + y) // 2], -1).astype(np.uint8)
    img[20:40, 24:44] = (220, 40, 40)
    Image.fromarray(img).save(path)
    return path


def verify_json(path):
    from vidiffuse.cli import app

    result = CliRunner().invoke(app, ["verify", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_each_backend_makes_a_clip_that_verifies(kind, tiny_dirs, first_frame, tmp_path):
    pipe = VideoPipeline.from_pretrained(tiny_dirs(kind))
    assert isinstance(pipe, DiffusersVideoPipeline)
    assert (pipe.family.name, pipe.task) == FAMILY_TASK[kind]
    assert (pipe.frames, pipe.size, pipe.fps) == (9, 64, 8)
    image = {"image": first_frame} if kind.endswith("i2v") else {}
    out = tmp_path / f"{kind}.mp4"
    record = generate_file(pipe, "a red circle moving left", out, seed=3, progress=False, **image)
    assert record["watermark"]["enabled"] and record["frames"] == 9
    assert ("image_sha256" in record) == bool(image)

    result = verify_json(out)
    mark, manifest = result["watermark"], result["manifest"]
    assert mark["detected"] and mark["p_value"] < 1e-6
    assert manifest["present"] and manifest["valid"] and not manifest["tampered"]
    assert result["consistent"] is True
    assert manifest["generation"]["model"] == {"name": f"tiny-{kind}", "version": pipe.version}
    assert manifest["generation"]["settings"]["frames"] == 9


def test_the_version_is_the_hash_of_the_denoiser_weights(tiny_dirs, tmp_path):
    path = tiny_dirs("ltx")
    pipe = VideoPipeline.from_pretrained(path)
    # one weights file: the same hash as vidiffuse's own bundles
    assert pipe.version == model_version(path, {}) != "unversioned"

    sharded = tmp_path / "sharded"
    for name, data in (("transformer/a.safetensors", b"one"), ("transformer/b.safetensors", b"two"),
                       ("transformer_2/c.safetensors", b"three")):
        (sharded / name).parent.mkdir(parents=True, exist_ok=True)
        (sharded / name).write_bytes(data)
    before = weights_version(sharded, {})
    assert len(before) == 12 and weights_version(sharded, {}) == before
    (sharded / "transformer_2/c.safetensors").write_bytes(b"changed")  # Wan 2.2's second expert counts too
    assert weights_version(sharded, {}) != before
    assert weights_version(sharded, {"version": "v7"}) == "v7"

    # a Hub cache blob is named by its SHA-256: that name is used, the (large) file is not read again
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    for folder, link in (("linked", True), ("copied", False)):
        (tmp_path / folder / "transformer").mkdir(parents=True)
        file = tmp_path / folder / "transformer" / "x.safetensors"
        file.symlink_to(blob) if link else file.write_bytes(b"weights")
    assert weights_version(tmp_path / "linked", {}) != weights_version(tmp_path / "copied", {})


def test_same_seed_same_video_and_progress_is_reported(tiny_dirs):
    pipe = VideoPipeline.from_pretrained(tiny_dirs("ltx"))
    calls = []
    a = pipe("a blue square", seed=5, steps=2, progress=False, watermark=False, callback=lambda i, n: calls.append((i, n)))
    b = pipe("a blue square", seed=5, steps=2, progress=False, watermark=False)
    c = pipe("a blue square", seed=6, steps=2, progress=False, watermark=False)
    np.testing.assert_array_equal(a.frames[0], b.frames[0])
    assert np.abs(a.frames[0].astype(int) - c.frames[0]).mean() > 1
    assert calls == [(1, 2), (2, 2)]
    assert a.videos.shape == (1, 3, 9, 64, 64) and a.videos.min() >= -1 and a.videos.max() <= 1
    # a batch gives each video from its own seed, whatever its batch-mates
    both = pipe(["a blue square", "a cat"], seed=[5, 9], steps=2, batch_size=2, progress=False, watermark=False)
    assert np.abs(both.frames[0].astype(int) - a.frames[0]).max() <= 1


def test_long_video_by_last_frame_continuation(tiny_dirs):
    """LTX-Video's text-to-video weights also do image-to-video: 25 frames = 9 + 8 + 8 from a 9-frame model."""
    assert segment_plan(25, 9) == [9, 8, 8] and segment_plan(9, 9) == [9] and segment_plan(12, 9) == [9, 3]
    assert valid_frames(4, 8) == 9 and valid_frames(9, 8) == 9 and valid_frames(10, 4) == 13
    pipe = VideoPipeline.from_pretrained(tiny_dirs("ltx"))
    steps_seen = []
    long = pipe("a red circle moving right", seed=2, steps=2, frames=25, progress=False,
                callback=lambda i, n: steps_seen.append((i, n)))
    short = pipe("a red circle moving right", seed=2, steps=2, frames=9, progress=False, watermark=False)
    assert long.frames[0].shape == (25, 64, 64, 3)
    assert long.settings[0]["segments"] == 3 and long.settings[0]["frames"] == 25
    assert steps_seen[-1] == (6, 6)  # 3 segments x 2 steps
    # the first segment is the short video (the mark aside: it adds ~2 levels RMS); the rest is new footage
    assert np.abs(long.frames[0][:9].astype(int) - short.frames[0]).mean() < 3
    assert np.abs(long.frames[0][9:18].astype(int) - short.frames[0]).mean() > 3

    from vidiffuse.provenance import watermark as wm

    assert wm.detect(long.frames[0]).detected

    wan = VideoPipeline.from_pretrained(tiny_dirs("wan"))  # Wan T2V has no image-to-video route on its weights
    with pytest.raises(ConfigError, match="at most 9 frames"):
        wan("a cat", frames=17, progress=False)


def test_samplers_map_to_schedulers(tiny_dirs):
    wan = VideoPipeline.from_pretrained(tiny_dirs("wan"))
    assert wan.family.samplers == ("default", "euler", "unipc", "dpm++")
    assert type(wan.scheduler_for("unipc")).__name__ == "UniPCMultistepScheduler"
    assert wan.scheduler_for("euler").config.shift == 5.0  # the shipped scheduler's shift carries over
    euler = wan("a cat", seed=1, steps=2, sampler="euler", progress=False, watermark=False)
    unipc = wan("a cat", seed=1, steps=2, sampler="unipc", progress=False, watermark=False)
    assert unipc.settings[0]["sampler"] == "unipc"
    assert not np.array_equal(euler.frames[0], unipc.frames[0])
    with pytest.raises(ConfigError, match="choose one of default, ddim, dpm"):
        VideoPipeline.from_pretrained(tiny_dirs("cogvideox"))("a cat", sampler="unipc", progress=False)


def test_first_block_cache_is_diffusers_own_and_recorded(tiny_dirs, tmp_path):
    pipe = VideoPipeline.from_pretrained(tiny_dirs("ltx"), cache_threshold=0.5)
    assert pipe.cache_threshold == 0.5
    assert pipe.transformer.is_cache_enabled
    record = generate_file(pipe, "a cat", tmp_path / "cached.mp4", progress=False)
    assert record["step_cache_threshold"] == 0.5
    assert verify_json(tmp_path / "cached.mp4")["manifest"]["generation"]["settings"]["step_cache_threshold"] == 0.5


def test_mistakes_are_one_line_errors(tiny_dirs, tiny_bundle, first_frame):
    wan = VideoPipeline.from_pretrained(tiny_dirs("wan"))
    with pytest.raises(ConfigError, match="text-to-video only"):
        wan("a cat", image=first_frame, progress=False)
    i2v = VideoPipeline.from_pretrained(tiny_dirs("cogvideox-i2v"))
    with pytest.raises(ConfigError, match="image-to-video model: give the first frame"):
        i2v("a cat", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        i2v("a cat", image=first_frame.parent / "missing.png", progress=False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        VideoPipeline.from_pretrained(tiny_dirs("ltx"), offload="model")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        VideoPipeline.from_pretrained(tiny_dirs("ltx"), quantize="bnb-4bit")
    with pytest.raises(ConfigError, match="multiples of 8"):  # the tiny VAE's 8x; the real LTX-Video's is 32x
        VideoPipeline.from_pretrained(tiny_dirs("ltx"), height=68)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        VideoPipeline.from_pretrained(tiny_dirs("ltx"), dtype="int3")
    with pytest.raises(ConfigError, match="dtype: only for diffusers models"):
        VideoPipeline.from_pretrained(tiny_bundle, dtype="bf16")
    # other load options: height and width at load time, so the manifest states the size made
    tall = VideoPipeline.from_pretrained(tiny_dirs("ltx"), height=96, dtype="fp32")
    assert tall.size == [96, 64]
    assert tall("a cat", steps=1, progress=False, watermark=False).frames[0].shape == (9, 96, 64, 3)


def test_cli_generate_image_to_video_from_a_hub_cache_and_verify(tiny_dirs, first_frame, tmp_path):
    """The real entry point, offline: a Hub id found in the local Hub cache, --image, load flags; then verify."""
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-ltx" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dirs("ltx"), snapshot)
    (snapshot / "vidiffuse.json").unlink()  # as a real Hub model: no sidecar, so the flags set the size
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert model_name(snapshot) == "someone/tiny-ltx"
    out = tmp_path / "i2v.mp4"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    gen = subprocess.run([sys.executable, "-m", "vidiffuse.cli", "generate", "a red square", "--model", "someone/tiny-ltx",
                          "--image", str(first_frame), "--height", "64", "--width", "64", "--frames", "9", "--steps", "2",
                          "--dtype", "fp32", "--vae-tiling", "-o", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert gen.returncode == 0, gen.stderr
    result = verify_json(out)
    assert result["watermark"]["detected"] and result["manifest"]["valid"] and result["consistent"]
    assert result["manifest"]["generation"]["model"]["name"] == "someone/tiny-ltx"
    assert result["manifest"]["generation"]["settings"]["size"] == 64


def test_a_hub_id_not_in_the_cache_is_one_clear_error_offline(monkeypatch):
    from vidiffuse.pipeline import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the network from a test
    with pytest.raises(ModelLoadError, match=r"no local model 'nobody/nothing-here'.*HF_HUB_OFFLINE=0"):
        resolve_model_path("nobody/nothing-here")


def test_cli_load_flags_on_a_vidiffuse_bundle_are_refused(tiny_bundle):
    from vidiffuse.cli import app

    result = CliRunner().invoke(app, ["generate", "a cat", "--model", str(tiny_bundle), "--offload", "model"])
    assert isinstance(result.exception, ConfigError)  # main() prints it as one line
    assert str(result.exception) == f"--offload: for diffusers models (Wan, LTX-Video, CogVideoX), not {tiny_bundle.name}"
    result = CliRunner().invoke(app, ["generate", "a cat", "--model", str(tiny_bundle), "--image", "x.png"])
    assert "needs an image-to-video model" in str(result.exception)


def test_cli_batch_mode_on_a_backend(tiny_dirs, tmp_path):
    from vidiffuse.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = CliRunner().invoke(app, ["generate", "--prompts", str(bad), "--model", str(tiny_dirs("ltx"))])
    assert isinstance(result.exception, ConfigError) and "not valid JSON" in str(result.exception)
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "a cat", "seed": 4}\n{"prompt": "a red square"}\n')
    result = CliRunner().invoke(app, ["generate", "--prompts", str(good), "--model", str(tiny_dirs("ltx")),
                                      "--out-dir", str(tmp_path / "videos"), "--steps", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "videos" / "generated.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [4, 1] and all(r["ood_score"] is None for r in records)
    assert verify_json(tmp_path / "videos" / "0001.mp4")["watermark"]["detected"]


def test_eval_runs_on_a_backend(tiny_dirs):
    from vidiffuse.evaluate import suite

    report, videos = suite.evaluate_model(VideoPipeline.from_pretrained(tiny_dirs("ltx")), n=2, batch_size=2, sweep=None)
    assert len(videos) == 2 and videos[0].shape == (9, 64, 64, 3)
    assert report["settings"]["sampler"] == "default" and np.isfinite(report["metrics"]["fvd_shapes"])
    assert "threshold" not in report["ood"]  # no training captions to call a prompt out of distribution by


def test_tiny_builder_needs_no_network():
    """The tokenizer and text encoder are built here, not fetched: a T5 unigram vocabulary of our own."""
    from vidiffuse.backends.tiny import tiny_t5_encoder, tiny_t5_tokenizer

    tok = tiny_t5_tokenizer()
    ids = tok("a red circle moving left", padding="max_length", max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[-1] == tok.pad_token_id and tok.eos_token_id in ids
    assert tok.unk_token_id not in ids
    with torch.no_grad():
        hidden = tiny_t5_encoder(len(tok))(torch.tensor([ids])).last_hidden_state
    assert hidden.shape == (1, 16, 32)
