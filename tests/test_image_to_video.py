"""Image-to-video for the project's own VideoDiT: first-frame conditioning in the model, the trainer, the
pipeline, the CLI and the evaluation."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_transformer, tiny_vae
from test_train import DIT_CONFIG, write
from vidiffuse.data import shapes
from vidiffuse.errors import ConfigError
from vidiffuse.evaluate.image_to_video import examples, score_videos
from vidiffuse.models.transformer import VideoDiT, first_frame_condition
from vidiffuse.pipeline import VideoPipeline, save_bundle
from vidiffuse.train.trainer import train


def denoiser_inputs(b=2, frames=16, side=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 4, frames, side, side, generator=g), torch.full((b,), 500.0),
            torch.randn(b, 5, 384, generator=g), torch.randn(b, 384, generator=g))


def test_a_converted_model_computes_what_the_text_to_video_model_did():
    """Its new input channels start at zero: whatever the condition, the output is the old model's."""
    t2v = tiny_transformer().eval()
    i2v = VideoDiT.with_image_conditioning(t2v).eval()
    x, t, tokens, pooled = denoiser_inputs()
    condition = first_frame_condition(torch.randn(2, 4, 16, 16), 16)
    with torch.no_grad():
        before = t2v(x, t, tokens, pooled).sample
        assert torch.equal(i2v(x, t, tokens, pooled, condition=condition).sample, before)
        assert torch.equal(i2v(x, t, tokens, pooled).sample, before)  # no condition = the all-zero one
    assert i2v.config.image_conditioning and i2v.patch_embed.in_channels == 2 * 4 + 1
    with pytest.raises(ValueError, match="already takes a first frame"):
        VideoDiT.with_image_conditioning(i2v)
    with pytest.raises(ValueError, match="takes no first frame"):
        t2v(x, t, tokens, pooled, condition=condition)


def test_a_trained_input_channel_changes_the_output():
    i2v = VideoDiT.with_image_conditioning(tiny_transformer()).eval()
    with torch.no_grad():
        i2v.patch_embed.weight[:, 4:].normal_(0, 0.1)
        x, t, tokens, pooled = denoiser_inputs()
        a = i2v(x, t, tokens, pooled, condition=first_frame_condition(torch.randn(2, 4, 16, 16), 16)).sample
        b = i2v(x, t, tokens, pooled, condition=first_frame_condition(torch.randn(2, 4, 16, 16), 16)).sample
    assert not torch.allclose(a, b)


def test_first_frame_condition_layout():
    first = torch.randn(3, 4, 8, 8)
    given = torch.tensor([True, False, True])
    c = first_frame_condition(first, 6, given)
    assert c.shape == (3, 5, 6, 8, 8)
    assert torch.equal(c[0, :4, 0], first[0]) and torch.equal(c[2, :4, 0], first[2])
    assert torch.all(c[[0, 2], 4, 0] == 1) and torch.all(c[:, :, 1:] == 0)
    assert torch.all(c[1] == 0)  # not given: text only


@pytest.fixture(scope="module")
def i2v_bundle(tmp_path_factory, text_encoder):

    out = tmp_path_factory.mktemp("models") / "tiny-i2v"
    model = VideoDiT.with_image_conditioning(tiny_transformer())
    with torch.no_grad():
        model.patch_embed.weight[:, 4:].normal_(0, 0.1)  # as if trained: the image changes the video
    save_bundle(out, model, tiny_vae(), text_encoder, frames=16, size=64,
                defaults={"steps": 3, "guidance": 3.0, "sampler": "euler"})
    return out


@pytest.fixture(scope="module")
def i2v_pipe(i2v_bundle):
    return VideoPipeline.from_pretrained(i2v_bundle)


def a_first_frame(seed=0):
    return shapes.generate_example(seed)[1][0]


