import json

import pytest
import torch

from conftest import run_cli
from vidiffuse.compress.prune import (PruneShape, check_ratio, importance_scores, noised_batch, parameter_count,
                                      plan_shape, prune_transformer, recover)
from vidiffuse.errors import ConfigError
from vidiffuse.models.transformer import VideoDiT


def model_4_heads():
    """Tiny, but with 4 heads and a 128-channel MLP per block, so there is something to choose between."""
    torch.manual_seed(0)
    model = VideoDiT(hidden_size=32, depth=2, num_heads=4)
    with torch.no_grad():  # adaLN-zero starts at zero output; random weights make every unit do something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, model.config.in_channels, 16, 8, 8, generator=g),
            "timestep": torch.linspace(100, 900, batch),
            "encoder_hidden_states": torch.randn(batch, 5, model.config.text_dim, generator=g),
            "pooled_projections": torch.randn(batch, model.config.text_dim, generator=g),
            "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long)}


@pytest.mark.parametrize("ratio", [0, -0.1, 1, 1.5, float("nan"), "half"])
def test_a_ratio_outside_0_1_is_refused_with_one_line(ratio):
    with pytest.raises(ConfigError) as e:
        check_ratio(ratio)
    assert "between 0 and 1" in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_bad_ratio_in_one_line(tmp_path):
    result = run_cli("prune", "shapes", "--out", tmp_path / "p", "--ratio", "1.2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: the pruning ratio must be between 0 and 1 (exclusive), got 1.2"]
    assert not (tmp_path / "p").exists()


def test_plan_removes_at_least_the_ratio_and_an_unreachable_one_is_refused():
    model = model_4_heads()
    for ratio, heads in ((0.1, None), (0.25, 3), (0.3, 2)):
        shape = plan_shape(model, ratio, heads)
        pruned = prune_transformer(model, shape)
        removed = 1 - parameter_count(pruned) / parameter_count(model)
        assert shape.heads == (heads or 4) and shape.mlp_hidden_size % 8 == 0
        # at least what was asked, and no more than 8 more MLP channels per block beyond it
        assert ratio <= removed < ratio + 8 * 2 * (2 * 32 + 1) / parameter_count(model)
    with pytest.raises(ConfigError, match="cannot remove 90%"):
        plan_shape(model, 0.9, heads=4)
    with pytest.raises(ConfigError, match="between 1 and the model's 4"):
        plan_shape(model, 0.3, heads=5)


def test_pruned_model_has_a_consistent_config_and_reloads_from_disk(tmp_path):
    model = model_4_heads()
    pruned = prune_transformer(model, PruneShape(heads=3, mlp_hidden_size=40))
    cfg = pruned.config
    assert (cfg.num_heads, cfg.attention_head_dim, cfg.mlp_hidden_size, cfg.hidden_size) == (3, 8, 40, 32)
    block = pruned.blocks[0]
    assert block.attn.q.weight.shape == (24, 32) and block.cross_attn.kv.weight.shape == (48, 384)
    assert block.attn.out.weight.shape == (32, 24) and block.mlp[0].weight.shape == (40, 32)
    pruned.save_pretrained(tmp_path / "t")
    reloaded = VideoDiT.from_pretrained(tmp_path / "t")
    x = inputs(model)
    with torch.no_grad():
        assert torch.equal(reloaded(**x).sample, pruned(**x).sample)
    # an unpruned model's saved config still builds the original layout
    model.save_pretrained(tmp_path / "full")
    assert parameter_count(VideoDiT.from_pretrained(tmp_path / "full")) == parameter_count(model)


