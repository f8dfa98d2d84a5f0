"""The `vidiffuse` command: a thin typer layer over the Python API."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import VidiffuseError

app = typer.Typer(help="vidiffuse: video diffusion from data to production.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: the shapes world and your own footage.", no_args_is_help=True)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Evaluate a model: FVD, adherence, temporal quality, OOD prompts, latency; gate regressions.")
app.add_typer(eval_app, name="eval")
govern_app = typer.Typer(help="Governance: memorization, bias audit, model card and risk report.", no_args_is_help=True)
app.add_typer(govern_app, name="govern")
err = Console(stderr=True, soft_wrap=True)


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What the video should show."),
    output: Path = typer.Option(Path("out.mp4"), "--output", "-o", help="MP4 file to write (single prompt)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='JSONL file, one {"prompt": ..., "seed": ...} per line.'),
    out_dir: Path = typer.Option(Path("videos"), "--out-dir", help="Folder for batch mode's 0000.mp4, 0001.mp4, ..."),
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name (shapes)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and settings give the same video."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (model default if unset)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Number of frames (model default if unset)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Videos generated together in batch mode."),
    watermark: bool = typer.Option(True, "--watermark/--no-watermark",
                                   help="Invisible watermark in the pixels (on by default; turning it off is recorded in the signed manifest)."),
    cache_threshold: Optional[float] = typer.Option(
        None, "--cache-threshold",
        help="Step caching (First Block Cache): skip the other DiT blocks at a step whose first-block output "
             "changed by less than this relative L1 amount, e.g. 0.1. Off unless given; 0 never skips."),
    image: Optional[Path] = typer.Option(None, "--image", help="First frame, for image-to-video (shapes-i2v, Wan/CogVideoX I2V, LTX-Video)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Diffusers models: bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on CPU)."),
    offload: Optional[str] = typer.Option(None, "--offload", help="Diffusers models: 'model' or 'sequential' CPU offload, to fit GPU memory."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Diffusers models: VAE tiling and slicing, for large frames."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Diffusers models: bnb-4bit, bnb-8bit or torchao-int8 weights."),
    height: Optional[int] = typer.Option(None, "--height", help="Diffusers models: frame height (model default if unset)."),
    width: Optional[int] = typer.Option(None, "--width", help="Diffusers models: frame width (model default if unset)."),
    lora: list[str] = typer.Option([], "--lora", help="LoRA directory to stack on the model, as DIR or DIR:SCALE (e.g. runs/x/lora:0.8). Repeatable."),
):
    """Generate a video from a prompt, or a folder of videos from a JSONL of prompts.

    Every video carries a signed C2PA manifest; by default also an invisible watermark."""
    from .generation import generate_batch, generate_file, logger

    if (prompt is None) == (prompts is None):
        raise VidiffuseError("give either a PROMPT or --prompts FILE.jsonl")
    if batch_size < 1:
        raise VidiffuseError(f"--batch-size must be at least 1, got {batch_size}")
    settings = {"steps": steps, "guidance": guidance, "sampler": sampler, "frames": frames, "watermark": watermark,
                "cache_threshold": cache_threshold}
    if prompt is not None and not prompt.strip():
        raise VidiffuseError("the prompt is empty")
    from .backends import generation_setup

    target, settings = generation_setup(model, settings, image=image, prompts_file=prompts, dtype=dtype,
                                        offload=offload, vae_tiling=vae_tiling, quantize=quantize, height=height, width=width)
    if lora:
        from .generation import read_prompts
        from .models.lora import parse_lora_spec
        from .pipeline import VideoPipeline

        if not isinstance(target, VideoPipeline):  # batch mode on a bundle: check the prompts, then load
            read_prompts(prompts)
            target = VideoPipeline.from_pretrained(target)
        with warnings_as_lines(logging.getLogger("vidiffuse.models.lora")):
            for spec in lora:
                target.load_lora(*parse_lora_spec(spec))
    with warnings_as_lines(logger), warnings_as_lines(logging.getLogger("vidiffuse.pipeline")):
        if prompts is not None:
            log = generate_batch(target, prompts, out_dir, seed=seed, batch_size=batch_size, **settings)
            err.print(f"wrote {sum(1 for _ in log.open())} videos to {out_dir} (settings in {log})")
        else:
            record = generate_file(target, prompt, output, seed=seed, **settings)
            if "read_as" in record:
                err.print(f"read as: {record['read_as']}")
            err.print(f"wrote {record['file']}")


@contextmanager
def warnings_as_lines(logger: logging.Logger) -> Iterator[None]:
    """Show a library logger's warnings (e.g. out-of-distribution prompts) as `warning: ...` lines, like errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@app.command()
