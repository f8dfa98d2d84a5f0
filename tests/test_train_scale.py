"""Scale-out training: any process layout trains on the same global batch with the same noise, so the loss
curve does not depend on it — gradient accumulation, gradient checkpointing, DDP and FSDP over 2 gloo
processes, and resuming under another layout all match one plain process to float tolerance."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_vae
from vidiffuse.errors import ConfigError
from vidiffuse.train.trainer import train

CONFIG = """
[run]
task = "denoiser"
out_dir = "{out}"
steps = {steps}
batch_size = 4
lr = 1e-3
warmup = 1
checkpoint_every = 2
eval_every = 1000
eval_prompts = 2
log_every = 1
precision = "fp32"
{run}
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
steps = 1
"""

# torchrun runs every config given in the same two processes (one start-up for several runs)
DRIVER = """
import sys
from vidiffuse.train.trainer import train
for arg in sys.argv[1:]:
    train(arg.removeprefix("resume:"), resume=arg.startswith("resume:"))
"""


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir):
    """One process, the whole batch of 4 at once, 4 steps."""
    tmp = tmp_path_factory.mktemp("ref")
    train(config(tmp, "ref", vae_dir))
    return tmp / "ref"


def config(tmp, name, vae, steps=4, out=None, **run):
    path = tmp / f"{name}.toml"
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in run.items())
    path.write_text(CONFIG.format(out=tmp / (out or name), steps=steps, vae=vae, run=lines))
    return path


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def assert_same_run(a, b, rel=1e-4, atol=2e-5):
    assert losses(b) == pytest.approx(losses(a), rel=rel)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa)


def test_grad_accum_and_checkpointing_match_the_full_batch(tmp_path, vae_dir, reference):
    train(config(tmp_path, "accum", vae_dir, grad_accum=2))  # 2 micro-batches of 2
    assert_same_run(reference, tmp_path / "accum")
    train(config(tmp_path, "ckpt", vae_dir, gradient_checkpointing=True, grad_accum=4))
    assert_same_run(reference, tmp_path / "ckpt")


def test_resume_under_another_layout_continues_the_same_run(tmp_path, vae_dir, reference):
    """Data order and noise come from (seed, step): a run stopped after 2 steps and resumed with
    micro-batches sees the same next batches as the uninterrupted one."""
    train(config(tmp_path, "split", vae_dir), max_steps=2)
    train(config(tmp_path, "split", vae_dir, grad_accum=2), resume=True)
    assert_same_run(reference, tmp_path / "split")


def test_ddp_and_fsdp_on_two_gloo_processes_match_one(tmp_path, vae_dir, reference):
    """torchrun, 2 CPU processes: DDP with 2 micro-batches of 1 each, and FSDP (parameters, gradients and
    optimizer state sharded), each against one process with the same global batch of 4; FSDP's
    checkpoint holds the whole model and resumes (the driver runs it again with more steps)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ddp = config(tmp_path, "ddp", vae_dir, grad_accum=2)
    fsdp = config(tmp_path, "fsdp2", vae_dir, steps=2, out="fsdp", strategy="fsdp")
    fsdp_more = config(tmp_path, "fsdp4", vae_dir, steps=4, out="fsdp", strategy="fsdp")  # resumes at step 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), str(ddp), str(fsdp), f"resume:{fsdp_more}"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, tmp_path / "ddp")
    assert_same_run(reference, tmp_path / "fsdp")
    layout = json.loads((tmp_path / "fsdp" / "checkpoint" / "state.json").read_text())["layout"]
    assert layout == {"processes": 2, "strategy": "fsdp", "grad_accum": 1}
    # the exported model (gathered from the shards) is a complete bundle
    from vidiffuse.pipeline import VideoPipeline

    out = VideoPipeline.from_pretrained(tmp_path / "fsdp" / "model")("a red circle", steps=1, progress=False)
    assert out.frames[0].shape == (16, 64, 64, 3)


def test_bad_scale_settings_are_config_errors(tmp_path, vae_dir):
    with pytest.raises(ConfigError, match="grad_accum"):
        train(config(tmp_path, "a", vae_dir, grad_accum=3))
    with pytest.raises(ConfigError, match="strategy"):
        train(config(tmp_path, "b", vae_dir, strategy="zero"))
    with pytest.raises(ConfigError, match="device"):
        train(config(tmp_path, "c", vae_dir, device="tpu"))
