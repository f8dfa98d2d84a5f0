import copy
import json
import math

import pytest
import torch
from conftest import run_cli, tiny_transformer

from vidiffuse.compress.cache import CacheStats, step_cache
from vidiffuse.diffusion.sampling import make_scheduler, sample
from vidiffuse.errors import ConfigError
from vidiffuse.generation import generate_file
from vidiffuse.pipeline import VideoPipeline

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_transformer().eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 384, generator=g),
            "pooled_projections": torch.randn(2, 384, generator=g),
            "encoder_attention_mask": torch.ones(2, 6)}
    uncond = {**cond, "encoder_hidden_states": torch.zeros(2, 6, 384), "pooled_projections": torch.zeros(2, 384)}
    return noise, cond, uncond


def denoise(model, inputs, noise=None):
    default_noise, cond, uncond = inputs
    return sample(model, default_noise if noise is None else noise, cond, uncond, make_scheduler("euler"), STEPS, 4.0)


def hook_traces(model):
    return [(type(m).__name__, key) for m in model.modules() for key in ("forward", "_diffusers_hook") if key in vars(m)]


def test_threshold_zero_is_bit_identical_to_no_cache(model, inputs):
    uncached = denoise(model, inputs)
    with step_cache(model, 0.0) as stats:
        cached = denoise(model, inputs)
    assert torch.equal(cached, uncached)
    assert (stats.runs, stats.full_steps, stats.cached_steps) == (1, STEPS, 0)


def test_large_threshold_skips_steps_and_stays_close(model, inputs):
    uncached = denoise(model, inputs)
    with step_cache(model, 1.0) as stats:
        cached = denoise(model, inputs)
    # the first step always runs in full; with a loose threshold the rest reuse its tail residual
    assert stats.full_steps >= 1 and stats.cached_steps >= STEPS // 2
    assert stats.calls == STEPS
    assert stats.skipped_block_steps == stats.cached_steps * (len(model.blocks) - 1)
    assert 0 < stats.skipped_share < 1
    assert not torch.equal(cached, uncached)
    relative_error = ((cached - uncached).norm() / uncached.norm()).item()
    assert relative_error < 0.05, relative_error  # measured 0.8 %


def test_cache_restarts_for_every_sampling_run(model, inputs):
    """Two runs in one block give what each gives alone: nothing carries over between generations."""
    other_noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(7))
    with step_cache(model, 1.0):
        alone = denoise(model, inputs, other_noise)
    with step_cache(model, 1.0) as stats:
        denoise(model, inputs)
        second = denoise(model, inputs, other_noise)
    assert torch.equal(second, alone)
    assert stats.runs == 2 and stats.calls == 2 * STEPS


def test_cache_is_removed_afterwards(model, inputs):
    before = copy.deepcopy(model)
    reference = denoise(before, inputs)
    with step_cache(model, 1.0):
        denoise(model, inputs)
    assert hook_traces(model) == []
    assert torch.equal(denoise(model, inputs), reference)


def test_cache_is_removed_after_an_error(model, inputs):
    with pytest.raises(RuntimeError), step_cache(model, 1.0):
        model(torch.zeros(1, 3, 4, 8, 8), torch.ones(1), *inputs[1].values())  # wrong channel count
    assert hook_traces(model) == []


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "much"])
def test_invalid_threshold_is_a_config_error(model, bad):
    with pytest.raises(ConfigError, match="cache threshold"), step_cache(model, bad):
        pass
    assert hook_traces(model) == []


def test_nested_cache_is_refused(model):
    with step_cache(model, 0.1), pytest.raises(ConfigError, match="already"), step_cache(model, 0.1):
        pass
    assert hook_traces(model) == []


def test_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="at least 2 blocks"), step_cache(torch.nn.Linear(2, 2), 0.1):
        pass


def test_stats_as_dict():
    stats = CacheStats(threshold=0.1, depth=8, runs=1, full_steps=15, cached_steps=5)
    assert stats.as_dict()["skipped_block_steps"] == 35
    assert stats.skipped_share == pytest.approx(35 / 160)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_bundle):
    return VideoPipeline.from_pretrained(tiny_bundle)


def test_pipeline_batches_each_start_fresh(tiny_pipe):
    """Three videos in batches of 2 and 1: each batch is its own sampling run, with its own cache."""
    prompts, seeds = ["a red circle", "a blue square", "a green triangle"], [1, 2, 3]
    with step_cache(tiny_pipe.transformer, 1.0) as stats:
        batched = tiny_pipe(prompts, seed=seeds, batch_size=2, frames=4, progress=False)
    with step_cache(tiny_pipe.transformer, 1.0):
        last_alone = tiny_pipe(prompts[2:], seed=seeds[2:], frames=4, progress=False)
    steps = tiny_pipe.defaults["steps"]
    assert stats.runs == 2 and stats.calls == 2 * steps
    assert (batched.frames[2] == last_alone.frames[0]).all()


def test_generate_file_reports_the_cache(tiny_pipe, tmp_path):
    record = generate_file(tiny_pipe, "a red circle", tmp_path / "v.mp4", frames=4, cache_threshold=0.0)
    assert (tmp_path / "v.mp4").stat().st_size > 0
    assert record["step_cache"]["full_steps"] == tiny_pipe.defaults["steps"]
    assert "step_cache" not in generate_file(tiny_pipe, "a red circle", tmp_path / "w.mp4", frames=4)
    with pytest.raises(ConfigError, match="cache threshold"):
        generate_file(tiny_pipe, "a red circle", tmp_path / "x.mp4", cache_threshold=-1.0)
    assert not (tmp_path / "x.mp4").exists()
    assert hook_traces(tiny_pipe.transformer) == []


def test_cli_cache_threshold(tiny_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    done = run_cli("generate", "--prompts", prompts, "-m", tiny_bundle, "--out-dir", tmp_path / "b", "--frames", 4,
                   "--cache-threshold", "0.5")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "b" / "generated.jsonl").read_text())
    assert record["step_cache"]["threshold"] == 0.5 and record["step_cache"]["calls"] == 3
