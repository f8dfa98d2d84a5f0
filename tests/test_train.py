import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_vae
from vidiffuse.errors import ConfigError
from vidiffuse.train.trainer import train

AE_CONFIG = """
[run]
task = "autoencoder"
out_dir = "{out}"
steps = {steps}
batch_size = 4
lr = 1e-3
warmup = 2
checkpoint_every = {ckpt}
eval_every = 1000
log_every = 1
[data]
kind = "shapes"
num_clips = 4
[model]
block_out_channels = [8, 8, 8, 8]
norm_num_groups = 4
"""

DIT_CONFIG = """
[run]
task = "denoiser"
out_dir = "{out}"
steps = {steps}
batch_size = 4
lr = 1e-3
warmup = 1
checkpoint_every = 1000
eval_every = 1000
eval_prompts = 2
log_every = 1
precision = "{precision}"
[autoencoder]
path = "{vae}"
[data]
kind = "shapes"
num_clips = 8
[model]
hidden_size = 32
depth = 2
num_heads = 2
[sampling]
steps = 2
"""


def write(path, text):
    path.write_text(text)
    return path


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(path)
    return path


def test_resume_continues_exactly(tmp_path):
    straight = write(tmp_path / "a.toml", AE_CONFIG.format(out=tmp_path / "a", steps=4, ckpt=2))
    split = write(tmp_path / "b.toml", AE_CONFIG.format(out=tmp_path / "b", steps=4, ckpt=2))
    train(straight)
    train(split, max_steps=2)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(Exception, match="--resume"):
        train(split)  # refuses to silently overwrite a run
    train(split, resume=True)
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # the exported model is a diffusers AutoencoderKL with a latent scaling factor
    config = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] > 0