def test_the_image_reaches_the_denoiser_as_its_latent(i2v_pipe):
    """The condition the denoiser sees is the autoencoder's latent of the (resized) image at frame 0, in
    both guidance branches."""
    image = a_first_frame()
    seen = []
    hook = i2v_pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["condition"].clone()),
                                                          with_kwargs=True)
    try:
        i2v_pipe("a red circle", image=image, progress=False, watermark=False)
    finally:
        hook.remove()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latent = i2v_pipe.vae.encode(x).latent_dist.mode() * i2v_pipe.vae.config.scaling_factor
    assert len(seen) == 3  # one call per step, both branches batched
    for condition in seen:
        assert condition.shape == (2, 5, 16, *latent.shape[-2:])  # (uncond, cond) × (latent + mask)
        torch.testing.assert_close(condition[:, :4, 0].float(), latent.expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)
        assert torch.all(condition[:, 4, 0] == 1) and torch.all(condition[:, :, 1:] == 0)


def test_frame_zero_is_held_at_the_image_through_sampling(i2v_pipe):
    """The sampler keeps frame 0 at the image's clean latent at every step, for the prompts that have an image."""
    image = a_first_frame()
    inputs = []
    hook = i2v_pipe.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0].clone()), with_kwargs=True)
    try:
        latents = i2v_pipe(["a red circle", "a blue square"], image=[image, None], seed=[0, 1], output_type="latent",
                           progress=False)
    finally:
        hook.remove()
    _, first, _ = i2v_pipe._first_frame(image, 1)
    assert torch.equal(latents[0, :, 0], first[0].to(latents.dtype))
    assert not torch.allclose(latents[1, :, 0], first[0], atol=0.1)  # no image: frame 0 is sampled
    for x in inputs:  # (uncond, cond) × 2 prompts
        assert torch.equal(x[0, :, 0].float(), first[0].to(x.dtype).float()) and torch.equal(x[2, :, 0], x[0, :, 0])


def test_image_to_video_is_deterministic_and_recorded(i2v_pipe, tmp_path):
    image = a_first_frame()
    a = i2v_pipe("a red circle", image=image, seed=3, progress=False)
    b = i2v_pipe("a red circle", image=image, seed=3, progress=False)
    other = i2v_pipe("a red circle", image=a_first_frame(1), seed=3, progress=False)
    text_only = i2v_pipe("a red circle", seed=3, progress=False)
    assert np.array_equal(a.frames[0], b.frames[0])
    assert not np.array_equal(a.frames[0], other.frames[0]) and not np.array_equal(a.frames[0], text_only.frames[0])
    from PIL import Image

    png = tmp_path / "first.png"
    Image.fromarray(image).save(png)
    from_file = i2v_pipe("a red circle", image=png, seed=3, progress=False)
    assert np.array_equal(from_file.frames[0], a.frames[0])  # a path, an array: the same pixels, the same video
    record = a.settings[0]
    assert record["image_sha256"] == from_file.settings[0]["image_sha256"] != other.settings[0]["image_sha256"]
    assert "image_sha256" not in text_only.settings[0]
    assert i2v_pipe.watermark_payload(record) != i2v_pipe.watermark_payload(other.settings[0])


def test_one_image_per_prompt(i2v_pipe):
    images = [a_first_frame(0), a_first_frame(1)]
    both = i2v_pipe(["a red circle", "a blue square"], image=images, seed=[5, 6], progress=False, batch_size=1)
    alone = i2v_pipe("a blue square", image=images[1], seed=6, progress=False)
    assert np.array_equal(both.frames[1], alone.frames[0])
    with pytest.raises(ConfigError, match="2 prompts but 3 images"):
        i2v_pipe(["a", "b"], image=images + images[:1], progress=False)


