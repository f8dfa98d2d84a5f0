import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from vidiffuse.compress import bench
from vidiffuse.compress.reference import ReferenceLoop
from vidiffuse.errors import ConfigError
from vidiffuse.pipeline import VideoPipeline

PROMPTS = ["a large red circle moving left on a black background", "small blue square sliding right over white",
           "a triangle"]
SEEDS = [3, 1, 4]


@pytest.fixture
def fp32(monkeypatch):
    # on a CPU with native bf16 the pipeline would autocast; the reference loop is fp32 by definition
    monkeypatch.setenv("VIDIFFUSE_PRECISION", "fp32")


@pytest.fixture(scope="module")
def pipe_and_loop(tiny_bundle):
    pipe = VideoPipeline.from_pretrained(tiny_bundle)
    return pipe, ReferenceLoop.from_pretrained(tiny_bundle, text_encoder=pipe.text_encoder)


def test_reference_loop_makes_the_pipelines_video(pipe_and_loop, fp32):
    pipe, loop = pipe_and_loop
    # UniPC, the default sampler, keeps state across steps; batch 2 over 3 prompts gives a full and a
    # partial batch, each video from its own seed
    ours = pipe(PROMPTS, seed=SEEDS, sampler="unipc", batch_size=2, progress=False, watermark=False)
    theirs = loop(PROMPTS, SEEDS, sampler="unipc", batch_size=2)

    assert theirs.videos.shape == ours.videos.shape == (3, 3, 16, 64, 64)
    assert ours.videos.std() > 0.05  # random weights still make a non-trivial video
    torch.testing.assert_close(theirs.videos, ours.videos, atol=1e-4, rtol=0)
    levels = np.stack([np.abs(a.astype(int) - b.astype(int)) for a, b in zip(theirs.frames, ours.frames)])
    assert levels.max() <= 1 and levels.mean() < 0.01  # only float noise at a rounding boundary flips a level
    other = loop(PROMPTS[:1], [SEEDS[0] + 1], sampler="unipc")
    assert (other.videos[0] - theirs.videos[0]).abs().max() > 0.05


def test_reference_loop_runs_cfg_as_two_unbatched_calls(pipe_and_loop, fp32):
    _, loop = pipe_and_loop
    seen = []
    hook = loop.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[0],
                                                  kwargs["encoder_hidden_states"][0].abs().sum().item())),
        with_kwargs=True)
    try:
        loop(PROMPTS[:2], SEEDS[:2], steps=3, guidance=3.0, batch_size=2)
        assert [b for b, _ in seen] == [2] * 6  # 3 steps × (prompt, then empty prompt), never a doubled batch
        prompt_text, empty_text = seen[0][1], seen[1][1]
        assert prompt_text != empty_text
        assert all(t == (prompt_text, empty_text)[i % 2] for i, (_, t) in enumerate(seen))
        seen.clear()
        loop(PROMPTS[:2], SEEDS[:2], steps=3, guidance=1.0, batch_size=2)
        assert len(seen) == 3  # no guidance, no second call
    finally:
        hook.remove()


def test_variants_parse_and_refuse_unknown_names():
    plans = bench.parse_variants("fp32, int8+cache:0.05,cache")
    assert [p.name for p in plans] == ["diffusers", "fp32", "int8+cache:0.05", "cache"]
    assert [m.name for m, _ in plans[2].parts] == ["fp32", "int8", "cache"]  # fp32 unless bf16 is asked for
    assert plans[2].parts[2][1] == "0.05"
    assert [m.name for m, _ in bench.parse_variants("bf16+cache")[1].parts] == ["bf16", "cache"]
    with pytest.raises(ConfigError, match="unknown variant 'warp'.*known: diffusers, fp32"):
        bench.parse_variants("fp32,warp")
    with pytest.raises(ConfigError, match="threshold must be a number"):
        bench.parse_variants("cache:fast")
    with pytest.raises(ConfigError, match="int8 takes dynamic or weight-only"):
        bench.parse_variants("int8:4")
    with pytest.raises(ConfigError, match="takes no argument"):
        bench.parse_variants("compile:max")
    with pytest.raises(ConfigError, match="two precisions"):
        bench.parse_variants("fp32+bf16")


def test_missing_module_is_a_reason_not_a_crash():
    assert "not in this installation" in bench._module_missing("no_such_module")
    assert "has no teleport" in bench._module_missing("reference", "teleport")
    assert bench._module_missing("reference", "ReferenceLoop") is None


def _raise(pipe, arg):
    raise RuntimeError("compiler exploded\nsecond line")