def test_resume_after_kill_9(tmp_path):
    """A run killed with SIGKILL resumes from its last checkpoint and ends with the same weights."""
    steps = 8
    ref = write(tmp_path / "ref.toml", AE_CONFIG.format(out=tmp_path / "ref", steps=steps, ckpt=1))
    train(ref)
    cfg = write(tmp_path / "k.toml", AE_CONFIG.format(out=tmp_path / "k", steps=steps, ckpt=1))
    proc = subprocess.Popen([sys.executable, "-m", "vidiffuse.cli", "train", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "k" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < steps, "the run finished before it could be killed"
    assert run_cli("train", "--config", cfg, "--resume").returncode == 0
    a = load_file(tmp_path / "ref" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "k" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_denoiser_trains_and_exports_a_bundle(tmp_path, vae_dir):
    from vidiffuse.pipeline import VideoPipeline

    cfg = write(tmp_path / "d.toml", DIT_CONFIG.format(out=tmp_path / "d", steps=30, vae=vae_dir, precision="auto"))
    bundle = train(cfg)
    curve = losses(tmp_path / "d")
    assert len(curve) == 30 and sum(curve[-5:]) < sum(curve[:5])  # it learns
    metrics = [json.loads(l) for l in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in m and "acc_color" in m["eval"] for m in metrics)
    out = VideoPipeline.from_pretrained(bundle)("a red circle", progress=False)
    assert out.frames[0].shape == (16, 64, 64, 3)


def test_ddp_two_processes_match_one(tmp_path, vae_dir):
    """torchrun with 2 gloo processes gives the same loss curve as 1 process at the same global batch."""
    one = write(tmp_path / "one.toml", DIT_CONFIG.format(out=tmp_path / "one", steps=5, vae=vae_dir, precision="fp32"))
    two = write(tmp_path / "two.toml", DIT_CONFIG.format(out=tmp_path / "two", steps=5, vae=vae_dir, precision="fp32"))
    train(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vidiffuse.cli", "train", "--config", str(two)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    a = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bad_configs(tmp_path):
    from vidiffuse.errors import ConfigError

    with pytest.raises(ConfigError, match="not valid TOML"):
        train(write(tmp_path / "x.toml", "[run\n"))
    with pytest.raises(ConfigError, match="task"):
        train(write(tmp_path / "y.toml", '[run]\ntask = "nope"\nout_dir = "o"\n'))
    with pytest.raises(ConfigError, match="steps"):
        train(write(tmp_path / "z.toml", AE_CONFIG.format(out=tmp_path / "z", steps=0, ckpt=1)))


def test_denoiser_trains_on_a_folder_of_videos(tmp_path, vae_dir):
    """Real-footage path: `data synth` output read back as an ordinary folder dataset, with a corrupt file."""
    from vidiffuse.data.shapes import synthesize

    root = synthesize(tmp_path / "videos", 4, seed=5, progress=False)
    (root / "000001.mp4").write_bytes(b"not a video")
    cfg = DIT_CONFIG.format(out=tmp_path / "f", steps=3, vae=vae_dir, precision="auto")
    cfg = cfg.replace('kind = "shapes"\nnum_clips = 8', f'kind = "folder"\nroot = "{root}"\nnum_clips = 6')
    bundle = train(write(tmp_path / "f.toml", cfg))
    assert len(losses(tmp_path / "f")) == 3
    assert (bundle / "model_index.json").exists()


def test_compact_checkpoint_resumes(tmp_path):
    """The bf16 checkpoint committed for later sittings loads with --resume and continues the same run."""
    import shutil

    sys.path.insert(0, str(ROOT / "scripts"))
    from compact_checkpoint import main as compact

    straight = write(tmp_path / "a.toml", AE_CONFIG.format(out=tmp_path / "a", steps=6, ckpt=3))
    train(straight)
    split = write(tmp_path / "b.toml", AE_CONFIG.format(out=tmp_path / "b", steps=6, ckpt=3))
    train(split, max_steps=3)
    compact(tmp_path / "b" / "checkpoint", tmp_path / "compact")
    assert load_file(tmp_path / "compact" / "model.safetensors")["decoder.conv_out.weight"].dtype == torch.bfloat16
    shutil.rmtree(tmp_path / "b" / "checkpoint")
    shutil.copytree(tmp_path / "compact", tmp_path / "b" / "checkpoint")
    train(split, resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(b) == 6 and b[3:] == pytest.approx(a[3:], rel=2e-2)
    final = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert final["decoder.conv_out.weight"].dtype == torch.float32


def test_steps_override_changes_only_where_the_run_stops(tmp_path):
    """scripts/train_within.py sets [run] steps from a time budget: a run trained in legs with a replaced step
    count ends with the weights of a run configured for that count from the start."""
    straight = write(tmp_path / "a.toml", AE_CONFIG.format(out=tmp_path / "a", steps=5, ckpt=1))
    legs = write(tmp_path / "b.toml", AE_CONFIG.format(out=tmp_path / "b", steps=1000, ckpt=1))
    train(straight)
    train(legs, max_steps=2, steps=10**9)
    assert not (tmp_path / "b" / "model").exists()  # not finished: nothing exported
    train(legs, resume=True, steps=5)
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "model" / "config.json").is_file()


def test_train_within_a_time_budget(tmp_path, vae_dir):
    cfg = write(tmp_path / "d.toml", DIT_CONFIG.format(out=tmp_path / "d", steps=1, vae=vae_dir, precision="auto"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_within.py"), str(cfg), "--budget", "40",
                           "--probe-steps", "3", "--reserve", "15"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(next(line for line in proc.stdout.splitlines() if '"total_steps"' in line))
    state = json.loads((tmp_path / "d" / "checkpoint" / "state.json").read_text())
    assert plan["total_steps"] > plan["probe_steps"] == 3 and state["step"] == plan["total_steps"]
    assert len(losses(tmp_path / "d")) == plan["total_steps"]
    assert (tmp_path / "d" / "model" / "model_index.json").is_file()
    assert time.monotonic() - started < 40 + 30  # the budget, give or take start-up and the last evaluation


def test_init_from_starts_at_a_trained_denoiser(tmp_path, vae_dir):
    """[run] init_from fine-tunes every weight of a trained model's denoiser: with lr = 0 the exported
    denoiser is the starting one, and the data manifest names the model it started from."""
    train(write(tmp_path / "a.toml", DIT_CONFIG.format(out=tmp_path / "a", steps=1, vae=vae_dir, precision="auto")))
    start = tmp_path / "a" / "model"
    finetune = DIT_CONFIG.format(out=tmp_path / "b", steps=2, vae=vae_dir, precision="auto").replace(
        'task = "denoiser"', f'task = "denoiser"\ninit_from = "{start}"').replace("lr = 1e-3", "lr = 0.0")
    train(write(tmp_path / "b.toml", finetune.replace("hidden_size = 32", "hidden_size = 64")))  # [model] is ignored
    a = load_file(start / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "b" / "data_manifest.json").read_text())
    assert manifest["upstream_manifests"]["init_from"]["name"] == str(start)
    assert "caption_version" not in manifest["generator"][0]  # version 1, as every manifest before versions

    other_vae = tmp_path / "other-vae"
    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.1)  # other weights: latents the denoiser never saw
    vae.save_pretrained(other_vae)
    wrong = finetune.replace(str(vae_dir), str(other_vae)).replace(str(tmp_path / "b"), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="must be that model's autoencoder"):
        train(write(tmp_path / "c.toml", wrong))
