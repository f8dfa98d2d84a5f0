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
):
    """Generate a video from a prompt, or a folder of videos from a JSONL of prompts."""
    from .generation import generate_batch, generate_file, logger
    from .pipeline import VideoPipeline

    if (prompt is None) == (prompts is None):
        raise VidiffuseError("give either a PROMPT or --prompts FILE.jsonl")
    if batch_size < 1:
        raise VidiffuseError(f"--batch-size must be at least 1, got {batch_size}")
    settings = {"steps": steps, "guidance": guidance, "sampler": sampler, "frames": frames}
    if prompt is not None and not prompt.strip():
        raise VidiffuseError("the prompt is empty")
    with warnings_as_lines(logger):
        if prompts is not None:
            log = generate_batch(model, prompts, out_dir, seed=seed, batch_size=batch_size, **settings)
            err.print(f"wrote {sum(1 for _ in log.open())} videos to {out_dir} (settings in {log})")
        else:
            record = generate_file(VideoPipeline.from_pretrained(model), prompt, output, seed=seed, **settings)
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
def train(
    config: Path = typer.Option(..., "--config", "-c", help="TOML training config (see configs/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (then --resume)."),
):
    """Train an autoencoder or a denoiser; launch with torchrun for DDP."""
    from .train.trainer import train as run_training

    out = run_training(config, resume=resume, max_steps=max_steps)
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


def quiet_libraries() -> None:
    """diffusers/transformers chatter (weight-loading bars, optional-dependency notes) is not for users."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


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