def test_removing_units_that_contribute_nothing_is_exact():
    """Heads whose output columns are zero and MLP channels whose output weights are zero change nothing: the
    importance scores find exactly them, and the pruned model computes the same function."""
    model = model_4_heads()
    dead_heads, dead_channels = {"attn": 2, "cross_attn": 0}, torch.arange(0, 128, 2)  # every other channel
    with torch.no_grad():
        for block in model.blocks:
            for name, h in dead_heads.items():
                getattr(block, name).out.weight[:, 8 * h : 8 * (h + 1)] = 0
            block.mlp[2].weight[:, dead_channels] = 0
    scores = importance_scores(model, [inputs(model, seed=s) for s in range(2)])
    for s in scores:
        assert s["attn"][2] == 0 and s["cross_attn"][0] == 0 and (s["mlp"][dead_channels] == 0).all()
        assert (s["attn"][[0, 1, 3]] > 0).all() and (s["mlp"][1::2] > 0).all()
    pruned = prune_transformer(model, PruneShape(heads=3, mlp_hidden_size=64), scores)
    assert parameter_count(pruned) < parameter_count(model) - 2 * 64 * (2 * 32 + 1)  # 64 channels in each of 2 blocks
    x = inputs(model, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).sample, model(**x).sample, rtol=1e-5, atol=1e-6)
    # the same sizes chosen blindly (the first units) lose live ones and change the output
    blind = prune_transformer(model, PruneShape(heads=3, mlp_hidden_size=64))
    with torch.no_grad():
        assert (blind(**x).sample - model(**x).sample).abs().max() > 1e-3