def test_bad_images_are_refused(i2v_pipe, tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="text-to-video only; --image needs an image-to-video model"):
        VideoPipeline.from_pretrained(tiny_bundle)("a red circle", image=a_first_frame(), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        i2v_pipe("a red circle", image=tmp_path / "missing.png", progress=False)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot read image"):
        i2v_pipe("a red circle", image=junk, progress=False)
    with pytest.raises(ConfigError, match="uint8"):
        i2v_pipe("a red circle", image=np.zeros((64, 64), np.float32), progress=False)


def test_cli_image_to_video_writes_a_verified_video(i2v_bundle, tmp_path):
    from PIL import Image

    png = tmp_path / "first.png"
    Image.fromarray(np.ascontiguousarray(np.repeat(np.repeat(a_first_frame(), 2, 0), 2, 1))).save(png)  # 128×128
    out = tmp_path / "out.mp4"
    proc = run_cli("generate", "a red circle moving left", "--model", i2v_bundle, "--image", png, "-o", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(run_cli("verify", out, "--json").stdout)
    assert report["watermark"]["detected"] and report["manifest"]["valid"] and not report["manifest"]["tampered"]
    from vidiffuse.video.image import image_sha256, load_image

    assert json.dumps(report).count(image_sha256(load_image(png))) >= 1  # the manifest names the first frame
    bad = run_cli("generate", "a red circle", "--model", i2v_bundle, "--image", tmp_path / "nope.png", "-o", out)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def test_training_conditions_each_clip_on_its_own_first_frame(tmp_path):
    """init_from + [model] image_conditioning: the run converts the text-to-video denoiser; with lr = 0 the
    export is that model with zero new input weights; every drawn example's condition is its clip's first
    latent frame, except the `p_no_image` share."""
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(tmp_path / "vae")
    train(write(tmp_path / "a.toml", DIT_CONFIG.format(out=tmp_path / "a", steps=1, vae=tmp_path / "vae", precision="auto")))
    start = tmp_path / "a" / "model"
    config = DIT_CONFIG.format(out=tmp_path / "b", steps=2, vae=tmp_path / "vae", precision="auto").replace(
        'task = "denoiser"', f'task = "denoiser"\ninit_from = "{start}"\np_no_image = 0.5').replace(
        "[model]", "[model]\nimage_conditioning = true").replace("lr = 1e-3", "lr = 0.0")
    out = train(write(tmp_path / "b.toml", config))
    a = load_file(start / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(b["patch_embed.weight"][:, :4], a["patch_embed.weight"])
    assert torch.all(b["patch_embed.weight"][:, 4:] == 0)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "patch_embed.weight")
    loaded = VideoPipeline.from_pretrained(out)
    assert loaded.takes_image
    assert loaded.index["fine_tuned_from"] == {"name": str(start), "version": VideoPipeline.from_pretrained(start).version}
    evals = [json.loads(line)["eval"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert {"image_start_error_px", "image_first_frame_psnr", "text_acc_color"} <= set(evals[-1])

    from vidiffuse.train.trainer import DenoiserTask, _rng, load_config

    task = DenoiserTask(load_config(tmp_path / "b.toml"), tmp_path / "b")
    idx = torch.arange(8)
    x0, _, _, cond, _ = task._draw(idx, _rng(0, 0, 1), slice(None))
    given = cond["condition"][:, 4, 0].flatten(1).all(1)
    assert 0 < int(given.sum()) < 8  # p_no_image = 0.5: some with the image, some on text alone
    assert torch.equal(cond["condition"][given, :4, 0], x0[given, :, 0])
    assert torch.all(cond["condition"][~given] == 0)

    # the loss: the given frame is clean in the input, and what the model predicts for it does not count
    class FrameZeroOff(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.inputs = model, []

        def forward(self, x, *args, **kwargs):
            self.inputs.append(x.clone())
            out = self.model(x, *args, **kwargs)
            out.sample[:, :, 0] += 5.0
            return out

    plain, spoiled = task.model.eval(), FrameZeroOff(task.model.eval())
    with torch.no_grad():
        a = task.loss(plain, idx, _rng(0, 0, 1), slice(None))
        b = task.loss(spoiled, idx, _rng(0, 0, 1), slice(None))
    assert torch.equal(spoiled.inputs[0][given, :, 0], x0[given, :, 0])
    assert not torch.equal(spoiled.inputs[0][~given, :, 0], x0[~given, :, 0])  # text only: frame 0 is noisy
    torch.testing.assert_close(a[given], b[given])
    assert torch.all(b[~given] > a[~given] + 1)


def test_text_to_video_runs_draw_no_condition(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    from vidiffuse.train.trainer import DenoiserTask, _rng, load_config

    config = write(tmp_path / "c.toml", DIT_CONFIG.format(out=tmp_path / "c", steps=1, vae=tmp_path / "vae", precision="auto"))
    task = DenoiserTask(load_config(config), tmp_path / "c")
    *_, cond, _ = task._draw(torch.arange(4), _rng(0, 0, 1), slice(None))
    assert "condition" not in cond


def test_the_scorer_reads_true_clips_as_right_and_wrong_starts_as_far():
    items = examples(6)
    clips = [shapes.generate_example(7_000_000 + i)[1] for i in range(6)]
    assert all(np.array_equal(c[0], it["image"]) for c, it in zip(clips, items))
    right = score_videos(clips, items)["overall"]
    assert right["start_error_px"] < 0.5 and right["first_frame_psnr"] == float("inf")
    assert right["acc_color"] == right["acc_shape"] == right["acc_background"] == 1.0
    shifted = score_videos([np.roll(c, 12, axis=2) for c in clips], items)["overall"]
    assert 10 < shifted["start_error_px"] < 14 and shifted["first_frame_psnr"] < 30


def test_batch_mode_takes_an_image_per_line(i2v_bundle, i2v_pipe, tmp_path):
    """A prompts file line may name its first frame (relative to the file); lines without one are text to video."""
    from PIL import Image

    from vidiffuse.generation import generate_batch

    Image.fromarray(a_first_frame(2)).save(tmp_path / "first.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "seed": 1, "image": "first.png"}) + "\n"
                       + json.dumps({"prompt": "a blue square", "seed": 2}) + "\n")
    log = generate_batch(i2v_bundle, prompts, tmp_path / "out")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert "image_sha256" in records[0] and "image_sha256" not in records[1]

    with_image = i2v_pipe(["a red circle", "a blue square"], image=a_first_frame(2), seed=[1, 2], progress=False)
    text_only = i2v_pipe(["a red circle", "a blue square"], seed=[1, 2], progress=False)
    expected = [with_image.settings[0], text_only.settings[1]]
    for record, want in zip(records, expected):  # the payload hashes prompt, seed, settings and image
        assert record["watermark"]["payload"] == want["watermark"]["payload"]
    assert with_image.settings[1]["watermark"]["payload"] != records[1]["watermark"]["payload"]

    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "a", "image": "first.png"}) + "\n")
    with pytest.raises(ConfigError, match="not both"):
        generate_batch(i2v_bundle, both, tmp_path / "out2", image=a_first_frame())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "image": 3}) + "\n")
    with pytest.raises(ConfigError, match='bad.jsonl:1: "image" must be a file path'):
        generate_batch(i2v_bundle, bad, tmp_path / "out3")


def test_lora_on_an_image_to_video_base(i2v_bundle, tmp_path):
    """A LoRA on an image-to-video model trains with its first-frame objective; prior preservation, whose
    loss has no first frame, is refused in one line instead of training a different objective."""
    from test_lora import write_config

    lora = f'[lora]\nbase = "{i2v_bundle}"\nrank = 4\n'
    out = train(write_config(tmp_path / "a.toml", out=tmp_path / "a", steps=2, lora=lora))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    kept = lora + "preserve_weight = 1.0\n"
    with pytest.raises(ConfigError, match="not supported on an image-to-video base"):
        train(write_config(tmp_path / "b.toml", out=tmp_path / "b", steps=2, lora=kept,
                           data='extra_colors = ["pink"]\nextra_color_share = 0.5\n'))
