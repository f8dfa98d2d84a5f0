"""The `vidiffuse` command: a thin typer layer over the Python API."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import VidiffuseError

app = typer.Typer(help="vidiffuse: video diffusion from data to production.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: the shapes world and your own footage.", no_args_is_help=True)
app.add_typer(data_app, name="data")
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
    from .generation import generate_batch, generate_file
    from .pipeline import VideoPipeline

    if (prompt is None) == (prompts is None):
        raise VidiffuseError("give either a PROMPT or --prompts FILE.jsonl")
    if batch_size < 1:
        raise VidiffuseError(f"--batch-size must be at least 1, got {batch_size}")
    settings = {"steps": steps, "guidance": guidance, "sampler": sampler, "frames": frames}
    if prompt is not None and not prompt.strip():
        raise VidiffuseError("the prompt is empty")
    if prompts is not None:
        log = generate_batch(model, prompts, out_dir, seed=seed, batch_size=batch_size, **settings)
        err.print(f"wrote {sum(1 for _ in log.open())} videos to {out_dir} (settings in {log})")
    else:
        record = generate_file(VideoPipeline.from_pretrained(model), prompt, output, seed=seed, **settings)
        err.print(f"wrote {record['file']}")


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