def test_bench_writes_json_table_and_plot(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODIFIERS, "int8", dataclasses.replace(bench.MODIFIERS["int8"], missing=lambda: "not here"))
    monkeypatch.setitem(bench.MODIFIERS, "compile", dataclasses.replace(bench.MODIFIERS["compile"], apply=_raise,
                                                                        missing=lambda: None))
    out = tmp_path / "bench"
    report = bench.run_bench(tiny_bundle, "fp32,cache,int8,compile", n_prompts=2, steps=2, batch_size=2, repeats=2,
                             out_dir=out, progress=False)

    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["diffusers", "fp32", "cache", "int8", "compile"]
    assert rows["int8"]["status"] == "unavailable" and rows["int8"]["reason"] == "int8: not here"
    assert rows["compile"]["status"] == "failed"
    assert rows["compile"]["reason"] == "preparing: RuntimeError: compiler exploded"

    columns = {"seconds_per_video", "speedup_vs_diffusers", "speedup_vs_fp32", "peak_memory_mb", "weights_mb",
               "warmup_s", "pixel_mae_vs_diffusers", "adherence_change_vs_fp32_pts"}
    for name in ("diffusers", "fp32", "cache"):
        row = rows[name]
        assert row["status"] == "ok" and columns <= set(row)
        assert row["timed_batches"] == 2  # one batch of two videos, two passes
        numbers = [row[c] for c in columns] + [v for k, v in row["metrics"].items() if k != "fvd_shapes_ci95"]
        assert all(math.isfinite(v) for v in numbers), row
        assert row["seconds_per_video"] > 0 and row["weights_mb"] > 0.1 and row["metrics"]["fvd_shapes"] > 0
        assert set(row["metrics"]) >= {f"adherence_{a}" for a in ("background", "color", "shape", "size", "direction")}
        assert row["reproducible"]
    assert rows["diffusers"]["speedup_vs_diffusers"] == 1.0
    assert rows["fp32"]["pixel_mae_vs_diffusers"] < 0.01  # the same video as the plain loop
    assert rows["fp32"]["adherence_change_vs_fp32_pts"] == 0.0
    assert rows["fp32"]["attribute_change_vs_fp32_pts"]["shape"] == {"change": 0.0, "ci95": [0.0, 0.0]}
    lo, hi = rows["cache"]["adherence_change_vs_fp32_ci95"]
    assert lo <= rows["cache"]["adherence_change_vs_fp32_pts"] <= hi
    assert rows["fp32"]["weights_mb"] == pytest.approx(rows["diffusers"]["weights_mb"], rel=0.01)
    cache = rows["cache"]["details"]
    assert cache["threshold"] == bench.DEFAULT_CACHE_THRESHOLD
    assert cache["full_steps"] + cache["cached_steps"] == 2  # one pass of one batch, 2 steps

    table = (out / "bench.md").read_text()
    assert "| variant | s/video | × vs diffusers | × vs fp32 | peak MB | weights MB | adherence |" in table
    for name in rows:
        assert f"\n| {name} |" in table
    assert "unavailable: int8: not here" in table and "not run: int8" in table
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert all(line.count("|") == header.count("|") for line in table.splitlines() if line.startswith("| "))

    import matplotlib.image

    image = matplotlib.image.imread(out / "bench.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200


def test_seed_offset_runs_the_same_prompts_on_other_seeds(tiny_bundle, tmp_path, monkeypatch):
    from vidiffuse.evaluate.suite import load_golden

    seen = []
    call = VideoPipeline.__call__

    def spy(self, prompt, seed=0, **kwargs):
        seen.append((list(prompt), list(seed)))
        return call(self, prompt, seed=seed, **kwargs)

    monkeypatch.setattr(VideoPipeline, "__call__", spy)
    report = bench.run_bench(tiny_bundle, "fp32", n_prompts=2, steps=2, batch_size=2, repeats=1, out_dir=tmp_path,
                             progress=False, seed_offset=1000)
    golden = load_golden(n=2)
    assert seen and all(c == ([i.prompt for i in golden], [i.seed + 1000 for i in golden]) for c in seen)
    assert report["settings"]["seed_offset"] == 1000
    assert "2 golden prompts (shapes_v1, seeds + 1000)" in (tmp_path / "bench.md").read_text()


def test_paired_change_counts_videos_lost_and_won_against_the_baseline():
    base = np.ones(256)
    mine = base.copy()
    mine[:19] = 0  # 19 readings lost ...
    base[19:33] = 0  # ... and 14 won, of 256
    change = bench.paired_change(mine, base)
    assert change["change"] == pytest.approx(100 * (14 - 19) / 256)
    d = np.r_[np.full(19, -100.0), np.full(14, 100.0), np.zeros(223)]
    half = 1.96 * d.std(ddof=1) / 16
    assert change["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert change["ci95"][0] < -3 < change["change"]  # a 3-point threshold sits inside this interval


def test_reference_loop_reads_the_prompts_the_denoiser_reads(tiny_bundle_with_reader, tmp_path):
    """With a prompt reader, the pipeline's denoiser gets the rewrite; the plain loop must get it too."""
    report = bench.run_bench(tiny_bundle_with_reader, "fp32", n_prompts=2, steps=2, batch_size=2, repeats=1,
                             out_dir=tmp_path / "bench", progress=False)
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["fp32"]["pixel_mae_vs_diffusers"] < 0.01


def test_cli_bench_refuses_an_unknown_variant_in_one_line(tiny_bundle, tmp_path):
    bad = run_cli("bench", "--model", tiny_bundle, "--variants", "fp32,warp", "--out", tmp_path / "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: unknown variant 'warp'") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_bench_writes_its_files(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from vidiffuse.cli import app

    out = tmp_path / "ok"
    done = CliRunner().invoke(app, ["bench", "--model", str(tiny_bundle), "--variants", "fp32", "--n", "2",
                                    "--steps", "1", "--repeats", "1", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "diffusers" in done.stdout and "fp32" in done.stdout
    assert {r["name"] for r in json.loads((out / "bench.json").read_text())["variants"]} == {"diffusers", "fp32"}
    assert (out / "bench.md").is_file() and (out / "bench.png").is_file()