def verify(
    file: Path = typer.Argument(..., help="A video file (MP4, WebM, MOV, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
):
    """Check a video for vidiffuse's invisible watermark and its signed C2PA manifest (valid, tampered?)."""
    import json

    from .provenance.verify import verify_file

    result = verify_file(file)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    mark, manifest = result["watermark"], result["manifest"]
    if mark["detected"]:
        err.print(f"watermark: [green]detected[/green] (p = {mark['p_value']:.1e}), payload {mark['payload']} "
                  f"(model id {mark['model_id']})")
    else:
        err.print(f"watermark: not detected (p = {mark['p_value']:.2g}, threshold {mark['threshold']:.0e})")
    if not manifest["present"]:
        err.print("manifest: none")
    else:
        state = "[red]tampered[/red]" if manifest["tampered"] else "[green]valid[/green]" if manifest["valid"] else "[red]invalid[/red]"
        trust = "trusted signer" if manifest["trusted"] else "untrusted signer (e.g. a local development certificate)"
        model = (manifest.get("generation") or {}).get("model") or {}
        err.print(f"manifest: {state}, {trust}; made by {model.get('name', '?')} {model.get('version', '')}; "
                  f"issues: {', '.join(manifest['issues']) or 'none'}")
    if result.get("consistent") is False:
        err.print("[yellow]the manifest's watermark payload does not match the pixels[/yellow]")


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="TOML training config (see configs/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (then --resume)."),
    lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter on a frozen base model ([lora] section; default base: shapes)."),
):
    """Train an autoencoder or a denoiser, or a LoRA on one (--lora); launch with torchrun for DDP or FSDP."""
    from .train.trainer import train as run_training

    out = run_training(config, resume=resume, max_steps=max_steps, lora=lora)
    err.print(f"done: {out}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write clips and captions.jsonl into."),
    n: int = typer.Option(100, "--n", help="Number of clips."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed gives the same clips."),
):
    """Write shapes-world clips (MP4) and captions.jsonl."""
    from .data.shapes import synthesize

    if n < 1:
        raise VidiffuseError(f"--n must be at least 1, got {n}")
    synthesize(out, n, seed)
    err.print(f"wrote {n} clips and captions.jsonl to {out}")