def test_importance_keeps_the_units_that_matter():
    """One head and a quarter of the channels whose output weights are made much larger must all be kept."""
    model = model_4_heads()
    loud = torch.arange(0, 128, 4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out.weight[:, 8:16] *= 10
            block.mlp[2].weight[:, loud] *= 100
    scores = importance_scores(model, [inputs(model)])
    for s in scores:
        assert int(s["attn"].argmax()) == 1
        assert set(torch.topk(s["mlp"], 32).indices.tolist()) == set(loud.tolist())
    pruned = prune_transformer(model, PruneShape(heads=1, mlp_hidden_size=32), scores)
    with torch.no_grad():
        for block, original in zip(pruned.blocks, model.blocks):
            assert torch.equal(block.attn.out.weight, original.attn.out.weight[:, 8:16])
            assert torch.equal(block.mlp[2].weight, original.mlp[2].weight[:, loud])


def test_recovery_distils_the_teacher_and_resumes(tmp_path, text_encoder):
    teacher = model_4_heads()
    student = prune_transformer(teacher, PruneShape(heads=2, mlp_hidden_size=32))
    g = torch.Generator().manual_seed(0)
    caps = ["a red circle", "a blue square moving left", "small green triangle", "a yellow circle on white"]
    emb = text_encoder.encode(caps)
    data = {"latents": torch.randn(4, 4, 16, 8, 8, generator=g), "caption_clip": torch.arange(4),
            "tokens": emb.tokens, "mask": emb.mask, "pooled": emb.pooled}
    empty = text_encoder.encode([""])
    probe = noised_batch(data, empty, 8, torch.Generator().manual_seed(99))

    def gap(model):
        with torch.no_grad():
            return (model(**probe).sample - teacher(**probe).sample).pow(2).mean().item()

    run = {"steps": 20, "batch_size": 4, "lr": 3e-3, "warmup": 2, "ema_decay": 0.8, "checkpoint_every": 10,
           "eval_every": 10, "log_every": 5}
    before = gap(student)
    evals = []
    ema, finished = recover(student, teacher, data, empty, tmp_path / "w", run,
                            evaluate=lambda m: evals.append(1) or {"gap": gap(m)}, time_limit_s=0)
    assert not finished  # stopped by the time limit after its first step, with a checkpoint
    assert json.loads((tmp_path / "w" / "checkpoint" / "state.json").read_text())["step"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        recover(student, teacher, data, empty, tmp_path / "w", run)
    ema, finished = recover(student, teacher, data, empty, tmp_path / "w", run, evaluate=lambda m: {"gap": gap(m)},
                            resume=True)
    assert finished and gap(ema) < 0.5 * before
    log = [json.loads(line) for line in (tmp_path / "w" / "recovery_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [0, 10, 20]
    assert log[-1]["eval"]["gap"] < log[0]["eval"]["gap"]


@pytest.fixture(scope="module")
def pruned_bundle(tiny_bundle, tmp_path_factory):
    from vidiffuse.compress.prune import prune_model

    out = tmp_path_factory.mktemp("pruned") / "tiny-pruned"
    report = prune_model(tiny_bundle, out, ratio=0.3, heads=1, data={"num_clips": 4},
                         recovery={"steps": 2, "batch_size": 2, "eval_prompts": 2, "eval_every": 2})
    return out, report


def test_prune_model_writes_a_loadable_smaller_model_directory(pruned_bundle, tiny_bundle):
    from vidiffuse.pipeline import VideoPipeline

    out, report = pruned_bundle
    assert report["finished"] and report["parameters"]["removed_share"] >= 0.3
    assert report["denoiser_bytes"]["after"] < report["denoiser_bytes"]["before"]
    pipe, source = VideoPipeline.from_pretrained(out), VideoPipeline.from_pretrained(tiny_bundle)
    assert pipe.transformer.config.num_heads == 1 and pipe.transformer.config.attention_head_dim == 16
    assert pipe.index["pruned_from"] == {"name": "tiny", "version": source.version}
    assert pipe.version != source.version  # its own weights, its own version
    record = json.loads((out / "training" / "prune.json").read_text())
    assert record["recovery"]["steps_done"] == 2 and len(record["kept"]) == 2 and len(record["kept"][0]["mlp"]) == \
        pipe.transformer.config.mlp_hidden_size
    log = [json.loads(line) for line in (out / "training" / "recovery_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [0, 2] and "acc_shape" in log[-1]["eval"]
    assert "pruned from tiny" in (out / "README.md").read_text()
    # the record alone rebuilds the starting point of the recovery (benchmarks/prune.py relies on it)
    from vidiffuse.compress.prune import scores_from_kept

    rebuilt = prune_transformer(source.transformer, PruneShape(1, pipe.transformer.config.mlp_hidden_size),
                                scores_from_kept(record["kept"], source.transformer))
    unrecovered = VideoDiT.from_pretrained(f"{report['work_dir']}/unrecovered/transformer")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), unrecovered.state_dict().values()))
    video = pipe("a red circle", seed=1, steps=2, progress=False, watermark=False).frames[0]
    assert video.shape == (16, 64, 64, 3)


def test_bench_pruned_variant_swaps_in_the_pruned_denoiser_and_checks_its_origin(pruned_bundle, tiny_bundle):
    from vidiffuse.compress import bench
    from vidiffuse.compress.prune import pruned_transformer_for
    from vidiffuse.pipeline import VideoPipeline

    out, _ = pruned_bundle
    assert "pruned" in bench.DEFAULT_VARIANTS
    base = VideoPipeline.from_pretrained(tiny_bundle)
    plans = {p.name: p for p in bench.parse_variants(f"pruned:{out},int8+pruned:{out}")}
    pipe = bench._copy_pipeline(base)
    prepared = [m.apply(pipe, arg) for m, arg in plans[f"pruned:{out}"].parts]
    assert pipe.transformer.config.num_heads == 1 and base.transformer.config.num_heads == 2
    assert prepared[-1].details["fewer_parameters"] >= 0.3 and prepared[-1].details["model"] == "tiny-pruned"
    frames = pipe(["a red circle"], seed=[0], steps=2, progress=False, watermark=False).frames
    assert frames[0].shape == (16, 64, 64, 3)
    # pruning replaces the denoiser, so a quantized one would silently be thrown away: refused
    with pytest.raises(ConfigError, match="comes first"):
        pipe = bench._copy_pipeline(base)
        for m, arg in plans[f"int8+pruned:{out}"].parts:
            m.apply(pipe, arg)
    # a pruned model of another source is refused rather than compared with the wrong baseline
    with pytest.raises(ConfigError, match="was pruned from tiny@"):
        pruned_transformer_for(VideoPipeline.from_pretrained(out), out)
    assert any(t["target"].startswith("pruned: >= 25% fewer denoiser parameters") for t in bench._targets([]))
