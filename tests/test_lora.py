"""LoRA: training on a frozen base (vidiffuse's own model and a diffusers Wan), diffusers' file format,
stacking with scales, exact unloading, refusing a LoRA made for another base; and the opt-in extra colour
of the shapes world that the new-colour experiment (benchmarks/lora_new_color.py) teaches."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, tiny_transformer, tiny_vae
from vidiffuse.data import shapes
from vidiffuse.errors import ModelLoadError
from vidiffuse.models import lora as lora_io
from vidiffuse.pipeline import VideoPipeline, save_bundle
from vidiffuse.train.trainer import train

LORA_CONFIG = """
[run]
task = "{task}"
out_dir = "{out}"
steps = {steps}
batch_size = 2
lr = 2e-2
warmup = 1
checkpoint_every = 1000
eval_every = 1000
eval_prompts = 2
log_every = 1
precision = "fp32"
{lora}
[data]
kind = "{kind}"
num_clips = 4
{data}
"""


def write_config(path, **fields):
    values = {"task": "denoiser", "steps": 3, "kind": "shapes", "lora": "", "data": "", **fields}
    path.write_text(LORA_CONFIG.format(**values))
    return path


def first_block_output(transformer, seed=0):
    """The denoiser's output on a fixed input, fp32, outside autocast: what an adapter changes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 8, 8, generator=gen)
    ctx, pooled = torch.randn(2, 5, 384, generator=gen), torch.randn(2, 384, generator=gen)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0, 300.0]), ctx, pooled).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bundle):
    """A LoRA trained for 3 steps on the tiny bundle."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = write_config(tmp / "l.toml", out=tmp / "run", lora=f'[lora]\nbase = "{tiny_bundle}"\nrank = 4\n')
    return train(cfg), tmp / "run"


def test_lora_trains_only_the_adapter_and_saves_diffusers_format(trained, tiny_bundle):
    lora_dir, run = trained
    weights = lora_dir / lora_io.WEIGHT_NAME
    with safe_open(weights, framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    # peft key names under diffusers' component prefix, as pipelines' save_lora_weights writes them
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert "transformer.blocks.0.attn.q.lora_A.weight" in keys
    packed = json.loads(header["lora_adapter_metadata"])
    assert packed["transformer.r"] == 4 and "q" in packed["transformer.target_modules"]
    info = json.loads(header["vidiffuse"])
    base = VideoPipeline.from_pretrained(tiny_bundle)
    assert info["base_model"]["version"] == base.version
    manifest = run / "data_manifest.json"
    import hashlib

    assert info["training_data_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (lora_dir / "training" / "data_manifest.json").read_bytes() == manifest.read_bytes()
    # the checkpoint holds the adapter only (resumable), not a copy of the base weights
    with safe_open(run / "checkpoint" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == {k.removeprefix("transformer.").replace(".weight", ".default.weight") for k in keys}
    # the adapter learned something: lora_B starts at zero
    with safe_open(weights, framework="pt") as f:
        assert max(f.get_tensor(k).abs().max().item() for k in keys if ".lora_B." in k) > 0


def test_load_stack_scale_and_unload_exactly(trained, tiny_bundle):
    lora_dir, _ = trained
    pipe = VideoPipeline.from_pretrained(tiny_bundle)
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base_version = pipe.version
    base_out = first_block_output(pipe.transformer)
    base_video = pipe("a red circle", seed=3, steps=2, progress=False).videos

    a = pipe.load_lora(lora_dir)
    one = first_block_output(pipe.transformer)
    assert not torch.allclose(one, base_out)
    assert pipe.version.startswith(base_version + "+lora.") and pipe.base_version == base_version
    # two adapters at scale 1 each are one at scale 2 (a LoRA's change is linear in its scale)
    pipe.load_lora(lora_dir, scale=1.0, adapter_name="again")
    stacked = first_block_output(pipe.transformer)
    pipe.set_lora_scale("again", 0.0)
    torch.testing.assert_close(first_block_output(pipe.transformer), one)
    pipe.set_lora_scale("again", 1.0)
    pipe.set_lora_scale(a, 0.0)
    pipe.set_lora_scale("again", 2.0)
    torch.testing.assert_close(first_block_output(pipe.transformer), stacked, rtol=1e-5, atol=1e-6)
    assert pipe("a red circle", seed=3, steps=2, progress=False).videos.ne(base_video).any()

    pipe.unload_lora()
    assert pipe.version == base_version and not pipe.loras
    after = pipe.transformer.state_dict()
    assert after.keys() == base_state.keys() and all(torch.equal(after[k], base_state[k]) for k in after)
    assert torch.equal(first_block_output(pipe.transformer), base_out)
    assert torch.equal(pipe("a red circle", seed=3, steps=2, progress=False).videos, base_video)


def test_diffusers_own_loader_reads_the_file(trained, tiny_bundle):
    """diffusers' `load_lora_adapter` (what its pipelines' load_lora_weights calls) gives the same model."""
    lora_dir, _ = trained
    ours = VideoPipeline.from_pretrained(tiny_bundle)
    ours.load_lora(lora_dir)
    theirs = VideoPipeline.from_pretrained(tiny_bundle).transformer
    theirs.load_lora_adapter(str(lora_dir), weight_name=lora_io.WEIGHT_NAME, prefix="transformer", adapter_name="x")
    torch.testing.assert_close(first_block_output(theirs), first_block_output(ours.transformer))


def test_a_lora_for_another_base_is_refused(trained, tmp_path, text_encoder):
    lora_dir, _ = trained
    other_model = tiny_transformer()
    with torch.no_grad():
        other_model.proj_out.weight.add_(0.01)
    other = save_bundle(tmp_path / "other", other_model, tiny_vae(), text_encoder, frames=16, size=64,
                        defaults={"steps": 2})
    pipe = VideoPipeline.from_pretrained(other)
    with pytest.raises(ModelLoadError, match="was trained on"):
        pipe.load_lora(lora_dir)
    assert not pipe.loras and not getattr(pipe.transformer, "peft_config", None)
    result = run_cli("generate", "a red circle", "--model", other, "--lora", f"{lora_dir}:0.5", "--steps", "1",
                     "-o", tmp_path / "x.mp4")
    assert result.returncode == 1 and "was trained on" in result.stderr and "Traceback" not in result.stderr
    # a LoRA from elsewhere (no vidiffuse record) loads, with a warning
    stripped = tmp_path / "foreign"
    f = lora_io.read_lora(lora_dir)
    lora_io.write_lora(stripped, f.tensors, f.configs, info={})
    assert pipe.load_lora(stripped) == "lora0"
    with pytest.raises(ModelLoadError, match="no LoRA"):
        pipe.load_lora(tmp_path / "nowhere")


def test_cli_train_lora_flag_on_the_bundled_model_then_generate(tmp_path):
    """`train --lora` with no [lora] section adapts the bundled `shapes` model; `generate --lora` uses it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nout_dir = "{tmp_path / "run"}"\nsteps = 2\nbatch_size = 2\neval_every = 1000\n'
                   f'checkpoint_every = 1000\nwarmup = 1\neval_prompts = 2\n[data]\nnum_clips = 2\n'
                   f'[sampling]\nsteps = 1\n')
    result = run_cli("train", "--config", cfg, "--lora", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lora_dir = tmp_path / "run" / "lora"
    info = lora_io.read_lora(lora_dir).info
    assert info["base_model"]["name"] == "shapes" and info["task"] == "denoiser"
    out = tmp_path / "v.mp4"
    result = run_cli("generate", "a red circle", "--lora", f"{lora_dir}:0.5", "--steps", "2", "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    from vidiffuse.provenance.verify import verify_file

    model = verify_file(out)["manifest"]["generation"]["model"]
    assert model["name"] == "shapes" and "+lora." in model["version"]


def test_wan_lora_trains_on_a_folder_and_loads_in_diffusers(tmp_path):
    """A diffusers backend: LoRA on a tiny Wan's transformer from a folder of captioned videos; the file
    loads through diffusers' own WanPipeline.load_lora_weights, and through vidiffuse, and unloads exactly."""
    from diffusers import WanPipeline

    from vidiffuse.backends.tiny import build_tiny

    wan = build_tiny("wan", tmp_path / "wan")
    videos = shapes.synthesize(tmp_path / "videos", 3, seed=2, progress=False)
    cfg = write_config(tmp_path / "w.toml", out=tmp_path / "run", steps=2, kind="folder",
                       lora=f'[lora]\nbase = "{wan}"\nrank = 4\n[text]\nmax_length = 16\n',
                       data=f'root = "{videos}"\nframes = 9\nsize = 32\n')
    lora_dir = train(cfg)
    keys = list(lora_io.read_lora(lora_dir).tensors)
    assert any(k.startswith("transformer.blocks.0.attn1.to_q.lora_A") for k in keys)

    def run(pipe):
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, num_frames=9, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    native = WanPipeline.from_pretrained(wan)
    native.set_progress_bar_config(disable=True)
    base = run(native)
    native.load_lora_weights(lora_dir, adapter_name="shapes")  # diffusers' own reader
    adapted = run(native)
    assert not torch.allclose(adapted, base)

    ours = VideoPipeline.from_pretrained(wan)
    ours.load_lora(lora_dir)
    ours.pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(ours.pipe), adapted)
    ours.unload_lora()
    assert torch.equal(run(ours.pipe), base)


def test_extra_colour_is_opt_in():
    # the v1 world is unchanged: same clips, and the analyzer reads nothing as pink unless asked
    spec, video, caption = shapes.generate_example(11)
    assert "pink" not in shapes.COLORS and shapes.analyze_video(video) == shapes.analyze_video(video, ["pink"])
    spec, video, caption = shapes.generate_example(11, extra_colors=["pink"])
    rng = np.random.default_rng(0)
    pink = shapes.sample_clip_spec(rng, attributes={"color": "pink"})
    clip = shapes.render_clip(pink)
    assert shapes.analyze_video(clip, ["pink"])["color"] == "pink"
    assert shapes.analyze_video(clip)["color"] != "pink"  # the v1 table has no pink
    words = [shapes.make_caption({**pink.attributes()}, np.random.default_rng(s)) for s in range(30)]
    assert all(any(w in c.lower() for w in ("pink", "rose-pink", "hot pink")) for c in words)
    with pytest.raises(Exception, match="unknown extra colour"):
        shapes.palette(["mauve"])
    # a training set with pink: the other clips are exactly the v1 clips of the same seeds
    from vidiffuse.train.data import shapes_specs

    v1 = list(shapes_specs({"num_clips": 40, "seed": 3}))
    mixed = list(shapes_specs({"num_clips": 40, "seed": 3, "extra_colors": ["pink"], "extra_color_share": 0.5}))
    changed = [i for i, ((a, _), (b, _)) in enumerate(zip(v1, mixed)) if a != b]
    assert 10 <= len(changed) <= 30 and all(mixed[i][0].color == "pink" for i in changed)
    assert all(v1[i][0].color != "pink" for i in range(40))


def test_prior_preservation_starts_from_the_base_prediction(tmp_path, tiny_bundle):
    """preserve_weight pulls the adapted denoiser towards the frozen base on v1-colour clips: at step 1 the
    adapter is still the identity, so the loss is exactly the plain one; afterwards it differs."""
    def curve(name, preserve):
        lora = f'[lora]\nbase = "{tiny_bundle}"\nrank = 4\npreserve_weight = {preserve}\n'
        cfg = write_config(tmp_path / f"{name}.toml", out=tmp_path / name, steps=3, lora=lora,
                           data='extra_colors = ["pink"]\nextra_color_share = 0.5\n')
        train(cfg)
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    plain, kept = curve("plain", 0.0), curve("kept", 10.0)
    assert kept[0] == pytest.approx(plain[0], rel=1e-6)
    assert kept[1:] != pytest.approx(plain[1:], rel=1e-6)