@data_app.command("manifest")
def data_manifest(
    root: Path = typer.Argument(..., help="Dataset folder: videos, optional captions.jsonl/.csv and <file>.license sidecars."),
    license: Optional[str] = typer.Option(None, "--license", help="SPDX licence of files that state none (e.g. CC-BY-4.0)."),
    source: Optional[str] = typer.Option(None, "--source", help="Where files without a 'source' column come from."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name (default: the folder's name)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for manifest.json and DATASET_CARD.md (default: ROOT)."),
):
    """Croissant-style manifest (sha256, duration, size, source, licence per file) and a dataset card."""
    from collections import Counter

    from .data.manifest import videos, write_manifest

    manifest, digest, path = write_manifest(root, out, default_license=license, default_source=source, name=name)
    clips = videos(manifest)
    status = Counter(f["license_status"] for f in clips)
    err.print(f"{len(clips)} videos, {len(manifest['errors'])} unreadable; licences: "
              + (", ".join(f"{k} {v}" for k, v in sorted(status.items())) or "none"))
    for e in manifest["errors"]:
        err.print(f"  unreadable: {e['file']}: {e['error']}")
    for f in clips:
        if f["license_status"] != "ok":
            err.print(f"  licence {f['license_status']}: {f['name']} ({f['license'] or 'none stated'})")
    err.print(f"wrote {path} (sha256 {digest}) and {path.parent / 'DATASET_CARD.md'}")


@data_app.command("dedup")
def data_dedup(
    root: Path = typer.Argument(..., help="Dataset folder (the training set when --against is given)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Evaluation folder: report clips it shares with ROOT."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Similarity at or above which clips are duplicates (default: calibrated 0.99)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
):
    """Near-duplicate clips within ROOT, or leakage between ROOT and --against (exit 0 whenever it ran)."""
    import json

    from .data.dedup import dedup_report, format_report
    from .data.fingerprint import SIMILARITY_THRESHOLD
    from .files import write_atomic

    report = dedup_report(root, against, SIMILARITY_THRESHOLD if threshold is None else threshold)
    typer.echo(format_report(report))
    if json_out is not None:
        write_atomic(json_out, json.dumps(report, indent=2) + "\n")
        err.print(f"wrote {json_out}")


@eval_app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name."),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for report.json and report.html."),
    n: int = typer.Option(256, "--n", help="Golden prompts to generate (an evenly spaced subset when fewer than 256)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (model default if unset)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Also time samplers x step counts for the quality-latency curve."),
    sweep_n: int = typer.Option(16, "--sweep-n", help="Videos per sweep point."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Local CLIP model folder: adds clip_score (prompt-frame similarity)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="report.json to gate against: exit 1 if any metric is worse."),
    tolerance: list[str] = typer.Option([], "--tolerance", help="Relative tolerance: '0.05' for all metrics, or 'fvd_shapes=0.1'. Repeatable."),
):
    """Evaluate MODEL on the golden prompts and write report.json + report.html."""
    if ctx.invoked_subcommand is not None:
        return
    from .evaluate import suite
    from .evaluate.html import write_report
    from .pipeline import VideoPipeline

    tolerances = suite.parse_tolerances(tolerance)
    base = suite.read_report(baseline) if baseline else None
    if sweep_n < 2:
        raise VidiffuseError(f"--sweep-n must be at least 2, got {sweep_n}")
    pipe = VideoPipeline.from_pretrained(model)
    report, videos = suite.evaluate_model(pipe, n=n, steps=steps, guidance=guidance, sampler=sampler,
                                          sweep=suite.SWEEP if sweep else None, sweep_n=sweep_n,
                                          clip_path=clip, progress=lambda m: err.print(f"[dim]{m}[/dim]"))
    failures = None
    if base is not None:
        mismatch = suite.settings_mismatch(report, base)
        if mismatch:
            raise VidiffuseError("the baseline was measured differently, so it cannot gate this run: " + "; ".join(mismatch))
        failures = suite.gate(report, base, tolerances)
    html = write_report(out, report, videos, baseline=base, gate=failures)
    _print_metrics(report, base)
    err.print(f"wrote {out / 'report.json'} and {html}")
    if failures:
        err.print(f"[red]regression gate failed: {len(failures)} metric(s) worse than the baseline[/red]")
        for line in failures:
            err.print(f"  {line}")
        raise typer.Exit(1)
    if failures is not None:
        err.print("[green]regression gate passed[/green]")


@eval_app.command("compare")
def eval_compare(
    a: Path = typer.Argument(..., help="The old report.json."),
    b: Path = typer.Argument(..., help="The new report.json."),
):
    """Print each metric of two reports side by side, with the change and whether it is better."""
    from .evaluate import suite

    old, new = suite.read_report(a), suite.read_report(b)
    mismatch = suite.settings_mismatch(new, old)
    if mismatch:
        err.print("[yellow]note: measured differently: " + "; ".join(mismatch) + "[/yellow]")
    _print_metrics(new, old)


def _print_metrics(report: dict, baseline: dict | None) -> None:
    from rich.table import Table

    from .evaluate.suite import compare

    table = Table("metric", "value", *(("baseline", "change", "") if baseline else ()))
    colours = {"better": "green", "worse": "red"}
    for row in compare(report, baseline or {"metrics": {}}):
        cells = [row["metric"], "—" if row["new"] is None else f"{row['new']:.4g}"]
        if baseline:
            change = "" if row["change"] is None else f"{row['change']:+.4g}"
            style = colours.get(row["verdict"], "")
            cells += ["—" if row["old"] is None else f"{row['old']:.4g}", change,
                      f"[{style}]{row['verdict']}[/{style}]" if style else row["verdict"]]
        table.add_row(*cells)
    Console().print(table)


@app.command()
def bench(
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name."),
    variants: Optional[str] = typer.Option(None, "--variants",
                                           help="Comma-separated: fp32, bf16, int8[:weight-only], compile, cache[:THRESHOLD], pruned[:DIR], "
                                                "distilled[:DIR], or several joined by '+' (int8+cache). Default: fp32,bf16,"
                                                "int8,cache,compile,int8+cache,int8+compile,pruned,distilled,distilled+int8. "
                                                "The plain diffusers loop always runs as the yardstick."),
    n: int = typer.Option(32, "--n", help="Golden prompts (the same prompts and seeds for every variant)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (model default if unset)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    batch_size: int = typer.Option(8, "--batch-size", help="Videos per timed batch."),
    repeats: int = typer.Option(2, "--repeats", help="Timed passes over all prompts, after an untimed warm-up."),
    out: Path = typer.Option(Path("bench"), "--out", help="Folder for bench.json, bench.md and bench.png."),
    seed_offset: int = typer.Option(0, "--seed-offset", help="Add this to every golden prompt's seed: the same prompts on other noise."),
):
    """Time and score every speed-up variant side by side with a plain diffusers loop on the same weights."""
    from .compress.bench import format_summary, run_bench

    report = run_bench(model, variants, n_prompts=n, steps=steps, guidance=guidance, sampler=sampler,
                       batch_size=batch_size, out_dir=out, repeats=repeats, seed_offset=seed_offset)
    typer.echo(format_summary(report))
    err.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model directory or bundled name (shapes)."),
    out: Path = typer.Option(..., "--out", "-o", help="New model directory to write."),
    mode: str = typer.Option("int8-dynamic", "--mode", help="int8-dynamic (fastest on CPU), int8-weight-only "
                             "(as small, fp32 speed) or bf16 (bf16 compute only where the CPU has it natively)."),
):
    """Write a copy of a model with its denoiser quantized; `generate --model OUT` runs it."""
    from .compress.quantize import format_report, quantize_model

    typer.echo(format_report(quantize_model(model, out, mode)))


@app.command()
def prune(
    model: str = typer.Argument(..., help="Model directory or bundled name (shapes)."),
    out: Path = typer.Option(..., "--out", "-o", help="New model directory to write."),
    ratio: float = typer.Option(0.25, "--ratio", help="Share of the denoiser's parameters to remove (0 < ratio < 1)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention heads each block keeps (default: all); "
                                        "MLP channels then go until the ratio is reached."),
    steps: int = typer.Option(400, "--steps", help="Recovery fine-tune steps (distilling the source model); 0: none."),
    batch_size: int = typer.Option(16, "--batch-size", help="Recovery batch size."),
    lr: float = typer.Option(2e-4, "--lr", help="Recovery peak learning rate (warmup, then cosine decay)."),
    clips: int = typer.Option(1500, "--clips", help="Shapes-world clips encoded for calibration and recovery."),
    eval_prompts: int = typer.Option(32, "--eval-prompts", help="Prompts scored by the analyzer during recovery; 0: none."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder for the data cache and checkpoints (default OUT.work)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the recovery checkpoint in the work folder."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes with a "
                                               "checkpoint; --resume continues."),
):
    """Write a copy of a model with attention heads and MLP channels pruned from its denoiser, fine-tuned to recover."""
    from .compress.prune import format_report, prune_model

    for name, value in (("--batch-size", batch_size), ("--clips", clips)):
        if value < 1:
            raise VidiffuseError(f"{name} must be at least 1, got {value}")
    report = prune_model(model, out, ratio, heads, work_dir=work, resume=resume, data={"num_clips": clips},
                         recovery={"steps": steps, "batch_size": batch_size, "lr": lr, "eval_prompts": eval_prompts},
                         time_limit_s=None if time_limit is None else 60 * time_limit, progress=err.print)
    typer.echo(format_report(report))


@app.command()
def distill(
    model: str = typer.Argument(..., help="Teacher: model directory or bundled name (shapes)."),
    out: Path = typer.Option(..., "--out", "-o", help="New model directory to write (the student, with its decoder)."),
    student_steps: int = typer.Option(2, "--student-steps", help="Euler steps the student samples in (1 to 4)."),
    pairs: int = typer.Option(2048, "--pairs", help="Teacher samples (noise, caption, video latents) to learn from."),
    steps: int = typer.Option(1500, "--steps", help="Student training steps."),
    batch_size: int = typer.Option(16, "--batch-size", help="Student batch size."),
    lr: float = typer.Option(1e-4, "--lr", help="Student peak learning rate (warmup, then cosine decay)."),
    decoder_steps: int = typer.Option(2000, "--decoder-steps", help="Tiny decoder training steps; 0 keeps it untrained (for tests)."),
    clips: int = typer.Option(1500, "--clips", help="Shapes-world clips the decoder learns from."),
    eval_prompts: int = typer.Option(32, "--eval-prompts", help="Prompts scored by the analyzer while the student trains; 0: none."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder for the pairs, data cache and checkpoints (default OUT.work)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the pairs and checkpoints in the work folder."),
):
    """Write a few-step student of a model: 1-4 Euler steps, guidance folded in, with a tiny decoder."""
    from .compress.distill import distill_model, format_report

    if clips < 2:
        raise VidiffuseError(f"--clips must be at least 2 (the last eighth is held out to score the decoder), got {clips}")
    report = distill_model(model, out, run={"student_steps": student_steps, "pairs": pairs, "steps": steps,
                                            "batch_size": batch_size, "lr": lr, "decoder_steps": decoder_steps,
                                            "eval_prompts": eval_prompts},
                           data={"num_clips": clips}, work_dir=work, resume=resume, progress=err.print)
    typer.echo(format_report(report))


@govern_app.command("bias")
def govern_bias(
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name."),
    out: Path = typer.Option(Path("govern"), "--out", help="Folder for bias.json and bias.png."),
    n: int = typer.Option(48, "--n", help="Videos per attribute."),
    seed: int = typer.Option(0, "--seed", help="Seed for the prompts and the videos: the same seed gives the same audit."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level before the Bonferroni correction over attributes."),
    attribute: list[str] = typer.Option([], "--attribute", help="Audit only this shapes-world attribute (repeatable)."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Any model: 'module:function' or 'file.py:function' mapping a video tensor (C,T,H,W) in [-1,1] to a label."),
    expected: Optional[Path] = typer.Option(None, "--expected", help='With --classifier: JSON {"attribute": {"label": proportion}}.'),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='With --classifier: prompts leaving the attribute unsaid (text lines or JSONL {"prompt", "attribute"}).'),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (model default if unset)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    batch_size: int = typer.Option(16, "--batch-size", help="Videos generated together."),
):
    """Bias audit: for prompts leaving an attribute unsaid, generated vs training distribution (chi-square)."""
    from .govern import bias
    from .pipeline import VideoPipeline, resolve_model_path

    custom = (classifier, expected, prompts)
    if any(x is not None for x in custom) and not all(x is not None for x in custom):
        raise VidiffuseError("--classifier, --expected and --prompts go together")
    if classifier is not None and attribute:
        raise VidiffuseError("--attribute is for the shapes-world audit; with --classifier the attributes are the keys of --expected")
    if batch_size < 1:
        raise VidiffuseError(f"--batch-size must be at least 1, got {batch_size}")
    # every input is checked before the model loads and minutes of generation start
    if classifier is not None:
        plan = bias.plan_custom(classifier, expected, prompts, n=n, seed=seed, alpha=alpha)
    else:
        plan = bias.plan_shapes(resolve_model_path(model), n=n, seed=seed, alpha=alpha,
                                attributes=attribute or bias.shapes.ATTRIBUTES)
    report = bias.audit(VideoPipeline.from_pretrained(model), plan, batch_size=batch_size, steps=steps,
                        guidance=guidance, sampler=sampler)
    json_path, png_path = bias.write_bias_report(report, out)
    for name, r in report["attributes"].items():
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.3g}"
        chi2 = "n/a" if r["chi2"] is None else f"{r['chi2']:.2f}"
        over = r["most_over"]["value"] if r["most_over"] else "-"
        err.print(f"{name:<11} n={r['n']:<4} unreadable={r['unreadable']:<3} chi2={chi2:<6} p={p:<8} "
                  f"most over-represented={over}{'  [red]FLAGGED[/red]' if r['significant'] else ''}")
    err.print(f"wrote {json_path} and {png_path}")


@govern_app.command("memorization")
def govern_memorization(
    generated: Path = typer.Argument(..., help="Folder of generated videos."),
    train_dir: Path = typer.Option(..., "--train", help="Folder of the training clips."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Similarity at or above which a generation counts as a copy (default: calibrated 0.99)."),
    k: int = typer.Option(3, "--k", help="Nearest training clips listed per generated video."),
    out: Path = typer.Option(Path("govern"), "--out", help="Folder for memorization.json and memorization.md."),
):
    """Nearest training clips of each generated video; flags copies of training clips."""
    from .data.fingerprint import SIMILARITY_THRESHOLD
    from .govern.memorization import check_memorization

    report = check_memorization(generated, train_dir, SIMILARITY_THRESHOLD if threshold is None else threshold, k, out)
    err.print(f"{report['n_flagged']} of {report['n_generated']} generated videos flagged as copies of one of "
              f"{report['n_training']} training clips ({report['metric']} >= {report['threshold']:g})")
    for f in report["flagged"]:
        err.print(f"  {f['generated']} ~ {f['training']} (similarity {f['similarity']:.4f})")
    err.print(f"wrote {out / 'memorization.json'} and {out / 'memorization.md'}")


@govern_app.command("card")
def govern_card(
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name."),
    out: Path = typer.Option(..., "--out", help="Folder for MODEL_CARD.md and risk_report.json."),
    eval_report: Optional[Path] = typer.Option(None, "--eval", help="report.json from `vidiffuse eval`."),
    memorization: Optional[Path] = typer.Option(None, "--memorization", help="Memorization report JSON."),
    bias_report: Optional[Path] = typer.Option(None, "--bias", help="bias.json from `vidiffuse govern bias`."),
    data_manifest: Optional[Path] = typer.Option(None, "--data-manifest", help="The training data's manifest file (its hash is checked against the model's)."),
    watermark: Optional[Path] = typer.Option(None, "--watermark", help="watermark.json from benchmarks/watermark.py (robustness evidence)."),
):
    """Model card and risk report, generated from measurements (missing inputs are reported as not measured)."""
    from .govern.card import write_model_card

    paths = write_model_card(model, out, eval_report=eval_report, memorization=memorization, bias=bias_report,
                             data_manifest=data_manifest, watermark=watermark)
    err.print("wrote " + " and ".join(str(p) for p in paths.values()))


keys_app = typer.Typer(help="API keys for `vidiffuse serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    workers: int = typer.Option(1, "--workers", min=0, max=64, help="Worker processes to run beside the API."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Registered model name (follows its `production` alias), bundled name or directory."),
    queue: Optional[str] = typer.Option(None, "--queue", help="sqlite (embedded, default) or redis (with --redis-url)."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url"),
):
    """Serve the HTTP API (docs at /docs), the web page (/) and /metrics, with supervised workers.

    Settings come from VIDIFFUSE_* environment variables (see README); options here override them."""
    from .serve.server import serve as run_server

    run_server(_serve_settings(model=model, queue=queue, redis_url=redis_url), host=host, port=port, workers=workers)


@app.command()
def worker(
    max_jobs: Optional[int] = typer.Option(None, "--max-jobs", min=1, help="Exit after this many jobs."),
):
    """Run one worker: claim queued jobs and generate them (with `--queue redis`: a Dramatiq worker)."""
    from .serve.app import configure_logging

    configure_logging()
    settings = _serve_settings()
    if settings.queue == "redis":
        from .serve.redis_queue import run_redis_worker

        run_redis_worker(settings)
    else:
        from .serve.worker import run_worker

        run_worker(settings, max_jobs=max_jobs)


def _serve_settings(**overrides):
    from pydantic import ValidationError

    from .serve.settings import ServeSettings

    try:
        return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise VidiffuseError("bad service setting: " + "; ".join(
            f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who the key is for (unique)."),
    rate: Optional[int] = typer.Option(None, "--rate", min=1, help="Jobs per minute (server default if unset)."),
    quota: Optional[int] = typer.Option(None, "--quota", min=1, help="Jobs per day (server default if unset)."),
):
    """Create an API key. The key is printed once, here; only its hash is stored."""
    from .serve.store import Store

    settings = _serve_settings()
    key, secret = Store(settings.db_path).create_key(name, rate or settings.rate_per_minute, quota or settings.quota_per_day)
    err.print(f"created key [bold]{key.name}[/bold] ({key.rate_per_minute}/min, {key.quota_per_day}/day). "
              "It is shown only now; send it as `Authorization: Bearer KEY`:")
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(...)):
    """Revoke a key: its next request is refused (401)."""
    from .serve.store import Store

    Store(_serve_settings().db_path).revoke_key(name)
    err.print(f"revoked key {name}")


@keys_app.command("list")
def keys_list():
    """Keys with their limits (never the secrets)."""
    from datetime import datetime, timezone

    from rich.table import Table

    from .serve.store import Store

    table = Table("name", "id", "created", "status", "rate/min", "quota/day")
    for k in Store(_serve_settings().db_path).keys():
        when = datetime.fromtimestamp(k.created, timezone.utc).strftime("%Y-%m-%d %H:%M")
        table.add_row(k.name, k.id, when, "revoked" if k.revoked else "active", str(k.rate_per_minute), str(k.quota_per_day))
    Console().print(table)


registry_app = typer.Typer(help="Model registry: versions, aliases (production, candidate), eval-gated promotion, "
                                "rollback, audit log.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _tags(specs: list[str]) -> dict[str, str]:
    pairs = [s.partition("=") for s in specs]
    bad = [s for s, (k, eq, _) in zip(specs, pairs) if not k.strip() or not eq]
    if bad:
        raise VidiffuseError(f"--tag wants KEY=VALUE, got {bad[0]!r}")
    return {k.strip(): v for k, _, v in pairs}


@registry_app.command("register")
def registry_register(
    name: str = typer.Argument(..., help="Registered model name (created on its first version)."),
    model_dir: str = typer.Argument(..., help="Model directory (with model_index.json) or bundled name."),
    eval_report: Optional[Path] = typer.Option(None, "--eval-report", help="report.json from `vidiffuse eval` of this model."),
    card: Optional[Path] = typer.Option(None, "--card", help="Model card (default: the directory's MODEL_CARD.md or README.md)."),
    description: str = typer.Option("", "--description"),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE, repeatable."),
):
    """Copy a model directory into the registry as NAME's next version."""
    from .registry import ModelRegistry

    mv = ModelRegistry().register(name, model_dir, eval_report=eval_report, card=card, description=description,
                                  tags=_tags(tag))
    err.print(f"registered {mv.label} (model version {mv.model_version}"
              f"{'' if mv.eval_report else ', no eval report yet'}) at {mv.path}")


@registry_app.command("list")
def registry_list(name: Optional[str] = typer.Argument(None, help="One model's versions (default: every model).")):
    """Registered models and versions with their aliases and headline metrics."""
    import json

    from rich.table import Table

    from .registry import ModelRegistry

    reg = ModelRegistry()
    table = Table("model", "version", "aliases", "model version", "adherence", "fvd", "created", "description")
    for model in [name] if name else reg.models():
        for mv in reg.versions(model):
            metrics = json.loads(mv.eval_report.read_text()).get("metrics", {}) if mv.eval_report else {}
            fmt = lambda k: "—" if metrics.get(k) is None else f"{metrics[k]:.4g}"  # noqa: E731
            table.add_row(model, str(mv.version), ", ".join(mv.aliases), mv.model_version, fmt("adherence_mean"),
                          fmt("fvd_shapes"), mv.created[:19].replace("T", " "), mv.description)
    Console().print(table)


@registry_app.command("show")
def registry_show(
    name: str = typer.Argument(...),
    alias: Optional[str] = typer.Option(None, "--alias", help="The version this alias points at (default: production)."),
    version: Optional[int] = typer.Option(None, "--version", help="A version by number."),
    as_json: bool = typer.Option(False, "--json", help="Print it as JSON."),
):
    """One version's details: path, hashes, report, card, tags, aliases."""
    import json

    from .registry import ModelRegistry, RegistryError

    if alias is not None and version is not None:
        raise VidiffuseError("give --alias or --version, not both")
    reg = ModelRegistry()
    mv = reg.get(name, version) if version is not None else reg.resolve(name, alias or "production")
    if mv is None:
        reg.versions(name)  # an unknown model gets its own error
        raise RegistryError(f"{name} has no alias {alias or 'production'!r} (aliases: "
                            f"{', '.join(reg.aliases(name)) or 'none'})")
    if as_json:
        typer.echo(json.dumps(mv.to_dict(), indent=2))
        return
    for key, value in mv.to_dict().items():
        typer.echo(f"{key + ':':<31} {value}")


@registry_app.command("alias")
def registry_alias(
    name: str = typer.Argument(...),
    alias: str = typer.Argument(..., help="e.g. candidate"),
    version: int = typer.Argument(...),
    force: bool = typer.Option(False, "--force", help="Allow moving production without the eval gate."),
):
    """Point an alias at a version (no gate; `production` goes through `promote`)."""
    from .registry import ModelRegistry

    if alias == "production" and not force:
        raise VidiffuseError("production moves through `vidiffuse registry promote` (eval-gated) or `rollback`; "
                             "--force sets it directly")
    mv = ModelRegistry().set_alias(name, alias, version)
    err.print(f"{alias} → {mv.label}")


@registry_app.command("attach-report")
def registry_attach_report(
    name: str = typer.Argument(...),
    version: int = typer.Argument(...),
    report: Path = typer.Argument(..., help="report.json from `vidiffuse eval --model <the version's path>`."),
):
    """Give a version its eval report (or replace it)."""
    from .registry import ModelRegistry

    mv = ModelRegistry().attach_report(name, version, report)
    err.print(f"attached {report} to {mv.label}")


@registry_app.command("promote")
def registry_promote(
    name: str = typer.Argument(...),
    version: int = typer.Argument(...),
    alias: str = typer.Option("production", "--alias"),
    tolerance: list[str] = typer.Option([], "--tolerance", help="Relative tolerance: '0.05' for all metrics, or "
                                        "'adherence_mean=0.02'. Repeatable."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate fails (recorded in the audit log)."),
    evaluate: bool = typer.Option(False, "--eval", help="Evaluate the version first if it has no eval report "
                                  "(with the current version's report settings; takes minutes)."),
):
    """Move an alias (production) to VERSION if its eval report is no worse than the current version's."""
    from rich.markup import escape

    from .evaluate.suite import parse_tolerances
    from .registry import ModelRegistry, PromotionRefused

    reg = ModelRegistry()
    before = reg.resolve(name, alias)
    try:
        mv = reg.promote(name, version, alias=alias, tolerances=parse_tolerances(tolerance), force=force,
                         evaluate=evaluate, progress=lambda m: err.print(f"[dim]{escape(m)}[/dim]"))
    except PromotionRefused as e:
        err.print(f"[red]refused: {name} version {version} does not pass the gate for {alias}[/red]")
        for reason in e.reasons:
            err.print(f"  {escape(reason)}")
        raise typer.Exit(1)
    gate = next((a["gate"] for a in reversed(reg.audit(name))
                 if a["action"] == "promote" and a["alias"] == alias and a["to"] == version), {})
    if before is not None and before.version == version:
        err.print(f"{alias} already points at {mv.label}")
    elif gate.get("reasons"):
        err.print(f"[yellow]{alias} → {mv.label}, forced past the gate:[/yellow] " + escape("; ".join(gate["reasons"])))
    elif before is None or gate.get("note"):
        err.print(f"[green]{alias} → {mv.label}[/green] ({escape(gate.get('note') or f'no version on {alias} before: nothing to gate against')})")
    else:
        err.print(f"[green]{alias} → {mv.label}[/green] (gate passed against version {before.version})")


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(...),
    alias: str = typer.Option("production", "--alias"),
):
    """Move an alias back to the version it pointed at before."""
    from .registry import ModelRegistry

    reg = ModelRegistry()
    before = reg.resolve(name, alias)
    mv = reg.rollback(name, alias=alias)
    err.print(f"{alias}: {before.label if before else '?'} → {mv.label}")


@registry_app.command("audit")
def registry_audit(
    name: Optional[str] = typer.Argument(None),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON lines."),
):
    """Every registration, alias move, promotion (refused ones too) and rollback, oldest first."""
    import json

    from rich.table import Table

    from .registry import ModelRegistry

    entries = ModelRegistry().audit(name)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    table = Table("when", "who", "action", "model", "alias", "from", "to", "details")
    for e in entries:
        gate = e.get("gate") or {}
        details = ("forced past: " if e.get("forced") else "") + "; ".join(gate.get("reasons", []))
        details = details or gate.get("note", "") or (f"v{e['version']}" if "version" in e else "")
        table.add_row(e["when"][:19].replace("T", " "), e["who"], e["action"], e["model"], e.get("alias", ""),
                      "—" if e.get("from") is None else str(e["from"]), str(e.get("to", "")), details,
                      style="red" if e["action"] == "promote_refused" else None)
    Console().print(table)


@registry_app.command("verify")
def registry_verify(name: str = typer.Argument(...), version: int = typer.Argument(...)):
    """Check that a registered version's files are still the ones registered (exit 1 if not)."""
    from .registry import ModelRegistry

    problems = ModelRegistry().verify(name, version)
    for p in problems:
        err.print(f"  {p}")
    if problems:
        raise VidiffuseError(f"{name}@{version} changed since registration ({len(problems)} file(s))")
    err.print(f"{name}@{version}: every file matches its registered SHA-256")


monitor_app = typer.Typer(help="Drift monitoring and the canary of a running service.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("canary-reference")
def monitor_canary_reference(
    model: str = typer.Option("shapes", "--model", "-m", help="Model directory or bundled name (shapes)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Reference file (default: the one the worker's canary reads, "
                                            "$VIDIFFUSE_HOME/monitor/canary/<model>@<version>.safetensors)."),
    n: int = typer.Option(8, "--n", help="Golden prompts to regenerate on every canary run."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (model default if unset)."),
):
    """Record the canary's reference: the model's videos for fixed golden prompts and seeds, on this machine."""
    from .monitor import default_reference_path, make_canary_reference
    from .pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(model)
    path = make_canary_reference(pipe, out or default_reference_path(pipe), n=n, steps=steps)
    err.print(f"wrote {path} ({n} golden videos of {pipe.name} version {pipe.version})")


def quiet_libraries() -> None:
    """diffusers/transformers chatter (weight-loading bars, optional-dependency notes) is not for users."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" of Wan/LTX/CogVideoX directories


def main() -> None:
    logging.basicConfig(level=os.environ.get("VIDIFFUSE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        app()
    except VidiffuseError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
